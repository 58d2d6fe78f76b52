"""Pick the decoder of a payload by its magic prefix: FRXP (ours) or TRXP (Trinity)."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import PayloadError
from .batch import ExperienceBatch
from .codec import MAGIC, decode_experiences, owned_view, where


def decode_any(payload: bytes | bytearray | memoryview, *,
               index: int | None = None) -> ExperienceBatch:
    """Decode one FRXP or TRXP payload; anything else (e.g. a legacy raw pickle) is refused.

    Bounded: corrupt or hostile bytes raise PayloadError after work and memory proportional
    to the payload's length. A payload that is not ``bytes`` is copied once (``owned_view``)."""
    # Imported here: compat.trinity imports this package's modules.
    from ..compat import trinity

    view = owned_view(payload, where(index))
    head = bytes(view[:4])
    if head == MAGIC:
        return decode_experiences(view, index=index)
    if head == trinity.MAGIC:
        return trinity.decode_trxp(view, index=index)
    raise PayloadError(f"{where(index)}: magic: expected {MAGIC!r} or {trinity.MAGIC!r}, got "
                       f"{head!r} (legacy pickled payloads are refused)")


def decode_payloads(payloads: Sequence[bytes | bytearray | memoryview]) -> ExperienceBatch:
    """Decode a list of payloads (either format) into one batch, copying each column once.

    Work is proportional to the payloads' total length, so a caller on an event loop should
    run this in a worker thread for large lists."""
    return ExperienceBatch.concat([decode_any(p, index=i) for i, p in enumerate(payloads)])
