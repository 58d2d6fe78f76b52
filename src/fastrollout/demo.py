"""A toy workflow for simulated engines: ``"fastrollout.demo:ScoreWorkflow"`` in a taskset.

It samples ``repeat_times`` answers in one call and rewards each by the parity of its length,
so that a job on ``SimulatedEngine``s exercises the whole path (scheduling, engine calls,
experiences, pipeline, metrics) without a tokenizer, chat template or reward model. The
prompt is ``raw_task[workflow_args.get("prompt_key", "prompt")]``.
"""
from __future__ import annotations

from .workflow import Workflow


class ScoreWorkflow(Workflow):
    can_repeat = True
    is_async = True

    async def run_async(self):
        key = self.task.workflow_args.get("prompt_key", "prompt")
        exps = await self.model.generate_async([self.task.raw_task[key]], n=self.repeat_times)
        for i, exp in enumerate(exps):
            exp.eid.run = self.run_id_base + i
            exp.reward = float(len(exp.tokens) % 2 == 0)
            exp.metrics = {"accuracy": exp.reward,
                           "response_length": float(len(exp.tokens) - exp.prompt_length)}
        return exps
