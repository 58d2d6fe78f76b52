"""Experience payloads: fastrollout's codecs side by side with Trinity-RFT 0.6.0's.

1024 GRPO-shaped experiences: 256 prompt + 768 response int32 tokens, float32 logprobs,
a reward, small info/metrics and short texts. Run:
    .venv/bin/python -m pytest benchmarks/bench_experience.py --benchmark-only \
        --benchmark-columns=min,median,mean,ops
Payload sizes are printed and stored in each benchmark's extra_info.
"""
import numpy as np
import pytest
import torch

from benchmarks.trinity_ref import trinity_module
from fastrollout import EID, Experience
from fastrollout.compat.trinity import decode_trxp, encode_trxp
from fastrollout.experience import decode_experiences, encode_experiences

T = trinity_module("common/experience.py")
N, PROMPT, RESPONSE = 1024, 256, 768


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
    assert len(benchmark(lambda: decode_experiences(data["frxp"]).to_experiences())) == N


@pytest.mark.benchmark(group="decode own format")
def test_decode_trinity_deserialize_many(benchmark, data):
    benchmark.extra_info["payload_bytes"] = len(data["trxp"])
    assert len(benchmark(T.Experience.deserialize_many, data["trxp"])) == N


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
