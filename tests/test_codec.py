"""FRXP codec: round trips, zero-copy proofs, and refusal of bad payloads (with fuzzing)."""
import struct
import types

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.bench_payload_guard import HOSTILE, frxp_with_info
from fastrollout import EID, Experience, ExperienceBatch, PayloadError
from fastrollout._native.plain_msgpack import check_plain
from fastrollout._native.plain_pickle import MAX_KEY_COST
from fastrollout.experience import (
    decode_any,
    decode_experiences,
    decode_payloads,
    encode_experiences,
)
from fastrollout.experience.batch import ArrayColumn, WireEID, WireItem
from fastrollout.experience.codec import encode_parts
from fastrollout.experience.model import ARRAY_FIELDS, FIELD_DTYPES, FIELDS, META_FIELDS, as_array
from fastrollout.operators import take
from fuzzing import mutated
from test_plain_pickle import decode_isolated


def full_experience(i, dtype_choice=0):
    rng = np.random.default_rng(i)
    arrays = {}
    for name in ARRAY_FIELDS:
        allowed = FIELD_DTYPES[name][1]
        dtype = allowed[(i + dtype_choice) % len(allowed)]
        arrays[name] = (rng.integers(0, 2, 5 + i) if dtype.kind in "bi"
                        else rng.standard_normal(5 + i)).astype(dtype)
    return Experience(**arrays, prompt_length=2, reward=0.25 * i,
                      truncate_status="response_truncated",
                      info={"model_version": 3, "nested": {"a": [1, 2.5, None, True]}},
                      metrics={"acc": 1.0}, response_text="héllo", prompt_text="p",
                      messages=[{"role": "user", "content": "x"}], tools=[{"name": "calc"}],
                      chosen_messages=[{"role": "assistant", "content": "c"}],
                      rejected_messages=[], eid=EID(batch="b", task=i, run=2, step=3))


