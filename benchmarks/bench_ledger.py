"""The native task ledger against the same bookkeeping in plain Python dicts.

Run: ``.venv/bin/python -m pytest benchmarks/bench_ledger.py --benchmark-only``.
``extra_info`` carries transitions/s and bytes per task slot.
"""
from __future__ import annotations

import time
import tracemalloc

import pytest

from fastrollout._native.ledger import (
    SLOT_BYTES,
    TASK_CANCELLED,
    TASK_DONE,
    TASK_FAILED,
    TASK_FREE,
    TASK_PENDING,
    TASK_RUNNING,
    StatusError,
    TaskLedger,
)

_FINAL = (TASK_DONE, TASK_FAILED, TASK_CANCELLED)
_LEGAL = {(TASK_FREE, TASK_PENDING), (TASK_PENDING, TASK_RUNNING), (TASK_PENDING, TASK_CANCELLED),
          (TASK_RUNNING, TASK_DONE), (TASK_RUNNING, TASK_FAILED), (TASK_RUNNING, TASK_CANCELLED),
          (TASK_DONE, TASK_FREE), (TASK_FAILED, TASK_FREE), (TASK_CANCELLED, TASK_FREE)}


class DictTaskLedger:
    """What one would write without the native core: a dict per task, a dict of counters
    per batch. Same API, slot numbering (LIFO reuse) and errors as ``TaskLedger``; the
    tests use it as their oracle."""

    def __init__(self, capacity: int = 1024, batch_capacity: int = 16):
        self.tasks: dict[int, dict] = {}
        self.batches: dict[int, dict] = {}
        self._free: list[int] = []
        self._batch_free: list[int] = []
        self._top = 0
        self._batch_top = 0

    def _task(self, slot: int) -> dict:
        task = self.tasks.get(slot)
        if task is None:
            raise StatusError(f"task slot {slot} is out of range or free")
        return task

    def _batch(self, bslot: int) -> dict:
        batch = self.batches.get(bslot)
        if batch is None:
            raise StatusError(f"batch slot {bslot} is out of range or free")
        return batch

    def _set_state(self, slot: int, task: dict, new: int) -> None:
        old = task["state"]
        if (old, new) not in _LEGAL:
            raise StatusError(f"task slot {slot}: illegal transition {old} -> {new}")
        batch = self.batches[task["batch"]]
        if old == TASK_RUNNING:
            batch["running"] -= 1
        if new == TASK_PENDING:
            batch["expected"] += 1
        elif new == TASK_RUNNING:
            batch["running"] += 1
            task["start_ns"] = time.monotonic_ns()
        elif new in _FINAL:
            batch["completed" if new != TASK_CANCELLED else "cancelled"] += 1
            batch["failed"] += new == TASK_FAILED
            task["end_ns"] = time.monotonic_ns()
        task["state"] = new

    def add_batch(self) -> int:
        if self._batch_free:
            bslot = self._batch_free.pop()
        else:
            bslot, self._batch_top = self._batch_top, self._batch_top + 1
        self.batches[bslot] = dict(expected=0, completed=0, failed=0, running=0, cancelled=0,
                                   tasks={})
        return bslot

    def drop_batch(self, bslot: int) -> None:
        batch = self._batch(bslot)
        for slot in reversed(list(batch["tasks"])):   # newest first, as the native list
            task = self.tasks[slot]
            if task["state"] in (TASK_PENDING, TASK_RUNNING):
                self._set_state(slot, task, TASK_CANCELLED)
            self.release(slot)
        del self.batches[bslot]
        self._batch_free.append(bslot)

    def add_task(self, bslot: int, total_runs: int, subtasks: int = 1) -> int:
        batch = self._batch(bslot)
        if total_runs < 0 or subtasks < 1:
            raise ValueError(f"total_runs={total_runs} subtasks={subtasks}")
        if self._free:
            slot = self._free.pop()
        else:
            slot, self._top = self._top, self._top + 1
        task = self.tasks[slot] = dict(
            batch=bslot, state=TASK_FREE, total_runs=total_runs, completed_runs=0, failed_runs=0,
            subtasks=subtasks, finished_subtasks=0, attempts=0, start_ns=0, end_ns=0)
        batch["tasks"][slot] = None
        self._set_state(slot, task, TASK_PENDING)
        return slot

    def start(self, slot: int) -> None:
        task = self._task(slot)
        if task["state"] != TASK_RUNNING:
            self._set_state(slot, task, TASK_RUNNING)
        task["attempts"] += 1

    def finish_subtask(self, slot: int, completed_runs: int, failed_runs: int) -> int:
        task = self._task(slot)
        if task["state"] != TASK_RUNNING:
            raise StatusError(f"task slot {slot}: not running")
        done = task["completed_runs"] + task["failed_runs"] + completed_runs + failed_runs
        if completed_runs < 0 or failed_runs < 0 or done > task["total_runs"]:
            raise ValueError(f"task slot {slot}: runs do not fit")
        task["completed_runs"] += completed_runs
        task["failed_runs"] += failed_runs
        task["finished_subtasks"] += 1
        if task["finished_subtasks"] == task["subtasks"]:
            ok = task["completed_runs"] == task["total_runs"]
            self._set_state(slot, task, TASK_DONE if ok else TASK_FAILED)
        return task["state"]

    def cancel(self, slot: int) -> None:
        self._set_state(slot, self._task(slot), TASK_CANCELLED)

    def release(self, slot: int) -> None:
        task = self._task(slot)
        self._set_state(slot, task, TASK_FREE)
        del self.batches[task["batch"]]["tasks"][slot]
        del self.tasks[slot]
        self._free.append(slot)

    def state(self, slot: int) -> int:
        if not 0 <= slot < self._top:
            raise StatusError(f"task slot {slot} is out of range")
        task = self.tasks.get(slot)
        return TASK_FREE if task is None else task["state"]

    def task_batch(self, slot: int) -> int:
        return self._task(slot)["batch"]

    def runs(self, slot: int) -> tuple[int, int, int]:
        task = self._task(slot)
        return (task["completed_runs"], task["failed_runs"], task["total_runs"])

    def batch_counts(self, bslot: int) -> tuple[int, int, int, int, int]:
        b = self._batch(bslot)
        return (b["expected"], b["completed"], b["failed"], b["running"], b["cancelled"])

    def batch_completed(self, bslot: int) -> int:
        return self._batch(bslot)["completed"]

    def batch_running(self, bslot: int) -> int:
        return self._batch(bslot)["running"]

    def __len__(self) -> int:
        return len(self.tasks)


