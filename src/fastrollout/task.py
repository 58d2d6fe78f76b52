"""What a task is (Task, GenerationConfig) and what came of it (Status)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .workflow import Workflow


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
    workflow_args: dict[str, Any] = field(default_factory=dict)
    reward_fn_args: dict[str, Any] = field(default_factory=dict)
    reward_fn: type | None = None
    raw_task: dict[str, Any] = field(default_factory=dict)
    is_eval: bool = False
    batch_id: int | str = ""
    task_id: int | str = ""
    index: dict[str, Any] = field(default_factory=dict)


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


# A task's total runs are counted in 32-bit ledger fields.
MAX_REPEAT_TIMES = 2**31 - 1

_new = object.__new__


def attempt_view(task: Task, batch_id: int | str, task_id: int | str, n: int) -> Task:
    """What one attempt of a started task sees: a copy of ``task`` with ``batch_id``,
    ``task_id`` and ``rollout_args.n`` set, and its own copies of ``rollout_args`` and
    ``raw_task`` (shallow), as Trinity's runners get by receiving the task over Ray: a
    workflow that changes them changes neither the caller's task, nor other tasks, nor a
    retry. Like Trinity's ``dataclasses.replace``, only dataclass fields are carried.

    Copied field by field for the two classes themselves: ``replace()`` re-runs
    ``__init__`` and costs ~3x more, and the scheduler makes a view per attempt.
    Subclasses go through ``replace()``.
    """
    args = task.rollout_args
    if type(args) is GenerationConfig:
        new_args = _new(GenerationConfig)
        new_args.temperature = args.temperature
        new_args.top_p = args.top_p
        new_args.top_k = args.top_k
        new_args.max_tokens = args.max_tokens
        new_args.logprobs = args.logprobs
        new_args.n = n
        new_args.seed = args.seed
        args = new_args
    elif isinstance(args, GenerationConfig):
        args = replace(args, n=n)
    else:
        raise TypeError(f"Task.rollout_args must be a GenerationConfig, got "
                        f"{type(args).__name__}")
    raw = task.raw_task
    raw = raw.copy() if type(raw) is dict else copy.copy(raw)
    if type(task) is not Task:
        return replace(task, batch_id=batch_id, task_id=task_id, rollout_args=args, raw_task=raw)
    new = _new(Task)
    new.workflow = task.workflow
    new.repeat_times = task.repeat_times
    new.rollout_args = args
    new.workflow_args = task.workflow_args
    new.reward_fn_args = task.reward_fn_args
    new.reward_fn = task.reward_fn
    new.raw_task = raw
    new.is_eval = task.is_eval
    new.batch_id = batch_id
    new.task_id = task_id
    new.index = task.index
    return new
