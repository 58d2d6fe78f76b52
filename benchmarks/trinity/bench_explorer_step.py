"""Trinity's Explorer step on Trinity-RFT 0.6.0's coordinator and on fastrollout's drop-in
(issue 12), side by side in one run.

Both coordinators are driven as Trinity's Explorer drives its own: ``get_actor(config)`` makes
the coordinator a Ray actor, ``prepare``, then per step ``submit_batch`` of Trinity ``Task``s
and ``finalize_train_batch``, each a Ray call. Both run Trinity's Config, its repeatable async
workflow API (``SampleWorkflow``), its ``ModelWrapper`` and its ``ExperiencePipeline`` (GRPO
advantages, then the write to an SQLite experience buffer, in the coordinator's process) over
the same engines: ``ENGINES`` ``LatencyEngine`` actors (a Trinity ``InferenceModel`` whose
every request takes a fixed ``LATENCY_S``), ``RUNNERS_PER_MODEL`` slots each. Trinity runs one
``WorkflowRunner`` actor per slot; fastrollout runs the slots inside its coordinator actor.

A step is ``TASKS`` tasks of ``REPEAT`` runs (one engine request of ``n = REPEAT`` each).
Steps alternate between the coordinators, so both see the same machine load; the first step
of each is a warm-up. Figures (medians over ``ROUNDS`` steps, in ``extra_info``):

- ``step_ms``: submit_batch sent -> finalize_train_batch returned, at the driver.
- ``engine_ms``: the step time of a coordinator that costs nothing: ``ceil(TASKS / slots)``
  waves of the engines' mean request time, which the engines measure themselves (start to
  end of each ``chat``) in that step.
- ``share_ms``: the coordinator's share, ``step_ms - engine_ms``. It includes Trinity's
  pipeline, which both run alike; ``pipeline_ms`` is the pipeline's own timer
  (``experience_pipeline/time/total``, of which ``write_ms`` is the buffer write) and
  ``share_excl_pipeline_ms`` is ``share_ms - pipeline_ms``.
- ``direct_ms``: the same requests sent straight to the engines from the driver, ``slots``
  in flight, no coordinator or workflow (``_direct``): the floor of any coordinator calling
  these engines over Ray, engine-side serialization and Ray transport included, measured
  before each pair of steps. ``share_vs_direct_ms`` is ``step_ms - pipeline_ms - direct_ms``.
- ``wakeup_ms``: finalize wake-up, from the end of the step's last engine request (engine
  clock; same host) to finalize_train_batch returned at the driver; it includes the last
  task's workflow, the pipeline and the reply; ``wakeup_excl_pipeline_ms`` leaves the
  pipeline out.
- ``*_ratio``: Trinity's figure over fastrollout's.

Trinity's idle scheduler keeps polling (10 ms dispatch loop, 100 ms result wait) during
fastrollout's steps too; that load falls on both. Run it (in .venv-trinity only)::

    .venv-trinity/bin/python -m pytest benchmarks/trinity/bench_explorer_step.py --benchmark-only
"""
from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid

import ray
from trinity.common.config import StorageConfig
from trinity.common.workflows import Task
from trinity.explorer.rollout_coordinator import RolloutCoordinator as TrinityCoordinator

from benchmarks.trinity.latency_engine import LATENCY_S, SampleWorkflow, engine_config
from fastrollout.compat.trinity import RolloutCoordinator as FastRolloutCoordinator

ENGINES = 2
RUNNERS_PER_MODEL = 8
SLOTS = ENGINES * RUNNERS_PER_MODEL
TASKS = 256
REPEAT = 8
ROUNDS = 5

COORDINATORS = {"trinity": TrinityCoordinator, "fastrollout": FastRolloutCoordinator}
PIPELINE_TOTAL = "experience_pipeline/time/total"
PIPELINE_WRITE = "experience_pipeline/time/write"


def step_config(folder, name: str):
    """Trinity's config for one coordinator: GRPO, its own SQLite experience buffer."""
    config = engine_config(ENGINES)
    config.explorer.runner_per_model = RUNNERS_PER_MODEL
    config.explorer.max_timeout = 120
    config.algorithm.algorithm_type = "grpo"
    config.algorithm.advantage_fn = "grpo"
    config.algorithm.advantage_fn_args = {}
    config.data_processor.experience_pipeline.save_input = False
    config.buffer.trainer_input.experience_buffer = StorageConfig(
        name=f"{name}_{uuid.uuid4().hex[:8]}", storage_type="sql",
        path=f"sqlite:///{folder}/{name}.db", schema_type="experience", wrap_in_ray=False)
    return config


