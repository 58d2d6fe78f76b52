"""Stub of the compiled experience packer (native/pack.pyx)."""
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from fastrollout._native.experience import Experience
from fastrollout.experience.column import ArrayColumn
from fastrollout.experience.wire import WireItem

class ColumnReader:
    field: int
    def __init__(self, field: int, column: ArrayColumn, n: int) -> None: ...

def pack(exps: Iterable[Any]) -> tuple[list[WireItem], dict[str, ArrayColumn],
                                       npt.NDArray[np.float64], npt.NDArray[np.bool_] | None,
                                       npt.NDArray[np.int64]]:
    """The arguments of ``ExperienceBatch(items, columns, rewards, reward_present,
    prompt_lengths)`` for ``exps``: an iterable of Experience, or of objects with its fields."""
def unpack(batch: Any, start: int, stop: int) -> list[Experience]:
    """Experiences ``start`` to ``stop`` of ``batch`` (an ExperienceBatch, or any object with
    its attributes): array fields are views into its columns, metadata objects are its
    items' own."""
def check(exps: list[Any]) -> None:
    """Raise TypeError/ValueError naming experience ``i`` and its field unless every item is
    an Experience that ``pack`` takes and the codec writes."""
