"""Custom Trinity-RFT workflows for the Explorer tests, written the way a Trinity user writes
them: plain subclasses of Trinity's ``Workflow``, named in a taskset by their dotted path.

Ray's workers import this module by name (the harness puts this folder on their
``PYTHONPATH``), so it must import nothing from the tests but Trinity.

- ``OpenAIAnswerWorkflow``: asks the rollout model through the OpenAI client that Trinity's
  model wrapper hands out, and turns the recorded history into experiences.
- ``JudgedAnswerWorkflow``: samples all repeats from the rollout model with ``chat`` and has
  an auxiliary model (reached through its OpenAI client) judge each answer.

The tiny test model answers noise, so both rewards are arithmetic on the response text: they
vary between runs, which gives GRPO's group advantages something to normalise.
"""
from __future__ import annotations

from trinity.common.workflows.workflow import Task, Workflow


def _digit_share(text: str) -> float:
    """The share of a response's characters that are digits (0.0 for an empty one)."""
    return sum(ch.isdigit() for ch in text) / len(text) if text else 0.0


def _messages(task: Task) -> list[dict]:
    return [{"role": "user", "content": task.task_desc}]


class OpenAIAnswerWorkflow(Workflow):
    """One chat completion per run through the rollout model's async OpenAI client."""

    is_async = True

    async def run_async(self):
        client = self.model.get_openai_async_client()
        response = await client.chat.completions.create(
            model=client.model_path,
            messages=_messages(self.task),
            max_tokens=self.task.rollout_args.max_tokens,
            temperature=self.task.rollout_args.temperature,
        )
        await self.model.set_workflow_state({"answered": response.choices[0].message.content})
        experiences = self.model.extract_experience_from_history()
        for exp in experiences:
            exp.reward = _digit_share(exp.response_text or "")
            exp.metrics = {"digit_share": exp.reward}
        return experiences


class JudgedAnswerWorkflow(Workflow):
    """All repeats from one ``chat`` call; each answer judged by auxiliary model 0."""

    can_repeat = True

    def set_repeat_times(self, repeat_times: int, run_id_base: int) -> None:
        self.repeat_times = repeat_times
        self.run_id_base = run_id_base

    def run(self):
        args = self.task.rollout_args
        responses = self.model.chat(_messages(self.task), n=self.repeat_times,
                                    max_tokens=args.max_tokens, temperature=args.temperature)
        judge = self.auxiliary_models[0]
        for i, exp in enumerate(responses):
            verdict = judge.chat.completions.create(
                model=judge.model_path,
                messages=[{"role": "user", "content": f"Judge: {exp.response_text}"}],
                max_tokens=4,
                temperature=0.0,
            )
            bonus = len(verdict.choices[0].message.content or "") % 2
            exp.reward = _digit_share(exp.response_text) + bonus
            exp.metrics = {"judge_bonus": float(bonus)}
            exp.eid.run = self.run_id_base + i
        return responses
