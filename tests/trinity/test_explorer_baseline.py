"""Trinity-RFT's own Explorer on Trinity's own coordinator: the reference run.

Runs only in ``.venv-trinity`` (``.ci/trinity-venv``). The model actors are Trinity's
``vLLMRolloutModel`` on the vLLM CPU build in Trinity's pinned range, serving the tiny test
model; the workflows are Trinity's ``MathWorkflow``, a custom one using the rollout model's
OpenAI client and one judged by an auxiliary model (``trinity_test_workflows``). The harness
(``explorer_harness``) says what had to bend for a machine without a GPU. The fastrollout
tests compare their runs against what this run shows.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch
from explorer_harness import (
    JUDGED,
    MATH,
    OPENAI,
    explorer_config,
    gpus_needed,
    local_ray,
    run_explorer,
    serve_experiences,
)
from trinity.common.experience import Experience

from fastrollout.tinymodel import cached_tiny_model

BATCH, REPEAT, STEPS = 6, 4, 2
# Which metric each workflow's experiences carry (set by the workflow or its reward).
WORKFLOW_METRIC = {MATH: "accuracy", OPENAI: "digit_share", JUDGED: "judge_bonus"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return cached_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory):
    """One Explorer run (2 steps, an eval at step 2) and the serve-mode pipeline over its
    experiences, both on Trinity's coordinator."""
    workdir = tmp_path_factory.mktemp("trinity-baseline")
    with local_ray(workdir, gpus=gpus_needed(auxiliary=True)):
        config = explorer_config(workdir, model, name="trinity",
                                 batch_size=BATCH, repeat_times=REPEAT)
        run = run_explorer(config, steps=STEPS)
        # The explorer's engines are gone by now; a serve-mode pipeline needs none.
        serve_config = explorer_config(workdir, model, name="serve", mode="serve",
                                       batch_size=BATCH, repeat_times=REPEAT, auxiliary=False)
        served = serve_experiences(serve_config, [Experience.serialize_many(run.experiences)])
    return run, served


def test_every_run_of_every_task_reaches_the_buffer(baseline):
    run, _ = baseline
    assert len(run.experiences) == STEPS * BATCH * REPEAT
    groups = defaultdict(list)
    for exp in run.experiences:
        groups[(exp.eid.batch, exp.eid.task)].append(exp.eid.run)
    # The SQL buffer keeps task ids as text.
    assert sorted(groups) == [(step, str(task)) for step in range(1, STEPS + 1)
                              for task in range(BATCH)]
    assert all(sorted(runs) == list(range(REPEAT)) for runs in groups.values())


def test_each_workflow_kind_contributed(baseline):
    run, _ = baseline
    kinds = Counter(kind for exp in run.experiences for kind, metric in WORKFLOW_METRIC.items()
                    if metric in (exp.metrics or {}))
    assert kinds == {kind: STEPS * BATCH * REPEAT // 3 for kind in WORKFLOW_METRIC}


def test_experiences_carry_tokens_logprobs_and_explorer_info(baseline):
    run, _ = baseline
    for exp in run.experiences:
        assert exp.tokens.numel() == exp.prompt_length + exp.logprobs.numel()
        assert 0 < exp.logprobs.numel() <= 16
        assert exp.info["model_version"] == 0
        assert exp.info["use_count"] == 0


def test_advantages_are_grpo_group_scores(baseline):
    run, _ = baseline
    groups = defaultdict(list)
    for exp in run.experiences:
        groups[(exp.eid.batch, exp.eid.task)].append(exp)
    for exps in groups.values():
        rewards = torch.tensor([exp.reward for exp in exps], dtype=torch.float32)
        mean, std = rewards.mean(), rewards.std()
        for exp in exps:
            expected = (exp.reward - mean) / (std + 1e-6) * exp.action_mask
            torch.testing.assert_close(exp.advantages, expected)
            torch.testing.assert_close(exp.returns, exp.advantages)


def test_each_step_logs_rollout_and_pipeline_metrics(baseline):
    run, _ = baseline
    for step in range(1, STEPS + 1):
        metrics = run.metrics(step)
        assert metrics["rollout/finished_task_count"] == BATCH
        assert metrics["rollout/model_version"] == -1
        for key in ("explorer/time/wait_explore_step",
                    "experience_pipeline/group_advantages/reward_mean/mean",
                    "experience_pipeline/experience_count",
                    "rollout/time/run_execution/mean", "rollout/time/task_execution/mean"):
            assert key in metrics, (step, key, sorted(metrics))


def test_the_eval_of_the_last_step_is_logged_with_it(baseline):
    run, _ = baseline
    metrics = run.metrics(STEPS)
    assert metrics["eval/math_eval/finished_task_count"] == 3
    assert "eval/math_eval/accuracy/mean@2" in metrics
    assert "time/eval" in metrics
    assert not any(key.startswith("eval/") for key in run.metrics(1))


def test_serve_mode_runs_the_pipeline_on_given_payloads(baseline):
    run, served = baseline
    assert served["experience_pipeline/experience_count"] == len(run.experiences)
    assert "experience_pipeline/group_advantages/reward_mean/mean" in served
