"""The FRXP wire format: a msgpack header plus raw little-endian column buffers.

Layout (all integers little-endian)::

    b"FRXP" | u8 version | 3 zero bytes | u64 header_len | header (msgpack) | pad to 8 | body

The header lists every column with its dtype and the byte offsets (relative to the
body, each 8-aligned) of its data, of its int64 item offsets (n+1, array columns) and of
its u8 presence flags (only when some item lacks the field); two columns may name the same
bytes (one column held under two names, written once). Decoding validates every length and
offset against the payload with numpy, then returns views into it. The header
is scanned first (``plain_msgpack``) for what msgspec does not bound: nesting depth, map keys
whose hashes could be made to collide, and extension types.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import Any

import msgspec
import numpy as np

from .._native.plain_msgpack import check_plain
from ..errors import PayloadError
from .batch import ArrayColumn, ExperienceBatch, WireEID, WireItem
from .model import FIELD_DTYPES, Experience

MAGIC = b"FRXP"
VERSION = 1
_PREFIX = struct.Struct("<4sB3sQ")
_ALIGN = 8


class WireColumn(msgspec.Struct, array_like=True, gc=False):
    name: str
    dtype: str
    data: int      # byte offset of the values in the body
    nbytes: int
    offsets: int   # byte offset of int64[n+1] item offsets, -1 for a scalar column
    present: int   # byte offset of u8[n] presence flags, -1 when every item has it


class WireHeader(msgspec.Struct, array_like=True, gc=False):
    count: int
    columns: list[WireColumn]
    items: list[WireItem]


_SCALARS = {"reward": np.dtype("<f8"), "prompt_length": np.dtype("<i8")}
_ALLOWED = {name: {d.newbyteorder("<").str for d in spec[1]}
            for name, spec in FIELD_DTYPES.items()}
# Every dtype a column may have, by name: parsing the name per column costs more.
_DTYPES = {d: np.dtype(d) for names in [*_ALLOWED.values(), [t.str for t in _SCALARS.values()]]
           for d in names}
_U8, _I8 = np.dtype("|u1"), np.dtype("<i8")
_decoder = msgspec.msgpack.Decoder(WireHeader)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot encode a {type(obj).__name__} in experience metadata")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def where(index: int | None) -> str:
    return "payload" if index is None else f"payload {index}"


# ---------------------------------------------------------------- payload bytes

def owned_view(payload: Any, ctx: str) -> memoryview:
    """``payload`` as a flat byte view that nobody can change under the batch decoded from
    it: ``bytes`` (or a view of them) is viewed in place; any other buffer (bytearray,
    memoryview of one, numpy array, mmap...) is copied once, since its owner could write to
    it, or resize it, while the batch's arrays still view it."""
    try:
        view = memoryview(payload)
    except TypeError as exc:
        raise PayloadError(f"{ctx}: expected bytes, got {type(payload).__name__}") from exc
    if not (isinstance(view.obj, bytes) and view.c_contiguous):
        view = memoryview(view.tobytes())
    return view.cast("B")


def read_prefix(payload: Any, prefix: struct.Struct, magic: bytes, version: int,
                ctx: str) -> tuple[memoryview, tuple[Any, ...]]:
    """``payload`` as an owned byte view (``owned_view``), and the fields of its fixed
    ``prefix`` after the magic and version (both checked). Shared by the FRXP and TRXP
    decoders."""
    view = owned_view(payload, ctx)
    name = magic.decode()
    if len(view) < prefix.size:
        raise PayloadError(f"{ctx}: prefix: {len(view)} bytes is shorter than the "
                           f"{prefix.size}-byte {name} prefix")
    fields = prefix.unpack_from(view)
    if fields[0] != magic:
        raise PayloadError(f"{ctx}: magic: expected {magic!r}, got {bytes(fields[0])!r}")
    if fields[1] != version:
        raise PayloadError(f"{ctx}: version: unsupported {name} version {fields[1]} "
                           f"(this build reads {version})")
    return view, fields[2:]


# ---------------------------------------------------------------- encode

def encode_experiences(exps: Iterable[Experience] | ExperienceBatch) -> bytes:
    """Serialize experiences (or an ExperienceBatch, without building Experience objects)
    into one FRXP payload. The columns are ``ExperienceBatch.from_experiences``'s."""
    batch = exps if isinstance(exps, ExperienceBatch) else ExperienceBatch.from_experiences(exps)
    return b"".join(encode_parts(batch))


