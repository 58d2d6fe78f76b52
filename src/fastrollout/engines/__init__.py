"""Inference engines behind one interface, and the client workflows use.

``VLLMEngine`` and ``OpenAIEngine`` load lazily, so that vLLM and aiohttp are
imported only when used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .base import Completion, InferenceModel
from .client import ModelClient
from .simulated import OutputLength, SimulatedEngine

__all__ = ["Completion", "InferenceModel", "ModelClient", "OpenAIEngine", "OutputLength",
           "SimulatedEngine", "VLLMEngine"]

_LAZY = {"VLLMEngine": ".vllm", "OpenAIEngine": ".openai"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from .openai import OpenAIEngine
    from .vllm import VLLMEngine
