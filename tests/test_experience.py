"""Experience/EID model and ExperienceBatch columns, concatenation and padding."""
import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastrollout import EID, Experience, ExperienceBatch
from fastrollout._native import experience as native
from fastrollout.experience import decode_experiences, encode_experiences, to_torch
from fastrollout.experience.model import ARRAY_FIELDS, FIELD_DTYPES, FIELDS, as_array


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


def test_eid_is_a_dataclass_with_cheap_random_suffixes():
    e = EID(batch=1, task="t", run=2)
    assert [f.name for f in dataclasses.fields(EID)] == ["batch", "task", "run", "step", "suffix"]
    assert dataclasses.asdict(e) == {**e.to_dict()} and e == dataclasses.replace(e)
    assert repr(e) == f"EID(batch=1, task='t', run=2, step=0, suffix={e.suffix!r})"
    suffixes = [EID().suffix for _ in range(2000)]
    assert all(len(s) == 6 and int(s, 16) < 1 << 24 and s == s.lower() for s in suffixes)
    assert len(set(suffixes)) > 1990     # 24 random bits: a few birthday collisions at most
    default = Experience(tokens=[1]).eid    # built in C, as EID() would be
    assert type(default) is EID and default == EID(suffix=default.suffix)
    assert Experience(tokens=[1]).eid.suffix != default.suffix