IMPLS = pytest.mark.parametrize("impl", [TaskLedger, DictTaskLedger], ids=["native", "dict"])
CYCLES = 20_000
TRANSITIONS_PER_CYCLE = 4   # FREE->PENDING->RUNNING->DONE->FREE
SLOTS = 100_000


def _cycles(table, bslot: int) -> None:
    add, start, finish, release = table.add_task, table.start, table.finish_subtask, table.release
    for _ in range(CYCLES):
        slot = add(bslot, 4)
        start(slot)
        finish(slot, 4, 0)
        release(slot)


@IMPLS
def test_transitions_per_second(benchmark, impl):
    benchmark.group = f"task ledger: {CYCLES} add/start/finish/release cycles"
    table = impl()
    benchmark(_cycles, table, table.add_batch())
    benchmark.extra_info["transitions_per_s"] = round(
        CYCLES * TRANSITIONS_PER_CYCLE / benchmark.stats.stats.median)


def _fill(impl, capacity: int):
    table = impl(capacity)
    bslot = table.add_batch()
    for _ in range(SLOTS):
        table.start(table.add_task(bslot, 8))
    return table


@IMPLS
def test_memory_per_100k_slots(benchmark, impl):
    benchmark.group = f"task ledger: {SLOTS} running tasks"
    benchmark.pedantic(_fill, args=(impl, 1024), rounds=3, iterations=1)
    tracemalloc.start()
    try:
        table = _fill(impl, 1024)
        traced, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    benchmark.extra_info["traced_bytes_per_slot"] = round(traced / SLOTS, 1)
    if impl is TaskLedger:
        benchmark.extra_info["nbytes_per_slot"] = round(table.nbytes / SLOTS, 1)
        presized = _fill(impl, SLOTS).nbytes
        benchmark.extra_info["nbytes_per_slot_presized"] = round(presized / SLOTS, 1)
        benchmark.extra_info["slot_struct_bytes"] = SLOT_BYTES
