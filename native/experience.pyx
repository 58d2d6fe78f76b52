"""Experience's compiled half: its fields as C slots, a fast ``__init__``, EID suffixes.

Workflows build many experiences per task, so ``Experience(tokens=arr, prompt_length=4,
reward=1.0)`` must cost well under a microsecond. As a cdef class, Experience gets a
vectorcall constructor from Cython (a Python subclass of it would not: measured twice as
slow), and ``__init__`` keeps what needs no conversion as it is: a 1-D native-endian numpy
array of a dtype the field keeps, an exact int, an exact float. Everything else goes through
``as_array`` of ``fastrollout.experience.model``, which owns the conversion rules and the
``EID`` dataclass and hands both in with ``bind()`` when it is imported.

An experience built without an ``eid`` gets ``EID()``. Calling the dataclass would cost
half the construction, so the EID is made the way its generated ``__init__`` would make it
when given no arguments: each slot set from the field's default or default factory.
"""
cimport numpy as cnp
from cpython.object cimport Py_TYPE, PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.stdint cimport uint64_t

import dataclasses
import os
import types

cnp.import_array()

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object unicode)

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    enum: T_OBJECT_EX

# Field names: the array fields in wire order, the plain-object fields in wire order, and
# every field (the order pickles keep). The slots themselves are declared in experience.pxd.
ARRAY_FIELDS = ("tokens", "logprobs", "token_level_reward", "advantages", "returns",
                "action_mask", "chosen", "rejected", "teacher_logprobs")
META_FIELDS = ("truncate_status", "info", "metrics", "response_text", "prompt_text",
               "messages", "tools", "chosen_messages", "rejected_messages")
FIELDS = ("tokens", "prompt_length", "reward", "eid", *ARRAY_FIELDS[1:], *META_FIELDS)



# ---------------------------------------------------------------- EID suffixes
# Suffixes need to be unlikely to collide, not unpredictable: splitmix64 over a private
# 64-bit state seeded from os.urandom, reseeded in forked children (which would otherwise
# draw the same suffixes as their parent).
cdef uint64_t _state = 0
cdef const char* _HEX = b"0123456789abcdef"


def reseed():
    """Seed the suffix generator from ``os.urandom`` (done at import and in forked children)."""
    global _state
    _state = int.from_bytes(os.urandom(8), "little")


reseed()
os.register_at_fork(after_in_child=reseed)


cdef inline uint64_t _next() noexcept:
    global _state
    _state += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = _state
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


def new_suffix():
    """Six random lowercase hex digits: the default ``EID.suffix``."""
    return _suffix()


cdef object _suffix():
    cdef uint64_t bits = _next() >> 40     # the top 24 bits
    s = PyUnicode_New(6, 127)
    cdef char* out = <char*>PyUnicode_DATA(s)
    cdef int i
    for i in range(6):
        out[i] = _HEX[(bits >> (20 - 4 * i)) & 15]
    return s


# ---------------------------------------------------------------- the Python half
cdef tuple _no_args = ()
cdef tuple _FIELDS = FIELDS
cdef tuple _field_slots = ()     # Experience's attribute descriptors, in FIELDS order
cdef object _as_array = None
cdef object _to_torch = None
cdef object _eid_type = None
# EID's field names and slot descriptors, and per field its default or (None) its default
# factory, in the dataclass's field order; per field, where its slot is in an instance and
# whether its factory is new_suffix (then called in C).
cdef tuple _eid_names = ()
cdef tuple _eid_slots = ()
cdef tuple _eid_defaults = ()
cdef tuple _eid_factories = ()
cdef enum: MAX_EID_FIELDS = 16
cdef Py_ssize_t[MAX_EID_FIELDS] _eid_offsets
cdef bint[MAX_EID_FIELDS] _eid_suffix
# _kept[field] has bit n set when an array of dtype number n (native byte order) is kept.
cdef uint64_t[N_ARRAY_FIELDS] _kept


def bind(*, eid_type, as_array, to_torch, field_dtypes):
    """Hand in what ``fastrollout.experience.model`` owns: the ``EID`` class, the conversion
    ``as_array(value, name)``, ``to_torch(array)`` and ``FIELD_DTYPES``, whose kept dtypes
    decide the fast path. Called once, when that module is imported."""
    global _as_array, _to_torch, _eid_type, _eid_names, _eid_slots, _eid_defaults, _eid_factories
    if set(field_dtypes) != set(ARRAY_FIELDS):
        raise ValueError(f"field_dtypes must have exactly the keys {ARRAY_FIELDS}, "
                         f"got {tuple(field_dtypes)}")
    for i, name in enumerate(ARRAY_FIELDS):
        mask = 0
        for dtype in field_dtypes[name][1]:
            if dtype.isnative and dtype.num < 64:
                mask |= 1 << dtype.num
        _kept[i] = mask
    fields = dataclasses.fields(eid_type)
    slots = tuple(eid_type.__dict__.get(f.name) for f in fields)
    if (len(slots) > MAX_EID_FIELDS
            or not all(type(slot) is types.MemberDescriptorType
                       and (<PyMemberDescrObject*>slot).d_member.type == T_OBJECT_EX
                       for slot in slots)
            or hasattr(eid_type, "__post_init__")
            or not all(f.init and (f.default is not dataclasses.MISSING
                                   or f.default_factory is not dataclasses.MISSING)
                       for f in fields)):
        raise TypeError(f"{eid_type.__qualname__} must be a dataclass(slots=True) without "
                        f"__post_init__ whose fields all have defaults")
    _eid_names = tuple(f.name for f in fields)
    _eid_slots = slots
    _eid_defaults = tuple(None if f.default is dataclasses.MISSING else f.default
                          for f in fields)
    _eid_factories = tuple(None if f.default is not dataclasses.MISSING else f.default_factory
                           for f in fields)
    for i, slot in enumerate(slots):
        _eid_offsets[i] = (<PyMemberDescrObject*>slot).d_member.offset
        _eid_suffix[i] = _eid_factories[i] is new_suffix
    _as_array, _to_torch, _eid_type = as_array, to_torch, eid_type


