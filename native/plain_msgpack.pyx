"""A pre-scan of untrusted msgpack (FRXP headers) for the bounds msgspec does not enforce.

msgspec decodes a header's ``info``, ``metrics``, ``messages``... into plain dicts and
lists, and hashes every map key as it builds them. This scan reads the bytes once before,
building nothing, and refuses what the pickle loader (plain_pickle) refuses in TRXP
metadata, so that the two formats accept the same data:

- containers nested deeper than MAX_DEPTH;
- a map whose keys other than str cost more than MAX_KEY_COST (1 per value, an array key
  counting its elements too, plus 1 per 8 bytes of str or bin): their hashes can be chosen
  to collide, which makes building the dict quadratic;
- maps inside map keys (unhashable), and extension types (not plain data; msgspec would
  turn some into datetimes);
- containers claiming more values than there are bytes left, and truncated data.
Errors carry the path of the offending value in msgspec's notation (`$[2][0][1].key`), so
the codec names them the way it names msgspec's own errors.
"""
from libc.stdint cimport int64_t, uint64_t

from fastrollout._native.metadata_limits cimport MAX_KEY_COST as _MAX_KEY_COST

from fastrollout.errors import PayloadError

cdef int PATH_FRAMES = 8  # frames named in an error path; deeper ones are written "..."
cdef str KEYS = (f"a map has keys other than str costing over {_MAX_KEY_COST} (1 per value, "
                 "plus 1 per 8 bytes of str or bin): their hashes could be made to collide")
cdef str TRUNCATED = "MessagePack data is truncated"

# What the first byte of a value says. Scalars of a fixed size: how many bytes follow.
cdef enum:
    T_LENGTH = -1       # str or bin 8/16/32: a big-endian length, then that many bytes
    T_CONTAINER = -2    # array or map: fix, 16 or 32
    T_REFUSED = -3      # ext, fixext, and 0xc1 (never used)

cdef enum:
    KEYS_OVER = -2      # scalars(): a map's keys other than str cost too much

cdef signed char FOLLOWS[256]
cdef unsigned char WIDTH[256]   # the length's width for T_LENGTH and 16/32 containers


cdef int fill_tables() except -1:
    cdef int b
    for b in range(256):
        FOLLOWS[b] = T_REFUSED
        WIDTH[b] = 0
        if b <= 0x7F or b >= 0xE0 or b == 0xC0 or b == 0xC2 or b == 0xC3:
            FOLLOWS[b] = 0                              # fixint, nil, false, true
        elif 0xA0 <= b <= 0xBF:
            FOLLOWS[b] = b & 0x1F                       # fixstr
        elif b <= 0x9F:
            FOLLOWS[b] = T_CONTAINER                    # fixmap, fixarray
        elif 0xC4 <= b <= 0xC6 or 0xD9 <= b <= 0xDB:
            FOLLOWS[b] = T_LENGTH                       # bin, str 8/16/32
            WIDTH[b] = 1 << ((b - 0xC4) if b <= 0xC6 else (b - 0xD9))
        elif 0xDC <= b <= 0xDF:
            FOLLOWS[b] = T_CONTAINER                    # array, map 16/32
            WIDTH[b] = 2 if b == 0xDC or b == 0xDE else 4
        elif b == 0xCC or b == 0xD0:
            FOLLOWS[b] = 1                              # uint8, int8
        elif b == 0xCD or b == 0xD1:
            FOLLOWS[b] = 2                              # uint16, int16
        elif b == 0xCA or b == 0xCE or b == 0xD2:
            FOLLOWS[b] = 4                              # float32, uint32, int32
        elif b == 0xCB or b == 0xCF or b == 0xD3:
            FOLLOWS[b] = 8                              # float64, uint64, int64
    return 0


fill_tables()


def check_plain(const unsigned char[::1] data not None):
    """Check one msgpack value at the start of ``data``; see plain_msgpack.pyi."""
    cdef Scanner S
    S.buf = &data[0] if data.shape[0] else NULL
    S.pos = 0
    S.n = data.shape[0]
    S.depth = 0
    scan(&S)


