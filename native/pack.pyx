"""Experiences to a batch's columns and back: the compiled half of ``ExperienceBatch``.

``pack`` (``ExperienceBatch.from_experiences``) runs for every 256 experiences the pipeline
finishes: each array field is gathered by one C loop over the experiences' slots, lengths
and offsets are summed in C, and the values are copied with ``memcpy`` into one buffer when
every value is already what ``Experience`` keeps (an exact 1-D native-endian ndarray of an
allowed dtype, of one dtype across the column). Any other value goes through ``as_array``
first, and any other mix of dtypes or layouts through ``np.concatenate``: the same
conversions and errors as the pure Python version had. Experience instances, subclasses
included, are read from their C slots; other items (duck-typed objects, Trinity's
Experience) by attribute name.

``check`` is what the runner asks of each task's experiences when its attempt ends: that
``pack`` takes them (and the codec writes them), so that one bad experience fails its task,
not every task packed with it.

``unpack`` (``ExperienceBatch.__getitem__``, ``to_experiences``) builds Experience objects
in one pass over the items: each array field a view into its column made with the numpy C
API (cheaper than slicing), each EID without a call of its ``__init__``, and the fields of a
``WireItem`` (or ``WireEID``) read with one ``msgspec.structs.astuple`` (cheaper than one
attribute at a time; benchmarks/bench_experience.py, decode own format).

This module imports leaf modules only (``fields``, ``column``, ``wire``, ``eid``), none of which
imports it back.
"""
cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from libc.math cimport NAN
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from fastrollout._native.experience cimport (Experience, F_ACTION_MASK, F_ADVANTAGES, F_CHOSEN,
                                              F_LOGPROBS, F_REJECTED, F_RETURNS,
                                              F_TEACHER_LOGPROBS, F_TOKEN_LEVEL_REWARD,
                                              F_TOKENS, N_ARRAY_FIELDS, eid_field,
                                              kept_as_is, make_eid)

import msgspec
import numpy as np

from fastrollout.experience.column import ArrayColumn
from fastrollout.experience.eid import EID
from fastrollout.experience.fields import ARRAY_FIELDS, as_array
from fastrollout.experience.wire import WireEID, WireItem

cnp.import_array()

cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "fastrollout._native.pack stores native values into little-endian columns"
    #endif
    """

cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyArray_Descr
    PyTypeObject PyArray_Type
    object PyArray_NewFromDescr(PyTypeObject* subtype, PyArray_Descr* descr, int nd,
                                cnp.npy_intp* dims, cnp.npy_intp* strides, void* data,
                                int flags, PyObject* obj)

# The wire records are built and read by position, their fields in this order.
_EID_FIELDS = ("batch", "task", "run", "step", "suffix")
_ITEM_FIELDS = ("eid", "info", "metrics", "response_text", "prompt_text", "truncate_status",
                "messages", "tools", "chosen_messages", "rejected_messages")
if WireEID.__struct_fields__ != _EID_FIELDS or WireItem.__struct_fields__ != _ITEM_FIELDS:
    raise ImportError(f"WireEID must have the fields {_EID_FIELDS} and WireItem the fields "
                      f"{_ITEM_FIELDS}, in this order")

cdef object _from_offsets = ArrayColumn.from_offsets
cdef object _astuple = msgspec.structs.astuple
cdef object _WireEID = WireEID
cdef object _WireItem = WireItem


# ---------------------------------------------------------------- experiences -> columns
cdef object _attr(object exp, Py_ssize_t i, str name):
    """``exp.<name>`` of an item that is not an Experience; a missing field names the item."""
    try:
        return getattr(exp, name)
    except AttributeError as exc:
        raise TypeError(f"experience {i} ({type(exp).__qualname__}) has no field {name!r}; "
                        f"expected an Experience") from exc


cdef inline object _array_field(object exp, Py_ssize_t i, int field):
    if not isinstance(exp, Experience):
        return _attr(exp, i, ARRAY_FIELDS[field])
    cdef Experience e = <Experience>exp
    if field == F_TOKENS:
        return e.tokens
    if field == F_LOGPROBS:
        return e.logprobs
    if field == F_TOKEN_LEVEL_REWARD:
        return e.token_level_reward
    if field == F_ADVANTAGES:
        return e.advantages
    if field == F_RETURNS:
        return e.returns
    if field == F_ACTION_MASK:
        return e.action_mask
    if field == F_CHOSEN:
        return e.chosen
    if field == F_REJECTED:
        return e.rejected
    return e.teacher_logprobs


cdef unsigned _fields_set(tuple exps):
    """Bit ``f``: some experience may have ``ARRAY_FIELDS[f]`` (every bit for an item that is
    not an Experience). Most fields are unset in every experience, and this one pass over
    the slots, with no references taken, is what finds them."""
    cdef unsigned bits = 0
    cdef Experience e
    for exp in exps:
        if not isinstance(exp, Experience):
            return (1U << N_ARRAY_FIELDS) - 1
        e = <Experience>exp
        bits |= ((e.tokens is not None) << F_TOKENS
                 | (e.logprobs is not None) << F_LOGPROBS
                 | (e.token_level_reward is not None) << F_TOKEN_LEVEL_REWARD
                 | (e.advantages is not None) << F_ADVANTAGES
                 | (e.returns is not None) << F_RETURNS
                 | (e.action_mask is not None) << F_ACTION_MASK
                 | (e.chosen is not None) << F_CHOSEN
                 | (e.rejected is not None) << F_REJECTED
                 | (e.teacher_logprobs is not None) << F_TEACHER_LOGPROBS)
    return bits


cdef cnp.ndarray _mask(Py_ssize_t n, Py_ssize_t first):
    """The presence mask of n items, made when item ``first`` is found absent: True before
    it, the rest for the caller to fill."""
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray mask = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_BOOL, 0)
    cdef cnp.npy_bool* flags = <cnp.npy_bool*>cnp.PyArray_DATA(mask)
    cdef Py_ssize_t i
    for i in range(min(first, n)):
        flags[i] = True
    return mask


cdef object pack_column(tuple exps, int field):
    """Field ``field`` of every experience as an ArrayColumn over one contiguous
    little-endian buffer of the dtype all values promote to, with int64 offsets (n + 1) and
    a bool mask (None when every experience has the field); None when none has it."""
    cdef Py_ssize_t n = len(exps), i, k
    cdef list values = []
    cdef cnp.ndarray present = None
    cdef cnp.npy_bool* flags = NULL
    cdef uint64_t nums = 0      # bit n: some value has dtype number n
    cdef bint kept = True
    cdef cnp.npy_intp dim = n
    name = ARRAY_FIELDS[field]
    for i in range(n):
        value = _array_field(exps[i], i, field)
        if value is None:
            if present is None:
                present = _mask(n, i)
                flags = <cnp.npy_bool*>cnp.PyArray_DATA(present)
            flags[i] = False
            continue
        if flags != NULL:
            flags[i] = True
        values.append(value)
        if kept and kept_as_is(value, field):
            nums |= 1ULL << cnp.PyArray_TYPE(<cnp.ndarray>value)
        else:
            kept = False
    cdef Py_ssize_t count = len(values)
    if count == 0:
        return None
    if kept:
        dtype = np.result_type(*[cnp.PyArray_DescrFromType(num) for num in range(64)
                                 if (nums >> num) & 1])
    else:
        values = [as_array(value, name) for value in values]
        dtype = np.result_type(*{value.dtype for value in values})
    dtype = dtype.newbyteorder("<")

    # Offsets, and whether every value can be copied byte for byte into the column.
    dim = n + 1
    cdef cnp.ndarray offsets = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT64, 0)
    cdef int64_t* off = <int64_t*>cnp.PyArray_DATA(offsets)
    cdef int num = dtype.num
    cdef bint raw = dtype.isnative
    cdef cnp.ndarray a
    off[0] = 0
    k = 0
    for i in range(n):
        if flags != NULL and not flags[i]:
            off[i + 1] = off[i]
            continue
        value = values[k]
        k += 1
        if not cnp.PyArray_Check(value) or cnp.PyArray_NDIM(<cnp.ndarray>value) != 1:
            raise ValueError(f"Experience.{name} of experience {i} is not a 1-D array")
        a = <cnp.ndarray>value
        off[i + 1] = off[i] + cnp.PyArray_DIM(a, 0)
        raw = raw and (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(a) == num
                       and cnp.PyArray_ISNOTSWAPPED(a) and cnp.PyArray_IS_C_CONTIGUOUS(a))
    if not raw:
        return _from_offsets(np.concatenate(values, dtype=dtype), offsets, present)

    dim = off[n]
    cdef cnp.ndarray data = cnp.PyArray_EMPTY(1, &dim, num, 0)
    cdef char* out = <char*>cnp.PyArray_DATA(data)
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(data)
    cdef Py_ssize_t size = dim * itemsize, pos = 0, nbytes
    for k in range(count):
        # The checks above ran before allocating; nothing may have changed since, but a copy
        # that would not fit or match is refused rather than trusted.
        a = <cnp.ndarray>values[k]
        nbytes = cnp.PyArray_DIM(a, 0) * itemsize
        if (cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_TYPE(a) != num or nbytes > size - pos
                or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
            raise RuntimeError(f"Experience.{name} changed while being packed")
        memcpy(out + pos, cnp.PyArray_DATA(a), nbytes)
        pos += nbytes
    if pos != size:
        raise RuntimeError(f"Experience.{name} changed while being packed")
    return _from_offsets(data, offsets, present)


cdef tuple _rewards(tuple exps):
    """float64 rewards (NaN for None) and a presence mask, None unless some reward is None."""
    cdef Py_ssize_t n = len(exps), i, first = 0
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray rewards = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_FLOAT64, 0)
    cdef double* out = <double*>cnp.PyArray_DATA(rewards)
    cdef cnp.ndarray present = None
    cdef cnp.npy_bool* flags = NULL
    cdef list rest = None       # values from the first one that is neither None nor a float
    for i in range(n):
        exp = exps[i]
        reward = (<Experience>exp).reward if isinstance(exp, Experience) else \
            _attr(exp, i, "reward")
        if reward is None:
            if present is None:
                present = _mask(n, i)
                flags = <cnp.npy_bool*>cnp.PyArray_DATA(present)
            flags[i] = False
        elif flags != NULL:
            flags[i] = True
        if rest is not None:
            rest.append(reward)
        elif reward is None:
            out[i] = NAN
        elif type(reward) is float:
            out[i] = PyFloat_AS_DOUBLE(reward)
        else:
            rest = [reward]
            first = i
    if rest is not None:    # numpy converts the rest, as np.fromiter would have
        rewards[first:] = np.fromiter(rest, np.float64, n - first)
    return rewards, present


cdef object _prompt_lengths(tuple exps):
    """int64 prompt lengths."""
    cdef Py_ssize_t n = len(exps), i, first = 0
    cdef cnp.npy_intp dim = n
    cdef cnp.ndarray plens = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT64, 0)
    cdef int64_t* out = <int64_t*>cnp.PyArray_DATA(plens)
    cdef int overflow = 0
    cdef list rest = None       # values from the first one that is not an int of 64 bits
    for i in range(n):
        exp = exps[i]
        plen = (<Experience>exp).prompt_length if isinstance(exp, Experience) else \
            _attr(exp, i, "prompt_length")
        if rest is not None:
            rest.append(plen)
            continue
        if type(plen) is int:
            out[i] = PyLong_AsLongLongAndOverflow(plen, &overflow)
            if not overflow:
                continue
        rest = [plen]
        first = i
    if rest is not None:    # numpy converts (or refuses) the rest, as np.fromiter would have
        plens[first:] = np.fromiter(rest, np.int64, n - first)
    return plens


cdef inline object _wire_eid(object eid):
    """The WireEID of an EID (or of any object with its field names)."""
    return _WireEID(eid_field(eid, 0), eid_field(eid, 1), eid_field(eid, 2),
                    eid_field(eid, 3), eid_field(eid, 4))


cdef list _items(tuple exps):
    """One ``WireItem(WireEID(batch, task, run, step, suffix), info, metrics, ...)`` per
    experience, in the field order of ``fastrollout.experience.batch.WireItem``."""
    cdef Py_ssize_t n = len(exps), i
    cdef list items = []
    cdef Experience e
    for i in range(n):
        exp = exps[i]
        if isinstance(exp, Experience):
            e = <Experience>exp
            items.append(_WireItem(
                _wire_eid(e.eid), e.info,
                e.metrics, e.response_text, e.prompt_text, e.truncate_status, e.messages,
                e.tools, e.chosen_messages, e.rejected_messages))
        else:
            items.append(_WireItem(
                _wire_eid(_attr(exp, i, "eid")),
                _attr(exp, i, "info"), _attr(exp, i, "metrics"), _attr(exp, i, "response_text"),
                _attr(exp, i, "prompt_text"), _attr(exp, i, "truncate_status"),
                _attr(exp, i, "messages"), _attr(exp, i, "tools"),
                _attr(exp, i, "chosen_messages"), _attr(exp, i, "rejected_messages")))
    return items


def pack(exps):
    """The arguments of ``ExperienceBatch(items, columns, rewards, reward_present,
    prompt_lengths)`` for ``exps``: an iterable of Experience, or of objects with its fields."""
    cdef tuple seq = tuple(exps)
    cdef dict columns = {}
    cdef unsigned fields = _fields_set(seq)
    cdef int field
    for field in range(N_ARRAY_FIELDS):
        if not (fields >> field) & 1:
            continue
        column = pack_column(seq, field)
        if column is not None:
            columns[ARRAY_FIELDS[field]] = column
    if seq:
        tokens = columns.get("tokens")
        if tokens is None or tokens.present is not None:
            i = 0 if tokens is None else int(np.argmin(tokens.present))
            raise ValueError(f"experience {i} has no tokens; every experience needs them")
    rewards, reward_present = _rewards(seq)
    plens = _prompt_lengths(seq)
    return _items(seq), columns, rewards, reward_present, plens


# ---------------------------------------------------------------- what pack takes
cdef object _EID = EID
cdef tuple _NUMBERS = (int, float, np.integer, np.floating)
cdef tuple _INTS = (int, np.integer)
cdef tuple _EID_WHAT = tuple(f"eid.{name}" for name in _EID_FIELDS)


cdef int _bad(Py_ssize_t i, str what, object value, str expected) except -1:
    raise TypeError(f"experience {i}: {what} must be {expected}, got {type(value).__name__} "
                    f"{value!r:.40}")


cdef int _check_array(Py_ssize_t i, int field, object value) except -1:
    try:
        as_array(value, ARRAY_FIELDS[field])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"experience {i}: {exc}") from None
    return 0


cdef int _check_int(Py_ssize_t i, str what, object value, bint word) except -1:
    """``value`` is an int (numpy ints too); ``word``: one that fits 64 bits."""
    cdef int overflow = 0
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, _INTS):
            return _bad(i, what, value, "an int")
        value = int(value)
    if word:
        PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            return _bad(i, what, value, "a 64-bit int")
    return 0


cdef inline int _optional(Py_ssize_t i, str name, object value, type kind) except -1:
    if value is not None and not isinstance(value, kind):
        _bad(i, name, value, f"a {kind.__name__} or None")
    return 0


cpdef check(list exps):
    """Raise TypeError/ValueError naming experience ``i`` and its field unless every item of
    ``exps`` is an Experience that ``pack`` takes and the codec writes: arrays of their
    field's kind, a numeric or None reward, an int ``prompt_length`` within the tokens, an
    ``EID`` of ints and strs, dict ``info`` and ``metrics``, str or None texts, list or None
    messages. The runner checks each task's experiences so when its attempt ends: one the
    pipeline could not pack would fail every task packed with it."""
    cdef Py_ssize_t i, n_tokens
    cdef int f
    cdef int overflow = 0
    cdef long long plen
    cdef Experience e
    for i in range(len(exps)):
        exp = exps[i]
        if not isinstance(exp, Experience):
            raise TypeError(f"experience {i}: expected an Experience, got {type(exp).__name__}")
        e = <Experience>exp
        if e.tokens is None:
            raise ValueError(f"experience {i}: tokens: every experience needs tokens")
        for f in range(N_ARRAY_FIELDS):
            value = _array_field(e, i, f)
            if value is not None and not kept_as_is(value, f):
                _check_array(i, f, value)
        n_tokens = len(e.tokens)
        value = e.prompt_length
        if type(value) is not int:
            _check_int(i, "prompt_length", value, False)
            value = int(value)
        plen = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow or not 0 <= plen <= n_tokens:
            raise ValueError(f"experience {i}: prompt_length {e.prompt_length} is outside "
                             f"0..{n_tokens} (the number of tokens)")
        reward = e.reward
        if reward is not None and type(reward) is not float and (
                isinstance(reward, bool) or not isinstance(reward, _NUMBERS)):
            _bad(i, "reward", reward, "a number or None")
        eid = e.eid
        if type(eid) is not _EID and not isinstance(eid, _EID):
            _bad(i, "eid", eid, "an EID")
        for f in range(4):
            value = eid_field(eid, f)
            if f < 2 and type(value) is str:
                continue
            _check_int(i, _EID_WHAT[f], value, True)
        if type(eid_field(eid, 4)) is not str:
            _bad(i, "eid.suffix", eid_field(eid, 4), "a str")
        if type(e.info) is not dict:
            _bad(i, "info", e.info, "a dict")
        if type(e.metrics) is not dict:
            _bad(i, "metrics", e.metrics, "a dict")
        # Mostly unset: one test each on the way.
        if e.truncate_status is not None:
            _optional(i, "truncate_status", e.truncate_status, str)
        if e.response_text is not None:
            _optional(i, "response_text", e.response_text, str)
        if e.prompt_text is not None:
            _optional(i, "prompt_text", e.prompt_text, str)
        if e.messages is not None:
            _optional(i, "messages", e.messages, list)
        if e.tools is not None:
            _optional(i, "tools", e.tools, list)
        if e.chosen_messages is not None:
            _optional(i, "chosen_messages", e.chosen_messages, list)
        if e.rejected_messages is not None:
            _optional(i, "rejected_messages", e.rejected_messages, list)


# ---------------------------------------------------------------- columns -> experiences
cdef inline int64_t _int64_at(cnp.ndarray a, Py_ssize_t i) noexcept:
    return (<int64_t*>(cnp.PyArray_BYTES(a) + i * cnp.PyArray_STRIDE(a, 0)))[0]


cdef inline double _float64_at(cnp.ndarray a, Py_ssize_t i) noexcept:
    return (<double*>(cnp.PyArray_BYTES(a) + i * cnp.PyArray_STRIDE(a, 0)))[0]


cdef inline bint _bool_at(cnp.ndarray a, Py_ssize_t i) noexcept:
    return (<cnp.npy_bool*>(cnp.PyArray_BYTES(a) + i * cnp.PyArray_STRIDE(a, 0)))[0] != 0


cdef cnp.ndarray _vector(object values, int num, Py_ssize_t n, str what):
    """``values`` as a 1-D native-endian array of dtype number ``num`` of at least ``n``
    values (itself when it is one)."""
    if not (cnp.PyArray_CheckExact(values) and cnp.PyArray_TYPE(<cnp.ndarray>values) == num
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>values)):
        values = np.asarray(values, dtype=cnp.PyArray_DescrFromType(num))
    cdef cnp.ndarray a = <cnp.ndarray>values
    if cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIM(a, 0) < n:
        raise ValueError(f"ExperienceBatch {what}: expected a 1-D array of {n} values, got "
                         f"shape {np.shape(a)}")
    return a


cdef class ColumnReader:
    """Item ``i`` of an ArrayColumn, as ``column[i]`` gives it: None where absent, else
    ``data[starts[i]:stops[i]]``, made here with the numpy C API when ``data`` is an exact
    1-D array and the slice lies within it."""

    def __cinit__(self, int field, object column, Py_ssize_t n):
        self.field = field
        self.data = column.data
        name = ARRAY_FIELDS[field]
        self.starts = _vector(column.starts, cnp.NPY_INT64, n, f"column {name!r} starts")
        self.stops = _vector(column.stops, cnp.NPY_INT64, n, f"column {name!r} stops")
        present = column.present
        if present is not None:
            self.present = _vector(present, cnp.NPY_BOOL, n, f"column {name!r} present")
        cdef cnp.ndarray a
        if cnp.PyArray_CheckExact(self.data) and cnp.PyArray_NDIM(<cnp.ndarray>self.data) == 1:
            a = <cnp.ndarray>self.data
            self.descr = <object>cnp.PyArray_DESCR(a)
            self.first = cnp.PyArray_BYTES(a)
            self.stride = cnp.PyArray_STRIDE(a, 0)
            self.length = cnp.PyArray_DIM(a, 0)
            self.flags = cnp.PyArray_FLAGS(a) & cnp.NPY_ARRAY_WRITEABLE

    cdef object read(self, Py_ssize_t i):
        if self.present is not None and not _bool_at(self.present, i):
            return None
        cdef cnp.npy_intp start = _int64_at(self.starts, i), stop = _int64_at(self.stops, i)
        if self.first == NULL or not 0 <= start <= stop <= self.length:
            return self.data[start:stop]
        cdef cnp.npy_intp dim = stop - start
        if dim == 0:
            start = 0   # as numpy's slicing makes an empty view: at the first value
        Py_INCREF(self.descr)     # PyArray_NewFromDescr steals it
        view = PyArray_NewFromDescr(&PyArray_Type, <PyArray_Descr*>self.descr, 1, &dim,
                                    &self.stride, self.first + start * self.stride, self.flags,
                                    NULL)
        cnp.set_array_base(view, self.data)
        return view


cdef inline void _set_array(Experience e, int field, object value):
    if field == F_TOKENS:
        e.tokens = value
    elif field == F_LOGPROBS:
        e.logprobs = value
    elif field == F_TOKEN_LEVEL_REWARD:
        e.token_level_reward = value
    elif field == F_ADVANTAGES:
        e.advantages = value
    elif field == F_RETURNS:
        e.returns = value
    elif field == F_ACTION_MASK:
        e.action_mask = value
    elif field == F_CHOSEN:
        e.chosen = value
    elif field == F_REJECTED:
        e.rejected = value
    else:
        e.teacher_logprobs = value


cpdef list unpack(object batch, Py_ssize_t start, Py_ssize_t stop):
    """Experiences ``start`` to ``stop`` of ``batch`` (an ExperienceBatch, or any object with
    its attributes): array fields are views into its columns, metadata objects are its
    items' own."""
    items = batch.items
    cdef Py_ssize_t n = len(items), i
    if not 0 <= start <= stop <= n:
        raise IndexError(f"experiences {start} to {stop} are out of range for a batch of {n}")
    cdef cnp.ndarray rewards = _vector(batch.rewards, cnp.NPY_FLOAT64, n, "rewards")
    cdef cnp.ndarray has_reward = None
    if batch.reward_present is not None:
        has_reward = _vector(batch.reward_present, cnp.NPY_BOOL, n, "reward_present")
    cdef cnp.ndarray plens = _vector(batch.prompt_lengths, cnp.NPY_INT64, n, "prompt_lengths")
    columns = batch.columns
    cdef list readers = []
    cdef int field
    for field in range(N_ARRAY_FIELDS):
        column = columns.get(ARRAY_FIELDS[field])
        if column is not None:
            readers.append(ColumnReader(field, column, n))

    cdef list exps = []
    cdef Experience e
    cdef ColumnReader reader
    cdef tuple values
    for i in range(start, stop):
        e = Experience.__new__(Experience)
        item = items[i]
        if type(item) is _WireItem:
            (eid, e.info, e.metrics, e.response_text, e.prompt_text, e.truncate_status,
             e.messages, e.tools, e.chosen_messages, e.rejected_messages) = _astuple(item)
        else:
            eid = item.eid
            e.info, e.metrics = item.info, item.metrics
            e.response_text, e.prompt_text = item.response_text, item.prompt_text
            e.truncate_status, e.messages, e.tools = item.truncate_status, item.messages, item.tools
            e.chosen_messages, e.rejected_messages = item.chosen_messages, item.rejected_messages
        if type(eid) is _WireEID:
            values = _astuple(eid)
            e.eid = make_eid(values[0], values[1], values[2], values[3], values[4])
        else:
            e.eid = make_eid(eid.batch, eid.task, eid.run, eid.step, eid.suffix)
        e.prompt_length = _int64_at(plens, i)
        e.reward = (_float64_at(rewards, i) if has_reward is None or _bool_at(has_reward, i)
                    else None)
        for reader in readers:
            _set_array(e, reader.field, reader.read(i))
        exps.append(e)
    return exps

