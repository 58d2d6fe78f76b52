"""fastrollout.metrics side by side with Trinity-RFT 0.6.0's trinity.utils.metrics.

Run: .venv/bin/python -m pytest benchmarks/bench_metrics.py --benchmark-only \
         --benchmark-columns=min,median,mean,ops
Each group holds Trinity's function and ours on the same input.
"""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.trinity_ref import trinity_module
from fastrollout import metrics as M

T = trinity_module("utils/metrics.py")
RUNS = 16
TASKS = 4096


def _eval_runs() -> list[dict]:
    """One eval task: 16 runs x 3 mean keys (binary accuracy, float score, int length)."""
    rng = np.random.default_rng(0)
    return [{"accuracy": float(rng.random() < 0.4), "score": float(rng.normal()),
             "response_length": int(rng.integers(10, 2000))} for _ in range(RUNS)]


def _train_runs() -> list[dict]:
    """One train task: 16 runs of run-level metrics as a workflow runner produces them."""
    rng = np.random.default_rng(1)
    return [{"reward": float(rng.normal()), "accuracy": float(rng.random() < 0.5),
             "response_length": int(rng.integers(10, 2000)), "prompt_length": 321,
             "experience_count:sum": 1, "turns:max": int(rng.integers(1, 5)),
             "turns:min": 1, "model_version:last": 7,
             "time/run_execution": float(rng.random())} for _ in range(RUNS)]


def _task_metrics() -> list[dict]:
    """A batch of 4096 train tasks' metric dicts, as aggregate_metrics receives them."""
    return [M.calculate_task_level_metrics(_perturb(_train_runs(), i), False)
            | {"time/task_execution": 0.5 + i * 1e-4} for i in range(TASKS)]


def _perturb(runs: list[dict], i: int) -> list[dict]:
    return [run | {"reward": run["reward"] + i} for run in runs]


@pytest.fixture(scope="module")
def eval_runs():
    return _eval_runs()


@pytest.fixture(scope="module")
def train_runs():
    return _train_runs()


@pytest.fixture(scope="module")
def task_metrics():
    return _task_metrics()


@pytest.mark.benchmark(group="eval task-level, 16 runs x 3 keys")
def test_eval_task_trinity_060(benchmark, eval_runs):
    benchmark(T.calculate_task_level_metrics, eval_runs, True)


@pytest.mark.benchmark(group="eval task-level, 16 runs x 3 keys")
def test_eval_task_ours_exact(benchmark, eval_runs):
    benchmark(M.calculate_task_level_metrics, eval_runs, True)


@pytest.mark.benchmark(group="eval task-level, 16 runs x 3 keys")
def test_eval_task_ours_trinity_mode(benchmark, eval_runs):
    result = benchmark(M.calculate_task_level_metrics, eval_runs, True, bootstrap="trinity")
    assert result == T.calculate_task_level_metrics(eval_runs, True)


@pytest.mark.benchmark(group="eval task-level, 16 runs x 3 keys")
def test_eval_task_ours_trinity_mode_cold(benchmark, eval_runs):
    """Trinity mode with the bootstrap draws recomputed every call (first task of a new n)."""
    benchmark.pedantic(M.calculate_task_level_metrics, (eval_runs, True),
                       {"bootstrap": "trinity"}, setup=M._bootstrap_indices.cache_clear,
                       rounds=200)


@pytest.mark.benchmark(group="train task-level, 16 runs x 9 keys")
def test_train_task_trinity_060(benchmark, train_runs):
    benchmark(T.calculate_task_level_metrics, train_runs, False)


@pytest.mark.benchmark(group="train task-level, 16 runs x 9 keys")
def test_train_task_ours(benchmark, train_runs):
    result = benchmark(M.calculate_task_level_metrics, train_runs, False)
    assert result == T.calculate_task_level_metrics(train_runs, False)


@pytest.mark.benchmark(group="aggregate_metrics, 4096 tasks x 10 keys")
def test_aggregate_trinity_060(benchmark, task_metrics):
    benchmark(T.aggregate_metrics, task_metrics, "rollout")


@pytest.mark.benchmark(group="aggregate_metrics, 4096 tasks x 10 keys")
def test_aggregate_ours(benchmark, task_metrics):
    result = benchmark(M.aggregate_metrics, task_metrics, "rollout")
    assert result == T.aggregate_metrics(task_metrics, "rollout")


@pytest.mark.benchmark(group="one-run train task-level, 9 keys")
def test_one_run_task_trinity_060(benchmark, train_runs):
    benchmark(T.calculate_task_level_metrics, train_runs[:1], False)


@pytest.mark.benchmark(group="one-run train task-level, 9 keys")
def test_one_run_task_ours(benchmark, train_runs):
    result = benchmark(M.calculate_task_level_metrics, train_runs[:1], False)
    assert result == T.calculate_task_level_metrics(train_runs[:1], False)


def _tally(task_metrics: list[dict]) -> dict:
    tally = M.MetricTally()
    for metrics in task_metrics:
        tally.add(metrics)
    return tally.summary("rollout")


@pytest.mark.benchmark(group="aggregate_metrics, 4096 tasks x 10 keys")
def test_aggregate_ours_running_tally(benchmark, task_metrics):
    """The coordinator's way: one ``MetricTally.add`` per finished task, then ``summary``."""
    result = benchmark(_tally, task_metrics)
    assert list(result) == list(T.aggregate_metrics(task_metrics, "rollout"))
