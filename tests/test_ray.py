"""RolloutCoordinator.get_actor: the same coordinator as a Ray actor (a real local Ray)."""
import sys

import pytest
import ray

from fastrollout import Config, Experience, RolloutCoordinator, Task, Workflow
from fastrollout.engines import SimulatedEngine


class RayRepeat(Workflow):
    can_repeat = True
    is_async = True

    async def run_async(self):
        exps = await self.model.generate_async(["ray"], n=self.repeat_times)
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
            exp.metrics = {"run_metrics": float(self.run_id_base + i)}
        return exps


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # This test module is not installed: ship its workflow by value to the actor's process.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def test_coordinator_runs_as_a_ray_actor(local_ray):
    config = Config.from_dict({"explorer": {"runner_per_model": 2}})
    actor = RolloutCoordinator.get_actor(config, [SimulatedEngine()])
    ray.get(actor.prepare.remote())
    tasks = [Task(workflow=RayRepeat, repeat_times=4) for _ in range(3)]
    ray.get(actor.submit_batch.remote(batch_id=0, tasks=tasks, batch_type="train"))
    result = ray.get(actor.finalize_train_batch.remote(0), timeout=60)
    assert result["finished_task_count"] == 3
    assert result["metrics"]["rollout/run_metrics/mean"] == 1.5
    batch = ray.get(actor.take_experiences.remote(0))
    assert len(batch) == 12 and isinstance(batch[0], Experience)
    with pytest.raises(ray.exceptions.RayTaskError, match="Batch 0 is not registered"):
        ray.get(actor.finalize_train_batch.remote(0))
    ray.get(actor.shutdown.remote())
