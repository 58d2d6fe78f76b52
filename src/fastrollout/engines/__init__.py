"""Inference engines behind one interface, and the client workflows use.

``VLLMEngine`` and ``OpenAIEngine`` load lazily, so that vLLM and aiohttp are
imported only when used.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import Completion, InferenceModel
from .client import ModelClient
from .simulated import OutputLength, SimulatedEngine

__all__ = ["Completion", "InferenceModel", "ModelClient", "OpenAIEngine", "OutputLength",
           "SimulatedEngine", "VLLMEngine"]

_LAZY = {"VLLMEngine": ".vllm", "OpenAIEngine": ".openai"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastrollout.engines' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .openai import OpenAIEngine
    from .vllm import VLLMEngine