def encode_parts(batch: ExperienceBatch) -> list[Any]:
    """The FRXP payload of ``batch`` as buffers to write end to end (``b"".join`` of them is
    ``encode_experiences(batch)``): the column values are views of the batch's arrays, so a
    writer that takes a list of buffers (``os.pwritev``) copies nothing here.

    A column object that is also another column (GRPO's ``returns`` is its ``advantages``)
    is written once: both header entries name the same bytes, which any FRXP reader views
    as two columns of equal values."""
    body: list[Any] = []
    size = 0
    columns: list[WireColumn] = []
    written: dict[int, WireColumn] = {}     # by id() of the ArrayColumn

    def put(bufs: list[np.ndarray]) -> int:
        nonlocal size
        at = size
        for buf in bufs:
            if buf.nbytes:
                body.append(buf)
                size += buf.nbytes
        if size % _ALIGN:
            pad = _ALIGN - size % _ALIGN
            body.append(b"\0" * pad)
            size += pad
        return at

    def put_present(present: np.ndarray | None) -> int:
        return -1 if present is None else put([present.view(np.uint8)])

    for name, col in batch.columns.items():
        same = written.get(id(col))
        if same is not None:
            columns.append(WireColumn(name, same.dtype, same.data, same.nbytes, same.offsets,
                                      same.present))
            continue
        dtype = col.dtype.newbyteorder("<")
        data = [np.ascontiguousarray(part, dtype) for part in col.segments()]
        present = put_present(col.present)
        nbytes = sum(part.nbytes for part in data)
        written[id(col)] = spec = WireColumn(name, dtype.str, put(data), nbytes,
                                             put([col.offsets()]), present)
        columns.append(spec)
    present = put_present(batch.reward_present)
    rewards = batch.rewards.astype("<f8", copy=False)
    columns.append(WireColumn("reward", "<f8", put([rewards]), rewards.nbytes, -1, present))
    plens = batch.prompt_lengths.astype("<i8", copy=False)
    columns.append(WireColumn("prompt_length", "<i8", put([plens]), plens.nbytes, -1, -1))

    header = _encoder.encode(WireHeader(len(batch), columns, batch.items))
    head = _PREFIX.pack(MAGIC, VERSION, b"\0\0\0", len(header))
    pad = -(len(head) + len(header)) % _ALIGN
    return [head, header, b"\0" * pad, *body]


# ---------------------------------------------------------------- decode

_PATH = re.compile(r"`\$((?:\[\d+\])*)(.*)`")
_HEADER_FIELDS = WireHeader.__struct_fields__


def _name_path(message: str) -> str:
    """Turn msgspec's ``$[2][7][0][4]`` into ``items[7].eid.suffix``."""
    m = _PATH.search(message)
    if m is None:
        return "header"
    idx = [int(x) for x in re.findall(r"\d+", m.group(1))]
    parts: list[str] = []
    if idx:
        parts.append(_HEADER_FIELDS[idx[0]] if idx[0] < len(_HEADER_FIELDS) else str(idx[0]))
        idx = idx[1:]
    if idx:
        parts[-1] += f"[{idx.pop(0)}]"
    fields = {"columns": WireColumn, "items": WireItem}.get(parts[0].split("[")[0] if parts
                                                               else "")
    while idx and fields is not None:
        k = idx.pop(0)
        names = fields.__struct_fields__
        parts.append(names[k] if k < len(names) else str(k))
        fields = WireEID if parts[-1] == "eid" else None
    parts.extend(f"[{k}]" for k in idx)
    return "header." + ".".join(parts).replace(".[", "[") + m.group(2)


def _array(payload: Any, dtype: np.dtype, start: int, count: int, body: int, end: int,
           ctx: str, field: str) -> np.ndarray:
    nbytes = count * dtype.itemsize
    if start < 0 or count < 0 or body + start + nbytes > end:
        raise PayloadError(f"{ctx}: {field}: {nbytes} bytes at body offset {start} run past "
                           f"the end of the payload ({end - body} body bytes)")
    return np.frombuffer(payload, dtype=dtype, count=count, offset=body + start)


