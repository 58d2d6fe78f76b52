"""ExperiencePipeline: staging, packing, the memory sink's bound, the discard sink."""
import numpy as np
import pytest

from fastrollout import Config, Experience
from fastrollout.errors import PipelineFullError
from fastrollout.pipeline import CHUNK, ExperiencePipeline


def exps(n, start=0):
    return [Experience(tokens=np.arange(4, dtype=np.int32) + i, prompt_length=2, reward=float(i))
            for i in range(start, start + n)]


def pipeline(**cfg):
    return ExperiencePipeline(Config.from_dict({"pipeline": cfg}).pipeline)


def test_staged_experiences_come_out_in_order_across_chunks():
    p = pipeline()
    staged = 0
    while staged < CHUNK + 20:                    # one packed chunk and a remainder
        p.stage(7, exps(10, staged))
        staged += 10
    assert p.commit(7)["experience_pipeline/experience_count"] == staged
    batch = p.take(7)
    assert len(batch) == staged
    assert [e.reward for e in batch.to_experiences()] == [float(i) for i in range(len(batch))]
    assert p.take(7) is None


def test_discarded_batches_leave_nothing():
    p = pipeline()
    p.stage(1, exps(3))
    p.discard(1)
    assert p.commit(1)["experience_pipeline/experience_count"] == 0.0
    assert p.take(1) is None


def test_memory_sink_bound_refuses_and_keeps_everything():
    p = pipeline(max_buffered_experiences=5)
    p.stage(1, exps(4))
    p.commit(1)
    p.stage(2, exps(3))
    with pytest.raises(PipelineFullError, match="max_buffered_experiences=5"):
        p.commit(2)
    assert len(p.take(1)) == 4                    # drained: now batch 2 fits
    p.commit(2)
    assert len(p.take(2)) == 3


def test_discard_sink_counts_without_keeping():
    p = pipeline(sink="discard")
    p.stage(1, exps(3))
    assert p.commit(1)["experience_pipeline/experience_count"] == 3.0
    assert p.take(1) is None


def test_packed_batches_match_the_codec_round_trip_across_chunks():
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
    p.commit(1)
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


def test_packed_chunks_keep_neither_the_experiences_nor_their_arrays():
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
    p.commit(1)
    taken = p.take(1)
    assert len(taken) == CHUNK and int(taken[5].tokens[0]) == 5
