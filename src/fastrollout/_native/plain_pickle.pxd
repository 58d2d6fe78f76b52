# The contract of fastrollout._native.plain_pickle: the opcodes it reads, the loader's state
# and the per-container bookkeeping that bounds nesting, sharing and non-str keys.
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


# The pickle opcodes that build plain data (protocols 2-5, binary forms). Any other byte
# where an opcode is expected is refused.
cdef enum Opcode:
    OP_MARK = 0x28              # (
    OP_EMPTY_TUPLE = 0x29       # )
    OP_STOP = 0x2E              # .
    OP_POP = 0x30               # 0
    OP_POP_MARK = 0x31          # 1
    OP_DUP = 0x32               # 2
    OP_BINBYTES = 0x42          # B
    OP_SHORT_BINBYTES = 0x43    # C
    OP_BINFLOAT = 0x47          # G
    OP_BININT = 0x4A            # J
    OP_BININT1 = 0x4B           # K
    OP_BININT2 = 0x4D           # M
    OP_NONE = 0x4E              # N
    OP_BINUNICODE = 0x58        # X
    OP_EMPTY_LIST = 0x5D        # ]
    OP_APPEND = 0x61            # a
    OP_DICT = 0x64              # d
    OP_APPENDS = 0x65           # e
    OP_BINGET = 0x68            # h
    OP_LONG_BINGET = 0x6A       # j
    OP_LIST = 0x6C              # l
    OP_BINPUT = 0x71            # q
    OP_LONG_BINPUT = 0x72       # r
    OP_SETITEM = 0x73           # s
    OP_TUPLE = 0x74             # t
    OP_SETITEMS = 0x75          # u
    OP_EMPTY_DICT = 0x7D        # }
    OP_PROTO = 0x80
    OP_TUPLE1 = 0x85
    OP_TUPLE2 = 0x86
    OP_TUPLE3 = 0x87
    OP_NEWTRUE = 0x88
    OP_NEWFALSE = 0x89
    OP_LONG1 = 0x8A
    OP_LONG4 = 0x8B
    OP_SHORT_BINUNICODE = 0x8C
    OP_BINUNICODE8 = 0x8D
    OP_BINBYTES8 = 0x8E
    OP_EMPTY_SET = 0x8F
    OP_ADDITEMS = 0x90
    OP_FROZENSET = 0x91
    OP_MEMOIZE = 0x94
    OP_FRAME = 0x95


cdef enum NodeKind:
    NODE_LIST, NODE_DICT, NODE_SET, NODE_TUPLE, NODE_FROZENSET


# One container the pickle builds. A list, dict or set is open while it is built; placing
# it in another container closes it for good (pickle.dumps never changes a container after
# that), so its cost and height are final whenever something holds it, and no container
# can come to hold itself.
ctypedef struct Node:
    int64_t cost        # values in it, counted once per reference, plus str/bytes lengths
    int64_t key_cost    # dict/set: cost of its keys (elements) that are not str
    int32_t height      # 1 + the height of its highest element (a scalar's height is 0)
    uint8_t kind        # a NodeKind
    uint8_t closed      # placed in another container: no longer changes
    uint8_t hashable    # tuple/frozenset of hashable values: usable as a key


# A stack or memo entry: an owned reference and what the checks need to know of it.
ctypedef struct Slot:
    PyObject* obj
    int64_t info        # >= 1: a scalar's cost; < 0: the container node -1 - info


ctypedef struct Loader:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t n
    int64_t budget      # the most the result may cost
    Slot* stack
    Py_ssize_t top
    Py_ssize_t stack_cap
    Py_ssize_t* marks   # stack heights at each open MARK
    Py_ssize_t n_marks
    Py_ssize_t marks_cap
    Slot* memo          # dense: entries 0 .. memo_len - 1 are set
    Py_ssize_t memo_len
    Py_ssize_t memo_cap
    Node* nodes
    Py_ssize_t n_nodes
    Py_ssize_t nodes_cap


# Raise UnsafePickleError("{what} at byte {at}").
cdef int fail(Py_ssize_t at, str what) except -1
# pickletools' name of an opcode (only for refusals).
cdef str opcode_name(unsigned char op)
# Run the opcodes from L.pos to STOP; returns the one value left (a new reference).
cdef object run(Loader* L)
# Release every reference and buffer L holds (after run, whether it returned or raised).
cdef void release(Loader* L) noexcept
# ``block`` reallocated to twice its capacity ``cap`` (updated) of ``item``-byte items.
cdef void* grown(void* block, Py_ssize_t* cap, size_t item) except NULL

# The stack: push a value (or steal a new reference); the fence (the innermost MARK) below
# which opcodes may not consume; the check that ``count`` values lie above it; MARK popped;
# values dropped.
cdef int push(Loader* L, object value, int64_t info) except -1
cdef int push_new(Loader* L, PyObject* value, int64_t info) except -1
cdef Py_ssize_t fence(Loader* L) noexcept
cdef int need(Loader* L, Py_ssize_t count, Py_ssize_t at) except -1
cdef Py_ssize_t pop_mark(Loader* L, Py_ssize_t at) except -1
cdef void drop(Loader* L, Py_ssize_t down_to) noexcept
# The memo: PUT at index ``idx`` (at most the next one), GET of a set index.
cdef int memo_put(Loader* L, Py_ssize_t idx, Py_ssize_t at) except -1
cdef int memo_get(Loader* L, uint64_t idx, Py_ssize_t at) except -1
# A new container node (cost 1, height 1, open), and the Slot.info that refers to it.
cdef Py_ssize_t new_node(Loader* L, int kind, bint hashable) except -1
cdef int64_t node_info(Py_ssize_t node) noexcept

# Place the value ``info`` describes in the open container node ``parent``: charge its cost
# and height, and close it if it is a container.
cdef int adopt(Loader* L, Py_ssize_t parent, int64_t info, Py_ssize_t at) except -1
# Check a dict key or set element of ``parent`` before it is hashed.
cdef int check_key(Loader* L, Py_ssize_t parent, Slot* key, Py_ssize_t at) except -1
# The open container node of ``kind`` at stack index ``idx`` (what APPEND... change).
cdef Py_ssize_t target(Loader* L, Py_ssize_t idx, int kind, Py_ssize_t at) except -1

# The values on the stack from ``first`` up, into a new tuple, list or frozenset (replacing
# them), or added to the list, dict (``d``, node ``node``) or set just below them.
cdef int build_tuple(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1
cdef int build_list(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1
cdef int build_frozenset(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1
cdef int extend_list(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1
cdef int set_items(Loader* L, Py_ssize_t first, Py_ssize_t node, object d,
                   Py_ssize_t at) except -1
cdef int add_items(Loader* L, Py_ssize_t first, Py_ssize_t at) except -1

# Opcode arguments: the next ``count`` bytes; a little-endian integer; the bytes of a
# str/bytes opcode with a ``width``-byte length; scalars pushed from them.
cdef const unsigned char* take(Loader* L, Py_ssize_t count, Py_ssize_t at) except NULL
cdef uint64_t little(const unsigned char* p, int count) noexcept
cdef const unsigned char* sized(Loader* L, int width, Py_ssize_t at) except NULL
cdef int push_str(Loader* L, int width, Py_ssize_t at) except -1
cdef int push_bytes(Loader* L, int width, Py_ssize_t at) except -1
cdef int push_long(Loader* L, Py_ssize_t count, Py_ssize_t at) except -1
cdef double big_endian_double(const unsigned char* p) noexcept
