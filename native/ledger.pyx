"""The task ledger: the one record of every started task's state, in C structs.

A task gets a row (a ``TaskSlot`` struct in a growable array) when it starts; its state,
run counts, attempts and timestamps live there and nowhere else. A batch is a row of O(1)
counters (submitted, running, done, failed, cancelled, retries), so a batch's progress is a
few field reads. Every state change goes through ``TaskLedger._set_state``, which rejects
illegal moves. The struct array lives in a numpy buffer, so ``columns()`` is a zero-copy
view; growth moves to a new buffer and old views keep the old one alive (they stay
readable, frozen at the moment of growth). Python keeps only Python objects (experiences,
metrics) beside it.
"""
cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.object cimport PyObject, PyObject_GenericSetAttr, PyTypeObject

from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object op)

import collections

import numpy as np

from fastrollout.errors import StatusError

cnp.import_array()

cdef extern from *:
    """
    #ifndef FASTROLLOUT_DEBUG
    #define FASTROLLOUT_DEBUG 0
    #endif
    """
    # Set by setup.py; invariant checks and live-object counters compile away at 0.
    const bint FASTROLLOUT_DEBUG

DEBUG = bool(FASTROLLOUT_DEBUG)

# The enum values as Python ints; STATE_NAMES[state] names a state in messages.
globals().update(TASK_FREE=TASK_FREE, TASK_PENDING=TASK_PENDING, TASK_RUNNING=TASK_RUNNING,
                 TASK_DONE=TASK_DONE, TASK_FAILED=TASK_FAILED, TASK_CANCELLED=TASK_CANCELLED)
STATE_NAMES = ("FREE", "PENDING", "RUNNING", "DONE", "FAILED", "CANCELLED")

TASK_DTYPE = np.dtype([
    ("start_ns", np.int64), ("end_ns", np.int64), ("batch", np.int32), ("task", np.int32),
    ("state", np.int32), ("total_runs", np.int32), ("completed_runs", np.int32),
    ("failed_runs", np.int32), ("subtasks", np.int32), ("finished_subtasks", np.int32),
    ("attempts", np.int32), ("prev", np.int32), ("next", np.int32), ("_pad", np.int32),
])
# The columns of one batch's rows that ``batch_tasks`` returns.
BATCH_TASK_FIELDS = ("task", "state", "total_runs", "completed_runs", "failed_runs",
                     "attempts", "start_ns", "end_ns")

BatchProgress = collections.namedtuple(
    "BatchProgress", ("submitted", "queued", "running", "done", "failed", "cancelled", "retries"))
BatchProgress.__doc__ = """A batch's tasks by state: ``queued`` (not started yet), ``running``,
``done`` (every run completed), ``failed`` (all attempts made, some runs failed) and
``cancelled``; ``retries`` counts attempts after a task's first, over all its sub-tasks."""

# _LEGAL[from] has bit `to` set for every allowed move.
cdef unsigned int[6] _LEGAL = [
    1 << TASK_PENDING,                                        # from FREE
    (1 << TASK_RUNNING) | (1 << TASK_CANCELLED),              # from PENDING
    (1 << TASK_DONE) | (1 << TASK_FAILED) | (1 << TASK_CANCELLED),  # from RUNNING
    1 << TASK_FREE,                                           # from DONE
    1 << TASK_FREE,                                           # from FAILED
    1 << TASK_FREE,                                           # from CANCELLED
]

cdef Py_ssize_t _MAX_SLOTS = 0x7FFFFFFF   # slot ids are stored as int32
cdef Py_ssize_t _live_ledgers = 0         # debug builds only
cdef tuple _no_args = ()


