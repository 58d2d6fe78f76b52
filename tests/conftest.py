"""Shared test machinery.

Every ``async def`` test runs twice, under the stdlib asyncio loop and under
uvloop (as uvloop's and asyncpg's suites do), and must leave no task running.
Every test module may request the ``tiny_model`` fixture (``tinymodel.py``).
"""
from __future__ import annotations

import asyncio
import inspect

import pytest
import uvloop

from tinymodel import tiny_model  # noqa: F401  (the fixture, for every test module)

# tests/trinity/ runs in its own environment (Trinity-RFT 0.6.0 and its vLLM pin, made by
# .ci/trinity-venv: `make test-trinity`); this suite's environment cannot import it.
collect_ignore = ["trinity"]

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_generate_tests(metafunc):
    if inspect.iscoroutinefunction(metafunc.function):
        metafunc.fixturenames.append("_loop_kind")
        metafunc.parametrize("_loop_kind", list(LOOPS))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    func = pyfuncitem.obj
    if not inspect.iscoroutinefunction(func):
        return None
    kind = pyfuncitem.callspec.params["_loop_kind"]
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {n: pyfuncitem.funcargs[n] for n in names}

    async def main():
        try:
            await func(**kwargs)
        finally:
            current = asyncio.current_task()
            leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
            for t in leftovers:
                t.cancel()
            if leftovers:
                await asyncio.gather(*leftovers, return_exceptions=True)
                raise AssertionError(f"test left {len(leftovers)} task(s) running: {leftovers!r}")

    with asyncio.Runner(loop_factory=LOOPS[kind]) as runner:
        runner.run(main())
    return True