def test_suffix_generator_is_reseeded_in_forked_children():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:    # child: report its next suffixes and leave at once
        os.write(write, " ".join(native.new_suffix() for _ in range(8)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split()
    os.waitpid(pid, 0)
    parent = [native.new_suffix() for _ in range(8)]
    assert len(child) == 8 and child != parent     # unseeded, both would draw the same


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


class _Sub(np.ndarray):
    pass


# Each input goes through the fast path or the Python as_array; the result must be the same.
_INPUTS = [
    *(np.array([1, 0, 1]).astype(dt) for dt in (np.int32, np.int64, np.int16, np.uint8, ">i4", ">i8",
                                        np.float16, np.float32, np.float64, ">f4", np.bool_)),
    np.arange(6, dtype=np.int32)[::2], np.arange(3, dtype=np.float32).view(_Sub),
    np.array([], dtype=np.float64), np.array(5, dtype=np.int32), np.zeros((2, 2), np.float32),
    [1, 2], [0.5, 1.5], [True, False], [], [[1]], ["a"], 7,
    torch.arange(3, dtype=torch.int32), torch.arange(3, dtype=torch.int64),
    torch.ones(3, dtype=torch.bfloat16), torch.tensor([True, False]),
]


@pytest.mark.parametrize("name", ARRAY_FIELDS)
def test_every_array_field_converts_as_as_array_does(name):
    for value in _INPUTS:
        try:
            expected = as_array(value, name)
        except ValueError as e:
            with pytest.raises(ValueError) as raised:
                Experience(**{"tokens": [1], name: value})
            assert str(raised.value) == str(e) and f"Experience.{name}" in str(e)
            continue
        got = getattr(Experience(**{"tokens": [1], name: value}), name)
        assert type(got) is type(expected) and got.dtype == expected.dtype
        assert np.array_equal(got, expected) and (got is value) == (expected is value)
        kept = FIELD_DTYPES[name][1]
        if type(value) is np.ndarray and value.ndim == 1 and value.dtype in kept:
            assert got is value


def test_scalar_and_object_fields():
    info = {"a": 1}
    exp = Experience(tokens=np.arange(3, dtype=np.int32), prompt_length=np.int64(2),
                     reward=np.float32(0.5), info=info, response_text="r", messages=[{}])
    assert type(exp.prompt_length) is int and exp.prompt_length == 2
    assert type(exp.reward) is float and exp.reward == 0.5
    assert exp.info is info and exp.messages == [{}] and exp.response_text == "r"
    assert (Experience(tokens=[1], prompt_length=True).prompt_length,
            Experience(tokens=[1], prompt_length="3").prompt_length) == (1, 3)
    assert type(Experience(tokens=[1], reward=1).reward) is float
    a, b = Experience(tokens=[1]), Experience(tokens=[1])
    assert (a.prompt_length, a.reward, a.logprobs, a.truncate_status) == (1, None, None, None)
    assert a.info == a.metrics == {} and a.info is not b.info and a.metrics is not b.metrics
    eid = EID(batch=1)
    assert Experience(tokens=[1], eid=eid).eid is eid
    with pytest.raises(TypeError):
        Experience(tokens=[1], eid={"batch": 1, "nope": 2})
    with pytest.raises(TypeError):
        Experience(np.arange(3))
    with pytest.raises(TypeError):
        Experience(prompt_length=1)
    with pytest.raises(TypeError):
        Experience(tokens=[1], unknown=1)
    with pytest.raises(ValueError):
        Experience(tokens=[1], prompt_length="x")


def test_fields_are_plain_attributes_and_nothing_else():
    exp = make()
    for i, name in enumerate(FIELDS):
        setattr(exp, name, i)
        assert getattr(exp, name) == i
    exp.eid, exp.info = EID(), {}
    exp.eid.run = 5
    exp.info["k"] = 1
    assert exp.eid.run == 5 and exp.info == {"k": 1}
    with pytest.raises(AttributeError):
        exp.not_a_field = 1
    assert not hasattr(exp, "__dict__")


def _same(a, b):
    assert type(a) is type(b)
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        else:
            assert x == y


def test_pickle_and_copy_round_trip():
    exp = make(3, advantages=[1.0, 2.0], action_mask=[1, 0, 1, 1], truncate_status="length",
               info={"model_version": 2}, metrics={"acc": 1.0}, messages=[{"role": "user"}],
               response_text="r")
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):  # EID (slots) needs 2 and up
        _same(pickle.loads(pickle.dumps(exp, protocol)), exp)
    _same(copy.copy(exp), exp)
    deep = copy.deepcopy(exp)
    _same(deep, exp)
    assert deep.tokens is not exp.tokens and deep.info is not exp.info
    empty = Experience._from_parts({"tokens": np.arange(2, dtype=np.int32)})
    _same(pickle.loads(pickle.dumps(empty)), empty)


class SlotExperience(Experience):
    __slots__ = ("extra",)

    def __init__(self, *, extra=None, **kw):
        super().__init__(**kw)
        self.extra = extra


class DictExperience(Experience):
    def describe(self):
        return f"{len(self.tokens)} tokens"


def test_python_subclasses():
    slot = SlotExperience(tokens=[1, 2], reward=1, extra={"x": 1})
    assert slot.tokens.dtype == np.int32 and slot.reward == 1.0 and slot.extra == {"x": 1}
    with pytest.raises(AttributeError):
        slot.other = 1
    plain = DictExperience(tokens=[1, 2, 3], eid={"batch": 2})
    plain.note = "kept"
    assert plain.describe() == "3 tokens" and plain.eid.batch == 2 and repr(plain).startswith(
        "Experience(eid='2/")
    for exp in (slot, plain):
        back = pickle.loads(pickle.dumps(exp))
        _same(back, exp)
        _same(copy.copy(exp), exp)
    assert pickle.loads(pickle.dumps(slot)).extra == {"x": 1}
    assert pickle.loads(pickle.dumps(plain)).note == "kept"
    parts = DictExperience._from_parts({"tokens": np.arange(2, dtype=np.int32), "reward": 1.0})
    assert type(parts) is DictExperience and parts.reward == 1.0 and parts.eid is None


def test_from_parts_to_torch_repr():
    tokens, logprobs = np.arange(4, dtype=np.int64), np.zeros(2, dtype=np.float16)
    exp = Experience._from_parts({"tokens": tokens, "logprobs": logprobs, "prompt_length": 2,
                                  "eid": EID(batch=1, task=2, suffix="abcdef")})
    assert exp.tokens is tokens and exp.logprobs is logprobs and exp.info is None
    tensors = exp.to_torch()
    assert sorted(tensors) == ["logprobs", "tokens"] and tensors["logprobs"].dtype == torch.float16
    assert repr(exp) == "Experience(eid='1/2/0/0/abcdef', tokens=4, prompt_length=2, reward=None)"


def test_bind_refuses_what_the_fast_paths_cannot_serve():
    kw = dict(as_array=as_array, to_torch=to_torch, field_dtypes=FIELD_DTYPES)

    @dataclasses.dataclass
    class NoSlots:
        batch: str = ""

    @dataclasses.dataclass(slots=True)
    class Required:
        batch: str

    for eid_type in (NoSlots, Required):
        with pytest.raises(TypeError, match="dataclass"):
            native.bind(eid_type=eid_type, **kw)
    with pytest.raises(ValueError, match="field_dtypes"):
        native.bind(eid_type=EID, as_array=as_array, to_torch=to_torch,
                    field_dtypes={"tokens": FIELD_DTYPES["tokens"]})
    assert type(Experience(tokens=[1]).eid) is EID     # the binding in place is untouched


def test_native_experience_binds_the_model_on_first_use():
    # A process that imports the compiled class directly (not through fastrollout.experience).
    code = ("import sys; from fastrollout._native.experience import Experience; "
            "assert 'fastrollout.experience.model' not in sys.modules; "
            "e = Experience(tokens=[1, 2]); "
            "print(type(e.eid).__module__, e.tokens.dtype, sorted(e.to_torch()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split() == ["fastrollout.experience.model", "int32", "['tokens']"]
