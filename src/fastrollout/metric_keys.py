"""Metric keys: a key's name and aggregation, and the cached per-key plans of the grouping code.

A key may end in ``:agg`` with agg one of mean|sum|max|min|last; any other suffix (or none)
makes the whole key a mean key, and ``"a"`` and ``"a:mean"`` are one metric. A key must be a
``str`` (a subclass counts); any other key raises TypeError, whatever its value.

A leaf module: ``fastrollout.metrics`` and the native tally (which metrics imports) both
build on it. Every function is cached per key, so a key is parsed once per process.
"""
from __future__ import annotations

import functools
import reprlib
from enum import Enum

__all__ = ["AggType", "parse_metric_key", "key_type_error", "batch_group", "run_group",
           "single_run_plan", "is_time_key"]

_TIME_KEYS = ("time/task_execution", "time/run_execution")


class AggType(str, Enum):
    MEAN = "mean"
    SUM = "sum"
    MAX = "max"
    MIN = "min"
    LAST = "last"


_AGG_BY_VALUE = {agg.value: agg for agg in AggType}
# Members as module constants: an Enum member looked up on its class costs ~0.16 us in
# Python 3.11.
_MEAN, _SUM = AggType.MEAN, AggType.SUM


def key_type_error(key: object) -> TypeError:
    """The error for a metric key that is not a str, naming the key and its type."""
    return TypeError(f"metric key {reprlib.repr(key)} ({type(key).__name__}) is not a str")


@functools.lru_cache(maxsize=8192)
def parse_metric_key(key: str) -> tuple[str, AggType]:
    """Split a metric key into ``(name, AggType)``.

    ``"reward"`` -> ``("reward", MEAN)``, ``"count:sum"`` -> ``("count", SUM)``,
    ``"some:unknown"`` -> ``("some:unknown", MEAN)`` (an unknown suffix is part of the name).
    """
    if not isinstance(key, str):
        raise key_type_error(key)
    name, sep, suffix = key.rpartition(":")
    agg = _AGG_BY_VALUE.get(suffix) if sep else None
    return (key, _MEAN) if agg is None else (name, agg)


@functools.lru_cache(maxsize=8192)
def batch_group(key: str) -> tuple[tuple[str, AggType], AggType]:
    """Batch-level grouping: ``(group, agg)`` with one group per ``(name, agg)``."""
    parsed = parse_metric_key(key)
    return parsed, parsed[1]


@functools.lru_cache(maxsize=8192)
def run_group(key: str) -> tuple[str, AggType]:
    """Run/task-level grouping: one group per canonical key (``name`` or ``name:agg``).
    Distinct (name, agg) pairs can share one ("x:sum" and "x:sum:mean"); the group then keeps
    the agg of its first value, as Trinity's does."""
    name, agg = parse_metric_key(key)
    return (name if agg is _MEAN else f"{name}:{agg.value}"), agg


@functools.lru_cache(maxsize=8192)
def single_run_plan(key: str) -> tuple[str, bool, bool]:
    """For a task of one run: the key's :func:`run_group`, whether its one value is summed
    (a mean or a sum) and whether an eval task may reduce it alone (it is not a mean, or is
    a time)."""
    group, agg = run_group(key)
    return group, agg is _MEAN or agg is _SUM, agg is not _MEAN or is_time_key(group)


def is_time_key(canonical: str) -> bool:
    """An eval task averages time keys over its runs instead of giving mean@n, best@k...."""
    name = parse_metric_key(canonical)[0]  # as Trinity: the name parsed again from the key
    return _TIME_KEYS[0] in name or _TIME_KEYS[1] in name
