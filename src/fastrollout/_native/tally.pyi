"""Stub of the compiled metric tally (native/tally.pyx)."""
from collections.abc import Mapping, Sequence
from typing import Any

class MetricTally:
    """Batch-level metrics kept current as task-level dicts arrive."""
    def add(self, metrics: Mapping[str, Any]) -> None: ...
    def summary(self, prefix: str = "", detailed: bool = True,
                stats: Sequence[str] = ("mean", "max", "min")) -> dict[str, float]: ...
