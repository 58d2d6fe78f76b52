"""Runs attempts of Trinity tasks: Trinity's workflows over a slot's own model wrappers.

fastrollout's scheduler and slot workers schedule, time out, retry, split and book the
attempts; what one attempt does follows Trinity 0.6.0's ``WorkflowRunner.run_task``:
repeatable workflows make all runs in one ``run()``, the others run per repeat in the
configured ``concurrent_mode``; runs clean the wrapper's workflow state first and update
the slot's runner state; experiences get their batch and task ids, ``model_version``,
``model_version_drift``, ``use_count`` and ``task_index``; eval tasks keep none.

Differences, because every slot shares this one process: synchronous workflows run in
worker threads (a Trinity runner actor runs them on its own event loop), and each attempt
gets a deep copy of its task (what a runner actor receives over Ray), so that a workflow
that edits its task (``MathWorkflow`` sets ``format_args.system_prompt``) edits its own.
"""
from __future__ import annotations

import asyncio
import copy
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...runner import Outcome, Runner
from ...task import Task
from .models import EngineRef, SlotModels

if TYPE_CHECKING:
    from ...engines.client import ModelClient
    from ...slot_worker import SlotWorker
    from ...threads import WorkerPool

# (ok, experiences, run metrics or None, error message): one run of a non-repeatable workflow.
RunResult = tuple[bool, list, "dict | None", "str | None"]


@dataclass
class TrinityTask(Task):
    """A Trinity ``Task`` as fastrollout's scheduler carries it (the scheduler reads
    ``repeat_times`` and ``is_eval``; the attempt runs ``trinity``)."""

    trinity: Any = None

    @classmethod
    def of(cls, task: Any) -> TrinityTask:
        return cls(workflow=task.workflow, repeat_times=task.repeat_times, is_eval=task.is_eval,
                   trinity=task)


def attempt_task(task: TrinityTask, repeat_times: int) -> Any:
    """The Trinity task one attempt runs: a deep copy with its batch and task ids, and
    ``rollout_args.n`` set to the attempt's runs."""
    view = copy.deepcopy(task.trinity)
    view.batch_id = task.batch_id
    view.task_id = task.task_id
    view.rollout_args.n = repeat_times
    return view


