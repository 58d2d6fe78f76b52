"""MeteredEngine: an engine wrapper that counts what its requests produce, and, when asked,
records each one (start, first token, end, tokens) for the benchmark's statistics and plots.

Times are ``time.monotonic()`` seconds, the clock of the coordinator's task ledger. The time
to first token is what the engine can tell, and None where it cannot:

- ``SimulatedEngine``: from its latency model (``end - tpot * (longest - 1)``: the first
  token came ``ttft`` after the request was admitted, which its capacity may delay), to the
  event loop's timer resolution (1 ms under uvloop);
- ``VLLMEngine``: vLLM's own ``first_token_latency`` (arrival in the engine to the first
  token, what its ``RequestOutput.metrics`` report while stats logging is on, the default),
  read by wrapping its ``AsyncLLM.generate`` once the engine is prepared;
- other engines (OpenAI-compatible servers answer without streaming here): not measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .engines.base import Completion, InferenceModel
from .engines.vllm import VLLMEngine  # imports vLLM only when an engine starts
from .task import GenerationConfig

__all__ = ["MeteredEngine", "RequestLog"]


@dataclass
class RequestLog:
    """One row per finished request (aborted and failed ones included, 0 tokens if failed)."""

    request_ids: list[str] = field(default_factory=list)
    start: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)    # NaN: not known
    end: list[float] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)     # over the request's n samples

    def __len__(self) -> int:
        return len(self.start)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"start": np.asarray(self.start, np.float64),
                "first_token": np.asarray(self.first_token, np.float64),
                "end": np.asarray(self.end, np.float64),
                "output_tokens": np.asarray(self.output_tokens, np.int64)}


class MeteredEngine:
    """``engine`` as an ``InferenceModel`` that counts output tokens and requests in flight;
    with ``record=True`` it also keeps a ``RequestLog``."""

    def __init__(self, engine: InferenceModel, *, record: bool = False) -> None:
        self.engine = engine
        self.output_tokens = 0
        self.requests = 0
        self.in_flight = 0
        self.log: RequestLog | None = RequestLog() if record else None
        self._vllm_ttft: dict[str, float] | None = None

    # -- what the coordinator reads and calls ------------------------------------------------

    @property
    def model_version(self) -> int:
        return self.engine.model_version

    @property
    def is_dead(self) -> bool:
        return self.engine.is_dead

    @property
    def name(self) -> str:
        return str(getattr(self.engine, "name", type(self.engine).__name__))

    async def prepare(self) -> None:
        await self.engine.prepare()
        if self.log is not None and self._vllm_ttft is None and isinstance(self.engine,
                                                                          VLLMEngine):
            self._vllm_ttft = _watch_vllm_first_tokens(self.engine.llm)

    def take_log(self) -> RequestLog:
        """The requests recorded so far; recording goes on into a new log."""
        log, self.log = self.log, RequestLog()
        if log is None:
            raise RuntimeError("MeteredEngine(record=False) keeps no request log")
        return log

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    async def abort(self, request_ids: list[str]) -> None:
        await self.engine.abort(request_ids)

    async def update_weights(self, path: Any, *, mode: str = "wait") -> int:
        return await self.engine.update_weights(path, mode=mode)  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def decode(self, token_ids: Any) -> str:
        return self.engine.decode(token_ids)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.engine.apply_chat_template(messages)

    async def generate(self, prompt_token_ids: list[int], params: GenerationConfig, *,
                       request_id: str) -> list[Completion]:
        self.requests += 1
        self.in_flight += 1
        start = time.monotonic()
        out: list[Completion] = []
        try:
            out = await self.engine.generate(prompt_token_ids, params, request_id=request_id)
            return out
        finally:
            end = time.monotonic()
            self.in_flight -= 1
            tokens = sum(len(c.token_ids) for c in out)
            self.output_tokens += tokens
            if self.log is not None:
                self._record(request_id, start, end, tokens, out)

    def _record(self, request_id: str, start: float, end: float, tokens: int,
                out: list[Completion]) -> None:
        log = self.log
        assert log is not None
        first = float("nan")
        engine = self.engine
        if self._vllm_ttft is not None:
            latency = self._vllm_ttft.pop(request_id, None)
            if latency is not None:
                first = start + latency
        elif out and out[0].finish_reason != "abort" and hasattr(engine, "tpot"):
            longest = max(len(c.token_ids) for c in out)
            # The loop's timers may fire a little early: never before the request started.
            first = max(start, end - engine.tpot * max(longest - 1, 0))
        log.request_ids.append(request_id)
        log.start.append(start)
        log.first_token.append(first)
        log.end.append(end)
        log.output_tokens.append(tokens)


def _watch_vllm_first_tokens(llm: Any) -> dict[str, float]:
    """Wrap ``llm.generate`` (this instance only) so that each finished request's
    ``first_token_latency`` lands in the returned dict, by request id. A stand-in for the
    engine reporting it in its ``Completion``."""
    latencies: dict[str, float] = {}
    generate = llm.generate

    async def watched(prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                      **kwargs: Any) -> Any:
        async for out in generate(prompt, sampling_params, request_id, *args, **kwargs):
            metrics = getattr(out, "metrics", None)
            if out.finished and metrics is not None and metrics.first_token_latency > 0:
                latencies[request_id] = float(metrics.first_token_latency)
            yield out

    llm.generate = watched
    return latencies
