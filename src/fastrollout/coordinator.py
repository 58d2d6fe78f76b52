"""RolloutCoordinator: Trinity's batch API (submit / finalize / abort) without polling.

Each task's result is booked the moment it completes: its status joins the batch,
its experiences are staged in the pipeline, and a finalize waiting for that count
wakes at once. A finalize that times out loses nothing; aborting cancels the
engine requests of unfinished runs.
"""
from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import operator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from .config import Config
from .experience import decode_payloads
from .metrics import MetricTally
from .pipeline import ExperiencePipeline
from .runner import Runner
from .scheduler import BatchRun, Scheduler, TaskRecord
from .task import Task
from .threads import WorkerPool

if TYPE_CHECKING:
    from .engines.base import InferenceModel
    from .experience import ExperienceBatch
    from .task import Status

logger = logging.getLogger(__name__)

# How long cancelled work may take to unwind (engine aborts included) before it is
# left behind and counted as detached.
CANCEL_GRACE = 2.0

BatchId = int | str


class BatchLifecycleState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINALIZING = "finalizing"
    FINALIZED = "finalized"
    ABORTED = "aborted"


@dataclass
class BatchState:
    """One submitted batch as the caller sees it; ``statuses`` fill in as tasks finish."""

    batch_id: BatchId
    batch_type: Literal["train", "eval"]
    expected_task_count: int
    statuses: dict[int | str, Status] = field(default_factory=dict)
    min_wait_num: int | None = None
    state: BatchLifecycleState = BatchLifecycleState.PENDING
    final_result: dict | None = None
    finalize_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Wake-up of a waiting finalize: set when statuses reach _target, or on abort/fatal error.
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _target: int | None = field(default=None, repr=False)
    _run: BatchRun | None = field(default=None, repr=False)
    # Batch-level metrics kept current as tasks finish, so finalize costs O(keys).
    _tally: MetricTally = field(default_factory=MetricTally, repr=False)

    @property
    def completed_task_count(self) -> int:
        return len(self.statuses)


_DONE = (BatchLifecycleState.FINALIZED, BatchLifecycleState.ABORTED)


_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Once per process, at the first prepare(): what exists then (modules, torch, engines,
    tokenizers) lives as long as the process. Frozen, it is no longer re-walked by every full
    collection: with torch and vLLM loaded one walk costs ~0.3 s, and the garbage of a
    4096-task batch triggers one. vLLM's engine core freezes its heap after start-up too.
    Only once, so that objects of later coordinators stay collectable."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def _check_tasks(batch_id: BatchId, tasks: list) -> None:
    for i, task in enumerate(tasks):
        if type(task) is Task and type(task.repeat_times) is int and task.repeat_times >= 1:
            continue    # the common case: two thirds of the time of the checks below
        if not isinstance(task, Task):
            raise TypeError(f"task {i} of batch {batch_id}: expected a fastrollout.Task, "
                            f"got {type(task).__name__}")
        repeat = task.repeat_times
        try:
            ok = not isinstance(repeat, bool) and operator.index(repeat) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"task {i} of batch {batch_id}: repeat_times must be a positive "
                             f"int, got {repeat!r}")


