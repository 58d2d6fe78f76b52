"""Sinks that keep batches in this process: memory (take by batch id), stream (read in
batches of any size), discard."""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, PipelineFullError, SinkClosedError
from ..experience import ExperienceBatch
from ..operators import take as take_rows
from .base import BatchId, _admit, _limit, _positive, count


class DiscardSink:
    """Keeps nothing: the pipeline only counts the experiences."""

    blocking = False

    def write(self, batch_id: BatchId, parts: Sequence[ExperienceBatch]) -> None:
        pass

    def close(self) -> None:
        pass


class MemorySink:
    """Finalized batches wait in memory, by batch id, until ``take``. Writes under an id
    already held add to it (``process_experiences`` batches all go under None)."""

    blocking = False

    def __init__(self, max_buffered_experiences: int | None = None) -> None:
        self._limit = _limit(max_buffered_experiences, "MemorySink")
        self._batches: dict[BatchId, list[ExperienceBatch]] = {}
        self._buffered = 0
        self._closed = False

    @property
    def buffered(self) -> int:
        """Experiences held now."""
        return self._buffered

    def write(self, batch_id: BatchId, parts: Sequence[ExperienceBatch]) -> None:
        """Keep ``parts`` under ``batch_id`` (joined only by ``take``); raises
        PipelineFullError (keeping nothing) when they would pass
        ``max_buffered_experiences``."""
        if self._closed:
            raise SinkClosedError(f"MemorySink is closed; batch {batch_id} was not kept")
        size = count(parts)
        if size:
            _admit(self._buffered, size, self._limit, "memory sink",
                   "call take_experiences() for finalized batches")
            self._batches.setdefault(batch_id, []).extend(p for p in parts if len(p))
            self._buffered += size

    def take(self, batch_id: BatchId) -> ExperienceBatch | None:
        """The experiences written under ``batch_id`` (once), or None."""
        parts = self._batches.pop(batch_id, None)
        if parts is None:
            return None
        batch = ExperienceBatch.concat(parts)
        self._buffered -= len(batch)
        return batch

    def close(self) -> None:
        """Refuse further writes; what is held can still be taken."""
        self._closed = True


class StreamSink:
    """An in-process FIFO of experiences, read in batches of any size by ``reader()``s.

    Write and read on one event loop (writes are synchronous and wake readers at once).
    At most ``max_buffered_experiences`` wait: a write that would pass it raises
    PipelineFullError, keeping nothing; ``await wait_for_room(n)`` waits until ``n`` fit.
    After ``close()``, reads return full batches while there are enough experiences left,
    then the rest as one shorter batch, then raise SinkClosedError."""

    blocking = False

    def __init__(self, max_buffered_experiences: int | None = None) -> None:
        self._limit = _limit(max_buffered_experiences, "StreamSink")
        self._parts: deque[ExperienceBatch] = deque()
        self._start = 0         # rows of the first part already read
        self._buffered = 0
        self._closed = False
        # Reads waiting, in call order; only the first is woken, and it takes for itself.
        self._reads: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._rooms: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def buffered(self) -> int:
        """Experiences written and not yet read."""
        return self._buffered

    def reader(self) -> StreamReader:
        return StreamReader(self)

    def write(self, batch_id: BatchId, parts: Sequence[ExperienceBatch]) -> None:
        if self._closed:
            raise SinkClosedError(f"StreamSink is closed; batch {batch_id} was not kept")
        size = count(parts)
        if size:
            _admit(self._buffered, size, self._limit, "stream sink", "read from its reader")
            self._parts.extend(p for p in parts if len(p))
            self._buffered += size
            self._wake_reader()

    async def wait_for_room(self, count: int) -> None:
        """Return once ``count`` more experiences fit (a hint: nothing is reserved)."""
        count = _positive(count, "StreamSink.wait_for_room: count")
        if self._limit is not None and count > self._limit:
            raise PipelineFullError(f"{count} experiences never fit in a stream sink of "
                                    f"pipeline.max_buffered_experiences={self._limit}")
        while not self._closed and not self._fits(count):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (count, fut)
            self._rooms.append(entry)
            try:
                await fut
            finally:
                if entry in self._rooms:
                    self._rooms.remove(entry)
        if self._closed:
            raise SinkClosedError("StreamSink is closed")

    def close(self) -> None:
        """Refuse further writes; waiting reads get what is left (see the class doc)."""
        self._closed = True
        self._wake_reader()
        self._wake_writers()

    def _fits(self, count: int) -> bool:
        return self._limit is None or self._buffered + count <= self._limit

    def _wake_reader(self) -> None:
        if self._reads:
            size, fut = self._reads[0]
            if not fut.done() and (self._buffered >= size or self._closed):
                fut.set_result(None)

    def _wake_writers(self) -> None:
        for rows, fut in self._rooms:
            if not fut.done() and (self._closed or self._fits(rows)):
                fut.set_result(None)

    async def _read(self, batch_size: int) -> ExperienceBatch:
        size = _positive(batch_size, "StreamReader.read: batch_size")
        if self._limit is not None and size > self._limit:
            raise ConfigError(f"StreamReader.read: batch_size {size} can never be met: "
                              f"pipeline.max_buffered_experiences is {self._limit}")
        try:
            if self._reads or (self._buffered < size and not self._closed):
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                entry = (size, fut)
                self._reads.append(entry)
                try:
                    await fut
                finally:
                    self._reads.remove(entry)
            return self._take(size)
        finally:
            self._wake_reader()     # the next in line, or in our place if we were cancelled

    def _take(self, size: int) -> ExperienceBatch:
        if not self._buffered:
            raise SinkClosedError("StreamSink is closed and every experience was read")
        size = min(size, self._buffered)
        parts, need = [], size
        while need:
            part, start = self._parts[0], self._start
            stop = min(len(part), start + need)
            parts.append(take_rows(part, np.arange(start, stop)))
            need -= stop - start
            if stop == len(part):
                self._parts.popleft()
                stop = 0
            self._start = stop
        self._buffered -= size
        self._wake_writers()
        return ExperienceBatch.concat(parts)


class StreamReader:
    """Reads a StreamSink; several readers of one sink share its experiences in the order
    their ``read`` calls were made."""

    def __init__(self, sink: StreamSink) -> None:
        self._sink = sink

    async def read(self, batch_size: int) -> ExperienceBatch:
        """The next ``batch_size`` experiences, once written (see StreamSink for close).
        Cancelling a waiting read takes nothing."""
        return await self._sink._read(batch_size)
