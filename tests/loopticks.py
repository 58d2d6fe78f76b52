"""Counting event-loop turns: evidence that the loop kept running while something waited."""
from __future__ import annotations

import asyncio
from typing import Self


class LoopTicks:
    """``async with LoopTicks() as ticks:``; ``ticks.count`` is how many turns a side task got."""

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Future | None = None

    async def _tick(self) -> None:
        while True:
            self.count += 1
            await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        self._task = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
