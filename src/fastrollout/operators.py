"""Experience operators: vectorized steps the pipeline runs, in order, on a finalized batch.

Each operator takes an ``ExperienceBatch`` and returns the batch it passes on (a selection
of rows is zero-copy: columns are re-indexed, not copied) and its metrics. The pipeline
names every operator's metrics ``experience_pipeline/<name>/...`` and adds its input and
output counts and time; ``<name>`` is the operator's, or Trinity-RFT's where it has an
equivalent (``grpo`` reports ``experience_pipeline/group_advantages/reward_mean/mean`` as
Trinity does).

- ``grpo``: group advantages (GRPO): per task, ``reward - mean``, divided by the group's
  sample std + ``epsilon`` unless ``norm_std`` is false, as Trinity's
  ``GRPOGroupedAdvantage``; broadcast over the response tokens where ``action_mask`` is
  set; ``returns`` is ``advantages`` (one column under both names).
- ``dynamic_filter``: drop tasks whose rewards are all equal (DAPO's dynamic sampling).
- ``reward_filter``: keep experiences with ``min <= reward <= max``.
- ``length_filter``: keep experiences whose response length is within bounds.
- ``staleness_filter``: drop experiences sampled ``max_staleness`` or more weight versions
  before the current one (``info["model_version"]``).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .config import (
    DynamicFilterConfig,
    GRPOConfig,
    LengthFilterConfig,
    OperatorConfig,
    RewardFilterConfig,
    StalenessFilterConfig,
)
from .experience import ArrayColumn, ExperienceBatch
from .metrics import aggregate_metrics


def take(batch: ExperienceBatch, index: np.ndarray) -> ExperienceBatch:
    """The rows ``index`` (int positions) of ``batch``, in that order, without copying array
    data: each column keeps its buffer and gets the rows' bounds."""
    if len(index) == len(batch) and (index == np.arange(len(batch))).all():
        return batch
    selected: dict[int, ArrayColumn] = {}     # by id(): a column under two names stays one
    columns = {}
    for name, col in batch.columns.items():
        out = selected.get(id(col))
        if out is None:
            out = selected[id(col)] = ArrayColumn(
                col.data, col.starts[index], col.stops[index],
                None if col.present is None else col.present[index])
        columns[name] = out
    present = None if batch.reward_present is None else batch.reward_present[index]
    return ExperienceBatch([batch.items[i] for i in index.tolist()], columns,
                           batch.rewards[index], present, batch.prompt_lengths[index])


def task_groups(batch: ExperienceBatch) -> tuple[np.ndarray, int]:
    """Each row's group number (rows of one task, ``eid.batch``/``eid.task``, share one), and
    the number of groups."""
    numbers: dict[tuple, int] = {}
    groups = np.fromiter((numbers.setdefault((it.eid.batch, it.eid.task), len(numbers))
                          for it in batch.items), dtype=np.int64, count=len(batch))
    return groups, len(numbers)


Grouping = Callable[[ExperienceBatch], tuple[np.ndarray, int]]


def _shared_grouping() -> Grouping:
    """``task_groups``, computed once for the operators of one run that see the same rows
    (GRPO passes its batch on: the filter after it groups nothing again)."""
    seen: list[tuple[list, tuple[np.ndarray, int]]] = []    # (items, groups); holds items

    def groups(batch: ExperienceBatch) -> tuple[np.ndarray, int]:
        for items, found in seen:
            if items is batch.items:
                return found
        found = task_groups(batch)
        seen.append((batch.items, found))
        return found
    return groups


def _rewards(batch: ExperienceBatch, what: str) -> np.ndarray:
    if batch.reward_present is not None and not batch.reward_present.all():
        missing = int(np.flatnonzero(~batch.reward_present)[0])
        raise ValueError(f"{what}: experience {missing} ({batch.items[missing].eid.batch}/"
                         f"{batch.items[missing].eid.task}) has no reward")
    return batch.rewards


