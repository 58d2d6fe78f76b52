"""Runs one sub-task on one slot: workflow instances, repeats, retries and timeouts.

A sub-task is ``repeat_times`` runs of a task starting at ``run_id_base`` (a task
split by ``max_repeat_times_per_runner`` has several). Each attempt gets fresh
model clients, so that a timed-out or cancelled attempt can abort exactly its own
engine requests, and a detached synchronous run can do no more harm than fail.
"""
from __future__ import annotations

import asyncio
import math
import time
import traceback
from typing import TYPE_CHECKING, Any, Coroutine

from .engines.client import ModelClient
from .errors import EngineDeadError
from .metrics import aggregate_run_level_metrics
from .task import Task
from .threads import WorkerPool

if TYPE_CHECKING:
    from .engines.base import InferenceModel
    from .experience import Experience
    from .workflow import Workflow

# One run's outcome: (ok, experiences, run metrics, error message), for workflows that
# are not repeatable (a repeatable workflow's one run becomes its Outcome directly).
RunResult = tuple[bool, list, list, str | None]


class Slot:
    """A place to run one sub-task at a time, bound to one engine (and auxiliary engines)."""

    __slots__ = ("index", "engine_index", "engine", "aux_engines", "workflow", "timer", "clients")

    def __init__(self, index: int, engine_index: int, engine: InferenceModel,
                 aux_engines: list[InferenceModel]) -> None:
        self.index = index
        self.engine_index = engine_index
        self.engine = engine
        self.aux_engines = aux_engines
        self.workflow: Workflow | None = None   # kept for reuse by resettable workflows
        # The attempt timer of the slot's workers; it outlives them (see AttemptTimer).
        self.timer: AttemptTimer | None = None
        # The model clients of the attempt in flight, for a canceller to abort their requests.
        # A cancelled worker keeps its list (the slot gets a new one, as for the timer).
        self.clients: list[ModelClient] = []


class AttemptTimer:
    """Per-attempt timeouts of a slot's worker tasks with at most one loop timer, re-armed
    lazily.

    A worker runs attempt after attempt; arming and cancelling a loop timer for each
    (what ``asyncio.timeout`` does) costs more than a fast attempt itself. Here a
    timer armed for an earlier deadline stays armed: when it fires it either expires
    the attempt in flight or re-arms for that attempt's own deadline. It also stays
    armed when a worker ends (``task`` None): the slot's next worker takes it over, and
    cancelling the loop timers of every worker at the end of a batch would delay the
    wake-up of the finalize waiting for that batch.
    """

    __slots__ = ("loop", "task", "deadline", "armed_at", "handle", "active", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task | None = None) -> None:
        self.loop = loop
        self.task = task        # the worker running attempts now
        self.deadline = self.armed_at = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.active = self.expired = False

    def start(self, timeout: float) -> None:
        """An attempt of ``timeout`` seconds begins (the worker task is running it)."""
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


class Outcome:
    """What one sub-task produced after all its attempts."""

    __slots__ = ("completed_runs", "total_runs", "metrics", "error", "experiences", "elapsed")

    def __init__(self, completed_runs: int, total_runs: int, metrics: list[dict],
                 error: str | None, experiences: list) -> None:
        self.completed_runs = completed_runs
        self.total_runs = total_runs
        self.metrics = metrics
        self.error = error              # the first error, None when every run completed
        self.experiences = experiences
        self.elapsed = 0.0