def _check_layout():
    # The dtype must describe TaskSlot byte for byte, or the views would read garbage.
    cdef TaskSlot t
    cdef char* base = <char*>&t
    offsets = {
        "start_ns": <char*>&t.start_ns - base, "end_ns": <char*>&t.end_ns - base,
        "batch": <char*>&t.batch - base, "task": <char*>&t.task - base,
        "state": <char*>&t.state - base,
        "total_runs": <char*>&t.total_runs - base, "completed_runs": <char*>&t.completed_runs - base,
        "failed_runs": <char*>&t.failed_runs - base, "subtasks": <char*>&t.subtasks - base,
        "finished_subtasks": <char*>&t.finished_subtasks - base, "attempts": <char*>&t.attempts - base,
        "prev": <char*>&t.prev - base, "next": <char*>&t.next - base,
        "_pad": <char*>&t._pad - base,
    }
    actual = {name: TASK_DTYPE.fields[name][1] for name in TASK_DTYPE.names}
    if offsets != actual or TASK_DTYPE.itemsize != sizeof(TaskSlot):
        raise ImportError(f"TASK_DTYPE {actual} (itemsize {TASK_DTYPE.itemsize}) does not match "
                          f"struct TaskSlot {offsets} (size {sizeof(TaskSlot)}); rebuild the extension")


_check_layout()
SLOT_BYTES = sizeof(TaskSlot)


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int _illegal(Py_ssize_t slot, int batch, int old, int new) except -1:
    raise StatusError(f"task slot {slot} (batch {batch}): illegal transition "
                      f"{STATE_NAMES[old]} -> {STATE_NAMES[new]}")


cdef int _wrong_state(Py_ssize_t slot, int batch, int state, str op, str expected) except -1:
    raise StatusError(f"task slot {slot} (batch {batch}): cannot {op} a task in state "
                      f"{STATE_NAMES[state]} (expected {expected})")


cdef object _new_buffer(Py_ssize_t capacity):
    buf = np.zeros(capacity, dtype=TASK_DTYPE)
    buf["batch"] = -1
    return buf


