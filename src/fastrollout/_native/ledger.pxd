# The contract of fastrollout._native.ledger: struct layouts, task states and the
# transition methods other Cython modules may call directly (cimport this file).
cimport cython
from libc.stdint cimport int32_t, int64_t


cdef enum TaskState:
    TASK_FREE = 0        # slot unused, on the free list
    TASK_PENDING = 1     # added, no attempt started yet
    TASK_RUNNING = 2     # at least one attempt started, sub-tasks outstanding
    TASK_DONE = 3        # every sub-task finished and every run completed
    TASK_FAILED = 4      # every sub-task finished, some runs failed
    TASK_CANCELLED = 5   # cancelled while pending or running


# One task slot (row), 64 bytes. The field order and types are mirrored by the numpy
# dtype TASK_DTYPE in ledger.pyx (checked at import), so the array of these
# structs can be viewed column-wise without copying.
ctypedef struct TaskSlot:
    int64_t start_ns            # CLOCK_MONOTONIC ns of the first attempt, 0 if none
    int64_t end_ns              # CLOCK_MONOTONIC ns of reaching DONE/FAILED/CANCELLED
    int32_t batch               # owning batch slot, -1 while FREE
    int32_t task                # the task's index in its batch (its task id)
    int32_t state               # a TaskState
    int32_t total_runs
    int32_t completed_runs
    int32_t failed_runs
    int32_t subtasks
    int32_t finished_subtasks
    int32_t attempts
    int32_t prev                # previous task slot of the same batch, or -1
    int32_t next                # next task slot of the same batch (or of the free list), or -1
    int32_t _pad


# Per-batch counters, kept exact in O(1) by every transition. They count work,
# not slots: releasing a finished task leaves its batch's tally unchanged.
ctypedef struct BatchSlot:
    int64_t submitted           # tasks submitted (rows are added as they start)
    int64_t reached             # tasks given a row
    int64_t retries             # attempts after the first of a sub-task
    int64_t completed           # tasks that reached DONE or FAILED
    int64_t failed              # tasks that reached FAILED
    int64_t running             # tasks RUNNING now
    int64_t cancelled           # tasks that reached CANCELLED
    int32_t head                # first task slot held by the batch, or -1
    int32_t held                # task slots held (any state but FREE)
    int32_t next_free           # next free batch slot, or -1
    int32_t in_use


@cython.final
cdef class TaskLedger:
    cdef TaskSlot* _tasks       # points into _buf
    cdef object _buf            # numpy structured array (TASK_DTYPE) that owns the task structs
    cdef BatchSlot* _batches    # PyMem-owned, private (no views)
    cdef Py_ssize_t _capacity, _top, _free, _used
    cdef Py_ssize_t _batch_capacity, _batch_top, _batch_free

    # The one place a task's state changes: checks the move, updates the batch counters
    # and timestamps. Raises StatusError naming slot, batch and both states.
    cdef int _set_state(self, Py_ssize_t slot, TaskSlot* t, int new_state) except -1
    cdef TaskSlot* _task(self, Py_ssize_t slot) except NULL
    cdef BatchSlot* _batch(self, Py_ssize_t bslot) except NULL
    cdef int _grow_tasks(self) except -1
    cdef int _grow_batches(self) except -1
    cdef int _free_slot(self, Py_ssize_t slot, TaskSlot* t) except -1
    cdef int _check_batch(self, Py_ssize_t bslot) except -1

    cpdef Py_ssize_t add_batch(self, int64_t submitted=*) except -1
    cpdef void drop_batch(self, Py_ssize_t bslot) except *
    cpdef Py_ssize_t add_task(self, Py_ssize_t bslot, int32_t total_runs, int32_t subtasks=*,
                              int32_t task=*) except -1
    cpdef void start(self, Py_ssize_t slot, bint retry=*) except *
    cpdef int finish_subtask(self, Py_ssize_t slot, int32_t completed_runs, int32_t failed_runs) except -1
    cpdef void cancel(self, Py_ssize_t slot) except *
    cpdef void release(self, Py_ssize_t slot) except *
    cpdef int state(self, Py_ssize_t slot) except -1
    cpdef Py_ssize_t task_batch(self, Py_ssize_t slot) except -1
    cpdef Py_ssize_t completed_runs(self, Py_ssize_t slot) except -1
    cpdef bint is_final(self, Py_ssize_t slot) except -1
    cpdef Py_ssize_t batch_completed(self, Py_ssize_t bslot) except -1
    cpdef Py_ssize_t batch_running(self, Py_ssize_t bslot) except -1
