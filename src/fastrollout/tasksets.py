"""Tasksets: tasks read from JSONL, JSON or Parquet files, in seeded epochs, batch by batch.

A ``Taskset`` turns the rows of one file (or of the shards of one split in a folder) into
``Task`` objects: ``raw_task`` holds the row's prompt, answer and ``extra_keys`` under their own
keys. The order is a stream of ``epochs`` passes over the rows, each pass a permutation drawn
from ``(seed, epoch)`` when ``shuffle`` is on; batches are cut from that stream (a batch may
span two epochs, as in Trinity) and ``state_dict()`` is its position, so a restored taskset
yields exactly the batches that would have come.

Every row is checked when the taskset opens, so a bad row fails the run at once, naming the
file, the line (JSONL, 1-based), item (JSON, ``$[i]``) or row (Parquet, 0-based) and the key.
Memory per format:

- JSONL keeps 16 bytes a row (offset and line number) and re-reads a batch's lines from the
  file, whatever the file's size: one code path, and big files cost no more than their index.
- JSON is parsed whole (JSON offers no row boundaries to seek to); the selected fields of
  every row stay in memory. Use JSONL or Parquet for big tasksets.
- Parquet reads only the selected columns, in row batches, into Arrow memory (about the size
  of those columns' text): other columns, such as images, are never read.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import random
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal, Protocol

import msgspec
import numpy as np

from .config import config_error
from .errors import ConfigError, TasksetError
from .task import GenerationConfig, Task
from .workflow import Workflow

__all__ = ["TasksetError", "RolloutArgs", "TasksetConfig", "Taskset", "arithmetic_tasks",
           "write_arithmetic_jsonl"]


_Struct = dict(kw_only=True, forbid_unknown_fields=True)
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
             ".pq": "parquet"}


class RolloutArgs(msgspec.Struct, **_Struct):
    """Sampling parameters of the taskset's tasks (``GenerationConfig`` without ``n``, which
    the runner sets from ``repeat_times``)."""

    temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    top_k: int = -1
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0)] = 0
    seed: int | None = None


class TasksetConfig(msgspec.Struct, **_Struct):
    """Where the tasks are, which fields make a task, in which order they come."""

    path: str
    """A file, or a folder holding the files of ``split``."""
    format: Literal["jsonl", "json", "parquet"] | None = None
    """``None``: from the suffix (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``/``.pq``)."""
    split: str = "train"
    """When ``path`` is a folder: read its files named ``<split>.<suffix>`` or
    ``<split>-*.<suffix>`` (shards, in name order). Ignored for a file."""
    list_key: str | None = None
    """JSON whose top level is an object: the key of the list of rows."""
    prompt_key: str = "prompt"
    """Every row needs a string here."""
    answer_key: str | None = "answer"
    """Every row needs a non-null value here; ``None``: rows have no answer."""
    extra_keys: list[str] = msgspec.field(default_factory=list)
    """More keys every row must have (null allowed), copied into ``raw_task``."""
    workflow: str | None = None
    """A registered workflow name (``fastrollout.workflows.names()``) or ``"module:Class"``;
    or pass the class as ``workflow=`` to ``Taskset``."""
    repeat_times: Annotated[int, msgspec.Meta(ge=1)] = 1
    rollout_args: RolloutArgs = msgspec.field(default_factory=RolloutArgs)
    workflow_args: dict[str, Any] = msgspec.field(default_factory=dict)
    """Given to every task as is: a workflow that reads the prompt from ``raw_task`` has its
    own key option (``MathWorkflow``: ``workflow_args.prompt_key``)."""
    reward_fn_args: dict[str, Any] = msgspec.field(default_factory=dict)
    is_eval: bool = False
    """Eval tasksets are read once, in file order, final partial batch included."""
    shuffle: bool = False
    """Each epoch in its own seeded order (Trinity reads files in order)."""
    seed: Annotated[int, msgspec.Meta(ge=0)] = 42
    epochs: Annotated[int, msgspec.Meta(ge=1)] = 1
    drop_last: bool | None = None
    """Drop a final batch shorter than asked. ``None``: train tasksets drop it, eval ones don't."""

    def __post_init__(self) -> None:
        # Runs in constructors and in msgspec.convert, so also when nested in another config.
        if self.is_eval:
            for name, bad in (("shuffle", self.shuffle), ("epochs", self.epochs != 1),
                              ("drop_last", self.drop_last)):
                if bad:
                    raise ConfigError(f"{name}: eval tasksets are read once, in file order, "
                                      f"whole (value: {getattr(self, name)!r})")

    @classmethod
    def from_dict(cls, data: Any) -> TasksetConfig:
        """Build from plain mappings; a bad value raises ``ConfigError`` naming its field."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise config_error(exc, data, cls) from None

    def validate(self) -> TasksetConfig:
        """Check a config built in Python (constructors do not validate); returns ``self``."""
        try:
            data = msgspec.to_builtins(self)
        except TypeError as exc:
            raise ConfigError(f"taskset config holds a value that is not plain data: {exc}"
                              ) from None
        self.from_dict(data)
        return self


class Taskset:
    """The tasks of one ``TasksetConfig``, batch by batch, resumable. Not thread-safe.

    ``workflow`` overrides ``config.workflow``. Every row is read and checked here, so
    opening a big file takes one pass over it.
    """

    def __init__(self, config: TasksetConfig, *, workflow: type[Workflow] | None = None) -> None:
        config.validate()
        self.config = config
        self._workflow = workflow if workflow is not None else _resolve_workflow(config.workflow)
        selector = _RowSelector(config.prompt_key, config.answer_key, config.extra_keys)
        self._sources: list[_Source] = [_SOURCES[fmt](path, selector, config)
                                        for path, fmt in _files(config)]
        self._starts = [0]
        for source in self._sources:
            self._starts.append(self._starts[-1] + source.num_rows)
        self.num_rows = self._starts.pop()
        if self.num_rows == 0:
            raise TasksetError(f"{config.path}: no rows; a taskset needs at least one")
        self._total = self.num_rows * config.epochs
        self._drop_last = (not config.is_eval) if config.drop_last is None else config.drop_last
        self._generation = msgspec.structs.asdict(config.rollout_args)
        self._position = 0
        self._perm_epoch = -1
        self._perm = np.arange(0)

    def __len__(self) -> int:
        """Rows per epoch."""
        return self.num_rows

    @property
    def position(self) -> int:
        """Tasks handed out so far, over all epochs."""
        return self._position

    @property
    def epoch(self) -> int:
        """The epoch the next task comes from (``epochs`` once all are read)."""
        return self._position // self.num_rows

    def next_batch(self, batch_size: int) -> list[Task]:
        """The next ``batch_size`` tasks; fewer only at the very end (unless ``drop_last``),
        ``[]`` once the taskset is exhausted."""
        if type(batch_size) is not int or batch_size < 1:
            raise TasksetError(f"batch_size must be a positive int, got {batch_size!r}")
        start = self._position
        stop = min(start + batch_size, self._total)
        if stop == start or (stop - start < batch_size and self._drop_last):
            return []
        rows = self._rows_between(start, stop)
        raws = self._read(rows)
        self._position = stop
        return [self._task(raw, row) for raw, row in zip(raws, rows, strict=True)]

    def batches(self, batch_size: int) -> Iterator[list[Task]]:
        """``next_batch(batch_size)`` until the taskset is exhausted."""
        while batch := self.next_batch(batch_size):
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The position as JSON-ready data, with what it is only valid for."""
        return {"position": self._position, "num_rows": self.num_rows,
                "shuffle": self.config.shuffle, "seed": self.config.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a ``state_dict()`` of a taskset of the same rows, shuffle and seed
        (``epochs`` may differ)."""
        if not isinstance(state, dict) or set(state) != {"position", "num_rows", "shuffle", "seed"}:
            raise TasksetError(f"not a taskset state_dict: {state!r}")
        ours = self.state_dict()
        for key in ("num_rows", "shuffle", "seed"):
            if state[key] != ours[key] and (key != "seed" or self.config.shuffle):
                raise TasksetError(f"state_dict is for a taskset with {key}={state[key]!r}, "
                                   f"this one has {key}={ours[key]!r}")
        position = state["position"]
        if type(position) is not int or not 0 <= position <= self._total:
            raise TasksetError(f"state_dict position {position!r} is outside 0..{self._total} "
                               f"({self.num_rows} rows x {self.config.epochs} epochs)")
        self._position = position

    def _rows_between(self, start: int, stop: int) -> list[int]:
        """Row indices at stream positions ``start:stop``."""
        rows: list[int] = []
        while start < stop:
            epoch, offset = divmod(start, self.num_rows)
            end = min(stop, (epoch + 1) * self.num_rows)
            count = end - start
            if self.config.shuffle:
                rows.extend(self._permutation(epoch)[offset:offset + count].tolist())
            else:
                rows.extend(range(offset, offset + count))
            start = end
        return rows

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order: rows sorted by 64-bit keys from PCG64 seeded with
        ``(seed, epoch)``. Bit-generator output and SeedSequence are stable across numpy
        releases (``Generator.permutation`` is not), so a saved position stays valid."""
        if epoch != self._perm_epoch:
            seeds = np.random.SeedSequence([self.config.seed, epoch])
            keys = np.random.PCG64(seeds).random_raw(self.num_rows)
            self._perm = np.argsort(keys, kind="stable")
            self._perm_epoch = epoch
        return self._perm

    def _read(self, rows: list[int]) -> list[dict[str, Any]]:
        """The checked fields of ``rows``, in that order, one read per source file."""
        wanted: dict[int, tuple[list[int], list[int]]] = {}
        for slot, row in enumerate(rows):
            s = bisect_right(self._starts, row) - 1
            slots, local = wanted.setdefault(s, ([], []))
            slots.append(slot)
            local.append(row - self._starts[s])
        out: list[Any] = [None] * len(rows)
        for s, (slots, local) in wanted.items():
            for slot, raw in zip(slots, self._sources[s].read(local), strict=True):
                out[slot] = raw
        return out

    def _task(self, raw: dict[str, Any], row: int) -> Task:
        config = self.config
        return Task(workflow=self._workflow, repeat_times=config.repeat_times,
                    rollout_args=GenerationConfig(**self._generation),
                    workflow_args=dict(config.workflow_args),
                    reward_fn_args=dict(config.reward_fn_args), raw_task=raw,
                    is_eval=config.is_eval, index={"index": row})


def _resolve_workflow(name: str | None) -> type[Workflow]:
    if name is None:
        raise ConfigError("workflow: none given; name a registered workflow or 'module:Class', "
                          "or pass workflow= to Taskset")
    module, sep, attr = name.partition(":")
    if not sep:
        from . import workflows  # registers the built-in workflows

        try:
            return workflows.get(name)
        except ConfigError as exc:
            raise ConfigError(f"workflow: {exc}") from None
    if not module or not attr:
        raise ConfigError(f"workflow: {name!r} is not of the form 'module:Class'")
    try:
        cls: Any = importlib.import_module(module)
        for part in attr.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"workflow: cannot import {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Workflow)):
        raise ConfigError(f"workflow: {name!r} is not a Workflow subclass")
    return cls


def _files(config: TasksetConfig) -> list[tuple[pathlib.Path, str]]:
    """The files of ``config`` (one, or a split's shards in name order) and their format."""
    path = pathlib.Path(config.path)
    if path.is_dir():
        split = config.split
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES
                       and (p.stem == split or p.stem.startswith(f"{split}-")))
        if not files:
            raise ConfigError(f"path: folder {str(path)!r} has no file of split {split!r} "
                              f"({split}.jsonl, {split}-00000-of-00001.parquet, ...)")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"path: no such file or folder: {str(path)!r}")
    if config.format is not None:
        return [(p, config.format) for p in files]
    formats = {_SUFFIXES.get(p.suffix.lower(), "") for p in files}
    if "" in formats or len(formats) != 1:
        raise ConfigError(f"format: cannot tell from {', '.join(p.name for p in files)}; "
                          f"set it to jsonl, json or parquet")
    fmt = formats.pop()
    return [(p, fmt) for p in files]


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


