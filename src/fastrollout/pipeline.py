"""The experience pipeline: from finished tasks to a columnar batch for the trainer.

Each train task's experiences are encoded once when the task completes and decoded
zero-copy, so finalize only concatenates the staged columns (one copy) and hands
the batch to the output. Trinity decodes every payload at finalize instead, which
is where its finalize latency goes.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from .experience import ExperienceBatch, decode_experiences, encode_experiences

if TYPE_CHECKING:
    from .config import PipelineConfig
    from .experience import Experience


class ExperiencePipeline:
    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self._staged: dict[int | str, list[ExperienceBatch]] = {}
        # Finalized batches waiting for the trainer, oldest first.
        self._output: OrderedDict[int | str | None, ExperienceBatch] = OrderedDict()

    def stage(self, batch_id: int | str, experiences: list[Experience]) -> None:
        """Book one task's experiences under its batch (kept until commit or discard)."""
        staged = decode_experiences(encode_experiences(experiences))
        self._staged.setdefault(batch_id, []).append(staged)

    def discard(self, batch_id: int | str) -> None:
        self._staged.pop(batch_id, None)

    def commit(self, batch_id: int | str) -> dict[str, float]:
        """Close the batch: concatenate its staged experiences and pass them on."""
        return self._emit(batch_id, self._staged.pop(batch_id, []))

    def process(self, batches: list[ExperienceBatch]) -> dict[str, float]:
        """Run already-decoded payloads (``process_experiences``) through the pipeline."""
        return self._emit(None, batches)

    def take(self, batch_id: int | str | None) -> ExperienceBatch | None:
        return self._output.pop(batch_id, None)

    def _emit(self, batch_id: int | str | None, batches: list[ExperienceBatch]) -> dict[str, float]:
        start = time.perf_counter()
        merged = ExperienceBatch.concat(batches)
        if len(merged):
            if batch_id in self._output:
                merged = ExperienceBatch.concat([self._output.pop(batch_id), merged])
            self._output[batch_id] = merged
        return {"experience_pipeline/experience_count": float(len(merged)),
                "experience_pipeline/time/total": time.perf_counter() - start}
