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
from fastrollout._native import suffix
from fastrollout.compat.trinity import decode_trxp, encode_trxp
from fastrollout.experience import ArrayColumn, decode_experiences, encode_experiences, to_torch
from fastrollout.experience.model import ARRAY_FIELDS, FIELD_DTYPES, FIELDS, META_FIELDS, as_array


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
        try:
            os.write(write, " ".join(suffix.new_suffix() for _ in range(8)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split()
    os.waitpid(pid, 0)
    parent = [suffix.new_suffix() for _ in range(8)]
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


def test_segments_are_runs_of_items_stored_end_to_end():
    data = np.arange(20, dtype=np.int32)
    col = ArrayColumn(data, np.array([0, 2, 5, 9, 9, 12]), np.array([2, 5, 7, 9, 12, 15]))
    runs = col.segments()       # items 0-2 adjoin, item 3 is empty and 3-5 adjoin
    assert [r.tolist() for r in runs] == [list(range(0, 7)), list(range(9, 15))]
    assert all(np.shares_memory(r, data) for r in runs)
    assert col.flat().tolist() == [v for i in range(6) for v in col[i].tolist()]
    whole = ArrayColumn.from_offsets(data, np.array([0, 4, 4, 20]))
    assert len(whole.segments()) == 1 and whole.flat().base is data
    empty = ArrayColumn(data, np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty.segments()[0].size == 0 and empty.flat().size == 0


def test_concat_keeps_a_column_under_two_names_as_one():
    a = ExperienceBatch.from_experiences([make(0, advantages=[1, 2, 3, 4])])
    a.columns["returns"] = a.columns["advantages"]
    both = ExperienceBatch.concat([a, a])
    assert both.column("returns") is both.column("advantages")
    assert both[1].returns.tolist() == [1, 2, 3, 4]


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
    *(np.array([1, 0, 1]).astype(dt)
      for dt in (np.int32, np.int64, np.int16, np.uint8, ">i4", ">i8", np.float16, np.float32,
                 np.float64, ">f4", np.bool_)),
    np.arange(6, dtype=np.int32)[::2], np.arange(3, dtype=np.float32).view(_Sub),
    np.array([], dtype=np.float64), np.array(5, dtype=np.int32), np.zeros((2, 2), np.float32),
    [1, 2], [0.5, 1.5], [True, False], [], [[1]], ["a"], 7,
    # lists, made in C where numpy would make the same array: the edges of that
    [-2**31, 2**31 - 1], [2**31], [-2**31 - 1], [2**63], [2**64], [1, 2.0], [1, True],
    [True, 2], [2**53, -2**53], [2**53 + 1], [0.1, -0.0, float("nan"), float("inf")],
    [3.4e38, -3.4e38], [np.int64(1)], [np.float32(0.5)], [None], (1, 2),
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
        assert got.tobytes() == expected.tobytes() and (got is value) == (expected is value)
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
    empty = Experience.__new__(Experience)  # every field None
    empty.tokens = np.arange(2, dtype=np.int32)
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


def test_to_torch_and_repr():
    tokens, logprobs = np.arange(4, dtype=np.int64), np.zeros(2, dtype=np.float16)
    exp = Experience(tokens=tokens, logprobs=logprobs, prompt_length=2,
                     eid=EID(batch=1, task=2, suffix="abcdef"))
    assert exp.tokens is tokens and exp.logprobs is logprobs
    tensors = exp.to_torch()
    assert sorted(tensors) == ["logprobs", "tokens"] and tensors["logprobs"].dtype == torch.float16
    assert repr(exp) == "Experience(eid='1/2/0/0/abcdef', tokens=4, prompt_length=2, reward=None)"


def _fresh(code, stdin=b""):
    """What ``code`` prints in a new interpreter."""
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True,
                          timeout=120, check=True).stdout.decode().split()


_LEAVES = ["fastrollout.experience.column", "fastrollout.experience.eid",
           "fastrollout.experience.fields", "fastrollout.experience.wire"]
_LOADED = ("print(*sorted(m for m in sys.modules if m.startswith(('fastrollout._native.', "
           "'fastrollout.experience.'))))")


def test_native_modules_import_leaf_modules_only():
    # Imported first (as unpickling does): no import cycle, and of the experience package only
    # the leaf modules, which import nothing compiled but the suffix generator.
    assert _fresh(f"import sys, fastrollout._native.pack; {_LOADED}") == [
        "fastrollout._native.experience", "fastrollout._native.pack",
        "fastrollout._native.suffix", *_LEAVES]
    assert _fresh(f"import sys, {', '.join(_LEAVES)}; {_LOADED}") == [
        "fastrollout._native.suffix", *_LEAVES]
    exp = Experience(tokens=[1, 2], eid=EID(batch=1))
    code = ("import pickle, sys; e = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(e.eid).__module__, e.eid.batch, e.tokens.dtype, *e.to_torch())")
    assert _fresh(code, pickle.dumps(exp)) == ["fastrollout.experience.eid", "1", "int32",
                                               "tokens"]


def _same_view(got, expected):
    if expected is None:
        assert got is None
        return
    assert type(got) is type(expected) and got.base is expected.base
    assert got.__array_interface__ == expected.__array_interface__  # address, shape, flags


def test_batch_items_are_views_into_the_columns_with_the_items_metadata():
    exps = [make(i, n_resp=2 + i, advantages=[0.5] * (5 + i) if i % 2 else None,
                 info={"i": i}, metrics={"m": float(i)}, response_text=f"r{i}",
                 truncate_status="length" if i == 2 else None,
                 messages=[{"role": "user"}] if i == 1 else None) for i in range(5)]
    exps[3].reward = None
    batches = [decode_experiences(encode_experiences(exps)), decode_trxp(encode_trxp(exps)),
               ExperienceBatch.from_experiences(exps)]
    for batch in batches:
        every, iterated = batch.to_experiences(), list(batch)
        assert len(every) == len(iterated) == 5
        for i in range(5):
            for got in (every[i], iterated[i], batch[i], batch[i - 5]):
                assert type(got) is Experience and type(got.eid) is EID
                _same(got, exps[i])
                for name in ARRAY_FIELDS:
                    column = batch.columns.get(name)
                    _same_view(getattr(got, name), None if column is None else column[i])
                for name in META_FIELDS:
                    assert getattr(got, name) is getattr(batch.items[i], name)
        assert every[3].reward is None and every[1].advantages is not None
    assert batches[1][0].eid is not batches[1][0].eid     # a new EID for every Experience
    many = ExperienceBatch.from_experiences([Experience(tokens=[i], reward=i) for i in range(600)])
    assert [(e.tokens.tolist(), e.reward) for e in many] == [([i], i) for i in range(600)]


def test_batch_items_read_any_array_column_as_its_own_indexing_does():
    items = ExperienceBatch.from_experiences([make(i) for i in range(3)]).items
    data = np.arange(40, dtype=np.int64)
    frozen = data.copy()
    frozen.flags.writeable = False
    columns = [
        ArrayColumn(data[::2], np.array([4, 0, 3], np.int32), np.array([7, 2, 3], np.int32)),
        ArrayColumn(frozen, np.array([0, -3, 38]), np.array([5, -1, 45])),   # Python's slicing
        ArrayColumn(frozen, np.array([1, 2, 3]), np.array([2, 4, 6]), np.array([1, 0, 1], bool)),
        ArrayColumn(data.view(_Sub), np.array([1, 2, 3]), np.array([2, 4, 6])),
        ArrayColumn(data.astype(">i8"), np.array([0, 1, 2]), np.array([1, 2, 3])),
    ]
    for column in columns:
        batch = ExperienceBatch(items, {"tokens": column}, np.zeros(3), None,
                                np.ones(3, np.int64))
        for i, exp in enumerate(batch.to_experiences()):
            _same_view(exp.tokens, column[i])
            _same_view(batch[i].tokens, column[i])


_INT_FIELDS = [name for name in ARRAY_FIELDS if FIELD_DTYPES[name][0].kind == "i"]


@pytest.mark.parametrize("name", _INT_FIELDS)
def test_integer_fields_take_whole_floats_and_refuse_other_floats(name):
    # Trinity's own test workflows build Experience(tokens=torch.zeros(5)), a float32 tensor.
    default = FIELD_DTYPES[name][0]
    for value in (torch.zeros(5), torch.tensor([1.0, -2.0], dtype=torch.bfloat16),
                  np.array([1.0, 2.0**31 - 1]), np.array([-3.0], np.float16), [3.0, 4.0],
                  [1, 2.0]):
        got = getattr(Experience(**{"tokens": [1], name: value}), name)
        expected = np.asarray(value.float() if isinstance(value, torch.Tensor) else value)
        assert type(got) is np.ndarray and got.dtype == default
        assert got.tolist() == expected.tolist()
    refused = [(torch.tensor([1.0, float("nan")]), "nan"), (np.array([0.0, 1.5]), "1.5"),
               ([2.0, 0.5], "0.5"), (np.array([1.0, np.inf], np.float32), "inf"),
               ([0.0, 2.0**31], "2147483648.0"), (torch.tensor([0.0, -1e10]), "-10000000000.0")]
    for value, shown in refused:
        with pytest.raises(ValueError, match=rf"^Experience\.{name} must hold {default} values: "
                                             rf"floats must be whole numbers within {default}'s "
                                             rf"range, got {shown} at index 1$"):
            Experience(**{"tokens": [1], name: value})
