"""Trinity's own ExperiencePipeline, fed from fastrollout's staged experiences.

Trinity's coordinator decodes every task's payload at finalize and hands the batch to
``ExperiencePipeline``: its input store, operators (GRPO advantages, filters), algorithm
advantage function, the write to ``buffer.trainer_input.experience_buffer`` where the
trainer reads, and its metrics (``experience_pipeline/...``, ``selector_metric`` for the
adaptive taskset). Here the same pipeline object does all of that, on the Experience
objects the workflows returned, staged as their tasks were booked: no payload is encoded
or decoded on the way.
"""
from __future__ import annotations

from typing import Any

from .models import close_clients

BatchId = int | str


class TrinityPipeline:
    """The part of fastrollout's ``ExperiencePipeline`` API the coordinator calls."""

    def __init__(self, config: Any) -> None:
        from trinity.buffer.pipelines.experience_pipeline import ExperiencePipeline

        self.pipeline = ExperiencePipeline(config)
        self._staged: dict[BatchId, list[Any]] = {}

    async def prepare(self) -> None:
        await self.pipeline.prepare()

    def stage(self, batch_id: BatchId, experiences: list[Any], versions: Any = None) -> None:
        """Book one task's experiences under its batch, in completion order (Trinity's)."""
        staged = self._staged.get(batch_id)
        if staged is None:
            self._staged[batch_id] = list(experiences)
        else:
            staged.extend(experiences)

    def discard(self, batch_id: BatchId) -> None:
        self._staged.pop(batch_id, None)

    async def commit(self, batch_id: BatchId, model_version: int | None = None
                     ) -> dict[str, float]:
        """Run the batch through Trinity's pipeline; its metrics, byte for byte. A batch
        without experiences runs nothing (Trinity's ``process_experiences([])``). If the
        pipeline raises, the batch stays staged for a later finalize."""
        exps = self._staged.get(batch_id)
        if not exps:
            self._staged.pop(batch_id, None)
            return {}
        # The in-memory entry of Trinity's pipeline (its public ones take payload bytes).
        metrics: dict[str, float] = await self.pipeline._process_experiences(exps)
        del self._staged[batch_id]
        return metrics

    async def process_payloads(self, payloads: list[bytes]) -> dict[str, float]:
        """``process_experiences``: payloads from elsewhere (serve mode), as Trinity takes them."""
        if not payloads:
            return {}
        metrics: dict[str, float] = await self.pipeline.process_serialized_chunks(payloads)
        return metrics

    def close(self) -> None:
        """The coordinator's synchronous close: staged batches go; ``aclose`` releases the
        buffer."""
        self._staged.clear()

    async def aclose(self) -> None:
        """Release the buffer and the operators; close the OpenAI clients the pipeline made
        for auxiliary models (Trinity leaves them to the garbage collector)."""
        await self.pipeline.close()
        for clients in self.pipeline.auxiliary_models.values():
            await close_clients(*clients)
