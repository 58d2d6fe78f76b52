"""A pickle loader for plain data only, with the bounds an untrusted payload needs.

Trinity's TRXP payloads carry their metadata as a pickle. This loader reads the binary
opcodes (protocols 2-5) that build None, bool, int, float, str, bytes, tuple, list, dict,
set and frozenset and refuses any other, so no global is named and no code runs. It checks
as it builds, in one pass, before the hashing or allocation each check guards:

- nesting: a container's height (1 + its highest element's) stays within MAX_DEPTH, so
  hashing a nested tuple key, or any later walk of the result, recurses a bounded depth;
- sharing: a value's cost counts everything inside it once per reference (1 per value,
  plus 1 per 8 bytes of str or bytes: about the words it takes), so memo references cannot
  expand the result past ``budget``;
- keys: dict keys and set elements must be hashable, and those of one container that are
  not str may cost MAX_KEY_COST in all, so keys built to collide cannot make insertion
  quadratic (str hashes are randomized; int, float, tuple... hashes are not);
- cycles: a container no longer changes once placed in another (pickle.dumps never does
  that), so none can come to hold itself;
- integers stay in [-2**63, 2**64), strings are UTF-8, memo indexes are the sequential ones
  pickle.dumps writes, and every read stays inside the buffer.

Every refusal raises UnsafePickleError naming the byte where it happened.
"""
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_Append, PyList_New
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from cpython.set cimport PySet_Add
from cpython.tuple cimport PyTuple_New
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memcpy, memset

from fastrollout._native.metadata_limits cimport MAX_DEPTH as _MAX_DEPTH
from fastrollout._native.metadata_limits cimport MAX_KEY_COST as _MAX_KEY_COST

from fastrollout.errors import UnsafePickleError

cdef extern from "Python.h":
    # The SET_ITEM macros steal the reference: the stack's own is handed over.
    void list_steal "PyList_SET_ITEM"(object, Py_ssize_t, PyObject*)
    void tuple_steal "PyTuple_SET_ITEM"(object, Py_ssize_t, PyObject*)
    bint PyUnicode_CheckExact(PyObject*)
    # Constructors as raw new references (NULL on error), which push_new hands to the
    # stack as they are: no reference count round trip per value built.
    PyObject* new_long "PyLong_FromLong"(long)
    PyObject* new_longlong "PyLong_FromLongLong"(long long)
    PyObject* new_ulonglong "PyLong_FromUnsignedLongLong"(unsigned long long)
    PyObject* new_float "PyFloat_FromDouble"(double)
    PyObject* new_str "PyUnicode_DecodeUTF8"(const char*, Py_ssize_t, const char*)
    PyObject* new_bytes "PyBytes_FromStringAndSize"(const char*, Py_ssize_t)
    PyObject* new_dict "PyDict_New"()
    PyObject* new_list "PyList_New"(Py_ssize_t)
    PyObject* new_set "PySet_New"(PyObject*)
    bint PyErr_ExceptionMatches(object)
    void PyErr_Clear()

MAX_DEPTH = _MAX_DEPTH
MAX_KEY_COST = _MAX_KEY_COST
cdef int PROTOCOL = 5    # the highest protocol whose opcodes are read


def load_plain(const unsigned char[::1] data not None, int64_t budget):
    """Load one pickle of plain data; see plain_pickle.pyi."""
    cdef Loader L
    memset(&L, 0, sizeof(Loader))
    L.n = data.shape[0]
    L.budget = budget
    if L.n == 0:
        raise UnsafePickleError("pickle is truncated (no STOP opcode)")
    L.buf = &data[0]
    try:
        return run(&L)
    finally:
        release(&L)


cdef int fail(Py_ssize_t at, str what) except -1:
    raise UnsafePickleError(f"{what} at byte {at}")


