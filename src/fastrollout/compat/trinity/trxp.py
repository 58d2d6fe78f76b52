"""Read and write Trinity-RFT 0.6.0's TRXP experience payloads without torch or globals.

TRXP = ``b"TRXP" | u8 version=1 | u64 meta_len | u64 tensor_len | pickle(meta) |
safetensors(tensors)``; tensors are keyed ``"{i}:{field}"``. Decoding gives numpy views
over the safetensors data (a column whose items share one dtype is one view of it) and
``WireItem`` metadata, so a decoded batch encodes to FRXP and joins others like any batch.
The metadata pickle is read by ``plain_pickle``: plain data only, in bounded time and memory.
"""
from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
import numpy as np

from ..._native.plain_pickle import load_plain
from ..._native.trxp_header import parse_header
from ...errors import PayloadError, PayloadHeaderError, UnsafePickleError
from ...experience.batch import ArrayColumn, ExperienceBatch, WireEID, WireItem
from ...experience.codec import read_prefix, where
from ...experience.model import ARRAY_FIELDS, FIELD_DTYPES, Experience, as_array

MAGIC = b"TRXP"
VERSION = 1
_PREFIX = struct.Struct("<4sBQQ")
_U64 = struct.Struct("<Q")
# safetensors dtype names <-> numpy; BF16 is widened to float32 (numpy has no bfloat16).
_ST_DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "I16": "<i2", "U16": "<u2",
              "I32": "<i4", "U32": "<u4", "I64": "<i8", "U64": "<u8", "F16": "<f2",
              "BF16": "<u2", "F32": "<f4", "F64": "<f8"}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items() if k != "BF16"}
_UNSUPPORTED = ("routed_experts", "multi_modal_inputs")
# The metadata, with shared references counted each time they occur (what re-encoding it
# writes), may cost this much per payload byte (plain_pickle's cost: 1 per value plus 1 per
# 8 bytes of str): room for items that share a tools list or a prompt, while a few memo
# references cannot stand for gigabytes.
_COST_PER_BYTE = 8

# Trinity writes an eid as a dict of WireEID's fields (``EID.to_dict()``). msgspec reads an
# array-like struct from arrays only, so the dict form is derived here from WireEID's fields.
_EID = msgspec.defstruct("_EID", [(f.name, f.type) for f in msgspec.structs.fields(WireEID)],
                         gc=False)


class _Item(msgspec.Struct, gc=False):
    """One experience's metadata as Trinity pickles it (only what fastrollout reads)."""

    eid: _EID
    reward: float | None = None
    truncate_status: str | None = None
    info: dict[str, Any] | None = None      # str keys at the top, as WireItem's
    metrics: dict[str, Any] | None = None
    prompt_length: Annotated[int, msgspec.Meta(ge=-2**63, le=2**63 - 1)] = 1  # int64 column
    response_text: str | None = None
    prompt_text: str | None = None
    messages: list | None = None
    tools: list | None = None
    chosen_messages: list | None = None
    rejected_messages: list | None = None
    custom_fields: list = []
    multi_modal_input_keys: list = []


class _Meta(msgspec.Struct, gc=False):
    version: int
    num_items: int
    items: list[_Item]


# ---------------------------------------------------------------- decode

def decode_trxp(payload: bytes | bytearray | memoryview, *,
                index: int | None = None) -> ExperienceBatch:
    """Decode a TRXP payload written by Trinity's ``Experience.serialize_many``.

    Array columns view ``payload`` when it is ``bytes``, else one copy of it (see
    ``codec.owned_view``). Corrupt or hostile bytes raise PayloadError (UnsafePickleError for
    the pickle, PayloadHeaderError for the safetensors header) naming ``index``."""
    ctx = where(index)
    view, (meta_len, tensor_len) = read_prefix(payload, _PREFIX, MAGIC, VERSION, ctx)
    end = len(view)
    if meta_len > end or tensor_len > end or _PREFIX.size + meta_len + tensor_len != end:
        raise PayloadError(f"{ctx}: prefix: meta ({meta_len}) and tensor ({tensor_len}) "
                           f"lengths do not add up to the {end}-byte payload")
    meta = _load_meta(view[_PREFIX.size:_PREFIX.size + meta_len], _COST_PER_BYTE * end, ctx)
    n = len(meta)
    columns = _load_tensors(view, _PREFIX.size + meta_len, end, n, ctx)
    rewards = np.array([np.nan if it.reward is None else it.reward for it in meta],
                       dtype=np.float64)
    has_reward = np.array([it.reward is not None for it in meta], dtype=np.bool_)
    plens = np.array([it.prompt_length for it in meta], dtype=np.int64)
    items = [WireItem(WireEID(it.eid.batch, it.eid.task, it.eid.run, it.eid.step, it.eid.suffix),
                      info={} if it.info is None else it.info,
                      metrics={} if it.metrics is None else it.metrics,
                      response_text=it.response_text, prompt_text=it.prompt_text,
                      truncate_status=it.truncate_status, messages=it.messages, tools=it.tools,
                      chosen_messages=it.chosen_messages, rejected_messages=it.rejected_messages)
             for it in meta]
    return ExperienceBatch(items, columns, rewards, None if has_reward.all() else has_reward,
                           plens)


