"""ModelClient: experiences, request ids, overrides, sync bridging, abort and close."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from fastrollout import EngineError, GenerationConfig
from fastrollout.engines import ModelClient, SimulatedEngine
from loopticks import LoopTicks


def _client(engine, **args):
    return ModelClient(engine, loop=asyncio.get_running_loop(),
                       rollout_args=GenerationConfig(**args), request_prefix="b/t/0/1")


async def test_generate_builds_experiences_with_prompt_and_response():
    engine = SimulatedEngine(output_len=12)
    client = _client(engine, n=2, max_tokens=10, seed=1)
    exps = await client.generate_async(["hi", "there"])
    assert len(exps) == 4
    for exp, prompt in zip(exps, ["hi", "hi", "there", "there"], strict=True):
        ids = engine.encode(prompt)
        assert exp.prompt_length == len(ids) and exp.prompt_text == prompt
        np.testing.assert_array_equal(exp.tokens[:exp.prompt_length], ids)
        response = exp.tokens[exp.prompt_length:]
        assert len(response) == 10 == len(exp.logprobs)
        assert exp.response_text == engine.decode(response)
        assert exp.truncate_status == "response_truncated"      # cut at max_tokens
        assert exp.eid.batch == "" and exp.eid.task == ""
    (untruncated,) = await client.generate_async(["hi"], n=1, max_tokens=None)
    assert untruncated.truncate_status is None and len(untruncated.logprobs) == 12


async def test_gen_kwargs_override_rollout_args_and_unknown_ones_are_refused():
    client = _client(SimulatedEngine(output_len=30), n=1, max_tokens=5)
    exps = await client.generate_async(["x"], n=3, max_tokens=7)
    assert len(exps) == 3 and all(len(e.logprobs) == 7 for e in exps)
    with pytest.raises(TypeError, match=r"unknown generation argument\(s\) \['stop_words'\]"):
        await client.generate_async(["x"], stop_words=["a"])
    with pytest.raises(TypeError, match="list of prompts"):
        await client.generate_async("x")


async def test_chat_uses_the_engine_chat_template():
    engine = SimulatedEngine()
    client = _client(engine, max_tokens=4)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    (exp,) = await client.chat_async(messages)
    template = engine.apply_chat_template(messages)
    np.testing.assert_array_equal(exp.tokens[:exp.prompt_length], template)
    assert exp.prompt_text == engine.decode(template) and exp.messages == messages


async def test_request_ids_are_unique_and_tracked_while_in_flight():
    engine = SimulatedEngine(tpot=10.0, output_len=3)
    client = _client(engine)
    task = asyncio.ensure_future(client.generate_async(["a", "b", "c"]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    ids = client.inflight_request_ids()
    assert sorted(ids) == ["b/t/0/1-1", "b/t/0/1-2", "b/t/0/1-3"]
    await client.abort_all()
    exps = await task
    assert len(exps) == 3 and client.inflight_request_ids() == []
    assert engine.num_unfinished_requests == 0
    with pytest.raises(EngineError, match="closed"):
        await client.generate_async(["again"])


async def test_cancelling_a_call_aborts_its_engine_requests():
    engine = SimulatedEngine(tpot=10.0, output_len=3)
    client = _client(engine)
    task = asyncio.ensure_future(client.generate_async(["a", "b"]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert engine.num_unfinished_requests == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.num_unfinished_requests == 0 and client.inflight_request_ids() == []


async def test_engine_errors_propagate_to_the_workflow():
    client = _client(SimulatedEngine(error_rate=1.0))
    with pytest.raises(EngineError, match="injected failure of request b/t/0/1-1"):
        await client.generate_async(["a"])
    assert client.inflight_request_ids() == []


async def test_close_refuses_further_calls():
    client = _client(SimulatedEngine())
    client.close()
    with pytest.raises(EngineError, match="'b/t/0/1' is closed"):
        await client.chat_async([{"role": "user", "content": "x"}])


async def test_sync_calls_from_a_thread_bridge_to_the_loop_without_blocking_it():
    engine = SimulatedEngine(ttft=0.01, output_len=4)
    client = _client(engine, max_tokens=8)
    loop = asyncio.get_running_loop()

    def workflow():
        assert threading.current_thread() is not threading.main_thread()
        gen = client.generate(["hello"], n=2)
        chat = client.chat([{"role": "user", "content": "hi"}])
        return gen, chat, client.model_version

    async with LoopTicks() as ticks:
        gen, chat, version = await loop.run_in_executor(None, workflow)
    assert len(gen) == 2 and len(chat) == 1 and version == 0
    assert ticks.count > 1                # the loop kept running while the thread waited
    assert await client.model_version_async == 0


async def test_sync_call_on_the_loop_thread_is_refused():
    client = _client(SimulatedEngine())
    with pytest.raises(RuntimeError, match=r"event loop thread.*generate_async"):
        client.generate(["x"])
    with pytest.raises(RuntimeError, match="chat_async"):
        client.chat([{"role": "user", "content": "x"}])


async def test_model_version_follows_the_engine():
    engine = SimulatedEngine()
    client = _client(engine)
    await engine.update_weights()
    assert client.model_version == 1 and await client.model_version_async == 1


async def test_generate_tokens_returns_completions_and_is_tracked_like_any_request():
    engine = SimulatedEngine(hang_rate=1.0)
    client = _client(engine, max_tokens=4)
    call = asyncio.ensure_future(client.generate_tokens_async([5, 6, 7], n=1))
    await asyncio.sleep(0.01)
    assert client.inflight_request_ids() == ["b/t/0/1-1"]
    await client.abort_all()
    (completion,) = await asyncio.wait_for(call, 5)
    assert completion.finish_reason == "abort" and engine.num_unfinished_requests == 0
    done = _client(SimulatedEngine(output_len=3), max_tokens=8)
    (completion,) = await done.generate_tokens_async([1, 2])
    assert len(completion.token_ids) == 3 == len(completion.logprobs)