def assert_same(a, b):
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), name
    for name in (*META_FIELDS, "prompt_length", "reward"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.eid == b.eid


@pytest.mark.parametrize("dtype_choice", [0, 1, 2])
def test_round_trip_every_field_and_dtype(dtype_choice):
    exps = [full_experience(i, dtype_choice) for i in range(3)]
    for e in exps:  # one dtype per column: a batch holds items of equal dtypes
        for name in ARRAY_FIELDS:
            setattr(e, name, getattr(e, name).astype(getattr(exps[0], name).dtype))
    batch = decode_experiences(encode_experiences(exps))
    for a, b in zip(exps, batch, strict=True):
        assert_same(a, b)


def test_missing_fields_and_mixed_dtypes():
    exps = [Experience(tokens=np.arange(3, dtype=np.int64), logprobs=[0.5]),
            Experience(tokens=[1, 2], reward=1.0),
            Experience(tokens=[], logprobs=[])]
    back = decode_experiences(encode_experiences(exps)).to_experiences()
    assert back[0].tokens.dtype == np.int64  # int32 + int64 -> int64 column
    assert [b.logprobs is None for b in back] == [False, True, False]
    assert back[0].reward is None and back[1].reward == 1.0 and back[2].tokens.size == 0


def test_array_columns_are_views_into_the_payload():
    payload = encode_experiences([full_experience(i) for i in range(2)])
    whole = np.frombuffer(payload, dtype=np.uint8)
    batch = decode_experiences(payload)
    for name, col in batch.columns.items():
        assert np.shares_memory(col.data, whole), name
        assert np.shares_memory(batch[1].tokens, whole)
    assert not batch[0].tokens.flags.writeable
    for view in (memoryview(payload), memoryview(payload)[0:], memoryview(payload).cast("c")):
        b2 = decode_experiences(view)  # read-only views of bytes: still no copy
        assert np.shares_memory(b2.column("logprobs").data, whole)


# A payload in a buffer its owner can still write to (each view is of a bytearray).
MUTABLE = {"bytearray": lambda b: b, "memoryview": memoryview,
           "read-only view of a bytearray": lambda b: memoryview(b).toreadonly(),
           "numpy array": lambda b: np.frombuffer(b, np.uint8)}


@pytest.mark.parametrize("decode", [decode_experiences, decode_any,
                                    lambda p: decode_payloads([p])])
@pytest.mark.parametrize("kind", MUTABLE)
def test_mutable_buffers_are_copied(decode, kind):
    # Issue 11, failure 5: a batch viewing the caller's bytearray changed with it, and
    # bytearray.clear() raised BufferError for as long as the batch lived.
    exp = full_experience(0)
    backing = bytearray(encode_experiences([exp]))
    payload = MUTABLE[kind](backing)
    batch = decode(payload)
    backing[:] = bytes(len(backing))  # the caller reuses its buffer
    assert_same(batch[0], exp)
    del payload
    backing.clear()  # nothing of the batch holds the buffer


def test_decode_any_dispatch_and_payload_list():
    p1 = encode_experiences([full_experience(0)])
    p2 = encode_experiences([full_experience(1), full_experience(2)])
    assert len(decode_any(p1)) == 1
    joined = decode_payloads([p1, p2])
    assert [e.eid.task for e in joined] == [0, 1, 2]
    with pytest.raises(PayloadError, match=r"payload 1: magic.*legacy"):
        decode_payloads([p1, b"\x80\x04\x95garbage"])


def _header(payload):
    hlen = struct.unpack_from("<Q", payload, 8)[0]
    return msgspec.msgpack.decode(payload[16:16 + hlen]), hlen


@pytest.mark.parametrize("change, match", [
    (lambda p: p[:10], "shorter than"),
    (lambda p: b"FRXQ" + p[4:], "magic"),
    (lambda p: p[:4] + b"\x02" + p[5:], "version: unsupported FRXP version 2"),
    (lambda p: p[:8] + struct.pack("<Q", 2**62) + p[16:], "header: length"),
    (lambda p: p[:-8], "run past the end"),
])
def test_refuses_bad_prefixes_and_truncation(change, match):
    payload = encode_experiences([full_experience(0)])
    with pytest.raises(PayloadError, match="payload 7: .*" + match):
        decode_experiences(change(payload), index=7)


def _edit(payload, edit):
    header, hlen = _header(payload)
    edit(header)
    new = msgspec.msgpack.encode(header)
    body = payload[16 + hlen + (-(16 + hlen) % 8):]
    return payload[:8] + struct.pack("<Q", len(new)) + new + b"\0" * (-(16 + len(new)) % 8) \
        + body


@pytest.mark.parametrize("edit, match", [
    (lambda h: h[2][0][0].__setitem__(2, "x"), r"header\.items\[0\]\.eid\.run"),
    (lambda h: h.__setitem__(0, 5), "header.count"),
    (lambda h: h[1][0].__setitem__(1, "<f8"), "tokens: dtype"),
    (lambda h: h[1][0].__setitem__(0, "evil"), "unknown column"),
    (lambda h: h[1][0].__setitem__(3, 2**60), "tokens"),
    (lambda h: h[1][0].__setitem__(2, -8), "tokens"),
    (lambda h: h[1].append(h[1][0]), "listed twice"),
    (lambda h: h[1].pop(), "prompt_length: column missing"),
    (lambda h: h[1][1].__setitem__(4, h[1][1][2]), "logprobs: item offsets"),
])
def test_refuses_corrupt_headers(edit, match):
    payload = encode_experiences([full_experience(0)])
    with pytest.raises(PayloadError, match="payload 3: .*" + match):
        decode_experiences(_edit(payload, edit), index=3)


def test_refuses_bad_booleans_and_huge_claims():
    exp = Experience(tokens=[1, 2, 3], action_mask=[1, 0])
    payload = bytearray(encode_experiences([exp]))
    header, hlen = _header(bytes(payload))
    col = next(c for c in header[1] if c[0] == "action_mask")
    payload[16 + hlen + (-(16 + hlen) % 8) + col[2]] = 7
    with pytest.raises(PayloadError, match="action_mask: boolean"):
        decode_experiences(bytes(payload))
    # msgpack array claiming 2**32-1 items in a few bytes: refused without allocating
    hostile = b"FRXP\x01\0\0\0" + struct.pack("<Q", 6) + b"\x93\x01\xdd\xff\xff\xff\xff"[:6]
    with pytest.raises(PayloadError, match="header"):
        decode_experiences(hostile)


def _map(entries: list[tuple[bytes, bytes]]) -> bytes:
    return b"\xdf" + struct.pack(">I", len(entries)) + b"".join(k + v for k, v in entries)


def test_colliding_keys_are_refused_before_msgspec_builds_the_dict():
    # Issue 11, failure 3 (FRXP): 20,000 two-int array keys solved for one tuple hash
    # (~400 KB) took 7-19 s to decode, and were accepted.
    assert decode_isolated(HOSTILE["20k tuple keys, FRXP (failure 3)"]()).startswith(
        "PayloadError payload 0: header.items[0].info: a map has keys other than str "
        f"costing over {MAX_KEY_COST}")


@pytest.mark.parametrize("keys, ok", [
    ([msgspec.msgpack.encode(i) for i in range(MAX_KEY_COST)], True),
    ([msgspec.msgpack.encode(i) for i in range(MAX_KEY_COST + 1)], False),
    ([msgspec.msgpack.encode(f"k{i}") for i in range(10_000)], True),
    ([b"\x92\x01" + msgspec.msgpack.encode(i) for i in range(MAX_KEY_COST // 3)], True),
    ([b"\x92\x01" + msgspec.msgpack.encode(i) for i in range(MAX_KEY_COST // 3 + 1)], False),
    ([msgspec.msgpack.encode(b"x" * 8 * (MAX_KEY_COST - 1))], True),
    ([msgspec.msgpack.encode(b"x" * 8 * MAX_KEY_COST)], False),
])
def test_header_maps_bound_keys_other_than_str(keys, ok):
    payload = frxp_with_info(b"\x81\xa1a" + _map([(k, b"\xc0") for k in keys]))  # {"a": ...}
    if ok:
        assert len(decode_experiences(payload)[0].info["a"]) == len(keys)
        return
    with pytest.raises(PayloadError, match=r"payload 2: header\.items\[0\]\.info\.a: a map "
                                           f"has keys other than str costing over {MAX_KEY_COST}"):
        decode_experiences(payload, index=2)


def _deep_info(levels: int) -> dict:
    info: dict = {}
    for _ in range(levels - 1):
        info = {"a": info}
    return info


def test_header_nesting_is_bounded():
    # The header array, items and the item are three levels: info may nest 197 more.
    deep = _deep_info(197)
    assert decode_experiences(encode_experiences([Experience(tokens=[1], info=deep)]))[0] \
        .info == deep
    payload = encode_experiences([Experience(tokens=[1], info=_deep_info(198))])
    with pytest.raises(PayloadError, match=r"payload 1: header\.items\[0\]\.info\.a\.a\.a\.a\.a"
                                           r"\.\.\.: data nested deeper than 200 levels"):
        decode_experiences(payload, index=1)


@pytest.mark.parametrize("info, match", [
    (b"\x81\xa1t\xd6\xff\x00\x00\x00\x00", r"info\.t: MessagePack extension types are not "
                                           "plain data"),   # a timestamp: a datetime
    (b"\x81\x81\xa1k\x01\x02", r"info: map keys must be hashable"),
    (b"\x81\x01\x81\xa1x\xd6\xff\x00\x00\x00\x00", r"info\[\.\.\.\]\.x: MessagePack extension"),
    (b"\x81\xa1t\xc1", r"info\.t: MessagePack data is malformed"),
    (b"\x81\xa1t\xdd\x00\x01\x00\x00\x01", r"info\.t: an array claims 65536 elements"),
])
def test_header_scan_refuses_what_is_not_plain_data(info, match):
    with pytest.raises(PayloadError, match=r"payload 0: header\.items\[0\]\." + match):
        decode_experiences(frxp_with_info(info), index=0)


def test_header_scan_refuses_every_truncation():
    payload = encode_experiences([full_experience(i) for i in range(2)])
    hlen = _header(payload)[1]
    raw = payload[16:16 + hlen]
    check_plain(raw)
    for cut in range(hlen):
        with pytest.raises(PayloadError, match=r"truncated|claims"):
            check_plain(raw[:cut])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_header_scan_takes_any_bytes(blob):
    try:
        check_plain(blob)
    except PayloadError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_payloads_raise_payload_error_or_decode(data):
    payload = mutated(data, encode_experiences([full_experience(i) for i in range(2)]))
    try:
        batch = decode_any(payload, index=0)
    except PayloadError as exc:
        assert str(exc).startswith("payload 0: ")
        return
    for exp in batch:  # whatever decodes is internally consistent
        assert exp.tokens.ndim == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_garbage(blob):
    for prefix in (b"", b"FRXP\x01\0\0\0", b"TRXP\x01"):
        with pytest.raises(PayloadError):
            decode_any(prefix + blob, index=1)


# ---------------------------------------------------------------- columns without the codec

def assert_same_batch(a, b):
    """Two ExperienceBatches hold the same experiences in the same column layout."""
    assert len(a) == len(b) and list(a.columns) == list(b.columns)
    for name, col in a.columns.items():
        other = b.columns[name]
        assert col.dtype == other.dtype, name
        assert np.array_equal(col.flat(), other.flat()), name
        assert np.array_equal(col.offsets(), other.offsets()), name
        assert (col.present is None) == (other.present is None), name
        if col.present is not None:
            assert np.array_equal(col.present, other.present), name
    assert a.rewards.dtype == b.rewards.dtype
    assert np.array_equal(a.rewards, b.rewards, equal_nan=True)
    assert (a.reward_present is None) == (b.reward_present is None)
    if a.reward_present is not None:
        assert np.array_equal(a.reward_present, b.reward_present)
    assert a.prompt_lengths.dtype == b.prompt_lengths.dtype
    assert np.array_equal(a.prompt_lengths, b.prompt_lengths)
    assert a.eids == b.eids
    for name in META_FIELDS:
        assert a.meta(name) == b.meta(name), name
    for x, y in zip(a, b, strict=True):     # indexing: Experiences equal field by field
        for name in ARRAY_FIELDS:
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            assert u is None or (u.dtype == v.dtype and np.array_equal(u, v)), name
        for name in (*META_FIELDS, "prompt_length", "eid"):
            assert getattr(x, name) == getattr(y, name), name
        assert (x.reward is None) == (y.reward is None)
        assert x.reward is None or np.array_equal(x.reward, y.reward, equal_nan=True)


def _mixed_experiences():
    exps = [full_experience(i, i % 3) for i in range(4)]          # dtypes differ per item
    exps += [Experience(tokens=np.arange(3, dtype=np.int64), logprobs=[0.5]),
             Experience(tokens=[1, 2], reward=1.0, action_mask=[1, 0]),
             Experience(tokens=[], prompt_length=0, logprobs=[], reward=float("nan")),
             Experience(tokens=[7])]
    exps[1].reward = None
    exps[2].tokens = [5, 6, 7]              # set after construction: converted as encode does
    exps[7].advantages = np.array([1.5], dtype=">f8")
    exps[3].returns = None
    return exps


def test_from_experiences_matches_the_codec_round_trip():
    exps = _mixed_experiences()
    direct = ExperienceBatch.from_experiences(exps)
    assert_same_batch(direct, decode_experiences(encode_experiences(exps)))
    assert direct.column("tokens").dtype == np.int64 and direct[2].tokens.tolist() == [5, 6, 7]
    assert direct[7].advantages.tolist() == [1.5]      # big-endian input, native column
    assert direct.column("teacher_logprobs").present.tolist() == [True] * 4 + [False] * 4
    assert direct[6].reward != direct[6].reward and direct[1].reward is None  # NaN kept, None kept
    both = ExperienceBatch.concat([direct, decode_experiences(encode_experiences(exps))])
    assert_same_batch(both, ExperienceBatch.concat([direct, direct]))

    trainer = [Experience(tokens=np.arange(5, dtype=np.int64), prompt_length=2,
                          logprobs=[0.1, 0.2, 0.3], reward=1.0),
               Experience(tokens=[1, 2, 3, 4], prompt_length=3, logprobs=[0.5],
                          action_mask=[True])]
    padded = ExperienceBatch.from_experiences(trainer).to_padded(pad_token_id=-1)
    expected = decode_experiences(encode_experiences(trainer)).to_padded(pad_token_id=-1)
    assert list(padded) == list(expected)
    for key, value in expected.items():
        assert padded[key].dtype == value.dtype, key
        assert np.array_equal(padded[key], value, equal_nan=True), key


def test_from_experiences_copies_arrays_and_keeps_metadata():
    exps = [full_experience(i) for i in range(3)]
    batch = ExperienceBatch.from_experiences(exps)
    assert not np.shares_memory(batch.column("tokens").data, exps[0].tokens)
    exps[0].tokens[:] = 0                   # the columns are a copy of the arrays
    assert batch[0].tokens.tolist() == full_experience(0).tokens.tolist()
    assert batch.meta("info")[1] is exps[1].info    # metadata is kept by reference
    assert len(ExperienceBatch.from_experiences([])) == 0


def test_encode_writes_the_same_bytes_from_a_batch():
    exps = _mixed_experiences()
    payload = encode_experiences(exps)
    assert encode_experiences(ExperienceBatch.from_experiences(exps)) == payload
    assert encode_experiences(decode_experiences(payload)) == payload   # no Experience built


def _with_returns(exps, alias):
    """A batch of ``exps`` whose ``returns`` hold the ``advantages`` values: the same column
    object (``alias``, as GRPO sets them) or an equal copy."""
    batch = ExperienceBatch.from_experiences(exps)
    adv = batch.columns["advantages"]
    batch.columns["returns"] = adv if alias else ArrayColumn(adv.data.copy(), adv.starts,
                                                             adv.stops)
    return batch


def test_a_column_under_two_names_is_written_once_and_decodes_as_one():
    exps = [Experience(tokens=[1, 2, 3 + i], prompt_length=1, reward=0.5 * i,
                       advantages=np.full(2 + i % 2, 0.25 * i, np.float32)) for i in range(5)]
    shared, copied = _with_returns(exps, True), _with_returns(exps, False)
    payload, plain = encode_experiences(shared), encode_experiences(copied)
    adv = shared.columns["advantages"]
    saved = adv.data.nbytes + (len(adv) + 1) * 8     # values and item offsets, 8-aligned
    assert len(plain) - len(payload) == saved + (-adv.data.nbytes % 8)
    back = decode_experiences(payload)
    assert back.columns["returns"] is back.columns["advantages"]
    assert_same_batch(back, decode_experiences(plain))  # what a reader gets is unchanged
    for exp in back:
        assert np.array_equal(exp.returns, exp.advantages)
    assert encode_experiences(back) == payload          # a re-encoded log keeps the alias


def test_encode_parts_view_the_columns_and_join_to_the_payload():
    batch = decode_experiences(encode_experiences(_mixed_experiences()))
    rows = ExperienceBatch.concat([batch, batch])
    picked = take(rows, np.array([0, 1, 5, 6, 7, 8, 9]))  # two runs of rows in one buffer
    parts = encode_parts(picked)
    assert b"".join(parts) == encode_experiences(picked)
    tokens = picked.columns["tokens"].data
    assert sum(isinstance(p, np.ndarray) and np.shares_memory(p, tokens) for p in parts) == 2
    assert_same_batch(decode_experiences(b"".join(parts)), reference_batch(
        [rows[i] for i in (0, 1, 5, 6, 7, 8, 9)]))
    # A column over a strided or big-endian array is written as one little-endian run.
    data = np.arange(40, dtype=np.int32)
    for values in (data[::2], data[::2].astype(">i4")):
        picked.columns["tokens"] = ArrayColumn(values, np.arange(0, 14, 2), np.arange(2, 16, 2))
        back = decode_experiences(b"".join(encode_parts(picked)))
        assert [e.tokens.tolist() for e in back] == [[4 * i, 4 * i + 2] for i in range(7)]


@pytest.mark.parametrize("value, match", [
    (np.zeros((2, 2), dtype=np.int32), "tokens must be 1-D"),
    (np.array(5, dtype=np.int32), "tokens must be 1-D"),
    (None, "experience 1 has no tokens"),
])
def test_from_experiences_and_encode_refuse_bad_arrays(value, match):
    exps = [Experience(tokens=[1, 2]), Experience(tokens=[3])]
    exps[1].tokens = value
    with pytest.raises(ValueError, match=match):
        ExperienceBatch.from_experiences(exps)
    with pytest.raises(ValueError, match=match):
        encode_experiences(exps)


# ---------------------------------------------------------------- the compiled packer
# encode_experiences packs with from_experiences too, so the round trip above cannot catch a
# packing bug both share: here the packer is checked against the rules spelled out slowly.

def reference_batch(exps):
    """What ExperienceBatch.from_experiences must give, one plain step at a time."""
    n = len(exps)
    columns = {}
    for name in ARRAY_FIELDS:
        values = [getattr(e, name) for e in exps]
        present = np.array([v is not None for v in values], dtype=np.bool_)
        if not present.any():
            continue
        arrays = [as_array(v, name) for v in values if v is not None]
        dtype = np.result_type(*[a.dtype for a in arrays]).newbyteorder("<")
        lengths = np.zeros(n, dtype=np.int64)
        lengths[present] = [len(a) for a in arrays]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i8")
        columns[name] = ArrayColumn.from_offsets(np.concatenate(arrays).astype(dtype), offsets,
                                                 None if present.all() else present)
    rewards = [e.reward for e in exps]
    reward_present = np.array([r is not None for r in rewards], dtype=np.bool_)
    items = [WireItem(WireEID(*(getattr(e.eid, f) for f in WireEID.__struct_fields__)),
                      **{name: getattr(e, name) for name in META_FIELDS}) for e in exps]
    return ExperienceBatch(items, columns,
                           np.array([np.nan if r is None else r for r in rewards], "<f8"),
                           None if reward_present.all() else reward_present,
                           np.array([e.prompt_length for e in exps], "<i8"))


class Tagged(Experience):
    """A subclass of Experience with state of its own: packed from the same C slots."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.tag = "t"


class Duck:
    """Every field of an Experience, but not one: packed by attribute name."""

    def __init__(self, exp, drop=None):
        for name in FIELDS:
            if name != drop:
                setattr(self, name, getattr(exp, name))
        self.eid = types.SimpleNamespace(**exp.eid.to_dict())


class Sub(np.ndarray):
    """An ndarray subclass: converted by as_array's rules, copied by np.concatenate."""


def variant(kind, size, dtype):
    """An array field's value as a workflow might leave it after construction."""
    base = (np.arange(size) % 2 if dtype.kind == "b" else np.arange(size)).astype(dtype)
    return {"kept": base, "list": base.tolist(), "swapped": base.astype(dtype.newbyteorder(">")),
            "strided": np.repeat(base, 2)[::2], "sub": base.view(Sub)}[kind]


VARIANTS = ("kept", "list", "swapped", "strided", "sub")


def build(item, fields, **kw):
    """An Experience ("exp"), a Tagged ("sub") or a Duck ("duck") with ``fields`` set."""
    exp = (Tagged if item == "sub" else Experience)(tokens=[0], **kw)
    for name, value in fields.items():
        setattr(exp, name, value)
    return Duck(exp) if item == "duck" else exp


@pytest.mark.parametrize("kind", VARIANTS)
def test_from_experiences_matches_the_reference_for_each_kind_of_array(kind):
    # Items of each class, dtypes varying per item, each field but tokens absent from some.
    exps = []
    for i, item in enumerate(["exp", "sub", "duck", "exp", "exp", "sub"]):
        fields = {}
        for name in ARRAY_FIELDS:
            if name == "tokens" or (i + len(name)) % 3:
                allowed = FIELD_DTYPES[name][1]
                fields[name] = variant(kind, 2 + i % 3, allowed[i % len(allowed)])
        exps.append(build(item, fields, reward=None if i == 2 else 0.5, prompt_length=i,
                          info={"i": i}))
    batch = ExperienceBatch.from_experiences(exps)
    assert_same_batch(batch, reference_batch(exps))
    assert_same_batch(batch, decode_experiences(encode_experiences(exps)))
    assert_same_batch(batch, ExperienceBatch.from_experiences(iter(exps)))  # any iterable
    assert batch.meta("info")[1] is exps[1].info and len(batch.column("tokens")) == 6


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_from_experiences_matches_the_reference_random(data):
    exps = []
    for i in range(data.draw(st.integers(1, 6), label="n")):
        fields = {}
        for name in ARRAY_FIELDS:
            if name != "tokens" and not data.draw(st.booleans(), label=f"{i}.{name}?"):
                continue
            allowed = FIELD_DTYPES[name][1]
            dtype = allowed[data.draw(st.integers(0, len(allowed) - 1), label=f"{i}.{name}")]
            fields[name] = variant(data.draw(st.sampled_from(VARIANTS), label=f"{i}.{name} kind"),
                                   data.draw(st.integers(0, 4), label=f"{i}.{name} size"), dtype)
        exp = build(data.draw(st.sampled_from(["exp", "sub", "duck"]), label=f"{i} item"), fields,
                    eid=EID(batch="b", task=i))
        exp.reward = data.draw(st.sampled_from([None, 0.5, float("nan"), 2, np.float32(0.1)]),
                               label=f"{i}.reward")
        exp.prompt_length = data.draw(st.sampled_from([i, np.int64(3), True]), label=f"{i}.plen")
        exps.append(exp)
    expected = reference_batch(exps)
    assert_same_batch(ExperienceBatch.from_experiences(exps), expected)
    assert_same_batch(decode_experiences(encode_experiences(exps)), expected)


def test_from_experiences_reads_eids_of_any_class():
    class Later(EID):
        pass

    exps = [Experience(tokens=[1], eid=EID(batch=1, task="t", run=2, step=3, suffix="abcdef")),
            Experience(tokens=[2], eid=Later(batch="b", suffix="x")),
            Experience(tokens=[3])]
    exps[2].eid = types.SimpleNamespace(batch=0, task=1, run=2, step=4, suffix="s")
    assert ExperienceBatch.from_experiences(exps).eids == [
        EID(1, "t", 2, 3, "abcdef"), EID("b", "", 0, 0, "x"), EID(0, 1, 2, 4, "s")]


@pytest.mark.parametrize("item, error, match", [
    (object(), TypeError, r"experience 1 \(object\) has no field 'tokens'; expected an Experience"),
    (Duck(Experience(tokens=[1]), drop="rejected_messages"), TypeError,
     r"experience 1 \(Duck\) has no field 'rejected_messages'"),
    (Duck(Experience(tokens=[1]), drop="reward"), TypeError, r"\(Duck\) has no field 'reward'"),
    (build("sub", {"tokens": np.zeros((1, 2), np.int64)}), ValueError, "tokens must be 1-D"),
    (build("exp", {"logprobs": ["x"]}), ValueError, "logprobs must hold float32 values"),
    (build("exp", {"prompt_length": 2 ** 70}), OverflowError, "too large"),
    (build("exp", {"prompt_length": "x"}), ValueError, "invalid literal"),
    (build("exp", {"reward": "x"}), ValueError, "could not convert"),
])
def test_from_experiences_refuses_bad_items(item, error, match):
    with pytest.raises(error, match=match):
        ExperienceBatch.from_experiences([Experience(tokens=[1, 2]), item])

