"""Hostile experience metadata: refused, or read in time proportional to its size.

Issue 11's attacks at their reported sizes (each crashed the process or held it for
seconds before the decoders were bounded), and the worst metadata the bounds still accept:
maps whose keys all collide in one hash slot, up to the key-cost cap, about 1 MB of them in
either format. Also the pickle loader on Trinity's own metadata beside ``pickle.loads``.
Run:
    .venv/bin/python -m pytest benchmarks/bench_payload_guard.py --benchmark-only \
        --benchmark-columns=min,median,mean
The payload builders here are shared with the tests (test_codec.py, test_trinity_compat.py).
"""
import pickle
import struct

import msgspec
import pytest
import torch

from benchmarks.trinity_ref import trinity_module
from fastrollout import Experience, PayloadError
from fastrollout._native.plain_pickle import MAX_KEY_COST, load_plain
from fastrollout.compat.trinity import encode_trxp
from fastrollout.experience import decode_any, encode_experiences

_M64 = 2**64 - 1
_P1, _P2, _P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def colliding_pairs(count: int) -> list[tuple[int, int]]:
    """``count`` distinct (a, b) tuples of non-negative ints below 2**61 that share one
    hash under CPython's tuple hash (xxHash-based since 3.8; an int below 2**61 - 1 hashes
    to itself): for each ``a``, solve the last round for the ``b`` that lands on the hash of
    ``(1, 1)``, keeping the ``a`` whose ``b`` is small enough."""
    def after_a(a):
        return _rotl((_P5 + a * _P2) & _M64, 31) * _P1 & _M64

    target = _rotl((after_a(1) + _P2) & _M64, 31) * _P1 & _M64
    before = _rotl(target * pow(_P1, -1, 2**64) & _M64, 33)  # undo the last round's tail
    p2_inverse = pow(_P2, -1, 2**64)
    out, a = [], 1
    while len(out) < count:
        b = (before - after_a(a)) * p2_inverse & _M64
        if b < 2**61 - 1:
            out.append((a, b))
        a += 1
    return out


def keys_pickle(keys) -> bytes:
    """Pickle opcodes of a dict mapping each of ``keys`` to None, written without building
    it (building it is what an attack makes slow)."""
    return b"}(" + b"".join(pickle.dumps(k, protocol=2)[2:-1] + b"N" for k in keys) + b"u"


def _text(value: str) -> bytes:
    return b"\x8c" + bytes([len(value)]) + value.encode()


def trxp_with_info(info: bytes) -> bytes:
    """A TRXP payload of one experience whose ``info`` is the pickle opcodes ``info``. The
    meta pickle is written by hand (huge or deep values cannot go through pickle.dumps) and
    without the memo, so that ``info`` may use it from index 0."""
    eid = (b"}(" + _text("batch") + _text("") + _text("task") + _text("") + _text("run")
           + b"K\x00" + _text("step") + b"K\x00" + _text("suffix") + _text("") + b"u")
    item = b"}(" + _text("eid") + eid + _text("info") + info + b"u"
    meta = (b"\x80\x04}(" + _text("version") + b"K\x01" + _text("num_items") + b"K\x01"
            + _text("items") + b"](" + item + b"eu.")
    plain = encode_trxp([Experience(tokens=[1, 2])])
    tensors = plain[21 + struct.unpack_from("<Q", plain, 5)[0]:]
    return b"TRXP\x01" + struct.pack("<QQ", len(meta), len(tensors)) + meta + tensors


def frxp_with_info(info: bytes) -> bytes:
    """An FRXP payload of one experience whose ``info`` is the msgpack bytes ``info``."""
    payload = encode_experiences([Experience(tokens=[1, 2], info={"x": 0})])
    hlen = struct.unpack_from("<Q", payload, 8)[0]
    header = msgspec.msgpack.decode(payload[16:16 + hlen])
    header[2][0][1] = msgspec.Raw(info)
    new = msgspec.msgpack.encode(header)
    body = payload[16 + hlen + (-(16 + hlen) % 8):]
    return (payload[:8] + struct.pack("<Q", len(new)) + new + b"\0" * (-(16 + len(new)) % 8)
            + body)


