"""Strict, bounds-checked parser of the safetensors JSON header inside a TRXP payload.

It accepts only what safetensors writes: one object of ``"key": {"dtype": str, "shape":
[int, ...], "data_offsets": [int, int]}`` entries plus an optional ``"__metadata__":
{str: str}``, JSON whitespace around tokens. Tensor keys ``"{i}:{field}"`` are grouped by
field into int64 rows, so the caller validates a whole column with a few numpy ops instead
of per-key Python work. Every read is checked against the buffer end, integers are
refused at 2**56 (so later int64 arithmetic cannot overflow), and memory stays
proportional to the header length. Anything else raises ``PayloadHeaderError``.
"""
cimport numpy as cnp
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int64_t
from libc.string cimport memchr, memcmp

import numpy as np

from fastrollout.errors import PayloadHeaderError

cnp.import_array()

# Integers are refused from here (later int64 arithmetic cannot overflow); the structs,
# MAX_NAMES and the cdef functions' contracts are in trxp_header.pxd.
cdef int64_t LIMIT = 1LL << 56


cdef int fail(Cursor* c, str what) except -1:
    raise PayloadHeaderError(f"{what} at byte {c.pos}")


cdef inline void skip_ws(Cursor* c) noexcept:
    cdef unsigned char ch
    while c.pos < c.n:
        ch = c.buf[c.pos]
        if ch != c' ' and ch != c'\n' and ch != c'\r' and ch != c'\t':
            return
        c.pos += 1


cdef inline int peek(Cursor* c) noexcept:
    """The next non-blank byte, or -1 at the end of the buffer."""
    skip_ws(c)
    return c.buf[c.pos] if c.pos < c.n else -1


cdef int expect(Cursor* c, unsigned char ch) except -1:
    if peek(c) != ch:
        fail(c, f"expected {chr(ch)!r}")
    c.pos += 1
    return 0


cdef inline bint is_hex(unsigned char ch) noexcept:
    return c'0' <= ch <= c'9' or c'a' <= ch <= c'f' or c'A' <= ch <= c'F'


cdef Span string(Cursor* c, bint plain) except *:
    """The raw bytes of a JSON string; ``plain`` (keys, dtypes) refuses escapes."""
    cdef Span s
    cdef unsigned char ch
    cdef int k
    if peek(c) != c'"':
        fail(c, "expected a string")
    c.pos += 1
    s.start = c.pos
    while True:
        if c.pos >= c.n:
            fail(c, "unterminated string")
        ch = c.buf[c.pos]
        if ch == c'"':
            break
        if ch < 0x20:
            fail(c, "control character in a string")
        if ch == c'\\':
            if plain:
                fail(c, "escape in a tensor key or dtype")
            c.pos += 1
            if c.pos >= c.n:
                fail(c, "unterminated string")
            ch = c.buf[c.pos]
            if ch == c'u':
                if c.pos + 4 >= c.n:
                    fail(c, "unterminated string")
                for k in range(1, 5):
                    if not is_hex(c.buf[c.pos + k]):
                        fail(c, "bad \\u escape")
                c.pos += 4
            elif not (ch == c'"' or ch == c'\\' or ch == c'/' or ch == c'b' or ch == c'f'
                      or ch == c'n' or ch == c'r' or ch == c't'):
                fail(c, "bad escape")
        c.pos += 1
    s.stop = c.pos
    c.pos += 1
    return s


cdef str text(Cursor* c, Span s):
    try:
        return (<const char*>c.buf + s.start)[:s.stop - s.start].decode("utf-8")
    except UnicodeDecodeError:
        c.pos = s.start
        fail(c, "string is not UTF-8")


