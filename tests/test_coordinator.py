"""RolloutCoordinator: Trinity's scheduler/coordinator behaviours on our API, plus the
deliberate differences listed in API.md. Engines are real SimulatedEngines."""
from __future__ import annotations

import asyncio
import types

import pytest

from fastrollout import (BatchLifecycleState, Config, EngineDeadError,
                         RolloutCoordinator, Task, Workflow)
from fastrollout.engines import SimulatedEngine

from loopticks import LoopTicks
from workflows import (CALLS, AsyncWorkflow, RepeatWorkflow, ResettableWorkflow, StubbornWorkflow,
                       SyncWorkflow)


@pytest.fixture(autouse=True)
def _fresh_call_counts():
    CALLS.clear()


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


async def test_several_batches_in_sequence():
    async with Harness() as coord:
        for step in range(3):
            await coord.submit_batch(batch_id=step, tasks=tasks(5, repeat=2), batch_type="train")
            result = await coord.finalize_train_batch(step)
            assert result["batch_id"] == step and result["batch_type"] == "train"
            assert result["finished_task_count"] == 5
            assert result["metrics"]["rollout/finished_task_count"] == 5.0
            assert "rollout/time/task_execution/mean" in result["metrics"]
            assert result["metrics"]["experience_pipeline/experience_count"] == 10.0
            exps = coord.take_experiences(step)
            assert len(exps) == 10
            assert coord.pending_batches == {}


async def test_concurrent_batches_and_eval():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=1, tasks=tasks(6, AsyncWorkflow, repeat=2), batch_type="train")
        await coord.submit_batch(batch_id="1/gsm8k", tasks=tasks(4, AsyncWorkflow, is_eval=True),
                                 batch_type="eval")
        await coord.submit_batch(batch_id=2, tasks=tasks(3, AsyncWorkflow), batch_type="train")
        r1, ev, r2 = await asyncio.gather(coord.finalize_train_batch(1),
                                          coord.finalize_eval_batch("1/gsm8k"),
                                          coord.finalize_train_batch(2))
        assert (r1["finished_task_count"], ev["finished_task_count"], r2["finished_task_count"]) == (6, 4, 3)
        assert ev["metrics"]["eval/gsm8k/finished_task_count"] == 4.0
        assert "eval/gsm8k/score/mean@1" in ev["metrics"]
        assert not any(k.startswith("experience_pipeline") for k in ev["metrics"])
        assert coord.take_experiences("1/gsm8k") is None    # eval experiences never reach it


async def test_eval_prefix_without_slash():
    async with Harness() as coord:
        await coord.submit_batch(batch_id="holdout", tasks=tasks(2, is_eval=True), batch_type="eval")
        result = await coord.finalize_eval_batch("holdout")
        assert result["metrics"]["eval/holdout/finished_task_count"] == 2.0


async def test_errors_match_trinity_wording():
    coord = RolloutCoordinator(make_config(), [SimulatedEngine()])
    with pytest.raises(RuntimeError, match="prepare"):
        await coord.submit_batch(batch_id=0, tasks=tasks(1), batch_type="train")
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, sleep=0.05), batch_type="train")
        with pytest.raises(ValueError, match=r"^Batch 0 is already active\.$"):
            await coord.submit_batch(batch_id=0, tasks=tasks(1), batch_type="train")
        with pytest.raises(KeyError, match=r"Batch 7 is not registered\."):
            await coord.finalize_train_batch(7)
        with pytest.raises(ValueError, match=r"^Batch 0 is train, expected eval\.$"):
            await coord.finalize_eval_batch(0)
        await coord.finalize_train_batch(0)


