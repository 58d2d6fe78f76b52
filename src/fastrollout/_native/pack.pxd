# The contract of fastrollout._native.pack: experiences into a batch's columns and back, for
# Cython modules that cimport it.
cimport numpy as cnp


# Item by item reads of one ArrayColumn of a batch of n experiences.
cdef class ColumnReader:
    cdef readonly int field         # the index of its field in ARRAY_FIELDS
    cdef object data                # the column's values (any sliceable)
    cdef cnp.ndarray starts, stops  # int64, native
    cdef cnp.ndarray present        # bool, native; None when every item has the field
    # When data is an exact 1-D ndarray: its dtype, first value, stride, length and
    # writeable flag, what its views are made of (else first is NULL).
    cdef object descr
    cdef char* first
    cdef cnp.npy_intp stride, length
    cdef int flags

    # Item i of the column: None where absent, else data[starts[i]:stops[i]].
    cdef object read(self, Py_ssize_t i)


# Field ``ARRAY_FIELDS[field]`` of every experience as one ArrayColumn, or None when no
# experience has it.
cdef object pack_column(tuple exps, int field)

# Experiences start to stop of an ExperienceBatch, as Experience objects.
cpdef list unpack(object batch, Py_ssize_t start, Py_ssize_t stop)

# Raises TypeError/ValueError naming the experience and field unless pack takes every item.
cpdef check(list exps)
