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
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

# `as`: re-exported (``fastrollout.BatchProgress`` is read from this module).
from ._native.ledger import BatchProgress as BatchProgress
from ._native.tally import MetricTally
from .config import Config
from .experience import decode_payloads
from .pipeline import ExperiencePipeline
from .runner import Runner
from .scheduler import BatchRun, Scheduler, TaskRecord
from .task import MAX_REPEAT_TIMES, Task
from .threads import WorkerPool

if TYPE_CHECKING:
    from .engines.base import InferenceModel
    from .experience import ExperienceBatch
    from .sinks import Sink
    from .task import Status

logger = logging.getLogger(__name__)

# How long cancelled work may take to unwind (engine aborts included) before it is
# left behind and counted as detached.
CANCEL_GRACE = 2.0
# process_experiences decodes payloads larger than this in a worker thread, off the loop.
OFF_LOOP_BYTES = 1 << 20

BatchId = int | str

_NOT_PREPARED = "RolloutCoordinator is not prepared: await coordinator.prepare() first"


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
    final_result: dict[str, Any] | None = None
    finalize_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Wake-up of a waiting finalize: set when statuses reach _target, or on abort/fatal error.
    _wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _target: int | None = field(default=None, repr=False)
    # Set by submit_batch right after construction (its callback needs this state).
    _run: BatchRun = field(init=False, repr=False)
    # Batch-level metrics kept current as tasks finish, so finalize costs O(keys).
    _tally: MetricTally = field(default_factory=MetricTally, repr=False)

    @property
    def completed_task_count(self) -> int:
        return len(self.statuses)


_DONE = (BatchLifecycleState.FINALIZED, BatchLifecycleState.ABORTED)


_heap_frozen = False


def _freeze_startup_heap() -> None:
    """Once per process (``Config.freeze_heap``): what exists at the first prepare()
    (modules, torch, engines, tokenizers) is moved out of the collector's sight, so that
    full collections, which the garbage of a large batch triggers, stop re-walking it (with
    torch and vLLM loaded one walk costs ~0.3 s). Opt-in: anything of the caller's alive
    then is never collected after it dies, if it is part of a cycle."""
    global _heap_frozen
    if not _heap_frozen:
        _heap_frozen = True
        gc.collect()
        gc.freeze()


def _nbytes(payload: Any) -> int:
    """A payload's size in bytes (0 for what is no buffer: the decoder refuses it)."""
    try:
        return memoryview(payload).nbytes
    except TypeError:
        return 0


def _check_batch_id(batch_id: Any) -> BatchId:
    """An int (numpy ints count, as ints) or a str; anything else raises here, before
    anything is registered."""
    if isinstance(batch_id, str):
        return batch_id
    if not isinstance(batch_id, bool):
        try:
            return operator.index(batch_id)
        except TypeError:
            pass
    raise TypeError(f"batch_id must be an int or a str, got {type(batch_id).__name__} "
                    f"{batch_id!r:.60}")


def _check_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be None or a number of seconds >= 0, got {timeout!r}")
    return float(timeout)


def _check_min_wait_num(min_wait_num: Any) -> int | None:
    if min_wait_num is None:
        return None
    try:
        value = None if isinstance(min_wait_num, bool) else operator.index(min_wait_num)
    except TypeError:
        value = None
    if value is None or value < 1:
        raise ValueError(f"min_wait_num must be None or a positive int, got {min_wait_num!r}")
    return value


def _check_tasks(batch_id: BatchId, tasks: Sequence[object]) -> None:
    for i, task in enumerate(tasks):
        repeat = task.repeat_times if type(task) is Task else None
        if type(repeat) is int and 1 <= repeat <= MAX_REPEAT_TIMES:
            continue    # the common case: two thirds of the time of the checks below
        if not isinstance(task, Task):
            raise TypeError(f"task {i} of batch {batch_id}: expected a fastrollout.Task, "
                            f"got {type(task).__name__}")
        repeat = task.repeat_times
        try:
            ok = not isinstance(repeat, bool) and 1 <= operator.index(repeat) <= MAX_REPEAT_TIMES
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"task {i} of batch {batch_id}: repeat_times must be an int from 1 "
                             f"to {MAX_REPEAT_TIMES}, got {repeat!r}")


