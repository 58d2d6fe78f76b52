"""Experience payloads: fastrollout's codecs side by side with Trinity-RFT 0.6.0's.

1024 GRPO-shaped experiences: 256 prompt + 768 response int32 tokens, float32 logprobs,
a reward, small info/metrics and short texts. Run:
    .venv/bin/python -m pytest benchmarks/bench_experience.py --benchmark-only \
        --benchmark-columns=min,median,mean,ops
Payload sizes are printed and stored in each benchmark's extra_info, with the derived
figures: time per item, and how many times faster than Trinity's own code.
"""
import numpy as np
import pytest
import torch

from benchmarks.trinity_ref import trinity_module
from fastrollout import EID, Experience
from fastrollout.compat.trinity import decode_trxp, encode_trxp
from fastrollout.experience import ExperienceBatch, decode_experiences, encode_experiences

T = trinity_module("common/experience.py")
N, PROMPT, RESPONSE = 1024, 256, 768
_MEDIANS: dict[str, float] = {}    # seconds, by benchmark, for the figures derived across them


def _per_item(benchmark, key, items):
    """Record this benchmark's median per item, in ns, under ``key``."""
    median = benchmark.stats.stats.median
    _MEDIANS[benchmark.name] = median
    benchmark.extra_info[key] = round(median / items * 1e9, 1)


def _times_faster(benchmark, ours):
    """Record how many times faster than this (Trinity's) benchmark ``ours``, run before, is."""
    if ours in _MEDIANS:
        benchmark.extra_info["fastrollout_x_faster"] = round(
            benchmark.stats.stats.median / _MEDIANS[ours], 1)


