"""What every sink is: ``write(batch_id, parts)`` once per finalized batch, ``close()``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from ..errors import ConfigError, PipelineFullError

if TYPE_CHECKING:
    from ..experience import ExperienceBatch

BatchId = int | str | None


class Sink(Protocol):
    # True when ``write`` waits on a disk or the network: the pipeline then calls it in a
    # worker thread, off the event loop.
    blocking: ClassVar[bool]

    def write(self, batch_id: BatchId, parts: Sequence[ExperienceBatch]) -> None:
        """Keep one finalized batch, given as the parts it was packed in (all of it, or
        nothing and an error)."""

    def close(self) -> None: ...


def count(parts: Sequence[ExperienceBatch]) -> int:
    return sum(map(len, parts))


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{what}: expected an int >= 1, got {value!r}")
    return int(value)


def _limit(value: int | None, owner: str) -> int | None:
    return None if value is None else _positive(value, f"{owner}.max_buffered_experiences")


def _admit(held: int, count: int, limit: int | None, what: str, drain: str) -> None:
    if limit is not None and held + count > limit:
        raise PipelineFullError(
            f"the {what} holds {held} experiences and {count} more would pass "
            f"pipeline.max_buffered_experiences={limit}; {drain} first (nothing was dropped)")