def _group_stats(rewards: np.ndarray, groups: np.ndarray, count: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: size, mean, and sum of squared deviations from the mean."""
    sizes = np.bincount(groups, minlength=count).astype(np.float64)
    means = np.bincount(groups, weights=rewards, minlength=count) / sizes
    squares = np.bincount(groups, weights=(rewards - means[groups]) ** 2, minlength=count)
    return sizes, means, squares


def grpo(batch: ExperienceBatch, config: GRPOConfig, *, grouping: Grouping = task_groups,
         **_: Any) -> tuple[ExperienceBatch, dict]:
    """Group advantages as Trinity's ``GRPOGroupedAdvantage``: a task of one experience gets
    mean 0 and std 1 (its reward is its advantage)."""
    if not len(batch):
        return batch, {}
    rewards = _rewards(batch, "grpo")
    groups, count = grouping(batch)
    sizes, means, squares = _group_stats(rewards, groups, count)
    single = sizes == 1
    std = np.sqrt(squares / np.maximum(sizes - 1, 1))     # sample std, as torch.std
    means[single], std[single] = 0.0, 1.0
    scores = rewards - means[groups]
    if config.norm_std:
        scores = scores / (std[groups] + config.epsilon)
    tokens = batch.columns["tokens"]
    lengths = tokens.lengths() - batch.prompt_lengths
    mask = batch.columns.get("action_mask")
    if mask is not None and mask.present is None:
        # Multi-turn experiences: the mask covers the response and says which tokens are
        # the model's; the advantage is the score there and 0 elsewhere.
        lengths = mask.lengths()
        values = np.repeat(scores.astype(np.float32), lengths) * mask.flat()
    else:
        values = np.repeat(scores.astype(np.float32), lengths)
        if mask is not None:   # some experiences have a mask: apply theirs
            offsets = np.concatenate(([0], np.cumsum(lengths)))
            for i in np.flatnonzero(mask.present).tolist():
                own = mask[i]
                values[offsets[i]:offsets[i] + len(own)] *= own
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # One column for both: the codec writes a column held under two names once.
    batch.columns["advantages"] = batch.columns["returns"] = \
        ArrayColumn.from_offsets(values, offsets)
    per_group = [{"reward_mean": float(m), "reward_std": float(s)}
                 for m, s in zip(means.tolist(), std.tolist(), strict=True)]
    return batch, aggregate_metrics(per_group)


def dynamic_filter(batch: ExperienceBatch, config: DynamicFilterConfig, *,
                   grouping: Grouping = task_groups, **_: Any) -> tuple[ExperienceBatch, dict]:
    """Drop the experiences of tasks whose rewards do not vary (no learning signal)."""
    if not len(batch):
        return batch, {"filtered_count": 0.0}
    rewards = _rewards(batch, "dynamic_filter")
    groups, count = grouping(batch)
    sizes, _, squares = _group_stats(rewards, groups, count)
    pop_std = np.sqrt(squares / sizes)      # population std, as Trinity's RewardSTDFilter
    keep = pop_std[groups] > config.threshold
    out = take(batch, np.flatnonzero(keep))
    return out, {"filtered_count": float(len(batch) - len(out))}


def reward_filter(batch: ExperienceBatch, config: RewardFilterConfig,
                  **_: Any) -> tuple[ExperienceBatch, dict]:
    rewards = _rewards(batch, "reward_filter")
    keep = np.ones(len(batch), dtype=np.bool_)
    if config.min is not None:
        keep &= rewards >= config.min
    if config.max is not None:
        keep &= rewards <= config.max
    out = take(batch, np.flatnonzero(keep))
    return out, {"filtered_count": float(len(batch) - len(out))}


def length_filter(batch: ExperienceBatch, config: LengthFilterConfig,
                  **_: Any) -> tuple[ExperienceBatch, dict]:
    lengths = batch.response_lengths() if len(batch) else np.zeros(0, np.int64)
    keep = lengths >= config.min_response_tokens
    if config.max_response_tokens is not None:
        keep &= lengths <= config.max_response_tokens
    out = take(batch, np.flatnonzero(keep))
    return out, {"filtered_count": float(len(batch) - len(out))}


def staleness_filter(batch: ExperienceBatch, config: StalenessFilterConfig, *,
                     model_version: int | None = None, **_: Any) -> tuple[ExperienceBatch, dict]:
    """Drop experiences whose ``info["model_version"]`` lags ``model_version`` (the
    current weights) by ``max_staleness`` or more. Experiences without a version are kept."""
    if model_version is None or not len(batch):
        return batch, {"filtered_count": 0.0}
    versions = np.fromiter((it.info.get("model_version", model_version) for it in batch.items),
                           dtype=np.int64, count=len(batch))
    lag = model_version - versions
    out = take(batch, np.flatnonzero(lag < config.max_staleness))
    return out, {"filtered_count": float(len(batch) - len(out)),
                 "staleness/max": float(lag.max())}


OPERATORS = {"grpo": grpo, "dynamic_filter": dynamic_filter, "reward_filter": reward_filter,
             "length_filter": length_filter, "staleness_filter": staleness_filter}
# The name under which each operator's metrics are reported (Trinity's, where it has one).
METRIC_NAMES = {"grpo": "group_advantages"}


# Weight versions of a set of experiences: (oldest, newest, largest drift during one
# attempt), or None when none was stamped. Kept per task and per batch as results arrive,
# so that reporting them costs nothing per experience at finalize.
VersionSpan = tuple[int, int, int] | None


def merge_versions(a: VersionSpan, b: VersionSpan) -> VersionSpan:
    if a is None or b is None:
        return a if b is None else b
    return (min(a[0], b[0]), max(a[1], b[1]), max(a[2], b[2]))


def item_versions(batches: list[ExperienceBatch]) -> VersionSpan:
    """The span of versions stamped in the items' ``info`` (payloads from elsewhere)."""
    span: VersionSpan = None
    for batch in batches:
        for item in batch.items:
            version = item.info.get("model_version")
            if isinstance(version, int):
                drift = item.info.get("model_version_drift", 0)
                span = merge_versions(span, (version, version,
                                             drift if isinstance(drift, int) else 0))
    return span


def version_metrics(span: VersionSpan, model_version: int | None) -> dict[str, float]:
    """Oldest and newest weight version a batch was sampled with, the most any version
    moved during one attempt, and the largest lag behind ``model_version`` (the current
    weights), named ``experience_pipeline/...``."""
    if span is None:
        return {}
    out = {"experience_pipeline/model_version/min": float(span[0]),
           "experience_pipeline/model_version/max": float(span[1]),
           "experience_pipeline/model_version_drift/max": float(span[2])}
    if model_version is not None:
        out["experience_pipeline/model_version_lag/max"] = float(model_version - span[0])
    return out


def run_operators(batch: ExperienceBatch, configs: list[OperatorConfig],
                  model_version: int | None) -> tuple[ExperienceBatch, dict[str, float]]:
    """Run ``configs`` in order; metrics named ``experience_pipeline/<name>/...``."""
    metrics: dict[str, float] = {}
    filtered = 0.0
    grouping = _shared_grouping()
    for config in configs:
        op = type(config).__struct_config__.tag
        name = METRIC_NAMES.get(op, op)
        start = time.perf_counter()
        count = len(batch)
        batch, own = OPERATORS[op](batch, config, model_version=model_version,
                                   grouping=grouping)
        filtered += own.get("filtered_count", 0.0)
        prefix = f"experience_pipeline/{name}/"
        metrics.update((prefix + key, value) for key, value in own.items())
        metrics[prefix + "in_count"] = float(count)
        metrics[prefix + "out_count"] = float(len(batch))
        metrics[prefix + "time"] = time.perf_counter() - start
    if configs:
        metrics["experience_pipeline/filtered_count"] = filtered
    return batch, metrics