def _fields(i, rng):
    return dict(tokens=rng.integers(0, 150_000, PROMPT + RESPONSE).astype(np.int32),
                prompt_length=PROMPT, logprobs=-rng.random(RESPONSE).astype(np.float32),
                reward=float(i % 2), info={"model_version": 3, "task_index": i // 8,
                                           "use_count": 0},
                metrics={"accuracy": float(i % 2), "response_length": float(RESPONSE)},
                response_text="The answer is 42. " * 3, prompt_text="What is 6 * 7? " * 2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for i in range(N):
        f = _fields(i, rng)
        ours.append(Experience(**f, eid=EID(batch=3, task=i // 8, run=i % 8)))
        theirs.append(T.Experience(**{**f, "tokens": torch.from_numpy(f["tokens"]),
                                      "logprobs": torch.from_numpy(f["logprobs"])},
                                   eid=T.EID(batch=3, task=i // 8, run=i % 8)))
    frxp, trxp = encode_experiences(ours), T.Experience.serialize_many(theirs)
    print(f"\npayload bytes: FRXP {len(frxp):,}  TRXP {len(trxp):,}  "
          f"encode_trxp {len(encode_trxp(ours)):,}")
    return {"ours": ours, "theirs": theirs, "frxp": frxp, "trxp": trxp}


@pytest.mark.benchmark(group="decode own format")
def test_decode_fastrollout(benchmark, data):
    benchmark.extra_info["payload_bytes"] = len(data["frxp"])
    assert len(benchmark(decode_experiences, data["frxp"])) == N


@pytest.mark.benchmark(group="decode own format")
def test_decode_fastrollout_to_experiences(benchmark, data):
    # Payload to one Experience per item: what Trinity's deserialize_many gives.
    assert len(benchmark(lambda: decode_experiences(data["frxp"]).to_experiences())) == N
    _per_item(benchmark, "ns_per_item", N)


@pytest.mark.benchmark(group="decode own format")
def test_to_experiences(benchmark, data):
    # The decoded batch's items as Experience objects (array fields are views).
    batch = decode_experiences(data["frxp"])
    assert len(benchmark(batch.to_experiences)) == N
    _per_item(benchmark, "ns_per_item", N)


@pytest.mark.benchmark(group="decode own format")
def test_decode_trinity_deserialize_many(benchmark, data):
    benchmark.extra_info["payload_bytes"] = len(data["trxp"])
    assert len(benchmark(T.Experience.deserialize_many, data["trxp"])) == N
    _per_item(benchmark, "ns_per_item", N)
    _times_faster(benchmark, "test_decode_fastrollout_to_experiences")


@pytest.mark.benchmark(group="decode TRXP")
def test_decode_trxp_fastrollout(benchmark, data):
    assert len(benchmark(decode_trxp, data["trxp"])) == N


@pytest.mark.benchmark(group="decode TRXP")
def test_decode_trxp_trinity(benchmark, data):
    assert len(benchmark(T.Experience.deserialize_many, data["trxp"])) == N


@pytest.mark.benchmark(group="encode")
def test_encode_fastrollout(benchmark, data):
    benchmark.extra_info["payload_bytes"] = len(data["frxp"])
    benchmark(encode_experiences, data["ours"])


@pytest.mark.benchmark(group="encode")
def test_encode_trxp_fastrollout(benchmark, data):
    benchmark(encode_trxp, data["ours"])


@pytest.mark.benchmark(group="encode")
def test_encode_trinity_serialize_many(benchmark, data):
    benchmark.extra_info["payload_bytes"] = len(data["trxp"])
    benchmark(T.Experience.serialize_many, data["theirs"])


# ---------------------------------------------------------------- pipeline packing
# What the pipeline does every CHUNK staged experiences: 256 small experiences (8 int32
# tokens, prompt_length 4, reward 1.0) into one columnar ExperienceBatch.
PACK = 256


@pytest.fixture(scope="module")
def small():
    return [Experience(tokens=np.arange(8, dtype=np.int32), prompt_length=4, reward=1.0,
                       eid=EID(batch=3, task=i // 8, run=i % 8)) for i in range(PACK)]


@pytest.mark.benchmark(group="pack 256 experiences")
def test_pack_encode_decode_round_trip(benchmark, small):
    assert len(benchmark(lambda: decode_experiences(encode_experiences(small)))) == PACK


@pytest.mark.benchmark(group="pack 256 experiences")
def test_pack_from_experiences(benchmark, small):
    assert len(benchmark(ExperienceBatch.from_experiences, small)) == PACK


# ---------------------------------------------------------------- construction
# What a workflow does per sampled response (the coordinator benchmark builds 8 per task):
# 8 tokens, prompt_length 4, reward 1.0, a fresh EID; the tokens an int32 array (tensor for
# Trinity) kept without copy, or, with 4 logprobs, Python lists, as a workflow that builds
# them from an engine's output has them. A keyword call as workflows write it
# (benchmark(Experience, **kw) would time the ** unpacking), with 1000 calls per round so the
# timer's own cost does not swamp a sub-microsecond call.
def _construct(benchmark, make):
    exp = benchmark.pedantic(make, rounds=200, iterations=1000, warmup_rounds=5)
    _per_item(benchmark, "ns_per_experience", 1)
    return exp


def _from_lists(cls):
    tokens, logprobs = [11, 12, 13, 14, 15, 16, 17, 18], [-0.5, -0.25, -1.0, -2.0]
    return lambda: cls(tokens=tokens, prompt_length=4, reward=1.0, logprobs=logprobs)


@pytest.mark.benchmark(group="construct one experience")
def test_experience_construct(benchmark):
    tokens = np.arange(8, dtype=np.int32)
    exp = _construct(benchmark, lambda: Experience(tokens=tokens, prompt_length=4, reward=1.0))
    assert exp.tokens is tokens and len(exp.eid.suffix) == 6


@pytest.mark.benchmark(group="construct one experience")
def test_experience_construct_lists(benchmark):
    exp = _construct(benchmark, _from_lists(Experience))
    assert exp.tokens.dtype == np.int32 and exp.logprobs.dtype == np.float32


@pytest.mark.benchmark(group="construct one experience")
def test_experience_construct_trinity(benchmark):
    tokens = torch.arange(8, dtype=torch.int32)
    exp = _construct(benchmark, lambda: T.Experience(tokens=tokens, prompt_length=4, reward=1.0))
    assert exp.reward == 1.0
    _times_faster(benchmark, "test_experience_construct")


@pytest.mark.benchmark(group="construct one experience")
def test_experience_construct_lists_trinity(benchmark):
    assert _construct(benchmark, _from_lists(T.Experience)).tokens.dtype == torch.int32
    _times_faster(benchmark, "test_experience_construct_lists")