async def test_bad_tasks_are_refused_at_submission_naming_them():
    # Queued tasks are only looked at when they start, so submission checks them first.
    async with Harness() as coord:
        with pytest.raises(TypeError, match=r"task 1 of batch 3: expected a fastrollout.Task, "
                                            r"got dict"):
            await coord.submit_batch(batch_id=3, tasks=tasks(1) + [{"prompt": "x"}],
                                     batch_type="train")
        bad = tasks(2)
        bad[1].repeat_times = 0
        with pytest.raises(ValueError, match=r"task 1 of batch 3: repeat_times must be a "
                                             r"positive int, got 0"):
            await coord.submit_batch(batch_id=3, tasks=bad, batch_type="train")
        assert 3 not in coord.pending_batches
        await coord.submit_batch(batch_id=3, tasks=tasks(2), batch_type="train")
        assert (await coord.finalize_train_batch(3, timeout=5))["finished_task_count"] == 2


async def test_empty_batch_finalizes_at_once():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=[], batch_type="train")
        assert coord.pending_batches[0].state == BatchLifecycleState.PENDING
        result = await coord.finalize_train_batch(0, timeout=1)
        assert result["finished_task_count"] == 0


async def test_attempt_timeout_fails_task_after_retries():
    config = make_config(max_timeout=0.05, max_retry_times=2)
    async with Harness(config) as coord:
        await coord.submit_batch(batch_id="5/x", tasks=tasks(2, AsyncWorkflow, sleep=5),
                                 batch_type="eval")
        state = coord.pending_batches["5/x"]
        result = await coord.finalize_eval_batch("5/x", timeout=5)
        # Failed tasks are finished (Trinity counts them), with ok False.
        assert result["finished_task_count"] == 2
        assert CALLS[("5/x", 0)] == 3       # max_retry_times=2: three attempts
        status = state.statuses[0]
        assert not status.ok and status.completed_runs == 0
        # The per-attempt timeout is max_timeout itself (Trinity 0.6.0 used 3x).
        assert "Timeout (0.05 s) when running task of batch 5/x at runner" in status.message
        assert "at attempt 3" in status.message
        assert "time/task_execution" in status.metrics[0]


async def test_exceptions_are_retried_and_reported():
    async with Harness(make_config(max_retry_times=2)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, fail=True) + tasks(1, fail_times=1),
                                 batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0)
        assert result["finished_task_count"] == 2
        failing, flaky = state.statuses[0], state.statuses[1]
        assert not failing.ok and "RuntimeError: injected failure in task 0" in failing.message
        assert "Traceback" in failing.message
        assert CALLS[(0, 0)] == 3
        assert flaky.ok and CALLS[(0, 1)] == 2


async def test_finalize_timeout_loses_nothing():
    async with Harness() as coord:
        work = tasks(3, AsyncWorkflow) + tasks(1, AsyncWorkflow, sleep=0.3)
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train")
        with pytest.raises(TimeoutError, match=r"^Timeout waiting for batch 0\.$"):
            await coord.finalize_train_batch(0, timeout=0.1)
        state = coord.pending_batches[0]
        assert state.completed_task_count == 3 and state.state == BatchLifecycleState.RUNNING
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 4
        assert len(coord.take_experiences(0)) == 4     # the early tasks' experiences too


async def test_min_wait_num_not_reached_is_a_timeout():
    # Trinity 0.6.0 accepted any non-zero count at the timeout; we honour min_wait_num.
    async with Harness() as coord:
        work = tasks(1, AsyncWorkflow) + tasks(3, AsyncWorkflow, sleep=0.5)
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train", min_wait_num=2)
        with pytest.raises(TimeoutError):
            await coord.finalize_train_batch(0, timeout=0.05)
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] >= 2


async def test_over_rollout_returns_tasks_done_within_wait_after_min():
    config = make_config(over_rollout={"ratio": 0.5, "wait_after_min": 0.05})
    async with Harness(config) as coord:
        work = tasks(4, AsyncWorkflow) + tasks(4, AsyncWorkflow, sleep=5)
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train", min_wait_num=4)
        result = await coord.finalize_train_batch(0, timeout=10)
        assert result["finished_task_count"] == 4
        assert len(coord.take_experiences(0)) == 4
        # The slow tasks were cancelled and their slots freed: a new batch runs at once.
        await coord.submit_batch(batch_id=1, tasks=tasks(8, AsyncWorkflow), batch_type="train")
        assert (await coord.finalize_train_batch(1, timeout=5))["finished_task_count"] == 8


