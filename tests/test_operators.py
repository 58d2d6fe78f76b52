"""Experience operators: GRPO advantages against a direct computation, the filters, and their
metrics as the pipeline reports them."""
from __future__ import annotations

import numpy as np
import pytest

from fastrollout import EID, Config, Experience, ExperienceBatch
from fastrollout.config import (
    DynamicFilterConfig,
    GRPOConfig,
    LengthFilterConfig,
    RewardFilterConfig,
    StalenessFilterConfig,
)
from fastrollout.operators import run_operators, take
from fastrollout.pipeline import ExperiencePipeline


def _batch(rewards_by_task, *, response=3, mask=None, versions=None, seed=0):
    rng = np.random.default_rng(seed)
    exps = []
    for task, rewards in enumerate(rewards_by_task):
        for run, reward in enumerate(rewards):
            n = response + run      # responses of different lengths
            exp = Experience(tokens=rng.integers(0, 100, 2 + n).astype(np.int32), prompt_length=2,
                             reward=reward, eid=EID(batch=0, task=task, run=run),
                             action_mask=None if mask is None else mask(n))
            if versions is not None:
                exp.info = {"model_version": versions[task]}
            exps.append(exp)
    return ExperienceBatch.from_experiences(exps)


def test_grpo_advantages_match_a_direct_computation():
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5], [2.0], [3.0, 1.0, 2.0]]
    batch, metrics = run_operators(_batch(rewards), [GRPOConfig()], None)
    adv = batch.column("advantages")
    i = 0
    for group in rewards:
        r = np.array(group)
        mean, std = (r.mean(), r.std(ddof=1)) if len(r) > 1 else (0.0, 1.0)
        for run, reward in enumerate(group):
            expected = np.float32((reward - mean) / (std + 1e-6))
            np.testing.assert_allclose(adv[i], np.full(3 + run, expected), rtol=1e-6)
            np.testing.assert_array_equal(batch.column("returns")[i], adv[i])
            i += 1
    means = [np.mean(g) if len(g) > 1 else 0.0 for g in rewards]
    assert metrics["experience_pipeline/group_advantages/reward_mean/mean"] == \
        pytest.approx(np.mean(means))
    assert metrics["experience_pipeline/group_advantages/in_count"] == 10.0
    assert metrics["experience_pipeline/filtered_count"] == 0.0


def test_grpo_returns_stay_the_advantages_column_through_filters():
    # One column under both names: the codec writes it once (test_codec).
    batch, _ = run_operators(_batch([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]),
                             [GRPOConfig(), DynamicFilterConfig()], None)
    assert len(batch) == 4 and batch.column("returns") is batch.column("advantages")


def test_grpo_without_std_normalization_and_with_an_action_mask():
    mask = lambda n: np.arange(n) % 2 == 0   # noqa: E731 -- model tokens at even positions
    batch, _ = run_operators(_batch([[1.0, 0.0]], mask=mask), [GRPOConfig(norm_std=False)], None)
    adv = batch.column("advantages")
    np.testing.assert_allclose(adv[0], [0.5, 0, 0.5])
    np.testing.assert_allclose(adv[1], [-0.5, 0, -0.5, 0])


def test_dynamic_filter_drops_tasks_whose_rewards_do_not_vary():
    batch, metrics = run_operators(_batch([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0, 0.0], [2.0]]),
                                   [DynamicFilterConfig()], None)
    assert [(e.task, e.run) for e in batch.eids] == [(1, 0), (1, 1)]
    assert metrics["experience_pipeline/dynamic_filter/filtered_count"] == 6.0
    assert metrics["experience_pipeline/dynamic_filter/out_count"] == 2.0


def test_reward_and_length_filters():
    source = _batch([[0.0, 0.5, 1.0, 1.5]])
    batch, _ = run_operators(source, [RewardFilterConfig(min=0.5, max=1.0)], None)
    assert batch.rewards.tolist() == [0.5, 1.0]
    batch, metrics = run_operators(source, [LengthFilterConfig(min_response_tokens=4,
                                                               max_response_tokens=5)], None)
    assert batch.response_lengths().tolist() == [4, 5]
    assert metrics["experience_pipeline/filtered_count"] == 2.0


def test_staleness_filter_drops_experiences_too_many_versions_behind():
    source = _batch([[1.0], [1.0], [1.0]], versions=[5, 4, 3])
    batch, metrics = run_operators(source, [StalenessFilterConfig(max_staleness=2)], 5)
    assert [e.task for e in batch.eids] == [0, 1]
    assert metrics["experience_pipeline/staleness_filter/staleness/max"] == 2.0


def test_take_selects_rows_without_copying_columns():
    source = _batch([[1.0, 2.0, 3.0]])
    picked = take(source, np.array([2, 0]))
    assert picked.rewards.tolist() == [3.0, 1.0]
    assert picked.columns["tokens"].data is source.columns["tokens"].data
    np.testing.assert_array_equal(picked[0].tokens, source[2].tokens)
    assert picked.to_experiences()[1].eid.run == 0


async def test_the_pipeline_runs_operators_in_order_at_commit_and_reports_versions():
    config = Config.from_dict({"pipeline": {"operators": [{"type": "dynamic_filter"},
                                                          {"type": "grpo"}]}}).pipeline
    pipeline = ExperiencePipeline(config)
    source = _batch([[1.0, 0.0], [1.0, 1.0]], versions=[2, 3])
    pipeline.stage(7, source.to_experiences(), (2, 3, 1))
    metrics = await pipeline.commit(7, model_version=4)
    out = pipeline.take(7)
    assert len(out) == 2 and out.column("advantages") is not None
    assert metrics["experience_pipeline/filtered_count"] == 2.0
    assert metrics["experience_pipeline/model_version/min"] == 2.0
    assert metrics["experience_pipeline/model_version_lag/max"] == 2.0
    assert metrics["experience_pipeline/model_version_drift/max"] == 1.0
    assert metrics["experience_pipeline/experience_count"] == 2.0


def test_operator_configs_are_checked_with_their_path():
    from fastrollout import ConfigError
    with pytest.raises(ConfigError, match=r"pipeline.operators\[0\]"):
        Config.from_dict({"pipeline": {"operators": [{"type": "grpo", "epsilon": -1}]}})
    with pytest.raises(ConfigError, match=r"pipeline.operators\[1\]"):
        Config.from_dict({"pipeline": {"operators": [{"type": "grpo"}, {"type": "nope"}]}})


def test_grpo_needs_rewards():
    exps = [Experience(tokens=[1, 2, 3], prompt_length=1, eid=EID(task=0, run=i)) for i in range(2)]
    with pytest.raises(ValueError, match=r"grpo: experience 0 .* has no reward"):
        run_operators(ExperienceBatch.from_experiences(exps), [GRPOConfig()], None)
