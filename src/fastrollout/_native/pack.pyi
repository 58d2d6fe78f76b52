"""Stub of the compiled experience packer (native/pack.pyx)."""
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

def bind(*, as_array: Callable[[Any, str], np.ndarray],
         column_type: Callable[[np.ndarray, np.ndarray, np.ndarray | None], Any],
         item_type: type, eid_type: type) -> None: ...
def pack(exps: Iterable[Any]) -> tuple[list[Any], dict[str, Any], npt.NDArray[np.float64],
                                       npt.NDArray[np.bool_] | None, npt.NDArray[np.int64]]:
    """The arguments of ``ExperienceBatch(items, columns, rewards, reward_present,
    prompt_lengths)`` for ``exps``: an iterable of Experience, or of objects with its fields."""