cdef object _new_eid():
    """``EID()``: the instance made without the Python call, each slot set from its default.
    A new instance's slots are empty (NULL): each is filled in place, as the slot descriptor
    would do it, without the descriptor call."""
    eid = _bare(_eid_type)
    cdef Py_ssize_t i
    for i in range(len(_eid_slots)):
        factory = _eid_factories[i]
        if factory is None:
            value = _eid_defaults[i]
        elif _eid_suffix[i]:
            value = _suffix()
        else:
            value = factory()
        Py_INCREF(value)
        (<PyObject**>(<char*><PyObject*>eid + _eid_offsets[i]))[0] = <PyObject*>value
    return eid


cdef object eid_field(object eid, Py_ssize_t i):
    if type(eid) is not _eid_type:
        return getattr(eid, _eid_names[i])
    slot = _eid_slots[i]
    return Py_TYPE(slot).tp_descr_get(slot, eid, _eid_type)


cdef object _bare(type cls):
    """``cls.__new__(cls)`` without the attribute lookup: ``__init__`` is not run."""
    return (<PyTypeObject*>cls).tp_new(cls, <PyObject*>_no_args, NULL)


cdef int _bind_model() except -1:
    # An Experience used before fastrollout.experience.model was imported (one unpickled by
    # a process that never imported it): importing the module calls bind().
    import fastrollout.experience.model
    return 0


cdef bint kept_as_is(object value, int field) noexcept:
    if not cnp.PyArray_CheckExact(value):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>value
    cdef int num = cnp.PyArray_TYPE(a)
    return (cnp.PyArray_NDIM(a) == 1 and 0 <= num < 64 and (_kept[field] >> num) & 1
            and cnp.PyArray_ISNOTSWAPPED(a))


cdef inline object _array(object value, int field):
    """``as_array(value, ARRAY_FIELDS[field])``, without the call when value is kept as is."""
    return value if kept_as_is(value, field) else _as_array(value, ARRAY_FIELDS[field])


cdef inline int _set_field(exp, Py_ssize_t i, value) except -1:
    """Store field ``FIELDS[i]`` through its descriptor (no attribute lookup)."""
    slot = _field_slots[i]
    return Py_TYPE(slot).tp_descr_set(slot, exp, value)


def _unpickle(type cls, tuple values):
    if len(values) != len(_field_slots):
        raise ValueError(f"expected {len(_field_slots)} Experience fields, got {len(values)}")
    exp = _bare(cls)
    cdef Py_ssize_t i
    for i in range(len(values)):
        _set_field(exp, i, values[i])
    return exp


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
        if _eid_type is None:
            _bind_model()
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
            eid = _new_eid()
        elif isinstance(eid, dict):
            eid = _eid_type(**eid)
        self.eid = eid

    @classmethod
    def _from_parts(cls, dict fields):
        """Build from already validated parts (decoders): no conversion, views stay views."""
        exp = _bare(cls)
        cdef Py_ssize_t i
        for i in range(len(_field_slots)):
            _set_field(exp, i, fields.get(_FIELDS[i]))
        return exp

    def to_torch(self):
        """The array fields that are set, as tensors sharing memory with the numpy arrays."""
        if _to_torch is None:
            _bind_model()
        return {name: _to_torch(value) for name in ARRAY_FIELDS
                if (value := getattr(self, name)) is not None}

    def __reduce__(self):
        # Fields by position; a subclass's own state (its __dict__ / __slots__, or what its
        # __getstate__ returns) rides along in the standard form pickle restores itself.
        state = None if type(self) is Experience else self.__getstate__()
        return _unpickle, (type(self), tuple([getattr(self, name) for name in FIELDS])), state

    def __repr__(self):
        return (f"Experience(eid={self.eid.uid!r}, tokens={len(self.tokens)}, "
                f"prompt_length={self.prompt_length}, reward={self.reward})")


_field_slots = tuple(Experience.__dict__[name] for name in FIELDS)
