"""fastrollout: a fast, hang-free rollout coordinator for RL fine-tuning of LLMs.

This module is the whole public surface. Names are imported lazily so that
``import fastrollout`` stays cheap (the engines pull in vLLM only when used).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "FastRolloutError": ".errors", "ConfigError": ".errors", "PayloadError": ".errors",
    "EngineError": ".errors", "EngineDeadError": ".errors", "PayloadHeaderError": ".errors",
    "UnsafePickleError": ".errors", "PipelineFullError": ".errors", "StatusError": ".errors",
    "TasksetError": ".errors", "SinkClosedError": ".errors", "LogLockedError": ".errors",
    "LogCorruptError": ".errors",
    "Config": ".config", "ExplorerConfig": ".config", "OverRolloutConfig": ".config",
    "DynamicTimeoutConfig": ".config", "MonitorConfig": ".config", "PipelineConfig": ".config",
    "WeightSyncConfig": ".config",
    "Task": ".task", "GenerationConfig": ".task", "Status": ".task",
    "Workflow": ".workflow",
    "Experience": ".experience", "EID": ".experience", "ExperienceBatch": ".experience",
    "RolloutCoordinator": ".coordinator", "BatchState": ".coordinator",
    "BatchLifecycleState": ".coordinator", "BatchProgress": ".coordinator",
    "ModelClient": ".engines", "InferenceModel": ".engines", "Completion": ".engines",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .config import (Config, DynamicTimeoutConfig, ExplorerConfig, MonitorConfig,
                         OverRolloutConfig, PipelineConfig, WeightSyncConfig)
    from .coordinator import BatchLifecycleState, BatchProgress, BatchState, RolloutCoordinator
    from .engines import Completion, InferenceModel, ModelClient
    from .errors import (ConfigError, EngineDeadError, EngineError, FastRolloutError,
                         LogCorruptError, LogLockedError, PayloadError, PayloadHeaderError,
                         PipelineFullError, SinkClosedError, StatusError, TasksetError,
                         UnsafePickleError)
    from .experience import EID, Experience, ExperienceBatch
    from .task import GenerationConfig, Status, Task
    from .workflow import Workflow
