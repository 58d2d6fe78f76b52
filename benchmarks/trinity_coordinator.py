"""Trinity-RFT 0.6.0's own RolloutCoordinator, Scheduler and WorkflowRunner, run in one process.

The baseline the coordinator benchmark compares against. Trinity's real code runs unchanged
(``trinity/explorer/{rollout_coordinator,scheduler,workflow_runner}.py``, its Config, Task,
Workflow, Experience and metrics); only what needs a cluster is replaced by in-process stand-ins:

- ``ray``: ``ray.remote(cls)`` builds the actor in this process and ``handle.method.remote()``
  starts the call as an asyncio task, as a Ray async actor would start it on its own loop;
- the rollout model wrapper (nothing calls a model: the workflow returns at once);
- the experience pipeline: decodes every payload with ``Experience.deserialize_many`` and
  counts, as ``ExperiencePipeline.process_serialized_chunks`` does before its operators.

So the figures are a LOWER BOUND on Trinity's real cost: no actor hops, no pickling of tasks
and results between processes, no buffer writes, INFO logging off. The stand-ins live in
``sys.modules`` only while the modules load; every module added then is removed afterwards,
so nothing here leaks into other imports or tests.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import pathlib
import sys
import sysconfig
import time
import types
from typing import Any, Literal

from benchmarks.batches import timed_batch

__all__ = ["trinity_modules", "run_trinity_batches"]


def _trinity_root() -> pathlib.Path:
    for base in (sysconfig.get_paths()["purelib"], *sys.path):
        root = pathlib.Path(base) / "trinity"
        if (root / "explorer" / "rollout_coordinator.py").is_file():
            return root
    raise RuntimeError("trinity-rft 0.6.0 is not installed; "
                       "`pip install --no-deps trinity-rft==0.6.0` installs it")


# ---- stand-ins -----------------------------------------------------------------------------

class _ActorMethod:
    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs) -> asyncio.Future:
        """Start the call now, like Ray does; the returned future plays the ObjectRef."""
        if asyncio.iscoroutinefunction(self._fn):
            return asyncio.ensure_future(self._fn(*args, **kwargs))
        future = asyncio.get_running_loop().create_future()
        future.set_result(self._fn(*args, **kwargs))
        return future


class _ActorHandle:
    def __init__(self, instance):
        self._instance = instance

    def __getattr__(self, name: str) -> _ActorMethod:
        if name == "__ray_ready__":
            return _ActorMethod(lambda: True)
        return _ActorMethod(getattr(self._instance, name))

    def __class_getitem__(cls, item):
        return cls


class _ActorClass:
    def __init__(self, cls):
        self._cls = cls

    def options(self, **_options) -> _ActorClass:
        return self

    def remote(self, *args, **kwargs) -> _ActorHandle:
        return _ActorHandle(self._cls(*args, **kwargs))


def _ray_module() -> dict[str, types.ModuleType]:
    ray = types.ModuleType("ray")
    ray.remote = _ActorClass
    ray.cancel = lambda ref, force=False: ref.cancel()
    ray.kill = lambda actor: None
    ray.get_runtime_context = lambda: types.SimpleNamespace(namespace="")
    actor = types.ModuleType("ray.actor")
    actor.ActorHandle = _ActorHandle
    ray.actor = actor
    return {"ray": ray, "ray.actor": actor}


class _ModelWrapper:
    """Answers what WorkflowRunner asks of its model; a zero-cost model at version 0."""

    async def prepare(self) -> None:
        pass

    @property
    def model_version_async(self):
        return self._version()

    async def _version(self) -> int:
        return 0

    async def clean_workflow_state(self) -> None:
        pass

    async def get_workflow_state(self) -> dict:
        return {}

    def clone_with_isolated_history(self) -> _ModelWrapper:
        return self


class _Allocator:
    def __init__(self, explorer_config):
        pass

    def get_model(self, model_config, name, model_id) -> _ModelWrapper:
        return _ModelWrapper()


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _package(name: str, path: pathlib.Path) -> types.ModuleType:
    """A package whose submodules load from ``path`` without running its heavy ``__init__``."""
    package = _module(name)
    package.__path__ = [str(path)]
    return package


def _pipeline_module(experience_cls) -> types.ModuleType:
    class ExperiencePipeline:
        def __init__(self, config):
            self.experience_count = 0

        async def prepare(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def process_serialized_chunks(self, chunks: list[bytes]) -> dict:
            experiences = []
            for chunk in chunks:
                if chunk:
                    experiences.extend(experience_cls.deserialize_many(chunk))
            self.experience_count += len(experiences)
            return {"pipeline/experience_count": float(len(experiences))}

    return _module("trinity.buffer.pipelines.experience_pipeline",
                   ExperiencePipeline=ExperiencePipeline)


@contextlib.contextmanager
def _scoped_modules():
    """``ray`` and ``trinity`` modules that enter ``sys.modules`` inside the block (stand-ins and
    real modules bound to them) are gone after it; replaced entries return. Real third-party
    packages imported meanwhile (torch, numpy) stay: they cannot be imported twice."""
    saved = dict(sys.modules)
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n not in saved]:
            if name.split(".", 1)[0] in ("ray", "trinity"):
                del sys.modules[name]
        sys.modules.update(saved)


_LOADED: types.SimpleNamespace | None = None


def trinity_modules() -> types.SimpleNamespace:
    """Trinity's real config, experience, workflows, workflow_runner, scheduler and
    rollout_coordinator modules, loaded once against the stand-ins (kept private)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    root = _trinity_root()
    with _scoped_modules():
        sys.modules.update(_ray_module())
        sys.modules.update({
            "trinity.explorer": _package("trinity.explorer", root / "explorer"),
            "trinity.buffer": _module("trinity.buffer", get_buffer_reader=None,
                                      get_buffer_writer=None),
            "trinity.common.models.allocator": _module("trinity.common.models.allocator",
                                                       Allocator=_Allocator),
            "trinity.common.models.model": _module("trinity.common.models.model",
                                                   ModelWrapper=_ModelWrapper),
        })
        experience = importlib.import_module("trinity.common.experience")
        sys.modules["trinity.buffer.pipelines"] = _module("trinity.buffer.pipelines")
        sys.modules["trinity.buffer.pipelines.experience_pipeline"] = _pipeline_module(
            experience.Experience)
        _LOADED = types.SimpleNamespace(
            config=importlib.import_module("trinity.common.config"),
            constants=importlib.import_module("trinity.common.constants"),
            experience=experience,
            workflows=importlib.import_module("trinity.common.workflows"),
            workflow_runner=importlib.import_module("trinity.explorer.workflow_runner"),
            scheduler=importlib.import_module("trinity.explorer.scheduler"),
            rollout_coordinator=importlib.import_module("trinity.explorer.rollout_coordinator"),
            log=importlib.import_module("trinity.utils.log"),
        )
    return _LOADED


