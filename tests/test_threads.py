"""WorkerPool: sync work off the loop, results back on it, detached work replaced."""
import asyncio
import threading

import pytest

from fastrollout.threads import WorkerPool


async def test_runs_off_the_loop_and_returns_results():
    pool = WorkerPool()
    try:
        loop_thread = threading.get_ident()
        ident = await pool.run(threading.get_ident)
        assert ident != loop_thread
        assert await pool.run(lambda: 41 + 1) == 42
    finally:
        pool.close()


async def test_errors_reach_the_caller():
    pool = WorkerPool()
    try:
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
    finally:
        pool.close()


async def test_a_stuck_job_does_not_starve_the_pool():
    pool = WorkerPool()
    release = threading.Event()
    try:
        stuck = pool.run(release.wait)
        stuck.cancel()                       # detached: its thread is still busy
        assert await asyncio.wait_for(pool.run(lambda: "ok"), 5) == "ok"
        assert pool.busy == 1
    finally:
        release.set()
        pool.close()


async def test_closed_pool_refuses_work():
    pool = WorkerPool()
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(lambda: None)