def _load_meta(view: memoryview, budget: int, ctx: str) -> list[_Item]:
    try:
        meta = msgspec.convert(load_plain(view, budget), _Meta)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{ctx}: meta: {exc}") from None
    except ValueError as exc:  # msgspec's: the data is plain, not of Trinity's shape
        raise PayloadError(f"{ctx}: meta: {exc}") from None
    if meta.version != VERSION or meta.num_items != len(meta.items):
        raise PayloadError(f"{ctx}: meta: version {meta.version} with num_items "
                           f"{meta.num_items} for {len(meta.items)} items")
    for i, it in enumerate(meta.items):
        if it.custom_fields or it.multi_modal_input_keys:
            field = "custom_fields" if it.custom_fields else "multi_modal_inputs"
            raise PayloadError(f"{ctx}: items[{i}].{field}: not supported by fastrollout")
    return meta.items


def _load_tensors(view: memoryview, start: int, end: int, n: int,
                  ctx: str) -> dict[str, ArrayColumn]:
    if end - start < 8:
        raise PayloadError(f"{ctx}: tensors: safetensors section is truncated")
    (hlen,) = _U64.unpack_from(view, start)
    if hlen > end - start - 8:
        raise PayloadError(f"{ctx}: tensors: header length {hlen} runs past the payload")
    try:
        fields, dtypes = parse_header(view[start + 8:start + 8 + hlen])
    except PayloadHeaderError as exc:
        raise PayloadHeaderError(f"{ctx}: tensors: bad safetensors header: {exc}") from None
    data = view[start + 8 + hlen:end]
    for name, (_, first_key) in fields.items():
        if name not in FIELD_DTYPES:
            what = "not supported by fastrollout" if name.startswith(_UNSUPPORTED) \
                else "unknown"
            raise PayloadError(f"{ctx}: {name}: tensor field {what} "
                               f"(item {first_key.partition(':')[0]})")
    count = fields["tokens"][0].shape[1] if "tokens" in fields else 0
    if count != n:
        raise PayloadError(f"{ctx}: tokens: {count} token tensors for {n} experiences")
    return {name: _column(data, name, fields[name][0], dtypes, n, ctx)
            for name in ARRAY_FIELDS if name in fields}


