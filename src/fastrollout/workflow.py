"""The Workflow base class: turns one task into experiences using a model client."""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .engines.client import ModelClient
    from .experience import Experience
    from .task import Task


class Workflow:
    """Subclass and implement ``run()`` (or ``run_async()`` with ``is_async = True``).

    ``can_repeat``: one ``run()`` produces all ``repeat_times`` runs (reads
    ``task.rollout_args.n``). ``can_reset``: an instance may be reused for another
    task through ``reset(task)``.
    """

    can_repeat: ClassVar[bool] = False
    can_reset: ClassVar[bool] = False
    is_async: ClassVar[bool] = False

    def __init__(self, *, task: Task, model: ModelClient,
                 auxiliary_models: list[ModelClient] | None = None) -> None:
        self.task = task
        self.model = model
        self.auxiliary_models = auxiliary_models or []
        self.run_id_base = 0
        self.repeat_times = task.repeat_times

    def reset(self, task: Task) -> None:
        if not self.can_reset:
            raise TypeError(f"{type(self).__name__} cannot be reset (can_reset is False)")
        self.task = task
        self.repeat_times = task.repeat_times

    def set_repeat_times(self, repeat_times: int, run_id_base: int) -> None:
        self.repeat_times = repeat_times
        self.run_id_base = run_id_base

    def run(self) -> list[Experience]:
        raise TypeError(f"{type(self).__name__} must implement run() (or run_async() with "
                        f"is_async = True)")

    async def run_async(self) -> list[Experience]:
        raise TypeError(f"{type(self).__name__} must implement run_async() (or run() with "
                        f"is_async = False)")
