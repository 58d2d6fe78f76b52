"""The embedded default job: RL-style rollouts on simulated engines.

A math-flavoured workflow samples ``repeat_times`` answers per prompt from the
engine and scores them, so ``fastrollout run`` exercises the whole path
(scheduling, engine calls, experiences, pipeline, metrics) on any machine.
"""
from __future__ import annotations

from .config import Config
from .engines import SimulatedEngine
from .engines.simulated import OutputLength
from .task import GenerationConfig, Task
from .workflow import Workflow

DEFAULT_CONFIG = {
    "mode": "both",
    "explorer": {"runner_per_model": 16, "max_retry_times": 1, "max_timeout": 60.0,
                 "over_rollout": {"ratio": 0.0, "wait_after_min": 5.0}},
}


class ScoreWorkflow(Workflow):
    """Samples n answers in one call (repeatable) and rewards answers by length parity."""

    can_repeat = True
    is_async = True

    async def run_async(self):
        exps = await self.model.generate_async([self.task.raw_task["prompt"]],
                                               n=self.repeat_times)
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
            exp.reward = float(len(exp.tokens) % 2 == 0)
            exp.metrics = {"accuracy": exp.reward, "response_length": float(len(exp.tokens) - exp.prompt_length)}
        return exps


def default_config() -> Config:
    return Config.from_dict(DEFAULT_CONFIG)


def default_engines(count: int = 2) -> list[SimulatedEngine]:
    """Engines with a small latency model: 5 ms to first token, 0.2 ms per token."""
    return [SimulatedEngine(ttft=0.005, tpot=0.0002, output_len=OutputLength.uniform(8, 64),
                            capacity=256, seed=i) for i in range(count)]


def make_tasks(step: int, count: int, repeat: int, is_eval: bool = False) -> list[Task]:
    return [Task(workflow=ScoreWorkflow, repeat_times=repeat, is_eval=is_eval,
                 rollout_args=GenerationConfig(temperature=1.0, logprobs=0, max_tokens=64),
                 raw_task={"prompt": f"step {step} question {i}: what is {i} + {step}?"})
            for i in range(count)]
