"""EID suffixes: six random lowercase hex digits, drawn in C for every new experience.

A module of its own, importing nothing of fastrollout's, so that the ``EID`` dataclass
(``fastrollout.experience.eid``) can take ``new_suffix`` as its default factory and the
compiled ``Experience`` can draw suffixes without a call (``cimport``).

Suffixes need to be unlikely to collide, not unpredictable: splitmix64 over a private
64-bit state seeded from ``os.urandom``, reseeded in forked children (which would otherwise
draw the same suffixes as their parent). Drawn in C: every experience built without an
``eid`` draws one (benchmarks/bench_experience.py, construct one experience), and Python's
``random`` and ``uuid`` cost several times more per suffix.
"""
from libc.stdint cimport uint64_t

import os

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void* PyUnicode_DATA(object unicode)

cdef uint64_t _state = 0
cdef const char* _HEX = b"0123456789abcdef"


def reseed():
    """Seed the generator from ``os.urandom`` (done at import and in forked children)."""
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


cdef str next_suffix():
    cdef uint64_t bits = _next() >> 40     # the top 24 bits
    s = PyUnicode_New(6, 127)
    cdef char* out = <char*>PyUnicode_DATA(s)
    cdef int i
    for i in range(6):
        out[i] = _HEX[(bits >> (20 - 4 * i)) & 15]
    return s


def new_suffix():
    """Six random lowercase hex digits: the default ``EID.suffix``."""
    return next_suffix()
