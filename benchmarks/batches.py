"""One timed batch through any coordinator with Trinity's API (ours or Trinity's own)."""
from __future__ import annotations

import time
from typing import Any


async def timed_batch(coordinator: Any, batch_id: Any, tasks: list, batch_type: str
                      ) -> tuple[dict, float, float]:
    """Submit ``tasks`` and finalize them: (result, start, end) in ``time.perf_counter()``."""
    start = time.perf_counter()
    await coordinator.submit_batch(batch_id=batch_id, tasks=tasks, batch_type=batch_type)
    if batch_type == "eval":
        result = await coordinator.finalize_eval_batch(batch_id)
    else:
        result = await coordinator.finalize_train_batch(batch_id)
    return result, start, time.perf_counter()


def track_last_booking(coordinator: Any) -> list[float]:
    """Have fastrollout's ``coordinator`` note when it books each finished task: the returned
    one-item list holds ``time.perf_counter()`` of the latest booking. "Task done" is that
    booking, as the Trinity side takes its scheduler's done-callback, so a finalize wake-up
    is measured from the last one."""
    book = coordinator._task_finished
    last = [0.0]

    def timed_book(state: Any, record: Any, status: Any) -> None:
        book(state, record, status)
        last[0] = time.perf_counter()

    coordinator._task_finished = timed_book
    return last
