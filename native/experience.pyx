"""Experience's compiled half: its fields as C slots and a fast ``__init__``.

Workflows build many experiences per task, so ``Experience(tokens=[...], prompt_length=4,
reward=1.0, logprobs=[...])`` must cost well under a microsecond. As a cdef class, Experience
gets a vectorcall constructor from Cython (a Python subclass of it would not: measured twice
as slow), and ``__init__`` keeps what needs no conversion as it is (a 1-D native-endian numpy
array of a dtype the field keeps, an exact int, an exact float) and turns a list of plain
ints, floats or bools into an array in one C loop where numpy would make the same array.
Everything else goes through ``as_array`` of ``fastrollout.experience.fields``, which owns
the conversion rules.

This module imports leaf modules only (``fields``, ``eid`` and the compiled suffix
generator), none of which imports it back.
"""
cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport Py_TYPE, PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.float cimport FLT_MAX
from libc.math cimport fabs, isfinite
from libc.stdint cimport INT32_MAX, INT32_MIN, int32_t, uint64_t

from fastrollout._native.suffix cimport next_suffix

import dataclasses
import types

from fastrollout._native.suffix import new_suffix
from fastrollout.experience.eid import EID
from fastrollout.experience.fields import ARRAY_FIELDS, FIELD_DTYPES, FIELDS, as_array, to_torch

cnp.import_array()


# ---------------------------------------------------------------- EIDs
# EIDs are made and read through their slots rather than the dataclass: make_eid stores
# straight into a new instance's slots, eid_field reads through the slot descriptors. Both
# measurably beat the plain ways (calling EID or its descriptors; getattr), in instructions
# run per call and in benchmarks/bench_experience.py (construct one experience, to
# experiences, pack 256 experiences).
cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    enum: T_OBJECT_EX

cdef tuple _no_args = ()
cdef type _EID = EID
cdef tuple _eid_fields = dataclasses.fields(EID)
cdef tuple _eid_slots = tuple([EID.__dict__[f.name] for f in _eid_fields])
cdef Py_ssize_t[5] _eid_offsets     # where each slot lies in an instance, in field order


cdef int _read_eid_layout() except -1:
    if ([f.name for f in _eid_fields] != ["batch", "task", "run", "step", "suffix"]
            or not all([type(slot) is types.MemberDescriptorType
                        and (<PyMemberDescrObject*>slot).d_member.type == T_OBJECT_EX
                        for slot in _eid_slots])
            or _eid_fields[4].default_factory is not new_suffix):
        raise ImportError("fastrollout.experience.eid.EID must be a dataclass(slots=True) "
                          "with the fields batch, task, run, step and suffix (drawn by "
                          "new_suffix)")
    cdef Py_ssize_t i
    for i in range(5):
        _eid_offsets[i] = (<PyMemberDescrObject*>_eid_slots[i]).d_member.offset
    return 0


_read_eid_layout()
# EID()'s batch, task, run and step; its suffix is drawn as new_suffix() draws it.
cdef object _batch0 = _eid_fields[0].default
cdef object _task0 = _eid_fields[1].default
cdef object _run0 = _eid_fields[2].default
cdef object _step0 = _eid_fields[3].default


cdef inline void _fill(object eid, Py_ssize_t i, object value) noexcept:
    """Set slot ``i`` of a new EID (empty, NULL), as its descriptor would."""
    Py_INCREF(value)
    (<PyObject**>(<char*><PyObject*>eid + _eid_offsets[i]))[0] = <PyObject*>value


cdef object make_eid(object batch, object task, object run, object step, object suffix):
    eid = (<PyTypeObject*>_EID).tp_new(_EID, <PyObject*>_no_args, NULL)
    _fill(eid, 0, batch)
    _fill(eid, 1, task)
    _fill(eid, 2, run)
    _fill(eid, 3, step)
    _fill(eid, 4, suffix)
    return eid


