"""Stub of the compiled per-task metric bookkeeping (native/tally.pyx)."""
from collections.abc import Mapping, Sequence
from typing import Any, final

@final
class MetricTally:
    """Batch-level metrics kept current as task-level dicts arrive."""
    def add(self, metrics: Mapping[str, Any]) -> None:
        """Raises TypeError for a key that is not a str."""
    def summary(self, prefix: str = "", detailed: bool = True,
                stats: Sequence[str] = ("mean", "max", "min")) -> dict[str, float]: ...

def single_run_metrics(metric_dict: Mapping[str, Any], is_eval: bool) -> dict[str, float] | None:
    """``calculate_task_level_metrics([metric_dict], is_eval)`` when each value reduces alone,
    else None. Raises TypeError for a key that is not a str."""
