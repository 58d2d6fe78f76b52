"""The slot worker: attempts, retries, per-attempt timeouts (its AttemptTimer), model clients
and the engine requests they leave, detaching from cancelled work."""
from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
from typing import ClassVar

import pytest

from fastrollout import RolloutCoordinator, Workflow
from fastrollout.engines import SimulatedEngine
from fastrollout.slot_worker import AttemptTimer
from harness import Harness, make_config, tasks, wait_until
from workflows import (
    CALLS,
    AsyncWorkflow,
    StubbornWorkflow,
    SyncWorkflow,
)


@pytest.fixture(autouse=True)
def _fresh_call_counts():
    CALLS.clear()


# ---- AttemptTimer: one lazily re-armed loop timer for a worker's attempts ----------------

async def _attempt(timer: AttemptTimer, timeout: float, work: float) -> bool:
    """One attempt of ``work`` seconds under ``timeout``; True if it timed out."""
    timer.start(timeout)
    try:
        try:
            await asyncio.sleep(work)
        finally:
            expired = timer.stop()
    except asyncio.CancelledError:
        assert expired, "a cancellation that is not the timer's must propagate"
        return True
    return False


async def _in_worker(body):
    async def worker():
        timer = AttemptTimer(asyncio.get_running_loop(), asyncio.current_task())
        try:
            return await body(timer)
        finally:
            timer.close()
    return await asyncio.create_task(worker())


async def test_attempt_timer_expires_only_the_attempt_past_its_deadline():
    async def body(timer):
        fast = await _attempt(timer, 0.2, 0)
        slow = await _attempt(timer, 0.05, 0.5)
        after = await _attempt(timer, 5, 0.01)
        return fast, slow, after, asyncio.current_task().cancelling()
    assert await _in_worker(body) == (False, True, False, 0)


async def test_attempt_timer_rearms_for_a_later_deadline():
    async def body(timer):
        await _attempt(timer, 0.05, 0)          # arms a timer for ~now + 0.05
        loop = asyncio.get_running_loop()
        start = loop.time()
        # The early timer fires mid-attempt and must re-arm, not expire this one.
        survived = not await _attempt(timer, 0.3, 0.15)
        started = loop.time()
        expired = await _attempt(timer, 0.1, 1.0)
        return survived, expired, loop.time() - started, loop.time() - start
    survived, expired, took, _ = await _in_worker(body)
    assert survived and expired and 0.09 <= took < 0.5


async def test_attempt_timer_moves_an_armed_timer_earlier():
    async def body(timer):
        await _attempt(timer, 60, 0)            # armed far in the future
        loop = asyncio.get_running_loop()
        started = loop.time()
        expired = await _attempt(timer, 0.05, 1.0)
        return expired, loop.time() - started
    expired, took = await _in_worker(body)
    assert expired and took < 0.5


async def test_attempt_timer_leaves_an_idle_worker_alone():
    async def body(timer):
        await _attempt(timer, 0.02, 0)
        await asyncio.sleep(0.1)                # the timer fires with no attempt in flight
        return asyncio.current_task().cancelling()
    assert await _in_worker(body) == 0


async def test_cancellation_from_outside_is_not_taken_for_a_timeout():
    async def body(timer):
        task = asyncio.current_task()
        asyncio.get_running_loop().call_later(0.02, task.cancel)
        timer.start(5)
        try:
            await asyncio.sleep(1)
        finally:
            expired = timer.stop()
        return expired
    with pytest.raises(asyncio.CancelledError):
        await _in_worker(body)


async def test_attempt_timers_outlive_workers_and_go_at_shutdown():
    # Cancelling every worker's loop timer as a batch ends would delay the finalize waiting
    # for it (measured: ~50 us with 64 slots), so a slot keeps its timer for its next worker.
    harness = Harness(make_config(runner_per_model=4))
    async with harness as coord:
        scheduler = coord._scheduler
        await coord.submit_batch(batch_id=0, tasks=tasks(20, AsyncWorkflow), batch_type="train")
        await coord.finalize_train_batch(0, timeout=5)
        timers = [worker.timer for worker in scheduler.workers]
        assert all(t.task is None and t.handle is not None for t in timers)
    assert all(worker.state.value == "closed" for worker in scheduler.workers)
    assert all(t.handle is None for t in timers)


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


class _AbortFails(SimulatedEngine):
    async def abort(self, request_ids):
        raise RuntimeError("abort refused")


class _LeavesRequest(Workflow):
    """Returns while a request it started is still in flight (the runner must abort it)."""

    is_async = True
    started: ClassVar[list[asyncio.Future[object]]] = []

    async def run_async(self):
        self.started.append(asyncio.ensure_future(self.model.generate_async(["hi"])))
        await asyncio.sleep(0)      # the request is now in flight
        return []


