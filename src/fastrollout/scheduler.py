"""Puts sub-tasks on free slots, event-driven: no dispatch loop, no polling.

Work is dispatched the moment it is queued or a slot frees up. Batches are served
in priority order (int n, then "n/...", then other strings; FIFO inside a batch),
onto the least-loaded live engine. A busy slot has one worker task, which runs its
sub-task and then the next queued ones while there are any, so a sub-task costs no
task of its own. Every task lives in a slot of the native status table; completions
update it and hand finished tasks to the coordinator at once.
"""
from __future__ import annotations

import asyncio
import bisect
import logging
import re
from collections import deque
from typing import TYPE_CHECKING, Callable

from ._native.status import TASK_DONE, TASK_FAILED, StatusTable, final_status
from ._native.tally import single_run_metrics
from .errors import EngineDeadError
from .metrics import calculate_task_level_metrics
from .runner import AttemptTimer, Outcome, Runner, Slot
from .task import Status, Task, started

if TYPE_CHECKING:
    from .config import ExplorerConfig
    from .engines.base import InferenceModel

logger = logging.getLogger(__name__)

_LEADING_INT = re.compile(r"^(\d+)")
# Sub-tasks a worker runs back to back before it lets the loop run other callbacks.
_STREAK = 16


def batch_priority(batch_id: int | str) -> tuple:
    """Sort key of batches: 1 < "1/eval" < 2 < "2/..." < other strings (by name)."""
    if isinstance(batch_id, int):
        return (batch_id, 0, "")
    match = _LEADING_INT.match(batch_id)
    if match:
        return (int(match.group(1)), 1, batch_id)
    return (float("inf"), 1, batch_id)


class TaskRecord:
    """One started task of a batch: its sub-tasks' tally, from its first sub-task's start
    until it is booked."""

    __slots__ = ("source", "task_id", "task", "row", "batch", "is_eval", "completed_runs",
                 "metrics", "experiences", "first_error", "finished")

    def __init__(self, source: Task, task_id: int, row: int, batch: BatchRun) -> None:
        self.source = source
        self.task_id = task_id
        # Eval tasks keep no experiences, get max_timeout and do not feed the dynamic one.
        self.is_eval = batch.is_eval or source.is_eval
        self.task: Task | None = None   # ``source`` with batch_id / task_id set, once started
        self.row = row                  # slot in the status table
        self.batch = batch
        self.completed_runs = 0
        self.metrics: list[dict] | tuple = ()     # lists only once there is something in them
        self.experiences: list | tuple = ()
        self.first_error: str | None = None
        self.finished = False

    def view(self, repeat_times: int) -> Task:
        """What a sub-task of ``repeat_times`` runs sees: ``source`` with batch_id / task_id
        set and ``rollout_args.n = repeat_times`` (a copy: the caller's task is not touched)."""
        task = self.task
        if task is None or task.rollout_args.n != repeat_times:
            task = self.task = started(self.source, self.batch.batch_id, self.task_id,
                                       repeat_times)
        return task

    def status(self) -> Status:
        """The task's final status, with its one task-level metrics dict."""
        total = self.source.repeat_times
        message = None
        if self.completed_runs < total:
            message = f"{self.completed_runs}/{total} runs completed successfully."
            message += (f" First error: {self.first_error}" if self.first_error
                        else " Remaining runs were cancelled during scheduler cleanup.")
        # Most tasks are one run: its dict reduced in C, without the general path's checks.
        metrics, is_eval = self.metrics, self.source.is_eval
        task_metrics = single_run_metrics(metrics[0], is_eval) if len(metrics) == 1 else None
        if task_metrics is None:
            task_metrics = calculate_task_level_metrics(metrics, is_eval)
        return final_status(Status, self.completed_runs, total, task_metrics, message)


class SubTask:
    __slots__ = ("record", "repeat_times", "run_id_base", "handle", "slot")

    def __init__(self, record: TaskRecord, repeat_times: int, run_id_base: int) -> None:
        self.record = record
        self.repeat_times = repeat_times
        self.run_id_base = run_id_base
        self.handle: asyncio.Task | None = None
        self.slot: Slot | None = None