class _RowSelector:
    """Checks a row and keeps its prompt, answer and extra keys."""

    def __init__(self, prompt_key: str, answer_key: str | None, extra_keys: list[str]) -> None:
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        keys = [prompt_key] + ([answer_key] if answer_key is not None else []) + extra_keys
        self.keys = list(dict.fromkeys(keys))

    def select(self, row: Any, path: pathlib.Path, unit: str, number: int) -> dict[str, Any]:
        """``row``'s selected fields; errors name ``path`` and ``unit.format(number)``."""
        if type(row) is not dict:
            raise _row_error(path, unit, number, f"expected a JSON object, got {_json_type(row)}")
        try:
            out = {key: row[key] for key in self.keys}
        except KeyError as exc:
            known = ", ".join(map(str, row)) or "none"
            raise _row_error(path, unit, number,
                             f"key {exc.args[0]!r}: missing (the row has keys: {known})") from None
        if type(out[self.prompt_key]) is not str:
            raise _row_error(path, unit, number, f"key {self.prompt_key!r}: expected a string, "
                             f"got {_json_type(out[self.prompt_key])}")
        if self.answer_key is not None and out[self.answer_key] is None:
            raise _row_error(path, unit, number, f"key {self.answer_key!r}: is null")
        return out


def _row_error(path: pathlib.Path, unit: str, number: int, problem: str) -> TasksetError:
    return TasksetError(f"{path}, {unit.format(number)}: {problem}")


