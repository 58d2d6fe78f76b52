"""Test fixtures around the tiny model (``fastrollout.tinymodel`` builds it): a session-wide
model folder (``conftest.py`` offers it to every test module), a background event loop for
vLLM engines, and the engines' environment."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastrollout.tinymodel import build_tiny_model, perturb_weights  # noqa: F401


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Session-wide tiny model folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


class BackgroundLoop:
    """An event loop (uvloop) in a daemon thread, shared by the tests of one module.

    vLLM engines bind background tasks to the loop they first run on, so tests that
    share one engine run their coroutines here, through ``run()``.
    """

    def __init__(self) -> None:
        import asyncio
        import threading

        import uvloop
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop",
                                        daemon=True)
        self._thread.start()
        self._asyncio = asyncio

    def run(self, coro, timeout: float = 120.0):
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run_all(self, coros, timeout: float = 120.0) -> list:
        """Run coroutines concurrently on the loop; their results in order."""
        async def gather():
            return await self._asyncio.gather(*coros)
        return self.run(gather(), timeout)

    def close(self) -> None:
        async def drain():
            tasks = [t for t in self._asyncio.all_tasks() if t is not self._asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await self._asyncio.gather(*tasks, return_exceptions=True)
        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def engine_env(folder: str | os.PathLike) -> dict[str, str]:
    """Environment for test engines: caches and sockets in ``folder``, no hub, no plugins
    (the installed Trinity wheel registers a vLLM plugin that needs Ray)."""
    folder = str(folder)
    return {"VLLM_RPC_BASE_PATH": folder, "VLLM_CACHE_ROOT": folder,
            "TORCHINDUCTOR_CACHE_DIR": folder, "HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": ""}
