"""Experience/EID model and ExperienceBatch columns, concatenation and padding."""
import numpy as np
import pytest
import torch

from fastrollout import EID, Experience, ExperienceBatch
from fastrollout.experience import decode_experiences, encode_experiences, to_torch


def make(i=0, n_prompt=3, n_resp=4, **kw):
    rng = np.random.default_rng(i)
    kw.setdefault("logprobs", rng.standard_normal(n_resp).astype(np.float32))
    return Experience(tokens=rng.integers(0, 1000, n_prompt + n_resp).astype(np.int32),
                      prompt_length=n_prompt, reward=float(i), eid=EID(batch=1, task=i, run=i),
                      **kw)


def test_eid_ids():
    e = EID(batch=2, task="t", run=3, step=4, suffix="abc123")
    assert (e.uid, e.sid, e.rid, e.tid) == ("2/t/3/4/abc123", "2/t/4", "2/t/3", "2/t")
    assert len(EID().suffix) == 6 and EID().suffix != EID().suffix


def test_array_inputs_lists_numpy_torch():
    arr = np.arange(5, dtype=np.int64)
    exp = Experience(tokens=arr, logprobs=[0.5, 1.5], action_mask=[1, 0],
                     advantages=torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
                     eid={"batch": 1, "task": 2})
    assert exp.tokens is arr  # allowed dtype: kept, not copied
    assert exp.logprobs.dtype == np.float32 and exp.action_mask.dtype == np.bool_
    assert exp.advantages.dtype == np.float32 and exp.advantages.tolist() == [1.0, 2.0]
    assert exp.eid.tid == "1/2"
    t = torch.arange(4, dtype=torch.int32)
    assert np.shares_memory(Experience(tokens=t).tokens, t.numpy())
    with pytest.raises(ValueError, match="tokens must hold int32"):
        Experience(tokens=[0.5, 1.5])
    with pytest.raises(ValueError, match="1-D"):
        Experience(tokens=np.zeros((2, 2), dtype=np.int32))


def test_to_torch_is_zero_copy_even_over_readonly_payload():
    exp = make()
    tensors = exp.to_torch()
    assert tensors["tokens"].data_ptr() == exp.tokens.ctypes.data
    decoded = decode_experiences(encode_experiences([exp]))[0]
    t = decoded.to_torch()["logprobs"]  # read-only view: no warning (warnings are errors)
    assert t.data_ptr() == decoded.logprobs.ctypes.data
    assert torch.equal(t, torch.from_numpy(exp.logprobs))
    assert to_torch(np.arange(3, dtype=">i4")).tolist() == [0, 1, 2]


def test_batch_columns_and_indexing():
    exps = [make(i, n_resp=2 + i) for i in range(4)]
    exps[2].reward = None
    batch = decode_experiences(encode_experiences(exps))
    assert len(batch) == 4 and isinstance(batch, ExperienceBatch)
    tokens = batch.column("tokens")
    assert tokens.lengths().tolist() == [5, 6, 7, 8]
    assert tokens.offsets().tolist() == [0, 5, 11, 18, 26]
    assert np.array_equal(tokens.flat(), np.concatenate([e.tokens for e in exps]))
    assert batch.response_lengths().tolist() == [2, 3, 4, 5]
    assert batch.column("advantages") is None
    assert [e.uid for e in batch.eids] == [e.eid.uid for e in exps]
    assert batch.meta("info") == [{}] * 4
    assert batch[-1].eid.uid == exps[-1].eid.uid and batch[2].reward is None
    with pytest.raises(IndexError):
        batch[4]
    with pytest.raises(KeyError):
        batch.column("info")


def test_concat_copies_once_into_contiguous_columns():
    a = decode_experiences(encode_experiences([make(0), make(1, advantages=[1, 2, 3, 4])]))
    b = decode_experiences(encode_experiences([make(2, n_resp=6)]))
    both = ExperienceBatch.concat([a, b])
    assert len(both) == 3
    assert [e.eid.uid for e in both] == [e.eid.uid for e in (*a, *b)]
    col = both.column("tokens")
    assert col.is_contiguous() and col.offsets().tolist() == [0, 7, 14, 23]
    assert not np.shares_memory(col.data, a.column("tokens").data)
    adv = both.column("advantages")
    assert adv.present.tolist() == [False, True, False] and both[1].advantages.tolist() == [
        1, 2, 3, 4]
    assert ExperienceBatch.concat([a]) is a and len(ExperienceBatch.concat([])) == 0


def test_to_padded_matches_trinity_layout():
    single = make(0, n_prompt=2, n_resp=3)
    multi = make(1, n_prompt=4, n_resp=2, action_mask=[0, 1])
    batch = decode_experiences(encode_experiences([single, multi]))
    out = batch.to_padded(pad_token_id=-1)
    ids = out["input_ids"]
    assert ids.shape == (2, 7)
    assert ids[0, 2:7].tolist() == single.tokens.tolist() and ids[0, :2].tolist() == [-1, -1]
    assert ids[1, :6].tolist() == multi.tokens.tolist() and ids[1, 6] == -1
    assert out["attention_mask"].sum(1).tolist() == [5, 6]
    assert out["action_mask"].tolist() == [[True, True, True], [False, True, False]]
    assert out["position_ids"][0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert out["logprobs"][1].tolist() == [*multi.logprobs.tolist(), 0.0]
    assert out["rewards"].tolist() == [0.0, 1.0]
    pt = batch.to_padded(0, max_prompt_length=8, max_response_length=5, return_tensors="pt")
    assert tuple(pt["input_ids"].shape) == (2, 13) and pt["action_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="longer than"):
        batch.to_padded(0, max_response_length=2)
