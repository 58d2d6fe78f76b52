"""Scheduler and runner pieces that stand alone: batch priority order, attempt timeouts,
the copies of started tasks and their final statuses."""
import asyncio
import dataclasses
import gc
import pickle

import pytest

from fastrollout import GenerationConfig, Status, Task
from fastrollout.runner import AttemptTimer
from fastrollout.scheduler import batch_priority
from fastrollout._native.status import final_status
from fastrollout.task import started


def test_batch_priority_matches_trinity_order():
    ids = ["zeta", 2, "1/eval", 1, "10/x", "2/gsm8k", 10, "alpha"]
    assert sorted(ids, key=batch_priority) == [1, "1/eval", 2, "2/gsm8k", 10, "10/x", "alpha", "zeta"]


# ---- AttemptTimer: one lazily re-armed loop timer for a worker's attempts ----------------

async def _attempt(timer: AttemptTimer, timeout: float, work: float) -> bool:
    """One attempt of ``work`` seconds under ``timeout``; True if it timed out."""
    timer.start(timeout)
    try:
        try:
            await asyncio.sleep(work)
        finally:
            expired = timer.stop()
    except asyncio.CancelledError:
        assert expired, "a cancellation that is not the timer's must propagate"
        return True
    return False


async def _in_worker(body):
    async def worker():
        timer = AttemptTimer(asyncio.get_running_loop(), asyncio.current_task())
        try:
            return await body(timer)
        finally:
            timer.close()
    return await asyncio.create_task(worker())


async def test_attempt_timer_expires_only_the_attempt_past_its_deadline():
    async def body(timer):
        fast = await _attempt(timer, 0.2, 0)
        slow = await _attempt(timer, 0.05, 0.5)
        after = await _attempt(timer, 5, 0.01)
        return fast, slow, after, asyncio.current_task().cancelling()
    assert await _in_worker(body) == (False, True, False, 0)


async def test_attempt_timer_rearms_for_a_later_deadline():
    async def body(timer):
        await _attempt(timer, 0.05, 0)          # arms a timer for ~now + 0.05
        loop = asyncio.get_running_loop()
        start = loop.time()
        # The early timer fires mid-attempt and must re-arm, not expire this one.
        survived = not await _attempt(timer, 0.3, 0.15)
        started = loop.time()
        expired = await _attempt(timer, 0.1, 1.0)
        return survived, expired, loop.time() - started, loop.time() - start
    survived, expired, took, _ = await _in_worker(body)
    assert survived and expired and 0.09 <= took < 0.5


async def test_attempt_timer_moves_an_armed_timer_earlier():
    async def body(timer):
        await _attempt(timer, 60, 0)            # armed far in the future
        loop = asyncio.get_running_loop()
        started = loop.time()
        expired = await _attempt(timer, 0.05, 1.0)
        return expired, loop.time() - started
    expired, took = await _in_worker(body)
    assert expired and took < 0.5


async def test_attempt_timer_leaves_an_idle_worker_alone():
    async def body(timer):
        await _attempt(timer, 0.02, 0)
        await asyncio.sleep(0.1)                # the timer fires with no attempt in flight
        return asyncio.current_task().cancelling()
    assert await _in_worker(body) == 0


async def test_cancellation_from_outside_is_not_taken_for_a_timeout():
    async def body(timer):
        task = asyncio.current_task()
        asyncio.get_running_loop().call_later(0.02, task.cancel)
        timer.start(5)
        try:
            await asyncio.sleep(1)
        finally:
            expired = timer.stop()
        return expired
    with pytest.raises(asyncio.CancelledError):
        await _in_worker(body)


# ---- started(): what a started task's runs see; final_status(): Status without __init__ ---

def _every_field_set(cls, **fixed):
    """An instance of the dataclass ``cls`` whose fields all differ from their defaults."""
    values = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        values[f.name] = fixed.get(f.name, {"a": i} if f.type in ("dict",) else
                                   f"v{i}" if "str" in str(f.type) else i + 7)
    return cls(**values)


def test_started_copies_every_field_as_replace_does():
    args = _every_field_set(GenerationConfig, n=2)
    task = _every_field_set(Task, workflow=object, rollout_args=args)
    view = started(task, "3/eval", 5, 8)
    assert view == dataclasses.replace(task, batch_id="3/eval", task_id=5,
                                       rollout_args=dataclasses.replace(args, n=8))
    assert type(view) is Task and type(view.rollout_args) is GenerationConfig
    # the caller's objects are untouched; containers are shared, as replace() shares them
    assert (task.batch_id, task.task_id, args.n) != ("3/eval", 5, 8) and args.n == 2
    assert view.workflow_args is task.workflow_args and view.raw_task is task.raw_task
    assert started(task, 1, 2, 2).rollout_args is args      # n already right: no copy


def test_started_keeps_subclasses_and_their_fields():
    @dataclasses.dataclass
    class MyArgs(GenerationConfig):
        stop: str = ""

    @dataclasses.dataclass
    class MyTask(Task):
        level: int = 0

    task = MyTask(workflow=object, rollout_args=MyArgs(stop="x"), level=3)
    view = started(task, 1, 0, 4)
    assert type(view) is MyTask and view.level == 3 and view.task_id == 0
    assert type(view.rollout_args) is MyArgs and view.rollout_args.stop == "x"
    assert view.rollout_args.n == 4 and task.rollout_args.n == 1


def test_final_status_is_a_frozen_status():
    task_metrics = {"time/task_execution": 1.0}
    status = final_status(Status, 2, 4, task_metrics, "2/4 runs completed successfully.")
    assert status == Status(2, 4, [task_metrics], "2/4 runs completed successfully.")
    assert type(status) is Status and not status.ok and status.metrics[0] is task_metrics
    # a batch's statuses are not walked by the GC (nothing in them can form a cycle)
    assert not gc.is_tracked(status) and not gc.is_tracked(status.metrics)
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.completed_runs = 4
    assert pickle.loads(pickle.dumps(status)) == status
    assert dataclasses.asdict(status) == dataclasses.asdict(Status(2, 4, [task_metrics],
                                                                   status.message))