cdef class TaskLedger:
    """Task and batch bookkeeping. Task and batch ids are slot indices (ints) that are
    reused after ``release``/``drop_batch``; capacity grows on demand."""

    def __cinit__(self, Py_ssize_t capacity=1024, Py_ssize_t batch_capacity=16):
        global _live_ledgers
        if FASTROLLOUT_DEBUG:
            _live_ledgers += 1   # first: __dealloc__ runs even when __cinit__ raises
        if capacity < 1 or batch_capacity < 1 or capacity > _MAX_SLOTS or batch_capacity > _MAX_SLOTS:
            raise ValueError(f"capacity ({capacity}) and batch_capacity ({batch_capacity}) "
                             f"must be between 1 and {_MAX_SLOTS}")
        self._buf = _new_buffer(capacity)
        self._tasks = <TaskSlot*>cnp.PyArray_DATA(self._buf)
        self._capacity = capacity
        self._top = 0
        self._free = -1
        self._used = 0
        self._batches = <BatchSlot*>PyMem_Realloc(NULL, batch_capacity * sizeof(BatchSlot))
        if self._batches == NULL:
            raise MemoryError(f"cannot allocate {batch_capacity} batch slots")
        self._batch_capacity = batch_capacity
        self._batch_top = 0
        self._batch_free = -1

    def __dealloc__(self):
        global _live_ledgers
        PyMem_Free(self._batches)
        if FASTROLLOUT_DEBUG:
            _live_ledgers -= 1

    # -- internals -------------------------------------------------------------------

    cdef TaskSlot* _task(self, Py_ssize_t slot) except NULL:
        if slot < 0 or slot >= self._top:
            raise StatusError(f"task slot {slot} is out of range (0..{self._top - 1} allocated)")
        cdef TaskSlot* t = &self._tasks[slot]
        if t.state == TASK_FREE:
            raise StatusError(f"task slot {slot} is free (released or dropped with its batch)")
        return t

    cdef BatchSlot* _batch(self, Py_ssize_t bslot) except NULL:
        if bslot < 0 or bslot >= self._batch_top:
            raise StatusError(f"batch slot {bslot} is out of range (0..{self._batch_top - 1} allocated)")
        cdef BatchSlot* b = &self._batches[bslot]
        if not b.in_use:
            raise StatusError(f"batch slot {bslot} is free (dropped)")
        return b

    cdef int _set_state(self, Py_ssize_t slot, TaskSlot* t, int new_state) except -1:
        cdef int old = t.state
        if <unsigned int>old > TASK_CANCELLED or not (_LEGAL[old] >> new_state) & 1:
            return _illegal(slot, t.batch, old, new_state)
        cdef BatchSlot* b = &self._batches[t.batch]
        if old == TASK_RUNNING:
            b.running -= 1
        if new_state == TASK_PENDING:
            b.reached += 1
        elif new_state == TASK_RUNNING:
            b.running += 1
            t.start_ns = _now_ns()
        elif new_state == TASK_DONE:
            b.completed += 1
            t.end_ns = _now_ns()
        elif new_state == TASK_FAILED:
            b.completed += 1
            b.failed += 1
            t.end_ns = _now_ns()
        elif new_state == TASK_CANCELLED:
            b.cancelled += 1
            t.end_ns = _now_ns()
        t.state = new_state
        if FASTROLLOUT_DEBUG:
            self._check_batch(t.batch)
        return 0

    cdef int _check_batch(self, Py_ssize_t bslot) except -1:
        # Debug-build invariant: the counters of a batch are mutually consistent.
        cdef BatchSlot* b = &self._batches[bslot]
        if not (0 <= b.failed <= b.completed and b.running >= 0 and b.cancelled >= 0
                and b.completed + b.running + b.cancelled <= b.reached
                and 0 <= b.held <= b.reached):
            raise AssertionError(
                f"batch slot {bslot} counters broken: reached={b.reached} completed={b.completed} "
                f"failed={b.failed} running={b.running} cancelled={b.cancelled} held={b.held}")
        return 0

    cdef int _grow_tasks(self) except -1:
        if self._capacity >= _MAX_SLOTS:
            raise StatusError(f"task table is full ({_MAX_SLOTS} slots)")
        cdef Py_ssize_t capacity = min(self._capacity * 2, _MAX_SLOTS)
        buf = _new_buffer(capacity)
        cdef TaskSlot* tasks = <TaskSlot*>cnp.PyArray_DATA(buf)
        memcpy(tasks, self._tasks, self._capacity * sizeof(TaskSlot))
        # Views handed out earlier hold a reference to the old buffer, so it is not freed.
        self._buf = buf
        self._tasks = tasks
        self._capacity = capacity
        return 0

    cdef int _grow_batches(self) except -1:
        if self._batch_capacity >= _MAX_SLOTS:
            raise StatusError(f"batch table is full ({_MAX_SLOTS} slots)")
        cdef Py_ssize_t capacity = min(self._batch_capacity * 2, _MAX_SLOTS)
        cdef BatchSlot* batches = <BatchSlot*>PyMem_Realloc(self._batches, capacity * sizeof(BatchSlot))
        if batches == NULL:
            raise MemoryError(f"cannot grow the batch table to {capacity} slots")
        self._batches = batches
        self._batch_capacity = capacity
        return 0

    cdef int _free_slot(self, Py_ssize_t slot, TaskSlot* t) except -1:
        # FINAL -> FREE, unlink from the batch's list, push on the free list.
        self._set_state(slot, t, TASK_FREE)
        cdef BatchSlot* b = &self._batches[t.batch]
        if t.prev >= 0:
            self._tasks[t.prev].next = t.next
        else:
            b.head = t.next
        if t.next >= 0:
            self._tasks[t.next].prev = t.prev
        b.held -= 1
        memset(t, 0, sizeof(TaskSlot))
        t.batch = -1
        t.prev = -1
        t.next = <int32_t>self._free
        self._free = slot
        self._used -= 1
        return 0

    # -- batches ---------------------------------------------------------------------

    cpdef Py_ssize_t add_batch(self, int64_t submitted=0) except -1:
        """A new batch slot (a freed one if any) of ``submitted`` tasks, none started yet."""
        cdef Py_ssize_t bslot = self._batch_free
        if bslot >= 0:
            self._batch_free = self._batches[bslot].next_free
        else:
            if self._batch_top == self._batch_capacity:
                self._grow_batches()
            bslot = self._batch_top
            self._batch_top += 1
        cdef BatchSlot* b = &self._batches[bslot]
        memset(b, 0, sizeof(BatchSlot))
        b.submitted = submitted
        b.head = -1
        b.next_free = -1
        b.in_use = 1
        return bslot

    cpdef void drop_batch(self, Py_ssize_t bslot) except *:
        """Release every task slot the batch still holds (cancelling unfinished ones), then
        the batch slot itself."""
        cdef BatchSlot* b = self._batch(bslot)
        cdef Py_ssize_t slot
        cdef TaskSlot* t
        while b.head >= 0:
            slot = b.head
            t = &self._tasks[slot]
            if t.state == TASK_PENDING or t.state == TASK_RUNNING:
                self._set_state(slot, t, TASK_CANCELLED)
            self._free_slot(slot, t)
        b.in_use = 0
        b.next_free = <int32_t>self._batch_free
        self._batch_free = bslot

    def batch_counts(self, Py_ssize_t bslot):
        """(reached, completed, failed, running, cancelled): tasks given a row, and those that
        reached DONE or FAILED, FAILED, RUNNING now and CANCELLED."""
        cdef BatchSlot* b = self._batch(bslot)
        return (b.reached, b.completed, b.failed, b.running, b.cancelled)

    def progress(self, Py_ssize_t bslot):
        """The batch's ``BatchProgress``. Tasks not started yet have no row: they are the
        submitted ones not reached."""
        cdef BatchSlot* b = self._batch(bslot)
        queued = max(b.submitted, b.reached) - b.completed - b.running - b.cancelled
        return BatchProgress(max(b.submitted, b.reached), queued, b.running,
                             b.completed - b.failed, b.failed, b.cancelled, b.retries)

    def batch_tasks(self, Py_ssize_t bslot):
        """The batch's rows still held (not released), by task index: a structured array with
        the fields ``BATCH_TASK_FIELDS`` (a copy)."""
        cdef BatchSlot* b = self._batch(bslot)
        rows = np.empty(b.held, dtype=np.intp)
        cdef Py_ssize_t[::1] view = rows
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t slot = b.head
        while slot >= 0:
            view[n] = slot
            n += 1
            slot = self._tasks[slot].next
        out = self._buf[rows][list(BATCH_TASK_FIELDS)]
        return out[np.argsort(out["task"], kind="stable")]

    cpdef Py_ssize_t batch_completed(self, Py_ssize_t bslot) except -1:
        """Tasks of the batch that reached DONE or FAILED (released ones included)."""
        return self._batch(bslot).completed

    cpdef Py_ssize_t batch_running(self, Py_ssize_t bslot) except -1:
        return self._batch(bslot).running

    def durations(self, Py_ssize_t bslot):
        """Seconds from first start to end of the batch's DONE/FAILED tasks still held
        (not released), in no particular order."""
        cdef BatchSlot* b = self._batch(bslot)
        out = np.empty(b.held, dtype=np.float64)
        cdef double[::1] view = out
        cdef Py_ssize_t n = 0
        cdef Py_ssize_t slot = b.head
        cdef TaskSlot* t
        while slot >= 0:
            t = &self._tasks[slot]
            if t.state == TASK_DONE or t.state == TASK_FAILED:
                view[n] = (t.end_ns - t.start_ns) * 1e-9
                n += 1
            slot = t.next
        return out[:n]

    # -- tasks -----------------------------------------------------------------------

    cpdef Py_ssize_t add_task(self, Py_ssize_t bslot, int32_t total_runs, int32_t subtasks=1,
                              int32_t task=0) except -1:
        """A new PENDING row for task number ``task`` of the batch; returns its slot."""
        cdef BatchSlot* b = self._batch(bslot)
        if total_runs < 0 or subtasks < 1 or task < 0:
            raise ValueError(f"batch slot {bslot}: a task needs task >= 0, total_runs >= 0 and "
                             f"subtasks >= 1, got task={task} total_runs={total_runs} "
                             f"subtasks={subtasks}")
        cdef Py_ssize_t slot = self._free
        if slot >= 0:
            self._free = self._tasks[slot].next
        else:
            if self._top == self._capacity:
                self._grow_tasks()
            slot = self._top
            self._top += 1
        cdef TaskSlot* t = &self._tasks[slot]
        memset(t, 0, sizeof(TaskSlot))
        t.batch = <int32_t>bslot
        t.task = task
        t.total_runs = total_runs
        t.subtasks = subtasks
        t.prev = -1
        t.next = b.head
        if b.head >= 0:
            self._tasks[b.head].prev = <int32_t>slot
        b.head = <int32_t>slot
        b.held += 1
        self._used += 1
        self._set_state(slot, t, TASK_PENDING)
        return slot

    cpdef void start(self, Py_ssize_t slot, bint retry=False) except *:
        """An attempt begins (``retry``: not the first of its sub-task): PENDING -> RUNNING on
        the first call; while RUNNING only ``attempts`` (and the batch's ``retries``) grow."""
        cdef TaskSlot* t = self._task(slot)
        if t.state != TASK_RUNNING:
            self._set_state(slot, t, TASK_RUNNING)
        t.attempts += 1
        if retry:
            self._batches[t.batch].retries += 1

    cpdef int finish_subtask(self, Py_ssize_t slot, int32_t completed_runs, int32_t failed_runs) except -1:
        """Adds a sub-task's runs; after the last sub-task the task becomes DONE (all runs
        completed) or FAILED. Returns the task's state."""
        cdef TaskSlot* t = self._task(slot)
        if t.state != TASK_RUNNING:
            return _wrong_state(slot, t.batch, t.state, "finish a sub-task of", "RUNNING")
        if (completed_runs < 0 or failed_runs < 0 or
                <int64_t>t.completed_runs + t.failed_runs + completed_runs + failed_runs > t.total_runs):
            raise ValueError(
                f"task slot {slot} (batch {t.batch}): {completed_runs} completed + {failed_runs} failed "
                f"runs do not fit (already {t.completed_runs} + {t.failed_runs} of {t.total_runs})")
        t.completed_runs += completed_runs
        t.failed_runs += failed_runs
        t.finished_subtasks += 1
        if t.finished_subtasks == t.subtasks:
            self._set_state(slot, t, TASK_DONE if t.completed_runs == t.total_runs else TASK_FAILED)
        return t.state

    cpdef void cancel(self, Py_ssize_t slot) except *:
        """PENDING or RUNNING -> CANCELLED."""
        self._set_state(slot, self._task(slot), TASK_CANCELLED)

    cpdef void release(self, Py_ssize_t slot) except *:
        """DONE, FAILED or CANCELLED -> FREE; the slot is reused by a later ``add_task``.
        The batch's counters keep the task's tally until ``drop_batch``."""
        self._free_slot(slot, self._task(slot))

    cpdef int state(self, Py_ssize_t slot) except -1:
        """The task's state; TASK_FREE for a released slot (still in range)."""
        if slot < 0 or slot >= self._top:
            raise StatusError(f"task slot {slot} is out of range (0..{self._top - 1} allocated)")
        return self._tasks[slot].state

    cpdef Py_ssize_t task_batch(self, Py_ssize_t slot) except -1:
        return self._task(slot).batch

    def runs(self, Py_ssize_t slot):
        """(completed, failed, total) runs of the task."""
        cdef TaskSlot* t = self._task(slot)
        return (t.completed_runs, t.failed_runs, t.total_runs)

    cpdef Py_ssize_t completed_runs(self, Py_ssize_t slot) except -1:
        return self._task(slot).completed_runs

    cpdef bint is_final(self, Py_ssize_t slot) except -1:
        """DONE, FAILED or CANCELLED: the task takes no more results."""
        cdef int state = self._task(slot).state
        return state == TASK_DONE or state == TASK_FAILED or state == TASK_CANCELLED

    def final_status(self, Py_ssize_t slot, type cls, dict task_metrics, first_error):
        """The task's ``cls`` (``Status``) from its row: ``cls(completed_runs, total_runs,
        [task_metrics], message)``, the message saying why runs are missing, if any.

        Made without the frozen dataclass's ``__init__``, which sets every field through
        ``object.__setattr__`` (several times this; one Status is made per task), and not
        tracked by the cyclic GC: a batch's statuses live until it is finalized and would be
        walked by every collection meanwhile. They cannot be part of a cycle: ints, a str and
        a list holding one dict of floats (itself untracked by CPython)."""
        cdef TaskSlot* t = self._task(slot)
        message = None
        if t.completed_runs < t.total_runs:
            message = f"{t.completed_runs}/{t.total_runs} runs completed successfully."
            message += (f" First error: {first_error}" if first_error is not None
                        else " Remaining runs were cancelled during scheduler cleanup.")
        metrics = [task_metrics]
        PyObject_GC_UnTrack(metrics)
        status = (<PyTypeObject*>cls).tp_new(cls, <PyObject*>_no_args, NULL)
        PyObject_GenericSetAttr(status, "completed_runs", t.completed_runs)
        PyObject_GenericSetAttr(status, "total_runs", t.total_runs)
        PyObject_GenericSetAttr(status, "metrics", metrics)
        PyObject_GenericSetAttr(status, "message", message)
        PyObject_GC_UnTrack(status)
        return status

    # -- views and sizes -------------------------------------------------------------

    def columns(self):
        """A read-only structured-array view (TASK_DTYPE) of all task slots, live until the
        table grows (then it keeps showing the rows as they were). Free rows have state
        TASK_FREE and batch -1."""
        view = self._buf.view()
        view.flags.writeable = False
        return view

    def _check(self):
        """Recounts from the task array and compares with the batch counters; raises
        AssertionError on any mismatch. O(capacity): for tests and debugging."""
        cdef Py_ssize_t slot, bslot, held, running, used = 0
        cdef TaskSlot* t
        for bslot in range(self._batch_top):
            if not self._batches[bslot].in_use:
                continue
            self._check_batch(bslot)
            held = running = 0
            slot = self._batches[bslot].head
            while slot >= 0:
                t = &self._tasks[slot]
                if t.batch != bslot or t.state == TASK_FREE:
                    raise AssertionError(f"task slot {slot} in the list of batch {bslot} has "
                                         f"batch {t.batch}, state {STATE_NAMES[t.state]}")
                held += 1
                running += t.state == TASK_RUNNING
                slot = t.next
            if held != self._batches[bslot].held or running != self._batches[bslot].running:
                raise AssertionError(f"batch slot {bslot}: {held} tasks held, {running} running, "
                                     f"counters say {self._batches[bslot].held}, "
                                     f"{self._batches[bslot].running}")
            used += held
        if used != self._used:
            raise AssertionError(f"{used} task slots held by batches, table says {self._used}")

    def __len__(self):
        return self._used

    @property
    def capacity(self):
        """Task slots allocated (grows by doubling)."""
        return self._capacity

    @property
    def nbytes(self):
        """Bytes of the task and batch arrays."""
        return self._capacity * sizeof(TaskSlot) + self._batch_capacity * sizeof(BatchSlot)


def _debug_live_ledgers():
    """TaskLedger objects alive now (debug builds only, like uvloop's live-object counters)."""
    if not FASTROLLOUT_DEBUG:
        raise StatusError("live-object counters exist only in debug builds (FASTROLLOUT_DEBUG=1)")
    return _live_ledgers