cdef str opcode_name(unsigned char op):
    import pickletools  # only to name a refused opcode
    for code in pickletools.opcodes:
        if ord(code.code) == op:
            return code.name
    return f"{op:#04x} (no such opcode)"


cdef void release(Loader* L) noexcept:
    cdef Py_ssize_t i
    for i in range(L.top):
        Py_DECREF(<object>L.stack[i].obj)
    for i in range(L.memo_len):
        Py_DECREF(<object>L.memo[i].obj)
    L.top = L.memo_len = 0
    PyMem_Free(L.stack)
    PyMem_Free(L.marks)
    PyMem_Free(L.memo)
    PyMem_Free(L.nodes)
    L.stack = L.memo = NULL
    L.marks = NULL
    L.nodes = NULL


cdef void* grown(void* block, Py_ssize_t* cap, size_t item) except NULL:
    """``block`` reallocated to twice its capacity (at least 64 items)."""
    cdef Py_ssize_t new_cap = 2 * cap[0] + 64
    cdef void* out = PyMem_Realloc(block, new_cap * item)
    if out == NULL:
        raise MemoryError()
    cap[0] = new_cap
    return out


# ---------------------------------------------------------------- stack, marks, memo, nodes

cdef inline int push(Loader* L, object value, int64_t info) except -1:
    if L.top == L.stack_cap:
        L.stack = <Slot*>grown(L.stack, &L.stack_cap, sizeof(Slot))
    Py_INCREF(value)
    L.stack[L.top].obj = <PyObject*>value
    L.stack[L.top].info = info
    L.top += 1
    return 0


cdef inline int push_new(Loader* L, PyObject* value, int64_t info) except -1:
    """Push a new reference (NULL: the constructor failed, its error is set)."""
    if value == NULL:
        return -1
    if L.top == L.stack_cap:
        try:
            L.stack = <Slot*>grown(L.stack, &L.stack_cap, sizeof(Slot))
        except MemoryError:
            Py_DECREF(<object>value)
            raise
    L.stack[L.top].obj = value
    L.stack[L.top].info = info
    L.top += 1
    return 0


cdef inline Py_ssize_t fence(Loader* L) noexcept:
    """The lowest stack index an opcode may consume: just above the innermost MARK."""
    return L.marks[L.n_marks - 1] if L.n_marks else 0


cdef inline int need(Loader* L, Py_ssize_t count, Py_ssize_t at) except -1:
    if L.top - fence(L) < count:
        fail(at, "stack underflow (malformed pickle)")
    return 0


cdef inline Py_ssize_t pop_mark(Loader* L, Py_ssize_t at) except -1:
    if L.n_marks == 0:
        fail(at, "no MARK to pop (malformed pickle)")
    L.n_marks -= 1
    return L.marks[L.n_marks]


cdef inline void drop(Loader* L, Py_ssize_t down_to) noexcept:
    while L.top > down_to:
        L.top -= 1
        Py_DECREF(<object>L.stack[L.top].obj)


cdef inline Py_ssize_t new_node(Loader* L, int kind, bint hashable) except -1:
    if L.n_nodes == L.nodes_cap:
        L.nodes = <Node*>grown(L.nodes, &L.nodes_cap, sizeof(Node))
    cdef Node* node = &L.nodes[L.n_nodes]
    node.cost = 1
    node.key_cost = 0
    node.height = 1
    node.kind = kind
    node.closed = 0
    node.hashable = hashable
    L.n_nodes += 1
    return L.n_nodes - 1


cdef inline int64_t node_info(Py_ssize_t node) noexcept:
    return -1 - node