def _decode_line(line: bytes, path: pathlib.Path, number: int) -> Any:
    try:
        return msgspec.json.decode(line)
    except msgspec.DecodeError as exc:
        raise _row_error(path, "line {}", number, f"invalid JSON: {exc}") from None


class _JsonlSource:
    """One JSON object a line; keeps each row's offset and line number, re-reads per batch."""

    def __init__(self, path: pathlib.Path, selector: _RowSelector, config: TasksetConfig) -> None:
        self.path = path
        self._selector = selector
        self._offsets = array("q")
        self._lines = array("q")
        with open(path, "rb") as f:
            self._stamp = _stamp(f)
            offset = 0
            for number, line in enumerate(f, 1):
                if line.strip():
                    selector.select(_decode_line(line, path, number), path, "line {}", number)
                    self._offsets.append(offset)
                    self._lines.append(number)
                offset += len(line)
        self.num_rows = len(self._offsets)

    def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        out = []
        with open(self.path, "rb") as f:
            if _stamp(f) != self._stamp:
                raise TasksetError(f"{self.path}: changed since the taskset opened it; open the "
                                   f"taskset again (and restore its state_dict)")
            for i in indices:
                f.seek(self._offsets[i])
                number = self._lines[i]
                row = _decode_line(f.readline(), self.path, number)
                out.append(self._selector.select(row, self.path, "line {}", number))
        return out


