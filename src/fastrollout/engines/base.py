"""The engine interface the coordinator drives, and what one sample of it returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import EngineError
from ..task import GenerationConfig


@dataclass
class Completion:
    """One sampled continuation: response token ids, their logprobs, why it stopped."""

    token_ids: np.ndarray               # int32, response tokens only
    logprobs: np.ndarray | None         # float32, one per response token
    finish_reason: str                  # "length" | "stop" | "abort"
    text: str
    cumulative_logprob: float | None = None   # the engine's own sum, where it reports one


@runtime_checkable
class InferenceModel(Protocol):
    """What a coordinator drives: token-in / token-out generation with abort.

    ``generate`` raises ``EngineError`` for a failed request and ``EngineDeadError``
    once the engine is gone for good. Cancelling a ``generate`` call aborts its
    request inside the engine.
    """

    model_version: int

    async def prepare(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, prompt_token_ids: list[int], params: GenerationConfig, *,
                       request_id: str) -> list[Completion]: ...

    async def abort(self, request_ids: list[str]) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int] | np.ndarray) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]: ...

    @property
    def is_dead(self) -> bool: ...


class _Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that ``HFTokenizerMixin`` calls."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool, tokenize: bool) -> Any: ...


class HFTokenizerMixin:
    """``encode`` / ``decode`` / ``apply_chat_template`` for engines that load a Hugging Face
    tokenizer into ``self._tokenizer`` during ``prepare()`` and are named by ``self.name``."""

    _tokenizer: _Tokenizer | None = None
    name: str

    def _tok(self) -> _Tokenizer:
        if self._tokenizer is None:
            raise EngineError(f"{self.name}: tokenizer not loaded; call prepare() first")
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text)

    def decode(self, token_ids: list[int] | np.ndarray) -> str:
        return self._tok().decode(list(map(int, token_ids)))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        out = self._tok().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # Newer transformers return a BatchEncoding (a mapping) instead of a list of ids.
        return list(out["input_ids"] if hasattr(out, "keys") else out)
