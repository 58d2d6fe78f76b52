"""Experience pipeline throughput: fastrollout's beside Trinity-RFT 0.6.0's ExperiencePipeline.

One train batch of 1024 GRPO-shaped experiences (bench_experience's: 256 prompt + 768 response
tokens, logprobs), 128 tasks of 8, through group advantages (GRPO), the zero-variance group
filter and the sink, per round. Rewards vary within each task except in every fourth task,
whose rewards are all equal: the filter drops those 256 experiences and 768 reach the sink, on
both sides. Run:
    .venv/bin/python -m pytest benchmarks/bench_pipeline.py --benchmark-only \
        --benchmark-columns=min,median,mean,ops

- fastrollout: ``ExperiencePipeline`` with operators ``grpo``, ``dynamic_filter``: ``stage()``
  of each task's 8 experiences as the coordinator does when a task finishes, then ``commit``
  (pack, GRPO, filter, and the sink). Durable sink: FRXP encode (views of the columns), CRC32,
  ``pwritev`` and ``fdatasync`` of the ~8.0 MB record (768 experiences' tokens, logprobs and
  advantages; GRPO's returns are the advantages column, written once); memory sink (the
  trainer takes the batch in the round): the same without the disk.
- Trinity (``trinity_pipeline.py``): its ExperiencePipeline's ``process_serialized_chunks`` of
  the 128 per-task TRXP payloads its runners send (``Experience.deserialize_many`` of each),
  ``GRPOGroupedAdvantage``, ``RewardSTDFilter`` and its FILE buffer (JSON lines, flushed, not
  synced, without the token arrays). A lower bound on its cost: see that module.

``extra_info`` has experiences per second (in), how many times faster than Trinity's each
of ours is (on Trinity's row), our median ``commit`` time (finalize latency: what the trainer
waits for after the last task) and the minor page faults per round. Ours are sensitive to the
last: a batch's columns are ~10 MB of new arrays, and whether the C allocator hands back
memory it kept from the round before (a few faults) or gets it fresh from the kernel
(~2,500 faults, a few ms on a VM) depends on what the process freed before, not on this code.
"""
import asyncio
import resource
import statistics
import time

import numpy as np
import pytest
import torch

from benchmarks.bench_experience import _MEDIANS, N, _fields, _per_item, _times_faster
from benchmarks.trinity_pipeline import open_trinity_pipeline, trinity_pipeline_modules
from fastrollout import EID, Config, Experience
from fastrollout.pipeline import ExperiencePipeline

T = trinity_pipeline_modules()
REPEAT = 8
ROUNDS = 15     # each durable round adds a ~8.0 MB record to the log
KEPT = N - N // 4


def _reward(i):
    """Mixed rewards in each task (GRPO has work), all 1.0 in every fourth (the filter has)."""
    return 1.0 if (i // REPEAT) % 4 == 3 else float(i % 3 == 0)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for i in range(N):
        f = {**_fields(i, rng), "reward": _reward(i)}
        ours.append(Experience(**f, eid=EID(batch=3, task=i // REPEAT, run=i % REPEAT)))
        theirs.append(T.experience.Experience(
            **{**f, "tokens": torch.from_numpy(f["tokens"]),
               "logprobs": torch.from_numpy(f["logprobs"])},
            eid=T.experience.EID(batch=3, task=i // REPEAT, run=i % REPEAT)))
    tasks = range(0, N, REPEAT)
    return {"ours": [ours[k:k + REPEAT] for k in tasks],
            "trxp": [T.experience.Experience.serialize_many(theirs[k:k + REPEAT])
                     for k in tasks]}


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _throughput(benchmark):
    _per_item(benchmark, "ns_per_experience", N)
    benchmark.extra_info["experiences_per_s"] = round(N / benchmark.stats.stats.median)


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rounds(benchmark, one_batch):
    """``benchmark.pedantic`` of ``one_batch``, recording the page faults per round."""
    before = _faults()
    result = benchmark.pedantic(one_batch, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["page_faults_per_round"] = round((_faults() - before) / (ROUNDS + 1))
    return result


def _fastrollout(benchmark, data, loop, sink, path=None):
    config = Config.from_dict({"pipeline": {
        "operators": [{"type": "grpo"}, {"type": "dynamic_filter"}], "sink": sink,
        "path": None if path is None else str(path)}}).pipeline
    pipeline = ExperiencePipeline(config)
    batch_ids = iter(range(1 << 30))
    commits = []

    def one_batch():
        batch_id = next(batch_ids)
        for task in data["ours"]:
            pipeline.stage(batch_id, task, (0, 0, 0))
        start = time.perf_counter()
        metrics = loop.run_until_complete(pipeline.commit(batch_id))
        commits.append(time.perf_counter() - start)
        if sink == "memory":
            assert len(pipeline.take(batch_id)) == KEPT
        return metrics

    try:
        metrics = _rounds(benchmark, one_batch)
        if sink == "durable":
            benchmark.extra_info["record_bytes"] = pipeline.sink.end // (ROUNDS + 1)
    finally:
        pipeline.close()
    assert metrics["experience_pipeline/dynamic_filter/out_count"] == KEPT
    _throughput(benchmark)
    benchmark.extra_info["commit_ms_median"] = round(statistics.median(commits) * 1e3, 2)


@pytest.mark.benchmark(group="pipeline 1024 experiences")
def test_pipeline_fastrollout_durable(benchmark, data, loop, tmp_path):
    _fastrollout(benchmark, data, loop, "durable", tmp_path / "log")


@pytest.mark.benchmark(group="pipeline 1024 experiences")
def test_pipeline_fastrollout_memory(benchmark, data, loop):
    _fastrollout(benchmark, data, loop, "memory")


@pytest.mark.benchmark(group="pipeline 1024 experiences")
def test_pipeline_trinity_file_buffer(benchmark, data, loop, tmp_path):
    pipeline = loop.run_until_complete(open_trinity_pipeline(tmp_path / "buffer.jsonl"))
    try:
        metrics = _rounds(benchmark, lambda: loop.run_until_complete(
            pipeline.process_serialized_chunks(data["trxp"])))
    finally:
        loop.run_until_complete(pipeline.close())
    assert metrics["experience_pipeline/experience_count"] == KEPT
    _throughput(benchmark)
    _times_faster(benchmark, "test_pipeline_fastrollout_durable")    # the figure
    memory = _MEDIANS.get("test_pipeline_fastrollout_memory")
    if memory:
        benchmark.extra_info["fastrollout_memory_sink_x_faster"] = round(
            benchmark.stats.stats.median / memory, 1)