def _stamp(f: Any) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


class _JsonSource:
    """A JSON list of objects (or an object with the list under ``list_key``), parsed whole."""

    def __init__(self, path: pathlib.Path, selector: _RowSelector, config: TasksetConfig) -> None:
        try:
            data = msgspec.json.decode(path.read_bytes())
        except msgspec.DecodeError as exc:
            hint = "; for one object a line, set format to jsonl" if config.format is None else ""
            raise TasksetError(f"{path}: invalid JSON: {exc}{hint}") from None
        key = config.list_key
        unit = "$[{}]" if key is None else f"$.{key}[{{}}]"
        if key is not None:
            if type(data) is not dict or key not in data:
                keys = ", ".join(data) if type(data) is dict else _json_type(data)
                raise TasksetError(f"{path}: list_key {key!r}: no such key at the top level "
                                   f"(found: {keys})")
            data = data[key]
        if type(data) is not list:
            where = f"{path}" if key is None else f"{path}, $.{key}"
            fix = ("; set list_key to the key of the rows" if type(data) is dict and key is None
                   else "")
            raise TasksetError(f"{where}: expected a list of rows, got {_json_type(data)}{fix}")
        self._rows = [selector.select(row, path, unit, i) for i, row in enumerate(data)]
        self.num_rows = len(self._rows)

    def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        # Each task gets its own dict: a workflow may change raw_task.
        return [dict(self._rows[i]) for i in indices]


