"""Puts sub-tasks on slot workers, event-driven: no dispatch loop, no polling.

Work is dispatched the moment it is queued or a worker frees up. Batches are served
in priority order (int n, then "n/...", then other strings; FIFO inside a batch),
onto the least-loaded live engine. A busy slot's worker runs its sub-task and then the
next queued ones while there are any (``slot_worker.py``). Every started task has a row
in the native task ledger, the one record of its state, run counts and attempts;
finished tasks are handed to the coordinator at once, with their final ``Status``.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._native.ledger import TASK_DONE, TASK_FAILED, BatchProgress, TaskLedger
from ._native.tally import single_run_metrics
from .errors import EngineDeadError
from .metrics import calculate_task_level_metrics
from .operators import VersionSpan, merge_versions
from .runner import Outcome, Runner
from .slot_worker import SlotWorker, WorkerState
from .task import Status, Task

if TYPE_CHECKING:
    from .config import ExplorerConfig
    from .engines.base import InferenceModel
    from .experience import Experience

logger = logging.getLogger(__name__)

_LEADING_INT = re.compile(r"^(\d+)")
_IDLE = WorkerState.IDLE


def batch_priority(batch_id: int | str) -> tuple:
    """Sort key of batches: 1 < "1/eval" < 2 < "2/..." < other strings (by name)."""
    if isinstance(batch_id, int):
        return (batch_id, 0, "")
    match = _LEADING_INT.match(batch_id)
    if match:
        return (int(match.group(1)), 1, batch_id)
    return (float("inf"), 1, batch_id)


class TaskRecord:
    """The Python side of one started task, from its first sub-task's start until it is
    booked: the objects its runs produced. Its state and run counts are its ledger row's."""

    __slots__ = ("source", "task_id", "row", "batch", "is_eval", "metrics", "experiences",
                 "first_error", "versions")

    def __init__(self, source: Task, task_id: int, row: int, batch: BatchRun) -> None:
        self.source = source
        self.task_id = task_id
        self.row = row                  # the task's row in the ledger
        self.batch = batch
        # Eval tasks keep no experiences, get max_timeout and do not feed the dynamic one.
        self.is_eval = batch.is_eval or source.is_eval
        # Lists only once there is something in them.
        self.metrics: list[dict[str, Any]] | tuple[()] = ()
        self.experiences: list[Experience] | tuple[()] = ()
        self.first_error: str | None = None
        self.versions: VersionSpan = None   # weight versions its experiences were sampled with

    def add(self, outcome: Outcome) -> None:
        """Take one sub-task's results."""
        if self.metrics:
            self.metrics.extend(outcome.metrics)
        else:
            self.metrics = outcome.metrics
        if outcome.experiences:
            if self.experiences:
                self.experiences.extend(outcome.experiences)
                self.versions = merge_versions(self.versions, outcome.versions)
            else:
                self.experiences = outcome.experiences
                self.versions = outcome.versions
        if outcome.error is not None and self.first_error is None:
            self.first_error = outcome.error

    def final_status(self, ledger: TaskLedger) -> Status:
        """The task's final status, with its one task-level metrics dict."""
        # Most tasks are one run: its dict reduced in C, without the general path's checks.
        metrics, is_eval = self.metrics, self.source.is_eval
        task_metrics = single_run_metrics(metrics[0], is_eval) if len(metrics) == 1 else None
        if task_metrics is None:
            task_metrics = calculate_task_level_metrics(metrics, is_eval)
        return ledger.final_status(self.row, Status, task_metrics, self.first_error)


class SubTask:
    __slots__ = ("record", "repeat_times", "run_id_base", "worker")

    def __init__(self, record: TaskRecord, repeat_times: int, run_id_base: int) -> None:
        self.record = record
        self.repeat_times = repeat_times
        self.run_id_base = run_id_base
        self.worker: SlotWorker | None = None   # while running