cdef int memo_put(Loader* L, Py_ssize_t idx, Py_ssize_t at) except -1:
    # pickle.dumps numbers the memo 0, 1, 2...: any other index is refused, which keeps
    # the memo dense and no larger than the number of PUT opcodes.
    if idx > L.memo_len:
        fail(at, f"memo index {idx} skips past the {L.memo_len} memoized values")
    need(L, 1, at)
    cdef Slot* top = &L.stack[L.top - 1]
    Py_INCREF(<object>top.obj)
    if idx == L.memo_len:
        if L.memo_len == L.memo_cap:
            L.memo = <Slot*>grown(L.memo, &L.memo_cap, sizeof(Slot))
        L.memo_len += 1
    else:
        Py_DECREF(<object>L.memo[idx].obj)
    L.memo[idx] = top[0]
    return 0


cdef int memo_get(Loader* L, uint64_t idx, Py_ssize_t at) except -1:
    if idx >= <uint64_t>L.memo_len:
        fail(at, f"memo index {idx} is not set")
    push(L, <object>L.memo[idx].obj, L.memo[idx].info)
    return 0


# ---------------------------------------------------------------- the checks

cdef inline int adopt(Loader* L, Py_ssize_t parent, int64_t info, Py_ssize_t at) except -1:
    cdef Node* p = &L.nodes[parent]
    cdef Node* child
    cdef int64_t cost = info
    cdef int32_t height = 0
    if info < 0:
        if -1 - info == parent:
            fail(at, "a container is placed inside itself (a cycle)")
        child = &L.nodes[-1 - info]
        child.closed = 1
        cost = child.cost
        height = child.height
    p.cost += cost
    if p.cost > L.budget:
        fail(at, f"shared references expand the data past a cost of {L.budget} (1 per "
                 "value, plus 1 per 8 bytes of str or bytes)")
    if height >= p.height:
        p.height = height + 1
        if p.height > _MAX_DEPTH:
            fail(at, f"data nested deeper than {_MAX_DEPTH} levels")
    return 0


cdef inline int check_key(Loader* L, Py_ssize_t parent, Slot* key, Py_ssize_t at) except -1:
    cdef Node* k
    cdef Node* p
    cdef int64_t cost = key.info
    if key.info < 0:
        k = &L.nodes[-1 - key.info]
        if not k.hashable:
            fail(at, f"unhashable dict key or set element ({type(<object>key.obj).__name__})")
        cost = k.cost
    elif PyUnicode_CheckExact(key.obj):
        return 0
    p = &L.nodes[parent]
    p.key_cost += cost
    if p.key_cost > _MAX_KEY_COST:
        fail(at, f"a dict or set has keys other than str costing over {_MAX_KEY_COST} "
                 "(1 per value, plus 1 per 8 bytes of str or bytes): their hashes could "
                 "be made to collide")
    return 0


cdef inline Py_ssize_t target(Loader* L, Py_ssize_t idx, int kind,
                              Py_ssize_t at) except -1:
    """The open container node of kind ``kind`` at stack index ``idx``."""
    cdef int64_t info = L.stack[idx].info
    if info >= 0 or L.nodes[-1 - info].kind != kind:
        fail(at, "the value to add to is not a " + ("list", "dict", "set")[kind])
    if L.nodes[-1 - info].closed:
        fail(at, "a container changes after being placed in another (a cycle, or not "
                 "written by pickle.dumps)")
    return -1 - info


# ---------------------------------------------------------------- building containers

