"""vLLM throughput: raw ``AsyncLLM.generate`` beside the same requests through RolloutCoordinator.

Workload: TASKS prompts x REPEAT samples x MAX_TOKENS new tokens, all submitted at once;
raw = one ``AsyncLLM.generate`` per prompt with ``n=REPEAT`` (FINAL_ONLY, sampled-token
logprobs); coordinator = one train batch of TASKS tasks whose repeatable async workflow calls
``ModelClient.generate_async`` once (the same engine requests), from submit to finalize
returned (experience encoding and the pipeline included). Rounds alternate raw/coordinator;
medians are reported. ``ttft_added_ms``: median latency of a one-token request through a
one-task batch minus the median raw latency of the same request.

    .venv/bin/python -m pytest benchmarks/bench_engines.py --benchmark-only -s    # tiny model, CPU
    .venv/bin/python -m benchmarks.bench_engines [--model PATH] [--tasks 64 ...]  # any machine
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time

from fastrollout import Config, GenerationConfig, RolloutCoordinator, Task, Workflow


class SampleWorkflow(Workflow):
    """Repeatable: one engine request with n = repeat_times."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        return await self.model.generate_async([self.task.raw_task["prompt"]])


def _prompts(tasks: int) -> list[str]:
    return [f"Question {i}: what is {i} plus {i * 7}? Answer:" for i in range(tasks)]


async def _raw_round(engine, prompts: list[str], repeat: int, max_tokens: int) -> tuple[int, float]:
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(n=repeat, max_tokens=max_tokens, logprobs=0, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    ids = [engine.encode(p) for p in prompts]
    tag = time.monotonic_ns()

    async def one(i: int) -> int:
        final = None
        async for out in engine.llm.generate(TokensPrompt(prompt_token_ids=ids[i]), params,
                                             f"raw-{tag}-{i}"):
            final = out
        return sum(len(c.token_ids) for c in final.outputs)

    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(len(prompts)))))
    return tokens, time.perf_counter() - start


async def _coordinator_round(coord: RolloutCoordinator, batch_id: int, prompts: list[str],
                             repeat: int, max_tokens: int) -> tuple[int, float]:
    tasks = [Task(workflow=SampleWorkflow, repeat_times=repeat, raw_task={"prompt": p},
                  rollout_args=GenerationConfig(max_tokens=max_tokens)) for p in prompts]
    start = time.perf_counter()
    await coord.submit_batch(batch_id=batch_id, tasks=tasks, batch_type="train")
    await coord.finalize_train_batch(batch_id)
    elapsed = time.perf_counter() - start
    batch = coord.take_experiences(batch_id)
    tokens = sum(len(e.tokens) - e.prompt_length for e in batch.to_experiences())
    return tokens, elapsed


async def measure(engine, *, tasks: int = 64, repeat: int = 4, max_tokens: int = 32,
                  rounds: int = 3, ttft_samples: int = 20) -> dict:
    """Run the comparison on a started VLLMEngine (the model must not stop early: the raw
    side sets ignore_eos, so both sides must produce MAX_TOKENS per sample)."""
    prompts = _prompts(tasks)
    coord = RolloutCoordinator(Config.from_dict({"explorer": {"runner_per_model": tasks}}),
                               [engine])
    await coord.prepare()
    try:
        await _raw_round(engine, prompts[:4], repeat, max_tokens)          # warm-up
        await _coordinator_round(coord, 0, prompts[:4], repeat, max_tokens)
        raw, via = [], []
        for r in range(rounds):
            tokens, secs = await _raw_round(engine, prompts, repeat, max_tokens)
            raw.append(tokens / secs)
            tokens_c, secs = await _coordinator_round(coord, r + 1, prompts, repeat, max_tokens)
            if tokens_c != tokens:
                raise RuntimeError(f"coordinator produced {tokens_c} tokens, raw {tokens}: the "
                                   f"model stopped early; use one that ignores EOS")
            via.append(tokens_c / secs)
        raw_lat, via_lat = [], []
        for k in range(ttft_samples):
            raw_lat.append((await _raw_round(engine, prompts[:1], 1, 1))[1])
            via_lat.append((await _coordinator_round(coord, 1000 + k, prompts[:1], 1, 1))[1])
    finally:
        await coord.shutdown()
    raw_tps, via_tps = statistics.median(raw), statistics.median(via)
    raw_ttft, via_ttft = statistics.median(raw_lat), statistics.median(via_lat)
    return {"tasks": tasks, "repeat": repeat, "max_tokens": max_tokens, "rounds": rounds,
            "raw_tokens_per_s": round(raw_tps, 1), "coordinator_tokens_per_s": round(via_tps, 1),
            "ratio": round(via_tps / raw_tps, 3),
            "raw_ttft_ms": round(raw_ttft * 1e3, 3),
            "ttft_added_ms": round((via_ttft - raw_ttft) * 1e3, 3)}


def test_vllm_raw_vs_coordinator(benchmark, tmp_path_factory):
    from fastrollout.engines import VLLMEngine
    from fastrollout.tinymodel import build_tiny_model
    from tests.tinymodel import BackgroundLoop, engine_env

    model = build_tiny_model(tmp_path_factory.mktemp("tiny"))
    bg = BackgroundLoop()
    engine = VLLMEngine(model, env=engine_env(tmp_path_factory.mktemp("cache")), max_model_len=512,
                        enforce_eager=True, seed=0, kv_cache_memory_bytes=256 << 20)
    try:
        bg.run(engine.prepare(), timeout=300)
        results: list[dict] = []
        benchmark.pedantic(lambda: results.append(bg.run(measure(engine), timeout=600)),
                           rounds=1, iterations=1)
        benchmark.group = "vllm-engine"
        benchmark.extra_info.update(results[0])
        print(json.dumps(results[0]))
    finally:
        bg.run(engine.shutdown(), timeout=60)
        bg.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build the tiny test model)")
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine-args", default="{}", help="JSON dict of AsyncEngineArgs fields")
    args = parser.parse_args()

    from fastrollout.engines import VLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from fastrollout.tinymodel import build_tiny_model
            model = str(build_tiny_model(f"{tmp}/tiny"))
        engine_args = {"max_model_len": 2048, "enforce_eager": True, "seed": 0,
                       **json.loads(args.engine_args)}

        async def run() -> dict:
            (engine,) = VLLMEngine.launch(model, gpus=1, **engine_args)
            await engine.prepare()
            try:
                return await measure(engine, tasks=args.tasks, repeat=args.repeat,
                                     max_tokens=args.max_tokens, rounds=args.rounds)
            finally:
                await engine.shutdown()

        print(json.dumps(asyncio.run(run())))


if __name__ == "__main__":
    main()