class BatchQueue:
    """A batch's queued sub-tasks. A task becomes a record and sub-tasks only when it is
    started: until then it is a slot in the caller's list. Records made at submission
    would live, and be walked by every full collection of the GC, as long as they wait.
    FIFO: all sub-tasks of task i before those of task i + 1."""

    __slots__ = ("tasks", "next", "ready")

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.next = 0                       # the first task not started yet
        self.ready: deque[SubTask] = deque()  # sub-tasks of started tasks, and requeued ones

    def __bool__(self) -> bool:
        return bool(self.ready) or self.next < len(self.tasks)

    def popleft(self, start_task: Callable[[BatchRun, int, Task, deque], SubTask],
                batch: BatchRun) -> SubTask:
        """The next sub-task; ``start_task(batch, i, task, ready)`` makes those of the next
        task when none is ready (returning the first, queueing the others on ``ready``)."""
        if self.ready:
            return self.ready.popleft()
        i = self.next
        self.next = i + 1
        return start_task(batch, i, self.tasks[i], self.ready)

    def appendleft(self, sub: SubTask) -> None:
        self.ready.appendleft(sub)

    def clear(self) -> None:
        self.ready.clear()
        self.next = len(self.tasks)


class BatchRun:
    """The scheduler's side of one batch: its queue, its running sub-tasks, and the records
    of its started, unfinished tasks (a record goes as soon as its task is booked)."""

    __slots__ = ("batch_id", "is_eval", "ledger_row", "queue", "running", "unfinished",
                 "on_task_done")

    def __init__(self, batch_id: int | str, is_eval: bool, ledger_row: int,
                 on_task_done: Callable[[TaskRecord, Status], None]) -> None:
        self.batch_id = batch_id
        self.is_eval = is_eval
        self.ledger_row = ledger_row    # the batch's row of counters in the ledger
        self.queue = BatchQueue()
        self.running: set[SubTask] = set()
        self.unfinished: dict[int, TaskRecord] = {}     # by task id, in start order
        self.on_task_done = on_task_done


