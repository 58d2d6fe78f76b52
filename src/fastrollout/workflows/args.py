"""Reading a task's ``workflow_args`` / ``reward_fn_args`` into a workflow's typed arguments."""
from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from ..errors import ConfigError

S = TypeVar("S", bound=msgspec.Struct)

# The options every workflow's argument Struct uses: keyword-only, unknown keys refused.
STRUCT = dict(kw_only=True, forbid_unknown_fields=True)


def read_args(struct: type[S], args: Any, where: str, task: Any) -> S:
    """``args`` (a dict) as ``struct``; a ConfigError naming the task and the key otherwise,
    e.g. ``task 3 of batch 0: workflow_args.max_turns: Expected `int` >= 1, got 0``."""
    try:
        return msgspec.convert(args if args is not None else {}, struct)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `$")
        path = path.rstrip("`")
        if message.startswith("Object contains unknown field `"):
            path = f"{path}.{message.split('`')[1]}"
            known = ", ".join(f.name for f in msgspec.structs.fields(struct))
            message = f"unknown key (known keys: {known})"
        elif message.startswith("Object missing required field `"):
            path = f"{path}.{message.split('`')[1]}"
            message = "required key is missing"
        raise ConfigError(f"task {task.task_id} of batch {task.batch_id}: {where}{path}: "
                          f"{message}") from None
