"""SimulatedEngine: an in-process stand-in for an inference engine.

With no arguments it answers at once (no sleep, no task switch) with tokens and
logprobs that depend only on the prompt, the request seed and the sample index;
it is cheap enough to push hundreds of thousands of requests per second through
a coordinator. Arguments add a latency model (time to first token + time per
output token, output lengths from a distribution), a continuous-batching
capacity, and faults (errors, hangs, engine death) for reliability tests.
"""
from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..errors import EngineDeadError, EngineError
from ..task import GenerationConfig
from .base import Completion

_POOL = 1 << 16                    # precomputed tokens/logprobs; requests read windows of it
_PRINTABLE = np.arange(32, 127, dtype=np.int32)
_T = TypeVar("_T")


@dataclass(frozen=True)
class OutputLength:
    """Distribution of response lengths (tokens), before the ``max_tokens`` cap."""

    kind: str = "fixed"             # fixed | uniform | lognormal | replay
    value: int = 16                 # fixed
    low: int = 1                    # uniform, inclusive
    high: int = 64
    median: float = 64.0            # lognormal
    sigma: float = 1.0
    lengths: tuple[int, ...] = ()   # replay, cycled in order

    @classmethod
    def fixed(cls, n: int) -> OutputLength:
        return cls("fixed", value=_positive(n, "fixed length"))

    @classmethod
    def uniform(cls, low: int, high: int) -> OutputLength:
        if not 1 <= low <= high:
            raise ValueError(f"OutputLength.uniform: need 1 <= low <= high, got {low}, {high}")
        return cls("uniform", low=low, high=high)

    @classmethod
    def lognormal(cls, median: float, sigma: float) -> OutputLength:
        if median <= 0 or sigma < 0:
            raise ValueError(f"OutputLength.lognormal: need median > 0 and sigma >= 0, "
                             f"got {median}, {sigma}")
        return cls("lognormal", median=median, sigma=sigma)

    @classmethod
    def replay(cls, path: str | os.PathLike[str]) -> OutputLength:
        """Lengths from a file: a JSON list, or one integer per line."""
        with open(path) as f:
            text = f.read()
        try:
            values = json.loads(text) if text.lstrip().startswith("[") else text.split()
            lengths = tuple(_positive(int(v), f"length in {path}") for v in values)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"OutputLength.replay: {path} must hold positive integers "
                             f"(a JSON list or one per line): {exc}") from None
        if not lengths:
            raise ValueError(f"OutputLength.replay: {path} holds no lengths")
        return cls("replay", lengths=lengths)


def _positive(n: int, what: str) -> int:
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    return int(n)


class _Request:
    __slots__ = ("done", "admit", "timer", "start", "seqs", "hang", "longest")

    def __init__(self, done: asyncio.Future[str], hang: bool) -> None:
        self.done = done          # result "finish" | "abort"; an exception when the engine dies
        self.admit: asyncio.Future[bool] | None = None   # set while queued for capacity
        self.timer: asyncio.TimerHandle | None = None
        self.start: float | None = None            # when decoding started
        self.seqs = 0             # capacity units held
        self.hang = hang
        self.longest = 0


