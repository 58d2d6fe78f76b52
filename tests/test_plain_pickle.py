"""The plain-data pickle loader behind ``decode_trxp`` (native/plain_pickle.pyx).

Plain data round-trips as ``pickle.loads`` reads it; everything else, and everything
unbounded (nesting, shared references, keys built to collide, cycles), is refused with
``UnsafePickleError`` after work proportional to the pickle. The bounds match the FRXP
header scan's (native/plain_msgpack.pyx), checked here on the same data in both formats.

Also ``decode_isolated``, which the other payload tests share.
"""
import math
import pickle
import struct
import subprocess
import sys
import tracemalloc

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.bench_payload_guard import colliding_pairs, keys_pickle
from fastrollout import PayloadError, UnsafePickleError
from fastrollout._native.plain_msgpack import check_plain
from fastrollout._native.plain_pickle import MAX_DEPTH, MAX_KEY_COST, load_plain
from fuzzing import mutated

BIG = 2**62  # a budget no test data reaches

# ---------------------------------------------------------------- shared helpers

_ISOLATED = """\
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from fastrollout.experience import decode_any
try:
    decode_any(sys.stdin.buffer.read(), index=0)
except Exception as exc:
    print(type(exc).__name__, exc)
else:
    print("ok")
"""


def decode_isolated(payload: bytes, timeout: float = 60) -> str:
    """``decode_any(payload)`` in a fresh interpreter with 2 GiB of address space: what it
    printed ("ok", or the error's class and message), or how the process ended. For payloads
    that crashed the process, or held it for many seconds, before the decoders were bounded."""
    try:
        proc = subprocess.run([sys.executable, "-c", _ISOLATED], input=payload,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"still running after {timeout} s"
    if proc.returncode:
        return f"exit status {proc.returncode}: {proc.stderr.decode()[-300:]}"
    return proc.stdout.decode().strip()


def test_colliding_pairs_collide():
    pairs = colliding_pairs(50)
    assert len(set(pairs)) == 50 and len({hash(p) for p in pairs}) == 1
    assert all(0 <= a < 2**61 and 0 <= b < 2**61 for a, b in pairs)


# ---------------------------------------------------------------- plain data round-trips

_ints = st.integers(-2**63, 2**64 - 1)
_json_scalars = (st.none() | st.booleans() | _ints | st.floats(allow_nan=False)
                 | st.text(max_size=20))
_keys = st.text(max_size=8) | _ints | st.tuples(_ints, st.text(max_size=8))


def _tree(scalars, *, sets=False):
    def containers(kids):
        out = (st.lists(kids, max_size=4) | st.lists(kids, max_size=4).map(tuple)
               | st.dictionaries(st.text(max_size=8), kids, max_size=4)
               | st.dictionaries(_keys, kids, max_size=3))
        if sets:
            out |= st.frozensets(scalars, max_size=3) | st.sets(scalars, max_size=3)
        return out
    return st.recursive(scalars, containers, max_leaves=25)


JSON_LIKE = _tree(_json_scalars)     # what every protocol writes without a global
PLAIN = _tree(_json_scalars | st.binary(max_size=20), sets=True)


def _typed(value):
    """``value`` with every container's type spelled out, to compare types too."""
    if isinstance(value, dict):
        return ("dict", [(_typed(k), _typed(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, sorted(map(repr, value)))
    return (type(value).__name__, value)


@settings(max_examples=150, deadline=None)
@given(value=JSON_LIKE, protocol=st.sampled_from([2, 3, 4, 5]))
def test_reads_every_protocol_as_pickle_does(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    assert _typed(load_plain(data, BIG)) == _typed(pickle.loads(data)) == _typed(value)


@settings(max_examples=150, deadline=None)
@given(value=PLAIN, protocol=st.sampled_from([4, 5]))
def test_reads_bytes_sets_and_frozensets(value, protocol):
    data = pickle.dumps(value, protocol=protocol)
    assert _typed(load_plain(data, BIG)) == _typed(value)


def test_keeps_shared_references_and_nan():
    shared = [1, "two"]
    value = {"a": shared, "b": (shared, shared), "nan": math.nan}
    loaded = load_plain(pickle.dumps(value, protocol=5), BIG)
    assert loaded["a"] is loaded["b"][0] is loaded["b"][1] and loaded["a"] == shared
    assert math.isnan(loaded["nan"])


@pytest.mark.parametrize("value", [0, 255, 65535, 2**31 - 1, -2**31, 2**31, 2**63 - 1,
                                   -2**63, 2**63, 2**64 - 1])
def test_reads_the_64_bit_integer_range(value):
    assert load_plain(pickle.dumps(value, protocol=5), BIG) == value


@pytest.mark.parametrize("data", [
    pickle.dumps(2**64), pickle.dumps(-2**63 - 1), pickle.dumps(2**1000),
    b"\x8a\x0a" + bytes(10) + b".", b"\x8b\x0a\0\0\0" + bytes(10) + b".",
    b"\x8a\x09" + bytes(8) + b"\x01.",
])
def test_refuses_integers_outside_64_bits(data):
    with pytest.raises(UnsafePickleError, match="integer outside the 64-bit range at byte"):
        load_plain(data, BIG)


def test_reads_long_forms_of_small_integers():
    # LONG1 of 9 bytes for a negative int64, and of 0 bytes for 0: legal, if not minimal.
    assert load_plain(b"\x8a\x09" + struct.pack("<q", -5) + b"\xff.", BIG) == -5
    assert load_plain(b"\x8a\x00.", BIG) == 0


# ---------------------------------------------------------------- refusals

class Boom:
    def __reduce__(self):
        return (print, ("executed!",))


@pytest.mark.parametrize("data, match", [
    (pickle.dumps(Boom(), protocol=5), "STACK_GLOBAL"),
    (pickle.dumps(Boom(), protocol=2), "GLOBAL"),
    (pickle.dumps(Boom(), protocol=0), "GLOBAL"),
    (pickle.dumps(bytearray(b"x"), protocol=5), "BYTEARRAY8"),
    (pickle.dumps(b"x", protocol=2), "GLOBAL"),                # bytes via _codecs.encode
    (b"\x80\x05N\x85R.", "REDUCE"),
    (b"\x80\x05}Nb.", "BUILD"),
    (b"\x80\x05K\x01Q.", "BINPERSID"),
    (b"\x80\x05\x82\x01.", "EXT1"),
    (b"\x80\x05\x97.", "NEXT_BUFFER"),
    (b"\x80\x05\xff.", "0xff"),
])
def test_refuses_every_opcode_beyond_plain_data(data, match, capsys):
    with pytest.raises(UnsafePickleError, match=f"pickle opcode {match}.* is not allowed"):
        load_plain(data, BIG)
    assert "executed" not in capsys.readouterr().out


@pytest.mark.parametrize("data, match", [
    (b"", r"truncated \(no STOP opcode\)"),
    (b"\x80\x05}\x94", r"truncated \(no STOP opcode\)"),
    (b"\x80\x05X\xff\xff\xff\x00abc.", "BINUNICODE claims 16777215 bytes, 4 remain at byte 2"),
    (b"\x80\x05\x8d\xff\xff\xff\xff\xff\xff\xff\xff.", "BINUNICODE8 claims"),
    (b"\x80\x05J\x01\x00", "truncated inside BININT at byte 2"),
    (b"\x80\x05N.junk", "4 bytes follow the STOP opcode at byte 3"),
    (b"\x80\x06N.", "unsupported pickle protocol 6"),
    (b"NN.", "STOP leaves 2 values"),
    (b"(N.", "STOP leaves 1 values and 1 marks"),
    (b".", "STOP leaves 0 values"),
    (b"a", "stack underflow"),
    (b"(e.", "stack underflow"),                               # nothing below the mark
    (b"N(e.", "not a list"),
    (b"(1.", "STOP leaves 0 values"),
    (b"1", "no MARK to pop"),
    (b"]N(u.", "not a dict"),
    (b"}(NNNu.", "a key without a value"),
    (b"\x80\x05\x8c\x02\xed\xa0.", "string is not UTF-8 at byte 2"),
    (pickle.dumps("\ud800", protocol=5), "string is not UTF-8"),  # a lone surrogate
    (b"\x80\x05r\xff\xff\xff\x7fN.", "memo index 2147483647 skips past the 0 memoized"),
    (b"\x80\x05N\x94h\x01.", "memo index 1 is not set"),
    (b"\x80\x05\x95\xff\x00\x00\x00\x00\x00\x00\x00N.", "FRAME runs past the end"),
    (b"\x80\x05}(]Nu.", r"unhashable dict key or set element \(list\)"),
    (b"\x80\x05}(]\x85Nu.", r"unhashable dict key or set element \(tuple\)"),
    (b"\x80\x05\x8f(}\x90.", r"unhashable dict key or set element \(dict\)"),
])
def test_refuses_malformed_pickles(data, match):
    with pytest.raises(UnsafePickleError, match=match):
        load_plain(data, BIG)


def test_every_truncation_is_refused():
    data = pickle.dumps({"items": [{"eid": {"run": 1}, "text": "x" * 40, "f": 0.5,
                                    "t": (1, 2**40), "s": {b"k"}}] * 3}, protocol=5)
    load_plain(data, BIG)
    for cut in range(len(data)):
        with pytest.raises(UnsafePickleError):
            load_plain(data[:cut], BIG)


# ---------------------------------------------------------------- the bounds

def _nested(depth: int, inner=None):
    value = inner
    for _ in range(depth):
        value = [value]
    return value


def test_nesting_is_bounded_while_loading():
    assert load_plain(pickle.dumps(_nested(MAX_DEPTH)), BIG) == _nested(MAX_DEPTH)
    with pytest.raises(UnsafePickleError, match=f"nested deeper than {MAX_DEPTH} levels"):
        load_plain(pickle.dumps(_nested(MAX_DEPTH + 1)), BIG)
    # An empty container is a level too (as in msgpack).
    with pytest.raises(UnsafePickleError, match="nested deeper"):
        load_plain(pickle.dumps(_nested(MAX_DEPTH, [])), BIG)


def test_a_deep_tuple_key_is_refused_before_it_is_hashed():
    # Issue 11, failure 1, as the bare pickle: 200,000 TUPLE1 around EMPTY_TUPLE, used as a
    # dict key. Hashing it recursed past the C stack; now the chain stops at MAX_DEPTH.
    data = b"\x80\x04}(" + b")" + b"\x85" * 200_000 + b"Nu."
    with pytest.raises(UnsafePickleError, match=f"nested deeper than {MAX_DEPTH} levels at "
                                                f"byte {4 + MAX_DEPTH}"):
        load_plain(data, BIG)


@pytest.mark.parametrize("element, cost", [
    (7, 1), ("x" * 80, 1 + 10), ((1, 2), 3), ([1, [2, 3]], 1 + 1 + 3),
    ({"k": b"1234567890"}, 1 + 1 + 2),
])
def test_shared_references_are_charged_each_time(element, cost):
    # Cost: 1 per value (containers included) plus 1 per 8 bytes of str or bytes.
    value = [element] * 50
    data = pickle.dumps(value, protocol=5)
    assert load_plain(data, 1 + 50 * cost) == value
    with pytest.raises(UnsafePickleError, match=f"expand the data past a cost of {50 * cost}"):
        load_plain(data, 50 * cost)


def test_shared_reference_blowup_is_refused_as_it_goes():
    # Issue 11, failure 2, at its real size: one list of 1,000 ints referenced 1,000,000
    # times. The old check expanded every reference (MemoryError after 8.5 s, 3.7 GB).
    data = pickle.dumps([list(range(1000))] * 1_000_000, protocol=5)
    with pytest.raises(UnsafePickleError, match="expand the data past"):
        load_plain(data, 8 * len(data))


def test_cycles_are_refused():
    looped = []
    looped.append(looped)
    dict_list = {"a": []}
    dict_list["a"].append(dict_list)
    tuple_list = ([],)
    tuple_list[0].append(tuple_list)
    for value in (looped, dict_list, tuple_list):
        with pytest.raises(UnsafePickleError, match="cycle"):
            load_plain(pickle.dumps(value, protocol=5), BIG)


@pytest.mark.parametrize("keys, cost", [
    (list(range(MAX_KEY_COST)), 1),
    ([float(i) for i in range(MAX_KEY_COST)], 1),
    ([None, True, False, 0.5, *range(2, MAX_KEY_COST - 2)], 1),
    ([(i, i) for i in range(MAX_KEY_COST // 3)], 3),
    ([b"x" * (8 * (MAX_KEY_COST - 1) + 7)], MAX_KEY_COST),
    ([("s" * 16, i) for i in range(MAX_KEY_COST // 5)], 5),
])
def test_keys_other_than_str_are_bounded_per_container(keys, cost):
    assert len(keys) * cost <= MAX_KEY_COST < (len(keys) + 1) * cost
    value = dict.fromkeys(keys, 1)
    assert load_plain(pickle.dumps(value, protocol=5), BIG) == value
    extra = b"x" * (8 * MAX_KEY_COST) if cost == MAX_KEY_COST else \
        -1.5 if cost == 1 else (-1, -1) if cost == 3 else ("s" * 16, -1)
    with pytest.raises(UnsafePickleError, match="keys other than str costing over"):
        load_plain(pickle.dumps({**value, extra: 1}, protocol=5), BIG)
    with pytest.raises(UnsafePickleError, match="keys other than str costing over"):
        load_plain(pickle.dumps({*keys, extra}, protocol=5), BIG)


def test_a_nested_tuple_key_costs_a_level_each():
    key = b")" + b"\x85" * (MAX_KEY_COST - 1)   # MAX_KEY_COST tuples, one in another
    assert len(load_plain(b"\x80\x04}(" + key + b"Nu.", BIG)) == 1
    with pytest.raises(UnsafePickleError, match="keys other than str costing over"):
        load_plain(b"\x80\x04}(" + key + b"\x85Nu.", BIG)


def test_str_keys_and_many_small_dicts_are_not_bounded():
    value = {"many": {f"k{i}": i for i in range(20_000)},
             "dicts": [dict.fromkeys(range(MAX_KEY_COST), i) for i in range(100)]}
    assert load_plain(pickle.dumps(value, protocol=5), BIG) == value


def test_colliding_tuple_keys_are_refused():
    data = b"\x80\x02" + keys_pickle(colliding_pairs(MAX_KEY_COST // 3 + 1)) + b"."
    with pytest.raises(UnsafePickleError, match="their hashes could be made to collide"):
        load_plain(data, BIG)


def test_a_container_cannot_change_once_placed():
    # EMPTY_LIST, MEMOIZE, POP; EMPTY_LIST holding it; then append to the memoized list.
    data = b"\x80\x04]\x940](h\x00e\x94h\x00K\x01a0."
    with pytest.raises(UnsafePickleError, match="changes after being placed in another"):
        load_plain(data, BIG)


def test_memo_may_be_overwritten_in_sequence():
    # BINPUT 0, BINPUT 1, then BINPUT 0 again (overwrite), as CPython allows.
    data = b"\x80\x02K\x01q\x000K\x02q\x010K\x03q\x000(h\x00h\x01t."
    assert load_plain(data, BIG) == (3, 2)


def test_refusals_release_what_was_built():
    data = pickle.dumps(["x" * 10_000, list(range(100))] * 3, protocol=5)[:-2] + b"\x93."
    for _ in range(10):  # warm up
        with pytest.raises(UnsafePickleError):
            load_plain(data, BIG)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):
            with pytest.raises(UnsafePickleError):
                load_plain(data, BIG)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000  # one leaked copy of the string per call would be 2 MB


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_pickles_load_as_pickle_does_or_are_refused(data):
    value = {"items": [{"eid": {"batch": 1, "run": 2}, "info": {"k": [1, 2.5, None]},
                        "t": ("a", b"b", 2**40), "s": frozenset({1})}] * 2, "n": -7}
    blob = mutated(data, pickle.dumps(value, protocol=data.draw(st.sampled_from([2, 4, 5]))))
    try:
        loaded = load_plain(blob, BIG)
    except UnsafePickleError:
        return
    assert repr(loaded) == repr(pickle.loads(blob))


# ---------------------------------------------------------------- same bounds as FRXP's scan

def _outcome(load, data):
    try:
        load(data)
    except (UnsafePickleError, PayloadError) as exc:
        text = str(exc)
        for reason in ("nested deeper", "keys other than str", "hashable"):
            if reason in text:
                return reason
        raise
    return "ok"


@st.composite
def _bounded(draw):
    """Data near the bounds: a chain of containers about MAX_DEPTH deep around a dict whose
    keys other than str cost about MAX_KEY_COST."""
    kind = st.sampled_from(["int", "float", "none", "bytes", "pair", "text pair", "str"])
    keys = {}
    for i in range(draw(st.integers(0, MAX_KEY_COST + 2))):
        k = draw(kind)
        keys[{"int": i, "float": i + 0.5, "none": None, "bytes": b"b" * (i % 20),
              "pair": (i, -i), "text pair": ("t" * (i % 20), i), "str": f"s{i}"}[k]] = i
    value = keys
    for _ in range(draw(st.integers(0, 3) | st.integers(MAX_DEPTH - 3, MAX_DEPTH))):
        value = draw(st.sampled_from([lambda v: [v], lambda v: {"k": v}, lambda v: (v, 1)]))(
            value)
    return value


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_bounded())
def test_accepts_and_refuses_as_the_msgpack_scan_does(value):
    # A TRXP batch is re-encoded as FRXP: what one format accepts the other must accept.
    # (Which bound a value breaks first may differ: the loader builds bottom-up, the scan
    # reads top-down.)
    pickled = _outcome(lambda d: load_plain(d, BIG), pickle.dumps(value, protocol=5))
    scanned = _outcome(check_plain, msgspec.msgpack.encode(value))
    assert (pickled == "ok") == (scanned == "ok"), (pickled, scanned)
