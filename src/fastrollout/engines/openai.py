"""OpenAIEngine: any OpenAI-compatible completions server (vLLM, SGLang) as an engine.

Prompts go out as token ids on ``/v1/completions``; token ids come back through
vLLM's ``return_token_ids`` (or ``return_tokens_as_token_ids`` logprob tokens,
``"token_id:123"``), with the logprob of each sampled token. Tokenizing happens
here with the model's tokenizer, so that chat prompts are exactly the tokens sent.
Aborting a request cancels its HTTP call; the server drops a request whose client
went away. Unreachable servers, HTTP errors and malformed replies raise errors
that name the server and the request.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from ..errors import EngineDeadError, EngineError
from ..task import GenerationConfig
from .base import Completion, HFTokenizerMixin


class OpenAIEngine(HFTokenizerMixin):
    """``base_url`` ends with ``/v1``; ``model`` is the served model name.

    ``tokenizer``: a Hugging Face tokenizer or a name/path to load one from
    (default: ``model``). ``dead_after``: consecutive connection failures after
    which the engine is considered dead.
    """

    def __init__(self, base_url: str, model: str, *, tokenizer: Any = None,
                 api_key: str | None = None, max_connections: int = 256,
                 request_timeout: float | None = None, dead_after: int = 3) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = f"OpenAIEngine {self.base_url}"
        self.model_version = 0
        self._tokenizer_src = tokenizer if tokenizer is not None else model
        self._tokenizer = None if isinstance(self._tokenizer_src, str) else self._tokenizer_src
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_connections = max_connections
        self._timeout = request_timeout
        self._dead_after = dead_after
        self._failures = 0
        self._session: Any = None
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._aborted: set[str] = set()
        self._dead: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Open the connection pool, load the tokenizer and check the server serves ``model``."""
        import aiohttp

        if self._dead:
            raise EngineDeadError(f"OpenAIEngine {self.base_url}: {self._dead}")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout), headers=self._headers)
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            loop = asyncio.get_running_loop()
            self._tokenizer = await loop.run_in_executor(
                None, AutoTokenizer.from_pretrained, self._tokenizer_src)
        body = await self._request("GET", "/models", "prepare")
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
        if self.model not in served:
            raise EngineError(f"OpenAIEngine {self.base_url}: model {self.model!r} is not served "
                              f"(the server lists {served})")

    async def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "shut down"
        for fut in list(self._inflight.values()):
            fut.cancel()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    # -- generation --------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: GenerationConfig, *,
                       request_id: str) -> list[Completion]:
        if self._dead:
            raise EngineDeadError(f"OpenAIEngine {self.base_url}: {self._dead}; "
                                  f"request {request_id} refused")
        if self._session is None:
            raise EngineError(f"OpenAIEngine {self.base_url}: call prepare() first")
        payload: dict[str, Any] = {
            "model": self.model, "prompt": list(map(int, prompt_token_ids)), "n": params.n,
            "temperature": params.temperature, "top_p": params.top_p,
            "logprobs": max(params.logprobs, 0), "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if params.top_k > 0:
            payload["top_k"] = params.top_k
        if params.max_tokens is not None:
            payload["max_tokens"] = params.max_tokens
        if params.seed is not None:
            payload["seed"] = params.seed
        call = asyncio.ensure_future(self._request("POST", "/completions", request_id, payload))
        self._inflight[request_id] = call
        try:
            body = await call
        except asyncio.CancelledError:
            if request_id in self._aborted and not _cancelling():
                empty = np.zeros(0, np.int32)
                return [Completion(empty, np.zeros(0, np.float32), "abort", "")
                        for _ in range(params.n)]
            raise
        finally:
            del self._inflight[request_id]
            self._aborted.discard(request_id)
        return self._parse(body, params.n, request_id)

    async def abort(self, request_ids: list[str]) -> None:
        """Cancel the HTTP calls; their ``generate`` calls return empty "abort" completions."""
        for rid in request_ids:
            call = self._inflight.get(rid)
            if call is not None and not call.done():
                self._aborted.add(rid)
                call.cancel()

    async def _request(self, method: str, path: str, what: str, payload: Any = None) -> Any:
        import aiohttp

        url = self.base_url + path
        try:
            async with self._session.request(method, url, json=payload) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientConnectionError as exc:
            self._failures += 1
            if self._failures >= self._dead_after:
                self._dead = f"unreachable after {self._failures} attempts ({exc})"
                raise EngineDeadError(f"OpenAIEngine {url}: server {self._dead} [{what}]") from exc
            raise EngineError(f"OpenAIEngine {url}: cannot reach the server ({exc}) "
                              f"[{what}]") from exc
        except TimeoutError as exc:
            raise EngineError(f"OpenAIEngine {url}: no reply within {self._timeout} s "
                              f"[{what}]") from exc
        self._failures = 0
        if status != 200:
            raise EngineError(f"OpenAIEngine {url}: HTTP {status} [{what}]: {text[:500]}")
        try:
            return json.loads(text)
        except ValueError:
            raise EngineError(f"OpenAIEngine {url}: reply is not JSON [{what}]: "
                              f"{text[:200]!r}") from None

    def _parse(self, body: Any, n: int, request_id: str) -> list[Completion]:
        where = f"OpenAIEngine {self.base_url}/completions: malformed reply to {request_id}"
        try:
            choices = sorted(body["choices"], key=lambda c: c.get("index", 0))
            out = [self._choice(c) for c in choices]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EngineError(f"{where}: {exc!r} in {str(body)[:300]}") from None
        if len(out) != n:
            raise EngineError(f"{where}: expected {n} choices, got {len(out)}")
        return out

    @staticmethod
    def _choice(c: dict[str, Any]) -> Completion:
        lp = c.get("logprobs") or {}
        ids = c.get("token_ids")
        if ids is None:
            tokens = lp.get("tokens")
            if tokens is None:
                raise ValueError("no token ids (the server ignored return_token_ids and "
                                 "return_tokens_as_token_ids)")
            ids = [int(t.rsplit(":", 1)[1]) for t in tokens]
        token_ids = np.asarray(ids, dtype=np.int32)
        logprobs = None
        if lp.get("token_logprobs") is not None:
            logprobs = np.asarray(lp["token_logprobs"], dtype=np.float32)
            if len(logprobs) != len(token_ids):
                raise ValueError(f"{len(logprobs)} logprobs for {len(token_ids)} tokens")
        return Completion(token_ids, logprobs, c.get("finish_reason") or "stop", c["text"])



def _cancelling() -> bool:
    """Whether the current task itself is being cancelled (not only the HTTP call)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
