"""Stub of the compiled msgpack pre-scan (native/plain_msgpack.pyx)."""

def check_plain(data: bytes | bytearray | memoryview) -> None:
    """Check the msgpack value at the start of ``data`` (bytes after it are left to the
    decoder), building nothing: containers nest at most ``plain_pickle.MAX_DEPTH`` deep, a
    map's keys other than str cost at most ``plain_pickle.MAX_KEY_COST`` (as the pickle
    loader counts them), no map is a key, no extension type appears, and no container
    claims more values than bytes remain. Raises ``PayloadError("{what} - at `{path}`")``,
    the path in msgspec's notation, otherwise.
    """
