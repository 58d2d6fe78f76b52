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


# For type checkers and editors; `X as X` marks each name as re-exported.
if TYPE_CHECKING:
    from .config import Config as Config
    from .config import DynamicTimeoutConfig as DynamicTimeoutConfig
    from .config import ExplorerConfig as ExplorerConfig
    from .config import MonitorConfig as MonitorConfig
    from .config import OverRolloutConfig as OverRolloutConfig
    from .config import PipelineConfig as PipelineConfig
    from .config import WeightSyncConfig as WeightSyncConfig
    from .coordinator import BatchLifecycleState as BatchLifecycleState
    from .coordinator import BatchProgress as BatchProgress
    from .coordinator import BatchState as BatchState
    from .coordinator import RolloutCoordinator as RolloutCoordinator
    from .engines import Completion as Completion
    from .engines import InferenceModel as InferenceModel
    from .engines import ModelClient as ModelClient
    from .errors import ConfigError as ConfigError
    from .errors import EngineDeadError as EngineDeadError
    from .errors import EngineError as EngineError
    from .errors import FastRolloutError as FastRolloutError
    from .errors import LogCorruptError as LogCorruptError
    from .errors import LogLockedError as LogLockedError
    from .errors import PayloadError as PayloadError
    from .errors import PayloadHeaderError as PayloadHeaderError
    from .errors import PipelineFullError as PipelineFullError
    from .errors import SinkClosedError as SinkClosedError
    from .errors import StatusError as StatusError
    from .errors import TasksetError as TasksetError
    from .errors import UnsafePickleError as UnsafePickleError
    from .experience import EID as EID
    from .experience import Experience as Experience
    from .experience import ExperienceBatch as ExperienceBatch
    from .task import GenerationConfig as GenerationConfig
    from .task import Status as Status
    from .task import Task as Task
    from .workflow import Workflow as Workflow
