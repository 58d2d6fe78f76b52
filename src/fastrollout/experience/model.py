"""Experience and EID: one sampled trajectory and its identity (Trinity's field names)."""
from __future__ import annotations

import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Array fields, the dtype a list becomes, and the dtypes an array may keep as they are.
# Arrays of another dtype of the same family are cast to the default; anything else is refused.
_INT = (np.dtype(np.int32), (np.dtype(np.int32), np.dtype(np.int64)), "iu")
_FLOAT = (np.dtype(np.float32),
          (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)), "fiub")
_MASK = (np.dtype(np.bool_), (np.dtype(np.bool_),), "biu")
FIELD_DTYPES: dict[str, tuple[np.dtype, tuple[np.dtype, ...], str]] = {
    "tokens": _INT, "logprobs": _FLOAT, "token_level_reward": _FLOAT, "advantages": _FLOAT,
    "returns": _FLOAT, "action_mask": _MASK, "chosen": _INT, "rejected": _INT,
    "teacher_logprobs": _FLOAT,
}
ARRAY_FIELDS: tuple[str, ...] = tuple(FIELD_DTYPES)
# Plain-object fields, in the order the wire formats keep them.
META_FIELDS: tuple[str, ...] = ("truncate_status", "info", "metrics", "response_text",
                                "prompt_text", "messages", "tools", "chosen_messages",
                                "rejected_messages")


# Suffixes only need to be unlikely to collide, not unpredictable: a private generator
# (reseeded in forked children) costs half of os.urandom per experience.
_suffixes = random.Random()
os.register_at_fork(after_in_child=_suffixes.seed)


def _new_suffix() -> str:
    return f"{_suffixes.getrandbits(24):06x}"


@dataclass(slots=True)
class EID:
    """Experience id: batch / task / run / step plus a random suffix."""

    batch: int | str = ""
    task: int | str = ""
    run: int = 0
    step: int = 0
    suffix: str = field(default_factory=_new_suffix)

    @property
    def uid(self) -> str:
        return f"{self.batch}/{self.task}/{self.run}/{self.step}/{self.suffix}"

    @property
    def sid(self) -> str:
        return f"{self.batch}/{self.task}/{self.step}"

    @property
    def rid(self) -> str:
        return f"{self.batch}/{self.task}/{self.run}"

    @property
    def tid(self) -> str:
        return f"{self.batch}/{self.task}"

    def __str__(self) -> str:
        return self.uid

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "task": self.task, "run": self.run,
                "step": self.step, "suffix": self.suffix}


def _torch_tensor_type() -> type | None:
    # torch is never imported here: a tensor can only exist if the caller imported torch.
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def as_array(value: Any, name: str) -> np.ndarray:
    """Convert a list, numpy array or torch tensor to the 1-D numpy array field ``name`` keeps.

    numpy arrays and CPU tensors of an allowed dtype are kept without copying."""
    default, allowed, kinds = FIELD_DTYPES[name]
    if type(value) is np.ndarray and value.ndim == 1 and value.dtype in allowed:
        return value    # the common case, kept cheap: workflows build many experiences
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(value, tensor):
        value = value.detach().cpu()
        try:
            value = value.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            value = value.float().numpy()
    is_array = isinstance(value, np.ndarray)
    arr = value if is_array else np.asarray(value)
    if arr.dtype not in allowed or (not is_array and arr.dtype != default):
        if arr.dtype.kind not in kinds and not (arr.size == 0 and arr.dtype.kind == "f"):
            raise ValueError(f"Experience.{name} must hold {default} values, got dtype {arr.dtype}")
        arr = arr.astype(default)
    if arr.ndim != 1:
        raise ValueError(f"Experience.{name} must be 1-D, got shape {arr.shape}")
    return arr


def to_torch(array: np.ndarray):
    """``torch.from_numpy`` without a copy, also for read-only views of an immutable payload.

    A tensor over a read-only payload must not be written to; ``.clone()`` it first."""
    import torch  # only reached by callers who want tensors

    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class Experience:
    """One trajectory: prompt+response tokens, logprobs of the response, reward, ids.

    Array fields are 1-D numpy arrays (or None); ``to_torch()`` gives zero-copy tensors."""

    __slots__ = ("tokens", "prompt_length", "reward", "eid", *ARRAY_FIELDS[1:], *META_FIELDS)

    def __init__(self, *, tokens: Any, prompt_length: int = 1, logprobs: Any = None,
                 reward: float | None = None, token_level_reward: Any = None,
                 advantages: Any = None, returns: Any = None, action_mask: Any = None,
                 truncate_status: str | None = None, info: dict | None = None,
                 metrics: dict | None = None, response_text: str | None = None,
                 prompt_text: str | None = None, messages: list | None = None,
                 tools: list | None = None, chosen: Any = None, rejected: Any = None,
                 chosen_messages: list | None = None, rejected_messages: list | None = None,
                 teacher_logprobs: Any = None, eid: EID | dict | None = None) -> None:
        self.tokens = as_array(tokens, "tokens")
        self.prompt_length = int(prompt_length)
        self.reward = None if reward is None else float(reward)
        self.truncate_status = truncate_status
        self.info = {} if info is None else info
        self.metrics = {} if metrics is None else metrics
        self.response_text = response_text
        self.prompt_text = prompt_text
        self.messages = messages
        self.tools = tools
        self.chosen_messages = chosen_messages
        self.rejected_messages = rejected_messages
        self.logprobs = None if logprobs is None else as_array(logprobs, "logprobs")
        self.token_level_reward = (None if token_level_reward is None
                                   else as_array(token_level_reward, "token_level_reward"))
        self.advantages = None if advantages is None else as_array(advantages, "advantages")
        self.returns = None if returns is None else as_array(returns, "returns")
        self.action_mask = None if action_mask is None else as_array(action_mask, "action_mask")
        self.chosen = None if chosen is None else as_array(chosen, "chosen")
        self.rejected = None if rejected is None else as_array(rejected, "rejected")
        self.teacher_logprobs = (None if teacher_logprobs is None
                                 else as_array(teacher_logprobs, "teacher_logprobs"))
        if eid is None:
            eid = EID()
        elif isinstance(eid, dict):
            eid = EID(**eid)
        self.eid = eid

    @classmethod
    def _from_parts(cls, fields: dict[str, Any]) -> Experience:
        """Build from already validated parts (decoders): no conversion, views stay views."""
        exp = cls.__new__(cls)
        for name in cls.__slots__:
            setattr(exp, name, fields.get(name))
        return exp

    def to_torch(self) -> dict[str, Any]:
        """The array fields that are set, as tensors sharing memory with the numpy arrays."""
        return {name: to_torch(value) for name in ARRAY_FIELDS
                if (value := getattr(self, name)) is not None}

    def __repr__(self) -> str:
        return (f"Experience(eid={self.eid.uid!r}, tokens={len(self.tokens)}, "
                f"prompt_length={self.prompt_length}, reward={self.reward})")
