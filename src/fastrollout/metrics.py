"""Metric aggregation, a vectorized drop-in for ``trinity.utils.metrics`` of Trinity-RFT 0.6.0.

Same function names, arguments and output keys. Keys are parsed once (cached), values are
grouped once per call, and every statistic is a numpy reduction over a (keys x values) matrix;
best@k / worst@k need no per-sample Python loop (see :func:`calculate_task_level_metrics`).

Keys: as parsed by :mod:`fastrollout.metric_keys` (``name`` or ``name:agg``). A key that is
not a str raises TypeError, whatever its value (Trinity skips it when its value is skipped).

Values: one counts only if it is an instance of ``int`` or ``float``, as in Trinity. So ``bool``
counts (as 0.0 / 1.0) and so does ``numpy.float64`` (a ``float`` subclass), while ``numpy.int64``,
``numpy.float32``, strings and ``None`` are skipped.

Non-finite values are kept, never dropped, and give the numbers Trinity gives (NaN and inf
included), except where a docstring says otherwise (exact-mode best / worst / pass):

* statistics of mean keys are numpy's: NaN propagates, ``inf - inf`` is NaN;
* ``:sum`` keys and run-level means use Python's ``sum`` and ``:max`` / ``:min`` keys Python's
  ``max`` / ``min``, as Trinity does, so a NaN wins a ``:max`` only when it is the group's first
  value (comparisons with NaN are false);
* no numpy warning is raised for them: NaN and inf are results here, not errors.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ._native.tally import MetricTally as MetricTally
from ._native.tally import single_run_metrics
from .metric_keys import (
    AggType,
    batch_group,
    is_time_key,
    key_type_error,
    parse_metric_key,
    run_group,
)

__all__ = [
    "AggType", "parse_metric_key", "aggregate_metrics", "aggregate_eval_metrics",
    "aggregate_run_level_metrics", "calculate_task_level_metrics",
]

N_BOOTSTRAP = 1000          # Trinity's bootstrap sample count per (key, subset size)
BOOTSTRAP_SEED = 42         # Trinity reseeds with this before every (key, subset size)
_CHUNK = 1 << 20            # elements per bootstrap temporary (8 MiB of float64)

# A module constant: an Enum member looked up on its class costs ~0.16 us in Python 3.11, and
# the grouping code compares against MEAN for every group.
_MEAN = AggType.MEAN
_REDUCERS: dict[AggType, Callable[[list[float]], float]] = {
    AggType.SUM: sum, AggType.MAX: max, AggType.MIN: min, AggType.LAST: operator.itemgetter(-1),
}
_ROW_STATS = {  # row-wise over a (groups x values) matrix; per row identical to np.mean etc.
    "mean": functools.partial(np.mean, axis=1), "max": functools.partial(np.max, axis=1),
    "min": functools.partial(np.min, axis=1), "std": functools.partial(np.std, axis=1),
}
_NUMERIC = (int, float)
_UNIFORM_MIN = 32           # inputs shorter than this skip the transposing fast path

Groups = dict[Hashable, tuple[AggType, list[float]]]


def _group(metric_dicts: Sequence[Mapping[str, Any]],
           spec: Callable[[str], tuple[Hashable, AggType]]) -> Groups:
    """Numeric values grouped by ``spec(key)``, in Trinity's order: groups in order of their
    first numeric value, values in input order, each converted with ``float``."""
    if not isinstance(metric_dicts, (list, tuple)):
        metric_dicts = list(metric_dicts)
    if len(metric_dicts) < _UNIFORM_MIN:    # a task's few runs: the plain walk is cheaper
        return _group_items(metric_dicts, spec)
    groups = _group_uniform(metric_dicts, spec)
    return _group_items(metric_dicts, spec) if groups is None else groups


def _group_items(metric_dicts, spec) -> Groups:
    groups: Groups = {}
    for metric_dict in metric_dicts:
        for key, value in metric_dict.items():
            if isinstance(value, _NUMERIC):
                group, agg = spec(key)
                entry = groups.get(group)
                if entry is None:
                    entry = groups[group] = (agg, [])
                entry[1].append(float(value))
            elif not isinstance(key, str):     # (a numeric value's key is checked by spec)
                raise key_type_error(key)
    return groups


def _group_uniform(metric_dicts, spec) -> Groups | None:
    """The common case in one transposition: every dict has the same keys in the same order and
    no two of them share a group. Returns None when that does not hold."""
    keys = tuple(metric_dicts[0])
    if any(tuple(d) != keys for d in metric_dicts):
        return None
    layout = [spec(key) for key in keys]
    if len({group for group, _ in layout}) != len(layout):
        return None
    found = []
    for pos, ((group, agg), column) in enumerate(
            zip(layout, zip(*[d.values() for d in metric_dicts], strict=False), strict=False)):
        if all(issubclass(t, _NUMERIC) for t in set(map(type, column))):
            found.append((0, pos, group, agg, list(map(float, column))))
            continue
        numeric = [i for i, v in enumerate(column) if isinstance(v, _NUMERIC)]
        if numeric:
            found.append((numeric[0], pos, group, agg, [float(column[i]) for i in numeric]))
    found.sort(key=operator.itemgetter(0, 1))
    return {group: (agg, values) for _, _, group, agg, values in found}


def _mean_group_stats(groups: Groups, stats: Sequence[str]) -> dict[Hashable, list[float]]:
    """``stats`` of every mean group, computed per bucket of equal-length groups as one
    (groups x values) matrix; rows give bit-for-bit what np.mean/max/min/std give per group."""
    buckets: dict[int, list[Hashable]] = {}
    for group, (agg, values) in groups.items():
        if agg is _MEAN:
            buckets.setdefault(len(values), []).append(group)
    out: dict[Hashable, list[float]] = {}
    for members in buckets.values():
        matrix = np.array([groups[g][1] for g in members], dtype=np.float64)
        columns = [_ROW_STATS[s](matrix).tolist() for s in stats]
        for i, group in enumerate(members):
            out[group] = [column[i] for column in columns]
    return out


def _summarize(groups: Groups, prefix: str, stats: Sequence[str] | None) -> dict[str, float]:
    """Batch-level output: mean groups -> ``{p}{name}/{stat}`` (``{p}{name}`` when ``stats`` is
    None), other groups -> ``{p}{name}/{agg}``, written in group order so that colliding keys
    resolve as in Trinity (the later group wins)."""
    p = f"{prefix}/" if prefix else ""
    wanted = ["mean"] if stats is None else [s for s in stats if s in _ROW_STATS]
    with np.errstate(all="ignore"):
        computed = _mean_group_stats(groups, wanted)
    result: dict[str, float] = {}
    for group, (agg, values) in groups.items():
        name = group[0]
        if agg is not _MEAN:
            result[f"{p}{name}/{agg.value}"] = _REDUCERS[agg](values)
        elif stats is None:
            result[f"{p}{name}"] = computed[group][0]
        else:
            for stat, value in zip(wanted, computed[group], strict=False):
                result[f"{p}{name}/{stat}"] = value
    return result


def aggregate_metrics(metric_dicts: Sequence[Mapping[str, Any]], prefix: str = "",
                      default_output_stats: Sequence[str] | None = None) -> dict[str, float]:
    """Batch-level aggregation (one dict per task) for logging.

    Mean keys -> ``{prefix}/{name}/{stat}`` for each stat of ``default_output_stats`` (default
    mean, max, min; std is the population std; unknown names are ignored); ``:sum``/``:max``/
    ``:min``/``:last`` keys -> ``{prefix}/{name}/{agg}``.
    """
    if not metric_dicts:
        return {}
    stats = ("mean", "max", "min") if default_output_stats is None else default_output_stats
    return _summarize(_group(metric_dicts, batch_group), prefix, stats)


def aggregate_eval_metrics(metric_dicts: Sequence[Mapping[str, Any]], prefix: str = "",
                           output_stats: Sequence[str] | None = None,
                           detailed_stats: bool = False) -> dict[str, float]:
    """Like :func:`aggregate_metrics`, but a mean key gives only ``{prefix}/{name}`` (its mean)
    unless ``detailed_stats``, then ``/{stat}`` for ``output_stats`` (default mean, max, min,
    std)."""
    if not metric_dicts:
        return {}
    stats = ("mean", "max", "min", "std") if output_stats is None else output_stats
    return _summarize(_group(metric_dicts, batch_group), prefix, stats if detailed_stats else None)


def aggregate_run_level_metrics(metric_dicts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Experience-level dicts -> one run-level dict, keys kept with their ``:agg`` suffix
    (``"a:mean"`` becomes ``"a"``). Means are ``sum(values) / len(values)`` with Python's
    ``sum``, as in Trinity, so the numbers match it on any Python version."""
    if not metric_dicts:
        return {}
    return {key: sum(values) / len(values) if agg is _MEAN else _REDUCERS[agg](values)
            for key, (agg, values) in _group(metric_dicts, run_group).items()}


