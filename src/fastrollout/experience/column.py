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
        if len(self.starts) == 0:
            return self.data[:0]
        if self.is_contiguous():
            return self.data[self.starts[0]:self.stops[-1]]
        return np.concatenate([self.data[a:b] for a, b in zip(self.starts.tolist(),
                                                              self.stops.tolist(), strict=True)])

    def offsets(self) -> np.ndarray:
        """int64 offsets (len n+1) of each item in ``flat()``."""
        out = np.zeros(len(self.starts) + 1, dtype=np.int64)
        np.cumsum(self.lengths(), out=out[1:])
        return out

    def segments(self) -> list[np.ndarray]:
        """Views to copy from when concatenating: one per run of contiguous items."""
        if self.is_contiguous():
            return [self.flat()]
        return [self.data[a:b]
                for a, b in zip(self.starts.tolist(), self.stops.tolist(), strict=True)]
