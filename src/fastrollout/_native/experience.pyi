"""Stub of the compiled Experience (native/experience.pyx)."""
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from fastrollout.experience.eid import EID

def _unpickle(cls: type[Experience], values: Iterable[Any]) -> Experience: ...

class Experience:
    tokens: npt.NDArray[Any]
    prompt_length: int
    reward: float | None
    eid: EID
    logprobs: npt.NDArray[Any] | None
    token_level_reward: npt.NDArray[Any] | None
    advantages: npt.NDArray[Any] | None
    returns: npt.NDArray[Any] | None
    action_mask: npt.NDArray[np.bool_] | None
    chosen: npt.NDArray[Any] | None
    rejected: npt.NDArray[Any] | None
    teacher_logprobs: npt.NDArray[Any] | None
    truncate_status: str | None
    info: dict[str, Any]
    metrics: dict[str, Any]
    response_text: str | None
    prompt_text: str | None
    messages: list[Any] | None
    tools: list[Any] | None
    chosen_messages: list[Any] | None
    rejected_messages: list[Any] | None

    def __init__(self, *, tokens: Any, prompt_length: int = 1, logprobs: Any = None,
                 reward: float | None = None, token_level_reward: Any = None,
                 advantages: Any = None, returns: Any = None, action_mask: Any = None,
                 truncate_status: str | None = None, info: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None, response_text: str | None = None,
                 prompt_text: str | None = None, messages: list[Any] | None = None,
                 tools: list[Any] | None = None, chosen: Any = None, rejected: Any = None,
                 chosen_messages: list[Any] | None = None,
                 rejected_messages: list[Any] | None = None,
                 teacher_logprobs: Any = None, eid: EID | dict[str, Any] | None = None
                 ) -> None: ...
    def to_torch(self) -> dict[str, Any]: ...
    def __reduce__(self) -> tuple[Any, ...]: ...