async def test_a_failing_clean_up_abort_is_logged_and_the_task_keeps_its_result(caplog):
    # The runner's clean-up abort raises: not the workflow's fault, so not a failed run, and
    # no reason to stop anything else either: the task finishes with its result.
    async with Harness(make_config(), [_AbortFails(hang_rate=1.0)]) as coord:
        try:
            await coord.submit_batch(batch_id=0, tasks=tasks(1, _LeavesRequest) + tasks(2),
                                     batch_type="train")
            state = coord.pending_batches[0]
            result = await coord.finalize_train_batch(0, timeout=5)
            assert result["finished_task_count"] == 3
            assert all(status.ok for status in state.statuses.values())
            assert "abort refused" in caplog.text and "0/0/0/1-1" in caplog.text
            await coord.submit_batch(batch_id=1, tasks=tasks(2), batch_type="train")
            assert (await coord.finalize_train_batch(1, timeout=5))["finished_task_count"] == 2
        finally:
            for request in _LeavesRequest.started:
                request.cancel()
            await asyncio.gather(*_LeavesRequest.started, return_exceptions=True)
            _LeavesRequest.started.clear()


async def test_timed_out_run_aborts_its_engine_request():
    engine = SimulatedEngine(hang_rate=1.0)
    async with Harness(make_config(max_timeout=0.05), [engine]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(2, AsyncWorkflow, generate=True),
                                 batch_type="train")
        state = coord.pending_batches[0]
        await coord.finalize_train_batch(0, timeout=5)
        assert not any(s.ok for s in state.statuses.values())
        assert engine.num_unfinished_requests == 0


async def test_abort_aborts_engine_requests_of_sync_workflows():
    engine = SimulatedEngine(hang_rate=1.0)
    async with Harness(make_config(), [engine]) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(3, SyncWorkflow, generate=True),
                                 batch_type="train")
        await wait_until(lambda: engine.num_unfinished_requests == 3)
        await coord.abort_batch(0, reason="x")
        assert engine.num_unfinished_requests == 0


async def test_sync_run_past_its_timeout_is_detached_and_its_slot_freed():
    async with Harness(make_config(runner_per_model=1, max_timeout=0.05)) as coord:
        work = tasks(1, SyncWorkflow, sleep=0.5) + tasks(2, SyncWorkflow)
        await coord.submit_batch(batch_id=0, tasks=work, batch_type="train")
        state = coord.pending_batches[0]
        result = await coord.finalize_train_batch(0, timeout=0.4)
        assert result["finished_task_count"] == 3
        assert not state.statuses[0].ok and state.statuses[1].ok and state.statuses[2].ok
        assert coord.detached_runs == 1


async def test_workflow_ignoring_cancellation_is_detached_not_waited_on(monkeypatch):
    import fastrollout.coordinator as mod
    monkeypatch.setattr(mod, "CANCEL_GRACE", 0.05)
    async with Harness() as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, StubbornWorkflow, linger=0.3),
                                 batch_type="train")
        await asyncio.sleep(0.01)
        await coord.abort_batch(0, reason="x")
        assert coord.detached_tasks == 1
        await asyncio.sleep(0.4)        # let it end before the test's leak check


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


_OUTLIVES_LOOP = r'''
import asyncio, sys, time, warnings
sys.path[:0] = {paths!r}
from fastrollout import Workflow
from harness import Harness, make_config, tasks

class CallsLate(Workflow):
    """Overruns its timeout; its thread then calls the engine after the loop is closed."""
    def run(self):
        time.sleep(0.5)
        try:
            self.model.generate(["late"])
        except Exception as exc:
            print(type(exc).__name__, exc, flush=True)
        return []

async def main():
    async with Harness(make_config(max_timeout=0.05)) as coord:
        await coord.submit_batch(batch_id=0, tasks=tasks(1, CallsLate), batch_type="train")
        await coord.finalize_train_batch(0, timeout=5)

warnings.simplefilter("always")
asyncio.run(main())
time.sleep(1.0)     # the detached thread calls generate on the closed loop meanwhile
'''


def test_a_detached_sync_run_calling_the_engine_after_the_loop_closed_is_told_so():
    # Before: "RuntimeWarning: coroutine ... was never awaited" at the interpreter's exit.
    tests = pathlib.Path(__file__).parent
    script = _OUTLIVES_LOOP.format(paths=[str(tests), str(tests.parent)])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "never awaited" not in done.stderr, done.stderr[-3000:]
    assert "EngineError" in done.stdout and "event loop of this client is closed" in done.stdout
