"""The job config: the embedded default, how a file and ``--set`` override it, paths, engines."""
from __future__ import annotations

from pathlib import Path

import pytest

from fastrollout import ConfigError
from fastrollout.engines import SimulatedEngine
from fastrollout.job import (
    DEFAULT_YAML,
    SimulatedEngines,
    VLLMEngines,
    build_engines,
    load_job,
    merge,
)
from fastrollout.lengths import Lognormal, parse_length


def test_the_default_is_the_tiny_model_on_vllm_with_arithmetic_and_math():
    job = load_job()
    assert job.engines == VLLMEngines(model="tiny", cpu_engines=1)
    assert job.taskset.workflow == "math" and job.taskset.prompt_key == "question"
    assert job.taskset.path == "{run}/train.jsonl" and job.arithmetic.train_rows == 64
    assert [t.name for t in job.eval_tasksets] == ["arithmetic"]
    assert job.eval_tasksets[0].is_eval and job.steps == 3
    assert job.coordinator.pipeline.sink == "durable"
    assert "name: default" in DEFAULT_YAML


def test_a_file_overrides_key_by_key(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('steps = 5\n[coordinator.explorer]\nmax_timeout = 30.0\n')
    job = load_job(path, ["batch_size=2"])
    assert (job.steps, job.batch_size) == (5, 2)
    assert job.coordinator.explorer.max_timeout == 30.0
    assert job.coordinator.explorer.runner_per_model == 8      # the default's, kept
    assert [op.__struct_config__.tag for op in job.coordinator.pipeline.operators] == ["grpo"]


def test_another_backend_replaces_the_engines_section():
    job = load_job(None, ["engines={backend: simulated, count: 3}"])
    assert job.engines == SimulatedEngines(count=3)
    # the same backend merges: model stays, engine_args are added
    job = load_job(None, ["engines.engine_args={max_num_seqs: 8}"])
    assert job.engines.model == "tiny" and job.engines.engine_args == {"max_num_seqs": 8}
    assert merge({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2]}}) == {"a": {"b": 1, "c": [2]}}


def test_paths_resolve_against_the_run_and_the_config_folder(tmp_path):
    job = load_job(None, ["taskset.path=data/t.jsonl"]).resolve_paths(tmp_path / "run", tmp_path)
    assert job.taskset.path == str(tmp_path / "data" / "t.jsonl")
    assert job.eval_tasksets[0].path == str(tmp_path / "run" / "eval.jsonl")
    assert job.coordinator.pipeline.path == str(tmp_path / "run" / "experiences")
    assert Path(job.output_dir) == tmp_path / "runs"


def test_eval_after_every_interval_and_the_last_step():
    job = load_job(None, ["eval_interval=2", "steps=5"])
    assert [s for s in range(5) if job.eval_due(s, last=s == 4)] == [1, 3, 4]
    assert not load_job(None, ["eval_tasksets=[]"]).eval_due(2, last=True)


def test_simulated_engines_are_built_with_their_latency_model():
    job = load_job(None, ["engines={backend: simulated, count: 2, ttft: 0.5, "
                          "output_len: {kind: lognormal, median: 10, sigma: 0.5}}"])
    engines = build_engines(job.engines)
    assert [type(e) for e in engines] == [SimulatedEngine, SimulatedEngine]
    assert engines[0].ttft == 0.5 and engines[0].output_len.kind == "lognormal"


def test_openai_key_comes_from_the_environment(monkeypatch):
    job = load_job(None, ["engines={backend: openai, base_url: http://x/v1, model: m, "
                          "api_key_env: FR_TEST_KEY}"])
    monkeypatch.delenv("FR_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="FR_TEST_KEY"):
        build_engines(job.engines)


def test_length_flags():
    assert parse_length("lognormal:64:0.6:256") == Lognormal(median=64, sigma=0.6, max=256)
    with pytest.raises(ConfigError, match="--x: 'uniform:1' does not read as uniform:low:high"):
        parse_length("uniform:1", "--x")
