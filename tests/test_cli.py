"""The command line through subprocesses, as users run it: ``fastrollout run`` (the embedded
default on the real vLLM CPU build, simulated jobs, config errors, Ctrl-C, the terminal
display) and ``fastrollout inspect``."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fastrollout.cli import main
from fastrollout.experience import Experience, encode_experiences
from fastrollout.job import load_job
from fastrollout.sinks import DurableLogReader

CLI = [sys.executable, "-m", "fastrollout.cli"]
# A simulated job that needs no reward model: the toy workflow of fastrollout.demo.
SIMULATED = ["--set", "engines.backend=simulated",
             "--set", "taskset.workflow=fastrollout.demo:ScoreWorkflow",
             "--set", "taskset.workflow_args={prompt_key: question}",
             "--set", "eval_tasksets=[]"]


def cli(*args: str, env: dict | None = None, timeout: float = 120, cwd: Path | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def only_run_folder(output: Path) -> Path:
    (run_dir,) = [p for p in output.iterdir() if p.is_dir()]
    return run_dir


def log_batches(run_dir: Path) -> list:
    with DurableLogReader(run_dir / "experiences") as reader:
        return [(record.batch_id, len(record.batch())) for record in reader]


@pytest.mark.vllm
@pytest.mark.slow
def test_default_run_on_vllm_fills_its_run_folder(tiny_model, tmp_path):
    # The tiny model the tests built stands in for the cache the default job builds into.
    cache = tmp_path / "cache"
    (cache / "fastrollout").mkdir(parents=True)
    (cache / "fastrollout" / "tiny-llama").symlink_to(tiny_model)
    (tiny_model / ".complete").touch()
    env = {"XDG_CACHE_HOME": str(cache), "VLLM_RPC_BASE_PATH": str(tmp_path),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = cli("run", "--set", f"output_dir={tmp_path / 'runs'}", env=env, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default"
    assert f"completed: 3 train step(s), 4 batch(es) finalized; see {run_dir}" in done.stdout

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["finalized_batches"] == [0, 1, 2, "2/arithmetic"]
    assert summary["experiences_logged"] == 3 * 8 * 4 and summary["output_tokens"] > 0
    # The resolved config reads back as the job it ran.
    resolved = load_job(run_dir / "config.yaml")
    assert resolved.engines.model == "tiny"
    assert resolved.taskset.path == str(run_dir / "train.jsonl")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["rollout/finished_task_count"] == 8 and r["perf/output_tokens"] > 0
               for r in records)
    assert records[2]["eval/arithmetic/finished_task_count"] == 16
    assert "eval/arithmetic/accuracy/mean@2" in records[2]
    # Every train batch is in the experience log: 8 tasks x 4 samples, 24 tokens each.
    assert log_batches(run_dir) == [(0, 32), (1, 32), (2, 32)]
    inspected = cli("inspect", "--json", str(run_dir / "experiences"))
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["response_tokens"] == {"min": 24.0, "mean": 24.0,
                                                               "max": 24.0}


def test_simulated_run_prints_plain_lines_off_a_terminal(tmp_path):
    done = cli("run", *SIMULATED, "--set", f"output_dir={tmp_path}", "--set", "steps=2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("train 0: 8/8 tasks in ") for line in lines)
    assert any(line.startswith("train 1: 8/8 tasks in ") for line in lines)
    assert "\x1b[" not in done.stdout          # no terminal control sequences in a pipe
    header = next(line for line in lines if line.lstrip().startswith("step"))
    assert header.split() == ["step", "batch", "tasks", "seconds", "tok/s", "reward",
                              "accuracy", "resp", "len"]
    run_dir = only_run_folder(tmp_path)
    assert log_batches(run_dir) == [(0, 32), (1, 32)]
    # The next run of the same name gets a folder of its own.
    again = cli("run", *SIMULATED, "--set", f"output_dir={tmp_path}", "--set", "steps=1")
    assert again.returncode == 0 and (tmp_path / "default-2" / "summary.json").exists()


def test_config_errors_exit_2_naming_the_field(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("coordinator:\n  explorer:\n    max_timeout: -1\n")
    done = cli("run", str(path))
    assert done.returncode == 2
    assert "coordinator.explorer.max_timeout" in done.stderr and str(path) in done.stderr
    assert "(value: -1)" in done.stderr and not list(tmp_path.glob("runs*"))


@pytest.mark.parametrize("content, field", [
    ("engines: {backend: simulated, ttft: -1}\n", "engines.ttft"),
    ("engines: {backend: gpu}\n", "engines.backend"),
    ("taskset: {rollout_args: {max_tokens: lots}}\n", "taskset.rollout_args.max_tokens"),
    ("eval_tasksets: [{name: e, path: x.jsonl, shuffle: true}]\n", "eval_tasksets[0].shuffle"),
    ("coordinator: {pipeline: {operators: [{type: grpo, eps: 1}]}}\n",
     "coordinator.pipeline.operators[0].eps"),
    ("coordinator: {pipeline: {sink: memory}}\n", "coordinator.pipeline.sink"),
    ("stepz: 3\n", "stepz"),
    ("- a list\n", "top level"),
])
def test_config_error_names_the_path(tmp_path, capsys, content, field):
    path = tmp_path / "job.yaml"
    path.write_text(content)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err and "config error" in err


def test_set_overrides_are_checked_like_the_file(capsys):
    assert main(["run", "--set", "steps=0"]) == 2
    assert "steps: expected `int` >= 1 (value: 0)" in capsys.readouterr().err
    assert main(["run", "--set", "steps"]) == 2
    assert "expected key=value" in capsys.readouterr().err


def test_show_config_prints_the_resolved_job_which_loads_back(tmp_path, capsys):
    assert main(["run", "--set", "batch_size=4", "--show-config"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert load_job(path).batch_size == 4
    assert yaml.safe_load(text)["engines"]["backend"] == "vllm"


def test_sigint_aborts_the_batch_in_flight_and_keeps_finalized_ones(tmp_path):
    # Each batch takes ~0.7 s on the simulated engines: a Ctrl-C lands inside one.
    args = [*CLI, "run", *SIMULATED, "--set", f"output_dir={tmp_path}", "--set", "steps=50",
            "--set", "engines={backend: simulated, ttft: 0.1, tpot: 0.02, "
                     "output_len: {kind: fixed, value: 32}}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("train 1:"):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted:" in out and "aborted; finalized batches are kept" in out
    run_dir = only_run_folder(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    finalized = summary["finalized_batches"]
    assert finalized[:2] == [0, 1] and summary["aborted_batch"] not in finalized
    assert summary["aborted_batch"] == finalized[-1] + 1
    # Every finalized batch, and nothing else, is in the log, whole.
    assert log_batches(run_dir) == [(b, 32) for b in finalized]
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == finalized


def test_terminal_session_shows_the_live_display(tmp_path):
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "140", "LINES": "40", "TERM": "xterm-256color"}
    proc = subprocess.Popen([*CLI, "run", *SIMULATED, "--set", f"output_dir={tmp_path}",
                             "--set", "steps=2"], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:     # the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert "\x1b[" in screen                    # drawn with terminal control sequences
    for text in ("train 0", "train 1", "running", "failed", "retried", "tok/s", "ETA",
                 "steps", "accuracy"):
        assert text in screen, text
    assert "━" in screen                       # the progress bar


def payload_file(tmp_path: Path) -> Path:
    exps = []
    for i in range(6):
        exp = Experience(tokens=list(range(10 + i)), prompt_length=4, reward=float(i),
                         logprobs=[-0.5] * (6 + i))
        exp.eid.task = i // 2
        exp.info = {"model_version": i % 2}
        exps.append(exp)
    path = tmp_path / "batch.frxp"
    path.write_bytes(bytes(encode_experiences(exps)))
    return path


def test_inspect_summarizes_a_payload(tmp_path):
    done = cli("inspect", "--json", str(payload_file(tmp_path)))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["kind"] == "FRXP payload" and summary["experiences"] == 6
    assert summary["tasks"] == 3
    assert summary["response_tokens"] == {"min": 6.0, "mean": 8.5, "max": 11.0}
    assert summary["rewards"] == {"min": 0.0, "mean": 2.5, "max": 5.0}
    assert summary["model_versions"] == {"0": 3, "1": 3}
    text = cli("inspect", str(payload_file(tmp_path))).stdout
    assert "experiences: 6" in text


def test_inspect_refuses_corrupt_input(tmp_path):
    path = payload_file(tmp_path)
    raw = bytearray(path.read_bytes())
    path.write_bytes(raw[: len(raw) // 2])
    done = cli("inspect", str(path))
    assert done.returncode == 1 and "error:" in done.stderr and str(path) not in done.stdout
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04" + bytes(60))
    done = cli("inspect", str(junk))
    assert done.returncode == 1 and "magic" in done.stderr


def test_inspect_refuses_a_corrupt_log(tmp_path):
    done = cli("run", *SIMULATED, "--set", f"output_dir={tmp_path}", "--set", "steps=2")
    assert done.returncode == 0, done.stderr
    (segment,) = (only_run_folder(tmp_path) / "experiences").glob("*.frlog")
    raw = bytearray(segment.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    segment.write_bytes(raw)
    done = cli("inspect", str(segment.parent))
    assert done.returncode == 1 and "checksum" in done.stderr
