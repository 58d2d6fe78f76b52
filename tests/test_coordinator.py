"""RolloutCoordinator: Trinity's scheduler/coordinator behaviours on our API, plus the
deliberate differences listed in API.md. Engines are real SimulatedEngines."""
from __future__ import annotations

import asyncio
import gc
from typing import ClassVar

import numpy as np
import pytest

from fastrollout import (
    BatchLifecycleState,
    BatchProgress,
    Config,
    EngineDeadError,
    Experience,
    GenerationConfig,
    RolloutCoordinator,
    Task,
    Workflow,
)
from fastrollout.engines import SimulatedEngine
from fastrollout.experience import encode_experiences
from harness import Harness, make_config, tasks, wait_until
from workflows import (
    CALLS,
    AsyncWorkflow,
    RepeatWorkflow,
    SplitSleepWorkflow,
)


@pytest.fixture(autouse=True)
def _fresh_call_counts():
    CALLS.clear()


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
        await coord.submit_batch(batch_id=1, tasks=tasks(6, AsyncWorkflow, repeat=2),
                                 batch_type="train")
        await coord.submit_batch(batch_id="1/gsm8k", tasks=tasks(4, AsyncWorkflow, is_eval=True),
                                 batch_type="eval")
        await coord.submit_batch(batch_id=2, tasks=tasks(3, AsyncWorkflow), batch_type="train")
        r1, ev, r2 = await asyncio.gather(coord.finalize_train_batch(1),
                                          coord.finalize_eval_batch("1/gsm8k"),
                                          coord.finalize_train_batch(2))
        counts = [r["finished_task_count"] for r in (r1, ev, r2)]
        assert counts == [6, 4, 3]
        assert ev["metrics"]["eval/gsm8k/finished_task_count"] == 4.0
        assert "eval/gsm8k/score/mean@1" in ev["metrics"]
        assert not any(k.startswith("experience_pipeline") for k in ev["metrics"])
        assert coord.take_experiences("1/gsm8k") is None    # eval experiences never reach it


async def test_eval_prefix_without_slash():
    async with Harness() as coord:
        await coord.submit_batch(batch_id="holdout", tasks=tasks(2, is_eval=True),
                                 batch_type="eval")
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
        with pytest.raises(ValueError, match=r"task 1 of batch 3: repeat_times must be an int "
                                             r"from 1 to 2147483647, got 0"):
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
        split = Task(workflow=SplitSleepWorkflow, repeat_times=4)
        work = tasks(1, RepeatWorkflow, repeat=2) + [split]
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train", min_wait_num=1)
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 2
        assert state.statuses[1].completed_runs == 2 and not state.statuses[1].ok
        assert len(coord.take_experiences(0)) == 4


async def test_concurrent_finalize_returns_equal_results_and_runs_pipeline_once():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, sleep=0.02),
                                 batch_type="train")
        results = await asyncio.gather(*(coord.finalize_train_batch(0) for _ in range(3)))
        assert results[0] == results[1] == results[2]
        assert len(coord.take_experiences(0)) == 4
        assert coord.take_experiences(0) is None


async def test_abort_then_resubmit_same_id():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, sleep=5),
                                 batch_type="train")
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
        work = tasks(1, AsyncWorkflow) + tasks(1, AsyncWorkflow, sleep=5)
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train")
        state = coord.pending_batches[0]
        await wait_until(lambda: state.completed_task_count == 1)
        await coord.abort_batch(0, reason="x")
        assert state.final_result["finished_task_count"] == 0
        assert coord.take_experiences(0) is None


async def test_abort_wakes_a_waiting_finalize():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, AsyncWorkflow, sleep=5),
                                 batch_type="train")
        waiter = asyncio.ensure_future(coord.finalize_train_batch(0, timeout=30))
        await asyncio.sleep(0.01)
        await coord.abort_batch(0, reason="x")
        result = await asyncio.wait_for(waiter, 1)
        assert result["finished_task_count"] == 0


