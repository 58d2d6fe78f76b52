"""``fastrollout bench`` on simulated engines: the JSON report's fields and their consistency
with its raw samples, the plots as images, sweeps, Trinity side by side, bad flags."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastrollout.bench import _busy, _task_of, percentiles
from fastrollout.cli import main
from fastrollout.plots import tokens_over_time

CLI = [sys.executable, "-m", "fastrollout.cli", "bench"]
# A fast latency model: 2 ms to the first token, 0.2 ms per further one.
FAST = ["--ttft", "0.002", "--tpot", "0.0002", "--output-len", "uniform:4:32"]
SUMMARY = ("p50", "p90", "p99", "max", "mean")


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path, str]:
    folder = tmp_path_factory.mktemp("bench")
    done = bench("--tasks", "96", "--repeat", "4", "--concurrency", "16", *FAST,
                 "--json", str(folder / "report.json"), "--plot", str(folder / "plots"),
                 "--sweep", "concurrency=4,32")
    assert done.returncode == 0, done.stderr
    return json.loads((folder / "report.json").read_text()), folder / "plots", done.stdout


def test_report_has_the_documented_fields(report):
    data, _, _ = report
    assert data["tasks"] == data["finished_tasks"] == 96 and data["concurrency"] == 16
    assert data["workload"]["output_len"] == {"kind": "uniform", "low": 4, "high": 32}
    assert data["engine"] == {"backend": "simulated", "count": 2, "ttft": 0.002,
                              "tpot": 0.0002, "capacity": 256}
    for name in ("task_latency_s", "completion_s", "ttft_s", "coordinator_overhead_s"):
        assert set(data[name]) == set(SUMMARY), name
    assert data["wall_s"] > 0 and data["output_tokens"] > 0
    assert data["output_tokens_per_s"] == pytest.approx(data["output_tokens"] / data["wall_s"])
    assert 0 < data["engine_utilization"] <= 1 and 0 <= data["straggler_share"] < 1
    assert [e["requests"] for e in data["engines"]] and \
        sum(e["requests"] for e in data["engines"]) == 96
    assert sum(e["output_tokens"] for e in data["engines"]) == data["output_tokens"]
    # One request per task, each of 4 samples of its max_tokens.
    requests = data["requests"]
    assert len(requests) == 96
    assert sum(r[4] for r in requests) == data["output_tokens"]
    assert all(r[1] <= r[2] <= r[3] for r in requests)     # start <= first token <= end


def test_percentiles_match_the_raw_samples(report):
    data, _, _ = report
    for name, values in data["samples"].items():
        arr = np.asarray(values, dtype=np.float64)
        assert len(arr) == 96, name
        figures = data[name]
        assert figures["p50"] == pytest.approx(np.percentile(arr, 50), abs=0)
        assert figures["p90"] == pytest.approx(np.percentile(arr, 90), abs=0)
        assert figures["p99"] == pytest.approx(np.percentile(arr, 99), abs=0)
        assert figures["max"] == arr.max() and figures["mean"] == pytest.approx(arr.mean())
        assert figures["p50"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    samples = data["samples"]
    # A task's latency holds its engine request and the coordinator's own time around it;
    # its completion adds the wait in the queue.
    assert all(o >= 0 for o in samples["coordinator_overhead_s"])
    assert all(c >= t for c, t in zip(sorted(samples["completion_s"]),
                                      sorted(samples["task_latency_s"]), strict=True))


def test_table_and_sweep(report):
    data, _, stdout = report
    assert "task latency p99 ms" in stdout and "output tokens/s" in stdout
    sweep = data["sweep"]
    assert sweep["key"] == "concurrency"
    assert [run["concurrency"] for run in sweep["runs"]] == [4, 32]
    assert all(run["finished_tasks"] == 96 and "samples" not in run for run in sweep["runs"])


def test_plots_are_pngs_of_real_content(report):
    from PIL import Image

    _, plots, _ = report
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["latency_cdf.png", "sweep.png", "timeline.png", "tokens_per_s.png"]
    for path in plots.iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert width >= 600 and height >= 400, path.name
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        # Drawn on: many colours, and far from a blank page.
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 50, path.name
        assert (pixels.sum(axis=2) < 600).mean() > 0.01, path.name


def test_over_rollout_finalizes_early():
    done = bench("--tasks", "40", "--repeat", "2", "--concurrency", "40", "--ttft", "0.001",
                 "--tpot", "0.001", "--output-len", "lognormal:20:1.5:400",
                 "--over-rollout", "0.5", "--json", "-")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["finished_tasks"] >= 20 and data["workload"]["over_rollout"] == 0.5


def test_compare_trinity_side_by_side(tmp_path):
    pytest.importorskip("trinity")
    done = bench("--tasks", "32", "--repeat", "2", *FAST, "--compare", "trinity", "--json",
                 str(tmp_path / "report.json"))
    assert done.returncode == 0, done.stderr
    assert "trinity-rft 0.6.0" in done.stdout.splitlines()[0]
    data = json.loads((tmp_path / "report.json").read_text())
    theirs = data["compare"]["trinity"]
    assert theirs["finished_tasks"] == 32 and len(theirs["requests"]) == 32
    for name in ("task_latency_s", "completion_s", "ttft_s", "coordinator_overhead_s"):
        assert set(theirs[name]) == set(SUMMARY)


@pytest.mark.parametrize("args, message", [
    (["--output-len", "zipf:3"], "--output-len: unknown distribution 'zipf'"),
    (["--prompt-len", "uniform:9:3"], "--prompt-len: 'uniform:9:3': low (9) is above high (3)"),
    (["--tasks", "0"], "--tasks: must be >= 1"),
    (["--over-rollout", "1"], "--over-rollout: must be in [0, 1)"),
    (["--sweep", "speed=1,2"], "--sweep: expected KEY=V1,V2"),
    (["--engine", "tpu"], "--engine: expected simulated, vllm or an http(s) URL"),
])
def test_bad_flags_exit_2(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_busy_time_is_the_union_of_spans_within_the_windows():
    windows = [(10.0, 14.0), (20.0, 22.0)]        # relative to t0 = 10: [0, 4] and [10, 12]
    spans = [(0.5, 1.5), (1.0, 2.0), (3.0, 6.0), (9.0, 10.5), (11.0, 11.5)]
    assert _busy(spans, windows, 10.0) == pytest.approx(1.5 + 1.0 + 0.5 + 0.5)


def test_tokens_over_time_adds_up_to_the_tokens():
    requests = [[0, 0.0, 0.5, 1.0, 100], [1, 0.2, None, 2.0, 50], [0, 1.5, 1.6, 1.6, 10]]
    edges, rate = tokens_over_time(requests, bins=40)
    assert edges[0] == 0 and edges[-1] == 2.0
    assert float((rate * np.diff(edges)).sum()) == pytest.approx(160)


def test_request_ids_name_their_task():
    assert _task_of("3/17/0/2-1") == (3, 17)
    assert percentiles([]) is None and percentiles([math.nan]) is None
