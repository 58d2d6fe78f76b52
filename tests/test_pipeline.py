"""ExperiencePipeline: staging, packing, the sinks it hands batches to (memory and its bound,
stream, durable, discard), and what stays staged when a sink refuses."""
import asyncio

import numpy as np
import pytest

from fastrollout import EID, Config, ConfigError, Experience, FastRolloutError
from fastrollout.errors import PipelineFullError
from fastrollout.pipeline import CHUNK, ExperiencePipeline


def exps(n, start=0):
    return [Experience(tokens=np.arange(4, dtype=np.int32) + i, prompt_length=2, reward=float(i))
            for i in range(start, start + n)]


def pipeline(**cfg):
    return ExperiencePipeline(Config.from_dict({"pipeline": cfg}).pipeline)


async def test_staged_experiences_come_out_in_order_across_chunks():
    p = pipeline()
    staged = 0
    while staged < CHUNK + 20:                    # one packed chunk and a remainder
        p.stage(7, exps(10, staged))
        staged += 10
    assert (await p.commit(7))["experience_pipeline/experience_count"] == staged
    batch = p.take(7)
    assert len(batch) == staged
    assert [e.reward for e in batch.to_experiences()] == [float(i) for i in range(len(batch))]
    assert p.take(7) is None


async def test_operators_see_every_staged_experience_in_order():
    p = pipeline(operators=[{"type": "grpo", "norm_std": False}])
    staged = 0
    while staged < CHUNK + 20:                    # more than a chunk, packed at commit
        task = exps(10, staged)
        for run, exp in enumerate(task):
            exp.eid = EID(batch=7, task=staged // 10, run=run)
        p.stage(7, task)
        staged += 10
    await p.commit(7)
    batch = p.take(7)
    assert [e.reward for e in batch.to_experiences()] == [float(i) for i in range(staged)]
    for i, exp in enumerate(batch):     # tasks of 10 consecutive rewards: 4.5 above the first
        assert exp.advantages.tolist() == [i % 10 - 4.5] * 2


async def test_discarded_batches_leave_nothing():
    p = pipeline()
    p.stage(1, exps(3))
    p.discard(1)
    assert (await p.commit(1))["experience_pipeline/experience_count"] == 0.0
    assert p.take(1) is None


async def test_memory_sink_bound_refuses_and_keeps_everything():
    p = pipeline(max_buffered_experiences=5)
    p.stage(1, exps(4))
    await p.commit(1)
    p.stage(2, exps(3))
    with pytest.raises(PipelineFullError, match="max_buffered_experiences=5"):
        await p.commit(2)
    assert len(p.take(1)) == 4                    # drained: now batch 2 fits
    await p.commit(2)
    assert len(p.take(2)) == 3


async def test_discard_sink_counts_without_keeping():
    p = pipeline(sink="discard")
    p.stage(1, exps(3))
    assert (await p.commit(1))["experience_pipeline/experience_count"] == 3.0
    with pytest.raises(RuntimeError, match=r"pipeline\.sink is 'discard'"):
        p.take(1)


async def test_packed_batches_match_the_codec_round_trip_across_chunks():
    from fastrollout.experience import decode_experiences, encode_experiences

    def staged(i):
        extra = {"logprobs": np.full(2, 0.5, np.float32)} if i % 3 else {}
        if i % 5 == 0:
            extra["action_mask"] = [True, False]
        tokens = np.arange(4, dtype=np.int64 if i % 7 == 0 else np.int32)
        return Experience(tokens=tokens, prompt_length=2, reward=None if i % 4 == 0 else 1.0,
                          info={"i": i}, response_text=f"r{i}", **extra)
    sent = [staged(i) for i in range(CHUNK + 13)]
    p = pipeline()
    for start in range(0, len(sent), 8):
        p.stage(1, sent[start:start + 8])
    await p.commit(1)
    batch, expected = p.take(1), decode_experiences(encode_experiences(sent))
    assert len(batch) == len(expected) == len(sent)
    for name, col in expected.columns.items():
        got = batch.column(name)
        assert got.dtype == col.dtype and np.array_equal(got.flat(), col.flat()), name
        assert np.array_equal(got.offsets(), col.offsets()), name
        assert np.array_equal(got.present, col.present), name
    assert np.array_equal(batch.rewards, expected.rewards, equal_nan=True)
    assert np.array_equal(batch.reward_present, expected.reward_present)
    assert batch.meta("info") == expected.meta("info") and batch.eids == expected.eids
    assert batch.meta("info")[3] is sent[3].info      # owned by the pipeline, not copied


async def test_packed_chunks_keep_neither_the_experiences_nor_their_arrays():
    # The columns hold copies; holding the originals too would double the memory of every
    # buffered batch until the trainer takes it.
    import gc
    import weakref

    p = pipeline()
    batch = exps(CHUNK)
    originals = [weakref.ref(e.tokens) for e in batch]
    p.stage(1, batch)
    del batch
    gc.collect()
    assert not any(ref() is not None for ref in originals)
    await p.commit(1)
    taken = p.take(1)
    assert len(taken) == CHUNK and int(taken[5].tokens[0]) == 5


async def test_stream_sink_feeds_a_reader_across_batches():
    p = pipeline(sink="stream")
    reader = p.sink.reader()
    read = asyncio.ensure_future(reader.read(5))
    p.stage(1, exps(3))
    await p.commit(1)
    await asyncio.sleep(0)
    assert not read.done()                      # 3 of 5
    p.stage(2, exps(4, 3))
    await p.commit(2)
    batch = await read
    assert [e.reward for e in batch.to_experiences()] == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_durable_sink_has_the_batch_on_disk_when_commit_returns(tmp_path):
    from fastrollout.sinks import DurableLogReader

    p = pipeline(sink="durable", path=str(tmp_path / "log"),
                 operators=[{"type": "grpo"}])
    p.stage(3, exps(4))
    await p.commit(3)
    with DurableLogReader(tmp_path / "log") as reader:
        (record,) = list(reader)
        batch = record.batch()
        assert record.batch_id == 3 and len(batch) == 4
        assert batch.column("advantages") is not None
        assert batch.column("returns") is batch.column("advantages")    # written once
    p.close()


async def test_a_durable_sink_that_fails_keeps_the_batch_staged(tmp_path):
    p = pipeline(sink="durable", path=str(tmp_path / "log"))
    p.stage(3, exps(4))
    p.sink.close()      # every write now fails
    with pytest.raises(FastRolloutError, match="batch 3 was not written"):
        await p.commit(3)
    assert p._staged[3].chunks and len(p._staged[3].chunks[0]) == 4


def test_a_durable_sink_needs_a_folder():
    with pytest.raises(ConfigError, match="pipeline: sink 'durable' needs a folder"):
        pipeline(sink="durable")
