"""SlotWorker: the one thing that runs sub-tasks on a slot, attempt after attempt.

A slot is a place for one sub-task at a time, bound to one rollout engine (and to one
engine of each auxiliary model), as Trinity binds its runner actors. Its worker owns
what outlives a single attempt: the attempt timer, the model clients of the attempt in
flight (so that a canceller can abort their engine requests), the reusable workflow
instance, and the retry loop. While it has work it runs as one asyncio task that goes
from sub-task to sub-task as long as the scheduler hands it more (a task per sub-task
costs more than a fast workflow run).

States: IDLE (no asyncio task) -> RUNNING -> IDLE ...; ``detach()`` (batch cancelled,
over-rollout cut-off) moves a RUNNING worker to DETACHED for good: its asyncio task is
cancelled and its requests aborted, it keeps its timer and clients while it unwinds,
and the scheduler puts a fresh worker on the slot at once. ``close()`` (shutdown) ends
any worker: CLOSED.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from enum import Enum
from typing import TYPE_CHECKING

from .engines.client import ModelClient
from .errors import EngineDeadError
from .runner import Outcome, Runner
from .task import attempt_view

if TYPE_CHECKING:
    from .engines.base import InferenceModel
    from .scheduler import Scheduler, SubTask
    from .workflow import Workflow

logger = logging.getLogger(__name__)

# Sub-tasks a worker runs back to back before it lets the loop run other callbacks.
_STREAK = 16


class WorkerState(Enum):
    IDLE = "idle"
    RUNNING = "running"
    DETACHED = "detached"
    CLOSED = "closed"


_IDLE, _RUNNING, _DETACHED, _CLOSED = (WorkerState.IDLE, WorkerState.RUNNING,
                                       WorkerState.DETACHED, WorkerState.CLOSED)


class AttemptTimer:
    """Per-attempt timeouts of a worker's asyncio task with at most one loop timer, re-armed
    lazily.

    A worker runs attempt after attempt; arming and cancelling a loop timer for each
    (what ``asyncio.timeout`` does) costs more than a fast attempt itself. Here a timer
    armed for an earlier deadline stays armed: when it fires it either expires the
    attempt in flight or re-arms for that attempt's own deadline. It also stays armed
    while the worker is idle (``task`` None): cancelling the loop timers of every worker
    at the end of a batch would delay the wake-up of the finalize waiting for it.
    """

    __slots__ = ("loop", "task", "deadline", "armed_at", "handle", "active", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task | None = None) -> None:
        self.loop = loop
        self.task = task        # the asyncio task running attempts now
        self.deadline = self.armed_at = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.active = self.expired = False

    def start(self, timeout: float) -> None:
        """An attempt of ``timeout`` seconds begins (``task`` is running it)."""
        self.deadline = deadline = self.loop.time() + timeout
        self.active = True
        if not math.isfinite(deadline):
            return
        if self.handle is None or self.armed_at > deadline:
            self._arm(deadline)

    def stop(self) -> bool:
        """The attempt ended; True if it ran out of time (its cancellation is consumed)."""
        self.active = False
        if self.expired:
            self.expired = False
            self.task.uncancel()
            return True
        return False

    def close(self) -> None:
        """No more attempts: no loop timer left behind."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed_at = when
        self.handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.handle = None
        if not self.active:
            return      # no attempt in flight: the next one arms its own deadline
        if self.deadline <= self.armed_at:
            self.expired = True
            self.task.cancel()
        else:
            self._arm(self.deadline)