async def test_over_rollout_returns_partial_tasks():
    config = make_config(max_repeat_times_per_runner=2,
                         over_rollout={"wait_after_min": 0.05, "return_partial_tasks": True})
    async with Harness(config) as coord:
        SplitSleepWorkflow.fast_done = False
        work = tasks(1, RepeatWorkflow, repeat=2) + [Task(workflow=SplitSleepWorkflow, repeat_times=4)]
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train", min_wait_num=1)
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 2
        assert state.statuses[1].completed_runs == 2 and not state.statuses[1].ok
        assert len(coord.take_experiences(0)) == 4


async def test_repeat_splitting_gives_unique_run_ids():
    async with Harness(make_config(max_repeat_times_per_runner=3)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, RepeatWorkflow, repeat=8), batch_type="train")
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


@pytest.mark.parametrize("repeat,mean", [(4, 1.5), (8, 3.5)])
async def test_repeatable_workflow_metrics(repeat, mean):
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, RepeatWorkflow, repeat=repeat),
                                 batch_type="train")
        result = await coord.finalize_train_batch(0)
        assert result["metrics"]["rollout/run_metrics/mean"] == mean


async def test_non_repeatable_runs_get_run_ids_and_reset_reuse():
    ResettableWorkflow.instances = 0
    async with Harness(make_config(runner_per_model=1)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, ResettableWorkflow, repeat=4),
                                 batch_type="train")
        await coord.finalize_train_batch(0)
        exps = coord.take_experiences(0).to_experiences()
        assert sorted(e.eid.run for e in exps if e.eid.task == 1) == [0, 1, 2, 3]
        # One slot, sequential mode: one instance reset for every later run.
        assert ResettableWorkflow.instances == 1


@pytest.mark.parametrize("mode", ["sequential", "asynchronous", "multi-threading"])
@pytest.mark.parametrize("workflow", [SyncWorkflow, AsyncWorkflow])
async def test_concurrent_modes(mode, workflow):
    async with Harness(make_config(concurrent_mode=mode)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, workflow, repeat=3), batch_type="train")
        result = await coord.finalize_train_batch(0)
        assert result["finished_task_count"] == 3
        assert result["metrics"]["rollout/score/mean"] == 1.0
        exps = coord.take_experiences(0).to_experiences()
        assert sorted((e.eid.task, e.eid.run) for e in exps) == [(t, r) for t in range(3) for r in range(3)]
        assert all(e.info["model_version"] == 0 and e.info["use_count"] == 0 for e in exps)


async def test_concurrent_finalize_returns_equal_results_and_runs_pipeline_once():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, sleep=0.02), batch_type="train")
        results = await asyncio.gather(*(coord.finalize_train_batch(0) for _ in range(3)))
        assert results[0] == results[1] == results[2]
        assert len(coord.take_experiences(0)) == 4
        assert coord.take_experiences(0) is None


async def test_abort_then_resubmit_same_id():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, sleep=5), batch_type="train")
        await coord.abort_batch(0, reason="test")
        assert 0 not in coord.pending_batches
        await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow), batch_type="train")
        assert (await coord.finalize_train_batch(0))["finished_task_count"] == 2