def _column(data: memoryview, name: str, rows: np.ndarray, dtypes: list[str], n: int,
            ctx: str) -> ArrayColumn:
    """One field's tensors, given as ``parse_header`` rows (item, length, begin, end,
    dtype index), as a column over ``n`` experiences."""
    idx, lengths, begins, ends, codes = rows
    if idx.min() < 0:
        raise PayloadError(f"{ctx}: {name}: a tensor key does not start with an item number")
    present = np.zeros(n, dtype=np.bool_)
    if idx.max() < n:
        present[idx] = True
    if idx.max() >= n or np.count_nonzero(present) != len(idx):
        raise PayloadError(f"{ctx}: {name}: tensor keys name items outside 0..{n - 1} or one "
                           "item twice")
    used = [dtypes[c] for c in np.unique(codes).tolist()] \
        if codes.min() != codes.max() else [dtypes[codes[0]]]
    if not set(used) <= _ST_DTYPES.keys():
        raise PayloadError(f"{ctx}: {name}: unsupported dtype in {sorted(used)}")
    if lengths.min() < 0:
        raise PayloadError(f"{ctx}: {name}: expected 1-D tensors")
    sizes = np.array([np.dtype(_ST_DTYPES.get(d, "|u1")).itemsize for d in dtypes])[codes] \
        if len(used) > 1 else np.dtype(_ST_DTYPES[used[0]]).itemsize
    if (ends < begins).any() or ends.max() > len(data) \
            or ((ends - begins) != lengths * sizes).any():
        raise PayloadError(f"{ctx}: {name}: tensor data offsets do not match their shapes "
                           f"or run past the {len(data)}-byte data section")
    if len(idx) == n:
        present = None
    dtype = np.dtype(_ST_DTYPES[used[0]])
    if len(used) == 1 and used[0] != "BF16" and dtype in FIELD_DTYPES[name][1] \
            and not (begins % dtype.itemsize).any():
        # Zero copy: the whole data section seen as this dtype, items located by offsets.
        base = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
        starts = np.zeros(n, dtype=np.int64)
        stops = np.zeros(n, dtype=np.int64)
        starts[idx] = begins // dtype.itemsize
        stops[idx] = ends // dtype.itemsize
        column = ArrayColumn(base, starts, stops, present)
    else:  # mixed, narrow or bfloat16 dtypes: one converting copy
        arrays: list[np.ndarray | None] = [None] * n
        for i, code, b, e in zip(idx.tolist(), codes.tolist(), begins.tolist(),
                                 ends.tolist(), strict=True):
            raw = np.frombuffer(data[b:e], dtype=_ST_DTYPES[dtypes[code]])
            if dtypes[code] == "BF16":
                raw = (raw.astype(np.uint32) << 16).view(np.float32)
            try:
                arrays[i] = as_array(raw, name)
            except ValueError as exc:
                raise PayloadError(f"{ctx}: items[{i}].{name}: {exc}") from None
        values = [a for a in arrays if a is not None]
        flat = np.concatenate(values, dtype=np.result_type(*{a.dtype for a in values}))
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([0 if a is None else len(a) for a in arrays], out=offsets[1:])
        column = ArrayColumn.from_offsets(flat, offsets, present)
    if column.dtype.kind == "b" and len(column.data) and not _binary(column, data, begins, ends):
        raise PayloadError(f"{ctx}: {name}: boolean values other than 0 and 1")
    return column


def _binary(column: ArrayColumn, data: memoryview, begins: np.ndarray,
            ends: np.ndarray) -> bool:
    """Whether every boolean is stored as 0 or 1. safetensors writes a field's tensors side
    by side, so one slice of the data section usually holds exactly them: check it in place
    rather than gathering a copy."""
    first, last = int(begins.min()), int(ends.max())
    if column.data.nbytes == len(data) and last - first == int((ends - begins).sum()) \
            and np.frombuffer(data, np.uint8)[first:last].max(initial=0) <= 1:
        return True  # the span covers every tensor's bytes, so all of them are 0 or 1
    return column.flat().view(np.uint8).max(initial=0) <= 1


# ---------------------------------------------------------------- encode

def encode_trxp(exps: Iterable[Experience]) -> bytes:
    """Write experiences as a TRXP payload that Trinity 0.6.0's
    ``Experience.deserialize_many`` reads."""
    items, header, chunks = [], {}, []
    tensors = []
    for i, e in enumerate(exps):
        items.append({
            "eid": e.eid.to_dict(), "reward": e.reward, "truncate_status": e.truncate_status,
            "info": e.info, "metrics": e.metrics, "prompt_length": e.prompt_length,
            "response_text": e.response_text, "prompt_text": e.prompt_text,
            "messages": e.messages, "tools": e.tools, "chosen_messages": e.chosen_messages,
            "rejected_messages": e.rejected_messages, "custom_fields": [],
            "multi_modal_input_keys": []})
        for name in ARRAY_FIELDS:
            value = getattr(e, name)
            if value is not None:
                arr = as_array(value, name)
                tensors.append((f"{i}:{name}", arr.astype(arr.dtype.newbyteorder("<"),
                                                           copy=False)))
    # As safetensors does: widest dtype first, so every tensor is aligned to its itemsize.
    tensors.sort(key=lambda kv: -kv[1].dtype.itemsize)
    offset = 0
    for key, arr in tensors:
        header[key] = {"dtype": _ST_NAMES[arr.dtype.newbyteorder("=")],
                       "shape": [len(arr)], "data_offsets": [offset, offset + arr.nbytes]}
        chunks.append(arr)
        offset += arr.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    meta = pickle.dumps({"version": VERSION, "num_items": len(items), "items": items},
                        protocol=pickle.HIGHEST_PROTOCOL)
    tensor_len = 8 + len(head) + offset
    return b"".join([_PREFIX.pack(MAGIC, VERSION, len(meta), tensor_len), meta,
                     _U64.pack(len(head)), head, *chunks])
