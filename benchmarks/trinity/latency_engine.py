"""The engines and the workflow of the Explorer-step benchmark, importable by Ray workers.

``LatencyEngine`` is a Trinity ``InferenceModel`` Ray actor with a fixed latency model: every
``chat`` call takes ``LATENCY_S`` on the actor's event loop (requests overlap freely, so an
engine's throughput is bounded by the slots that call it, not by the engine), then returns
``n`` experiences of ``PROMPT_TOKENS + RESPONSE_TOKENS`` tokens with logprobs. It records each
request's start and end (``time.time()``), which the benchmark reads between steps.

``engine_config`` is the Trinity config that names them. ``SampleWorkflow`` is a repeatable
asynchronous Trinity workflow: one ``chat`` call makes all of a task's runs, as Trinity's math
workflows do with ``n`` samples.
"""
from __future__ import annotations

import asyncio
import time

import torch
from trinity.common.config import Config
from trinity.common.experience import Experience
from trinity.common.models.model import InferenceModel
from trinity.common.workflows.workflow import Workflow

NAMESPACE = "fastrollout-bench"
LATENCY_S = 0.05
PROMPT_TOKENS = 32
RESPONSE_TOKENS = 32


def engine_config(engines: int) -> Config:
    """A Trinity config whose rollout model has ``engines`` engines in ``NAMESPACE``."""
    config = Config()
    config.ray_namespace = NAMESPACE
    model = config.explorer.rollout_model
    model.engine_num = engines
    model.model_path = "latency-engine"
    model.ray_namespace = NAMESPACE    # what Trinity's config check sets
    return config


class LatencyEngine(InferenceModel):
    """A Trinity engine whose every request takes ``LATENCY_S``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.spans: list[tuple[float, float]] = []

    async def chat(self, messages, lora_request=None, **kwargs) -> list[Experience]:
        start = time.time()
        await asyncio.sleep(LATENCY_S)
        n = kwargs.get("n", 1)
        tokens = torch.arange(PROMPT_TOKENS + RESPONSE_TOKENS, dtype=torch.int32)
        logprobs = torch.full((RESPONSE_TOKENS,), -0.5)
        exps = [Experience(tokens=tokens.clone(), prompt_length=PROMPT_TOKENS,
                           logprobs=logprobs.clone(), response_text=f"sample {i}")
                for i in range(n)]
        self.spans.append((start, time.time()))
        return exps

    async def sync_model_weights(self, model_version, method=None, timeout=1200) -> None:
        pass

    def get_model_version(self) -> int:
        return 0

    def take_spans(self) -> list[tuple[float, float]]:
        """The (start, end) of every request since the last call."""
        spans, self.spans = self.spans, []
        return spans


class SampleWorkflow(Workflow):
    """Repeatable: one chat call with ``n`` = the attempt's runs; rewards alternate 0/1."""

    can_repeat = True
    can_reset = True
    is_async = True

    def reset(self, task) -> None:
        self.task = task

    def set_repeat_times(self, repeat_times, run_id_base) -> None:
        self.repeat_times, self.run_id_base = repeat_times, run_id_base

    async def run_async(self) -> list[Experience]:
        exps = await self.model.chat_async([{"role": "user", "content": "question"}],
                                           n=self.task.rollout_args.n)
        for i, exp in enumerate(exps):
            exp.reward = float(i % 2)
            exp.metrics = {"accuracy": float(i % 2)}
            exp.eid.run = self.run_id_base + i
        return exps
