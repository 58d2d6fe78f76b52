"""Runs one job (``fastrollout run``): engines, train steps, evals, and the run folder.

The run folder ``<output_dir>/<name>`` (``<name>-2``, ``-3``... when it is taken) holds:

- ``config.yaml``: the job as resolved (defaults filled in, paths absolute);
- ``train.jsonl`` / ``eval.jsonl``: the generated arithmetic tasksets, when asked for;
- ``metrics.jsonl``: each train step's metrics, and each eval's at the step it followed
  (``fastrollout.monitors``; TensorBoard and W&B as ``coordinator.monitor.backends`` asks);
- ``experiences/``: the durable experience log (``fastrollout.sinks.DurableLogSink``), one
  record per finalized train batch;
- ``summary.json``: how the run ended (``completed``, ``interrupted`` or ``failed``), what it
  finalized, and each step's figures.

SIGINT (Ctrl-C) stops the job cleanly: the batch in flight is aborted (its engine requests
with it) unless it is already being written, every finalized batch stays in the log, and
the run ends with ``status: interrupted``. A second SIGINT interrupts at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .coordinator import BatchLifecycleState, RolloutCoordinator
from .job import JobConfig, build_engines
from .meter import MeteredEngine
from .monitors import Monitors
from .progress import Display, step_row
from .tasksets import Taskset, write_arithmetic_jsonl

__all__ = ["JobResult", "run_job", "run_folder"]

logger = logging.getLogger(__name__)


@dataclass
class JobResult:
    run_dir: Path
    status: str = "running"            # completed | interrupted | failed
    error: str | None = None
    train_steps: int = 0
    finalized: list[Any] = field(default_factory=list)
    aborted: Any = None
    experiences_logged: int = 0
    output_tokens: int = 0
    wall_s: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "run_dir": str(self.run_dir),
                "train_steps": self.train_steps, "finalized_batches": self.finalized,
                "aborted_batch": self.aborted, "experiences_logged": self.experiences_logged,
                "output_tokens": self.output_tokens, "wall_s": self.wall_s,
                "steps": self.rows}


def run_folder(output_dir: Path, name: str) -> Path:
    """A new, empty folder ``output_dir/name``, or ``name-2``, ``name-3``... if taken."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        path = output_dir / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{output_dir}: no free run folder name for {name!r}")


class _Interrupt:
    """SIGINT while the job runs: abort the batch in flight, unless it is being finalized
    (its experiences are being written: that write completes), and stop after it."""

    def __init__(self, coordinator: RolloutCoordinator) -> None:
        self.coordinator = coordinator
        self.requested = False
        self.batch_id: Any = None
        self.aborted: Any = None
        self._loop = asyncio.get_running_loop()
        self._aborts: list[asyncio.Task] = []
        try:
            self._loop.add_signal_handler(signal.SIGINT, self._on_sigint)
            self._installed = True
        except (NotImplementedError, RuntimeError):   # no signal handlers (not main thread)
            self._installed = False

    def _on_sigint(self) -> None:
        self.requested = True
        # A second Ctrl-C gets Python's default: KeyboardInterrupt, at once.
        self.remove()
        self.abort_current()

    def abort_current(self) -> None:
        state = self.coordinator.pending_batches.get(self.batch_id)
        if state is not None and state.state is BatchLifecycleState.RUNNING:
            self.aborted = self.batch_id
            self._aborts.append(self._loop.create_task(self.coordinator.abort_batch(
                self.batch_id, reason="interrupted (SIGINT)")))

    async def settle(self) -> None:
        if self._aborts:
            await asyncio.gather(*self._aborts)

    def remove(self) -> None:
        if self._installed:
            self._loop.remove_signal_handler(signal.SIGINT)
            self._installed = False


async def run_job(job: JobConfig, base_dir: Path, display: Display) -> JobResult:
    """Run ``job`` (relative paths against ``base_dir``); the result says how it ended. An
    error is raised after the run folder's summary records it."""
    started = time.monotonic()
    run_dir = run_folder(base_dir / job.output_dir, job.name)
    result = JobResult(run_dir)
    job = job.resolve_paths(run_dir, base_dir)
    (run_dir / "config.yaml").write_text(job.to_yaml())
    display.message(f"run folder: {run_dir}")
    monitors: Monitors | None = None
    try:
        if job.arithmetic is not None:
            data = job.arithmetic
            write_arithmetic_jsonl(run_dir / "train.jsonl", data.train_rows, data.seed)
            if data.eval_rows:
                write_arithmetic_jsonl(run_dir / "eval.jsonl", data.eval_rows, data.seed + 1)
        taskset = Taskset(job.taskset)
        evals = [(t.name, Taskset(t)) for t in job.eval_tasksets]
        monitors = Monitors(job.coordinator.monitor, run_dir, name=job.name,
                            run_config=job.to_dict())
        engines = [MeteredEngine(e) for e in build_engines(job.engines)]
        display.message(f"starting {len(engines)} {job.engines.__struct_config__.tag} engine(s)")
        await _run(job, engines, taskset, evals, monitors, display, result)
    except BaseException as exc:
        result.status = "failed" if result.status == "running" else result.status
        result.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result.wall_s = time.monotonic() - started
        if monitors is not None:
            monitors.close()
        (run_dir / "summary.json").write_text(json.dumps(result.summary(), indent=1) + "\n")
    return result


