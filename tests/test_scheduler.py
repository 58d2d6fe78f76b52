"""Scheduler and runner pieces that stand alone: batch priority order, attempt timeouts."""
import asyncio

import pytest

from fastrollout.runner import AttemptTimer
from fastrollout.scheduler import batch_priority


def test_batch_priority_matches_trinity_order():
    ids = ["zeta", 2, "1/eval", 1, "10/x", "2/gsm8k", 10, "alpha"]
    assert sorted(ids, key=batch_priority) == [1, "1/eval", 2, "2/gsm8k", 10, "10/x", "alpha", "zeta"]


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