class Scheduler:
    def __init__(self, config: ExplorerConfig, engines: list[InferenceModel],
                 auxiliary: list[list[InferenceModel]], runner: Runner,
                 on_engines_dead: Callable[[EngineDeadError], None]) -> None:
        if not engines:
            raise ValueError("RolloutCoordinator needs at least one rollout engine")
        self.config = config
        self.runner = runner
        self.ledger = TaskLedger()
        self.engines = engines
        self.loop = asyncio.get_running_loop()
        self.max_attempts = config.max_retry_times + 1
        self.collect_partial_runs = config.over_rollout.return_partial_tasks
        # Every attempt's timeout when there is no dynamic one (read per sub-task).
        self.static_timeout = None if config.dynamic_timeout.enable else config.max_timeout
        self._on_engines_dead = on_engines_dead
        # Slot i is bound to engine i % E and to auxiliary engine i % len(aux[j]), as in Trinity.
        self.workers = [SlotWorker(i, i % len(engines), engines[i % len(engines)],
                                   [models[i % len(models)] for models in auxiliary], self,
                                   runner)
                        for i in range(config.runner_per_model * len(engines))]
        self._idle: list[list[SlotWorker]] = [[] for _ in engines]
        for worker in self.workers:
            self._idle[worker.engine_index].append(worker)
        self._dead: set[int] = set()
        self._order: list[tuple] = []              # priority keys of batches with queued work
        self._queued: dict[tuple, BatchRun] = {}
        # Dynamic-timeout statistics (train sub-tasks only).
        self.train_time = 0.0
        self.train_subtasks = 0
        self.completed_steps = 0

    # -- submission ---------------------------------------------------------------------------

    def new_batch(self, batch_id: int | str, is_eval: bool, task_count: int,
                  on_task_done: Callable[[TaskRecord, Status], None]) -> BatchRun:
        return BatchRun(batch_id, is_eval, self.ledger.add_batch(task_count), on_task_done)

    def submit(self, batch: BatchRun, tasks: list[Task]) -> None:
        """Queue ``tasks`` (task_id = index in this call) and dispatch at once. The list
        becomes the queue's: the coordinator hands over its own checked copy."""
        batch.queue.tasks = tasks
        self._enqueue(batch)
        self.dispatch()

    def _start_task(self, batch: BatchRun, i: int, task: Task, ready: deque) -> SubTask:
        """Task ``i`` of ``batch`` is next to run: its record and ledger row; returns its
        first sub-task and puts the others (a task split by max_repeat_times_per_runner) on
        ``ready``."""
        k = self.config.max_repeat_times_per_runner
        repeat = task.repeat_times
        later = range(k, repeat, k) if k else ()    # run id bases of the second and later
        row = self.ledger.add_task(batch.ledger_row, repeat, 1 + len(later), i)
        record = TaskRecord(task, i, row, batch)
        batch.unfinished[i] = record
        if later:
            ready.extend(SubTask(record, min(k, repeat - base), base) for base in later)
        return SubTask(record, min(k, repeat) if k else repeat, 0)

    def _enqueue(self, batch: BatchRun) -> None:
        key = batch_priority(batch.batch_id)
        if batch.queue and key not in self._queued:
            bisect.insort(self._order, key)
            self._queued[key] = batch

    def attempt_timeout(self, is_eval: bool) -> float:
        """Per-attempt timeout: max_timeout, or for train tasks the dynamic one once warmed up."""
        cfg = self.config
        dyn = cfg.dynamic_timeout
        if (is_eval or not dyn.enable or self.completed_steps < dyn.warmup_min_steps
                or self.train_subtasks == 0):
            return cfg.max_timeout
        return min(cfg.max_timeout, self.train_time / self.train_subtasks * dyn.ratio)

    def progress(self, batch: BatchRun) -> BatchProgress:
        return self.ledger.progress(batch.ledger_row)

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start queued sub-tasks on idle workers of the least-loaded live engines."""
        order, idle = self._order, self._idle
        while order:
            workers = max(idle, key=len)
            if not workers:
                return
            sub = self._pop()
            worker = workers.pop()
            self._assign(sub, worker)
            worker.start(sub)

    def _pop(self) -> SubTask:
        key = self._order[0]
        batch = self._queued[key]
        queue = batch.queue
        sub = queue.popleft(self._start_task, batch)
        if not queue:
            del self._queued[key]
            self._order.pop(0)
        return sub

    def _assign(self, sub: SubTask, worker: SlotWorker) -> None:
        sub.worker = worker
        sub.record.batch.running.add(sub)

    def _unassign(self, sub: SubTask) -> None:
        sub.worker = None
        sub.record.batch.running.discard(sub)

    # -- reports of slot workers --------------------------------------------------------------

    def subtask_done(self, worker: SlotWorker, sub: SubTask, outcome: Outcome) -> SubTask | None:
        """``worker`` finished ``sub``: book it, and return the worker's next sub-task if the
        worker is where it goes (ties between engines favour it, so a busy worker goes on
        without a new asyncio task), else None (the worker then reports itself idle)."""
        record = sub.record
        sub.worker = None       # _unassign, written out: this runs once per sub-task
        record.batch.running.discard(sub)
        if not record.is_eval:
            self.train_time += outcome.elapsed
            self.train_subtasks += 1
        record.add(outcome)
        completed = outcome.completed_runs
        state = self.ledger.finish_subtask(record.row, completed, outcome.total_runs - completed)
        if state == TASK_DONE or state == TASK_FAILED:
            self._book(record)
        if self._order and worker.engine_index not in self._dead:
            mine = len(self._idle[worker.engine_index]) + 1
            if len(self._idle) == 1 or max(map(len, self._idle)) <= mine:
                sub = self._pop()
                self._assign(sub, worker)
                return sub
        return None

    def worker_idle(self, worker: SlotWorker) -> None:
        """``worker``'s asyncio task ended with nothing more for it: it takes work again."""
        if worker.engine_index not in self._dead and self.workers[worker.index] is worker:
            self._idle[worker.engine_index].append(worker)
            self.dispatch()

    def subtask_lost(self, worker: SlotWorker, sub: SubTask) -> None:
        """The loop cancelled ``worker`` while it ran ``sub`` (shutdown): the task is cancelled."""
        self._unassign(sub)
        self._cancel_record(sub.record)

    def engine_died(self, worker: SlotWorker, sub: SubTask, error: EngineDeadError) -> None:
        """``worker``'s engine died under ``sub``: the sub-task runs again on a live engine."""
        self._unassign(sub)
        index = worker.engine_index
        if index not in self._dead:
            self._dead.add(index)
            self._idle[index].clear()
            logger.error("engine %d is dead (%s); its slots take no more work", index, error)
        batch = sub.record.batch
        batch.queue.appendleft(sub)
        self._enqueue(batch)
        if len(self._dead) == len(self.engines):
            self._on_engines_dead(EngineDeadError(
                f"all {len(self.engines)} rollout engines are dead; last error: {error}"))
        else:
            self.dispatch()

    def dead_error(self) -> EngineDeadError | None:
        """EngineDeadError while no rollout engine is alive, else None. An engine that came
        back (``is_dead`` false again) takes work again: its slots rejoin."""
        for index in [i for i in self._dead if not self.engines[i].is_dead]:
            self._dead.discard(index)
            self._idle[index] = [w for w in self.workers
                                 if w.engine_index == index and w.state is _IDLE]
            logger.warning("engine %d is alive again; its slots take work", index)
            self.dispatch()
        if len(self._dead) < len(self.engines):
            return None
        return EngineDeadError(f"all {len(self.engines)} rollout engines are dead; "
                               f"queued work waits for one to come back")

    # -- completion ---------------------------------------------------------------------------

    def _book(self, record: TaskRecord) -> None:
        """Hand a finished task to the coordinator. Whatever goes wrong here fails this task
        alone (its runs' results were checked when their attempts ended, so that would be a
        bug of fastrollout's): never the batch, the loop or later batches."""
        batch = record.batch
        # The record goes at once, so that a large batch's finished tasks hold (and give the
        # GC to walk) as little as possible.
        del batch.unfinished[record.task_id]
        try:
            status = record.final_status(self.ledger)
        except Exception as exc:
            logger.exception("task %s of batch %s: its results cannot be booked",
                             record.task_id, batch.batch_id)
            status = Status(0, record.source.repeat_times, [{}],
                            f"internal error while booking the task's results: {exc!r}")
            record.experiences = ()
        batch.on_task_done(record, status)

    # -- cancellation -------------------------------------------------------------------------

    def cancel_batch(self, batch: BatchRun, *, keep_partial: bool) -> list[asyncio.Future]:
        """Drop the batch's queued work and detach the workers running its sub-tasks; their
        slots get fresh workers at once. With ``keep_partial``, unfinished tasks that
        completed some runs are booked as they stand (partial results).

        Returns the cancelled work plus its engine-side aborts, to await for a bounded time.
        """
        key = batch_priority(batch.batch_id)
        if self._queued.pop(key, None) is not None:
            self._order.remove(key)
        batch.queue.clear()
        waits: list[asyncio.Future] = []
        for sub in list(batch.running):
            worker = sub.worker
            self._unassign(sub)
            waits += worker.detach()
            fresh = self.workers[worker.index] = worker.replacement()
            if fresh.engine_index not in self._dead:
                self._idle[fresh.engine_index].append(fresh)
        ledger = self.ledger
        for record in list(batch.unfinished.values()):
            if keep_partial and ledger.completed_runs(record.row) > 0:
                self._book(record)
            self._cancel_record(record)
        self.dispatch()
        return waits

    def _cancel_record(self, record: TaskRecord) -> None:
        if not self.ledger.is_final(record.row):
            self.ledger.cancel(record.row)

    def close(self) -> None:
        """The coordinator shuts down: workers are cancelled, no timer is left on the loop."""
        for worker in self.workers:
            worker.close()

    def release_batch(self, batch: BatchRun) -> None:
        """Forget a batch that is finalized or aborted. Its ledger rows and records go on the
        next loop iteration: nothing reads them any more, and a finalize need not wait for it."""
        self.loop.call_soon(self._drop, batch)

    def _drop(self, batch: BatchRun) -> None:
        self.ledger.drop_batch(batch.ledger_row)
        # Unfinished tasks' records point back at their batch, and on_task_done at the
        # coordinator's batch state: unlinked, a batch is freed by reference counting at once
        # instead of being left to a full collection, which walks every object of the process.
        batch.unfinished = {}
        batch.on_task_done = None
