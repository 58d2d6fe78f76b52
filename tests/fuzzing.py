"""Payload mutation shared by the codec fuzz tests."""
from hypothesis import strategies as st


def mutated(data: st.DataObject, payload: bytes) -> bytes:
    """``payload`` with 1-4 bytes overwritten at drawn positions, then cut at a drawn length."""
    out = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out[:data.draw(st.integers(0, len(out)))])
