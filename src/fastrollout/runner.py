"""Runs one attempt of a sub-task: workflow instances, repeats, concurrency modes, and
turning what the workflow returned into an ``Outcome``.

A sub-task is ``repeat_times`` runs of a task starting at ``run_id_base`` (a task split
by ``max_repeat_times_per_runner`` has several). Retries, timeouts and model clients are
the slot worker's (``slot_worker.py``); everything a workflow does, returns or raises
during an attempt is judged here, so that one task's failure stays that task's:
exceptions (``SystemExit`` and ``KeyboardInterrupt`` included) and results that could
not be booked later (experiences the pipeline cannot pack, metric keys that are not
strings) fail the attempt with a message, never the coordinator.
"""
from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ._native.pack import check as check_experiences
from .engines.client import ModelClient
from .errors import EngineDeadError
from .metric_keys import key_type_error
from .metrics import aggregate_run_level_metrics
from .operators import VersionSpan
from .task import Task
from .threads import WorkerPool

if TYPE_CHECKING:
    from .experience import Experience
    from .slot_worker import SlotWorker
    from .workflow import Workflow

# One run's outcome: (ok, experiences, run metrics, error message), for workflows that
# are not repeatable (a repeatable workflow's one run becomes its Outcome directly).
RunResult = tuple[bool, list, list, str | None]


class Outcome:
    """What one sub-task produced: after one attempt, then after all of them."""

    __slots__ = ("completed_runs", "total_runs", "metrics", "error", "experiences", "elapsed",
                 "versions")

    def __init__(self, completed_runs: int, total_runs: int, metrics: list[dict],
                 error: str | None, experiences: list, versions: VersionSpan = None) -> None:
        self.completed_runs = completed_runs
        self.total_runs = total_runs
        self.metrics = metrics
        self.error = error              # the first error, None when every run completed
        self.experiences = experiences
        self.elapsed = 0.0
        self.versions = versions        # the weight versions the experiences were sampled with

    @classmethod
    def failed(cls, total_runs: int, error: str) -> Outcome:
        return cls(0, total_runs, [], error, [])


class Runner:
    """Executes attempts; shared by all slot workers of a coordinator."""

    def __init__(self, *, concurrent_mode: str, pool: WorkerPool) -> None:
        self.concurrent_mode = concurrent_mode
        self.pool = pool
        self.detached_runs = 0      # synchronous runs left behind in their threads

    async def attempt(self, task: Task, repeat_times: int, run_id_base: int,
                      worker: SlotWorker, clients: list[ModelClient], collect_partial: bool,
                      keep_experiences: bool) -> Outcome:
        """One attempt of ``repeat_times`` runs of ``task`` (whose ``rollout_args.n`` is
        already ``repeat_times``). With ``keep_experiences`` false (eval) the experiences
        are dropped unchecked. Raises EngineDeadError when every run failed because the
        worker's engine died (the caller reschedules), CancelledError when cancelled;
        anything else the workflow does is this attempt's outcome."""
        engine = worker.engine
        version = engine.model_version
        try:
            if task.workflow.can_repeat:
                # Awaited here, not in a coroutine of its own: the common case of a fast
                # workflow pays for one coroutine less.
                workflow = _instance(task, clients, worker.workflow)
                worker.workflow = None
                workflow.set_repeat_times(repeat_times, run_id_base)
                run_start = time.perf_counter()
                exps = await (workflow.run_async() if workflow.is_async
                              else self._in_thread(workflow.run))
                elapsed = time.perf_counter() - run_start
                if workflow.can_reset:
                    worker.workflow = workflow
                # One run made every repeat: each experience's metrics are a run's.
                metrics = [_run_metrics(exp.metrics, elapsed) for exp in exps if exp.metrics]
                versions = None
                if keep_experiences:
                    check_experiences(exps)
                    versions = _stamp(task, exps, version, engine.model_version)
                else:
                    exps = []
                return Outcome(repeat_times, repeat_times, metrics, None, exps, versions)
            results = await self._runs(task, repeat_times, worker, clients, collect_partial)
            if engine.is_dead and not any(ok for ok, *_ in results):
                # Every run failed because the engine died: the sub-task runs again elsewhere.
                raise EngineDeadError(f"engine {worker.engine_index} died")
            return _collect(task, repeat_times, run_id_base, results, version,
                            engine.model_version, keep_experiences)
        except (asyncio.CancelledError, EngineDeadError):
            raise
        except BaseException:   # SystemExit and KeyboardInterrupt too: they are the task's
            if engine.is_dead:
                raise EngineDeadError(f"engine {worker.engine_index} died while running task "
                                      f"{task.task_id} of batch {task.batch_id}") from None
            return Outcome.failed(repeat_times, traceback.format_exc().rstrip())

    # -- the runs of a workflow that is not repeatable ------------------------------------------

    def _runs(self, task: Task, repeat_times: int, worker: SlotWorker,
              clients: list[ModelClient],
              collect_partial: bool) -> Coroutine[Any, Any, list[RunResult]]:
        """The coroutine of one attempt's ``repeat_times`` runs, in the configured mode."""
        if self.concurrent_mode == "sequential":
            return self._sequential(task, repeat_times, worker, clients, collect_partial)
        return self._parallel(task, repeat_times, clients, collect_partial)

    async def _sequential(self, task: Task, repeat_times: int, worker: SlotWorker,
                          clients: list[ModelClient], collect_partial: bool) -> list[RunResult]:
        # A resettable instance is taken off the worker while in use: if this attempt is
        # detached, its thread keeps its own instance and the worker starts afresh.
        reusable = worker.workflow
        worker.workflow = None
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
            worker.workflow = reusable
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
            check_experiences(run_exps)
            for exp in run_exps:
                exp.eid.run = run_id_base + i
            exps.extend(run_exps)
    versions = _stamp(task, exps, version_before, version_after) if exps else None
    return Outcome(completed, repeat_times, metrics, first_error, exps, versions)


def _stamp(task: Task, exps: list[Experience], version_before: int,
           version_after: int) -> VersionSpan:
    """Set what the coordinator owns in kept experiences (checked by ``check_experiences``
    first: one the pipeline cannot pack fails its attempt, not the batch it would be packed
    with): their batch and task ids (a task id set by the workflow stays) and the model
    version they were sampled with."""
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
    return (version_before, version_before, drift)


def _run_metrics(metrics: dict, elapsed: float) -> dict:
    """One run's metrics dict of a repeatable workflow (an experience's own), with its time.
    Keys must be strings: they become metric names."""
    for key in metrics:
        if type(key) is not str:
            raise key_type_error(key)
    return {**metrics, "time/run_execution": elapsed}


def _run_metric(exps: list, elapsed: float) -> dict:
    metric = aggregate_run_level_metrics([exp.metrics for exp in exps if exp.metrics])
    metric["time/run_execution"] = elapsed
    return metric


def _run_sync(workflow: Workflow) -> RunResult:
    start = time.perf_counter()
    try:
        exps = workflow.run()
        return True, exps, [_run_metric(exps, time.perf_counter() - start)], None
    except BaseException:   # SystemExit and KeyboardInterrupt too: the run failed, no more
        return False, [], [], traceback.format_exc().rstrip()


async def _run_async(workflow: Workflow) -> RunResult:
    start = time.perf_counter()
    try:
        exps = await workflow.run_async()
        return True, exps, [_run_metric(exps, time.perf_counter() - start)], None
    except asyncio.CancelledError:
        raise
    except BaseException:   # SystemExit and KeyboardInterrupt too: the run failed, no more
        return False, [], [], traceback.format_exc().rstrip()