async def _run(job: JobConfig, engines: list[MeteredEngine], taskset: Taskset,
               evals: list[tuple[str, Taskset]], monitors: Monitors, display: Display,
               result: JobResult) -> None:
    coordinator = RolloutCoordinator(job.coordinator, engines)
    interrupt = _Interrupt(coordinator)
    try:
        await coordinator.prepare()
        step = 0
        while not interrupt.requested and (job.steps is None or step < job.steps):
            tasks = taskset.next_batch(job.batch_size)
            if not tasks:
                display.message(f"the taskset ran out after {step} step(s)")
                break
            last = step + 1 == job.steps if job.steps is not None else _exhausted(taskset, job)
            metrics = await _batch(coordinator, engines, interrupt, display, result, step,
                                   step, "train", tasks)
            if metrics is None:
                break
            result.train_steps = step + 1
            result.experiences_logged += int(metrics.get("experience_pipeline/experience_count",
                                                         0))
            if job.eval_due(step, last):
                for name, eval_set in evals:
                    eval_set.load_state_dict({**eval_set.state_dict(), "position": 0})
                    tasks = eval_set.next_batch(len(eval_set))
                    found = await _batch(coordinator, engines, interrupt, display, result,
                                         step, f"{step}/{name}", "eval", tasks)
                    if found is None:
                        break
                    metrics.update(found)
            monitors.log(metrics, step)
            step += 1
        result.status = "interrupted" if interrupt.requested else "completed"
    finally:
        interrupt.remove()
        await interrupt.settle()
        result.output_tokens = sum(e.output_tokens for e in engines)
        await coordinator.shutdown()
        await asyncio.gather(*(e.shutdown() for e in engines), return_exceptions=True)
    display.table(result.rows)


def _exhausted(taskset: Taskset, job: JobConfig) -> bool:
    """Whether the train taskset has no further batch."""
    left = len(taskset) * taskset.config.epochs - taskset.position
    return left == 0 or (left < job.batch_size and taskset.config.drop_last is not False)


async def _batch(coordinator: RolloutCoordinator, engines: list[MeteredEngine],
                 interrupt: _Interrupt, display: Display, result: JobResult, step: int,
                 batch_id: Any, batch_type: str, tasks: list) -> dict | None:
    """Run one batch; its metrics (with the run's own figures), or None if it was aborted."""
    label = f"{batch_type} {batch_id}"
    tokens_before = sum(e.output_tokens for e in engines)
    start = time.monotonic()
    interrupt.batch_id = batch_id
    await coordinator.submit_batch(batch_id=batch_id, batch_type=batch_type, tasks=tasks)

    def progress() -> Any:
        try:
            return coordinator.batch_progress(batch_id)
        except KeyError:
            return None

    display.batch_started(label, len(tasks), progress,
                          lambda: sum(e.output_tokens for e in engines))
    if interrupt.requested:         # Ctrl-C came between batches
        interrupt.abort_current()
    if batch_type == "train":
        out = await coordinator.finalize_train_batch(batch_id)
    else:
        out = await coordinator.finalize_eval_batch(batch_id)
    await interrupt.settle()
    seconds = time.monotonic() - start
    tokens = sum(e.output_tokens for e in engines) - tokens_before
    row = step_row(step, out, len(tasks), seconds, tokens)
    display.batch_finished(label, row)
    if interrupt.aborted is not None and interrupt.aborted == batch_id:
        result.aborted = batch_id
        display.message(f"interrupted: {label} aborted; finalized batches are kept")
        return None
    result.finalized.append(batch_id)
    result.rows.append(row)
    prefix = "perf" if batch_type == "train" else f"eval/{str(batch_id).split('/', 1)[1]}/perf"
    return {**out["metrics"], f"{prefix}/time_s": seconds, f"{prefix}/output_tokens": tokens,
            f"{prefix}/output_tokens_per_s": tokens / seconds if seconds > 0 else 0.0}