# ---- the benchmark workload ----------------------------------------------------------------

def _instant_workflow(trinity: types.SimpleNamespace) -> type:
    """A repeatable, resettable Trinity workflow that returns ``repeat_times`` tiny experiences
    at once (8 tokens, 4 of them response with logprobs, a reward), as math workflows do."""
    import torch

    Experience = trinity.experience.Experience

    class InstantWorkflow(trinity.workflows.Workflow):
        can_reset = True
        can_repeat = True

        def reset(self, task) -> None:
            self.task = task

        def set_repeat_times(self, repeat_times: int, run_id_base: int) -> None:
            self.repeat_times = repeat_times
            self.run_id_base = run_id_base

        def run(self) -> list:
            experiences = []
            for i in range(self.repeat_times):
                exp = Experience(tokens=torch.arange(8), prompt_length=4,
                                 reward=1.0)
                exp.eid.run = self.run_id_base + i
                experiences.append(exp)
            return experiences

    return InstantWorkflow


@contextlib.contextmanager
def _trinity_log_level(level: str):
    """Trinity reads its log level from TRINITY_LOG_LEVEL when a logger is created."""
    name = "TRINITY_LOG_LEVEL"
    old = os.environ.get(name)
    os.environ[name] = level
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


async def run_trinity_batches(num_tasks: int, repeat: int, *, runner_slots: int = 64,
                              batch_type: Literal["train", "eval"] = "train",
                              batches: int = 1) -> dict[str, Any]:
    """Run ``batches`` batches of ``num_tasks`` tasks x ``repeat`` runs through Trinity's own
    RolloutCoordinator with one engine and ``runner_slots`` runners; submit then finalize each.

    Returns per-batch lists and their medians: ``tasks_per_s`` (tasks / (submit -> finalize
    returned)) and ``wakeup_s`` (the last task's completion callback -> finalize returned).
    """
    trinity = trinity_modules()
    workflow = _instant_workflow(trinity)
    config = trinity.config.Config(mode="both")
    config.explorer.runner_per_model = runner_slots
    config.explorer.rollout_model.engine_num = 1
    config.buffer.batch_size = num_tasks
    is_eval = batch_type == "eval"

    with _trinity_log_level("WARNING"):
        coordinator = trinity.rollout_coordinator.RolloutCoordinator(config)
        await coordinator.prepare()
    scheduler = coordinator.scheduler
    last_done = [0.0]
    on_task_done = scheduler.task_done_callback

    def timed_task_done(future):  # every runner future reports here when it ends
        on_task_done(future)
        last_done[0] = time.perf_counter()

    scheduler.task_done_callback = timed_task_done
    tasks_per_s, wakeup_s, experiences = [], [], []
    try:
        for step in range(batches):
            batch_id = f"{step}/eval" if is_eval else step
            tasks = [trinity.workflows.Task(workflow=workflow, repeat_times=repeat,
                                            is_eval=is_eval, raw_task={"id": i})
                     for i in range(num_tasks)]
            counted = coordinator.experience_pipeline.experience_count
            result, start, end = await timed_batch(coordinator, batch_id, tasks, batch_type)
            if result["finished_task_count"] != num_tasks:
                raise RuntimeError(f"Trinity finished {result['finished_task_count']} of "
                                   f"{num_tasks} tasks in batch {batch_id}")
            tasks_per_s.append(num_tasks / (end - start))
            wakeup_s.append(end - last_done[0])
            experiences.append(coordinator.experience_pipeline.experience_count - counted)
    finally:
        await coordinator.shutdown()
    expected = 0 if is_eval else num_tasks * repeat
    if any(n != expected for n in experiences):
        raise RuntimeError(f"Trinity's pipeline counted {experiences} experiences per batch, "
                           f"expected {expected}")
    return {"tasks_per_s": _median(tasks_per_s), "wakeup_s": _median(wakeup_s),
            "tasks_per_s_all": tasks_per_s, "wakeup_s_all": wakeup_s,
            "experiences_per_batch": expected}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--type", choices=["train", "eval"], default="train")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run_trinity_batches(
        args.tasks, args.repeat, runner_slots=args.slots, batch_type=args.type,
        batches=args.batches))))
