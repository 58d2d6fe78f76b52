"""Pick the decoder of a payload by its magic prefix: FRXP (ours) or TRXP (Trinity)."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import PayloadError
from .batch import ExperienceBatch
from .codec import MAGIC, decode_experiences, where

TRXP_MAGIC = b"TRXP"


def decode_any(payload: bytes | bytearray | memoryview, *,
               index: int | None = None) -> ExperienceBatch:
    """Decode one FRXP or TRXP payload; anything else (e.g. a legacy raw pickle) is refused."""
    head = bytes(memoryview(payload)[:4]) if isinstance(payload, (bytes, bytearray, memoryview)) \
        else b""
    if head == MAGIC:
        return decode_experiences(payload, index=index)
    if head == TRXP_MAGIC:
        # Imported here: compat.trinity imports this package's modules.
        from ..compat.trinity import decode_trxp
        return decode_trxp(payload, index=index)
    raise PayloadError(f"{where(index)}: magic: expected {MAGIC!r} or {TRXP_MAGIC!r}, got "
                       f"{head!r} (legacy pickled payloads are refused)")


def decode_payloads(payloads: Sequence[bytes | bytearray | memoryview]) -> ExperienceBatch:
    """Decode a list of payloads (either format) into one batch, copying each column once."""
    return ExperienceBatch.concat([decode_any(p, index=i) for i, p in enumerate(payloads)])
