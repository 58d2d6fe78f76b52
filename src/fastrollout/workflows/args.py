"""Reading a task's ``workflow_args`` / ``reward_fn_args`` into a workflow's typed arguments."""
from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ..config import config_error
from ..errors import ConfigError
from ..task import Task
from ..workflow import Workflow

S = TypeVar("S", bound=msgspec.Struct)

# The options every workflow's argument Struct uses: keyword-only, unknown keys refused.
STRUCT = dict(kw_only=True, forbid_unknown_fields=True)


def read_args(struct: type[S], args: Any, where: str, task: Any) -> S:
    """``args`` (a dict) as ``struct``; a ConfigError naming the task and the key otherwise,
    e.g. ``task 3 of batch 0: workflow_args.max_turns: Expected `int` >= 1, got 0``."""
    data = args if args is not None else {}
    try:
        return msgspec.convert(data, struct)
    except msgspec.ValidationError as exc:
        error = str(config_error(exc, data, struct)).removeprefix("<top level>")
        sep = "" if error.startswith(":") else "."
        raise ConfigError(f"task {task.task_id} of batch {task.batch_id}: {where}{sep}{error}"
                          ) from None


class ArgsWorkflow(Workflow):
    """A workflow that reads its typed arguments from its task (``_read``), when built and at
    every ``reset``: a bad argument fails the task that carries it."""

    can_reset = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._read(self.task)

    def reset(self, task: Task) -> None:
        super().reset(task)
        self._read(task)

    def _read(self, task: Task) -> None:
        """Set the workflow's arguments from ``task`` (raising ConfigError for bad ones)."""