cdef object eid_field(object eid, Py_ssize_t i):
    if type(eid) is not _EID:
        return getattr(eid, _eid_fields[i].name)
    slot = _eid_slots[i]
    return Py_TYPE(slot).tp_descr_get(slot, eid, _EID)


# ---------------------------------------------------------------- array fields
# Per array field: bit n of _kept is set when an array of dtype number n (native byte order)
# is kept as it is; _list_num is the dtype number lists become, when _from_list makes them.
cdef uint64_t[N_ARRAY_FIELDS] _kept
cdef int[N_ARRAY_FIELDS] _list_num


cdef int _read_field_dtypes() except -1:
    if len(ARRAY_FIELDS) != N_ARRAY_FIELDS:
        raise ImportError(f"experience.pxd indexes {N_ARRAY_FIELDS} array fields, "
                          f"fastrollout.experience.fields has {len(ARRAY_FIELDS)}")
    cdef int i
    for i, name in enumerate(ARRAY_FIELDS):
        default, kept, _ = FIELD_DTYPES[name]
        _kept[i] = 0
        for dtype in kept:
            if dtype.isnative and dtype.num < 64:
                _kept[i] |= 1ULL << dtype.num
        _list_num[i] = default.num if default.num in (cnp.NPY_INT32, cnp.NPY_FLOAT32,
                                                      cnp.NPY_BOOL) else -1
    return 0


_read_field_dtypes()


cdef bint kept_as_is(object value, int field) noexcept:
    if not cnp.PyArray_CheckExact(value):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>value
    cdef int num = cnp.PyArray_TYPE(a)
    return (cnp.PyArray_NDIM(a) == 1 and 0 <= num < 64 and (_kept[field] >> num) & 1
            and cnp.PyArray_ISNOTSWAPPED(a))


cdef object _from_list(list values, int field):
    """The array ``as_array`` makes of ``values``, made in one C loop when every element is
    one that numpy converts exactly as this does: for int32 fields, ints within int32; for
    float32 fields, floats within float32's range and ints within 2**53 (exact as doubles);
    for bool fields, bools and ints within int64. None for anything else."""
    cdef int num = _list_num[field]
    if num < 0:
        return None
    cdef cnp.npy_intp n = len(values)
    cdef cnp.ndarray arr = cnp.PyArray_EMPTY(1, &n, num, 0)
    cdef char* out = <char*>cnp.PyArray_DATA(arr)
    cdef Py_ssize_t i
    cdef long long v
    cdef int overflow = 0
    cdef double d
    for i in range(n):
        x = values[i]
        if type(x) is int:
            v = PyLong_AsLongLongAndOverflow(x, &overflow)
            if overflow:
                return None
            if num == cnp.NPY_INT32:
                if v < INT32_MIN or v > INT32_MAX:
                    return None
                (<int32_t*>out)[i] = <int32_t>v
            elif num == cnp.NPY_FLOAT32:
                if v < -(1LL << 53) or v > (1LL << 53):
                    return None
                (<float*>out)[i] = <float>v
            else:
                (<cnp.npy_bool*>out)[i] = v != 0
        elif type(x) is float and num == cnp.NPY_FLOAT32:
            d = PyFloat_AS_DOUBLE(x)
            if isfinite(d) and fabs(d) > FLT_MAX:
                return None     # numpy warns that the cast overflows
            (<float*>out)[i] = <float>d
        elif type(x) is bool and num == cnp.NPY_BOOL:
            (<cnp.npy_bool*>out)[i] = x is True
        else:
            return None
    return arr


cdef inline object _array(object value, int field):
    """``as_array(value, ARRAY_FIELDS[field])``, without the call where the result is known."""
    if kept_as_is(value, field):
        return value
    if type(value) is list:
        arr = _from_list(<list>value, field)
        if arr is not None:
            return arr
    return as_array(value, ARRAY_FIELDS[field])