def _refused(payload: bytes) -> str:
    try:
        decode_any(payload, index=0)
    except PayloadError as exc:
        return str(exc)
    raise AssertionError("accepted")


HOSTILE = {
    "deep tuple key (failure 1)": lambda: trxp_with_info(b"}()" + b"\x85" * 200_000 + b"Nu"),
    "1M shared refs (failure 2)": lambda: trxp_with_info(
        pickle.dumps({"x": [list(range(1000))] * 1_000_000}, protocol=2)[2:-1]),
    "20k int keys (failure 3)": lambda: trxp_with_info(
        keys_pickle(k * (2**61 - 1) for k in range(1, 20_001))),
    "20k tuple keys, TRXP": lambda: trxp_with_info(keys_pickle(colliding_pairs(20_000))),
    "20k tuple keys, FRXP (failure 3)": lambda: frxp_with_info(
        b"\xdf" + struct.pack(">I", 20_000) + b"".join(
            b"\x92" + msgspec.msgpack.encode(a) + msgspec.msgpack.encode(b) + b"\xc0"
            for a, b in colliding_pairs(20_000))),
}


@pytest.mark.benchmark(group="refuse issue 11's payloads")
@pytest.mark.parametrize("name", HOSTILE)
def test_refuse(benchmark, name):
    payload = HOSTILE[name]()
    benchmark.extra_info["payload_bytes"] = len(payload)
    assert benchmark(_refused, payload).startswith("payload 0: ")


@pytest.fixture(scope="module")
def worst_info():
    """About 1 MB of maps whose keys other than str all share one hash, each map as
    costly as the cap allows: the slowest metadata per byte that is still accepted."""
    keys = colliding_pairs(MAX_KEY_COST // 3)  # a pair costs 3
    return {"maps": [dict.fromkeys(keys) for _ in range(12_000)]}


@pytest.mark.benchmark(group="worst accepted metadata")
@pytest.mark.parametrize("encode", [encode_trxp, encode_experiences], ids=["TRXP", "FRXP"])
def test_worst_accepted(benchmark, worst_info, encode):
    payload = encode([Experience(tokens=[1, 2], info=worst_info)])
    batch = benchmark(decode_any, payload)
    assert len(batch[0].info["maps"]) == len(worst_info["maps"])
    benchmark.extra_info["payload_bytes"] = len(payload)
    benchmark.extra_info["us_per_kb"] = round(benchmark.stats.stats.min * 1e9 / len(payload), 2)


@pytest.fixture(scope="module")
def trinity_meta():
    """The metadata pickle of Trinity's payload of 1024 GRPO experiences, with the metadata
    of bench_experience.py's (the tensors do not matter here)."""
    T = trinity_module("common/experience.py")
    exps = [T.Experience(tokens=torch.arange(8, dtype=torch.int32), prompt_length=4,
                         logprobs=torch.zeros(4), reward=float(i % 2),
                         info={"model_version": 3, "task_index": i // 8, "use_count": 0},
                         metrics={"accuracy": float(i % 2), "response_length": 768.0},
                         response_text="The answer is 42. " * 3,
                         prompt_text="What is 6 * 7? " * 2,
                         eid=T.EID(batch=3, task=i // 8, run=i % 8)) for i in range(1024)]
    payload = T.Experience.serialize_many(exps)
    return payload[21:21 + struct.unpack_from("<Q", payload, 5)[0]]


@pytest.mark.benchmark(group="load Trinity's metadata pickle")
def test_load_plain(benchmark, trinity_meta):
    benchmark.extra_info["pickle_bytes"] = len(trinity_meta)
    assert benchmark(load_plain, trinity_meta, 8 * len(trinity_meta)) == \
        pickle.loads(trinity_meta)


@pytest.mark.benchmark(group="load Trinity's metadata pickle")
def test_pickle_loads(benchmark, trinity_meta):
    benchmark(pickle.loads, trinity_meta)  # trusting it: no check at all