cdef str path(Scanner* S):
    cdef Py_ssize_t i
    cdef Frame* f
    parts = ["$"]
    for i in range(1, min(S.depth, PATH_FRAMES + 1)):  # frames[0] stands for the whole
        f = &S.frames[i]
        if not f.is_map:
            parts.append(f"[{f.count - f.left}]")
        elif (f.count - f.left) % 2:  # reading a value
            if f.key < 0:
                parts.append("[...]")
            else:
                key = (<const char*>S.buf + f.key)[:f.key_len]
                parts.append("." + key.decode("utf-8", "replace"))
    if S.depth > PATH_FRAMES + 1:
        parts.append("...")
    return "".join(parts)


cdef int fail(Scanner* S, str what) except -1:
    if S.depth <= 1:
        raise PayloadError(what)
    raise PayloadError(f"{what} - at `{path(S)}`")


cdef inline uint64_t big(const unsigned char* p, int width) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(width):
        v = (v << 8) | p[i]
    return v


cdef int stop(Scanner* S, Frame cur, Py_ssize_t pos, Py_ssize_t depth,
              str what) except -1:
    """Fail at ``pos`` inside ``cur`` (scan keeps the innermost frame and the position in
    locals): put them where ``path`` reads them first."""
    S.frames[depth - 1] = cur
    S.pos = pos
    S.depth = depth
    return fail(S, what)