# ---------------------------------------------------------------- Experience
def _unpickle(type cls, tuple values):
    """An Experience of class ``cls`` with the fields ``values`` in FIELDS order, as
    ``Experience.__reduce__`` gives them."""
    if len(values) != len(FIELDS):
        raise ValueError(f"expected {len(FIELDS)} Experience fields, got {len(values)}")
    cdef Experience e = Experience.__new__(cls)
    (e.tokens, e.prompt_length, e.reward, e.eid, e.logprobs, e.token_level_reward,
     e.advantages, e.returns, e.action_mask, e.chosen, e.rejected, e.teacher_logprobs,
     e.truncate_status, e.info, e.metrics, e.response_text, e.prompt_text, e.messages,
     e.tools, e.chosen_messages, e.rejected_messages) = values
    return e


cdef class Experience:
    """One trajectory: prompt+response tokens, logprobs of the response, reward, ids.

    Keyword-only arguments with Trinity's field names. Array fields accept lists, numpy
    arrays and torch tensors and are kept as 1-D numpy arrays (or None); ``to_torch()`` gives
    zero-copy tensors. ``eid`` may be an ``EID`` or a dict of its fields."""

    def __init__(self, *, tokens, prompt_length=1, logprobs=None, reward=None,
                 token_level_reward=None, advantages=None, returns=None, action_mask=None,
                 truncate_status=None, info=None, metrics=None, response_text=None,
                 prompt_text=None, messages=None, tools=None, chosen=None, rejected=None,
                 chosen_messages=None, rejected_messages=None, teacher_logprobs=None,
                 eid=None):
        self.tokens = _array(tokens, F_TOKENS)
        self.prompt_length = prompt_length if type(prompt_length) is int else int(prompt_length)
        self.reward = reward if reward is None or type(reward) is float else float(reward)
        self.truncate_status = truncate_status
        self.info = {} if info is None else info
        self.metrics = {} if metrics is None else metrics
        self.response_text = response_text
        self.prompt_text = prompt_text
        self.messages = messages
        self.tools = tools
        self.chosen_messages = chosen_messages
        self.rejected_messages = rejected_messages
        if logprobs is not None:
            self.logprobs = _array(logprobs, F_LOGPROBS)
        if token_level_reward is not None:
            self.token_level_reward = _array(token_level_reward, F_TOKEN_LEVEL_REWARD)
        if advantages is not None:
            self.advantages = _array(advantages, F_ADVANTAGES)
        if returns is not None:
            self.returns = _array(returns, F_RETURNS)
        if action_mask is not None:
            self.action_mask = _array(action_mask, F_ACTION_MASK)
        if chosen is not None:
            self.chosen = _array(chosen, F_CHOSEN)
        if rejected is not None:
            self.rejected = _array(rejected, F_REJECTED)
        if teacher_logprobs is not None:
            self.teacher_logprobs = _array(teacher_logprobs, F_TEACHER_LOGPROBS)
        if eid is None:
            eid = make_eid(_batch0, _task0, _run0, _step0, next_suffix())
        elif isinstance(eid, dict):
            eid = _EID(**eid)
        self.eid = eid

    def to_torch(self):
        """The array fields that are set, as tensors sharing memory with the numpy arrays."""
        return {name: to_torch(value) for name in ARRAY_FIELDS
                if (value := getattr(self, name)) is not None}

    def __reduce__(self):
        # Fields by position (FIELDS order); a subclass's own state (its __dict__ /
        # __slots__, or what its __getstate__ returns) rides along in the standard form
        # pickle restores itself.
        state = None if type(self) is Experience else self.__getstate__()
        return _unpickle, (type(self), (
            self.tokens, self.prompt_length, self.reward, self.eid, self.logprobs,
            self.token_level_reward, self.advantages, self.returns, self.action_mask,
            self.chosen, self.rejected, self.teacher_logprobs, self.truncate_status, self.info,
            self.metrics, self.response_text, self.prompt_text, self.messages, self.tools,
            self.chosen_messages, self.rejected_messages)), state

    def __repr__(self):
        return (f"Experience(eid={self.eid.uid!r}, tokens={len(self.tokens)}, "
                f"prompt_length={self.prompt_length}, reward={self.reward})")
