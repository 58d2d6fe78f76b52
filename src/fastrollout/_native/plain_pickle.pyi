"""Stub of the compiled plain-data pickle loader (native/plain_pickle.pyx)."""
from typing import Any, Final

MAX_DEPTH: Final[int]
MAX_KEY_COST: Final[int]

def load_plain(data: bytes | bytearray | memoryview, budget: int) -> Any:
    """Load one pickle (protocols 2-5) of None, bool, int, float, str, bytes, tuple, list,
    dict, set and frozenset; nothing else is built and no code runs.

    Raises ``UnsafePickleError`` (naming the byte position) for any other opcode, a
    malformed or truncated pickle, trailing bytes, integers outside [-2**63, 2**64),
    strings that are not UTF-8, memo indexes out of sequence, a cycle, nesting deeper than
    ``MAX_DEPTH``, a result whose cost passes ``budget`` (1 per value, counted once per
    reference, plus 1 per 8 bytes of str or bytes), unhashable keys, and a dict or set
    whose keys other than str cost more than ``MAX_KEY_COST``. Checks run as the data is
    built, before any key is hashed, so work and memory stay proportional to ``data``.
    """
