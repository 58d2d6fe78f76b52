"""The scheduler: batch priority, dispatch onto the least-loaded engine, sub-task splitting,
engine death, dynamic timeouts, and the ledger's view of a batch's progress."""
from __future__ import annotations

import pytest

from fastrollout import RolloutCoordinator
from fastrollout.engines import SimulatedEngine
from fastrollout.scheduler import batch_priority
from harness import Harness, make_config, tasks
from loopticks import LoopTicks
from workflows import (
    CALLS,
    AsyncWorkflow,
    RepeatWorkflow,
)


@pytest.fixture(autouse=True)
def _fresh_call_counts():
    CALLS.clear()


def test_batch_priority_matches_trinity_order():
    ids = ["zeta", 2, "1/eval", 1, "10/x", "2/gsm8k", 10, "alpha"]
    expected = [1, "1/eval", 2, "2/gsm8k", 10, "10/x", "alpha", "zeta"]
    assert sorted(ids, key=batch_priority) == expected


async def test_batch_priority_order():
    order = []

    class Recording(AsyncWorkflow):
        async def run_async(self):
            order.append(self.task.batch_id)
            return await super().run_async()

    engine = SimulatedEngine()
    coord = RolloutCoordinator(make_config(runner_per_model=1), [engine])
    await coord.prepare()
    try:
        # The single slot is busy while the three batches are queued.
        await coord.submit_batch(batch_id=0, tasks=tasks(1, AsyncWorkflow, sleep=0.05),
                                 batch_type="train")
        await coord.submit_batch(batch_id=2, tasks=tasks(2, Recording), batch_type="train")
        await coord.submit_batch(batch_id="1/eval", tasks=tasks(1, Recording, is_eval=True),
                                 batch_type="eval")
        await coord.submit_batch(batch_id="other", tasks=tasks(1, Recording, is_eval=True),
                                 batch_type="eval")
        await coord.submit_batch(batch_id=1, tasks=tasks(2, Recording), batch_type="train")
        for b in (0, 1, 2):
            await coord.finalize_train_batch(b)
        await coord.finalize_eval_batch("1/eval")
        await coord.finalize_eval_batch("other")
        assert order == [1, 1, "1/eval", 2, 2, "other"]
    finally:
        await coord.shutdown()


async def test_load_aware_dispatch_across_engines():
    engines = [SimulatedEngine(ttft=0.01), SimulatedEngine(ttft=0.01)]
    async with Harness(make_config(runner_per_model=2), engines) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(8, AsyncWorkflow, generate=True),
                                 batch_type="train")
        await coord.finalize_train_batch(0)
        assert engines[0].requests_received == engines[1].requests_received == 4


async def test_workflows_that_never_suspend_do_not_hold_the_loop():
    # One slot runs every task back to back in one worker; it must still let others run.
    async with Harness(make_config(runner_per_model=1)) as coord, LoopTicks() as ticks:
        await coord.submit_batch(batch_id=0, tasks=tasks(640, AsyncWorkflow), batch_type="train")
        before = ticks.count
        result = await coord.finalize_train_batch(0, timeout=30)
        during = ticks.count - before
    assert result["finished_task_count"] == 640
    assert during >= 20     # the worker yields every few tasks (here ~40 times)


async def test_repeat_splitting_gives_unique_run_ids():
    async with Harness(make_config(max_repeat_times_per_runner=3)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, RepeatWorkflow, repeat=8),
                                 batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0)
        assert result["finished_task_count"] == 2
        assert all(s.ok and s.total_runs == 8 for s in state.statuses.values())
        exps = coord.take_experiences(0).to_experiences()
        assert len(exps) == 16
        assert len({e.eid.rid for e in exps}) == 16 and len({e.eid.uid for e in exps}) == 16
        assert {e.eid.tid for e in exps} == {"0/0", "0/1"}
        assert sorted(e.eid.run for e in exps if e.eid.task == 0) == list(range(8))
        # run_metrics are 0..7 per task whatever the split: the task mean is 3.5
        assert result["metrics"]["rollout/run_metrics/mean"] == 3.5


async def test_engine_death_moves_work_to_live_engines():
    engines = [SimulatedEngine(die_after=2), SimulatedEngine()]
    async with Harness(make_config(runner_per_model=2), engines) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(12, AsyncWorkflow, generate=True),
                                 batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0)
        assert result["finished_task_count"] == 12
        assert all(s.ok for s in state.statuses.values())
        assert engines[0].is_dead


async def test_dynamic_timeout_fails_slow_tasks_after_warmup():
    config = make_config(max_timeout=5.0, dynamic_timeout={"enable": True, "ratio": 3.0,
                                                           "warmup_min_steps": 1})
    async with Harness(config) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, sleep=0.02),
                                 batch_type="train")
        await coord.finalize_train_batch(0)
        # Eval tasks do not feed the mean, however slow they are.
        await coord.submit_batch(batch_id="0/e",
                                 tasks=tasks(2, AsyncWorkflow, sleep=0.3, is_eval=True),
                                 batch_type="eval")
        ev_state = coord.pending_batches["0/e"]
        await coord.finalize_eval_batch("0/e")
        assert all(s.ok for s in ev_state.statuses.values())   # and are not subject to it
        await coord.submit_batch(batch_id=1, tasks=tasks(2, AsyncWorkflow, sleep=1.0),
                                 batch_type="train")
        state = coord.pending_batches[1]
        await coord.finalize_train_batch(1)
        assert not any(s.ok for s in state.statuses.values())
        assert all("Timeout (" in s.message for s in state.statuses.values())


async def test_auxiliary_models_are_spread_over_slots_like_trinity():
    class JudgeWorkflow(AsyncWorkflow):
        async def run_async(self):
            judged = await self.auxiliary_models[0].generate_async(["judge this"])
            exps = await super().run_async()
            exps[0].metrics = {"judge_tokens": float(len(judged[0].tokens))}
            return exps

    rollout = [SimulatedEngine(ttft=0.005)]
    judges = [SimulatedEngine(ttft=0.005, seed=1), SimulatedEngine(ttft=0.005, seed=2)]
    coord = RolloutCoordinator(make_config(runner_per_model=4), rollout, [judges])
    await coord.prepare()
    try:
        await coord.submit_batch(batch_id=0, tasks=tasks(8, JudgeWorkflow), batch_type="train")
        result = await coord.finalize_train_batch(0)
        assert result["metrics"]["rollout/judge_tokens/mean"] > 0
        # slot i uses auxiliary engine i % 2: both judges share the work
        assert judges[0].requests_received == judges[1].requests_received == 4
    finally:
        await coord.shutdown()
