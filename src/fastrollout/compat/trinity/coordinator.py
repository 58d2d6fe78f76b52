"""Trinity-RFT 0.6.0's ``RolloutCoordinator``, run by fastrollout.

The same constructor forms, ``get_actor`` forms, Ray namespace, ``Config`` and batch API as
``trinity.explorer.rollout_coordinator.RolloutCoordinator``; behind them fastrollout's
coordinator and event-driven scheduler (no runner actors, no dispatch or result polling),
running Trinity's own tasks and workflows over Trinity's own model wrappers
(``runner.py``, ``models.py``), and Trinity's own experience pipeline (``pipeline.py``).

Modes mean what they mean to Trinity: ``bench`` runs no pipeline, ``serve`` no scheduler
(``process_experiences`` only), ``both``, ``explore``, ``train`` and ``colocate`` both.
Batch semantics are fastrollout's (API.md), which fix Trinity 0.6.0's quirks: a finalize
that times out loses nothing, ``keep_partial_results`` keeps them, one attempt's timeout is
``max_timeout``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Literal

from ...config import Config
from ...coordinator import RolloutCoordinator as _Coordinator
from .models import EngineRef
from .pipeline import TrinityPipeline
from .runner import TrinityRunner, TrinityTask

if TYPE_CHECKING:
    from ...sinks import Sink
    from ...threads import WorkerPool


class RolloutCoordinator(_Coordinator):
    """Drop-in for Trinity's coordinator. ``config`` is Trinity's ``Config``. Engines are
    found by the actor names Trinity's explorer gives them, unless passed in
    (``rollout_model``: one Trinity ``ModelWrapper`` or engine actor handle per engine;
    ``auxiliary_models``: one such list per auxiliary model)."""

    def __init__(self, config: Any, rollout_model: list[Any] | None = None,
                 auxiliary_models: list[list[Any]] | None = None) -> None:
        self.trinity_config = config
        explorer = config.explorer
        self._located = rollout_model is None
        if rollout_model is None:
            engines = [EngineRef(explorer.rollout_model)
                       for _ in range(explorer.rollout_model.engine_num)]
            aux = [[EngineRef(model) for _ in range(model.engine_num)]
                   for model in explorer.auxiliary_models]
        else:
            engines = [EngineRef.given(m, explorer.rollout_model) for m in rollout_model]
            aux = [[EngineRef.given(m, cfg) for m in models] for models, cfg
                   in zip(auxiliary_models or [], explorer.auxiliary_models, strict=False)]
        self._runner: TrinityRunner | None = None
        self._trinity_pipeline: TrinityPipeline | None = None
        super().__init__(Config.from_trinity(config), engines, aux)

    @classmethod
    def get_actor(cls, config: Any, rollout_model: list[Any] | None = None,
                  auxiliary_models: list[list[Any]] | None = None) -> Any:
        """This coordinator as a Ray actor in ``config.ray_namespace``, as Trinity creates
        its own (unnamed). ``explorer.env_vars``, which Trinity sets on each runner actor,
        are set on this actor: its workflows run in it."""
        import ray

        options: dict[str, Any] = {"namespace": config.ray_namespace}
        if config.explorer.env_vars:
            options["runtime_env"] = {"env_vars": dict(config.explorer.env_vars)}
        args = (config,) if rollout_model is None and auxiliary_models is None else \
            (config, rollout_model, auxiliary_models)
        return ray.remote(cls).options(**options).remote(*args)

    # -- lifecycle ----------------------------------------------------------------------------

    async def prepare(self) -> None:
        if self._prepared:
            return
        from trinity.utils.plugin_loader import load_plugins

        load_plugins()      # workflows and operators of Trinity's plugin folders
        config = self.trinity_config
        if self.config.mode != "serve":
            if self._located:
                await asyncio.to_thread(self._locate)
            explorer = config.explorer
            self._runner = TrinityRunner(concurrent_mode=explorer.concurrent_mode, pool=None,
                                         enable_history=explorer.rollout_model.enable_history)
            await self._runner.prepare(explorer.runner_per_model * len(self.rollout_model),
                                       self.rollout_model, self.auxiliary_models)
        if self.config.mode != "bench":
            self._trinity_pipeline = TrinityPipeline(config)
            await self._trinity_pipeline.prepare()
        await super().prepare()

    def _locate(self) -> None:
        """Find the engine actors as Trinity's runners do (``Allocator.get_model``)."""
        from trinity.common.models.allocator import Allocator

        allocator = Allocator(self.trinity_config.explorer)
        for i, engine in enumerate(self.rollout_model):
            engine.locate(allocator, "rollout", i)
        for j, engines in enumerate(self.auxiliary_models):
            for i, engine in enumerate(engines):
                engine.locate(allocator, f"auxiliary_{j}", i)

    def _new_runner(self, pool: WorkerPool) -> TrinityRunner:  # type: ignore[override]
        assert self._runner is not None
        self._runner.pool = pool
        return self._runner

    def _new_pipeline(self) -> TrinityPipeline:  # type: ignore[override]
        assert self._trinity_pipeline is not None
        return self._trinity_pipeline

    async def shutdown(self) -> None:
        await super().shutdown()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.close()
        pipeline, self._trinity_pipeline = self._trinity_pipeline, None
        if pipeline is not None:
            await pipeline.aclose()

    # -- batches ------------------------------------------------------------------------------

    async def submit_batch(self, *, batch_id: int | str, tasks: list[Any],
                           batch_type: Literal["train", "eval"],
                           min_wait_num: int | None = None) -> None:
        """Schedule Trinity ``Task``s (task ids: their index in ``tasks``)."""
        from trinity.common.workflows import Task

        carried = []
        for i, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(f"task {i} of batch {batch_id}: expected a trinity Task, got "
                                f"{type(task).__name__}")
            carried.append(TrinityTask.of(task))
        await super().submit_batch(batch_id=batch_id, tasks=carried, batch_type=batch_type,
                                   min_wait_num=min_wait_num)

    async def process_experiences(self, payloads: list[bytes]) -> dict[str, float]:
        """Trinity's payloads (``Experience.serialize_many``) through Trinity's pipeline."""
        self._require_pipeline()
        assert self._trinity_pipeline is not None
        return await self._trinity_pipeline.process_payloads(list(payloads))

    @property
    def sink(self) -> Sink:
        raise RuntimeError("the Trinity coordinator writes to Trinity's experience buffer "
                           "(buffer.trainer_input.experience_buffer): read it there")

    def take_experiences(self, batch_id: int | str) -> None:
        raise RuntimeError("the Trinity coordinator writes to Trinity's experience buffer "
                           "(buffer.trainer_input.experience_buffer): read it there")

    # -- runner state (Trinity's scheduler queries) ---------------------------------------------

    async def get_runner_state(self, runner_id: int) -> dict[str, Any]:
        """Slot ``runner_id``'s runner state: ``workflow_id``, ``model_version``,
        ``begin_time``, ``terminate_time``, ``running_time`` and what its workflow set with
        ``set_workflow_state``; {} for an unknown id."""
        slots = self._runner.slots if self._runner is not None else []
        if not 0 <= runner_id < len(slots):
            return {}
        return await slots[runner_id].report()

    async def get_all_state(self) -> dict[int, dict[str, Any]]:
        slots = self._runner.slots if self._runner is not None else []
        return {slot.index: await slot.report() for slot in slots}

    async def get_key_state(self, key: str) -> dict[int, Any]:
        return {runner_id: state[key] for runner_id, state in (await self.get_all_state()).items()
                if key in state}