class Runner:
    """Executes sub-tasks; shared by all slots of a coordinator."""

    def __init__(self, *, concurrent_mode: str, max_retry_times: int, pool: WorkerPool) -> None:
        self.concurrent_mode = concurrent_mode
        self.max_retry_times = max_retry_times
        self.pool = pool
        self.detached_runs = 0      # synchronous runs left behind in their threads

    async def run_with_retry(self, task: Task, repeat_times: int, run_id_base: int, slot: Slot,
                             timeout: float, collect_partial_runs: bool,
                             keep_experiences: bool, timer: AttemptTimer) -> Outcome:
        """Run up to ``max_retry_times + 1`` attempts, each bounded by ``timeout`` seconds.

        Runs inside the worker task that ``timer`` belongs to. ``task.rollout_args.n`` is
        already ``repeat_times`` (the scheduler sets it). With ``keep_experiences`` false
        (eval) the runs' experiences are dropped unstamped.

        ``slot.clients`` holds the model clients of the attempt in flight, so that a
        canceller can abort their engine requests without this coroutine's help.
        Raises EngineDeadError when the slot's engine died (the caller reschedules).
        """
        start = time.perf_counter()
        loop = timer.loop
        clients_out = slot.clients
        for attempt in range(1, self.max_retry_times + 2):
            if timer.task.cancelling():     # cancelled, but a workflow swallowed it
                raise asyncio.CancelledError
            # The request prefix is "{batch}/{task}/{run_id_base}/{attempt}", joined only if
            # a request is made.
            parts = (task.batch_id, task.task_id, run_id_base, attempt)
            clients = [ModelClient(slot.engine, loop, task.rollout_args, parts)]
            if slot.aux_engines:
                clients += [ModelClient(e, loop, task.rollout_args, (*parts, f"aux{j}"))
                            for j, e in enumerate(slot.aux_engines)]
            clients_out[:] = clients
            version = slot.engine.model_version
            expired = False
            timer.start(timeout)
            try:
                try:
                    workflow_cls = task.workflow
                    if workflow_cls is None:
                        raise ValueError(f"task {task.task_id} of batch {task.batch_id} has no "
                                         f"workflow")
                    if workflow_cls.can_repeat:
                        # Awaited here, not in a coroutine of its own: the common case of a
                        # fast workflow pays for one coroutine less.
                        workflow = _instance(task, clients, slot.workflow)
                        slot.workflow = None
                        workflow.set_repeat_times(repeat_times, run_id_base)
                        run_start = time.perf_counter()
                        exps = await (workflow.run_async() if workflow.is_async
                                      else self._in_thread(workflow.run))
                        elapsed = time.perf_counter() - run_start
                        if workflow.can_reset:
                            slot.workflow = workflow
                        # One run made every repeat: each experience's metrics are a run's.
                        metrics = [{**exp.metrics, "time/run_execution": elapsed}
                                   for exp in exps if exp.metrics]
                        if keep_experiences:
                            _stamp(task, exps, version, slot.engine.model_version)
                        else:
                            exps = []
                        outcome = Outcome(repeat_times, repeat_times, metrics, None, exps)
                    else:
                        results = await self._attempt(task, repeat_times, slot, clients,
                                                      collect_partial_runs)
                        if slot.engine.is_dead and not any(ok for ok, *_ in results):
                            # Every run failed because the engine died: the handler below
                            # gives the sub-task back, to run again on a live engine.
                            raise EngineDeadError(f"engine {slot.engine_index} died")
                        outcome = _collect(task, repeat_times, run_id_base, results, version,
                                           slot.engine.model_version, keep_experiences)
                finally:
                    expired = timer.stop()
            except asyncio.CancelledError:
                if not expired:
                    raise
                outcome = Outcome(0, repeat_times, [], (
                    f"Timeout ({timeout} s) when running task of batch {task.batch_id} at runner "
                    f"{slot.index} at attempt {attempt}: task {task.task_id}"), [])
            except Exception:
                if slot.engine.is_dead:
                    raise EngineDeadError(f"engine {slot.engine_index} died while running task "
                                          f"{task.task_id} of batch {task.batch_id}") from None
                outcome = Outcome(0, repeat_times, [], traceback.format_exc().rstrip(), [])
            finally:
                clients_out.clear()
                for client in clients:
                    if client.close():
                        await client.abort_all()
            if outcome.error is None or (collect_partial_runs and outcome.completed_runs > 0):
                break
        outcome.elapsed = elapsed = time.perf_counter() - start
        outcome.metrics.append({"time/task_execution": elapsed})
        return outcome

    # -- one attempt of a workflow that is not repeatable ---------------------------------------

    def _attempt(self, task: Task, repeat_times: int, slot: Slot, clients: list[ModelClient],
                 collect_partial: bool) -> Coroutine[Any, Any, list[RunResult]]:
        """The coroutine of one attempt: ``repeat_times`` runs in the configured mode."""
        if self.concurrent_mode == "sequential":
            return self._sequential(task, repeat_times, slot, clients, collect_partial)
        return self._parallel(task, repeat_times, clients, collect_partial)

    async def _sequential(self, task: Task, repeat_times: int, slot: Slot,
                          clients: list[ModelClient], collect_partial: bool) -> list[RunResult]:
        # A resettable instance is taken off the slot while in use: if this attempt is
        # detached, its thread keeps its own instance and the slot starts afresh.
        reusable = slot.workflow
        slot.workflow = None
        if task.workflow.is_async:
            results = []
            for _ in range(repeat_times):
                reusable = _instance(task, clients, reusable)
                results.append(await _run_async(reusable))
                if not results[-1][0] and not collect_partial:
                    break
        else:
            def job() -> tuple[list[RunResult], Workflow | None]:
                workflow, out = reusable, []
                for _ in range(repeat_times):
                    workflow = _instance(task, clients, workflow)
                    out.append(_run_sync(workflow))
                    if not out[-1][0] and not collect_partial:
                        break
                return out, workflow
            results, reusable = await self._in_thread(job)
        if reusable is not None and reusable.can_reset:
            slot.workflow = reusable
        return results

    async def _parallel(self, task: Task, repeat_times: int, clients: list[ModelClient],
                        collect_partial: bool) -> list[RunResult]:
        """"asynchronous" and "multi-threading" modes: isolated instances run concurrently.

        Sync workflows each get a worker thread; async ones run on this loop in both
        modes (a thread adds nothing to a coroutine that awaits the engine).
        """
        workflows = [_instance(task, clients, None) for _ in range(repeat_times)]
        if task.workflow.is_async:
            runs = [asyncio.ensure_future(_run_async(w)) for w in workflows]
        else:
            runs = [asyncio.ensure_future(self._in_thread(lambda w=w: _run_sync(w)))
                    for w in workflows]
        if collect_partial:
            try:
                return list(await asyncio.gather(*runs))
            finally:
                for run in runs:
                    run.cancel()
        results: list[RunResult] = []
        pending = set(runs)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                results.extend(run.result() for run in done)
                if any(not r[0] for r in results):
                    break
        finally:
            for run in pending:
                run.cancel()
        return results

    async def _in_thread(self, fn: Any) -> Any:
        try:
            return await self.pool.run(fn)
        except asyncio.CancelledError:
            # The thread cannot be stopped: it runs on, and its result will be dropped.
            self.detached_runs += 1
            raise


