"""Loads the plain-data pickles inside Trinity's TRXP payloads and nothing else.

Every opcode is checked before CPython's unpickler sees the bytes: only opcodes that build
None/bool/int/float/str/bytes/tuple/list/dict/set (protocol 2-5, binary forms) pass, so no
global can be named, no callable reached, and no memo index can make the unpickler
allocate more than the pickle's own size. The unpickler also refuses every global itself.
The loaded containers are then walked to refuse cycles, nesting deeper than
``MAX_DEPTH`` and shared references that would expand far beyond the pickle's size.
"""
from __future__ import annotations

import gc
import io
import pickle
import pickletools
import re
import struct
from typing import Any

MAX_DEPTH = 200
_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}
# The allowed opcodes, matched in C by one regex that stops at any other byte (the loop
# below then handles or refuses it). The common ones are written without alternation,
# which costs sre ~3x per opcode: runs of one-byte opcodes (MARK TUPLE* EMPTY_* APPEND(S)
# SETITEM(S) LIST DICT POP POP_MARK DUP NONE NEWTRUE NEWFALSE MEMOIZE EMPTY_SET ADDITEMS
# FROZENSET) around two-byte ones (BININT1 BINPUT BINGET PROTO). Then, less often: BININT2,
# BININT LONG_BINGET, BINFLOAT FRAME, and SHORT_BINUNICODE SHORT_BINBYTES LONG1, whose
# one-byte length n is matched by the branch that reads exactly n bytes.
_ONE = rb"[()0-2N\x88\x89}\]tsu\x85\x86\x87aeld\x94\x8f\x90\x91]*+"
_COMMON = _ONE + rb"(?:[Kqh\x80]." + _ONE + rb")*+"
_SHORT = b"|".join(re.escape(bytes([n])) + b".{%d}" % n for n in range(256))
_FIXED = re.compile(_COMMON + rb"(?:(?:M..|[Jj]....|[G\x95].{8}|[\x8cC\x8a](?:" + _SHORT
                    + rb"))" + _COMMON + rb")*+", re.DOTALL)
# Opcodes followed by a length and that many bytes: SHORT_BINUNICODE BINUNICODE
# BINUNICODE8 SHORT_BINBYTES BINBYTES BINBYTES8 LONG1 LONG4.
_SIZED = {0x8C: struct.Struct("<B"), 0x58: struct.Struct("<I"), 0x8D: struct.Struct("<Q"),
          0x43: struct.Struct("<B"), 0x42: struct.Struct("<I"), 0x8E: struct.Struct("<Q"),
          0x8A: struct.Struct("<B"), 0x8B: struct.Struct("<I")}
_LONG_BINPUT, _STOP = 0x72, 0x2E
_U32 = struct.Struct("<I")
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset})


class UnsafePickle(ValueError):
    """The pickle is malformed or uses an opcode outside the plain-data subset."""


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickle(f"pickle names the global {module}.{name}; no globals are allowed")


def check_opcodes(data: memoryview) -> None:
    """Raise UnsafePickle unless ``data`` is one pickle of allowed opcodes ending at STOP."""
    end = len(data)
    pos = 0
    while True:
        pos = _FIXED.match(data, pos).end()
        if pos >= end:
            raise UnsafePickle("pickle is truncated (no STOP opcode)")
        op = data[pos]
        sized = _SIZED.get(op)
        if sized is not None:
            start = pos + 1 + sized.size
            if start > end:
                raise UnsafePickle(f"pickle is truncated inside {_NAMES[op]} at byte {pos}")
            (length,) = sized.unpack_from(data, pos + 1)
            if length > end - start:
                raise UnsafePickle(f"{_NAMES[op]} at byte {pos} claims {length} bytes, "
                                   f"{end - start} remain")
            pos = start + length
        elif op == _LONG_BINPUT:
            if pos + 5 > end:
                raise UnsafePickle(f"pickle is truncated inside LONG_BINPUT at byte {pos}")
            # CPython sizes its memo array by the index: bound it by the pickle's size.
            if _U32.unpack_from(data, pos + 1)[0] > end:
                raise UnsafePickle(f"LONG_BINPUT at byte {pos} uses a memo index larger "
                                   "than the pickle")
            pos += 5
        elif op == _STOP:
            if pos + 1 != end:
                raise UnsafePickle(f"{end - pos - 1} bytes follow the STOP opcode")
            return
        else:
            name = _NAMES.get(op, f"unknown opcode {op:#04x}")
            raise UnsafePickle(f"pickle opcode {name} at byte {pos} is not allowed "
                               "(only plain data: no globals, calls or persistent ids)")


def load_plain(data: memoryview) -> Any:
    """Unpickle plain data after ``check_opcodes``; every failure is an UnsafePickle."""
    check_opcodes(data)
    try:
        return _NoGlobals(io.BytesIO(data)).load()
    except UnsafePickle:
        raise
    except Exception as exc:  # malformed stacks, unhashable keys, bad memo references...
        raise UnsafePickle(f"malformed pickle: {type(exc).__name__}: {exc}") from None


def check_tree(roots: list, budget: int) -> None:
    """Refuse cycles, nesting deeper than MAX_DEPTH, and more than ``budget`` values when
    shared references are counted every time they occur (what re-encoding would write).

    Walks level by level with ``gc.get_referents`` (the containers' own traversal, in C);
    a shared container is listed once per reference, so sharing that expands, or a cycle,
    exhausts the budget or the depth after bounded work."""
    level = [r for r in roots if type(r) in _CONTAINERS]
    total = len(level)
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise UnsafePickle(f"data nested deeper than {MAX_DEPTH} levels (or a cycle)")
        refs = gc.get_referents(*level)
        total += len(refs)
        if total > budget:
            raise UnsafePickle(f"shared references expand to more than {budget} values "
                               "(or a cycle)")
        level = [r for r in refs if type(r) in _CONTAINERS]
