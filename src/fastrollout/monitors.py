"""Monitors: where each step's metrics go. A JSONL file always; TensorBoard and Weights &
Biases when configured (``monitor.backends``) and their packages are installed (the
``tensorboard`` and ``wandb`` extras)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from .config import MonitorConfig


class Monitor(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class JsonlMonitor:
    """One JSON object per ``log``: ``{"step": s, "time": unix seconds, **metrics}``, flushed
    at once so that a reader (or a crash) sees every logged step. Non-finite numbers are
    written as strings ("nan", "inf"), which JSON has no literal for."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        record = {"step": step, "time": time.time(),
                  **{k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
                     for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardMonitor:
    def __init__(self, folder: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("monitor backend 'tensorboard' needs torch and tensorboard: "
                              "pip install 'fastrollout[tensorboard]'") from exc
        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbMonitor:
    def __init__(self, folder: str | os.PathLike, project: str, name: str,
                 config: dict[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("monitor backend 'wandb' needs wandb: "
                              "pip install 'fastrollout[wandb]'") from exc
        self._run = wandb.init(project=project, name=name, dir=str(folder), config=config,
                               reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class Monitors:
    """Every configured monitor of one run, writing under ``folder`` (``metrics.jsonl``,
    ``tensorboard/``, ``wandb/``)."""

    def __init__(self, config: MonitorConfig, folder: str | os.PathLike, *, name: str = "run",
                 run_config: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        self.monitors: list[Monitor] = [JsonlMonitor(folder / "metrics.jsonl")]
        try:
            for backend in config.backends:
                if backend == "tensorboard":
                    self.monitors.append(TensorBoardMonitor(folder / "tensorboard"))
                else:
                    self.monitors.append(WandbMonitor(folder, config.project, name, run_config))
        except BaseException:
            self.close()
            raise

    def log(self, metrics: dict[str, float], step: int) -> None:
        for monitor in self.monitors:
            monitor.log(metrics, step)

    def close(self) -> None:
        for monitor in self.monitors:
            monitor.close()
        self.monitors = []
