"""Inference engines behind one interface, and the client workflows use.

``VLLMEngine``, ``OpenAIEngine`` and the Ray ones (``RayEngine``, ``launch_engine_actors``)
load lazily, so that vLLM, aiohttp and Ray are imported only when used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .base import Completion, InferenceModel
from .client import ModelClient
from .simulated import OutputLength, SimulatedEngine

__all__ = ["Completion", "InferenceModel", "ModelClient", "OpenAIEngine", "OutputLength",
           "RayEngine", "SimulatedEngine", "VLLMEngine", "launch_engine_actors"]

_LAZY = {"VLLMEngine": ".vllm", "OpenAIEngine": ".openai", "RayEngine": ".ray_actor",
         "launch_engine_actors": ".ray_launch"}


__getattr__ = lazy_getattr(__name__, _LAZY, globals())


if TYPE_CHECKING:
    from .openai import OpenAIEngine
    from .ray_actor import RayEngine
    from .ray_launch import launch_engine_actors
    from .vllm import VLLMEngine
