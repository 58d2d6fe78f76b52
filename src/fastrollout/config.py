"""Configuration: msgspec Structs mirroring the part of Trinity-RFT's config a coordinator reads.

Every loader (``from_dict``, ``from_file``, ``from_trinity``) and ``validate()`` report a bad
value as a ``ConfigError`` naming its dotted path, e.g. ``explorer.max_timeout``.
"""
from __future__ import annotations

import json
import pathlib
import re
import tomllib
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
import yaml

from .errors import ConfigError

__all__ = ["Config", "ExplorerConfig", "OverRolloutConfig", "DynamicTimeoutConfig",
           "MonitorConfig", "PipelineConfig", "WeightSyncConfig"]

_Struct = dict(kw_only=True, forbid_unknown_fields=True)
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class OverRolloutConfig(msgspec.Struct, **_Struct):
    """Finalize a train batch once ``(1 - ratio)`` of its tasks are done (Trinity's
    over-rollout)."""

    ratio: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.0
    """Fraction of a batch's tasks finalize may leave unfinished (the explorer turns it into
    ``min_wait_num``)."""
    wait_after_min: NonNegFloat = 30.0
    """Seconds to keep collecting after ``min_wait_num`` tasks are done; the rest are cancelled."""
    return_partial_tasks: bool = False
    """Also return tasks of which only some runs completed."""


class DynamicTimeoutConfig(msgspec.Struct, **_Struct):
    """Per-attempt timeout from observed task times:
    ``min(max_timeout, mean train time * ratio)``."""

    enable: bool = False
    ratio: Annotated[float, msgspec.Meta(gt=0)] = 3.0
    warmup_min_steps: Annotated[int, msgspec.Meta(ge=0)] = 1
    """Fully completed train batches to observe before the dynamic timeout applies."""


class ExplorerConfig(msgspec.Struct, **_Struct):
    """How tasks are run: slots, retries, timeouts, repeat splitting, concurrency."""

    runner_per_model: Annotated[int, msgspec.Meta(ge=1)] = 8
    """Concurrent task slots per rollout engine."""
    max_retry_times: Annotated[int, msgspec.Meta(ge=0)] = 2
    """Extra attempts after a failed or timed-out attempt."""
    max_timeout: Annotated[float, msgspec.Meta(gt=0)] = 1800.0
    """Seconds for ONE attempt (Trinity 0.6.0 allowed ``max_timeout * (max_retry_times + 1)``)."""
    max_repeat_times_per_runner: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Split a task's ``repeat_times`` into sub-tasks of at most this many runs."""
    concurrent_mode: Literal["sequential", "asynchronous", "multi-threading"] = "sequential"
    """How the runs of a non-repeatable workflow execute within one slot."""
    over_rollout: OverRolloutConfig = msgspec.field(default_factory=OverRolloutConfig)
    dynamic_timeout: DynamicTimeoutConfig = msgspec.field(default_factory=DynamicTimeoutConfig)


class MonitorConfig(msgspec.Struct, **_Struct):
    detailed_stats: bool = False
    """Eval metrics get ``/mean``, ``/max``, ``/min``, ``/std`` instead of the mean alone."""
    backends: list[Literal["tensorboard", "wandb"]] = []
    """Where metrics go besides the JSONL file that ``fastrollout.monitors`` always writes."""
    project: str = "fastrollout"
    """Weights & Biases project."""


_Operator = dict(kw_only=True, forbid_unknown_fields=True, tag_field="type")


# Experience operators (``fastrollout.operators``), named by ``type`` in a config list.
class GRPOConfig(msgspec.Struct, tag="grpo", **_Operator):
    epsilon: Annotated[float, msgspec.Meta(ge=0)] = 1e-6
    norm_std: bool = True
    """Divide by the group's reward std (GRPO); false gives Dr. GRPO's mean-centred rewards."""


class DynamicFilterConfig(msgspec.Struct, tag="dynamic_filter", **_Operator):
    threshold: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Drop a task's experiences when the std of their rewards is at most this."""


class RewardFilterConfig(msgspec.Struct, tag="reward_filter", **_Operator):
    min: float | None = None
    max: float | None = None


class LengthFilterConfig(msgspec.Struct, tag="length_filter", **_Operator):
    min_response_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_response_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