def _metric(metrics: dict, suffix: str) -> float:
    """The metric whose key ends with ``suffix`` (the coordinators prefix pipeline keys)."""
    found = [value for key, value in metrics.items() if key.endswith(suffix)]
    if len(found) != 1:
        raise KeyError(f"expected one metric ending with {suffix!r}, got {sorted(metrics)}")
    return float(found[0])


def one_step(coordinator, engines, step: int, tasks: int) -> dict[str, float]:
    """One Explorer step on ``coordinator`` (an actor handle): its figures in seconds."""
    batch = [Task(workflow=SampleWorkflow, repeat_times=REPEAT, raw_task={"index": i})
             for i in range(tasks)]
    start = time.time()
    ray.get(coordinator.submit_batch.remote(batch_id=step, tasks=batch, batch_type="train"))
    result = ray.get(coordinator.finalize_train_batch.remote(step))
    end = time.time()
    spans = [span for spans in ray.get([e.take_spans.remote() for e in engines])
             for span in spans]
    if result["finished_task_count"] != tasks or len(spans) != tasks:
        raise AssertionError(f"step {step}: {result['finished_task_count']} tasks finished, "
                             f"{len(spans)} engine requests, {tasks} expected")
    engine = math.ceil(tasks / SLOTS) * statistics.fmean(e - s for s, e in spans)
    pipeline = _metric(result["metrics"], PIPELINE_TOTAL)
    wakeup = end - max(e for _, e in spans)
    return {"step": end - start, "engine": engine, "share": end - start - engine,
            "share_excl_pipeline": end - start - engine - pipeline,
            "wakeup": wakeup, "wakeup_excl_pipeline": wakeup - pipeline,
            "pipeline": pipeline, "write": _metric(result["metrics"], PIPELINE_WRITE)}


async def _direct(engines, tasks: int) -> None:
    """The step's engine requests without a coordinator: ``SLOTS`` loops at the driver, slot
    i calling engine ``i % ENGINES``, each sending its next request when the last returns."""
    queue = list(range(tasks))
    messages = [{"role": "user", "content": "question"}]

    async def slot(engine) -> None:
        while queue:
            queue.pop()
            await engine.chat.remote(messages, n=REPEAT)

    await asyncio.gather(*(slot(engines[i % len(engines)]) for i in range(SLOTS)))


def direct_step(engines, tasks: int) -> float:
    """Seconds for the step's requests sent straight to the engines (see ``_direct``)."""
    start = time.time()
    asyncio.run(_direct(engines, tasks))
    end = time.time()
    ray.get([e.take_spans.remote() for e in engines])
    return end - start


def measure(folder, engines, *, tasks: int = TASKS, rounds: int = ROUNDS
            ) -> dict[str, dict[str, float]]:
    """Alternating steps on both coordinators (after one warm-up step each): per
    coordinator, the median of each figure in milliseconds."""
    actors = {name: cls.get_actor(step_config(folder, name))
              for name, cls in COORDINATORS.items()}
    ray.get([actor.prepare.remote() for actor in actors.values()])
    steps: dict[str, list[dict]] = {name: [] for name in actors}
    try:
        for step in range(1, rounds + 2):
            direct = direct_step(engines, tasks)
            for name, actor in actors.items():
                figures = one_step(actor, engines, step, tasks)
                figures["direct"] = direct
                figures["share_vs_direct"] = figures["step"] - figures["pipeline"] - direct
                if step > 1:
                    steps[name].append(figures)
    finally:
        ray.get([actor.shutdown.remote() for actor in actors.values()])
        for actor in actors.values():
            ray.kill(actor)
    return {name: {f"{key}_ms": round(statistics.median(r[key] for r in results) * 1e3, 1)
                   for key in results[0]}
            for name, results in steps.items()}


def test_explorer_step_trinity_vs_fastrollout(benchmark, latency_engines, tmp_path):
    benchmark.group = "trinity-explorer-step"
    results: list[dict] = []
    benchmark.pedantic(lambda: results.append(measure(tmp_path, latency_engines)),
                       rounds=1, iterations=1)
    figures = results[0]
    for name, values in figures.items():
        benchmark.extra_info.update({f"{name}_{key}": value for key, value in values.items()})
    trinity, ours = figures["trinity"], figures["fastrollout"]
    for key in ("share", "share_excl_pipeline", "share_vs_direct", "wakeup",
                "wakeup_excl_pipeline"):
        benchmark.extra_info[f"{key}_ratio"] = round(trinity[f"{key}_ms"] / ours[f"{key}_ms"], 2)
    benchmark.extra_info.update(tasks=TASKS, repeat=REPEAT, engines=ENGINES, slots=SLOTS,
                                latency_ms=LATENCY_S * 1e3, rounds=ROUNDS)
