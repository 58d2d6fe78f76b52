"""Sinks: one finalized batch of 1024 GRPO-shaped experiences (bench_experience's) into the
durable log and back, beside Trinity-RFT 0.6.0's file buffer. Run:
    .venv/bin/python -m pytest benchmarks/bench_sinks.py --benchmark-only \
        --benchmark-columns=min,median,mean,ops

- durable write: ``DurableLogSink.write`` of the batch as the pipeline hands it over
  (an ExperienceBatch): FRXP encode (views of its columns, no copy), CRC32, ``pwritev`` of
  the pieces, ``fdatasync``.
- durable read: a ``DurableLogReader`` in the same process reads the record back (from the
  page cache), checks its CRC32 and decodes it.
- Trinity: ``FileStorage.write`` (what its ``JSONWriter``, the FILE experience buffer,
  calls) of the same experiences as Trinity Experience objects: one JSON line each,
  flushed, not synced. Its lines hold ``Experience.to_dict()``: no tokens, logprobs or other
  arrays, so a trainer cannot train from them, and Trinity reads no FILE buffer back
  (``FileStorage.read`` raises NotImplementedError). Smaller and weaker, it is still the
  file buffer a Trinity pipeline writes.
"""
import numpy as np
import pytest
import torch

from benchmarks.bench_experience import N, _fields, _per_item, _times_faster
from benchmarks.trinity_ref import trinity_module
from fastrollout import EID, Experience
from fastrollout.experience import ExperienceBatch
from fastrollout.sinks import DurableLogReader, DurableLogSink

# Trinity's FILE storage; its JSON encoder knows the Experience class of the trinity package
# (not bench_experience's copy of the module), so Trinity's experiences are made from that.
FILE = trinity_module("buffer/storage/file.py")
ROUNDS = 20     # each durable write adds ~7.5 MB to the log


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for i in range(N):
        f = _fields(i, rng)
        ours.append(Experience(**f, eid=EID(batch=3, task=i // 8, run=i % 8)))
        theirs.append(FILE.Experience(**{**f, "tokens": torch.from_numpy(f["tokens"]),
                                         "logprobs": torch.from_numpy(f["logprobs"])},
                                      eid=FILE.EID(batch=3, task=i // 8, run=i % 8)))
    return {"batch": ExperienceBatch.from_experiences(ours), "theirs": theirs}


def _throughput(benchmark, nbytes=None):
    _per_item(benchmark, "ns_per_experience", N)
    benchmark.extra_info["experiences_per_s"] = round(N / benchmark.stats.stats.median)
    if nbytes is not None:
        benchmark.extra_info["MB_per_s"] = round(nbytes / benchmark.stats.stats.median / 1e6)


@pytest.mark.benchmark(group="sink write 1024 experiences")
def test_durable_write(benchmark, data, tmp_path):
    with DurableLogSink(tmp_path) as sink:
        benchmark.pedantic(sink.write, args=(3, [data["batch"]]), rounds=ROUNDS,
                           warmup_rounds=1)
        record_bytes = sink.end // (ROUNDS + 1)
    benchmark.extra_info["record_bytes"] = record_bytes
    _throughput(benchmark, record_bytes)


@pytest.mark.benchmark(group="sink write 1024 experiences")
def test_trinity_file_buffer_write(benchmark, data, tmp_path):
    storage = FILE.FileStorage(FILE.StorageConfig(path=str(tmp_path / "buffer.jsonl"),
                                                  wrap_in_ray=False))
    try:
        benchmark.pedantic(storage.write, args=(data["theirs"],), rounds=ROUNDS,
                           warmup_rounds=1)
    finally:
        storage.release()
    benchmark.extra_info["line_bytes"] = (tmp_path / "buffer.jsonl").stat().st_size // (
        N * (ROUNDS + 1))
    _throughput(benchmark)
    _times_faster(benchmark, "test_durable_write")


@pytest.mark.benchmark(group="sink read 1024 experiences")
def test_durable_read(benchmark, data, tmp_path):
    with DurableLogSink(tmp_path) as sink:
        sink.write(3, [data["batch"]])
        record_bytes = sink.end

    def read():
        with DurableLogReader(tmp_path) as reader:
            return [record.batch() for record in reader]
    batches = benchmark(read)
    assert len(batches) == 1 and len(batches[0]) == N
    _throughput(benchmark, record_bytes)
