"""ArrayColumn: one array field of a batch's experiences, as slices of one buffer.

A leaf module: the compiled packer imports it to build columns."""
from __future__ import annotations

import numpy as np

__all__ = ["ArrayColumn"]


class ArrayColumn:
    """One array field of every item: item ``i`` is ``data[starts[i]:stops[i]]``, or None
    where ``present[i]`` is False. Decoders build it over the payload without copying."""

    __slots__ = ("data", "starts", "stops", "present")

    def __init__(self, data: np.ndarray, starts: np.ndarray, stops: np.ndarray,
                 present: np.ndarray | None = None) -> None:
        self.data = data
        self.starts = starts
        self.stops = stops
        self.present = present  # None: every item has the field

    @classmethod
    def from_offsets(cls, data: np.ndarray, offsets: np.ndarray,
                     present: np.ndarray | None = None) -> ArrayColumn:
        return cls(data, offsets[:-1], offsets[1:], present)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray | None:
        if self.present is not None and not self.present[i]:
            return None
        return self.data[self.starts[i]:self.stops[i]]

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    def lengths(self) -> np.ndarray:
        lengths: np.ndarray = (self.stops - self.starts).astype(np.int64, copy=False)
        return lengths

    def is_contiguous(self) -> bool:
        return len(self.starts) == 0 or bool((self.starts[1:] == self.stops[:-1]).all())

    def flat(self) -> np.ndarray:
        """Every item's values end to end: a view when stored that way, else one copy."""
        parts = self.segments()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def offsets(self) -> np.ndarray:
        """int64 offsets (len n+1) of each item in ``flat()``."""
        out = np.zeros(len(self.starts) + 1, dtype=np.int64)
        np.cumsum(self.lengths(), out=out[1:])
        return out

    def segments(self) -> list[np.ndarray]:
        """``flat()`` as views, one per run of items stored end to end (rows selected
        from a batch keep runs of whole tasks: a few views, not one per item)."""
        n = len(self.starts)
        if n == 0:
            return [self.data[:0]]
        breaks = np.flatnonzero(self.starts[1:] != self.stops[:-1]) + 1
        if not len(breaks):
            return [self.data[self.starts[0]:self.stops[-1]]]
        firsts = self.starts[np.concatenate(([0], breaks))].tolist()
        lasts = self.stops[np.concatenate((breaks - 1, [n - 1]))].tolist()
        return [self.data[a:b] for a, b in zip(firsts, lasts, strict=True)]
