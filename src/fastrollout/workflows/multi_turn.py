"""MultiTurnEnvWorkflow ("multi_turn_env"): the model and an environment take turns.

Each of the task's ``repeat_times`` runs is one episode with its own env (episodes run
concurrently): the env's first observation is the user message, then the model replies,
the env answers with ``(observation, reward, done)``, and so on until the env is done or
the model has had ``max_turns`` turns. An episode becomes one Experience:

- ``tokens``: the whole conversation, exactly the tokens the model was conditioned on and
  sampled, so that training sees what sampling saw (the model's replies are never
  re-tokenized); ``prompt_length``: the tokens of the first prompt;
- ``action_mask`` (over the tokens after the prompt): 1 exactly on the tokens the model
  sampled, 0 on observations and on the chat template's role and separator tokens;
- ``logprobs`` (same length): the engine's for sampled tokens, 0 elsewhere (None if the
  engine reported none);
- ``reward``: the sum of the env's rewards, or the last one (``reward: "last"``);
- ``messages``: the conversation; ``truncate_status``: ``"response_truncated"`` when a
  reply hit ``max_tokens`` or the episode hit ``max_model_len``;
- metrics: ``turns``, ``env_done`` (1 if the env ended the episode), ``env_reward``,
  ``response_length`` (tokens the model sampled).

``task.workflow_args``: ``env`` (a registered env name, required), ``env_args`` (keyword
arguments of the env's constructor), ``max_turns`` (8), ``reward`` (``"sum"`` | ``"last"``),
``system_prompt`` (none), ``observation_role`` (``"user"``), ``max_model_len`` (no limit:
the episode stops before the conversation would exceed it).

The tokens between two replies come from the engine's chat template: the conversation is
rendered with empty replies before and after the new observation, and the difference is
what the template puts after a reply (its end-of-turn tokens, the observation turn, the
next reply's header). That needs a template that renders a conversation as a prefix of
its continuation (most do; one that rewrites earlier turns, such as dropping past
reasoning, does not, and raises ``ChatTemplateError``). A reply that stopped on the very
token the template would close the turn with (its end-of-turn / EOS token) keeps it, and
the template's copy is dropped.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import numpy as np

from ..errors import FastRolloutError
from ..experience.model import Experience
from .args import STRUCT, ArgsWorkflow, read_args
from .env import ENVS, Env, call_env, check_observation, check_step, make_env
from .registry import WORKFLOWS

if TYPE_CHECKING:
    from ..engines.base import Completion
    from ..task import Task


class ChatTemplateError(FastRolloutError, ValueError):
    """The engine's chat template re-renders earlier turns when a turn is added, so the
    tokens of a conversation cannot be extended turn by turn."""


class MultiTurnArgs(msgspec.Struct, **STRUCT):
    env: str
    env_args: dict[str, Any] = msgspec.field(default_factory=dict)
    max_turns: Annotated[int, msgspec.Meta(ge=1)] = 8
    reward: Literal["sum", "last"] = "sum"
    system_prompt: str | None = None
    observation_role: str = "user"
    max_model_len: Annotated[int, msgspec.Meta(ge=1)] | None = None


@WORKFLOWS.register("multi_turn_env")
class MultiTurnEnvWorkflow(ArgsWorkflow):
    can_repeat = True
    is_async = True

    def _read(self, task: Task) -> None:
        self.args = read_args(MultiTurnArgs, task.workflow_args, "workflow_args", task)
        self.env_cls = ENVS.get(self.args.env)

    async def run_async(self) -> list[Experience]:
        episodes = [asyncio.ensure_future(self._episode(i)) for i in range(self.repeat_times)]
        try:
            return list(await asyncio.gather(*episodes))
        except BaseException:
            # One failed episode fails the task: the others stop (and close their envs) first.
            for episode in episodes:
                episode.cancel()
            await asyncio.wait(episodes)
            raise

    async def _episode(self, i: int) -> Experience:
        env = make_env(self.env_cls, self.args.env_args, self.task)
        try:
            exp = await _Episode(self, env, i).play()
        finally:
            await call_env(env, "close")
        exp.eid.run = self.run_id_base + i
        return exp


class _Episode:
    """One conversation's tokens, mask and logprobs, built turn by turn."""

    def __init__(self, workflow: MultiTurnEnvWorkflow, env: Env, index: int) -> None:
        self.client = workflow.model
        self.engine = workflow.model.engine
        self.task = workflow.task
        self.args = workflow.args
        self.env = env
        self.index = index
        self.ids: list[int] = []
        self.mask: list[bool] = []
        self.logprobs: list[float] | None = []
        self.truncated = False

    async def play(self) -> Experience:
        args, env, engine = self.args, self.env, self.engine
        first = check_observation(env, await call_env(env, "reset", self.task))
        messages = [{"role": args.observation_role, "content": first}]
        if args.system_prompt:
            messages.insert(0, {"role": "system", "content": args.system_prompt})
        # The conversation as the template renders it with empty replies: its tokens after
        # the last reply are the template's part of the next turn.
        shadow = list(messages)
        rendered = list(engine.apply_chat_template(shadow))
        self.ids = list(rendered)
        prompt_length = len(rendered)
        if args.max_model_len is not None and prompt_length >= args.max_model_len:
            raise ValueError(f"task {self.task.task_id} of batch {self.task.batch_id}: the "
                             f"first prompt has {prompt_length} tokens, max_model_len is "
                             f"{args.max_model_len}")
        rewards: list[float] = []
        done = False
        for turn in range(args.max_turns):
            reply = await self._generate()
            messages.append({"role": "assistant", "content": reply.text})
            observation, reward, done = check_step(env, await call_env(env, "step", reply.text))
            rewards.append(reward)
            if done or turn == args.max_turns - 1:
                break
            observed = {"role": args.observation_role, "content": observation}
            shadow += [{"role": "assistant", "content": ""}, observed]
            following = list(engine.apply_chat_template(shadow))
            if following[:len(rendered)] != rendered:
                raise ChatTemplateError(
                    f"the chat template of {type(engine).__name__} renders turn {turn + 1} "
                    f"of a conversation differently once turn {turn + 2} is added: the "
                    f"multi-turn workflow needs a template whose rendering of a conversation "
                    f"is a prefix of the rendering of its continuation")
            between = following[len(rendered):]
            rendered = following
            if reply.finish_reason == "stop" and len(reply.token_ids) and between \
                    and between[0] == reply.token_ids[-1]:
                between = between[1:]
            if args.max_model_len is not None \
                    and len(self.ids) + len(between) >= args.max_model_len:
                self.truncated = True
                break
            messages.append(observed)
            self._append(between, False)
        return self._experience(prompt_length, messages, rewards, done)

    async def _generate(self) -> Completion:
        """The model's reply to the conversation so far, appended as model tokens."""
        gen: dict[str, Any] = {"n": 1}
        if self.args.max_model_len is not None:
            room = self.args.max_model_len - len(self.ids)
            max_tokens = self.client.rollout_args.max_tokens
            if max_tokens is None or max_tokens > room:
                gen["max_tokens"] = room
        (reply,) = await self.client.generate_tokens_async(self.ids, **gen)
        if reply.finish_reason == "length":
            self.truncated = True
        self._append(reply.token_ids, True, reply.logprobs)
        return reply

    def _append(self, tokens: Any, model: bool, logprobs: Any = None) -> None:
        """Tokens the model sampled (``model``, with their ``logprobs``), or the template's
        and the observation's."""
        n = len(tokens)
        self.ids.extend(map(int, tokens))
        self.mask.extend([model] * n)
        if self.logprobs is None:
            return
        if model and logprobs is None:      # the engine reports none: the experience has none
            self.logprobs = None
        else:
            self.logprobs.extend(map(float, logprobs) if model else [0.0] * n)

    def _experience(self, prompt_length: int, messages: list[dict[str, str]], rewards: list[float],
                    done: bool) -> Experience:
        tokens = np.asarray(self.ids, dtype=np.int32)
        mask = np.asarray(self.mask, dtype=np.bool_)
        reward = sum(rewards) if self.args.reward == "sum" else rewards[-1]
        return Experience(
            tokens=tokens,
            prompt_length=prompt_length,
            logprobs=(np.asarray(self.logprobs, dtype=np.float32)
                      if self.logprobs is not None else None),
            action_mask=mask,
            reward=reward,
            truncate_status="response_truncated" if self.truncated else None,
            messages=messages,
            prompt_text=self.engine.decode(tokens[:prompt_length]),
            response_text=self.engine.decode(tokens[prompt_length:]),
            metrics={"turns": float(len(rewards)), "env_done": float(done),
                     "env_reward": float(reward), "response_length": float(mask.sum())},
        )
