"""The Ray path beside the in-process path (issue 15): the same coordinator and workload, its
engine a ``SimulatedEngine`` in this process or in a Ray actor behind a ``RayEngine``.

Workload: one zero-latency simulated engine, 64 slots, batches of 2048 tasks; each task's
repeatable workflow makes one engine request with ``n = 8`` (8 completions of 16 tokens with
logprobs) and returns them as experiences, which the pipeline encodes, decodes and counts.
Each round submits one train batch and finalizes it, after one warm-up round. ``extra_info``
holds the medians over rounds of ``tasks_per_s`` and ``wakeup_ms`` (last task booked ->
finalize returned); the Ray row adds ``overhead_us_per_task``, the difference of the two
paths' time per task measured in the same run (rounds alternate between the paths).

    .venv/bin/python -m pytest benchmarks/bench_ray.py --benchmark-only
"""
from __future__ import annotations

import functools
import statistics

import pytest
import ray
import uvloop

from benchmarks.batches import timed_batch, track_last_booking
from fastrollout import Config, RolloutCoordinator, Task, Workflow
from fastrollout.engines import SimulatedEngine, launch_engine_actors

NUM_TASKS = 2048
REPEAT = 8
SLOTS = 64
ROUNDS = 5


class _Sample(Workflow):
    """One request of ``n = repeat_times`` samples; its completions are the experiences."""

    can_repeat = True
    can_reset = True
    is_async = True

    async def run_async(self):
        exps = await self.model.generate_async(["bench"], n=self.repeat_times, max_tokens=16)
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
            exp.reward = 1.0
        return exps


async def _one_batch(engine, batch_id: int) -> dict:
    coordinator = RolloutCoordinator(
        Config.from_dict({"explorer": {"runner_per_model": SLOTS}}), [engine])
    await coordinator.prepare()
    last_booked = track_last_booking(coordinator)
    try:
        tasks = [Task(workflow=_Sample, repeat_times=REPEAT) for _ in range(NUM_TASKS)]
        result, start, end = await timed_batch(coordinator, batch_id, tasks, "train")
        assert result["finished_task_count"] == NUM_TASKS
        assert len(coordinator.take_experiences(batch_id)) == NUM_TASKS * REPEAT
        return {"tasks_per_s": NUM_TASKS / (end - start), "wakeup_s": end - last_booked[0]}
    finally:
        await coordinator.shutdown()


async def measure() -> dict[str, dict]:
    """Alternating rounds of both paths (Ray must be initialized): medians per path."""
    local = SimulatedEngine()
    (remote,) = launch_engine_actors([functools.partial(SimulatedEngine)],
                                     cpus_per_engine=1, name="bench")
    rounds: dict[str, list[dict]] = {"local": [], "ray": []}
    try:
        for r in range(ROUNDS + 1):         # the first round warms both paths up
            for path, engine in (("local", local), ("ray", remote)):
                result = await _one_batch(engine, r)
                if r:
                    rounds[path].append(result)
    finally:
        await remote.shutdown()
    out = {}
    for path, results in rounds.items():
        out[path] = {"tasks": NUM_TASKS, "repeat": REPEAT, "slots": SLOTS,
                     "tasks_per_s": round(statistics.median(r["tasks_per_s"] for r in results), 1),
                     "wakeup_ms": round(statistics.median(r["wakeup_s"] for r in results) * 1e3,
                                        3)}
    out["ray"]["overhead_us_per_task"] = round(
        1e6 / out["ray"]["tasks_per_s"] - 1e6 / out["local"]["tasks_per_s"], 1)
    return out


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_path_vs_in_process(benchmark, local_ray):
    benchmark.group = "ray-engines"
    results: list[dict] = []
    benchmark.pedantic(lambda: results.append(uvloop.run(measure())), rounds=1, iterations=1)
    for path, figures in results[0].items():
        benchmark.extra_info.update({f"{path}_{key}": value for key, value in figures.items()
                                     if key not in ("tasks", "repeat", "slots")})
    benchmark.extra_info.update(tasks=NUM_TASKS, repeat=REPEAT, slots=SLOTS)