cdef int64_t integer(Cursor* c) except -1:
    cdef int64_t v = 0
    cdef unsigned char ch
    if not c'0' <= peek(c) <= c'9':
        fail(c, "expected a non-negative integer")
    if c.buf[c.pos] == c'0' and c.pos + 1 < c.n and c'0' <= c.buf[c.pos + 1] <= c'9':
        fail(c, "leading zero in an integer")
    while c.pos < c.n and c'0' <= c.buf[c.pos] <= c'9':
        v = v * 10 + (c.buf[c.pos] - c'0')  # v < 2**56 before, so no overflow
        if v >= LIMIT:
            fail(c, "integer of 2**56 or more")
        c.pos += 1
    if c.pos < c.n:
        ch = c.buf[c.pos]
        if ch == c'.' or ch == c'e' or ch == c'E':
            fail(c, "expected an integer")
    return v


cdef Py_ssize_t integers(Cursor* c, int64_t* out, Py_ssize_t cap) except -1:
    """Parse ``[int, ...]``, keeping the first ``cap``; returns how many there were."""
    cdef Py_ssize_t count = 0
    cdef int64_t v
    expect(c, c'[')
    if peek(c) == c']':
        c.pos += 1
        return 0
    while True:
        v = integer(c)
        if count < cap:
            out[count] = v
        count += 1
        if peek(c) == c',':
            c.pos += 1
        else:
            expect(c, c']')
            return count


cdef bint more(Cursor* c, unsigned char close) except -1:
    """After a member: True at ``,``, False (consumed) at ``close``."""
    if peek(c) == c',':
        c.pos += 1
        return True
    if peek(c) != close:
        fail(c, f"expected ',' or {chr(close)!r}")
    c.pos += 1
    return False


cdef inline bint same(Cursor* c, Span s, const char* word, Py_ssize_t n) noexcept:
    return s.stop - s.start == n and memcmp(c.buf + s.start, word, n) == 0


cdef int lookup(Cursor* c, Span* table, int* count, Span s, str what) except -1:
    """Index of the bytes ``s`` in ``table``, appending them if new."""
    cdef int k
    cdef Py_ssize_t n = s.stop - s.start
    for k in range(count[0]):
        if table[k].stop - table[k].start == n \
                and memcmp(c.buf + table[k].start, c.buf + s.start, n) == 0:
            return k
    if count[0] == MAX_NAMES:
        fail(c, f"more than {MAX_NAMES} distinct {what}")
    table[count[0]] = s
    count[0] += 1
    return count[0] - 1


cdef int metadata(Cursor* c) except -1:
    expect(c, c'{')
    if peek(c) == c'}':
        c.pos += 1
        return 0
    while True:
        text(c, string(c, False))
        expect(c, c':')
        text(c, string(c, False))
        if not more(c, c'}'):
            return 0


cdef int tensor(Cursor* c, Record* rec, Span* dtypes, int* n_dtypes) except -1:
    """Parse one tensor entry into ``rec`` (item and field are set by the caller)."""
    cdef int seen = 0, bit = 0
    cdef int64_t shape[1]
    cdef int64_t offsets[2]
    cdef Py_ssize_t ndim
    cdef Span key
    expect(c, c'{')
    while True:
        key = string(c, True)
        expect(c, c':')
        if same(c, key, "dtype", 5):
            bit = 1
            rec.dtype = lookup(c, dtypes, n_dtypes, string(c, True), "dtypes")
        elif same(c, key, "shape", 5):
            bit = 2
            ndim = integers(c, shape, 1)
            rec.length = shape[0] if ndim == 1 else -1  # -1: not 1-D
        elif same(c, key, "data_offsets", 12):
            bit = 4
            if integers(c, offsets, 2) != 2:
                fail(c, "data_offsets must hold two integers")
            rec.begin, rec.end = offsets[0], offsets[1]
        else:
            c.pos = key.start - 1  # its opening quote
            fail(c, "unexpected key in a tensor entry")
        if seen & bit:
            c.pos = key.start - 1  # its opening quote
            fail(c, "duplicate key in a tensor entry")
        seen |= bit
        if not more(c, c'}'):
            break
    if seen != 7:
        fail(c, "tensor entry without dtype, shape and data_offsets")
    return 0