cdef inline int64_t scalar(const unsigned char* buf, Py_ssize_t* pos, Py_ssize_t n,
                           Py_ssize_t* str_len) noexcept:
    """Skip the scalar at ``pos``; its cost, or 0 if a container or refused value starts
    there, or -1 if its length runs past ``n``. ``str_len`` is its length if it is a str,
    else -1. (After a fixed-size scalar ``pos`` may pass ``n``: the caller checks.)"""
    cdef unsigned char b = buf[pos[0]]
    cdef int follows, width
    cdef uint64_t size
    # The common first bytes are tested directly: well-predicted branches let the next
    # value's read start early, where a table lookup would delay it.
    if b < 0x80:                                        # positive fixint
        pos[0] += 1
        str_len[0] = -1
        return 1
    if (b & 0xE0) == 0xA0:                              # fixstr
        str_len[0] = b & 0x1F
        pos[0] += 1 + str_len[0]
        return 1 + str_len[0] // 8
    str_len[0] = -1
    if b == 0xC0:                                       # nil
        pos[0] += 1
        return 1
    if b == 0xCB:                                       # float64
        pos[0] += 9
        return 1
    follows = FOLLOWS[b]
    if follows >= 0:
        pos[0] += 1 + follows
        return 1
    if follows != T_LENGTH:
        return 0
    width = WIDTH[b]
    if n - pos[0] - 1 < width:
        return -1
    size = big(buf + pos[0] + 1, width)
    pos[0] += 1 + width
    if size > <uint64_t>(n - pos[0]):
        return -1
    pos[0] += <Py_ssize_t>size
    if b >= 0xD9:
        str_len[0] = <Py_ssize_t>size
    return 1 + <int64_t>(size // 8)


cdef inline int64_t scalars(Frame* f, const unsigned char* buf, Py_ssize_t* pos,
                            Py_ssize_t n) noexcept:
    """Read the scalars of container ``f`` from ``pos`` on, charging its keys, until it is
    complete or something else starts. Returns the last scalar() result (> 0 if f is
    complete; 0 at a container or refused value; -1 if truncated), or KEYS_OVER."""
    # Locals again (f and pos may point anywhere, as far as the compiler knows).
    cdef Py_ssize_t at = pos[0], str_len
    cdef int64_t left = f.left, cost = 1, total = 0
    if f.is_map:
        while left and at < n:
            cost = scalar(buf, &at, n, &str_len)
            if cost <= 0:
                break
            if not left & 1:                            # a key
                if str_len >= 0:
                    f.key = at - str_len
                    f.key_len = str_len
                else:
                    f.key = -1
                    f.key_cost += cost
                    if f.key_cost > _MAX_KEY_COST:
                        cost = KEYS_OVER
                        break
            total += cost
            left -= 1
    else:
        while left and at < n:
            cost = scalar(buf, &at, n, &str_len)
            if cost <= 0:
                break
            total += cost
            left -= 1
    f.cost += total
    f.left = left
    pos[0] = at
    if at > n or (left and at == n):
        return -1
    return cost


cdef int scan(Scanner* S) except -1:
    # frames[0] stands for the whole data, an array of one value, and each open container
    # has the next frame. The innermost one, ``cur``, and the position live in locals
    # (extensions build with -fno-strict-aliasing, so fields behind a pointer would be
    # reloaded after every store); cur goes to its frame when a container opens in it. A
    # container of scalars only (most are) is read at once, without taking a frame.
    cdef const unsigned char* buf = S.buf
    cdef Py_ssize_t pos = 0, n = S.n, depth = 1, in_key = 0
    cdef Frame cur, child
    cdef unsigned char b
    cdef int width
    cdef int64_t cost
    cdef uint64_t size
    cdef bint is_map
    cur.count = cur.left = 1
    cur.cost = cur.key_cost = 0
    cur.key = -1
    cur.key_len = 0
    cur.is_map = False
    while True:
        cost = scalars(&cur, buf, &pos, n)
        if cost < 0:
            stop(S, cur, min(pos, n), depth, KEYS if cost == KEYS_OVER else TRUNCATED)
        if cur.left == 0:                               # cur is complete: a value of its own
            if depth == 1:                              # container, or the whole data
                S.pos = pos
                return 0
            cost = cur.cost
            depth -= 1
            if in_key == depth:
                in_key = 0
            cur = S.frames[depth - 1]
        else:                                           # a container starts, or is refused
            b = buf[pos]
            if FOLLOWS[b] == T_REFUSED:
                stop(S, cur, pos, depth, "MessagePack data is malformed: invalid byte 0xc1"
                     if b == 0xC1 else "MessagePack extension types are not plain data")
            width = WIDTH[b]
            if n - pos - 1 < width:
                stop(S, cur, pos, depth, TRUNCATED)
            size = b & 0x0F if width == 0 else big(buf + pos + 1, width)
            is_map = b <= 0x8F or b >= 0xDE
            pos += 1 + width
            if depth > MAX_DEPTH:
                stop(S, cur, pos, depth, f"data nested deeper than {MAX_DEPTH} levels")
            if in_key or (cur.is_map and not cur.left & 1):     # part of a key
                if is_map:
                    stop(S, cur, pos, depth, "map keys must be hashable: a map is used as a key")
                if not in_key:
                    in_key = depth
            # Every value takes a byte at least: a larger count is a lie, refused at once.
            if (size << is_map) > <uint64_t>(n - pos):
                stop(S, cur, pos, depth, f"{'a map' if is_map else 'an array'} claims {size} "
                     f"{'entries' if is_map else 'elements'}, more than the bytes left")
            child.count = child.left = <int64_t>(size << is_map)
            child.cost = 1
            child.key_cost = 0
            child.key = -1
            child.key_len = 0
            child.is_map = is_map
            cost = scalars(&child, buf, &pos, n) if size else 1
            if cost < 0 or child.left:                  # it holds a container, or fails
                S.frames[depth - 1] = cur
                depth += 1
                cur = child
                if cost < 0:
                    stop(S, cur, min(pos, n), depth, KEYS if cost == KEYS_OVER else TRUNCATED)
                continue
            cost = child.cost                           # complete already
            if in_key == depth:
                in_key = 0
        # A container is complete: a value of cur.
        if cur.is_map and not cur.left & 1:
            cur.key = -1
            cur.key_cost += cost
            if cur.key_cost > _MAX_KEY_COST:
                stop(S, cur, pos, depth, KEYS)
        cur.cost += cost
        cur.left -= 1
