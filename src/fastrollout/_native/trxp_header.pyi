"""Stub of the compiled safetensors header parser (native/trxp_header.pyx)."""
import numpy as np
import numpy.typing as npt

from fastrollout.errors import PayloadHeaderError as PayloadHeaderError

def parse_header(
    header: bytes | bytearray | memoryview,
) -> tuple[dict[str, tuple[npt.NDArray[np.int64], str]], list[str]]:
    """Parse the JSON header of a safetensors file whose tensors are keyed ``"{i}:{field}"``.

    Returns ``(fields, dtypes)``. ``fields`` maps each field name (the key after its first
    ``:``, ``""`` for a key without one) to ``(rows, first_key)``: ``rows`` is a ``(5, k)``
    int64 array over the field's ``k`` tensors in header order, its rows being the item
    number (-1 if the text before ``:`` is not decimal digits, clamped at 2**56), the
    length (``shape[0]``, -1 if the tensor is not 1-D), the begin and end data offsets, and
    the index of the tensor's dtype name in ``dtypes``; ``first_key`` is the field's first
    key. ``__metadata__`` is checked and dropped. Raises ``PayloadHeaderError`` (naming the byte
    position) for anything but that exact layout, for integers of 2**56 or more, escapes in
    keys or dtypes, and more than 64 distinct field or dtype names.
    """
