"""Per-task metric bookkeeping in C: one run's task-level metrics, and the batch tally.

Both run once per finished task. ``single_run_metrics`` is the common case of
``calculate_task_level_metrics`` (a task of one run); ``MetricTally`` keeps a batch's
aggregate current as task-level dicts arrive, so that closing a batch costs O(keys), not
O(tasks): a key is looked up once in a dict of group numbers and its running statistics are
C doubles (in Python each update made a dozen float objects).

``:sum``/``:max``/``:min``/``:last`` values are those of Python's sequential ``sum``/``max``/
``min``, bit for bit.
"""
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.math cimport fabs, isfinite, sqrt

from fastrollout.metric_keys import AggType, batch_group, key_type_error, single_run_plan

# C globals: read for every key, they cost less than module-attribute lookups.
cdef object _batch_group = batch_group
cdef object _single_run_plan = single_run_plan
cdef object _MEAN = AggType.MEAN


cdef int _check_key(key) except -1:
    """For the keys that are not parsed (of skipped values): they must be str all the same."""
    if not isinstance(key, str):
        raise key_type_error(key)
    return 0


cdef inline bint _number(object key, object item, double* value) except -1:
    """A metric value counts if it is an int or a float (bools and float subclasses too, as
    in Trinity): stored in ``value``, True. Anything else is skipped: False (its key, left
    unparsed, must be a str all the same)."""
    if type(item) is float:
        value[0] = item
    elif isinstance(item, (int, float)):
        value[0] = float(item)
    else:
        _check_key(key)
        return False
    return True


cdef object _none_if_str_keys(metric_dict):
    """None, once every key of ``metric_dict`` is known to be a str."""
    for key in metric_dict:
        _check_key(key)
    return None


def single_run_metrics(metric_dict, bint is_eval):
    """What ``calculate_task_level_metrics([metric_dict], is_eval)`` gives, each value reduced
    alone; None when that does not hold: two keys share a group, or an eval task has a mean
    key that is not a time (it gets ``mean@1``...). A task whose runs report only timings,
    or any train task of one run, takes this path. A key that is not a str raises TypeError."""
    cdef double value
    out = {}
    for key, item in metric_dict.items():
        if not _number(key, item, &value):
            continue
        group, plus_zero, eval_alone = <tuple>_single_run_plan(key)
        if group in out or (is_eval and not eval_alone):
            return _none_if_str_keys(metric_dict)
        # sum((v,)) / 1 for a mean or a sum is 0 + v (so -0.0 becomes 0.0); max/min/last: v
        out[group] = 0.0 + value if plus_zero else value
    return out


cdef class MetricTally:
    """Running aggregation of task-level metric dicts.

    ``summary()`` gives the keys of ``aggregate_metrics`` (``detailed=True``) or
    ``aggregate_eval_metrics`` (``detailed=False``) over the same dicts, in the same order.
    ``:sum``/``:max``/``:min``/``:last`` values are bit-identical (the same sequential
    reductions as Python's ``sum``/``max``/``min``). Mean-key statistics come from a
    compensated running sum and Welford's variance, so ``mean`` and ``std`` may differ from
    numpy's pairwise sums in the last bits; a NaN makes mean, max, min and std NaN, as in
    numpy. Non-numeric values are skipped. A key that is not a str raises TypeError, and the
    dict's keys before it stay counted: check a task's metrics before adding them.
    """

    def __cinit__(self):
        self._by_key = {}
        self._by_group = {}
        self._names = []

    def __dealloc__(self):
        PyMem_Free(self._groups)

    cdef Py_ssize_t _group(self, key) except -1:
        group = _batch_group(key)[0]
        number = self._by_group.get(group)
        if number is None:
            if self._size == self._capacity:
                capacity = max(8, 2 * self._capacity)
                grown = <Group*>PyMem_Realloc(self._groups, capacity * sizeof(Group))
                if grown == NULL:
                    raise MemoryError()
                self._groups, self._capacity = grown, capacity
            number = self._size
            self._groups[number].count = 0
            self._groups[number].is_mean = group[1] is _MEAN
            self._size += 1
            self._names.append(group)
            self._by_group[group] = number
        self._by_key[key] = number
        return number

    def add(self, metrics):
        """Add one task's metrics dict (``{key: number}``)."""
        cdef double value, total, s, delta
        cdef Group* g
        for key, item in metrics.items():
            if not _number(key, item, &value):
                continue
            number = self._by_key.get(key)
            g = &self._groups[self._group(key) if number is None else <Py_ssize_t>number]
            if g.count == 0:
                g.count = 1
                g.total = g.mean = g.hi = g.lo = g.last = value
                g.comp = g.m2 = 0.0
                g.nan_seen = value != value
                continue
            g.count += 1
            total = g.total
            s = total + value
            g.total = s
            if g.is_mean:
                # (Past an infinity there is nothing to compensate: inf - inf would be NaN.)
                if isfinite(s):
                    g.comp += (total - s) + value if fabs(total) >= fabs(value) else (value - s) + total
                delta = value - g.mean
                g.mean += delta / <double>g.count
                g.m2 += delta * (value - g.mean)
                if value != value:
                    g.nan_seen = True
            if value > g.hi:
                g.hi = value
            if value < g.lo:
                g.lo = value
            g.last = value

    def summary(self, prefix: str = "", detailed: bool = True,
                stats=("mean", "max", "min")) -> dict:
        """``{prefix/name/agg or stat: value}`` in the order the groups first appeared."""
        cdef Group* g
        p = f"{prefix}/" if prefix else ""
        out = {}
        nan = float("nan")
        for i in range(self._size):
            g = &self._groups[i]
            name, agg = self._names[i]
            if not g.is_mean:
                out[f"{p}{name}/{agg.value}"] = {"sum": g.total, "max": g.hi, "min": g.lo,
                                                 "last": g.last}[agg.value]
                continue
            values = {"mean": (g.total + g.comp) / <double>g.count, "max": g.hi, "min": g.lo,
                      "std": sqrt(max(g.m2, 0.0) / <double>g.count)}
            if g.nan_seen:
                values = dict.fromkeys(values, nan)
            if not detailed:
                out[f"{p}{name}"] = values["mean"]
            else:
                for stat in stats:
                    if stat in values:
                        out[f"{p}{name}/{stat}"] = values[stat]
        return out