class RolloutCoordinator:
    """Schedules batches of tasks onto engines and returns their aggregated metrics.

    The engines belong to the caller: ``prepare()`` prepares them, ``shutdown()``
    aborts this coordinator's requests on them but leaves them running.

    ``config.mode`` has Trinity's meaning: ``bench`` runs no experience pipeline (train
    experiences are dropped, ``process_experiences`` refuses), ``serve`` runs no
    scheduler (only ``process_experiences``); ``both``, ``explore``, ``train`` and
    ``colocate`` run both.
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
        self._prepared = False
        self.detached_tasks = 0     # cancelled work that ignored cancellation (left behind)

    # -- lifecycle ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        if self._prepared:
            return
        mode = self.config.mode
        engines = [] if mode == "serve" else \
            self.rollout_model + [e for models in self.auxiliary_models for e in models]
        await asyncio.gather(*(e.prepare() for e in {id(e): e for e in engines}.values()))
        if self.config.freeze_heap:
            _freeze_startup_heap()
        if mode != "serve":
            self._pool = WorkerPool()
            self._scheduler = Scheduler(self.config.explorer, self.rollout_model,
                                        self.auxiliary_models, self._new_runner(self._pool),
                                        on_engines_dead=self._wake_all)
        if mode != "bench":
            self._pipeline = self._new_pipeline()
        self._prepared = True

    # What runs attempts and where finished experiences go: the Trinity facade
    # (``compat/trinity``) runs Trinity's workflows and pipeline on this same coordinator.
    def _new_runner(self, pool: WorkerPool) -> Runner:
        return Runner(concurrent_mode=self.config.explorer.concurrent_mode, pool=pool)

    def _new_pipeline(self) -> ExperiencePipeline:
        return ExperiencePipeline(self.config.pipeline)

    async def shutdown(self) -> None:
        """Cancel all in-flight work (aborting its engine requests) within a bounded time.
        Always completes: a failure on the way is logged and the rest still runs."""
        if not self._prepared:
            return
        self._prepared = False
        scheduler, self._scheduler = self._scheduler, None
        waits: list[asyncio.Future[Any]] = []
        for state in list(self.pending_batches.values()):
            try:
                if scheduler is not None:
                    waits += scheduler.cancel_batch(state._run, keep_partial=False)
                    scheduler.release_batch(state._run)
            except Exception:
                logger.exception("shutdown: cancelling batch %s failed", state.batch_id)
            self._end(state, BatchLifecycleState.ABORTED, {})
        self.pending_batches.clear()
        if scheduler is not None:
            scheduler.close()
        await self._settle(waits)
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    @property
    def model_version(self) -> int:
        """The rollout engines' weight version (the newest, should they disagree)."""
        return max(engine.model_version for engine in self.rollout_model)

    async def update_weights(self, checkpoint: str | os.PathLike[str]) -> int:
        """Load the checkpoint folder ``checkpoint`` into every rollout engine at once and
        return the new ``model_version``. Requests running meanwhile go as
        ``config.weight_sync.mode`` says (``wait``: they finish on the old weights, so no
        request straddles two versions). Experiences record the version they were sampled
        with (``info["model_version"]``) and how far it moved during their attempt
        (``info["model_version_drift"]``)."""
        if not self._prepared:
            raise RuntimeError(_NOT_PREPARED)
        mode = self.config.weight_sync.mode
        # Optional in InferenceModel: every engine must have it before any is updated.
        updates: list[Callable[..., Awaitable[int]]] = []
        for i, engine in enumerate(self.rollout_model):
            update = getattr(engine, "update_weights", None)
            if not callable(update):
                raise TypeError(f"rollout engine {i} ({type(engine).__name__}) has no "
                                f"update_weights(path, *, mode)")
            updates.append(update)
        versions = await asyncio.gather(*(update(checkpoint, mode=mode) for update in updates))
        if len(set(versions)) > 1:
            logger.warning("rollout engines report different weight versions after the update: "
                           "%s", versions)
        return max(versions)

    async def restart_engine(self, index: int) -> None:
        """Restart rollout engine ``index`` (one with ``restart()``, as ``RayEngine``: a
        fresh actor on the same resources) and give its slots work again at once. Where the
        coordinator is a Ray actor, its copies of the engines live in it: restart them here."""
        if not self._prepared:
            raise RuntimeError(_NOT_PREPARED)
        if not 0 <= index < len(self.rollout_model):
            raise IndexError(f"restart_engine: no rollout engine {index} (there are "
                             f"{len(self.rollout_model)})")
        engine = self.rollout_model[index]
        restart = getattr(engine, "restart", None)
        if not callable(restart):
            raise TypeError(f"rollout engine {index} ({type(engine).__name__}) has no restart()")
        await restart()
        if self._scheduler is not None:
            self._scheduler.dead_error()    # revives the slots of engines alive again

    def _current_version(self) -> int | None:
        return self.model_version if self.rollout_model else None

    @property
    def detached_runs(self) -> int:
        """Synchronous workflow runs that overran their timeout and were left in their thread."""
        return self._scheduler.runner.detached_runs if self._scheduler else 0

    # -- batches ------------------------------------------------------------------------------

    async def submit_batch(self, *, batch_id: BatchId, tasks: list[Task],
                           batch_type: Literal["train", "eval"],
                           min_wait_num: int | None = None) -> None:
        scheduler = self._require_scheduler()
        batch_id = _check_batch_id(batch_id)
        if batch_type not in ("train", "eval"):
            raise ValueError(f"batch_type must be 'train' or 'eval', got {batch_type!r}")
        min_wait_num = _check_min_wait_num(min_wait_num)
        existing = self.pending_batches.get(batch_id)
        if existing is not None and existing.state not in _DONE:
            raise ValueError(f"Batch {batch_id} is already active.")
        tasks = list(tasks)
        _check_tasks(batch_id, tasks)   # the scheduler reads a task only when it starts
        # Everything is checked: from here on nothing raises, so a batch is registered whole.
        scheduler.dead_error()          # engines that came back take work again
        state = BatchState(batch_id=batch_id, batch_type=batch_type,
                           expected_task_count=len(tasks), min_wait_num=min_wait_num)
        state._run = scheduler.new_batch(batch_id, batch_type == "eval", len(tasks),
                                         functools.partial(self._task_finished, state))
        self.pending_batches[batch_id] = state
        if tasks:
            state.state = BatchLifecycleState.RUNNING
            scheduler.submit(state._run, tasks)

    async def finalize_train_batch(self, batch_id: int, *,
                                   timeout: float | None = None) -> dict[str, Any]:
        timeout = _check_timeout(timeout)
        return await self._finalize(self._get_batch_state(batch_id, "train"), timeout)

    async def finalize_eval_batch(self, batch_id: str, *,
                                  timeout: float | None = None) -> dict[str, Any]:
        timeout = _check_timeout(timeout)
        return await self._finalize(self._get_batch_state(batch_id, "eval"), timeout)

    async def abort_batch(self, batch_id: BatchId, *, reason: str,
                          keep_partial_results: bool = False) -> None:
        self._require_scheduler()
        state = self.pending_batches.get(_check_batch_id(batch_id))
        if state is None or state.state in _DONE:
            return
        logger.warning("Abort batch %s: %s", batch_id, reason)
        waits = self._close_unfinished(state, keep_partial=keep_partial_results)
        if keep_partial_results:
            metrics = await self._commit(state)
        else:
            state.statuses.clear()
            state._tally = MetricTally()
            if self._pipeline is not None:
                self._pipeline.discard(state.batch_id)
            metrics = {}
        self._conclude(state, BatchLifecycleState.ABORTED, metrics)
        await self._settle(waits)

    def batch_progress(self, batch_id: BatchId) -> BatchProgress:
        """How an active batch's tasks stand: queued, running, done, failed, cancelled, and
        retries so far (read from the task ledger, O(1))."""
        scheduler = self._require_scheduler()
        state = self.pending_batches.get(_check_batch_id(batch_id))
        if state is None:
            raise KeyError(f"Batch {batch_id} is not registered.")
        return scheduler.progress(state._run)

    async def process_experiences(self, payloads: list[bytes]) -> dict[str, float]:
        """Decode payloads (ours or Trinity's TRXP) and run them through the pipeline.
        Large payload lists are decoded in a worker thread, off the event loop."""
        pipeline = self._require_pipeline()
        payloads = list(payloads)
        if sum(map(_nbytes, payloads)) > OFF_LOOP_BYTES:
            batch = await asyncio.to_thread(decode_payloads, payloads)
        else:
            batch = decode_payloads(payloads)
        return await pipeline.process(batch, self._current_version())

    @property
    def sink(self) -> Sink:
        """Where finalized train batches go (``pipeline.sink``): e.g. ``sink.reader()`` of a
        stream sink, for a trainer on this event loop."""
        return self._require_pipeline().sink

    def take_experiences(self, batch_id: BatchId) -> ExperienceBatch | None:
        """The finalized experiences of a train batch, handed over once (None if none)."""
        return self._require_pipeline().take(_check_batch_id(batch_id))

    @classmethod
    def get_actor(cls, config: Config, models: list[InferenceModel],
                  auxiliary_models: list[list[InferenceModel]] | None = None) -> Any:
        """This coordinator as a Ray actor, for explorers that already run on Ray."""
        try:
            import ray
        except ImportError as exc:
            raise ImportError("RolloutCoordinator.get_actor needs Ray: "
                              "pip install 'fastrollout[ray]'") from exc
        return ray.remote(cls).remote(config, models, auxiliary_models)

    # -- internals ----------------------------------------------------------------------------

    def _require_scheduler(self) -> Scheduler:
        if not self._prepared:
            raise RuntimeError(_NOT_PREPARED)
        if self._scheduler is None:
            raise RuntimeError("RolloutCoordinator in mode 'serve' runs no scheduler: only "
                               "process_experiences() is available")
        return self._scheduler

    def _require_pipeline(self) -> ExperiencePipeline:
        if not self._prepared:
            raise RuntimeError(_NOT_PREPARED)
        if self._pipeline is None:
            raise RuntimeError("RolloutCoordinator in mode 'bench' runs no experience pipeline")
        return self._pipeline

    def _get_batch_state(self, batch_id: BatchId, expected_type: str) -> BatchState:
        self._require_scheduler()
        state = self.pending_batches.get(_check_batch_id(batch_id))
        if state is None:
            raise KeyError(f"Batch {batch_id} is not registered.")
        if state.batch_type != expected_type:
            raise ValueError(f"Batch {batch_id} is {state.batch_type}, expected {expected_type}.")
        return state

    def _task_finished(self, state: BatchState, record: TaskRecord, status: Status) -> None:
        """A task reached its final status (or is kept as a partial result): its status joins
        the batch, its experiences the pipeline, and a waiting finalize may wake."""
        state._tally.add(status.metrics[0])
        state.statuses[record.task_id] = status
        if record.experiences:
            if self._pipeline is not None:
                self._pipeline.stage(state.batch_id, record.experiences, record.versions)
            record.experiences = ()
        if state._target is not None and len(state.statuses) >= state._target:
            state._wake.set()

    def _wake_all(self, error: BaseException) -> None:
        """No rollout engine is alive: every waiter wakes now and gets the error."""
        logger.error("rollout coordinator: %s", error)
        for state in self.pending_batches.values():
            state._wake.set()

    async def _wait_for(self, state: BatchState, target: int, timeout: float) -> bool:
        """Wait until ``target`` tasks of the batch are booked; False at the timeout.
        Raises EngineDeadError while no engine is alive."""
        scheduler = self._require_scheduler()
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
            while len(state.statuses) < target and state.state not in _DONE:
                error = scheduler.dead_error()
                if error is not None:
                    raise error
                if expired:
                    return False
                state._wake.clear()
                await state._wake.wait()
            return True
        finally:
            state._target = None
            if timer is not None:
                timer.cancel()

    async def _finalize(self, state: BatchState, timeout: float | None) -> dict[str, Any]:
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
            if reached and len(state.statuses) < expected and state.final_result is None:
                # Over-rollout: keep collecting a while after min_wait_num is reached.
                wait_more = min(explorer.over_rollout.wait_after_min, deadline - loop.time())
                await self._wait_for(state, expected, max(wait_more, 0.0))
            if state.final_result is not None:          # aborted while we waited
                return dict(state.final_result)
            done = len(state.statuses)
            if state.batch_type == "train" and expected and (done == 0 or done < target):
                # Nothing is lost: results stay booked for a later finalize or abort.
                raise TimeoutError(f"Timeout waiting for batch {state.batch_id}.")
            state.state = BatchLifecycleState.FINALIZING
            waits: list[asyncio.Future[Any]] = []
            if done < expected:
                waits = self._close_unfinished(
                    state, keep_partial=explorer.over_rollout.return_partial_tasks)
            elif state.batch_type == "train":
                # A full train step (dynamic timeout).
                self._require_scheduler().completed_steps += 1
            try:
                metrics = await self._commit(state)
            except Exception:
                state.state = BatchLifecycleState.RUNNING   # results stay for a later try
                raise
            result = self._conclude(state, BatchLifecycleState.FINALIZED, metrics)
            await self._settle(waits)
            return result

    def _close_unfinished(self, state: BatchState, *,
                          keep_partial: bool) -> list[asyncio.Future[Any]]:
        return self._require_scheduler().cancel_batch(state._run, keep_partial=keep_partial)

    async def _commit(self, state: BatchState) -> dict[str, float]:
        if state.batch_type != "train" or self._pipeline is None:
            return {}
        return await self._pipeline.commit(state.batch_id, self._current_version())

    def _conclude(self, state: BatchState, final: BatchLifecycleState,
                  pipeline_metrics: dict[str, float]) -> dict[str, Any]:
        """Record the result, forget the batch, and wake anyone still waiting on it."""
        result = self._end(state, final, pipeline_metrics)
        if self.pending_batches.get(state.batch_id) is state:
            del self.pending_batches[state.batch_id]
        self._require_scheduler().release_batch(state._run)
        return result

    def _end(self, state: BatchState, final: BatchLifecycleState,
             pipeline_metrics: dict[str, float]) -> dict[str, Any]:
        state.state = final
        state.final_result = self._result(state, pipeline_metrics)
        state._wake.set()
        return dict(state.final_result)

    def _result(self, state: BatchState, pipeline_metrics: dict[str, float]) -> dict[str, Any]:
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

    async def _settle(self, waits: list[asyncio.Future[Any]]) -> None:
        """Give cancelled work a bounded time to unwind; what is left is detached."""
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=CANCEL_GRACE)
        if pending:
            self.detached_tasks += len(pending)
            logger.warning("%d cancelled task(s) ignored cancellation; detached", len(pending))
