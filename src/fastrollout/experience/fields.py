"""Experience's fields: their names, and the dtypes and conversions of the array fields.

A leaf module: the compiled ``Experience`` and packer import it, and it imports none of
them. ``as_array`` is the one owner of the conversion rules; the compiled constructor only
skips it for values it would return unchanged or convert exactly as it would."""
from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

__all__ = ["ARRAY_FIELDS", "FIELDS", "FIELD_DTYPES", "META_FIELDS", "as_array", "to_torch"]

# Field names: the array fields in wire order (experience.pxd's F_* constants index it), the
# plain-object fields in wire order, and every field (the order pickles keep).
ARRAY_FIELDS = ("tokens", "logprobs", "token_level_reward", "advantages", "returns",
                "action_mask", "chosen", "rejected", "teacher_logprobs")
META_FIELDS = ("truncate_status", "info", "metrics", "response_text", "prompt_text",
               "messages", "tools", "chosen_messages", "rejected_messages")
FIELDS = ("tokens", "prompt_length", "reward", "eid", *ARRAY_FIELDS[1:], *META_FIELDS)

# Array fields, the dtype a list becomes, and the dtypes an array may keep as they are.
# Arrays of another dtype of the same family (or empty float arrays, which ``[]`` gives) are
# cast to the default, and so are floats for an integer field when they are whole numbers;
# anything else is refused.
_INT = (np.dtype(np.int32), (np.dtype(np.int32), np.dtype(np.int64)), "iu")
_FLOAT = (np.dtype(np.float32),
          (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)), "fiub")
_MASK = (np.dtype(np.bool_), (np.dtype(np.bool_),), "biu")
FIELD_DTYPES: dict[str, tuple[np.dtype, tuple[np.dtype, ...], str]] = {
    "tokens": _INT, "logprobs": _FLOAT, "token_level_reward": _FLOAT, "advantages": _FLOAT,
    "returns": _FLOAT, "action_mask": _MASK, "chosen": _INT, "rejected": _INT,
    "teacher_logprobs": _FLOAT,
}


def _torch_tensor_type() -> type | None:
    # torch is never imported here: a tensor can only exist if the caller imported torch.
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def _check_whole(arr: np.ndarray, name: str, default: np.dtype) -> None:
    """Refuse floats that ``arr.astype(default)`` would not keep exactly."""
    values = arr.astype(np.float64)
    limits = np.iinfo(default)
    bad = ~(np.isfinite(values) & (values == np.trunc(values))
            & (values >= limits.min) & (values <= limits.max))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"Experience.{name} must hold {default} values: floats must be whole "
                         f"numbers within {default}'s range, got {values[i].item()} at index {i}")


def as_array(value: Any, name: str) -> np.ndarray:
    """Convert a list, numpy array or torch tensor to the 1-D numpy array field ``name`` keeps.

    numpy arrays and CPU tensors of an allowed dtype are kept without copying."""
    default, allowed, kinds = FIELD_DTYPES[name]
    if type(value) is np.ndarray and value.ndim == 1 and value.dtype in allowed:
        return value    # the common case, kept cheap: workflows build many experiences
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(value, tensor):
        value = value.detach().cpu()  # type: ignore[attr-defined]  # a torch.Tensor
        try:
            value = value.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            value = value.float().numpy()
    is_array = isinstance(value, np.ndarray)
    arr = value if is_array else np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"Experience.{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype not in allowed or (not is_array and arr.dtype != default):
        if arr.dtype.kind == "f" and default.kind == "i":
            _check_whole(arr, name, default)
        elif arr.dtype.kind not in kinds and not (arr.size == 0 and arr.dtype.kind == "f"):
            raise ValueError(f"Experience.{name} must hold {default} values, got dtype {arr.dtype}")
        arr = arr.astype(default)
    return arr


def to_torch(array: np.ndarray) -> Any:
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
