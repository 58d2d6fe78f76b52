"""The experience pipeline: from finished tasks to the trainer's sink.

Experiences are staged as their tasks complete. Without operators they are packed into
columnar chunks (``ExperienceBatch.from_experiences``: one copy of each array field, no
codec) every ``CHUNK`` experiences, so that closing a batch only packs the remainder, and
the chunks go to the sink as they are (the memory sink joins them only when the trainer
takes the batch). Trinity instead decodes every task's payload at finalize, which is where
its finalize latency goes. The configured operators (``operators.py``: GRPO advantages,
filters) need the batch as one: then it is packed once, at commit, which copies each array
once where packing chunks and joining them copies it twice, and takes about as long at
commit as that join did (``commit_ms_median`` in benchmarks/bench_pipeline.py). Then its
weight versions are reported, and it goes to the sink (``sinks/``).

Staged experiences belong to the pipeline: the packed batches keep their metadata
(info, metrics, messages) by reference, so callers must not modify an experience after
handing it to ``stage()``.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .experience import ExperienceBatch
from .operators import VersionSpan, item_versions, merge_versions, run_operators, version_metrics
from .sinks import MemorySink, make_sink

if TYPE_CHECKING:
    from .config import PipelineConfig
    from .experience import Experience
    from .sinks import BatchId, Sink

# Experiences per packed chunk: enough to amortize the per-call part of packing, few
# enough that the last partial chunk, packed at finalize, stays cheap even for 1024-token
# experiences (benchmarks/bench_experience.py measures both).
CHUNK = 256


class _Staging:
    __slots__ = ("pending", "chunks", "versions")

    def __init__(self) -> None:
        self.pending: list[Experience] = []
        self.chunks: list[ExperienceBatch] = []
        self.versions: VersionSpan = None

    def pack(self) -> None:
        if self.pending:
            self.chunks.append(ExperienceBatch.from_experiences(self.pending))
            self.pending = []


class ExperiencePipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.sink: Sink = make_sink(config)
        self._staged: dict[BatchId, _Staging] = {}

    def stage(self, batch_id: BatchId, experiences: list[Experience],
              versions: VersionSpan = None) -> None:
        """Book one task's experiences (sampled with weight ``versions``) under its batch
        (kept until commit or discard)."""
        staging = self._staged.get(batch_id)
        if staging is None:
            staging = self._staged[batch_id] = _Staging()
        staging.pending.extend(experiences)
        if versions is not None:
            staging.versions = merge_versions(staging.versions, versions)
        if len(staging.pending) >= CHUNK and not self.config.operators:
            staging.pack()

    def discard(self, batch_id: BatchId) -> None:
        self._staged.pop(batch_id, None)

    async def commit(self, batch_id: BatchId, model_version: int | None = None) -> dict[str, float]:
        """Close the batch and pass its experiences on (``model_version``: the current
        weights, for staleness). If the sink refuses them (a full memory sink raises
        PipelineFullError, a durable one an OSError), everything stays staged for a later
        commit."""
        start = time.perf_counter()
        staging = self._staged.get(batch_id)
        if staging is None:
            return self._metrics(0, start)
        staging.pack()
        metrics = version_metrics(staging.versions, model_version)
        metrics.update(await self._emit(batch_id, staging.chunks, start, model_version))
        del self._staged[batch_id]
        return metrics

    async def process(self, batch: ExperienceBatch,
                      model_version: int | None = None) -> dict[str, float]:
        """Run already-decoded payloads (``process_experiences``) through the pipeline."""
        start = time.perf_counter()
        metrics = version_metrics(item_versions([batch]), model_version)
        metrics.update(await self._emit(None, [batch], start, model_version))
        return metrics

    def take(self, batch_id: BatchId) -> ExperienceBatch | None:
        """A finalized batch from the memory sink, handed over once (None if none)."""
        if not isinstance(self.sink, MemorySink):
            raise RuntimeError(f"take_experiences() reads the memory sink; pipeline.sink is "
                               f"{self.config.sink!r}: read {type(self.sink).__name__} instead")
        return self.sink.take(batch_id)

    def close(self) -> None:
        self.sink.close()

    async def _emit(self, batch_id: BatchId, chunks: list[ExperienceBatch], start: float,
                    model_version: int | None) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.config.operators and chunks:
            batch, metrics = run_operators(ExperienceBatch.concat(chunks),
                                           self.config.operators, model_version)
            chunks = [batch]
        sink = self.sink
        if sink.blocking:   # a durable write waits for the disk: off the event loop
            await asyncio.to_thread(sink.write, batch_id, chunks)
        else:
            sink.write(batch_id, chunks)
        metrics.update(self._metrics(sum(map(len, chunks)), start))
        return metrics

    @staticmethod
    def _metrics(count: int, start: float) -> dict[str, float]:
        return {"experience_pipeline/experience_count": float(count),
                "experience_pipeline/time/total": time.perf_counter() - start}
