"""Experiences into columns: the compiled half of ``ExperienceBatch.from_experiences``.

The pipeline packs every 256 finished experiences, so this runs per experience: each array
field is gathered by one C loop over the experiences' slots, lengths and offsets are summed
in C, and the values are copied with ``memcpy`` into one buffer when every value is already
what ``Experience`` keeps (an exact 1-D native-endian ndarray of an allowed dtype, of one
dtype across the column). Any other value goes through ``as_array`` first, and any other
mix of dtypes or layouts through ``np.concatenate``: the same conversions and errors as the
pure Python version had.

Experience instances, subclasses included, are read from their C slots (the fields the
decoders fill); other items (duck-typed objects, Trinity's Experience) by attribute name.
"""
cimport numpy as cnp
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.math cimport NAN
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

from fastrollout._native.experience cimport (Experience, F_ACTION_MASK, F_ADVANTAGES, F_CHOSEN,
                                              F_LOGPROBS, F_REJECTED, F_RETURNS,
                                              F_TEACHER_LOGPROBS, F_TOKEN_LEVEL_REWARD,
                                              F_TOKENS, N_ARRAY_FIELDS, eid_field,
                                              kept_as_is)

import numpy as np

from fastrollout._native.experience import ARRAY_FIELDS

cnp.import_array()

cdef extern from *:
    """
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "fastrollout._native.pack stores native values into little-endian columns"
    #endif
    """

cdef object _as_array = None
cdef object _column_type = None
cdef object _item_type = None
cdef object _eid_type = None


def bind(*, as_array, column_type, item_type, eid_type):
    """Hand in what ``fastrollout.experience`` owns: ``as_array`` (from ``model``),
    ``ArrayColumn.from_offsets`` and the ``WireItem`` and ``WireEID`` classes the parts are
    built with (from ``batch``, which calls this when imported)."""
    global _as_array, _column_type, _item_type, _eid_type
    _as_array, _column_type, _item_type, _eid_type = as_array, column_type, item_type, eid_type


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


cdef object _column(tuple exps, int field):
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
        values = [_as_array(value, name) for value in values]
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
        return _column_type(np.concatenate(values, dtype=dtype), offsets, present)

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
    return _column_type(data, offsets, present)


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
    """WireEID lists EID's fields in EID's order (``batch`` checks it)."""
    return _eid_type(eid_field(eid, 0), eid_field(eid, 1), eid_field(eid, 2),
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
            items.append(_item_type(
                _wire_eid(e.eid), e.info,
                e.metrics, e.response_text, e.prompt_text, e.truncate_status, e.messages,
                e.tools, e.chosen_messages, e.rejected_messages))
        else:
            items.append(_item_type(
                _wire_eid(_attr(exp, i, "eid")),
                _attr(exp, i, "info"), _attr(exp, i, "metrics"), _attr(exp, i, "response_text"),
                _attr(exp, i, "prompt_text"), _attr(exp, i, "truncate_status"),
                _attr(exp, i, "messages"), _attr(exp, i, "tools"),
                _attr(exp, i, "chosen_messages"), _attr(exp, i, "rejected_messages")))
    return items


def pack(exps):
    """The arguments of ``ExperienceBatch(items, columns, rewards, reward_present,
    prompt_lengths)`` for ``exps``: an iterable of Experience, or of objects with its fields."""
    if _as_array is None:
        import fastrollout.experience.batch     # binds what this module builds with
    cdef tuple seq = tuple(exps)
    cdef dict columns = {}
    cdef unsigned fields = _fields_set(seq)
    cdef int field
    for field in range(N_ARRAY_FIELDS):
        if not (fields >> field) & 1:
            continue
        column = _column(seq, field)
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