class BatchQueue:
    """A batch's queued sub-tasks. A task becomes a record and sub-tasks only when it is
    reached: until then it is a slot in the caller's list. Records made at submission
    would live, and be walked by every full collection of the GC, as long as they wait.
    FIFO: all sub-tasks of task i before those of task i + 1 (the scheduler reaches tasks)."""

    __slots__ = ("tasks", "next", "ready")

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.next = 0                       # the first task not reached yet
        self.ready: deque[SubTask] = deque()  # sub-tasks of reached tasks, and requeued ones

    def __bool__(self) -> bool:
        return bool(self.ready) or self.next < len(self.tasks)

    def popleft(self, reach: Callable[[BatchRun, int, Task, deque], SubTask],
                batch: BatchRun) -> SubTask:
        """The next sub-task; ``reach(batch, i, task, ready)`` makes those of the next task
        when none is ready (returning the first, queueing the others on ``ready``)."""
        if self.ready:
            return self.ready.popleft()
        i = self.next
        self.next = i + 1
        return reach(batch, i, self.tasks[i], self.ready)

    def appendleft(self, sub: SubTask) -> None:
        self.ready.appendleft(sub)

    def clear(self) -> None:
        self.ready.clear()
        self.next = len(self.tasks)


class BatchRun:
    """The scheduler's side of one batch: its queue, its running sub-tasks, and the records
    of its started, unfinished tasks (a record goes as soon as its task is booked)."""

    __slots__ = ("batch_id", "is_eval", "bslot", "queue", "running", "unfinished",
                 "on_task_done")

    def __init__(self, batch_id: int | str, is_eval: bool, bslot: int,
                 on_task_done: Callable[[TaskRecord], None]) -> None:
        self.batch_id = batch_id
        self.is_eval = is_eval
        self.bslot = bslot
        self.queue = BatchQueue()
        self.running: set[SubTask] = set()
        self.unfinished: dict[int, TaskRecord] = {}     # by task id, in submission order
        self.on_task_done = on_task_done


