# The contract of fastrollout._native.trxp_header: the parser's cursor, the spans and records
# it collects, and its cdef functions (each refuses bad input with PayloadHeaderError, naming
# the byte position).
from libc.stdint cimport int64_t


# Distinct field names / dtype names: a real header has about ten fields and a few dtypes;
# the cap keeps the linear lookups O(header length).
cdef enum:
    MAX_NAMES = 64


cdef struct Cursor:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t n


# Bytes buf[start:stop] of the header.
cdef struct Span:
    Py_ssize_t start
    Py_ssize_t stop


# One tensor entry: ``"{item}:{field}": {"dtype": ..., "shape": [length], "data_offsets":
# [begin, end]}``; field and dtype index the parser's tables of distinct names.
cdef struct Record:
    int64_t item        # -1 if the key does not start with a decimal item number
    int64_t length      # -1 if the tensor is not 1-D
    int64_t begin
    int64_t end
    int field
    int dtype


cdef int fail(Cursor* c, str what) except -1
cdef void skip_ws(Cursor* c) noexcept
# The next non-blank byte, or -1 at the end of the buffer.
cdef int peek(Cursor* c) noexcept
cdef int expect(Cursor* c, unsigned char ch) except -1
cdef bint is_hex(unsigned char ch) noexcept
# The raw bytes of a JSON string; ``plain`` (keys, dtypes) refuses escapes.
cdef Span string(Cursor* c, bint plain) except *
cdef str text(Cursor* c, Span s)
# A non-negative JSON integer below 2**56.
cdef int64_t integer(Cursor* c) except -1
# Parse ``[int, ...]`` keeping the first ``cap`` in ``out``; returns how many there were.
cdef Py_ssize_t integers(Cursor* c, int64_t* out, Py_ssize_t cap) except -1
# After a member: True at ``,``, False (consumed) at ``close``.
cdef bint more(Cursor* c, unsigned char close) except -1
cdef bint same(Cursor* c, Span s, const char* word, Py_ssize_t n) noexcept
# Index of the bytes ``s`` in ``table``, appending them if new (at most MAX_NAMES).
cdef int lookup(Cursor* c, Span* table, int* count, Span s, str what) except -1
# Check a ``{str: str}`` __metadata__ object.
cdef int metadata(Cursor* c) except -1
# Parse one tensor entry into ``rec`` (item and field are set by the caller).
cdef int tensor(Cursor* c, Record* rec, Span* dtypes, int* n_dtypes) except -1
# The decimal item number ``p[:n]``, -1 if it is not one, clamped at 2**56.
cdef int64_t item_number(const unsigned char* p, Py_ssize_t n) noexcept
