# The contract of fastrollout._native.plain_msgpack: the scanner's state, one frame per open
# container (at most MAX_DEPTH of them).
from libc.stdint cimport int64_t, uint8_t, uint64_t

from fastrollout._native.metadata_limits cimport MAX_DEPTH


ctypedef struct Frame:
    int64_t count       # the container's values: an array's elements, a map's keys and values
    int64_t left        # of those, how many are still to be read
    int64_t cost        # 1 + the cost of the values read so far (only needed inside keys)
    int64_t key_cost    # map: the cost of its keys other than str so far
    Py_ssize_t key      # map: byte offset of the last key if it was a str, else -1 (for paths)
    Py_ssize_t key_len
    uint8_t is_map


ctypedef struct Scanner:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t n
    Py_ssize_t depth    # frames in use (set when scan fails: it keeps its own)
    Frame frames[MAX_DEPTH + 1]  # [0] stands for the whole data, then one per container


# Read one msgpack value from S.pos, checking it; raises PayloadError naming its path.
cdef int scan(Scanner* S) except -1
# Raise PayloadError("{what} - at `{path}`"), the path in msgspec's notation.
cdef int fail(Scanner* S, str what) except -1
# Put scan's locals (the innermost frame, position, depth) in S, then fail.
cdef int stop(Scanner* S, Frame cur, Py_ssize_t pos, Py_ssize_t depth, str what) except -1
cdef uint64_t big(const unsigned char* p, int width) noexcept
# Skip one scalar: its cost, 0 at a container or refused value, -1 if it is truncated.
cdef int64_t scalar(const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t n,
                    Py_ssize_t* str_len) noexcept
# Read the scalars of ``f`` until it completes or something else starts (see the .pyx).
cdef int64_t scalars(Frame* f, const unsigned char* buf, Py_ssize_t* pos,
                     Py_ssize_t n) noexcept
cdef str path(Scanner* S)
cdef int fill_tables() except -1
