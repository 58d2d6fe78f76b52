"""VLLMEngine against the real CPU build of vLLM and a tiny model built here.

Two engines start once for the module (about 10-20 s each) and run on one
background uvloop; every test drives them through ``bg.run(...)``. The tests
that kill an engine come last.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal

import numpy as np
import pytest

from fastrollout import (
    Config,
    EngineDeadError,
    GenerationConfig,
    RolloutCoordinator,
    Task,
    Workflow,
)
from fastrollout.engines import ModelClient, VLLMEngine
from tinymodel import BackgroundLoop, engine_env, perturb_weights

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def bg():
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def started(bg, tiny_model, tmp_path_factory):
    """Two engines (one per CPU core set) and os.environ before / after starting them."""
    import vllm.v1.engine.async_llm  # noqa: F401  (its import edits os.environ; not ours to undo)
    before = dict(os.environ)
    engines = VLLMEngine.launch(tiny_model, cpu_engines=2,
                                env=engine_env(tmp_path_factory.mktemp("vllm")),
                                max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
                                dtype="float32", kv_cache_memory_bytes=128 << 20)
    bg.run_all([e.prepare() for e in engines], timeout=240)
    after = dict(os.environ)
    yield engines, before, after
    bg.run_all([e.shutdown() for e in engines], timeout=60)
    del engines
    gc.collect()     # vLLM's leftover zmq contexts go now, not at interpreter exit


@pytest.fixture(scope="module")
def engines(started):
    return started[0]


def test_launch_pins_engines_to_cores_and_restores_environ(started):
    engines, before, after = started
    assert after == before
    binds = [e._env["VLLM_CPU_OMP_THREADS_BIND"] for e in engines]
    assert len(set(binds)) == len(binds) or len(os.sched_getaffinity(0)) < 2
    assert not any(e.is_dead for e in engines)


def test_n_samples_carry_float32_logprobs_summing_to_the_cumulative(bg, engines):
    engine = engines[0]
    prompt = engine.encode("What is two plus two?")
    outs = bg.run(engine.generate(prompt, GenerationConfig(n=4, max_tokens=24, seed=3),
                                  request_id="n4"))
    assert len(outs) == 4
    for c in outs:
        assert c.finish_reason == "length" and len(c.token_ids) == 24
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
        assert len(c.logprobs) == 24 and (c.logprobs <= 0).all()
        assert c.logprobs.sum() == pytest.approx(c.cumulative_logprob, abs=1e-3)
        # vLLM holds back a trailing incomplete UTF-8 character of the text
        assert engine.decode(c.token_ids).startswith(c.text) and c.text
    assert len({tuple(c.token_ids) for c in outs}) > 1          # distinct samples
    again = bg.run(engine.generate(prompt, GenerationConfig(n=4, max_tokens=24, seed=3),
                                   request_id="n4-again"))
    for a, b in zip(outs, again, strict=True):                  # per-request seeds reproduce
        np.testing.assert_array_equal(a.token_ids, b.token_ids)


def test_abort_mid_generation_returns_partial_tokens_and_frees_the_request(bg, engines):
    engine = engines[0]
    prompt = engine.encode("Numbers:")
    budget = MAX_MODEL_LEN - len(prompt)        # seconds of decoding on a CPU

    async def scenario():
        task = asyncio.ensure_future(engine.generate(
            prompt, GenerationConfig(n=2, max_tokens=budget), request_id="long"))
        await asyncio.sleep(0.5)
        await engine.abort(["long"])
        outs = await task
        return outs, engine.llm.get_num_unfinished_requests()

    outs, unfinished = bg.run(scenario())
    assert unfinished == 0
    assert [c.finish_reason for c in outs] == ["abort", "abort"]
    for c in outs:
        assert 0 < len(c.token_ids) < budget and len(c.logprobs) == len(c.token_ids)


def test_cancelling_generate_aborts_the_request(bg, engines):
    engine = engines[0]

    async def scenario():
        task = asyncio.ensure_future(engine.generate(
            engine.encode("Numbers:"), GenerationConfig(max_tokens=900), request_id="cancelled"))
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.05)        # the engine core's abort is one round trip away
        return task.cancelled(), engine.llm.get_num_unfinished_requests()

    assert bg.run(scenario()) == (True, 0)


def test_model_client_sync_in_a_thread_and_chat(bg, engines):
    engine = engines[0]

    async def scenario():
        loop = asyncio.get_running_loop()
        client = ModelClient(engine, loop=loop, request_prefix="c",
                             rollout_args=GenerationConfig(n=2, max_tokens=8))
        exps = await loop.run_in_executor(None, client.generate, ["hello world"])
        chat = await client.chat_async([{"role": "user", "content": "hi"}], n=1)
        return exps, chat

    exps, (chat,) = bg.run(scenario())
    assert len(exps) == 2
    for exp in exps:
        assert exp.prompt_text == "hello world" and exp.truncate_status == "response_truncated"
        assert len(exp.tokens) == exp.prompt_length + 8 == exp.prompt_length + len(exp.logprobs)
    template = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    np.testing.assert_array_equal(chat.tokens[:chat.prompt_length], template)


def test_weight_reload_changes_samples_and_bumps_the_version(bg, engines, tiny_model, tmp_path):
    engine = engines[0]
    trained = perturb_weights(tiny_model, tmp_path / "trained")
    prompt = engine.encode("The quick brown fox")
    params = GenerationConfig(max_tokens=16, temperature=0.0)

    def sample(rid):
        return bg.run(engine.generate(prompt, params, request_id=rid))[0].token_ids

    original = sample("before")
    start = engine.model_version
    assert bg.run(engine.update_weights(trained)) == start + 1
    assert not np.array_equal(sample("after"), original)
    assert bg.run(engine.update_weights(tiny_model)) == start + 2
    np.testing.assert_array_equal(sample("restored"), original)
    assert bg.run(engine.llm.get_weight_version()) == str(start + 2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bg.run(engine.update_weights(tmp_path / "missing"))


class GenerateWorkflow(Workflow):
    """Sync, repeatable (like Trinity's math workflows): one request with n = repeat_times."""

    can_repeat = True

    def run(self):
        exps = self.model.generate([self.task.raw_task["prompt"]])
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
            exp.reward = float(len(exp.response_text))
            exp.metrics = {"score": float(len(exp.tokens) - exp.prompt_length)}
        return exps


class ChatWorkflow(Workflow):
    is_async = True

    async def run_async(self):
        messages = [{"role": "user", "content": self.task.raw_task["prompt"]}]
        exps = await self.model.chat_async(messages)
        for exp in exps:
            exp.metrics = {"accuracy": 1.0}
        return exps


def _tasks(n, workflow, *, repeat=2, is_eval=False, max_tokens=16):
    return [Task(workflow=workflow, repeat_times=repeat, is_eval=is_eval,
                 rollout_args=GenerationConfig(max_tokens=max_tokens),
                 raw_task={"prompt": f"What is {i} plus {i}?"}) for i in range(n)]


def _config(**explorer):
    return Config.from_dict({"explorer": {"runner_per_model": 4, "max_timeout": 120.0,
                                          **explorer}})


def test_coordinator_drives_two_engines_through_train_and_eval_batches(bg, engines, tiny_model,
                                                                       tmp_path):
    trained = perturb_weights(tiny_model, tmp_path / "trained")

    async def scenario():
        coord = RolloutCoordinator(_config(), engines)
        await coord.prepare()
        try:
            before = {id(e): e.llm.get_num_unfinished_requests() for e in engines}
            await coord.submit_batch(batch_id=1, tasks=_tasks(16, GenerateWorkflow),
                                     batch_type="train")
            train = await coord.finalize_train_batch(1)
            first = coord.take_experiences(1)
            versions = [e.model_version for e in engines]
            await asyncio.gather(*(e.update_weights(trained) for e in engines))
            await coord.submit_batch(batch_id=2, tasks=_tasks(8, GenerateWorkflow),
                                     batch_type="train")
            await coord.submit_batch(batch_id="2/eval", tasks=_tasks(4, ChatWorkflow, is_eval=True),
                                     batch_type="eval")
            evaluation = await coord.finalize_eval_batch("2/eval")
            await coord.finalize_train_batch(2)
            second = coord.take_experiences(2)
            return train, evaluation, first, second, versions, before
        finally:
            await coord.shutdown()

    train, evaluation, first, second, versions, before = bg.run(scenario(), timeout=240)
    assert train["finished_task_count"] == 16
    assert train["metrics"]["rollout/finished_task_count"] == 16
    assert evaluation["finished_task_count"] == 4
    assert evaluation["metrics"]["eval/eval/finished_task_count"] == 4
    first, second = first.to_experiences(), second.to_experiences()
    assert len(first) == 32 and len(second) == 16
    # each experience carries the version of the engine that sampled it
    assert {e.info["model_version"] for e in first} <= set(versions)
    assert {e.info["model_version"] for e in second} <= {v + 1 for v in versions}
    for exp in first + second:
        assert len(exp.tokens) - exp.prompt_length == 16 == len(exp.logprobs)
    assert sorted({(e.eid.task, e.eid.run) for e in first}) == [(t, r) for t in range(16)
                                                                for r in range(2)]
    assert all(n == 0 for n in before.values())
    assert all(e.llm.get_num_unfinished_requests() == 0 for e in engines)


def _kill_core(engine: VLLMEngine) -> None:
    for proc in engine.llm.engine_core.resources.engine_manager.processes:
        os.kill(proc.pid, signal.SIGKILL)


def test_engine_death_mid_batch_moves_work_to_the_surviving_engine(bg, engines):
    victim, survivor = engines[1], engines[0]

    async def scenario():
        coord = RolloutCoordinator(_config(max_retry_times=1), engines)
        await coord.prepare()
        try:
            await coord.submit_batch(batch_id=10, tasks=_tasks(8, GenerateWorkflow, max_tokens=400),
                                     batch_type="train")
            await asyncio.sleep(0.5)
            _kill_core(victim)
            result = await coord.finalize_train_batch(10)
            exps = coord.take_experiences(10).to_experiences()
        finally:
            await coord.shutdown()
        with pytest.raises(EngineDeadError):
            await victim.generate([1, 2, 3], GenerationConfig(max_tokens=4), request_id="late")
        return result, exps

    result, exps = bg.run(scenario(), timeout=240)
    assert victim.is_dead and not survivor.is_dead
    assert result["finished_task_count"] == 8
    assert len(exps) == 16 and all(len(e.tokens) - e.prompt_length == 400 for e in exps)