async def test_a_finished_batch_leaves_no_cyclic_garbage():
    # Reference counting alone must free a released batch: cyclic garbage waits for a full
    # collection, which walks every object of the process (a trainer's included).
    import gc

    async with Harness() as coord:
        gc.collect()
        gc.disable()
        try:
            await coord.submit_batch(batch_id=0, tasks=tasks(300, AsyncWorkflow),
                                     batch_type="train")
            await coord.finalize_train_batch(0, timeout=5)
            assert len(coord.take_experiences(0)) == 300
            await asyncio.sleep(0)      # the batch is dropped on the next loop iteration
            garbage = gc.collect()
        finally:
            gc.enable()
    assert garbage < 50, garbage     # 1,819 when records kept their batch


async def test_all_engines_dead_fails_waiters_at_once():
    engines = [SimulatedEngine(ttft=0.01, die_after=1)]
    async with Harness(make_config(), engines) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, generate=True),
                                 batch_type="train")
        with pytest.raises(EngineDeadError, match="all 1 rollout engines are dead"):
            await asyncio.wait_for(coord.finalize_train_batch(0, timeout=60), 5)


async def test_shutdown_with_work_in_flight_then_prepare_again():
    engine = SimulatedEngine(hang_rate=1.0)
    coord = RolloutCoordinator(make_config(), [engine])
    await coord.prepare()
    await coord.prepare()                 # idempotent
    await coord.submit_batch(batch_id=0, tasks=tasks(3, AsyncWorkflow, generate=True),
                             batch_type="train")
    await wait_until(lambda: engine.num_unfinished_requests == 3)
    await coord.shutdown()
    await coord.shutdown()                # idempotent
    assert engine.num_unfinished_requests == 0 and coord.pending_batches == {}
    engine.hang_rate = 0.0
    await coord.prepare()
    await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, generate=True),
                             batch_type="train")
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


async def test_full_memory_sink_fails_finalize_without_losing_the_batch():
    from fastrollout import PipelineFullError
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




# ---- hostile arguments and results: only the offending call or task fails -----------------