cdef int build_tuple(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1:
    """Replace the stack from ``first`` up with one tuple of those values."""
    cdef Py_ssize_t count = L.top - first, i
    cdef int64_t info
    cdef Py_ssize_t node = new_node(L, NODE_TUPLE, True)
    for i in range(first, L.top):
        info = L.stack[i].info
        adopt(L, node, info, at)
        if info < 0 and not L.nodes[-1 - info].hashable:
            L.nodes[node].hashable = False
    value = PyTuple_New(count)
    for i in range(count):
        tuple_steal(value, i, L.stack[first + i].obj)
    L.top = first
    return push(L, value, node_info(node))


cdef int build_list(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1:
    cdef Py_ssize_t count = L.top - first, i
    cdef Py_ssize_t node = new_node(L, NODE_LIST, False)
    for i in range(first, L.top):
        adopt(L, node, L.stack[i].info, at)
    value = PyList_New(count)
    for i in range(count):
        list_steal(value, i, L.stack[first + i].obj)
    L.top = first
    return push(L, value, node_info(node))


cdef int build_frozenset(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1:
    cdef Py_ssize_t i
    cdef Py_ssize_t node = new_node(L, NODE_FROZENSET, True)
    for i in range(first, L.top):
        check_key(L, node, &L.stack[i], at)
        adopt(L, node, L.stack[i].info, at)
    value = frozenset([<object>L.stack[i].obj for i in range(first, L.top)])
    drop(L, first)
    return push(L, value, node_info(node))


cdef int extend_list(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1:
    """Append the stack from ``first`` up to the list just below it."""
    cdef Py_ssize_t node = target(L, first - 1, NODE_LIST, at), i
    lst = <object>L.stack[first - 1].obj
    for i in range(first, L.top):
        adopt(L, node, L.stack[i].info, at)
        PyList_Append(lst, <object>L.stack[i].obj)
    drop(L, first)
    return 0


cdef int set_items(Loader* L, Py_ssize_t first, Py_ssize_t node, object d,
                   Py_ssize_t at) except -1:
    """Set the key, value pairs on the stack from ``first`` up in dict ``d`` (``node``)."""
    cdef Py_ssize_t i
    if (L.top - first) % 2:
        fail(at, "a dict is given a key without a value (malformed pickle)")
    for i in range(first, L.top, 2):
        check_key(L, node, &L.stack[i], at)
        adopt(L, node, L.stack[i].info, at)
        adopt(L, node, L.stack[i + 1].info, at)
        PyDict_SetItem(d, <object>L.stack[i].obj, <object>L.stack[i + 1].obj)
    drop(L, first)
    return 0


cdef int add_items(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1:
    cdef Py_ssize_t node = target(L, first - 1, NODE_SET, at), i
    s = <object>L.stack[first - 1].obj
    for i in range(first, L.top):
        check_key(L, node, &L.stack[i], at)
        adopt(L, node, L.stack[i].info, at)
        PySet_Add(s, <object>L.stack[i].obj)
    drop(L, first)
    return 0


# ---------------------------------------------------------------- scalars

cdef inline const unsigned char* take(Loader* L, Py_ssize_t count,
                                      Py_ssize_t at) except NULL:
    """The next ``count`` argument bytes of the opcode at ``at``."""
    cdef const unsigned char* p = L.buf + L.pos
    if L.n - L.pos < count:
        fail(at, f"pickle is truncated inside {opcode_name(L.buf[at])}")
    L.pos += count
    return p


cdef inline uint64_t little(const unsigned char* p, int count) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(count):
        v |= (<uint64_t>p[i]) << (8 * i)
    return v


cdef const unsigned char* sized(Loader* L, int width, Py_ssize_t at) except NULL:
    """The bytes of a str/bytes opcode whose length is a ``width``-byte prefix."""
    cdef uint64_t length = little(take(L, width, at), width)
    if length > <uint64_t>(L.n - L.pos):
        fail(at, f"{opcode_name(L.buf[at])} claims {length} bytes, {L.n - L.pos} remain")
    L.pos += <Py_ssize_t>length
    return L.buf + L.pos - <Py_ssize_t>length


cdef int push_str(Loader* L, int width, Py_ssize_t at) except -1:
    cdef const unsigned char* p = sized(L, width, at)
    cdef Py_ssize_t length = L.buf + L.pos - p
    cdef PyObject* value = new_str(<const char*>p, length, NULL)
    if value == NULL and PyErr_ExceptionMatches(UnicodeDecodeError):
        PyErr_Clear()
        fail(at, "string is not UTF-8")
    return push_new(L, value, 1 + length // 8)


cdef int push_bytes(Loader* L, int width, Py_ssize_t at) except -1:
    cdef const unsigned char* p = sized(L, width, at)
    cdef Py_ssize_t length = L.buf + L.pos - p
    return push_new(L, new_bytes(<const char*>p, length), 1 + length // 8)


cdef int push_long(Loader* L, Py_ssize_t count, Py_ssize_t at) except -1:
    """A LONG1/LONG4 integer: ``count`` bytes of little-endian two's complement."""
    cdef const unsigned char* p
    cdef uint64_t v
    if count > 9:
        fail(at, "integer outside the 64-bit range")
    p = take(L, count, at)
    if count == 0:
        return push(L, 0, 1)
    if count == 9:  # 2**63 <= value < 2**64, or a negative int64 written long
        v = little(p, 8)
        if p[8] == 0:
            return push_new(L, new_ulonglong(v), 1)
        if p[8] == 0xFF and v >> 63:
            return push_new(L, new_longlong(<int64_t>v), 1)
        fail(at, "integer outside the 64-bit range")
    v = little(p, count)
    if count < 8 and p[count - 1] & 0x80:
        v |= (~<uint64_t>0) << (8 * count)   # sign-extend
    return push_new(L, new_longlong(<int64_t>v), 1)


cdef double big_endian_double(const unsigned char* p) noexcept:
    cdef uint64_t bits = 0
    cdef double value
    cdef int i
    for i in range(8):
        bits = (bits << 8) | p[i]
    memcpy(&value, &bits, 8)
    return value


# ---------------------------------------------------------------- the loop

cdef object run(Loader* L):
    cdef Py_ssize_t at, first, node
    cdef unsigned char op
    cdef const unsigned char* p
    cdef int64_t length
    while True:
        if L.pos >= L.n:
            raise UnsafePickleError("pickle is truncated (no STOP opcode)")
        at = L.pos
        op = L.buf[at]
        L.pos += 1
        if op == OP_BINGET:
            memo_get(L, take(L, 1, at)[0], at)
        elif op == OP_MEMOIZE:
            memo_put(L, L.memo_len, at)
        elif op == OP_BININT1:
            push_new(L, new_long(take(L, 1, at)[0]), 1)
        elif op == OP_SHORT_BINUNICODE:
            push_str(L, 1, at)
        elif op == OP_NONE:
            push(L, None, 1)
        elif op == OP_MARK:
            if L.n_marks == L.marks_cap:
                L.marks = <Py_ssize_t*>grown(L.marks, &L.marks_cap, sizeof(Py_ssize_t))
            L.marks[L.n_marks] = L.top
            L.n_marks += 1
        elif op == OP_EMPTY_DICT:
            push_new(L, new_dict(), node_info(new_node(L, NODE_DICT, False)))
        elif op == OP_SETITEMS:
            first = pop_mark(L, at)
            if first <= fence(L):
                fail(at, "stack underflow (malformed pickle)")
            node = target(L, first - 1, NODE_DICT, at)
            set_items(L, first, node, <object>L.stack[first - 1].obj, at)
        elif op == OP_SETITEM:
            need(L, 3, at)
            node = target(L, L.top - 3, NODE_DICT, at)
            set_items(L, L.top - 2, node, <object>L.stack[L.top - 3].obj, at)
        elif op == OP_BINFLOAT:
            push_new(L, new_float(big_endian_double(take(L, 8, at))), 1)
        elif op == OP_EMPTY_LIST:
            push_new(L, new_list(0), node_info(new_node(L, NODE_LIST, False)))
        elif op == OP_APPENDS:
            first = pop_mark(L, at)
            if first <= fence(L):
                fail(at, "stack underflow (malformed pickle)")
            extend_list(L, first, at)
        elif op == OP_APPEND:
            need(L, 2, at)
            extend_list(L, L.top - 1, at)
        elif op == OP_BININT2:
            push_new(L, new_long(<long>little(take(L, 2, at), 2)), 1)
        elif op == OP_BININT:
            push_new(L, new_long(<int32_t>little(take(L, 4, at), 4)), 1)
        elif op == OP_LONG1:
            push_long(L, take(L, 1, at)[0], at)
        elif op == OP_LONG4:
            length = <int32_t>little(take(L, 4, at), 4)
            if length < 0:
                fail(at, "LONG4 with a negative byte count")
            push_long(L, length, at)
        elif op == OP_NEWTRUE:
            push(L, True, 1)
        elif op == OP_NEWFALSE:
            push(L, False, 1)
        elif op == OP_BINUNICODE:
            push_str(L, 4, at)
        elif op == OP_BINUNICODE8:
            push_str(L, 8, at)
        elif op == OP_SHORT_BINBYTES:
            push_bytes(L, 1, at)
        elif op == OP_BINBYTES:
            push_bytes(L, 4, at)
        elif op == OP_BINBYTES8:
            push_bytes(L, 8, at)
        elif op == OP_EMPTY_TUPLE:
            push(L, (), node_info(new_node(L, NODE_TUPLE, True)))
        elif op == OP_TUPLE1 or op == OP_TUPLE2 or op == OP_TUPLE3:
            need(L, op - OP_TUPLE1 + 1, at)
            build_tuple(L, L.top - (op - OP_TUPLE1 + 1), at)
        elif op == OP_TUPLE:
            build_tuple(L, pop_mark(L, at), at)
        elif op == OP_LIST:
            build_list(L, pop_mark(L, at), at)
        elif op == OP_DICT:
            first = pop_mark(L, at)
            node = new_node(L, NODE_DICT, False)
            d = {}
            set_items(L, first, node, d, at)
            push(L, d, node_info(node))
        elif op == OP_EMPTY_SET:
            push_new(L, new_set(NULL), node_info(new_node(L, NODE_SET, False)))
        elif op == OP_ADDITEMS:
            first = pop_mark(L, at)
            if first <= fence(L):
                fail(at, "stack underflow (malformed pickle)")
            add_items(L, first, at)
        elif op == OP_FROZENSET:
            build_frozenset(L, pop_mark(L, at), at)
        elif op == OP_BINPUT:
            memo_put(L, take(L, 1, at)[0], at)
        elif op == OP_LONG_BINPUT:
            memo_put(L, <Py_ssize_t>little(take(L, 4, at), 4), at)
        elif op == OP_LONG_BINGET:
            memo_get(L, little(take(L, 4, at), 4), at)
        elif op == OP_POP:
            if L.n_marks and L.marks[L.n_marks - 1] == L.top:
                L.n_marks -= 1   # as CPython: POP right after MARK pops the mark
            else:
                need(L, 1, at)
                drop(L, L.top - 1)
        elif op == OP_POP_MARK:
            drop(L, pop_mark(L, at))
        elif op == OP_DUP:
            need(L, 1, at)
            push(L, <object>L.stack[L.top - 1].obj, L.stack[L.top - 1].info)
        elif op == OP_PROTO:
            if take(L, 1, at)[0] > PROTOCOL:
                fail(at, f"unsupported pickle protocol {L.buf[at + 1]}")
        elif op == OP_FRAME:
            # Frames only group opcodes for buffered reads; the whole pickle is in memory.
            if little(take(L, 8, at), 8) > <uint64_t>(L.n - L.pos):
                fail(at, "FRAME runs past the end of the pickle")
        elif op == OP_STOP:
            if L.pos != L.n:
                fail(at, f"{L.n - L.pos} bytes follow the STOP opcode")
            if L.top != 1 or L.n_marks:
                fail(at, f"STOP leaves {L.top} values and {L.n_marks} marks on the stack "
                         "(malformed pickle)")
            return <object>L.stack[0].obj
        else:
            fail(at, f"pickle opcode {opcode_name(op)} is not allowed (only plain data: "
                     "no globals, calls or persistent ids)")
