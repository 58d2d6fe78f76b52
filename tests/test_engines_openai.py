"""OpenAIEngine against a real ``vllm serve`` of the tiny model, and against bad servers."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from aiohttp import web

from fastrollout import EngineDeadError, EngineError, GenerationConfig
from fastrollout.engines import ModelClient, OpenAIEngine
from tinymodel import engine_env

pytestmark = pytest.mark.vllm

STARTUP_LIMIT = 300.0     # seconds; a cold start imports vLLM and builds the engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """``vllm serve`` on 127.0.0.1 at a free port; yields the base URL, killed at teardown."""
    folder = tmp_path_factory.mktemp("vllm-serve")
    port = _free_port()
    env = {**os.environ, **engine_env(folder), "TORCHDYNAMO_DISABLE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = open(folder / "server.log", "wb")
    # The api_server module is what `vllm serve` runs (the CLI itself looks up the "vllm"
    # distribution, which the CPU build names "vllm-cpu").
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
           "--enforce-eager", "--dtype", "float32", "--seed", "0",
           "--kv-cache-memory-bytes", str(128 << 20)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}: "
                                   f"{(folder / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready after {STARTUP_LIMIT} s: "
                                   f"{(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()


def _running_requests(base_url: str) -> float:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


async def _engine(server, tiny_model, **kwargs) -> OpenAIEngine:
    engine = OpenAIEngine(server, str(tiny_model), **kwargs)
    await engine.prepare()
    return engine


async def test_generate_returns_token_ids_and_logprobs(server, tiny_model):
    engine = await _engine(server, tiny_model)
    try:
        prompt = engine.encode("What is two plus two?")
        params = GenerationConfig(n=3, max_tokens=12, seed=4)
        outs = await engine.generate(prompt, params, request_id="r1")
        again = await engine.generate(prompt, params, request_id="r2")
    finally:
        await engine.shutdown()
    assert len(outs) == 3
    for c, d in zip(outs, again, strict=True):
        assert c.finish_reason == "length" and len(c.token_ids) == 12 == len(c.logprobs)
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32
        assert (c.logprobs <= 0).all() and engine.decode(c.token_ids).startswith(c.text)
        np.testing.assert_array_equal(c.token_ids, d.token_ids)
    assert len({tuple(c.token_ids) for c in outs}) > 1


async def test_model_client_chat_over_http(server, tiny_model):
    engine = await _engine(server, tiny_model)
    try:
        client = ModelClient(engine, loop=asyncio.get_running_loop(), request_prefix="h",
                             rollout_args=GenerationConfig(n=2, max_tokens=6))
        messages = [{"role": "user", "content": "hi"}]
        exps = await client.chat_async(messages)
    finally:
        await engine.shutdown()
    assert len(exps) == 2
    for exp in exps:
        np.testing.assert_array_equal(exp.tokens[:exp.prompt_length],
                                      engine.apply_chat_template(messages))
        assert len(exp.logprobs) == 6 and exp.truncate_status == "response_truncated"


async def test_abort_cancels_the_http_request_and_the_server_drops_it(server, tiny_model):
    engine = await _engine(server, tiny_model)
    try:
        # The random tiny model may sample its end-of-sequence token early: start requests
        # until one is seen running on the server, then abort that one.
        for attempt in range(5):
            rid = f"long-{attempt}"
            task = asyncio.ensure_future(engine.generate(
                engine.encode("Numbers:"), GenerationConfig(n=2, max_tokens=1000), request_id=rid))
            deadline = time.monotonic() + 10
            # The server is another process: its /metrics can only be polled.
            while (not task.done() and time.monotonic() < deadline  # noqa: ASYNC110
                   and await asyncio.to_thread(_running_requests, server) < 1):
                await asyncio.sleep(0.05)
            if not task.done():
                break
        else:
            pytest.fail("no request stayed running long enough to be aborted")
        assert await asyncio.to_thread(_running_requests, server) >= 1
        await engine.abort([rid])
        outs = await task
        assert [c.finish_reason for c in outs] == ["abort", "abort"]
        deadline = time.monotonic() + 10
        while (await asyncio.to_thread(_running_requests, server)  # noqa: ASYNC110 (polled)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(_running_requests, server) == 0
    finally:
        await engine.shutdown()


async def test_http_errors_name_the_server_and_status(server, tiny_model):
    engine = OpenAIEngine(server, "no-such-model", tokenizer=str(tiny_model))
    try:
        with pytest.raises(EngineError, match="'no-such-model' is not served"):
            await engine.prepare()
        with pytest.raises(EngineError, match=r"/completions: HTTP 404 \[r\]"):
            await engine.generate([1, 2], GenerationConfig(max_tokens=2), request_id="r")
    finally:
        await engine.shutdown()


async def test_unreachable_server_fails_then_counts_as_dead(tiny_model):
    engine = OpenAIEngine(f"http://127.0.0.1:{_free_port()}/v1", "m", tokenizer=str(tiny_model),
                          dead_after=2)
    try:
        with pytest.raises(EngineError, match="cannot reach the server") as first:
            await engine.prepare()
        assert type(first.value) is EngineError and not engine.is_dead
        with pytest.raises(EngineDeadError, match="unreachable after 2 attempts"):
            await engine.generate([1], GenerationConfig(), request_id="x")
        assert engine.is_dead
    finally:
        await engine.shutdown()


async def test_malformed_replies_are_reported(tiny_model):
    replies = iter([web.Response(text="not json"),
                    web.json_response({"choices": [{"index": 0, "text": "a"}]}),
                    web.json_response({"choices": []})])

    async def models(request):
        return web.json_response({"data": [{"id": "m"}]})

    async def completions(request):
        return next(replies)

    app = web.Application()
    app.add_routes([web.get("/v1/models", models), web.post("/v1/completions", completions)])
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", tokenizer=str(tiny_model))
    try:
        await engine.prepare()
        params = GenerationConfig(max_tokens=2)
        with pytest.raises(EngineError, match="reply is not JSON"):
            await engine.generate([1], params, request_id="a")
        with pytest.raises(EngineError, match=r"malformed reply to b.*no token ids"):
            await engine.generate([1], params, request_id="b")
        with pytest.raises(EngineError, match="expected 1 choices, got 0"):
            await engine.generate([1], params, request_id="c")
    finally:
        await engine.shutdown()
        await runner.cleanup()