class StalenessFilterConfig(msgspec.Struct, tag="staleness_filter", **_Operator):
    max_staleness: Annotated[int, msgspec.Meta(ge=0)] = 1
    """Keep experiences sampled fewer than this many versions before the current weights."""


OperatorConfig = (GRPOConfig | DynamicFilterConfig | RewardFilterConfig | LengthFilterConfig
                  | StalenessFilterConfig)


class PipelineConfig(msgspec.Struct, **_Struct):
    """What happens to finalized train experiences (``fastrollout.pipeline``): operators, then
    a sink (``fastrollout.sinks``)."""

    sink: Literal["memory", "stream", "durable", "discard"] = "memory"
    """``memory`` keeps each batch until ``take_experiences(batch_id)``; ``stream`` feeds
    ``coordinator.sink.reader()`` (``await reader.read(n)``); ``durable`` appends to the
    log in ``path``, synced before finalize returns, for a reader in another process;
    ``discard`` only counts them (bench mode, benchmarks)."""
    max_buffered_experiences: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """At most this many experiences wait in the memory or stream sink; more is refused with
    an error rather than growing without bound. ``None``: unbounded."""
    path: str | None = None
    """The durable log's folder (``sink: durable``)."""
    segment_bytes: Annotated[int, msgspec.Meta(ge=1)] = 64 << 20
    """The durable log's segment size (a larger batch gets a segment of its own)."""
    operators: list[OperatorConfig] = []
    """Run in order on each finalized train batch and by ``process_experiences``, e.g.
    ``[{type: grpo}, {type: dynamic_filter}]``."""

    def __post_init__(self) -> None:
        if self.sink == "durable" and not self.path:
            raise ValueError("sink 'durable' needs a folder: set pipeline.path")


class WeightSyncConfig(msgspec.Struct, **_Struct):
    """How ``RolloutCoordinator.update_weights`` moves new weights onto the rollout engines."""

    mode: Literal["wait", "keep", "abort"] = "wait"
    """What happens to requests running at the update: ``wait`` lets them finish on the old
    weights first (no request straddles two versions), ``keep`` freezes them and resumes
    them on the new weights (they straddle), ``abort`` aborts them (their attempts fail and
    are retried)."""


