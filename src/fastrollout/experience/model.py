"""Experience and EID: one sampled trajectory and its identity (Trinity's field names).

``Experience`` itself is compiled (``fastrollout._native.experience``, for construction
speed); this module owns what it defers to: the ``EID`` dataclass and the array conversion
rules (``FIELD_DTYPES``, ``as_array``), bound into the compiled class at import."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._native.experience import ARRAY_FIELDS, FIELDS, META_FIELDS, Experience, bind, new_suffix

__all__ = ["ARRAY_FIELDS", "EID", "FIELDS", "FIELD_DTYPES", "META_FIELDS", "Experience",
           "as_array", "to_torch"]

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


@dataclass(slots=True)
class EID:
    """Experience id: batch / task / run / step plus a random suffix."""

    batch: int | str = ""
    task: int | str = ""
    run: int = 0
    step: int = 0
    suffix: str = field(default_factory=new_suffix)  # C PRNG, reseeded after fork

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


bind(eid_type=EID, as_array=as_array, to_torch=to_torch, field_dtypes=FIELD_DTYPES)