class RolloutCoordinator:
    """Schedules batches of tasks onto engines and returns their aggregated metrics.

    The engines belong to the caller: ``prepare()`` prepares them, ``shutdown()``
    aborts this coordinator's requests on them but leaves them running.
    """

    def __init__(self, config: Config, rollout_model: list[InferenceModel],
                 auxiliary_models: list[list[InferenceModel]] | None = None) -> None:
        self.config = config.validate()   # a Config built in Python is not checked by msgspec
        self.rollout_model = list(rollout_model)
        self.auxiliary_models = [list(m) for m in auxiliary_models or []]
        self.pending_batches: dict[BatchId, BatchState] = {}
        self._scheduler: Scheduler | None = None
        self._pipeline: ExperiencePipeline | None = None
        self._pool: WorkerPool | None = None
        self._fatal: BaseException | None = None
        self.detached_tasks = 0     # cancelled work that ignored cancellation (left behind)

    # -- lifecycle ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        if self._scheduler is not None:
            return
        engines = self.rollout_model + [e for models in self.auxiliary_models for e in models]
        await asyncio.gather(*(e.prepare() for e in {id(e): e for e in engines}.values()))
        _freeze_startup_heap()
        explorer = self.config.explorer
        self._pool = WorkerPool()
        runner = Runner(concurrent_mode=explorer.concurrent_mode,
                        max_retry_times=explorer.max_retry_times, pool=self._pool)
        self._scheduler = Scheduler(explorer, self.rollout_model, self.auxiliary_models, runner,
                                    on_fatal=self._on_fatal)
        self._pipeline = ExperiencePipeline(self.config.pipeline)
        self._fatal = None

    async def shutdown(self) -> None:
        """Cancel all in-flight work (aborting its engine requests) within a bounded time."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        waits = []
        for state in list(self.pending_batches.values()):
            waits += self._close_unfinished(state, keep_partial=False)
            self._conclude(state, BatchLifecycleState.ABORTED, {})
        scheduler.close()
        self._scheduler = None
        await self._settle(waits)
        self._pool.close()
        self._pool = None
        self._pipeline = None

    @property
    def detached_runs(self) -> int:
        """Synchronous workflow runs that overran their timeout and were left in their thread."""
        return self._scheduler.runner.detached_runs if self._scheduler else 0

    # -- batches ------------------------------------------------------------------------------

    async def submit_batch(self, *, batch_id: BatchId, tasks: list[Task],
                           batch_type: Literal["train", "eval"],
                           min_wait_num: int | None = None) -> None:
        scheduler = self._require()
        if batch_type not in ("train", "eval"):
            raise ValueError(f"batch_type must be 'train' or 'eval', got {batch_type!r}")
        existing = self.pending_batches.get(batch_id)
        if existing is not None and existing.state not in _DONE:
            raise ValueError(f"Batch {batch_id} is already active.")
        tasks = list(tasks)
        _check_tasks(batch_id, tasks)   # the scheduler reads a task only when it starts
        state = BatchState(batch_id=batch_id, batch_type=batch_type,
                           expected_task_count=len(tasks), min_wait_num=min_wait_num)
        state._run = scheduler.new_batch(batch_id, batch_type == "eval",
                                         functools.partial(self._book, state))
        self.pending_batches[batch_id] = state
        if tasks:
            state.state = BatchLifecycleState.RUNNING
            scheduler.submit(state._run, tasks)

    async def finalize_train_batch(self, batch_id: int, *, timeout: float | None = None) -> dict:
        return await self._finalize(self._get_batch_state(batch_id, "train"), timeout)

    async def finalize_eval_batch(self, batch_id: str, *, timeout: float | None = None) -> dict:
        return await self._finalize(self._get_batch_state(batch_id, "eval"), timeout)

    async def abort_batch(self, batch_id: BatchId, *, reason: str,
                          keep_partial_results: bool = False) -> None:
        self._require()
        state = self.pending_batches.get(batch_id)
        if state is None or state.state in _DONE:
            return
        logger.warning("Abort batch %s: %s", batch_id, reason)
        waits = self._close_unfinished(state, keep_partial=keep_partial_results)
        if keep_partial_results:
            metrics = self._commit(state)
        else:
            state.statuses.clear()
            state._tally = MetricTally()
            self._pipeline.discard(batch_id)
            metrics = {}
        self._conclude(state, BatchLifecycleState.ABORTED, metrics)
        await self._settle(waits)

    async def process_experiences(self, payloads: list[bytes]) -> dict:
        """Decode payloads (ours or Trinity's TRXP) and run them through the pipeline."""
        self._require()
        return self._pipeline.process(decode_payloads(payloads))

    def take_experiences(self, batch_id: BatchId) -> ExperienceBatch | None:
        """The finalized experiences of a train batch, handed over once (None if none)."""
        self._require()
        return self._pipeline.take(batch_id)

    @classmethod
    def get_actor(cls, config: Config, models: list, auxiliary_models: list | None = None) -> Any:
        """This coordinator as a Ray actor, for explorers that already run on Ray."""
        try:
            import ray
        except ImportError as exc:
            raise ImportError("RolloutCoordinator.get_actor needs Ray: "
                              "pip install 'fastrollout[ray]'") from exc
        return ray.remote(cls).remote(config, models, auxiliary_models)

    # -- internals ----------------------------------------------------------------------------

    def _require(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("RolloutCoordinator is not prepared: await coordinator.prepare() first")
        return self._scheduler

    def _get_batch_state(self, batch_id: BatchId, expected_type: str) -> BatchState:
        self._require()
        state = self.pending_batches.get(batch_id)
        if state is None:
            raise KeyError(f"Batch {batch_id} is not registered.")
        if state.batch_type != expected_type:
            raise ValueError(f"Batch {batch_id} is {state.batch_type}, expected {expected_type}.")
        return state

    def _book(self, state: BatchState, record: TaskRecord) -> None:
        """A task reached a final status (or is kept as a partial result)."""
        status = record.status()
        state.statuses[record.task_id] = status
        state._tally.add(status.metrics[0])
        if record.experiences:
            self._pipeline.stage(state.batch_id, record.experiences)
            record.experiences = ()
        if state._target is not None and len(state.statuses) >= state._target:
            state._wake.set()

    def _on_fatal(self, error: BaseException) -> None:
        """Background failure (all engines dead, internal error): every waiter gets it now."""
        logger.error("rollout coordinator failure: %s", error)
        self._fatal = error
        for state in self.pending_batches.values():
            state._wake.set()

    async def _wait_for(self, state: BatchState, target: int, timeout: float) -> bool:
        """Wait until ``target`` tasks of the batch are booked; False at the timeout."""
        if len(state.statuses) >= target:
            return True
        # The deadline only wakes the waiter (cheaper than asyncio.timeout on the path
        # between the last task and finalize returning).
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            state._wake.set()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        timer = loop.call_at(deadline, expire) if math.isfinite(deadline) else None
        state._target = target
        try:
            while len(state.statuses) < target and self._fatal is None \
                    and state.state not in _DONE:
                if expired:
                    return False
                state._wake.clear()
                await state._wake.wait()
            return True
        finally:
            state._target = None
            if timer is not None:
                timer.cancel()

    async def _finalize(self, state: BatchState, timeout: float | None) -> dict:
        async with state.finalize_lock:
            if state.final_result is not None:
                return dict(state.final_result)
            explorer = self.config.explorer
            if timeout is None:
                timeout = self.config.finalize_timeout
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            expected = state.expected_task_count
            target = expected if state.min_wait_num is None else min(state.min_wait_num, expected)
            reached = await self._wait_for(state, target, timeout)
            if reached and len(state.statuses) < expected and self._fatal is None:
                # Over-rollout: keep collecting a while after min_wait_num is reached.
                wait_more = min(explorer.over_rollout.wait_after_min, deadline - loop.time())
                await self._wait_for(state, expected, max(wait_more, 0.0))
            if state.final_result is not None:          # aborted while we waited
                return dict(state.final_result)
            if self._fatal is not None:
                raise self._fatal
            done = len(state.statuses)
            if state.batch_type == "train" and expected and (done == 0 or done < target):
                # Nothing is lost: results stay booked for a later finalize or abort.
                raise TimeoutError(f"Timeout waiting for batch {state.batch_id}.")
            state.state = BatchLifecycleState.FINALIZING
            waits = []
            if done < expected:
                waits = self._close_unfinished(
                    state, keep_partial=explorer.over_rollout.return_partial_tasks)
            elif state.batch_type == "train":
                self._scheduler.completed_steps += 1   # a full train step (dynamic timeout)
            try:
                metrics = self._commit(state)
            except Exception:
                state.state = BatchLifecycleState.RUNNING   # results stay for a later try
                raise
            result = self._conclude(state, BatchLifecycleState.FINALIZED, metrics)
            await self._settle(waits)
            return result

    def _close_unfinished(self, state: BatchState, *, keep_partial: bool) -> list:
        partial, waits = self._scheduler.cancel_batch(state._run)
        if keep_partial:
            for record in partial:
                self._book(state, record)
        return waits

    def _commit(self, state: BatchState) -> dict:
        return self._pipeline.commit(state.batch_id) if state.batch_type == "train" else {}

    def _conclude(self, state: BatchState, final: BatchLifecycleState, pipeline_metrics: dict) -> dict:
        """Record the result, forget the batch, and wake anyone still waiting on it."""
        state.state = final
        state.final_result = self._result(state, pipeline_metrics)
        if self.pending_batches.get(state.batch_id) is state:
            del self.pending_batches[state.batch_id]
        self._scheduler.release_batch(state._run)
        state._wake.set()
        return dict(state.final_result)

    def _result(self, state: BatchState, pipeline_metrics: dict) -> dict:
        metrics = dict(pipeline_metrics)
        count = state.completed_task_count
        if state.batch_type == "train":
            metrics.update(state._tally.summary("rollout"))
            metrics["rollout/finished_task_count"] = float(count)
        else:
            name = str(state.batch_id)
            prefix = f"eval/{name.split('/', 1)[1] if '/' in name else name}"
            detailed = self.config.monitor.detailed_stats
            metrics.update(state._tally.summary(prefix, detailed, ("mean", "max", "min", "std")))
            metrics[f"{prefix}/finished_task_count"] = float(count)
        return {"batch_id": state.batch_id, "batch_type": state.batch_type,
                "finished_task_count": count, "metrics": metrics}

    async def _settle(self, waits: list) -> None:
        """Give cancelled work a bounded time to unwind; what is left is detached."""
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=CANCEL_GRACE)
        if pending:
            self.detached_tasks += len(pending)
            logger.warning("%d cancelled task(s) ignored cancellation; detached", len(pending))
