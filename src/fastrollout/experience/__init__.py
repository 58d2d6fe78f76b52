"""Experiences: the Experience/EID model, columnar batches and the zero-copy wire codec.

Names are imported on first use: the compiled Experience imports this package's leaf
modules (``fields``, ``eid``), and importing them must not import the rest of the package,
which imports the compiled Experience."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr

_EXPORTS = {
    "EID": ".eid", "Experience": ".model", "to_torch": ".fields",
    "ArrayColumn": ".column", "ExperienceBatch": ".batch",
    "decode_experiences": ".codec", "encode_experiences": ".codec",
    "decode_any": ".dispatch", "decode_payloads": ".dispatch",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .batch import ExperienceBatch as ExperienceBatch
    from .codec import decode_experiences as decode_experiences
    from .codec import encode_experiences as encode_experiences
    from .column import ArrayColumn as ArrayColumn
    from .dispatch import decode_any as decode_any
    from .dispatch import decode_payloads as decode_payloads
    from .eid import EID as EID
    from .fields import to_torch as to_torch
    from .model import Experience as Experience
