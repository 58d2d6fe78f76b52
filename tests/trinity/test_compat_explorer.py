"""Trinity-RFT's own Explorer on fastrollout's coordinator, against the same run on Trinity's.

Runs only in ``.venv-trinity``. Both runs use the same harness (``explorer_harness``), the
same Trinity config and taskset, Trinity's own vLLM model actors (the CPU build, the tiny
test model), ``MathWorkflow``, an OpenAI-client workflow and an auxiliary-model workflow,
and Trinity's experience pipeline and SQL buffer. The fastrollout run differs by one thing:
every Ray worker runs ``fastrollout.compat.trinity.install.patch`` at start (the
``worker_process_setup_hook`` that ``install()`` adds to ``ray.init``), so the Explorer
actor's ``RolloutCoordinator.get_actor(config)`` builds fastrollout's coordinator.

Sampling makes token ids differ between runs; what must match is everything the trainer and
the monitor see of them: which (batch, task, run) experiences reach the buffer, their
fields, GRPO advantages computed from their rewards, and the metric keys of every step.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from explorer_harness import (
    explorer_config,
    gpus_needed,
    local_ray,
    run_explorer,
    serve_experiences,
)
from trinity.common.experience import Experience

from fastrollout.compat.trinity.install import SETUP_HOOK
from fastrollout.tinymodel import cached_tiny_model

BATCH, REPEAT, STEPS = 6, 4, 2

# Two Explorer runs, each loading vLLM models on the CPU, happen in the first test's setup.
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return cached_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def _run(model, workdir, name, setup_hook):
    with local_ray(workdir, gpus=gpus_needed(auxiliary=True), setup_hook=setup_hook):
        # A buffer name per run: Trinity's SQL storage declares its table class once per
        # process, and this process reads both buffers.
        buffer = {"buffer": {"trainer_input": {"experience_buffer": {"name": f"exp_{name}"}}}}
        config = explorer_config(workdir, model, name=name, batch_size=BATCH,
                                 repeat_times=REPEAT, overrides=buffer)
        run = run_explorer(config, steps=STEPS)
        serve_config = explorer_config(workdir, model, name=f"{name}-serve", mode="serve",
                                       batch_size=BATCH, repeat_times=REPEAT, auxiliary=False)
        served = serve_experiences(serve_config, [Experience.serialize_many(run.experiences)])
    return run, served


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """(Trinity's run, fastrollout's run): each an ExplorerRun and its serve-mode metrics."""
    trinity = _run(model, tmp_path_factory.mktemp("on-trinity"), "trinity", None)
    fastrollout = _run(model, tmp_path_factory.mktemp("on-fastrollout"), "fastrollout",
                       SETUP_HOOK)
    return trinity, fastrollout


def _shape(exp: Experience) -> tuple:
    """What an experience is, sampling aside."""
    return (exp.eid.batch, exp.eid.task, exp.eid.run, exp.eid.step,
            sorted(exp.info), sorted(exp.metrics or {}), exp.info["model_version"],
            exp.info["use_count"], exp.advantages is not None, exp.returns is not None)


def test_the_explorer_ran_on_fastrollout(runs):
    """fastrollout's eval metrics add unbiased pass@k of 0/1 metrics (API.md): present in
    its run only, so the swap happened in the Explorer's actor."""
    (trinity, _), (fastrollout, _) = runs
    key = "eval/math_eval/accuracy/pass@2"
    assert key in fastrollout.metrics(STEPS) and key not in trinity.metrics(STEPS)


def test_same_experiences_reach_the_buffer(runs):
    (trinity, _), (fastrollout, _) = runs
    assert len(fastrollout.experiences) == len(trinity.experiences) == STEPS * BATCH * REPEAT
    assert sorted(map(_shape, fastrollout.experiences)) == \
        sorted(map(_shape, trinity.experiences))
    for exp in fastrollout.experiences:
        assert exp.tokens.numel() == exp.prompt_length + exp.logprobs.numel()


def test_advantages_are_grpo_group_scores_of_the_rewards(runs):
    _, (fastrollout, _) = runs
    groups = defaultdict(list)
    for exp in fastrollout.experiences:
        groups[(exp.eid.batch, exp.eid.task)].append(exp)
    assert len(groups) == STEPS * BATCH
    for exps in groups.values():
        rewards = torch.tensor([exp.reward for exp in exps], dtype=torch.float32)
        mean, std = rewards.mean(), rewards.std()
        for exp in exps:
            expected = (exp.reward - mean) / (std + 1e-6) * exp.action_mask
            torch.testing.assert_close(exp.advantages, expected)


def test_every_step_logs_the_same_metric_keys(runs):
    (trinity, trinity_served), (fastrollout, fastrollout_served) = runs
    for step in range(1, STEPS + 1):
        ours, theirs = set(fastrollout.metrics(step)), set(trinity.metrics(step))
        extra = {key for key in ours - theirs if "/pass@" in key}
        assert ours - extra == theirs, (step, sorted(ours ^ theirs))
        assert fastrollout.metrics(step)["rollout/finished_task_count"] == BATCH
    assert set(fastrollout_served) == set(trinity_served)
    assert fastrollout_served["experience_pipeline/experience_count"] == \
        len(fastrollout.experiences)