cdef int64_t item_number(const unsigned char* p, Py_ssize_t n) noexcept:
    """The decimal item number ``p[:n]``, -1 if it is not one; clamped at 2**56 (an item
    that far out is refused by range anyway)."""
    cdef int64_t v = 0
    cdef Py_ssize_t k
    if n == 0:
        return -1
    for k in range(n):
        if not c'0' <= p[k] <= c'9':
            return -1
        if v < LIMIT:
            v = v * 10 + (p[k] - c'0')
    return v if v < LIMIT else LIMIT


def parse_header(const unsigned char[::1] header not None):
    """Parse a safetensors header; see the stub (trxp_header.pyi) for the result."""
    cdef Cursor c
    cdef Span fields[MAX_NAMES]
    cdef Span first_keys[MAX_NAMES]
    cdef Span dtypes[MAX_NAMES]
    cdef int n_fields = 0, n_dtypes = 0, f, before
    cdef int64_t* out[MAX_NAMES]
    cdef int64_t* row
    cdef Record* recs = NULL
    cdef Record* grown
    cdef Py_ssize_t n_recs = 0, cap = 0, k, colon
    cdef Py_ssize_t counts[MAX_NAMES]
    cdef Py_ssize_t filled[MAX_NAMES]
    cdef bint seen_metadata = False
    cdef Span key, name
    cdef const unsigned char* sep
    if header.shape[0] == 0:
        raise PayloadHeaderError("empty header")
    c.buf = &header[0]
    c.pos = 0
    c.n = header.shape[0]
    try:
        expect(&c, c'{')
        if peek(&c) == c'}':
            c.pos += 1
        else:
            while True:
                key = string(&c, True)
                expect(&c, c':')
                if same(&c, key, "__metadata__", 12):
                    if seen_metadata:
                        c.pos = key.start - 1  # its opening quote
                        fail(&c, "duplicate __metadata__")
                    seen_metadata = True
                    metadata(&c)
                else:
                    if n_recs == cap:
                        cap = 2 * cap + 64
                        grown = <Record*>PyMem_Realloc(recs, cap * sizeof(Record))
                        if grown == NULL:
                            raise MemoryError()
                        recs = grown
                    sep = <const unsigned char*>memchr(c.buf + key.start, c':',
                                                       key.stop - key.start)
                    colon = key.stop if sep == NULL else sep - c.buf
                    name.start = colon + 1 if sep != NULL else key.stop
                    name.stop = key.stop
                    before = n_fields
                    f = lookup(&c, fields, &n_fields, name, "tensor field names")
                    if n_fields != before:
                        first_keys[f] = key
                    recs[n_recs].field = f
                    recs[n_recs].item = item_number(c.buf + key.start, colon - key.start)
                    tensor(&c, &recs[n_recs], dtypes, &n_dtypes)
                    n_recs += 1
                if not more(&c, c'}'):
                    break
        if peek(&c) != -1:
            fail(&c, "data after the header object")
        # Group the records by field (a counting sort), one (5, count) int64 array each.
        for f in range(n_fields):
            counts[f] = 0
        for k in range(n_recs):
            counts[recs[k].field] += 1
        result = {}
        for f in range(n_fields):
            array = np.empty((5, counts[f]), dtype=np.int64)
            result[text(&c, fields[f])] = (array, text(&c, first_keys[f]))
            out[f] = <int64_t*>cnp.PyArray_DATA(array)
            filled[f] = 0
        for k in range(n_recs):  # row r of field f's array starts at out[f] + r * counts[f]
            f = recs[k].field
            row = out[f] + filled[f]
            row[0] = recs[k].item
            row[counts[f]] = recs[k].length
            row[2 * counts[f]] = recs[k].begin
            row[3 * counts[f]] = recs[k].end
            row[4 * counts[f]] = recs[k].dtype
            filled[f] += 1
        return result, [text(&c, dtypes[k]) for k in range(n_dtypes)]
    finally:
        PyMem_Free(recs)
