"""Sinks: where the pipeline hands each finalized train batch, for a trainer to take.

Every sink has ``write(batch_id, parts)``, called once per finalized batch with the parts
it was packed in (``batch_id`` None for ``process_experiences``), and ``close()``. A write
either keeps the whole batch or raises, keeping nothing; empty batches are not kept.

- ``MemorySink``: batches wait in memory until ``take(batch_id)``.
- ``StreamSink``: an in-process FIFO; ``await sink.reader().read(n)`` returns exactly ``n``
  experiences, across batch boundaries, as soon as they are there.
- ``DurableLogSink``: an append-only log on disk that a ``DurableLogReader`` in another
  process reads and resumes; a batch whose ``write`` returned survives ``kill -9``.
- ``DiscardSink``: keeps nothing (bench mode, benchmarks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BatchId, Sink
from .durable import DurableLogReader, DurableLogSink, LogRecord
from .memory import DiscardSink, MemorySink, StreamReader, StreamSink

if TYPE_CHECKING:
    from ..config import PipelineConfig

__all__ = ["BatchId", "DiscardSink", "DurableLogReader", "DurableLogSink", "LogRecord",
           "MemorySink", "Sink", "StreamReader", "StreamSink", "make_sink"]


def make_sink(config: PipelineConfig) -> Sink:
    """The sink ``config.sink`` names."""
    if config.sink == "durable":
        return DurableLogSink(config.path, segment_bytes=config.segment_bytes)
    if config.sink == "stream":
        return StreamSink(config.max_buffered_experiences)
    if config.sink == "discard":
        return DiscardSink()
    return MemorySink(config.max_buffered_experiences)