def _instance(task: Task, clients: list[ModelClient], reusable: Workflow | None) -> Workflow:
    """A workflow for ``task``: ``reusable`` reset to it when allowed, else a new instance."""
    if reusable is not None and type(reusable) is task.workflow and reusable.can_reset:
        reusable.model = clients[0]
        reusable.auxiliary_models = clients[1:]
        reusable.reset(task)
        return reusable
    return task.workflow(task=task, model=clients[0], auxiliary_models=clients[1:])


def _collect(task: Task, repeat_times: int, run_id_base: int, results: list[RunResult],
             version_before: int, version_after: int, keep: bool) -> Outcome:
    """The outcome of a non-repeatable workflow's runs: run i of the sub-task is
    ``run_id_base + i``."""
    exps: list[Experience] = []
    metrics: list[dict] = []
    first_error = None
    completed = 0
    for i, (ok, run_exps, run_metrics, error) in enumerate(results):
        if not ok:
            first_error = first_error or error
            continue
        completed += 1
        metrics.extend(run_metrics)
        if keep:
            for exp in run_exps:
                exp.eid.run = run_id_base + i
            exps.extend(run_exps)
    if exps:
        _stamp(task, exps, version_before, version_after)
    return Outcome(completed, repeat_times, metrics, first_error, exps)


def _stamp(task: Task, exps: list[Experience], version_before: int, version_after: int) -> None:
    """Set what the coordinator owns in kept experiences: their batch and task ids (a task id
    set by the workflow stays) and the model version they were sampled with."""
    drift = version_after - version_before
    for exp in exps:
        eid = exp.eid
        eid.batch = task.batch_id
        if eid.task == "":
            eid.task = task.task_id
        info = exp.info
        info["model_version"] = version_before
        info["model_version_drift"] = drift
        info["use_count"] = 0
        info["task_index"] = task.index


def _run_metric(exps: list, elapsed: float) -> dict:
    metric = aggregate_run_level_metrics([exp.metrics for exp in exps if exp.metrics])
    metric["time/run_execution"] = elapsed
    return metric


def _run_sync(workflow: Workflow) -> RunResult:
    start = time.perf_counter()
    try:
        exps = workflow.run()
    except Exception:
        return False, [], [], traceback.format_exc().rstrip()
    return True, exps, [_run_metric(exps, time.perf_counter() - start)], None


async def _run_async(workflow: Workflow) -> RunResult:
    start = time.perf_counter()
    try:
        exps = await workflow.run_async()
    except Exception:
        return False, [], [], traceback.format_exc().rstrip()
    return True, exps, [_run_metric(exps, time.perf_counter() - start)], None