class _BadResult(Workflow):
    """Returns experiences that pass the workflow but not the pipeline, as
    ``workflow_args["spoil"]`` says, for task 1 only; every other task is fine."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        exps = [Experience(tokens=[1, 2, 3, 4], prompt_length=2, reward=1.0,
                           metrics={"score": 1.0}) for _ in range(self.repeat_times)]
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
        if self.task.task_id == 1:
            spoil = self.task.workflow_args["spoil"]
            if spoil == "reward":
                exps[0].reward = "correct"
            elif spoil == "tokens":
                exps[0].tokens = "garbage"
            elif spoil == "prompt_length":
                exps[0].prompt_length = 10**30
            elif spoil == "metric_key":
                exps[0].metrics = {1: 0.5}
        return exps


@pytest.mark.parametrize("spoil,message", [
    ("reward", "reward must be a number or None, got str"),
    ("tokens", "experience 0: Experience.tokens must be 1-D"),
    ("prompt_length", "prompt_length 1000000000000000000000000000000 is outside 0..4"),
    ("metric_key", "metric key 1 (int) is not a str"),
])
async def test_a_result_that_cannot_be_booked_fails_only_its_task(spoil, message):
    async with Harness(make_config(max_retry_times=1)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, _BadResult, repeat=2, spoil=spoil),
                                 batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 3
        assert [state.statuses[i].ok for i in range(3)] == [True, False, True]
        assert message in state.statuses[1].message
        assert len(coord.take_experiences(0)) == 4     # the good tasks' runs
        # nothing stays broken: later batches run as before
        await coord.submit_batch(batch_id=1, tasks=tasks(2), batch_type="train")
        assert (await coord.finalize_train_batch(1, timeout=5))["finished_task_count"] == 2


async def test_a_task_without_generation_config_fails_alone():
    async with Harness() as coord:
        batch = tasks(3)
        batch[1].rollout_args = None
        await coord.submit_batch(batch_id=0, tasks=batch, batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 3
        assert [state.statuses[i].ok for i in range(3)] == [True, False, True]
        assert "cannot start: Task.rollout_args must be a GenerationConfig, got NoneType" \
            in state.statuses[1].message


async def test_repeat_times_beyond_the_ledger_is_refused_at_submit():
    async with Harness() as coord:
        batch = tasks(2)
        batch[0].repeat_times = 2**31
        with pytest.raises(ValueError, match=r"task 0 of batch 0: repeat_times must be an int "
                                             r"from 1 to 2147483647, got 2147483648"):
            await coord.submit_batch(batch_id=0, tasks=batch, batch_type="train")
        assert coord.pending_batches == {}
        await coord.submit_batch(batch_id=0, tasks=tasks(2, repeat=3), batch_type="train")
        assert (await coord.finalize_train_batch(0, timeout=5))["finished_task_count"] == 2


@pytest.mark.parametrize("bad", [1.0, None, (1,), True, b"1"])
async def test_batch_ids_that_are_not_int_or_str_are_refused_before_registering(bad):
    async with Harness() as coord:
        with pytest.raises(TypeError, match="batch_id must be an int or a str"):
            await coord.submit_batch(batch_id=bad, tasks=tasks(2), batch_type="train")
        assert coord.pending_batches == {}
        with pytest.raises(TypeError, match="batch_id must be an int or a str"):
            await coord.abort_batch(bad, reason="test")
    assert coord.pending_batches == {}      # shutdown completed


async def test_numpy_int_batch_ids_are_ints():
    async with Harness() as coord:
        await coord.submit_batch(batch_id=np.int64(7), tasks=tasks(2), batch_type="train")
        assert list(coord.pending_batches) == [7] and type(next(iter(coord.pending_batches))) is int
        result = await coord.finalize_train_batch(np.int32(7), timeout=5)
        assert result["batch_id"] == 7 and type(result["batch_id"]) is int
        assert len(coord.take_experiences(np.int64(7))) == 2


@pytest.mark.parametrize("timeout", [float("nan"), float("-inf"), -1, "5", True])
async def test_finalize_refuses_a_timeout_that_is_not_a_duration(timeout):
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2), batch_type="train")
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds >= 0"):
            await asyncio.wait_for(coord.finalize_train_batch(0, timeout=timeout), 5)
        assert (await coord.finalize_train_batch(0, timeout=5))["finished_task_count"] == 2


@pytest.mark.parametrize("min_wait_num", [0, -1, 2.5, "2", True])
async def test_min_wait_num_must_be_a_positive_int(min_wait_num):
    async with Harness() as coord:
        with pytest.raises(ValueError, match="min_wait_num must be None or a positive int"):
            await coord.submit_batch(batch_id=0, tasks=tasks(2), batch_type="train",
                                     min_wait_num=min_wait_num)
        assert coord.pending_batches == {}
        await coord.submit_batch(batch_id=0, tasks=tasks(2), batch_type="train",
                                 min_wait_num=np.int64(1))
        assert (await coord.finalize_train_batch(0, timeout=5))["finished_task_count"] >= 1


class _MutatesItsTask(Workflow):
    """Changes its rollout_args and raw_task, then fails on its first attempt."""

    is_async = True
    seen: ClassVar[list[tuple[object, ...]]] = []

    async def run_async(self):
        task = self.task
        type(self).seen.append((task.task_id, task.rollout_args.max_tokens, task.raw_task.get("i")))
        task.rollout_args.max_tokens = 1
        task.raw_task.pop("i")
        if CALLS[(task.batch_id, task.task_id)] == 0:
            CALLS[(task.batch_id, task.task_id)] += 1
            raise RuntimeError("first attempt fails")
        return [Experience(tokens=[1, 2], prompt_length=1)]


async def test_tasks_and_retries_do_not_share_rollout_args_or_raw_task():
    _MutatesItsTask.seen = []
    shared = GenerationConfig(max_tokens=16)
    batch = [Task(workflow=_MutatesItsTask, rollout_args=shared, raw_task={"i": i})
             for i in range(2)]
    async with Harness(make_config(max_retry_times=1, runner_per_model=1)) as coord:
        await coord.submit_batch(batch_id=0, tasks=batch, batch_type="train")
        result = await coord.finalize_train_batch(0, timeout=5)
    assert result["finished_task_count"] == 2
    assert sorted(_MutatesItsTask.seen) == [(0, 16, 0), (0, 16, 0), (1, 16, 1), (1, 16, 1)]
    assert shared.max_tokens == 16 and [t.raw_task for t in batch] == [{"i": 0}, {"i": 1}]


async def test_prepare_leaves_the_callers_heap_collectable_by_default(monkeypatch):
    from fastrollout import coordinator as module
    monkeypatch.setattr(module, "_heap_frozen", False)
    frozen = gc.get_freeze_count()
    async with Harness():
        assert gc.get_freeze_count() == frozen
    try:
        async with Harness(Config.from_dict({"freeze_heap": True})):
            assert gc.get_freeze_count() > frozen      # opt-in
    finally:
        gc.unfreeze()


async def test_the_fatal_state_clears_when_an_engine_comes_back():
    engine = SimulatedEngine(ttft=0.01, die_after=1)
    async with Harness(make_config(), [engine]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow, generate=True),
                                 batch_type="train")
        with pytest.raises(EngineDeadError, match="all 1 rollout engines are dead"):
            await asyncio.wait_for(coord.finalize_train_batch(0, timeout=60), 5)
        engine.restart()
        # the queued work was kept and runs now; nothing else is left failing
        result = await asyncio.wait_for(coord.finalize_train_batch(0, timeout=5), 5)
        assert result["finished_task_count"] == 4
        await coord.submit_batch(batch_id=1, tasks=tasks(2, AsyncWorkflow, generate=True),
                                 batch_type="train")
        assert (await coord.finalize_train_batch(1, timeout=5))["finished_task_count"] == 2


async def test_batch_progress_reads_the_ledger():
    async with Harness(make_config(runner_per_model=2)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, sleep=0.2)
                                 + tasks(3, AsyncWorkflow), batch_type="train")
        assert coord.batch_progress(0) == BatchProgress(5, 5, 0, 0, 0, 0, 0)
        await asyncio.sleep(0.05)       # two slow tasks started, on the two slots
        assert coord.batch_progress(0) == BatchProgress(5, 3, 2, 0, 0, 0, 0)
        await coord.finalize_train_batch(0, timeout=5)
        with pytest.raises(KeyError, match="Batch 0 is not registered"):
            coord.batch_progress(0)


async def test_bench_mode_runs_no_pipeline_and_serve_mode_no_scheduler():
    payload = encode_experiences([Experience(tokens=[1, 2, 3], prompt_length=1, reward=1.0)])
    async with Harness(Config.from_dict({"mode": "bench"})) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3), batch_type="train")
        result = await coord.finalize_train_batch(0, timeout=5)
        assert result["finished_task_count"] == 3
        assert not any(k.startswith("experience_pipeline/") for k in result["metrics"])
        with pytest.raises(RuntimeError, match="mode 'bench' runs no experience pipeline"):
            await coord.process_experiences([payload])
    coord = RolloutCoordinator(Config.from_dict({"mode": "serve"}), [])
    await coord.prepare()
    try:
        metrics = await coord.process_experiences([payload])
        assert metrics["experience_pipeline/experience_count"] == 1.0
        with pytest.raises(RuntimeError, match="mode 'serve' runs no scheduler"):
            await coord.submit_batch(batch_id=0, tasks=tasks(1), batch_type="train")
    finally:
        await coord.shutdown()
    async with Harness(Config.from_dict({"mode": "colocate"})) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2), batch_type="train")
        assert (await coord.finalize_train_batch(0, timeout=5))["finished_task_count"] == 2


# ---- weight sync: new weights on every engine between batches, versions on experiences ----

async def test_update_weights_reaches_every_engine_and_stamps_the_next_rollouts():
    engines = [SimulatedEngine(seed=0), SimulatedEngine(seed=1)]
    async with Harness(make_config(), engines) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(4, AsyncWorkflow), batch_type="train")
        await coord.finalize_train_batch(0, timeout=5)
        before = coord.take_experiences(0)
        assert coord.model_version == 0
        assert await coord.update_weights("checkpoint-1") == 1
        assert [e.model_version for e in engines] == [1, 1] and coord.model_version == 1
        await coord.submit_batch(batch_id=1, tasks=tasks(4, AsyncWorkflow), batch_type="train")
        await coord.finalize_train_batch(1, timeout=5)
        after = coord.take_experiences(1)
    assert {info["model_version"] for info in before.meta("info")} == {0}
    assert {info["model_version"] for info in after.meta("info")} == {1}
    assert {info["model_version_drift"] for info in after.meta("info")} == {0}


async def test_update_weights_needs_engines_that_can():
    class NoUpdates(SimulatedEngine):
        update_weights = None

    async with Harness(make_config(), [NoUpdates()]) as coord:
        with pytest.raises(TypeError,
                           match=r"rollout engine 0 \(NoUpdates\) has no update_weights"):
            await coord.update_weights("checkpoint")
