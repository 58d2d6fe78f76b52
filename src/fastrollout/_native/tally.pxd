# The contract of fastrollout._native.tally: a metric group's running statistics and the
# batch tally's fields, for Cython modules that cimport it.
cimport cython


# One metric group of a batch: (name, agg) of aggregate_metrics, its statistics as C doubles.
cdef struct Group:
    Py_ssize_t count
    double total        # running sum
    double comp         # Neumaier's compensation of the sum (mean groups)
    double mean         # Welford's running mean and sum of squared deviations (mean groups)
    double m2
    double hi
    double lo
    double last
    bint nan_seen
    bint is_mean


@cython.final
cdef class MetricTally:
    cdef Group* _groups         # PyMem-owned, group number -> statistics
    cdef Py_ssize_t _size
    cdef Py_ssize_t _capacity
    cdef dict _by_key           # metric key -> group number
    cdef dict _by_group         # (name, AggType) -> group number
    cdef list _names            # group number -> (name, AggType)

    # The group number of ``key``, made on the key's first appearance.
    cdef Py_ssize_t _group(self, key) except -1
