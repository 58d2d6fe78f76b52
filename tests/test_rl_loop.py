"""The example RL loop end to end on the real CPU build of vLLM and the tiny model:
rollouts -> GRPO -> one PyTorch step -> checkpoint -> update_weights -> next rollouts."""
from __future__ import annotations

import asyncio
import gc

import pytest

from fastrollout.examples.rl_loop import rl_loop
from tinymodel import engine_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_three_steps_move_the_weights_and_the_versions(tiny_model, tmp_path):
    import uvloop

    vllm_dir = tmp_path / "vllm"     # vLLM's sockets and caches
    vllm_dir.mkdir()
    engine_args = {"max_model_len": 256, "enforce_eager": True, "dtype": "float32",
                   "kv_cache_memory_bytes": 128 << 20, "seed": 0, "cpu_engines": 1}
    records = uvloop.run(asyncio.wait_for(rl_loop(
        tiny_model, tmp_path, steps=3, tasks_per_step=4, repeat=4, max_tokens=12, lr=5e-2,
        engine_args=engine_args, engine_env=engine_env(vllm_dir)), 600))
    gc.collect()    # the engines' leftovers go now, not at interpreter exit
    # each step's rollouts were sampled with the weights the previous step wrote
    assert [r["sampled_with_version"] for r in records] == [0, 1, 2]
    assert [r["new_version"] for r in records] == [1, 2, 3]
    # GRPO had a signal and the trainer used it
    assert all(r["train/tokens"] == 4 * 4 * 12 for r in records)
    assert any(abs(r["train/loss"]) > 0 for r in records)
    assert records[0]["experience_pipeline/group_advantages/reward_std/mean"] > 0
    for r in records:
        # the step moved the weights: the same tokens have other log-probs after it
        assert abs(r["train/logprob_after_step/mean"] - r["train/logprob/mean"]) > 1e-3
        # and the engine sampled with the weights the trainer held before its step (the
        # checkpoint of the step before): both give the sampled tokens the same log-probs
        assert r["engine/logprob/mean"] == pytest.approx(r["train/logprob/mean"], abs=2e-3)