class SimulatedEngine:
    """An ``InferenceModel`` with a byte-level tokenizer and a synthetic policy.

    ``ttft`` / ``tpot``: seconds to the first token and per further token.
    ``output_len``: an ``OutputLength`` (or an int for a fixed length).
    ``capacity``: sequences decoded at once (an ``n``-sample request holds ``n``,
    at most ``capacity``); the rest wait in FIFO order. ``error_rate``: share of
    requests that fail with ``EngineError``; ``hang_rate``: share that never
    finish until aborted; ``die_after``: the engine dies when request number
    ``die_after + 1`` arrives (in-flight requests fail with ``EngineDeadError``).
    """

    def __init__(self, *, ttft: float = 0.0, tpot: float = 0.0,
                 output_len: OutputLength | int = 16, capacity: int | None = None,
                 error_rate: float = 0.0, hang_rate: float = 0.0, die_after: int | None = None,
                 seed: int = 0, vocab_size: int = 256) -> None:
        if ttft < 0 or tpot < 0:
            raise ValueError(f"SimulatedEngine: ttft and tpot must be >= 0, got {ttft}, {tpot}")
        if capacity is not None and capacity < 1:
            raise ValueError(f"SimulatedEngine: capacity must be >= 1 or None, got {capacity}")
        for name, rate in (("error_rate", error_rate), ("hang_rate", hang_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"SimulatedEngine: {name} must be in [0, 1], got {rate}")
        self.model_version = 0
        self.ttft, self.tpot = float(ttft), float(tpot)
        self.output_len = (OutputLength.fixed(output_len) if isinstance(output_len, int)
                           else output_len)
        self.capacity = capacity
        self.error_rate, self.hang_rate, self.die_after = error_rate, hang_rate, die_after
        self.requests_received = 0
        self.max_running_seqs = 0            # peak of sequences decoded at once
        self._seed = seed
        self._faults = random.Random(seed)
        self._lengths = random.Random(seed + 1)
        self._replay_pos = 0
        rng = np.random.default_rng(seed)
        pool = rng.choice(_PRINTABLE[_PRINTABLE < vocab_size], size=_POOL + 4096)
        self._tokens = pool.astype(np.int32)
        self._text = self._tokens.astype(np.uint8).tobytes().decode("ascii")
        self._logprobs = (-rng.exponential(1.0, size=_POOL + 4096)).astype(np.float32)
        self._timed = ttft > 0 or tpot > 0 or capacity is not None or hang_rate > 0
        self._inflight: dict[str, _Request] = {}
        self._running_seqs = 0
        # Requests queued for capacity, with their admit future and sequences.
        self._waiting: collections.deque[tuple[_Request, asyncio.Future[bool], int]]
        self._waiting = collections.deque()
        self._dead: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        if self._dead:
            raise EngineDeadError(f"SimulatedEngine: {self._dead}")

    async def shutdown(self) -> None:
        if not self._dead:
            self._die("shut down")

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    def kill(self, reason: str = "killed") -> None:
        """Make the engine die now, as a crashed engine process would."""
        if not self._dead:
            self._die(reason)

    def restart(self) -> None:
        """Come back after dying, as a restarted engine process would (nothing in flight;
        ``die_after`` no longer applies)."""
        self._dead = None
        self.die_after = None

    def _die(self, reason: str) -> None:
        self._dead = reason
        for rid, req in list(self._inflight.items()):
            if req.timer is not None:
                req.timer.cancel()
            for fut in (req.admit, req.done):
                if fut is not None and not fut.done():
                    fut.set_exception(EngineDeadError(f"SimulatedEngine {reason}: request "
                                                      f"{rid} lost"))
        self._waiting.clear()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._inflight)

    async def update_weights(self, path: str | os.PathLike[str] | None = None, *,
                             mode: str = "wait") -> int:
        """Pretend to load new weights: bumps and returns ``model_version`` (``mode`` as
        VLLMEngine's; nothing here can straddle two versions)."""
        if self._dead:
            raise EngineDeadError(f"SimulatedEngine: {self._dead}")
        self.model_version += 1
        return self.model_version

    # -- generation --------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: Sequence[int], params: GenerationConfig, *,
                       request_id: str) -> list[Completion]:
        if self._dead:
            raise EngineDeadError(f"SimulatedEngine {self._dead}: request {request_id} refused")
        self.requests_received += 1
        if self.die_after is not None and self.requests_received > self.die_after:
            self._die(f"died after {self.die_after} requests")
            raise EngineDeadError(f"SimulatedEngine {self._dead}: request {request_id} refused")
        if self.error_rate and self._faults.random() < self.error_rate:
            raise EngineError(f"SimulatedEngine: injected failure of request {request_id}")
        lengths = self._draw_lengths(params)
        if not self._timed:
            return self._complete(prompt_token_ids, params, lengths, None)
        return await self._generate_timed(prompt_token_ids, params, lengths, request_id)

    def _draw_lengths(self, params: GenerationConfig) -> list[int]:
        dist, rnd, n = self.output_len, self._lengths, params.n
        if dist.kind == "fixed":
            lengths = [dist.value] * n
        elif dist.kind == "uniform":
            lengths = [rnd.randint(dist.low, dist.high) for _ in range(n)]
        elif dist.kind == "lognormal":
            mu = math.log(dist.median)
            lengths = [max(1, round(rnd.lognormvariate(mu, dist.sigma))) for _ in range(n)]
        else:
            seq, pos = dist.lengths, self._replay_pos
            lengths = [seq[(pos + i) % len(seq)] for i in range(n)]
            self._replay_pos = (pos + n) % len(seq)
        return lengths

    def _complete(self, prompt: Sequence[int], params: GenerationConfig, lengths: list[int],
                  produced: list[int] | None) -> list[Completion]:
        """Completions of ``lengths`` tokens (``produced``: partial counts of an abort)."""
        cap = params.max_tokens
        base = hash((tuple(prompt), params.seed, self._seed))
        tokens, logprobs, text = self._tokens, self._logprobs, self._text
        out = []
        for i, length in enumerate(lengths):
            reason = "stop"
            if cap is not None and length > cap:
                length, reason = cap, "length"
            if produced is not None:
                length, reason = min(length, produced[i]), "abort"
            start = (base + i * 7919) % _POOL
            end = start + length
            out.append(Completion(tokens[start:end].copy(),
                                  logprobs[start:end].copy() if params.logprobs >= 0 else None,
                                  reason, text[start:end]))
        return out

    async def _generate_timed(self, prompt: Sequence[int], params: GenerationConfig,
                              lengths: list[int], request_id: str) -> list[Completion]:
        if request_id in self._inflight:
            raise EngineError(f"SimulatedEngine: request id {request_id} is already in flight")
        loop = asyncio.get_running_loop()
        hang = bool(self.hang_rate) and self._faults.random() < self.hang_rate
        req = _Request(loop.create_future(), hang)
        self._inflight[request_id] = req
        cap = params.max_tokens
        req.longest = max(min(n, cap) if cap is not None else n for n in lengths)
        try:
            seqs = min(params.n, self.capacity) if self.capacity else params.n
            if self.capacity and (self._waiting or self._running_seqs + seqs > self.capacity):
                admit = req.admit = loop.create_future()  # _release() starts it when it fits
                self._waiting.append((req, admit, seqs))
                outcome = await req.done if await admit else "abort"
            else:
                self._start(req, seqs, loop)
                outcome = await req.done
        finally:
            self._release(request_id, req)
        produced = None
        if outcome == "abort":
            produced = [self._tokens_by(req, loop.time())] * params.n
        return self._complete(prompt, params, lengths, produced)

    def _start(self, req: _Request, seqs: int, loop: asyncio.AbstractEventLoop) -> None:
        req.seqs = seqs
        self._running_seqs += seqs
        self.max_running_seqs = max(self.max_running_seqs, self._running_seqs)
        req.start = loop.time()
        if not req.hang:
            delay = self.ttft + self.tpot * max(req.longest - 1, 0)
            req.timer = loop.call_later(delay, _resolve, req.done, "finish")

    def _tokens_by(self, req: _Request, now: float) -> int:
        """Tokens a request had produced at ``now`` (0 if it never started)."""
        if req.start is None:
            return 0
        elapsed = now - req.start
        if elapsed < self.ttft:
            return 0
        if not self.tpot:
            return req.longest
        return min(req.longest, 1 + int((elapsed - self.ttft) / self.tpot))

    def _release(self, request_id: str, req: _Request) -> None:
        del self._inflight[request_id]
        if req.timer is not None:
            req.timer.cancel()
        if req.admit is not None and not req.admit.done():   # left while still queued
            req.admit.cancel()
        self._running_seqs -= req.seqs
        req.seqs = 0
        capacity = self.capacity
        if capacity is None:    # only an engine with a capacity queues requests
            return
        # Admit waiters in FIFO order while they fit; skip those that already left.
        while self._waiting:
            nxt, admit, seqs = self._waiting[0]
            if admit.done():
                self._waiting.popleft()
                continue
            if self._running_seqs + seqs > capacity:
                break
            self._waiting.popleft()
            admit.set_result(True)
            self._start(nxt, seqs, asyncio.get_running_loop())

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests: their ``generate`` calls return the tokens made so far."""
        for rid in request_ids:
            req = self._inflight.get(rid)
            if req is None:
                continue
            if req.admit is not None and not req.admit.done():
                req.admit.set_result(False)
            else:
                _resolve(req.done, "abort")

    # -- tokenizer: one token per byte -------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> str:
        return bytes(np.asarray(token_ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        return self.encode(text)


def _resolve(fut: asyncio.Future[_T], value: _T) -> None:
    if not fut.done():
        fut.set_result(value)
