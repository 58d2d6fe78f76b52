"""Workflows the coordinator tests run: real subclasses of fastrollout.Workflow.

Behaviour comes from ``task.workflow_args``: ``sleep`` (seconds per run),
``fail`` (raise in every run), ``fail_times`` (raise in the first k calls of a
task, counted per task_id), ``generate`` (call the model once per run).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time

from fastrollout import Experience, Workflow

CALLS: collections.Counter = collections.Counter()      # (batch_id, task_id) -> run() calls
_lock = threading.Lock()


def _experience(task, i: int = 0, **metrics) -> Experience:
    return Experience(tokens=[1, 2, 3, 4 + i], prompt_length=2, logprobs=[-0.5, -0.25],
                      reward=float(i), metrics=metrics)


def _behave(task) -> None:
    args = task.workflow_args
    with _lock:
        CALLS[(task.batch_id, task.task_id)] += 1
        calls = CALLS[(task.batch_id, task.task_id)]
    if args.get("fail") or calls <= args.get("fail_times", 0):
        raise RuntimeError(f"injected failure in task {task.task_id}")


class SyncWorkflow(Workflow):
    """Non-repeatable, synchronous: one experience per run."""

    def run(self):
        _behave(self.task)
        if self.task.workflow_args.get("sleep"):
            time.sleep(self.task.workflow_args["sleep"])
        if self.task.workflow_args.get("generate"):
            return self.model.generate(["hello"])
        return [_experience(self.task, score=1.0)]


class ResettableWorkflow(SyncWorkflow):
    can_reset = True
    instances = 0

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        type(self).instances += 1
        self.resets = 0

    def reset(self, task):
        super().reset(task)
        self.resets += 1


class AsyncWorkflow(Workflow):
    is_async = True

    async def run_async(self):
        _behave(self.task)
        if self.task.workflow_args.get("sleep"):
            await asyncio.sleep(self.task.workflow_args["sleep"])
        if self.task.workflow_args.get("generate"):
            return await self.model.generate_async(["hello"])
        return [_experience(self.task, score=1.0)]


class RepeatWorkflow(Workflow):
    """Repeatable and async: one run_async() makes all repeats, run i has run_metrics=i."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        _behave(self.task)
        if self.task.workflow_args.get("sleep"):
            await asyncio.sleep(self.task.workflow_args["sleep"])
        exps = []
        for i in range(self.repeat_times):
            exp = _experience(self.task, i, run_metrics=self.run_id_base + i)
            exp.eid.run = self.run_id_base + i
            exps.append(exp)
        return exps


class StubbornWorkflow(Workflow):
    """Ignores the first cancellation and keeps going for a while."""

    is_async = True

    async def run_async(self):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(self.task.workflow_args.get("linger", 0.5))
        return [_experience(self.task)]


class SplitSleepWorkflow(RepeatWorkflow):
    """Sub-task with run_id_base 0 returns at once; later sub-tasks hang."""

    fast_done = False

    async def run_async(self):
        if self.run_id_base:
            await asyncio.sleep(30)
        exps = await super().run_async()
        type(self).fast_done = True
        return exps