class _ParquetSource:
    """The selected columns of a Parquet file, read in row batches into Arrow memory."""

    _READ_ROWS = 65536

    def __init__(self, path: pathlib.Path, selector: _RowSelector, config: TasksetConfig) -> None:
        pa, pq = _import_pyarrow()
        with pq.ParquetFile(path) as f:
            schema = f.schema_arrow
            for key in selector.keys:
                if schema.get_field_index(key) < 0:
                    raise TasksetError(f"{path}: key {key!r}: no such column (columns: "
                                       f"{', '.join(schema.names)})")
            kind = schema.field(selector.prompt_key).type
            if not _is_text(pa, kind):
                raise TasksetError(f"{path}: key {selector.prompt_key!r}: expected a column of "
                                   f"strings, got {kind}")
            non_null = [k for k in (selector.prompt_key, selector.answer_key) if k is not None]
            batches = []
            start = 0
            for batch in f.iter_batches(batch_size=self._READ_ROWS, columns=selector.keys):
                for key in non_null:
                    column = batch.column(key)
                    if column.null_count:
                        row = start + column.is_null().to_pylist().index(True)
                        raise _row_error(path, "row {}", row, f"key {key!r}: is null")
                batches.append(batch)
                start += batch.num_rows
            fields = [schema.field(key) for key in selector.keys]
        self._table = pa.Table.from_batches(batches, schema=pa.schema(fields))
        self.num_rows = self._table.num_rows

    def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._table.take(indices).to_pylist()
        return rows


def _is_text(pa: Any, kind: Any) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind))


def _import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow  # type: ignore[import-untyped]
        import pyarrow.parquet  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError(f"reading Parquet tasksets needs pyarrow ({exc}); install it with "
                          f"pip install 'fastrollout[data]'") from None
    return pyarrow, pyarrow.parquet


class _Source(Protocol):
    """One file's rows: checked when opened, read back by index."""

    num_rows: int

    def read(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The selected fields of rows ``indices``, in that order, each a new dict."""


_SOURCES: dict[str, Callable[[pathlib.Path, _RowSelector, TasksetConfig], _Source]] = {
    "jsonl": _JsonlSource, "json": _JsonSource, "parquet": _ParquetSource}


def arithmetic_tasks(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """``n`` rows like ``{"question": "What is 17 + 25?", "answer": "42"}`` (``+``, ``-``, ``*``
    of numbers below 100, no negative answers), the same for the same ``seed``."""
    if type(n) is not int or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(100)
        op = "+-*"[rng.randrange(3)]
        if op == "-" and a < b:
            a, b = b, a
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        yield {"question": f"What is {a} {op} {b}?", "answer": str(answer)}


def write_arithmetic_jsonl(path: str | pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """Write ``arithmetic_tasks(n, seed)`` as JSONL (``prompt_key="question"``); the file
    appears whole or not at all."""
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for row in arithmetic_tasks(n, seed):
            f.write(json.dumps(row) + "\n")
    os.replace(partial, path)
    return path