def _column(payload: Any, spec: WireColumn, n: int, body: int, end: int,
            ctx: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    name = spec.name
    if name in _SCALARS:
        if spec.dtype != _SCALARS[name].str or spec.offsets != -1:
            raise PayloadError(f"{ctx}: {name}: expected a scalar column of {_SCALARS[name]}, "
                               f"got dtype {spec.dtype!r}")
    elif name not in _ALLOWED:
        raise PayloadError(f"{ctx}: columns: unknown column {name!r}")
    elif spec.dtype not in _ALLOWED[name]:
        raise PayloadError(f"{ctx}: {name}: dtype {spec.dtype!r} is not one of "
                           f"{sorted(_ALLOWED[name])}")
    dtype = _DTYPES[spec.dtype]
    if spec.nbytes < 0 or spec.nbytes % dtype.itemsize:
        raise PayloadError(f"{ctx}: {name}: {spec.nbytes} bytes is not a whole number of "
                           f"{dtype} values")
    count = spec.nbytes // dtype.itemsize
    data = _array(payload, dtype, spec.data, count, body, end, ctx, name)
    if dtype.kind == "b" and count and data.view(np.uint8).max() > 1:
        raise PayloadError(f"{ctx}: {name}: boolean values other than 0 and 1")
    present = None
    if spec.present != -1:
        flags = _array(payload, _U8, spec.present, n, body, end, ctx,
                       f"{name} presence flags")
        if n and flags.max() > 1:
            raise PayloadError(f"{ctx}: {name}: presence flags other than 0 and 1")
        present = flags.view(np.bool_)
    offsets = None
    if spec.offsets == -1:
        if count != n:
            raise PayloadError(f"{ctx}: {name}: {count} values for {n} experiences")
        return data, None, present
    offsets = _array(payload, _I8, spec.offsets, n + 1, body, end, ctx, f"{name} offsets")
    if offsets[0] != 0 or offsets[-1] != count or (offsets[1:] < offsets[:-1]).any():
        raise PayloadError(f"{ctx}: {name}: item offsets are not increasing from 0 to {count}")
    if present is not None and (offsets[1:][~present] != offsets[:-1][~present]).any():
        raise PayloadError(f"{ctx}: {name}: an absent item has values")
    return data, offsets, present


def decode_experiences(payload: bytes | bytearray | memoryview, *,
                       index: int | None = None) -> ExperienceBatch:
    """Decode an FRXP payload; array columns are numpy views into ``payload`` when it is
    ``bytes``, else into one copy of it (see ``owned_view``).

    ``index`` (the payload's position in a list) is named in every error."""
    ctx = where(index)
    view, (reserved, hlen) = read_prefix(payload, _PREFIX, MAGIC, VERSION, ctx)
    end = len(view)
    if reserved != b"\0\0\0":
        raise PayloadError(f"{ctx}: prefix: reserved bytes are not zero")
    if hlen > end - _PREFIX.size:
        raise PayloadError(f"{ctx}: header: length {hlen} runs past the end of the payload "
                           f"({end} bytes)")
    raw_header = view[_PREFIX.size:_PREFIX.size + hlen]
    try:
        check_plain(raw_header)
        header = _decoder.decode(raw_header)
    except ValueError as exc:  # the scan's and msgspec's errors, bad UTF-8
        raise PayloadError(f"{ctx}: {_name_path(str(exc))}: {exc}") from None
    n = header.count
    if n != len(header.items):
        raise PayloadError(f"{ctx}: header.count: says {n} experiences, lists "
                           f"{len(header.items)}")
    body = _PREFIX.size + hlen + (-(_PREFIX.size + hlen) % _ALIGN)
    columns: dict[str, ArrayColumn] = {}
    scalars: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    # Columns written once for two names (encode_parts) decode to one object, as encoded.
    shared: dict[tuple[str, int, int, int, int], ArrayColumn] = {}
    for spec in header.columns:
        if spec.name in columns or spec.name in scalars:
            raise PayloadError(f"{ctx}: {spec.name}: column listed twice")
        data, offsets, present = _column(view, spec, n, body, end, ctx)
        if offsets is None:
            scalars[spec.name] = (data, present)
            continue
        key = (spec.dtype, spec.data, spec.nbytes, spec.offsets, spec.present)
        column = shared.get(key)
        if column is None:
            column = shared[key] = ArrayColumn.from_offsets(data, offsets, present)
        columns[spec.name] = column
    if "tokens" not in columns or columns["tokens"].present is not None:
        raise PayloadError(f"{ctx}: tokens: every experience needs tokens")
    for name in _SCALARS:
        if name not in scalars:
            raise PayloadError(f"{ctx}: {name}: column missing")
    rewards, reward_present = scalars["reward"]
    plens, plen_present = scalars["prompt_length"]
    if plen_present is not None:
        raise PayloadError(f"{ctx}: prompt_length: every experience needs one")
    return ExperienceBatch(header.items, columns, rewards, reward_present, plens)