class TrinityRunner(Runner):
    """Executes attempts of ``TrinityTask``s; shared by all slot workers of a coordinator."""

    def __init__(self, *, concurrent_mode: str, pool: WorkerPool, enable_history: bool) -> None:
        super().__init__(concurrent_mode=concurrent_mode, pool=pool)
        self.enable_history = enable_history
        self.slots: list[SlotModels] = []
        from trinity.utils.metrics import aggregate_run_level_metrics
        self._run_level = aggregate_run_level_metrics

    async def prepare(self, slot_count: int, engines: list[EngineRef],
                      auxiliary: list[list[EngineRef]]) -> None:
        """One ``SlotModels`` per slot, bound as the scheduler binds slots (slot i: engine
        ``i % E``, auxiliary engine ``i % len(aux[j])``), prepared as Trinity's runners are."""
        self.slots = [SlotModels(i, engines[i % len(engines)],
                                 [models[i % len(models)] for models in auxiliary], None)
                      for i in range(slot_count)]
        await asyncio.gather(*(slot.prepare() for slot in self.slots))
        # Fresh wrappers of a slot (after a cancelled attempt) need not ask for it again.
        for slot in self.slots:
            for engine, wrapper in zip((slot.engine, *slot.aux_engines),
                                       (slot.model, *slot.auxiliary), strict=True):
                engine.api_address = engine.api_address or wrapper.api_address

    async def close(self) -> None:
        """Shutdown: close the OpenAI clients the slots' workflows opened."""
        for slot in self.slots:
            await slot.close()

    def _claim(self, worker: SlotWorker) -> SlotModels:
        """The slot's models for ``worker``: fresh ones when the slot got a new worker (its
        last one was detached and may still be unwinding on the old wrappers)."""
        slot = self.slots[worker.index]
        if slot.owner is not worker:
            if slot.owner is not None:
                slot = self.slots[worker.index] = slot.fresh()
            slot.owner = worker
        return slot

    def _retire(self, slot: SlotModels) -> None:
        """A cancelled attempt may leave a thread on ``slot``'s wrappers: the slot's next
        attempt gets fresh ones (Trinity restarts the runner actor)."""
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = slot.fresh()

    async def attempt(self, task: Task, repeat_times: int, run_id_base: int,
                      worker: SlotWorker, clients: list[ModelClient], collect_partial: bool,
                      keep_experiences: bool) -> Outcome:
        """One attempt of ``repeat_times`` runs of the Trinity task ``task`` carries.
        Cancellation (timeout, abort, shutdown) cancels the attempt's engine calls."""
        assert isinstance(task, TrinityTask)
        slot = self._claim(worker)
        try:
            return await self._run_task(slot, attempt_task(task, repeat_times), repeat_times,
                                        run_id_base, collect_partial, keep_experiences)
        except asyncio.CancelledError:
            self._retire(slot)
            await slot.cancel()
            raise
        finally:
            slot.inflight.clear()   # finished calls: their results need no pinning

    async def _run_task(self, slot: SlotModels, task: Any, repeat_times: int, run_id_base: int,
                        collect_partial: bool, keep: bool) -> Outcome:
        start = time.time()
        model = slot.model
        # The weight version before the run is read while the run goes on: the read is sent
        # first (the engine gets it before the run's requests), and the run does not wait the
        # round trip for its answer.
        before: asyncio.Future[int] | None = None
        try:
            before = asyncio.ensure_future(_noted_version(
                slot, model.model.get_model_version.remote()))
            if task.workflow.can_repeat:
                completed, metrics, exps, error = await self._repeatable(
                    slot, task, repeat_times, run_id_base)
            else:
                completed, metrics, exps, error = await self._runs(
                    slot, task, repeat_times, run_id_base, collect_partial)
            version = await before
            version_after = await model.model_version_async
            slot.engine.model_version = version_after
            if completed > 0 and not exps:
                raise AssertionError("An empty experience is generated")
        except asyncio.CancelledError:
            raise
        except BaseException:   # SystemExit and KeyboardInterrupt too: they are the task's
            return Outcome(0, repeat_times, [{"time/run_execution": time.time() - start}],
                           traceback.format_exc().rstrip(), [])
        finally:
            if before is not None and not before.done():
                before.cancel()
            elif before is not None and not before.cancelled():
                before.exception()  # retrieved: a failed read is reported by the await above
        if not keep:
            return Outcome(completed, repeat_times, metrics, error, [])
        for exp in exps:
            eid = exp.eid
            eid.batch = task.batch_id
            if eid.task == "":      # a task id set by the workflow stays
                eid.task = task.task_id
            if exp.info is None:
                exp.info = {}
            exp.info["model_version"] = version
            exp.info["model_version_drift"] = version_after - version
            exp.info["use_count"] = 0
            exp.info["task_index"] = task.index
            if exp.metrics is None:
                exp.metrics = {}
        return Outcome(completed, repeat_times, metrics, error, exps)

    # -- workflow instances --------------------------------------------------------------------

    @staticmethod
    def _instance(slot: SlotModels, task: Any) -> Any:
        """The slot's kept workflow reset to ``task`` when it is resettable and of the task's
        class (taken off the slot while in use), else a new one."""
        workflow, slot.workflow = slot.workflow, None
        if workflow is not None and type(workflow) is task.workflow and workflow.can_reset:
            workflow.reset(task)
            return workflow
        return task.to_workflow(slot.model, slot.auxiliary)

    def _isolated(self, slot: SlotModels, task: Any) -> Any:
        """A workflow of its own for one of several concurrent runs."""
        model = slot.model.clone_with_isolated_history() if self.enable_history else slot.model
        return task.to_workflow(model, slot.auxiliary)

    async def _make_and_run(self, task: Any, make: Any) -> tuple[Any, list]:
        """Build ``make()``'s workflow and run it: on the loop if it is async, else both in a
        worker thread (a synchronous workflow's constructor may block too)."""
        if task.workflow.is_async:
            workflow = make()
            return workflow, await workflow.run_async()
        return await self._in_thread(lambda: _made_and_run(make))

    @staticmethod
    async def _begin(slot: SlotModels, workflow_id: str) -> float:
        start = time.time()
        await slot.model.clean_workflow_state()
        slot.state["workflow_id"] = workflow_id
        slot.state["terminate_time"] = None
        slot.state["begin_time"] = start
        return start

    # -- repeatable workflows: one run makes every repeat ------------------------------------

    async def _repeatable(self, slot: SlotModels, task: Any, repeat_times: int,
                          run_id_base: int) -> tuple[int, list, list, str | None]:
        start = await self._begin(slot, f"{task.batch_id}/{task.task_id}/{run_id_base}")

        def make() -> Any:
            workflow = self._instance(slot, task)
            workflow.set_repeat_times(repeat_times, run_id_base)
            return workflow

        workflow, exps = await self._make_and_run(task, make)
        end = time.time()
        slot.state["terminate_time"] = end
        if workflow.can_reset:
            slot.workflow = workflow
        # One run made every repeat: each experience's metrics are a run's.
        metrics = [exp.metrics for exp in exps if exp.metrics]
        for metric in metrics:
            metric["time/run_execution"] = end - start
        return repeat_times, metrics, exps, None

    # -- other workflows: a run per repeat -----------------------------------------------------

    async def _runs(self, slot: SlotModels, task: Any, repeat_times: int, run_id_base: int,
                    collect_partial: bool) -> tuple[int, list, list, str | None]:
        mode = self.concurrent_mode
        if mode == "sequential":
            results = []
            for i in range(repeat_times):
                results.append(await self._single(slot, task, i, run_id_base,
                                                  lambda: self._instance(slot, task), True))
                if not results[-1][0] and not collect_partial:
                    break
        else:
            results = await self._parallel(slot, task, repeat_times, run_id_base,
                                           collect_partial, threads=mode == "multi-threading")
        exps: list = []
        metrics: list[dict] = []
        first_error = None
        for ok, run_exps, run_metric, error in results:
            if ok:
                exps.extend(run_exps)
                metrics.append(run_metric)
            elif first_error is None:
                first_error = error
        return len(metrics), metrics, exps, first_error

    async def _parallel(self, slot: SlotModels, task: Any, repeat_times: int, run_id_base: int,
                        collect_partial: bool, *, threads: bool) -> list[RunResult]:
        """Isolated instances run concurrently: synchronous workflows each in a thread;
        asynchronous ones on this loop, or with ``multi-threading`` each in a thread with an
        event loop of its own (as Trinity runs them)."""
        def single(i: int) -> Any:
            return self._single(slot, task, i, run_id_base,
                                lambda: self._isolated(slot, task), False)

        if threads and task.workflow.is_async:
            runs = [asyncio.ensure_future(self._in_thread(lambda i=i: asyncio.run(single(i))))
                    for i in range(repeat_times)]
        else:
            runs = [asyncio.ensure_future(single(i)) for i in range(repeat_times)]
        results: list[RunResult] = []
        pending = set(runs)
        try:
            if collect_partial:
                return list(await asyncio.gather(*runs))
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                results.extend(run.result() for run in done)
                if any(not ok for ok, *_ in results):
                    break
            return results
        finally:
            for run in pending:
                run.cancel()

    async def _single(self, slot: SlotModels, task: Any, index: int, run_id_base: int,
                      make: Any, keep: bool) -> RunResult:
        """One run; ``make()`` gives its workflow (``keep``: the slot may keep it for reuse)."""
        start = await self._begin(slot, f"{task.batch_id}/{task.task_id}/{index}")
        try:
            workflow, exps = await self._make_and_run(task, make)
            end = time.time()
        except asyncio.CancelledError:
            raise
        except BaseException:   # SystemExit and KeyboardInterrupt too: the run failed, no more
            slot.state["terminate_time"] = time.time()
            return False, [], None, traceback.format_exc().rstrip()
        slot.state["terminate_time"] = end
        if keep and workflow.can_reset:
            slot.workflow = workflow
        metric = self._run_level([exp.metrics for exp in exps if exp.metrics])
        metric["time/run_execution"] = end - start
        for exp in exps:
            exp.eid.run = run_id_base + index
        return True, exps, metric, None


async def _noted_version(slot: SlotModels, read: Any) -> int:
    """The weight version ``read`` (an engine call) returns, noted in the slot's runner state
    as Trinity's runner notes it when an attempt starts."""
    version: int = await read
    slot.state["model_version"] = version
    return version


def _made_and_run(make: Any) -> tuple[Any, list]:
    """In a worker thread: build a synchronous workflow (its constructor may block, e.g. on
    ``get_openai_client``) and run it."""
    workflow = make()
    return workflow, workflow.run()
