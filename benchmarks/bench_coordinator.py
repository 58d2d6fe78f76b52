"""Coordinator throughput and finalize wake-up, Trinity-RFT 0.6.0 beside fastrollout (issue 3).

Workload: one engine, 64 slots, 4096 tasks x repeat 8 per batch, a workflow that returns at
once; a train task's workflow returns ``repeat`` tiny experiences (8 tokens, 4 of them prompt,
a reward) that are encoded and then decoded and counted by the pipeline; eval tasks send none.
Each round submits one batch and finalizes it. ``extra_info`` holds the medians over rounds of
``tasks_per_s`` (tasks / (submit -> finalize returned)) and ``wakeup_ms`` (last task done ->
finalize returned); pytest-benchmark's own time is the whole round, setup included.

Trinity's side is its own coordinator, scheduler and workflow runner loaded from the wheel
with Ray stubbed out in-process (benchmarks/trinity_coordinator.py): a lower bound on its cost.

    .venv/bin/python -m pytest benchmarks/bench_coordinator.py --benchmark-only
"""
from __future__ import annotations

import asyncio
import statistics

import pytest

from benchmarks.trinity_coordinator import run_trinity_batches

NUM_TASKS = 4096
REPEAT = 8
SLOTS = 64
ROUNDS = 3


def _measure(benchmark, run_one_batch) -> None:
    """Run ``run_one_batch()`` (-> {"tasks_per_s", "wakeup_s"}) for ROUNDS rounds and record
    the medians in ``benchmark.extra_info``."""
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(run_one_batch()), rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        tasks=NUM_TASKS, repeat=REPEAT, slots=SLOTS,
        tasks_per_s=round(statistics.median(r["tasks_per_s"] for r in rounds), 1),
        wakeup_ms=round(statistics.median(r["wakeup_s"] for r in rounds) * 1e3, 3),
    )


@pytest.mark.parametrize("batch_type", ["train", "eval"])
def test_trinity_coordinator(benchmark, batch_type):
    benchmark.group = f"coordinator-{batch_type}"
    _measure(benchmark, lambda: asyncio.run(run_trinity_batches(
        NUM_TASKS, REPEAT, runner_slots=SLOTS, batch_type=batch_type)))


# ---- fastrollout side (the lead fills this in once src/fastrollout/coordinator.py exists) ----
# Add `test_fastrollout_coordinator(benchmark, batch_type, loop)` here, parametrized like the
# Trinity test (plus asyncio/uvloop), with `benchmark.group = f"coordinator-{batch_type}"` so
# both sides print in one table, and call `_measure(benchmark, run_one_batch)` where
# `run_one_batch()` runs one batch of the same workload through fastrollout.RolloutCoordinator
# (one SimulatedEngine, runner_per_model=SLOTS; workflow: can_repeat, returns REPEAT
# Experience(tokens=8 tokens, prompt_length=4, reward=1.0)) and returns
# {"tasks_per_s": ..., "wakeup_s": ...} measured the same way: tasks / (submit -> finalize
# returned), and last task completion -> finalize returned.
