"""``fastrollout bench --compare trinity``: the bench workload through Trinity-RFT 0.6.0's own
RolloutCoordinator, Scheduler and WorkflowRunner, on the same kind of engines.

Trinity's modules are loaded by ``benchmarks/trinity_coordinator.py`` of a source checkout
(Ray replaced by in-process stand-ins; see that file), so this needs a checkout and
``trinity-rft`` installed. Trinity's workflow here makes the same request per task as
``BenchWorkflow`` (task ``i`` on engine ``i % engines``: Trinity's runners have no engine of
their own in-process) and returns Trinity ``Experience``s. Measured as on our side, except
that a task's start is its workflow's first start (Trinity's scheduling before it is not
seen) and its booking is Trinity's ``task_done_callback``.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .job import build_engines
from .meter import MeteredEngine
from .task import GenerationConfig

if TYPE_CHECKING:
    from .bench import EngineChoice, Workload

__all__ = ["run_trinity_workload"]

_ENGINES: list[MeteredEngine] = []      # what the Trinity workflow class calls
_STARTS: dict[tuple[int, int], float] = {}


def _trinity() -> Any:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "benchmarks" / "trinity_coordinator.py").is_file():
        raise ConfigError("--compare trinity: needs a source checkout of fastrollout (its "
                          "benchmarks/trinity_coordinator.py loads Trinity's coordinator)")
    if str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    from benchmarks.trinity_coordinator import trinity_modules
    try:
        return trinity_modules()
    except (RuntimeError, ImportError) as exc:
        raise ConfigError(f"--compare trinity: {exc}") from None


def _workflow(trinity: Any) -> type:
    import torch

    Experience = trinity.experience.Experience

    class BenchWorkflow(trinity.workflows.Workflow):
        can_reset = True
        can_repeat = True
        is_async = True

        def reset(self, task: Any) -> None:
            self.task = task

        def set_repeat_times(self, repeat_times: int, run_id_base: int) -> None:
            self.repeat_times = repeat_times
            self.run_id_base = run_id_base

        async def run_async(self) -> list:
            raw = self.task.raw_task
            key = (raw["batch"], raw["task"])
            _STARTS.setdefault(key, time.monotonic())
            engine = _ENGINES[raw["task"] % len(_ENGINES)]
            prompt = raw["prompt"]
            params = GenerationConfig(temperature=1.0, logprobs=0, n=self.repeat_times,
                                      max_tokens=raw["max_tokens"], seed=raw["task"])
            completions = await engine.generate(
                prompt, params, request_id=f"{raw['batch']}/{raw['task']}/{self.run_id_base}/1-1")
            exps = []
            for i, c in enumerate(completions):
                tokens = torch.cat((torch.from_numpy(prompt), torch.from_numpy(c.token_ids)))
                exp = Experience(tokens=tokens, prompt_length=len(prompt),
                                 logprobs=torch.from_numpy(c.logprobs), reward=float(i % 2))
                exp.eid.run = self.run_id_base + i
                exps.append(exp)
            return exps

    return BenchWorkflow


async def run_trinity_workload(workload: Workload, engine: EngineChoice) -> dict[str, Any]:
    """The report of ``workload`` run through Trinity's coordinator (the keys of
    ``bench.run_bench``'s report)."""
    from .bench import _PROMPT_TEXT, _report, make_tasks, min_wait_num

    trinity = _trinity()
    workflow = _workflow(trinity)
    engines = [MeteredEngine(e, record=True) for e in build_engines(engine.config())]
    config = trinity.config.Config(mode="both")
    config.explorer.runner_per_model = max(1, math.ceil(workload.concurrency / len(engines)))
    config.explorer.rollout_model.engine_num = len(engines)
    config.explorer.max_retry_times = 0
    config.explorer.max_timeout = 600
    config.explorer.over_rollout.ratio = workload.over_rollout
    config.explorer.over_rollout.wait_after_min = 0.0
    config.buffer.batch_size = workload.tasks
    _ENGINES[:] = engines
    _STARTS.clear()
    booked: list[tuple[Any, int, float, float]] = []
    windows: list[tuple[float, float]] = []
    with _quiet():
        await asyncio.gather(*(e.prepare() for e in engines))
        coordinator = trinity.rollout_coordinator.RolloutCoordinator(config)
        await coordinator.prepare()
    scheduler = coordinator.scheduler
    on_done = scheduler.task_done_callback

    def stamped(future: Any) -> None:
        state = scheduler.running_task_state_map.get(future)
        on_done(future)
        if state is not None and not future.cancelled() and future.exception() is None:
            raw = state.task.task.raw_task
            key = (raw["batch"], raw["task"])
            booked.append((*key, _STARTS.get(key, math.nan), time.monotonic()))

    scheduler.task_done_callback = stamped
    try:
        prompt_ids = engines[0].encode(_PROMPT_TEXT)
        for b in range(workload.batches):
            ours = make_tasks(workload, b, prompt_ids)
            tasks = [trinity.workflows.Task(workflow=workflow, repeat_times=workload.repeat,
                                            raw_task={**t.raw_task, "batch": b, "task": i})
                     for i, t in enumerate(ours)]
            start = time.monotonic()
            await coordinator.submit_batch(batch_id=b, tasks=tasks, batch_type="train",
                                           min_wait_num=min_wait_num(workload))
            await coordinator.finalize_train_batch(b)
            windows.append((start, time.monotonic()))
    finally:
        with _quiet():
            await coordinator.shutdown()
        await asyncio.gather(*(e.shutdown() for e in engines), return_exceptions=True)
        _ENGINES.clear()
    return _report(workload, engine, engines, booked, windows)


@contextlib.contextmanager
def _quiet() -> Any:
    """Trinity logs every batch at INFO; its level is read when a logger is made."""
    from benchmarks.trinity_coordinator import _trinity_log_level

    with _trinity_log_level("WARNING"):
        yield
