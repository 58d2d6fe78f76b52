"""What ``fastrollout run`` shows while it runs: on a terminal a live ``rich`` display (per batch:
tasks done / running / failed / retried, output tokens/s, ETA), then a table of each step's
metrics; elsewhere (a pipe, a CI log) one plain line per batch and the same table as text.

The live display redraws four times a second from ``coordinator.batch_progress`` (a read of
the task ledger's counters) and the engines' token counters: a screen refresh, which waits
on nothing.
"""
from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["Display", "PlainDisplay", "RichDisplay", "make_display", "step_row", "COLUMNS"]

REFRESH_S = 0.25

# The per-step table: column title -> how a row (a batch's result) gives its value.
_METRICS = {
    "reward": re.compile(r"^experience_pipeline/group_advantages/reward_mean/mean$"),
    "accuracy": re.compile(r"^(rollout|eval/[^/]+)/accuracy/mean(@\d+)?$"),
    "resp len": re.compile(r"^(rollout|eval/[^/]+)/response_length/mean(@\d+)?$"),
}
COLUMNS = ("step", "batch", "tasks", "seconds", "tok/s", *_METRICS)


def step_row(step: int, result: dict, submitted: int, seconds: float, tokens: int) -> dict:
    """One row of the per-step table (plain values; None where a batch has no such metric)."""
    finished = result["finished_task_count"]
    row: dict[str, Any] = {"step": step, "batch": str(result["batch_id"]),
                           "finished": finished, "tasks": f"{finished}/{submitted}",
                           "seconds": seconds, "tok/s": tokens / seconds if seconds > 0 else 0.0}
    for title, pattern in _METRICS.items():
        row[title] = next((float(v) for k, v in result["metrics"].items() if pattern.match(k)),
                          None)
    return row


def format_value(value: Any) -> str:
    """A table cell: '-' for none, thousands grouped, else three significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


class Display:
    """The interface; this base shows nothing (``--progress none``)."""

    def message(self, text: str) -> None:
        pass

    def batch_started(self, label: str, submitted: int, progress: Callable[[], Any],
                      tokens: Callable[[], int]) -> None:
        """A batch of ``submitted`` tasks is in flight: ``progress()`` gives its
        ``BatchProgress`` (None once it is gone), ``tokens()`` the engines' output tokens."""

    def batch_finished(self, label: str, row: dict) -> None:
        pass

    def table(self, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class PlainDisplay(Display):
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def message(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def batch_finished(self, label: str, row: dict) -> None:
        extra = "".join(f", {k} {format_value(row[k])}" for k in _METRICS if row[k] is not None)
        self.message(f"{label}: {row['tasks']} tasks in {row['seconds']:.2f} s, "
                     f"{row['tok/s']:,.0f} tok/s{extra}")

    def table(self, rows: list[dict]) -> None:
        if not rows:
            return
        cells = [[format_value(row[c]) for c in COLUMNS] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
        for line in ([*COLUMNS], *cells):
            self.message("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


class RichDisplay(Display):
    """A ``rich`` progress display on ``out`` (a terminal)."""

    def __init__(self, out: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=out)
        self.progress = Progress(
            TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("running {task.fields[running]:>3}  failed {task.fields[failed]}  "
                       "retried {task.fields[retries]}"),
            TextColumn("{task.fields[tps]:>8} tok/s"), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, auto_refresh=False)
        self.progress.start()
        self._refresher: asyncio.Task | None = None
        self._task_id: Any = None

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)
        self.progress.refresh()

    def batch_started(self, label: str, submitted: int, progress: Callable[[], Any],
                      tokens: Callable[[], int]) -> None:
        self._task_id = self.progress.add_task(label, total=submitted, running=0, failed=0,
                                               retries=0, tps="-")
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh(self._task_id, progress, tokens))

    async def _refresh(self, task_id: Any, progress: Callable[[], Any],
                       tokens: Callable[[], int]) -> None:
        start, first = time.monotonic(), tokens()
        while True:
            state = progress()
            if state is not None:
                elapsed = time.monotonic() - start
                rate = (tokens() - first) / elapsed if elapsed > 0 else 0.0
                self.progress.update(task_id, completed=state.done + state.failed
                                     + state.cancelled, running=state.running,
                                     failed=state.failed, retries=state.retries,
                                     tps=f"{rate:,.0f}")
                self.progress.refresh()
            await asyncio.sleep(REFRESH_S)

    def batch_finished(self, label: str, row: dict) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        self.progress.update(self._task_id, completed=row["finished"],
                             tps=format_value(row["tok/s"]), running=0)
        self.progress.stop_task(self._task_id)
        self.progress.refresh()

    def table(self, rows: list[dict]) -> None:
        from rich.table import Table

        if not rows:
            return
        table = Table(title="steps")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column == "batch" else "right")
        for row in rows:
            table.add_row(*(format_value(row[c]) for c in COLUMNS))
        self.progress.console.print(table)

    def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        self.progress.stop()


def make_display(mode: str, out: IO[str] = sys.stdout) -> Display:
    """``auto``: ``rich`` on a terminal, ``plain`` elsewhere; ``none``: nothing."""
    if mode == "auto":
        mode = "rich" if out.isatty() else "plain"
    if mode == "rich":
        return RichDisplay(out)
    if mode == "plain":
        return PlainDisplay(out)
    return Display()