class Scheduler:
    def __init__(self, config: ExplorerConfig, engines: list[InferenceModel],
                 auxiliary: list[list[InferenceModel]], runner: Runner,
                 on_fatal: Callable[[BaseException], None]) -> None:
        if not engines:
            raise ValueError("RolloutCoordinator needs at least one rollout engine")
        self.config = config
        self.runner = runner
        self.table = StatusTable()
        self.engines = engines
        self._loop = asyncio.get_running_loop()
        self._on_fatal = on_fatal
        # Slot i is bound to engine i % E and to auxiliary engine i % len(aux[j]), as in Trinity.
        per_engine = config.runner_per_model
        self._slots = [Slot(i, i % len(engines), engines[i % len(engines)],
                            [models[i % len(models)] for models in auxiliary])
                       for i in range(per_engine * len(engines))]
        self._free: list[list[Slot]] = [[] for _ in engines]
        for slot in self._slots:
            self._free[slot.engine_index].append(slot)
        self._dead: set[int] = set()
        self._order: list[tuple] = []              # priority keys of batches with queued work
        self._queued: dict[tuple, BatchRun] = {}
        # Dynamic-timeout statistics (train sub-tasks only).
        self.train_time = 0.0
        self.train_subtasks = 0
        self.completed_steps = 0

    # -- submission ---------------------------------------------------------------------------

    def new_batch(self, batch_id: int | str, is_eval: bool,
                  on_task_done: Callable[[TaskRecord], None]) -> BatchRun:
        return BatchRun(batch_id, is_eval, self.table.add_batch(), on_task_done)

    def submit(self, batch: BatchRun, tasks: list[Task]) -> None:
        """Queue ``tasks`` (task_id = index in this call) and dispatch at once. The list
        becomes the queue's: the coordinator hands over its own checked copy."""
        batch.queue.tasks = tasks
        self._enqueue(batch)
        self.dispatch()

    def _reach(self, batch: BatchRun, i: int, task: Task, ready: deque) -> SubTask:
        """Task ``i`` of ``batch`` is next to run: its record and row; returns its first
        sub-task and puts the others (a task split by max_repeat_times_per_runner) on
        ``ready``."""
        k = self.config.max_repeat_times_per_runner
        repeat = task.repeat_times
        later = range(k, repeat, k) if k else ()    # run id bases of the second and later
        record = TaskRecord(task, i, self.table.add_task(batch.bslot, repeat, 1 + len(later)),
                            batch)
        batch.unfinished[i] = record
        if later:
            ready.extend(SubTask(record, min(k, repeat - base), base) for base in later)
        return SubTask(record, min(k, repeat) if k else repeat, 0)

    def _enqueue(self, batch: BatchRun) -> None:
        key = batch_priority(batch.batch_id)
        if batch.queue and key not in self._queued:
            bisect.insort(self._order, key)
            self._queued[key] = batch

    def timeout(self) -> float:
        """Per-attempt timeout: max_timeout, or the dynamic one once warmed up."""
        cfg = self.config
        dyn = cfg.dynamic_timeout
        if (not dyn.enable or self.completed_steps < dyn.warmup_min_steps
                or self.train_subtasks == 0):
            return cfg.max_timeout
        return min(cfg.max_timeout, self.train_time / self.train_subtasks * dyn.ratio)

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start queued sub-tasks on free slots of the least-loaded engines."""
        order, free = self._order, self._free
        while order:
            slots = max(free, key=len)
            if not slots:
                return
            sub = self._pop()
            self._begin(sub, slots.pop(), None)

    def _pop(self) -> SubTask:
        key = self._order[0]
        batch = self._queued[key]
        queue = batch.queue
        sub = queue.popleft(self._reach, batch)
        if not queue:
            del self._queued[key]
            self._order.pop(0)
        return sub

    def _begin(self, sub: SubTask, slot: Slot, worker: asyncio.Task | None) -> None:
        """Mark ``sub`` running on ``slot``: in ``worker``, or in a new worker task."""
        record = sub.record
        self.table.start(record.row)
        sub.slot = slot
        record.batch.running.add(sub)
        sub.handle = worker if worker is not None else self._loop.create_task(self._work(sub))

    def _follow(self, slot: Slot, worker: asyncio.Task) -> SubTask | None:
        """A worker finished on ``slot``: the next sub-task if this slot is where it goes
        (ties between engines favour it, so a busy worker goes on without a new task);
        otherwise the slot is freed and the work, if any, starts elsewhere."""
        if self._order and slot.engine_index not in self._dead:
            mine = len(self._free[slot.engine_index]) + 1
            if len(self._free) == 1 or max(map(len, self._free)) <= mine:
                sub = self._pop()
                self._begin(sub, slot, worker)
                return sub
        self._free_slot(slot)
        self.dispatch()
        return None

    def _detach(self, sub: SubTask) -> Slot | None:
        slot, sub.slot = sub.slot, None
        sub.record.batch.running.discard(sub)
        return slot

    def _free_slot(self, slot: Slot | None) -> None:
        if slot is not None and slot.engine_index not in self._dead:
            self._free[slot.engine_index].append(slot)

    def _release(self, sub: SubTask) -> None:
        self._free_slot(self._detach(sub))

    # -- workers ------------------------------------------------------------------------------

    async def _work(self, sub: SubTask) -> None:
        """A worker task: runs ``sub``, then the next queued sub-tasks on the same slot while
        there are any. One task per busy slot, not per sub-task: creating, scheduling and
        finishing a task per sub-task costs more than a fast workflow run."""
        worker = asyncio.current_task()
        home = sub.slot
        timer = home.timer
        if timer is None:
            timer = home.timer = AttemptTimer(self._loop)
        timer.task = worker
        streak = 0
        try:
            while True:
                try:
                    if streak == _STREAK:
                        # Workflows that never suspend would otherwise hold the loop
                        # for the whole queue.
                        streak = 0
                        await asyncio.sleep(0)
                    record = sub.record
                    outcome = await self.runner.run_with_retry(
                        record.view(sub.repeat_times), sub.repeat_times, sub.run_id_base,
                        sub.slot, self.config.max_timeout if record.is_eval else self.timeout(),
                        self.config.over_rollout.return_partial_tasks, not record.is_eval,
                        timer)
                except asyncio.CancelledError:
                    if sub.slot is not None:    # loop shutdown, not cancel_batch
                        self._release(sub)
                        self._cancel_record(sub.record)
                    raise
                except EngineDeadError as error:
                    if sub.slot is not None:
                        self._detach(sub)
                        self._engine_died(home.engine_index, sub, error)
                        self.dispatch()
                    return
                except Exception as exc:    # raised outside the workflow (e.g. an abort)
                    if sub.slot is not None:
                        self._release(sub)
                        self._internal_error(sub, exc)
                        self.dispatch()
                    return
                if sub.slot is None:
                    return      # cancel_batch took this sub-task (and this worker) away
                self._detach(sub)
                try:
                    self._account(sub, outcome)
                except Exception as exc:
                    self._internal_error(sub, exc)
                sub = self._follow(home, worker)
                if sub is None:
                    return
                streak += 1
        finally:
            if home.timer is timer:
                timer.task = None       # left armed for the slot's next worker
            else:
                timer.close()           # this worker was detached from its slot

    def _internal_error(self, sub: SubTask, exc: Exception) -> None:
        rec = sub.record
        self._on_fatal(RuntimeError(
            f"internal error while finishing task {rec.task_id} of batch "
            f"{rec.batch.batch_id}: {exc!r}").with_traceback(exc.__traceback__))

    # -- completion ---------------------------------------------------------------------------

    def _account(self, sub: SubTask, outcome: Outcome) -> None:
        record = sub.record
        if not record.is_eval:
            self.train_time += outcome.elapsed
            self.train_subtasks += 1
        completed = outcome.completed_runs
        record.completed_runs += completed
        if record.metrics:
            record.metrics.extend(outcome.metrics)
        else:
            record.metrics = outcome.metrics
        if outcome.experiences:
            if record.experiences:
                record.experiences.extend(outcome.experiences)
            else:
                record.experiences = outcome.experiences
        if outcome.error is not None and record.first_error is None:
            record.first_error = outcome.error
        state = self.table.finish_subtask(record.row, completed, outcome.total_runs - completed)
        if state == TASK_DONE or state == TASK_FAILED:
            record.finished = True
            batch = record.batch
            batch.on_task_done(record)
            # Booked: the record goes, so that a large batch's finished tasks hold (and give
            # the GC to walk) as little as possible.
            del batch.unfinished[record.task_id]

    def _engine_died(self, engine_index: int, sub: SubTask, error: EngineDeadError) -> None:
        if engine_index not in self._dead:
            self._dead.add(engine_index)
            self._free[engine_index].clear()
            logger.error("engine %d is dead (%s); its slots take no more work", engine_index, error)
        if len(self._dead) == len(self.engines):
            self._on_fatal(EngineDeadError(
                f"all {len(self.engines)} rollout engines are dead; last error: {error}"))
            return
        batch = sub.record.batch
        batch.queue.appendleft(sub)     # runs again on a live engine
        self._enqueue(batch)

    # -- cancellation -------------------------------------------------------------------------

    def cancel_batch(self, batch: BatchRun) -> tuple[list[TaskRecord], list[asyncio.Future]]:
        """Drop the batch's queued work and cancel its running sub-tasks, freeing their
        slots at once.

        Returns the unfinished tasks that completed some runs (partial results), and the
        cancelled work plus its engine-side aborts, to await for a bounded time.
        """
        key = batch_priority(batch.batch_id)
        if self._queued.pop(key, None) is not None:
            self._order.remove(key)
        batch.queue.clear()
        waits: list[asyncio.Future] = []
        for sub in list(batch.running):
            # Abort engine requests here, not only in the runner's cleanup: a workflow
            # that swallows cancellation must not keep its requests alive.
            waits.extend(asyncio.ensure_future(c.abort_all()) for c in sub.slot.clients)
            sub.handle.cancel()
            waits.append(sub.handle)
            # The cancelled worker keeps its timer and client list; the next gets new ones.
            sub.slot.timer = None
            sub.slot.clients = []
            self._release(sub)
        partial = [r for r in batch.unfinished.values() if not r.finished and r.completed_runs > 0]
        for record in batch.unfinished.values():
            self._cancel_record(record)
        self.dispatch()
        return partial, waits

    def _cancel_record(self, record: TaskRecord) -> None:
        if not record.finished:
            record.finished = True
            self.table.cancel(record.row)

    def close(self) -> None:
        """The coordinator shuts down: no attempt timer is left on the loop."""
        for slot in self._slots:
            if slot.timer is not None:
                slot.timer.close()
                slot.timer = None

    def release_batch(self, batch: BatchRun) -> None:
        """Forget a batch that is finalized or aborted. Its table rows and records go on the
        next loop iteration: nothing reads them any more, and a finalize need not wait for it."""
        self._loop.call_soon(self._drop, batch)

    def _drop(self, batch: BatchRun) -> None:
        self.table.drop_batch(batch.bslot)
        # Unfinished tasks' records point back at their batch, and on_task_done at the
        # coordinator's batch state: unlinked, a batch is freed by reference counting at once
        # instead of being left to a full collection, which walks every object of the process.
        batch.unfinished = {}
        batch.on_task_done = None