async def test_abort_keeps_partial_results_when_asked():
    config = make_config(concurrent_mode="asynchronous", max_repeat_times_per_runner=2,
                         runner_per_model=8)
    async with Harness(config) as coord:
        # Task 0 completes; task 1 has a fast sub-task (runs 0-1) and a hanging one (runs 2-3).
        work = tasks(1, RepeatWorkflow, repeat=2) + [
            Task(workflow=SplitSleepWorkflow, repeat_times=4)]
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train")
        state = coord.pending_batches[0]
        await wait_until(lambda: state.completed_task_count == 1 and SplitSleepWorkflow.fast_done)
        await coord.abort_batch(0, reason="step skipped", keep_partial_results=True)
        result = state.final_result
        assert state.state == BatchLifecycleState.ABORTED
        assert result["finished_task_count"] == 2
        partial = state.statuses[1]
        assert partial.completed_runs == 2 and partial.total_runs == 4
        assert partial.message.startswith("2/4 runs completed successfully.")
        assert len(coord.take_experiences(0)) == 4    # 2 + the partial task's 2


async def test_abort_without_keep_discards_results():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, AsyncWorkflow) + tasks(1, AsyncWorkflow, sleep=5),
                                 batch_type="train")
        state = coord.pending_batches[0]
        await wait_until(lambda: state.completed_task_count == 1)
        await coord.abort_batch(0, reason="x")
        assert state.final_result["finished_task_count"] == 0
        assert coord.take_experiences(0) is None


async def test_abort_wakes_a_waiting_finalize():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, AsyncWorkflow, sleep=5), batch_type="train")
        waiter = asyncio.ensure_future(coord.finalize_train_batch(0, timeout=30))
        await asyncio.sleep(0.01)
        await coord.abort_batch(0, reason="x")
        result = await asyncio.wait_for(waiter, 1)
        assert result["finished_task_count"] == 0


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
        await coord.submit_batch(batch_id=0, tasks=tasks(1, AsyncWorkflow, sleep=0.05), batch_type="train")
        await coord.submit_batch(batch_id=2, tasks=tasks(2, Recording), batch_type="train")
        await coord.submit_batch(batch_id="1/eval", tasks=tasks(1, Recording, is_eval=True), batch_type="eval")
        await coord.submit_batch(batch_id="other", tasks=tasks(1, Recording, is_eval=True), batch_type="eval")
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


async def test_attempt_timers_outlive_workers_and_go_at_shutdown():
    # Cancelling every worker's loop timer as a batch ends would delay the finalize waiting
    # for it (measured: ~50 us with 64 slots), so a slot keeps its timer for its next worker.
    harness = Harness(make_config(runner_per_model=4))
    async with harness as coord:
        scheduler = coord._scheduler
        await coord.submit_batch(batch_id=0, tasks=tasks(20, AsyncWorkflow), batch_type="train")
        await coord.finalize_train_batch(0, timeout=5)
        timers = [slot.timer for slot in scheduler._slots]
        assert all(t is not None and t.task is None and t.handle is not None for t in timers)
    assert all(slot.timer is None for slot in scheduler._slots)
    assert all(t.handle is None for t in timers)


async def test_a_finished_batch_leaves_no_cyclic_garbage():
    # Reference counting alone must free a released batch: cyclic garbage waits for a full
    # collection, which walks every object of the process (a trainer's included).
    import gc

    async with Harness() as coord:
        gc.collect()
        gc.disable()
        try:
            await coord.submit_batch(batch_id=0, tasks=tasks(300, AsyncWorkflow), batch_type="train")
            await coord.finalize_train_batch(0, timeout=5)
            assert len(coord.take_experiences(0)) == 300
            await asyncio.sleep(0)      # the batch is dropped on the next loop iteration
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 50, garbage     # 1,819 when records kept their batch


async def test_a_slow_task_after_many_fast_ones_times_out_on_its_own_deadline():
    # The worker's timer is armed by the first fast attempt and re-armed lazily; the slow
    # task must get its full max_timeout, measured from its own start.
    async with Harness(make_config(runner_per_model=1, max_timeout=0.3)) as coord:
        batch = tasks(50, AsyncWorkflow) + tasks(1, AsyncWorkflow, sleep=0.2) \
            + tasks(1, AsyncWorkflow, sleep=5)
        await coord.submit_batch(batch_id=0, tasks=batch, batch_type="train")
        state = coord.pending_batches[0]
        loop = asyncio.get_running_loop()
        start = loop.time()
        await coord.finalize_train_batch(0, timeout=10)
        assert loop.time() - start < 2
        assert all(state.statuses[i].ok for i in range(51))
        assert not state.statuses[51].ok and "Timeout (0.3 s)" in state.statuses[51].message


