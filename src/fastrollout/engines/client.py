"""ModelClient: what a workflow calls to sample from an engine.

One client serves one attempt of one task. It turns text (or chat messages) into
engine requests with ids ``{request_prefix}-{k}``, remembers which are in flight
so that the attempt's owner can abort exactly those, and wraps the completions
in Experiences. Synchronous workflows run in worker threads; their calls hop to
the event loop with ``run_coroutine_threadsafe`` so they never block it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np

from ..errors import EngineError
from ..experience import Experience
from ..task import GenerationConfig
from .base import Completion, InferenceModel

# Trinity's value for a response cut off by the length limit.
RESPONSE_TRUNCATED = "response_truncated"
_NONE_IN_FLIGHT: frozenset[str] = frozenset()
_T = TypeVar("_T")


class ModelClient:
    # One per task attempt, most of which make no request at all with a fast workflow:
    # slots, and nothing made that a request does not need.
    __slots__ = ("engine", "loop", "rollout_args", "_prefix", "_counter", "_inflight",
                 "_closed")

    def __init__(self, engine: InferenceModel, loop: asyncio.AbstractEventLoop,
                 rollout_args: GenerationConfig, request_prefix: str | tuple[object, ...]
                 ) -> None:
        """``request_prefix``: a str, or a tuple of parts joined with "/" when first needed.
        (Positional arguments: the runner makes a client per attempt, and a class call with
        keywords costs nearly twice one without in CPython 3.11.)"""
        self.engine = engine
        self.loop = loop
        self.rollout_args = rollout_args
        self._prefix = request_prefix
        self._counter = 0
        # The shared empty frozenset until the first request gives it a set of its own.
        self._inflight: set[str] | frozenset[str] = _NONE_IN_FLIGHT
        self._closed = False

    # -- async API (on the loop) -------------------------------------------------------------

    async def generate_async(self, prompts: list[str], **gen: Any) -> list[Experience]:
        """Sample ``n`` responses for each prompt; experiences in prompt order."""
        if isinstance(prompts, str):
            raise TypeError("ModelClient.generate takes a list of prompts, got a str")
        params = self._params(gen)
        encode = self.engine.encode
        return await self._run_all([(encode(p), p) for p in prompts], params)

    async def chat_async(self, messages: list[dict[str, Any]], **gen: Any) -> list[Experience]:
        """Sample ``n`` replies to a conversation, using the engine's chat template."""
        params = self._params(gen)
        ids = self.engine.apply_chat_template(messages)
        exps = await self._run_all([(ids, None)], params)
        for exp in exps:
            exp.messages = list(messages)
        return exps

    async def generate_tokens_async(self, prompt_token_ids: list[int], **gen: Any
                                    ) -> list[Completion]:
        """Sample ``n`` continuations of a prompt given as token ids: the engine's
        completions (token ids, logprobs, ``finish_reason``), for workflows that keep the
        exact tokens of a multi-turn conversation. Tracked and aborted like every request
        of this client."""
        params = self._params(gen)
        return await self._request(list(prompt_token_ids), params)

    @property
    async def model_version_async(self) -> int:
        """``await client.model_version_async`` (a property, as Trinity's model wrapper has it)."""
        return self.engine.model_version

    @property
    def model_version(self) -> int:
        return self.engine.model_version

    @property
    def request_prefix(self) -> str:
        prefix = self._prefix
        if isinstance(prefix, str):
            return prefix
        prefix = self._prefix = "/".join(map(str, prefix))
        return prefix

    def inflight_request_ids(self) -> list[str]:
        return list(self._inflight)

    async def abort_all(self) -> None:
        """Abort this client's in-flight requests and close it."""
        self._closed = True
        if self._inflight:
            await self.engine.abort(list(self._inflight))

    def close(self) -> bool:
        """Refuse further calls. True if requests are still in flight: they are left to
        ``abort_all``."""
        self._closed = True
        return bool(self._inflight)

    # -- sync API (from worker threads) ------------------------------------------------------

    def generate(self, prompts: list[str], **gen: Any) -> list[Experience]:
        return self._bridge(self.generate_async(prompts, **gen), "generate")

    def chat(self, messages: list[dict[str, Any]], **gen: Any) -> list[Experience]:
        return self._bridge(self.chat_async(messages, **gen), "chat")

    def generate_tokens(self, prompt_token_ids: list[int], **gen: Any) -> list[Completion]:
        return self._bridge(self.generate_tokens_async(prompt_token_ids, **gen),
                            "generate_tokens")

    def _bridge(self, coro: Coroutine[Any, Any, _T], name: str) -> _T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RuntimeError(f"ModelClient.{name}() called on the event loop thread: it would "
                               f"block the loop it waits on; use `await {name}_async(...)` there")
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            # The loop is closed: a run detached past its timeout outlived its coordinator.
            coro.close()
            raise EngineError(f"ModelClient.{name}(): the event loop of this client is closed "
                              f"(its task attempt ended long ago)") from None
        return future.result()

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"ModelClient {self.request_prefix!r} is closed (its task attempt "
                              f"ended or was aborted); no further requests are accepted")

    def _params(self, gen: dict[str, Any]) -> GenerationConfig:
        self._check_open()
        try:
            return self.rollout_args.merged(**gen)
        except TypeError:
            known = ", ".join(GenerationConfig.__dataclass_fields__)
            unknown = sorted(set(gen) - set(GenerationConfig.__dataclass_fields__))
            raise TypeError(f"ModelClient: unknown generation argument(s) {unknown}; "
                            f"accepted: {known}") from None

    async def _run_all(self, prompts: list[tuple[list[int], str | None]],
                       params: GenerationConfig) -> list[Experience]:
        if len(prompts) == 1:
            ids, text = prompts[0]
            return await self._run_one(ids, text, params)
        groups = await asyncio.gather(*(self._run_one(ids, text, params) for ids, text in prompts))
        return [exp for group in groups for exp in group]

    async def _run_one(self, ids: list[int], text: str | None,
                       params: GenerationConfig) -> list[Experience]:
        completions = await self._request(ids, params)
        prompt = np.asarray(ids, dtype=np.int32)
        if text is None:
            text = self.engine.decode(prompt)
        return [_experience(prompt, text, c) for c in completions]


    async def _request(self, ids: list[int], params: GenerationConfig) -> list[Completion]:
        """One engine request ``{request_prefix}-{k}``, in flight (for ``abort_all``) until it
        returns."""
        self._check_open()    # gathered prompts start later: abort_all may have run since
        self._counter += 1
        rid = f"{self.request_prefix}-{self._counter}"
        inflight = self._inflight
        if isinstance(inflight, frozenset):     # the shared empty one
            inflight = self._inflight = set()
        inflight.add(rid)
        try:
            return await self.engine.generate(ids, params, request_id=rid)
        finally:
            inflight.discard(rid)


def _experience(prompt: np.ndarray, prompt_text: str, c: Completion) -> Experience:
    return Experience(
        tokens=np.concatenate((prompt, c.token_ids)),
        prompt_length=len(prompt),
        logprobs=c.logprobs,
        response_text=c.text,
        prompt_text=prompt_text,
        truncate_status=RESPONSE_TRUNCATED if c.finish_reason == "length" else None,
    )
