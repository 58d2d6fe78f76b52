"""Monitors: the JSONL file always, TensorBoard and Weights & Biases (offline) when asked."""
from __future__ import annotations

import json
import math

import pytest

from fastrollout.config import MonitorConfig
from fastrollout.monitors import Monitors


def test_jsonl_gets_every_step_flushed_with_non_finite_values_spelled_out(tmp_path):
    monitors = Monitors(MonitorConfig(), tmp_path)
    monitors.log({"rollout/accuracy/mean": 0.5, "x": float("nan")}, step=1)
    # flushed before close: a reader (or a crash) sees it
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["rollout/accuracy/mean"] == 0.5
    monitors.log({"rollout/accuracy/mean": 0.75, "x": math.inf}, step=2)
    monitors.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["x"]) for r in records] == [(1, "nan"), (2, "inf")]


def test_tensorboard_scalars_can_be_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monitors = Monitors(MonitorConfig(backends=["tensorboard"]), tmp_path)
    for step in range(3):
        monitors.log({"rollout/reward/mean": step / 2}, step=step)
    monitors.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("rollout/reward/mean")] == \
        [(0, 0.0), (1, 0.5), (2, 1.0)]


def test_wandb_offline_run_records_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitors = Monitors(MonitorConfig(backends=["wandb"], project="test"), tmp_path,
                        name="unit", run_config={"steps": 2})
    run = monitors.monitors[1]._run
    try:
        for step in range(2):
            monitors.log({"rollout/reward/mean": float(step) + 0.5}, step=step)
        # a step is committed when the next one starts
        assert run.summary["rollout/reward/mean"] == 0.5 and run.summary["_step"] == 0
    finally:
        monitors.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_a_missing_backend_package_names_the_extra(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match=r"pip install 'fastrollout\[wandb\]'"):
        Monitors(MonitorConfig(backends=["wandb"]), tmp_path)