class _AbortFails(SimulatedEngine):
    async def abort(self, request_ids):
        raise RuntimeError("abort refused")


class _LeavesRequest(Workflow):
    """Returns while a request it started is still in flight (the runner must abort it)."""

    is_async = True
    started: list = []

    async def run_async(self):
        self.started.append(asyncio.ensure_future(self.model.generate_async(["hi"])))
        await asyncio.sleep(0)      # the request is now in flight
        return []


async def test_an_error_outside_the_workflow_reaches_finalize_with_ids():
    # The runner's clean-up abort raises: not the workflow's fault, so not a failed run;
    # finalize must get the error, naming batch and task, instead of waiting for the task.
    async with Harness(make_config(), [_AbortFails(hang_rate=1.0)]) as coord:
        try:
            await coord.submit_batch(batch_id=0, tasks=tasks(1, _LeavesRequest),
                                     batch_type="train")
            with pytest.raises(RuntimeError, match="internal error while finishing task 0 of "
                                                   "batch 0.*abort refused"):
                await coord.finalize_train_batch(0, timeout=5)
        finally:
            for request in _LeavesRequest.started:
                request.cancel()
            await asyncio.gather(*_LeavesRequest.started, return_exceptions=True)
            _LeavesRequest.started.clear()


class _ReturnsNonsense(Workflow):
    """Returns something that has metrics but is no experience (no eid, no info)."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        return [types.SimpleNamespace(metrics={})]


@pytest.mark.parametrize("workflow", [_ReturnsNonsense, "sequential"])
async def test_a_workflow_returning_nonsense_fails_its_task_not_the_coordinator(workflow):
    # Reading the experiences (their metrics, ids) is part of the run: a workflow that returns
    # something else fails its own task, with the error in the status; the batch finishes.
    if workflow == "sequential":
        class workflow(_ReturnsNonsense):   # noqa: N801 -- one run per repeat
            can_repeat = False
    async with Harness(make_config(max_retry_times=1), [SimulatedEngine()]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, workflow, repeat=2)
                                 + tasks(1, RepeatWorkflow, repeat=2), batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 4
        assert len(coord.take_experiences(0)) == 2      # RepeatWorkflow's two runs
        assert [state.statuses[i].ok for i in range(4)] == [False, False, False, True]
        assert "AttributeError" in state.statuses[0].message


async def test_timed_out_run_aborts_its_engine_request():
    engine = SimulatedEngine(hang_rate=1.0)
    async with Harness(make_config(max_timeout=0.05), [engine]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, generate=True), batch_type="train")
        state = coord.pending_batches[0]
        await coord.finalize_train_batch(0, timeout=5)
        assert not any(s.ok for s in state.statuses.values())
        assert engine.num_unfinished_requests == 0


async def test_abort_aborts_engine_requests_of_sync_workflows():
    engine = SimulatedEngine(hang_rate=1.0)
    async with Harness(make_config(), [engine]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, SyncWorkflow, generate=True), batch_type="train")
        await wait_until(lambda: engine.num_unfinished_requests == 3)
        await coord.abort_batch(0, reason="x")
        assert engine.num_unfinished_requests == 0


async def test_sync_run_past_its_timeout_is_detached_and_its_slot_freed():
    async with Harness(make_config(runner_per_model=1, max_timeout=0.05)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, SyncWorkflow, sleep=0.5) + tasks(2, SyncWorkflow),
                                 batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=0.4)
        assert result["finished_task_count"] == 3
        assert not state.statuses[0].ok and state.statuses[1].ok and state.statuses[2].ok
        assert coord.detached_runs == 1


async def test_workflow_ignoring_cancellation_is_detached_not_waited_on(monkeypatch):
    import fastrollout.coordinator as mod
    monkeypatch.setattr(mod, "CANCEL_GRACE", 0.05)
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, StubbornWorkflow, linger=0.3), batch_type="train")
        await asyncio.sleep(0.01)
        await coord.abort_batch(0, reason="x")
        assert coord.detached_tasks == 1
        await asyncio.sleep(0.4)        # let it end before the test's leak check


async def test_engine_death_moves_work_to_live_engines():
    engines = [SimulatedEngine(die_after=2), SimulatedEngine()]
    async with Harness(make_config(runner_per_model=2), engines) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(12, AsyncWorkflow, generate=True), batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0)
        assert result["finished_task_count"] == 12
        assert all(s.ok for s in state.statuses.values())
        assert engines[0].is_dead


async def test_all_engines_dead_fails_waiters_at_once():
    engines = [SimulatedEngine(ttft=0.01, die_after=1)]
    async with Harness(make_config(), engines) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, generate=True), batch_type="train")
        with pytest.raises(EngineDeadError, match="all 1 rollout engines are dead"):
            await asyncio.wait_for(coord.finalize_train_batch(0, timeout=60), 5)


async def test_dynamic_timeout_fails_slow_tasks_after_warmup():
    config = make_config(max_timeout=5.0, dynamic_timeout={"enable": True, "ratio": 3.0,
                                                           "warmup_min_steps": 1})
    async with Harness(config) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, sleep=0.02), batch_type="train")
        await coord.finalize_train_batch(0)
        # Eval tasks do not feed the mean, however slow they are.
        await coord.submit_batch(batch_id="0/e", tasks=tasks(2, AsyncWorkflow, sleep=0.3, is_eval=True),
                                 batch_type="eval")
        ev_state = coord.pending_batches["0/e"]
        await coord.finalize_eval_batch("0/e")
        assert all(s.ok for s in ev_state.statuses.values())   # and are not subject to it
        await coord.submit_batch(batch_id=1, tasks=tasks(2, AsyncWorkflow, sleep=1.0), batch_type="train")
        state = coord.pending_batches[1]
        await coord.finalize_train_batch(1)
        assert not any(s.ok for s in state.statuses.values())
        assert all("Timeout (" in s.message for s in state.statuses.values())


async def test_shutdown_with_work_in_flight_then_prepare_again():
    engine = SimulatedEngine(hang_rate=1.0)
    coord = RolloutCoordinator(make_config(), [engine])
    await coord.prepare()
    await coord.prepare()                 # idempotent
    await coord.submit_batch(batch_id=0, tasks=tasks(3, AsyncWorkflow, generate=True), batch_type="train")
    await wait_until(lambda: engine.num_unfinished_requests == 3)
    await coord.shutdown()
    await coord.shutdown()                # idempotent
    assert engine.num_unfinished_requests == 0 and coord.pending_batches == {}
    engine.hang_rate = 0.0
    await coord.prepare()
    await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, generate=True), batch_type="train")
    assert (await coord.finalize_train_batch(0))["finished_task_count"] == 2
    await coord.shutdown()


async def test_process_experiences_accepts_our_payloads_and_refuses_garbage():
    from fastrollout import PayloadError
    from fastrollout.experience import encode_experiences
    from workflows import _experience
    async with Harness() as coord:
        payload = encode_experiences([_experience(None, i) for i in range(3)])
        metrics = await coord.process_experiences([payload, payload])
        assert metrics["experience_pipeline/experience_count"] == 6.0
        with pytest.raises(PayloadError, match="payload 1"):
            await coord.process_experiences([payload, b"garbage!"])


class SplitSleepWorkflow(RepeatWorkflow):
    """Sub-task with run_id_base 0 returns at once; later sub-tasks hang."""

    fast_done = False

    async def run_async(self):
        if self.run_id_base:
            await asyncio.sleep(30)
        exps = await super().run_async()
        type(self).fast_done = True
        return exps


async def wait_until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


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


class _RecordsRequestIds(SimulatedEngine):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.request_ids = []

    async def generate(self, prompt_token_ids, params, *, request_id):
        self.request_ids.append(request_id)
        return await super().generate(prompt_token_ids, params, request_id=request_id)


async def test_request_ids_name_batch_task_run_and_attempt():
    # "{batch}/{task}/{run_id_base}/{attempt}-{k}", "/aux{j}" for auxiliary models: the ids
    # by which an attempt's requests are aborted, and which engines log.
    class TwoRequests(Workflow):
        is_async = True

        async def run_async(self):
            await self.model.generate_async(["a"])
            await self.auxiliary_models[0].generate_async(["judge"])
            if self.task.raw_task["i"] == 1 and self.task.workflow_args.setdefault("tries", 0) < 1:
                self.task.workflow_args["tries"] += 1
                raise RuntimeError("first attempt fails")
            return await self.model.generate_async(["b"])

    rollout, judge = _RecordsRequestIds(), _RecordsRequestIds(seed=1)
    coord = RolloutCoordinator(make_config(runner_per_model=1, max_retry_times=1,
                                           max_repeat_times_per_runner=2),
                               [rollout], [[judge]])
    await coord.prepare()
    try:
        await coord.submit_batch(batch_id="3/eval", tasks=tasks(2, TwoRequests, repeat=3),
                                 batch_type="eval")
        await coord.finalize_eval_batch("3/eval", timeout=5)
    finally:
        await coord.shutdown()
    # Task 0: two sub-tasks (runs 0-1 and 2), sequential runs share a client per attempt.
    assert rollout.request_ids[:6] == ["3/eval/0/0/1-1", "3/eval/0/0/1-2", "3/eval/0/0/1-3",
                                       "3/eval/0/0/1-4", "3/eval/0/2/1-1", "3/eval/0/2/1-2"]
    assert "3/eval/1/0/2-1" in rollout.request_ids      # task 1's second attempt
    assert judge.request_ids[:3] == ["3/eval/0/0/1/aux0-1", "3/eval/0/0/1/aux0-2",
                                     "3/eval/0/2/1/aux0-1"]


async def test_full_memory_sink_fails_finalize_without_losing_the_batch():
    from fastrollout.pipeline import PipelineFullError
    config = Config.from_dict({"explorer": {"runner_per_model": 4},
                               "pipeline": {"max_buffered_experiences": 4}})
    async with Harness(config) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow), batch_type="train")
        await coord.finalize_train_batch(0)
        await coord.submit_batch(batch_id=1, tasks=tasks(2, AsyncWorkflow), batch_type="train")
        with pytest.raises(PipelineFullError, match="take_experiences"):
            await coord.finalize_train_batch(1)
        assert coord.pending_batches[1].state == BatchLifecycleState.RUNNING
        assert len(coord.take_experiences(0)) == 4
        assert (await coord.finalize_train_batch(1))["finished_task_count"] == 2
        assert len(coord.take_experiences(1)) == 2


async def test_a_failed_retry_does_not_keep_the_earlier_attempts_experiences():
    class HalfThenHang(AsyncWorkflow):
        """Attempt 1: run 0 succeeds, run 1 fails. Attempt 2: hangs past the timeout."""

        async def run_async(self):
            key = ("attempts", self.task.task_id)
            CALLS[key] += 1
            if CALLS[key] == 2:
                raise RuntimeError("second run of attempt 1 fails")
            if CALLS[key] > 2:
                await asyncio.sleep(5)
            return await super().run_async()

    config = make_config(max_retry_times=1, max_timeout=0.1)   # sequential, no partial runs
    async with Harness(config) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, HalfThenHang, repeat=2),
                                 batch_type="train")
        state = coord.pending_batches[0]
        await coord.finalize_train_batch(0, timeout=5)
        assert state.statuses[0].completed_runs == 0
        assert coord.take_experiences(0) is None