class Config(msgspec.Struct, **_Struct):
    """The coordinator's whole configuration; defaults match Trinity-RFT 0.6.0."""

    mode: Literal["both", "explore", "train", "colocate", "bench", "serve"] = "both"
    """Trinity's modes: ``bench`` runs no experience pipeline, ``serve`` no scheduler (only
    ``process_experiences``); the others run both."""
    explorer: ExplorerConfig = msgspec.field(default_factory=ExplorerConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    weight_sync: WeightSyncConfig = msgspec.field(default_factory=WeightSyncConfig)
    freeze_heap: bool = False
    """At the first ``prepare()`` of the process, move every object alive then out of the
    cyclic GC's sight (``gc.freeze()``), so that full collections stop re-walking big
    libraries (torch, vLLM: ~0.3 s a walk). Objects of the caller's alive then are never
    collected if they later die in a cycle: an opt-in for processes that mostly run the
    coordinator."""

    @property
    def finalize_timeout(self) -> float:
        """Default finalize wait: every attempt of a task may use its full ``max_timeout``."""
        return self.explorer.max_timeout * (self.explorer.max_retry_times + 1)

    @classmethod
    def default(cls) -> Config:
        """The configuration ``fastrollout run`` uses when given no file."""
        return cls()

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        """Build from plain mappings (as parsed from YAML/TOML/JSON); missing keys take defaults."""
        if data is None:
            data = {}
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise config_error(exc, data) from None

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> Config:
        """Load a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file (chosen by suffix)."""
        path = pathlib.Path(path)
        suffix = path.suffix.lower()
        if suffix not in _PARSERS:
            raise ConfigError(f"{path}: unknown config file suffix {path.suffix!r}; "
                              f"use one of {', '.join(sorted(_PARSERS))}")
        try:
            data = _PARSERS[suffix](path.read_bytes())
        except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as exc:
            raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_trinity(cls, config: Any) -> Config:
        """Read the same attribute paths from a Trinity ``Config`` (or any object shaped like it).

        Attributes the object lacks take our defaults (older Trinity releases have no
        ``over_rollout`` or ``dynamic_timeout``); present ones are validated like a file.
        """
        return cls.from_dict(_read_attrs(config, cls))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts, the inverse of ``from_dict``."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        return data

    def validate(self) -> Config:
        """Check a Config built in Python (constructors do not validate); returns ``self``."""
        try:
            data = msgspec.to_builtins(self)
        except TypeError as exc:
            raise ConfigError(f"config holds a value that is not plain data: {exc}") from None
        self.from_dict(data)
        return self


def _read_attrs(obj: Any, struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The attributes of ``obj`` named like ``struct``'s fields, recursing into sub-structs."""
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(struct):
        value = getattr(obj, field.name, _MISSING)
        if value is _MISSING:
            continue
        sub = _struct_type(field.type)
        out[field.name] = value if sub is None or value is None else _read_attrs(value, sub)
    return out


_MISSING = object()


def _struct_type(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def config_error(exc: msgspec.ValidationError, data: Any,
                 root: type[msgspec.Struct] | None = None) -> ConfigError:
    """Turn msgspec's "... - at `$.a[0].b`" (from converting ``data`` into ``root``, default
    ``Config``) into "a[0].b: ..." with the offending value, or the known keys of an unknown
    one. Every config loader of the package reports its errors through this."""
    if isinstance(exc.__cause__, ConfigError) and " - at `$" not in str(exc):
        return exc.__cause__    # raised by a __post_init__ at the top level, names its field
    message, _, where = str(exc).partition(" - at `$")
    path = where.rstrip("`").lstrip(".")
    keys = _path_keys(path)
    if message.startswith("Object missing required field `"):
        key = message.split("`")[1]
        return ConfigError(f"{f'{path}.{key}' if path else key}: required key is missing")
    if message.startswith("Object contains unknown field `"):
        key = f"{path}.{message.split('`')[1]}" if path else message.split("`")[1]
        struct = _struct_at(keys, data, root or Config)
        if struct is None:
            return ConfigError(f"{key}: unknown key")
        known = ", ".join(f.name for f in msgspec.structs.fields(struct))
        return ConfigError(f"{key}: unknown key (known keys: {known})")
    named = _FIELD_FIRST.match(message)
    if named:   # raised by a __post_init__ that names its field
        path = f"{path}.{named[1]}" if path else named[1]
        message = named[2]
    value = _value_at(data, _path_keys(path))
    shown = "" if value is _MISSING or "(value: " in message else f" (value: {_show(value)})"
    return ConfigError(f"{path or '<top level>'}: {message[0].lower()}{message[1:]}{shown}")


_FIELD_FIRST = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.S)
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _path_keys(path: str) -> list[str | int]:
    """msgspec's path ``a.b[0].c`` as the keys and list indices ``["a", "b", 0, "c"]``."""
    return [int(index) if index else name for name, index in _PATH_PART.findall(path)]


def _struct_at(keys: list[str | int], data: Any,
               root: type[msgspec.Struct]) -> type[msgspec.Struct] | None:
    """The Struct class that read the object at ``keys`` of ``data`` (None if not one)."""
    info: mi.Type | None = mi.type_info(root)
    for key in keys:
        data = _value_at(data, [key])
        if isinstance(key, int):
            info = info.item_type if isinstance(info, mi.ListType) else None
        elif isinstance(info, mi.StructType):
            info = next((f.type for f in info.fields if f.name == key), None)
        else:
            info = None
        info = _member(info, data)
    return info.cls if isinstance(info, mi.StructType) else None


def _member(info: mi.Type | None, data: Any) -> mi.Type | None:
    """The Struct of the union ``info`` that reads ``data`` (by its tag), else ``info``."""
    if isinstance(info, mi.UnionType):
        for member in info.types:
            if isinstance(member, mi.StructType) and (
                    member.tag_field is None
                    or (isinstance(data, dict) and data.get(member.tag_field) == member.tag)):
                return member
    return info


def _value_at(data: Any, keys: list[str | int]) -> Any:
    for key in keys:
        if isinstance(key, int):
            if not isinstance(data, list) or key >= len(data):
                return _MISSING
        elif not isinstance(data, dict) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Parsers by file suffix; each takes the file's bytes.
_PARSERS: dict[str, Callable[[bytes], Any]] = {
    ".yaml": yaml.safe_load,
    ".yml": yaml.safe_load,
    ".toml": lambda raw: tomllib.loads(raw.decode("utf-8")),
    ".json": json.loads,
}