def _subset_sizes(n: int) -> list[int]:
    """Trinity's k for best@k / worst@k: 2, 4, 8, ... below n, then n."""
    return [1 << e for e in range(1, max(n - 1, 1).bit_length())] + [n]


@functools.lru_cache(maxsize=64)
def _order_weights(n: int) -> np.ndarray:
    """(sizes x n): entry [j, i-1] = (i/n)^s - ((i-1)/n)^s for s = sizes[j], the probability
    that the max of s draws with replacement is the i-th smallest of n values (ties included)."""
    sizes = np.array(_subset_sizes(n), dtype=np.float64)[:, None]
    weights = np.diff((np.arange(n + 1) / n)[None, :] ** sizes, axis=1)
    weights.setflags(write=False)
    return weights


def _exact_best_worst(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    weights = _order_weights(matrix.shape[1])[None, :, :]
    ascending = np.sort(matrix, axis=1)[:, None, :]
    # A weight that underflowed to 0 (n^s > 1e308) is a probability below float range: it
    # contributes nothing, also for an infinite value (where 0 * inf would give NaN).
    best = np.where(weights > 0, ascending * weights, 0.0).sum(axis=2)
    worst = np.where(weights > 0, ascending[:, :, ::-1] * weights, 0.0).sum(axis=2)
    nan_rows = np.isnan(matrix).any(axis=1)
    best[nan_rows] = worst[nan_rows] = np.nan
    return best, worst


def _pass_at(matrix: np.ndarray) -> list[list[float] | None]:
    """Per row: unbiased pass@s = 1 - C(n-c, s) / C(n, s) for each size s, where c counts the
    1s; None for a row that is not all 0/1. Computed from exact integers (one rounding)."""
    n = matrix.shape[1]
    binary = ((matrix == 0) | (matrix == 1)).all(axis=1).tolist()
    ones = matrix.sum(axis=1).tolist()
    sizes = _subset_sizes(n)
    return [[1.0 - math.comb(n - int(c), s) / math.comb(n, s) for s in sizes] if b else None
            for b, c in zip(binary, ones, strict=False)]


@functools.lru_cache(maxsize=16)  # ~8 * 1000 * 2n bytes each: 16 MiB for n = 1024
def _bootstrap_indices(n: int) -> tuple[np.ndarray, ...]:
    """Trinity's draws for n values, one (s x N_BOOTSTRAP) index array per size s: column b
    holds the s indices of bootstrap sample b (transposed, so that max/min over a sample is an
    elementwise reduction over s rows of N_BOOTSTRAP values).

    Trinity calls ``np.random.seed(42)`` and then ``np.random.choice(n, s)`` N_BOOTSTRAP times,
    for every (key, s). ``choice`` with replacement is ``randint(0, n, s)``, and MT19937 is one
    stream, so that is ``RandomState(42).randint(0, n, (N_BOOTSTRAP, s))``: the same for every
    key, hence cached, and drawn from a private generator (numpy's global one is untouched).
    """
    rng = np.random.RandomState(BOOTSTRAP_SEED)
    out = []
    for s in _subset_sizes(n):
        rng.seed(BOOTSTRAP_SEED)
        idx = np.ascontiguousarray(rng.randint(0, n, size=(N_BOOTSTRAP, s)).T)
        idx.setflags(write=False)
        out.append(idx)
    return tuple(out)


def _trinity_best_worst(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, n = matrix.shape
    has_nan = bool(np.isnan(matrix).any())
    best = np.empty((k, len(_subset_sizes(n))))
    worst = np.empty_like(best)
    for j, idx in enumerate(_bootstrap_indices(n)):
        step = max(1, _CHUNK // idx.size)
        for lo in range(0, k, step):
            sample = np.take(matrix[lo:lo + step], idx, axis=1)   # (rows, s, N_BOOTSTRAP)
            if has_nan:
                # Python's max/min keep a NaN only when it is the first item of the sample.
                first_nan = np.isnan(sample[:, 0, :])
                high = np.fmax.reduce(sample, axis=1)
                low = np.fmin.reduce(sample, axis=1)
                high[first_nan] = low[first_nan] = np.nan
            else:
                high, low = sample.max(axis=1), sample.min(axis=1)
            # Row means of a C-contiguous (rows, N_BOOTSTRAP) array sum pairwise along each row,
            # exactly as np.mean does over Trinity's list of 1000 values; other layouts do not.
            best[lo:lo + step, j] = np.ascontiguousarray(high).mean(axis=1)
            worst[lo:lo + step, j] = np.ascontiguousarray(low).mean(axis=1)
    return best, worst


def _run_stats(matrix: np.ndarray, bootstrap: str) -> list[tuple[str, list[float | None]]]:
    """(suffix, one value per row) for a (keys x n runs) matrix, in Trinity's key order."""
    n = matrix.shape[1]
    out = [(f"mean@{n}", matrix.mean(axis=1).tolist()),
           (f"std@{n}", matrix.std(axis=1).tolist())]
    if n <= 1:
        return out
    if bootstrap == "exact":
        best, worst = _exact_best_worst(matrix)
        passes = _pass_at(matrix)
    else:
        best, worst = _trinity_best_worst(matrix)
        passes = None
    for j, s in enumerate(_subset_sizes(n)):
        out.append((f"best@{s}", best[:, j].tolist()))
        out.append((f"worst@{s}", worst[:, j].tolist()))
        if passes is not None:
            out.append((f"pass@{s}", [None if row is None else row[j] for row in passes]))
    return out


def calculate_task_level_metrics(metrics: Sequence[Mapping[str, Any]], is_eval: bool, *,
                                 bootstrap: Literal["exact", "trinity"] = "exact"
                                 ) -> dict[str, float]:
    """One task's metrics from the metric dicts of its runs.

    Train (``is_eval`` false): :func:`aggregate_run_level_metrics`.

    Eval: ``:sum``/``:max``/``:min``/``:last`` keys reduced as such (key kept); mean keys whose
    name contains ``time/task_execution`` or ``time/run_execution`` averaged; every other mean
    key k with n run values gives ``k/mean@n``, ``k/std@n`` (population) and, for n > 1,
    ``k/best@s`` and ``k/worst@s`` for s = 2, 4, 8, ... < n and s = n: the expected max and min
    of s values drawn with replacement from the n.

    ``bootstrap="exact"`` (default) gives those expectations exactly. With the run values
    sorted, v_(1) <= ... <= v_(n), P(max of s draws <= v_(i)) = (i/n)^s, so

        best@s  = E[max] = sum_i v_(i)     * ((i/n)^s - ((i-1)/n)^s)
        worst@s = E[min] = sum_i v_(n+1-i) * ((i/n)^s - ((i-1)/n)^s)

    and, when every value is 0 or 1 (c of them 1), also the unbiased pass@k estimator
    (k distinct runs, i.e. without replacement) under the extra keys ``k/pass@s``:

        pass@s = 1 - C(n-c, s) / C(n, s)

    A NaN among the run values makes that key's best/worst NaN; +inf gives best +inf, -inf
    worst -inf, and both together NaN (an undefined expectation), except that a value whose
    probability underflows (n^s > 1e308) does not count.

    ``bootstrap="trinity"`` reproduces Trinity 0.6.0 bit for bit, NaN quirks included: each
    best/worst is the mean of max/min over 1000 samples drawn after seeding with 42 (see
    ``_bootstrap_indices``), from a private generator, so numpy's global RNG is untouched.
    Only the sign of a zero may differ (0.0 == -0.0). No ``pass@`` keys in this mode.
    """
    if bootstrap not in ("exact", "trinity"):
        raise ValueError(f"calculate_task_level_metrics: bootstrap must be 'exact' or 'trinity', "
                         f"got {bootstrap!r}")
    if not metrics:
        return {}
    if len(metrics) == 1 and isinstance(metrics, (list, tuple)):
        single = single_run_metrics(metrics[0], is_eval)
        if single is not None:
            return single
    if not is_eval:
        return aggregate_run_level_metrics(metrics)

    groups = _group(metrics, run_group)
    rows: dict[int, list[str]] = {}      # run count -> the mean keys with that many values
    for key, (agg, values) in groups.items():
        if agg is _MEAN and not is_time_key(key):
            rows.setdefault(len(values), []).append(key)
    per_key: dict[str, list[tuple[str, float]]] = {}
    if rows:    # (entering errstate costs more than the rest when there is nothing to do)
        with np.errstate(all="ignore"):
            for keys in rows.values():
                stats = _run_stats(np.array([groups[k][1] for k in keys], dtype=np.float64),
                                   bootstrap)
                for i, key in enumerate(keys):
                    per_key[key] = [(suffix, values[i]) for suffix, values in stats
                                    if values[i] is not None]

    result: dict[str, float] = {}
    for key, (agg, values) in groups.items():
        if agg is not _MEAN:
            result[key] = _REDUCERS[agg](values)
        elif key in per_key:
            for suffix, value in per_key[key]:
                result[f"{key}/{suffix}"] = value
        else:
            result[key] = sum(values) / len(values)
    return result

