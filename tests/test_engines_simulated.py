"""SimulatedEngine: determinism, latency model, capacity, abort and injected faults."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from fastrollout import EngineDeadError, EngineError, GenerationConfig
from fastrollout.engines import InferenceModel, OutputLength, SimulatedEngine

P = GenerationConfig(max_tokens=64)


async def test_zero_latency_is_deterministic_and_never_suspends():
    engine = SimulatedEngine()
    assert isinstance(engine, InferenceModel)
    coro = engine.generate([1, 2, 3], GenerationConfig(n=3, seed=7), request_id="a")
    with pytest.raises(StopIteration) as done:      # finished without yielding to the loop
        coro.send(None)
    first = done.value.value
    again = await SimulatedEngine().generate([1, 2, 3], GenerationConfig(n=3, seed=7),
                                             request_id="b")
    assert len(first) == 3
    for a, b in zip(first, again, strict=True):
        assert a.token_ids.dtype == np.int32 and a.logprobs.dtype == np.float32
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        assert a.text == engine.decode(a.token_ids)
        assert (a.logprobs <= 0).all()
    assert not np.array_equal(first[0].token_ids, first[1].token_ids)   # samples differ
    other = await engine.generate([1, 2, 4], GenerationConfig(n=1, seed=7), request_id="c")
    assert not np.array_equal(other[0].token_ids, first[0].token_ids)


async def test_max_tokens_caps_length_and_sets_finish_reason():
    engine = SimulatedEngine(output_len=20)
    (capped,) = await engine.generate([5], GenerationConfig(max_tokens=8), request_id="a")
    (full,) = await engine.generate([5], GenerationConfig(max_tokens=None), request_id="b")
    assert (len(capped.token_ids), capped.finish_reason) == (8, "length")
    assert (len(full.token_ids), full.finish_reason) == (20, "stop")


async def test_length_distributions(tmp_path):
    replay = tmp_path / "lengths.json"
    replay.write_text(json.dumps([3, 5, 7]))
    eng = SimulatedEngine(output_len=OutputLength.replay(replay))
    got = [len(c.token_ids) for c in await eng.generate([1], GenerationConfig(n=4), request_id="r")]
    assert got == [3, 5, 7, 3]
    eng = SimulatedEngine(output_len=OutputLength.uniform(4, 6))
    outs = await eng.generate([1], GenerationConfig(n=64), request_id="u")
    assert {len(c.token_ids) for c in outs} == {4, 5, 6}
    eng = SimulatedEngine(output_len=OutputLength.lognormal(median=50, sigma=0.5))
    outs = await eng.generate([1], GenerationConfig(n=400), request_id="l")
    got = [len(c.token_ids) for c in outs]
    assert 35 < np.median(got) < 70 and min(got) >= 1
    (tmp_path / "lines.txt").write_text("2\n9\n")
    assert OutputLength.replay(tmp_path / "lines.txt").lengths == (2, 9)
    (tmp_path / "bad.txt").write_text("2 x")
    with pytest.raises(ValueError, match=r"bad\.txt"):
        OutputLength.replay(tmp_path / "bad.txt")


async def test_latency_model_takes_ttft_plus_tpot_per_token():
    engine = SimulatedEngine(ttft=0.02, tpot=0.001, output_len=11)
    loop = asyncio.get_running_loop()
    start = loop.time()
    out = await engine.generate([1], P, request_id="a")
    # A lower bound only: timers never fire early.
    assert loop.time() - start >= 0.02 + 0.010 - 1e-3
    assert len(out[0].token_ids) == 11 and out[0].finish_reason == "stop"
    assert engine.num_unfinished_requests == 0


async def test_capacity_limits_concurrent_sequences():
    engine = SimulatedEngine(ttft=0.005, output_len=1, capacity=3)
    outs = await asyncio.gather(*(engine.generate([i], GenerationConfig(n=2), request_id=str(i))
                                  for i in range(6)))
    assert engine.max_running_seqs <= 3 and engine.max_running_seqs >= 2
    assert all(len(o) == 2 for o in outs)
    assert engine.num_unfinished_requests == 0


async def test_abort_returns_partial_tokens_also_for_queued_requests():
    engine = SimulatedEngine(ttft=0.0, tpot=10.0, output_len=100, capacity=1)
    running = asyncio.ensure_future(engine.generate([1], GenerationConfig(n=2), request_id="run"))
    queued = asyncio.ensure_future(engine.generate([2], P, request_id="queued"))
    await asyncio.sleep(0)
    assert engine.num_unfinished_requests == 2
    await engine.abort(["run", "queued", "unknown"])
    run_out, queued_out = await running, await queued
    assert [c.finish_reason for c in run_out] == ["abort", "abort"]
    assert [len(c.token_ids) for c in run_out] == [1, 1]        # the first token came at ttft=0
    assert queued_out[0].finish_reason == "abort" and len(queued_out[0].token_ids) == 0
    assert engine.num_unfinished_requests == 0


async def test_cancelling_generate_frees_the_request_and_its_capacity():
    engine = SimulatedEngine(tpot=10.0, output_len=5, capacity=1)
    first = asyncio.ensure_future(engine.generate([1], P, request_id="a"))
    second = asyncio.ensure_future(engine.generate([1], P, request_id="b"))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(0)
    assert engine.num_unfinished_requests == 1 and engine.max_running_seqs == 1
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert engine.num_unfinished_requests == 0


async def test_error_rate_raises_engine_error():
    engine = SimulatedEngine(error_rate=0.5, seed=3)
    results = await asyncio.gather(
        *(engine.generate([1], P, request_id=str(i)) for i in range(200)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert 60 < len(errors) < 140
    assert all(type(e) is EngineError and "injected" in str(e) for e in errors)
    assert not engine.is_dead


async def test_hang_rate_requests_finish_only_when_aborted():
    engine = SimulatedEngine(hang_rate=1.0, output_len=4)
    task = asyncio.ensure_future(engine.generate([1], P, request_id="h"))
    done, _ = await asyncio.wait([task], timeout=0.05)
    assert not done
    await engine.abort(["h"])
    (out,) = await task
    assert out.finish_reason == "abort"


async def test_die_after_fails_inflight_and_later_requests():
    engine = SimulatedEngine(tpot=10.0, output_len=3, die_after=2)
    inflight = [asyncio.ensure_future(engine.generate([i], P, request_id=str(i))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(EngineDeadError, match="died after 2 requests"):
        await engine.generate([9], P, request_id="third")
    assert engine.is_dead
    for task in inflight:
        with pytest.raises(EngineDeadError, match="lost"):
            await task
    with pytest.raises(EngineDeadError):
        await engine.generate([1], P, request_id="later")
    await engine.shutdown()
    await engine.shutdown()      # idempotent


async def test_kill_and_shutdown_make_the_engine_dead():
    engine = SimulatedEngine()
    await engine.prepare()
    assert await engine.update_weights() == 1 and engine.model_version == 1
    engine.kill()
    assert engine.is_dead
    with pytest.raises(EngineDeadError, match="killed"):
        await engine.generate([1], P, request_id="x")


def test_tokenizer_roundtrip_and_chat_template():
    engine = SimulatedEngine()
    assert engine.decode(engine.encode("héllo")) == "héllo"
    ids = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert engine.decode(ids) == "<|user|>hi\n<|assistant|>"


def test_invalid_arguments_are_refused():
    for kwargs in ({"ttft": -1}, {"capacity": 0}, {"error_rate": 2.0}, {"hang_rate": -0.1}):
        with pytest.raises(ValueError, match="SimulatedEngine"):
            SimulatedEngine(**kwargs)
    with pytest.raises(ValueError):
        OutputLength.uniform(5, 2)