class SlotWorker:
    """Runs the sub-tasks the scheduler gives slot ``index`` (bound to ``engine``)."""

    __slots__ = ("index", "engine_index", "engine", "aux_engines", "scheduler", "runner",
                 "state", "timer", "clients", "workflow", "task")

    def __init__(self, index: int, engine_index: int, engine: InferenceModel,
                 aux_engines: list[InferenceModel], scheduler: Scheduler, runner: Runner) -> None:
        self.index = index
        self.engine_index = engine_index
        self.engine = engine
        self.aux_engines = aux_engines
        self.scheduler = scheduler
        self.runner = runner
        self.state = _IDLE
        self.timer = AttemptTimer(scheduler.loop)
        # The model clients of the attempt in flight, for a canceller to abort their requests.
        self.clients: list[ModelClient] = []
        self.workflow: Workflow | None = None   # kept for reuse by resettable workflows
        self.task: asyncio.Task | None = None

    def replacement(self) -> SlotWorker:
        """A fresh worker for this worker's slot (after ``detach()``)."""
        return SlotWorker(self.index, self.engine_index, self.engine, self.aux_engines,
                          self.scheduler, self.runner)

    # -- control (called by the scheduler) -----------------------------------------------------

    def start(self, sub: SubTask) -> None:
        """An IDLE worker starts running ``sub`` (and the sub-tasks after it) in a new task."""
        self.state = _RUNNING
        self.task = self.timer.task = self.scheduler.loop.create_task(self._run(sub))

    def detach(self) -> list[asyncio.Future]:
        """Give up the work in flight: abort its engine requests and cancel the asyncio task
        (a workflow may ignore that: it is then left behind). Returns what to await, for a
        bounded time, for it to unwind. The worker takes no more work."""
        if self.state is not _RUNNING:
            return []
        self.state = _DETACHED
        waits: list[asyncio.Future] = [asyncio.ensure_future(c.abort_all()) for c in self.clients]
        self.task.cancel()
        waits.append(self.task)
        return waits

    def close(self) -> None:
        """Shutdown: no timer is left on the loop; a running task is cancelled."""
        if self.state is _RUNNING:
            self.task.cancel()
        self.state = _CLOSED
        self.timer.close()

    # -- the worker's task ---------------------------------------------------------------------

    async def _run(self, sub: SubTask | None) -> None:
        """Run ``sub``, then the sub-tasks the scheduler hands this worker after it. Each
        sub-task gets up to ``max_retry_times + 1`` attempts, each bounded by the attempt
        timeout. (The retry loop is written out here, not in a coroutine of its own: with a
        fast workflow, creating and awaiting one per sub-task is a good part of its cost.)"""
        scheduler = self.scheduler
        ledger = scheduler.ledger
        runner = self.runner
        timer = self.timer
        loop = timer.loop
        collect_partial = scheduler.collect_partial_runs
        max_attempts = scheduler.max_attempts
        streak = 0
        try:
            while sub is not None:
                if streak == _STREAK:
                    # Workflows that never suspend would otherwise hold the loop for the
                    # whole queue.
                    streak = 0
                    await asyncio.sleep(0)
                record = sub.record
                batch_id = record.batch.batch_id
                repeat_times = sub.repeat_times
                timeout = scheduler.static_timeout or scheduler.attempt_timeout(record.is_eval)
                start = time.perf_counter()
                try:
                    for attempt in range(1, max_attempts + 1):
                        if timer.task.cancelling():     # cancelled; a workflow swallowed it
                            raise asyncio.CancelledError
                        ledger.start(record.row, attempt > 1)
                        try:
                            task = attempt_view(record.source, batch_id, record.task_id,
                                                repeat_times)
                        except TypeError as exc:    # no attempt of this Task would do better
                            outcome = Outcome.failed(repeat_times, f"task {record.task_id} of "
                                                     f"batch {batch_id} cannot start: {exc}")
                            break
                        # Request ids start "{batch}/{task}/{run_id_base}/{attempt}", joined
                        # only if a request is made.
                        parts = (batch_id, record.task_id, sub.run_id_base, attempt)
                        clients = [ModelClient(self.engine, loop, task.rollout_args, parts)]
                        if self.aux_engines:
                            clients += [ModelClient(e, loop, task.rollout_args, (*parts, f"aux{j}"))
                                        for j, e in enumerate(self.aux_engines)]
                        self.clients = clients
                        expired = False
                        timer.start(timeout)
                        try:
                            try:
                                outcome = await runner.attempt(
                                    task, repeat_times, sub.run_id_base, self, clients,
                                    collect_partial, not record.is_eval)
                            finally:
                                expired = timer.stop()
                        except asyncio.CancelledError:
                            if not expired:
                                raise
                            outcome = Outcome.failed(repeat_times, (
                                f"Timeout ({timeout} s) when running task of batch {batch_id} "
                                f"at runner {self.index} at attempt {attempt}: task "
                                f"{record.task_id}"))
                        finally:
                            self.clients = []
                            for client in clients:
                                if client.close():
                                    await _abort_left_requests(client)
                        if outcome.error is None or (collect_partial
                                                     and outcome.completed_runs > 0):
                            break
                except EngineDeadError as error:
                    if self.state is _RUNNING:
                        self.state = _IDLE
                        scheduler.engine_died(self, sub, error)
                    return
                except asyncio.CancelledError:
                    if self.state is _RUNNING:      # the loop is shutting down
                        self.state = _IDLE
                        scheduler.subtask_lost(self, sub)
                    raise
                except Exception as exc:    # a bug of fastrollout's: this task fails, no other
                    logger.exception("slot %d: internal error while running task %s of batch %s",
                                     self.index, record.task_id, batch_id)
                    outcome = Outcome.failed(repeat_times, f"internal error while running "
                                             f"the task: {exc!r}")
                if self.state is not _RUNNING:
                    return      # detached: the sub-task was taken away
                outcome.elapsed = elapsed = time.perf_counter() - start
                outcome.metrics.append({"time/task_execution": elapsed})
                sub = scheduler.subtask_done(self, sub, outcome)
                streak += 1
        finally:
            self.task = None
            if self.state is _DETACHED:
                self.timer.close()
            else:
                self.timer.task = None      # left armed for the slot's next run
        # Only now, with this task's bookkeeping done, may the worker be started again.
        self.state = _IDLE
        scheduler.worker_idle(self)


async def _abort_left_requests(client: ModelClient) -> None:
    """Abort the requests a finished attempt left in flight. The attempt's result stands
    whatever the engine answers: a failing abort is the engine's trouble, logged."""
    try:
        await client.abort_all()
    except Exception:
        logger.exception("aborting requests %s left by a finished attempt failed",
                         client.inflight_request_ids())
