"""The coordinator as most tests drive it: a config, tasks and a prepared coordinator over real
SimulatedEngines; and waiting for a condition that a test cannot await."""
from __future__ import annotations

import asyncio

from fastrollout import Config, RolloutCoordinator, Task
from fastrollout.engines import SimulatedEngine
from workflows import SyncWorkflow


def make_config(**explorer) -> Config:
    over = explorer.pop("over_rollout", {})
    dyn = explorer.pop("dynamic_timeout", {})
    return Config.from_dict({"explorer": {"runner_per_model": 4, "max_timeout": 5.0,
                                          "max_retry_times": 0, **explorer,
                                          "over_rollout": over, "dynamic_timeout": dyn}})


def tasks(n, workflow=SyncWorkflow, repeat=1, is_eval=False, **args):
    return [Task(workflow=workflow, repeat_times=repeat, workflow_args=dict(args), is_eval=is_eval,
                 raw_task={"i": i}) for i in range(n)]


class Harness:
    def __init__(self, config=None, engines=None):
        self.engines = engines or [SimulatedEngine()]
        self.coord = RolloutCoordinator(config or make_config(), self.engines)

    async def __aenter__(self):
        await self.coord.prepare()
        return self.coord

    async def __aexit__(self, *exc):
        await self.coord.shutdown()


async def wait_until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)
