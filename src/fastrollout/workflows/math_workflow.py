"""MathWorkflow ("math", async) and MathWorkflowSync ("math_sync"): sample answers to a math
question through the engine's chat template and reward them with ``math_reward``.

One ``run`` makes all of the task's repeats in one request (``n = repeat_times``); run ``i``
gets ``eid.run = run_id_base + i``. ``task.workflow_args`` (all optional):

- ``prompt_key`` (``"question"``): the question is ``raw_task[prompt_key]``;
- ``answer_key`` (``"answer"``): the reference answer is ``raw_task[answer_key]``;
- ``system_prompt``: the system message (``None`` for none), by default asking for a
  step-by-step solution with the final answer in ``\\boxed{}``.

``task.reward_fn_args`` (all optional) go to ``math_reward``: ``boxed_score`` (0.1),
``unboxed_score`` (-0.1), ``fallback`` (true: also look for an unboxed answer),
``timeout`` (seconds for one math-verify check; the verifier's default otherwise).

Each experience gets ``reward`` and the metrics ``accuracy``, ``format_score`` and
``response_length`` (tokens). The two classes differ only in how they run: the async one
on the event loop (math-verify waits in the verifier's threads), the sync one in a worker
thread of the coordinator.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from ..errors import ConfigError
from .args import STRUCT, ArgsWorkflow, read_args
from .registry import WORKFLOWS
from .rewards import BOXED_SCORE, UNBOXED_SCORE, math_reward, math_reward_async

if TYPE_CHECKING:
    from ..experience.model import Experience
    from ..task import Task

DEFAULT_SYSTEM_PROMPT = ("Please reason step by step, and put your final answer within "
                         "\\boxed{}.")


class MathArgs(msgspec.Struct, **STRUCT):
    prompt_key: str = "question"
    answer_key: str = "answer"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT


class MathRewardArgs(msgspec.Struct, **STRUCT):
    boxed_score: float = BOXED_SCORE
    unboxed_score: float = UNBOXED_SCORE
    fallback: bool = True
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None


class _MathBase(ArgsWorkflow):
    can_repeat = True

    def _read(self, task: Task) -> None:
        if task.reward_fn is not None:
            raise ConfigError(f"task {task.task_id} of batch {task.batch_id}: "
                              f"{type(self).__name__} rewards with math_reward; set its "
                              f"options in reward_fn_args and leave reward_fn None")
        args = read_args(MathArgs, task.workflow_args, "workflow_args", task)
        self.reward_args = msgspec.structs.asdict(
            read_args(MathRewardArgs, task.reward_fn_args, "reward_fn_args", task))
        raw = task.raw_task
        question = _field(raw, args.prompt_key, "prompt_key", task)
        self.truth = _field(raw, args.answer_key, "answer_key", task)
        messages = [{"role": "user", "content": str(question)}]
        if args.system_prompt:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        self.messages = messages

    def _finish(self, exps: list[Experience],
                scores: list[tuple[float, dict[str, float]]]) -> list[Experience]:
        for i, (exp, (reward, metrics)) in enumerate(zip(exps, scores, strict=True)):
            exp.reward = reward
            metrics["response_length"] = float(len(exp.tokens) - exp.prompt_length)
            exp.metrics = metrics
            exp.eid.run = self.run_id_base + i
        return exps


def _field(raw: Any, key: str, option: str, task: Task) -> Any:
    try:
        return raw[key]
    except (KeyError, TypeError, IndexError):
        keys = sorted(map(str, raw)) if isinstance(raw, dict) else type(raw).__name__
        raise ConfigError(f"task {task.task_id} of batch {task.batch_id}: raw_task has no "
                          f"{key!r} (workflow_args.{option}); it has {keys}") from None


@WORKFLOWS.register("math")
class MathWorkflow(_MathBase):
    is_async = True

    async def run_async(self) -> list[Experience]:
        exps = await self.model.chat_async(self.messages, n=self.repeat_times)
        scores = await asyncio.gather(*(math_reward_async(exp.response_text or "", self.truth,
                                                          **self.reward_args)
                                        for exp in exps))
        return self._finish(exps, scores)


@WORKFLOWS.register("math_sync")
class MathWorkflowSync(_MathBase):
    def run(self) -> list[Experience]:
        exps = self.model.chat(self.messages, n=self.repeat_times)
        return self._finish(exps, [math_reward(exp.response_text or "", self.truth,
                                               **self.reward_args) for exp in exps])
