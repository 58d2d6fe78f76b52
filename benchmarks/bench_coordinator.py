"""Coordinator throughput and finalize wake-up, Trinity-RFT 0.6.0 beside fastrollout (issue 3).

Workload: one engine, 64 slots, 4096 tasks x repeat 8 per batch, a workflow that returns at
once; a train task's workflow returns ``repeat`` tiny experiences (8 tokens, 4 of them prompt,
a reward) that are encoded and then decoded and counted by the pipeline; eval tasks send none.
Each round submits one batch and finalizes it; one warm-up round comes first (both sides), so
that the figures are those of a process that has run a batch before. ``extra_info`` holds the
medians over rounds of ``tasks_per_s`` (tasks / (submit -> finalize returned)) and
``wakeup_ms`` (last task done -> finalize returned); pytest-benchmark's own time is the whole
round, setup included.

Trinity's side is its own coordinator, scheduler and workflow runner loaded from the wheel
with Ray stubbed out in-process (benchmarks/trinity_coordinator.py): a lower bound on its cost.

    .venv/bin/python -m pytest benchmarks/bench_coordinator.py --benchmark-only
"""
from __future__ import annotations

import asyncio
import statistics
import tracemalloc

import numpy as np
import pytest
import uvloop

from benchmarks.batches import timed_batch, track_last_booking
from benchmarks.trinity_coordinator import run_trinity_batches
from fastrollout import Config, Experience, RolloutCoordinator, Task, Workflow
from fastrollout.engines import SimulatedEngine

NUM_TASKS = 4096
REPEAT = 8
SLOTS = 64
ROUNDS = 5


def _measure(benchmark, run_one_batch) -> None:
    """Run ``run_one_batch()`` (-> {"tasks_per_s", "wakeup_s"}) for ROUNDS rounds after a
    warm-up round and record the medians in ``benchmark.extra_info``."""
    rounds: list[dict] = []
    benchmark.pedantic(lambda: rounds.append(run_one_batch()), rounds=ROUNDS, iterations=1,
                       warmup_rounds=1)
    rounds = rounds[-ROUNDS:]
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


# ---- fastrollout side ------------------------------------------------------------------------

class _RepeatNow(Workflow):
    """Returns ``repeat_times`` tiny experiences at once (the Trinity side's workflow)."""

    can_repeat = True
    can_reset = True
    is_async = True

    async def run_async(self):
        exps = [Experience(tokens=_TOKENS, prompt_length=4, reward=1.0)
                for _ in range(self.repeat_times)]
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
        return exps


class _RepeatNowSync(_RepeatNow):
    is_async = False

    def run(self):
        exps = [Experience(tokens=_TOKENS, prompt_length=4, reward=1.0)
                for _ in range(self.repeat_times)]
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
        return exps


_TOKENS = np.arange(8, dtype=np.int32)


async def run_fastrollout_batch(num_tasks: int, repeat: int, *, slots: int = SLOTS,
                                batch_type: str = "train", workflow=_RepeatNow) -> dict:
    config = Config.from_dict({"explorer": {"runner_per_model": slots}})
    coordinator = RolloutCoordinator(config, [SimulatedEngine()])
    await coordinator.prepare()
    last_booked = track_last_booking(coordinator)
    try:
        is_eval = batch_type == "eval"
        tasks = [Task(workflow=workflow, repeat_times=repeat, is_eval=is_eval)
                 for _ in range(num_tasks)]
        batch_id = 1 if not is_eval else "1/bench"
        result, start, end = await timed_batch(coordinator, batch_id, tasks, batch_type)
        assert result["finished_task_count"] == num_tasks
        if not is_eval:
            assert len(coordinator.take_experiences(batch_id)) == num_tasks * repeat
        return {"tasks_per_s": num_tasks / (end - start), "wakeup_s": end - last_booked[0]}
    finally:
        await coordinator.shutdown()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("batch_type", ["train", "eval"])
def test_fastrollout_coordinator(benchmark, batch_type, loop):
    benchmark.group = f"coordinator-{batch_type}"
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    _measure(benchmark, lambda: runner(run_fastrollout_batch(NUM_TASKS, REPEAT,
                                                              batch_type=batch_type)))


@pytest.mark.parametrize("batch_type", ["train", "eval"])
def test_fastrollout_coordinator_sync_workflow(benchmark, batch_type):
    """The same with a synchronous run(), which goes to a worker thread (one hop per task)."""
    benchmark.group = f"coordinator-{batch_type}"
    _measure(benchmark, lambda: uvloop.run(run_fastrollout_batch(
        NUM_TASKS, REPEAT, batch_type=batch_type, workflow=_RepeatNowSync)))


@pytest.mark.parametrize("num_tasks", [1024, 16384, 100_000])
def test_fastrollout_per_task_cost_is_flat(benchmark, num_tasks):
    """Per-task cost from 1k to 100k tasks in one eval batch (compare ``us_per_task``, the
    median over ROUNDS rounds: one round is at the mercy of a noisy machine)."""
    benchmark.group = "coordinator-scaling"
    rounds = []
    benchmark.pedantic(lambda: rounds.append(uvloop.run(run_fastrollout_batch(
        num_tasks, REPEAT, batch_type="eval"))), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    us = statistics.median(1e6 / r["tasks_per_s"] for r in rounds[-ROUNDS:])
    benchmark.extra_info.update(tasks=num_tasks, us_per_task=round(us, 2))


def test_fastrollout_memory_per_queued_task(benchmark):
    """Bytes per queued (not yet started) task: one slot, 100k tasks waiting."""
    benchmark.group = "coordinator-memory"

    async def measure() -> float:
        config = Config.from_dict({"explorer": {"runner_per_model": 1}})
        coordinator = RolloutCoordinator(config, [SimulatedEngine()])
        await coordinator.prepare()
        tasks = [Task(workflow=_RepeatNow, repeat_times=REPEAT) for _ in range(100_000)]
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await coordinator.submit_batch(batch_id=0, tasks=tasks, batch_type="train")
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        await coordinator.shutdown()
        return (after - before) / len(tasks)

    per_task = []
    benchmark.pedantic(lambda: per_task.append(uvloop.run(measure())), rounds=1, iterations=1)
    benchmark.extra_info.update(bytes_per_queued_task=round(per_task[0], 1))
