"""What a task is (Task, GenerationConfig) and what came of it (Status)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .workflow import Workflow


_T = TypeVar("_T")


def derive(obj: _T, **changes: Any) -> _T:
    """A shallow copy of a Task or GenerationConfig with ``changes`` applied.

    ``dataclasses.replace`` re-runs ``__init__`` and costs ~10x more; the scheduler copies
    every task it starts, so this path matters. Field names are not checked.
    """
    new = object.__new__(type(obj))
    fields = obj.__dict__.copy()
    fields.update(changes)
    new.__dict__ = fields
    return new


@dataclass
class GenerationConfig:
    """Sampling parameters of one generate call (Trinity's ``rollout_args``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = None
    logprobs: int = 0
    n: int = 1
    seed: int | None = None

    def merged(self, **overrides: Any) -> GenerationConfig:
        """A copy with ``overrides`` applied; unknown names raise TypeError."""
        return replace(self, **overrides) if overrides else self


@dataclass
class Task:
    """One prompt and the workflow that samples ``repeat_times`` runs of it."""

    workflow: type[Workflow]
    repeat_times: int = 1
    rollout_args: GenerationConfig = field(default_factory=GenerationConfig)
    workflow_args: dict = field(default_factory=dict)
    reward_fn_args: dict = field(default_factory=dict)
    reward_fn: type | None = None
    raw_task: dict = field(default_factory=dict)
    is_eval: bool = False
    batch_id: int | str = ""
    task_id: int | str = ""
    index: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """Outcome of a task: how many of its runs completed, and their metrics."""

    completed_runs: int
    total_runs: int
    metrics: list[dict[str, float]]
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.completed_runs == self.total_runs
