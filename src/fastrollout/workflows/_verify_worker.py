"""The math-verify worker process, run as a script by ``verifier.MathVerifier``.

Reads one JSON request per line on stdin, ``[gold, answer, timeout_seconds]``, and writes
one JSON reply per line: ``{"ok": bool}``, ``{"timeout": true}`` or ``{"error": str}``.
The first line it writes is ``{"ready": true}`` once math-verify is imported (or
``{"error": ...}`` if it cannot be). It exits when stdin closes.

math-verify's own timeouts are ``signal.alarm`` calls, which work only in a main thread and
take whole seconds; this process runs it in its main thread under one ``setitimer``
deadline per request instead. The parent kills the process if even that does not
return (code that never reaches the interpreter's signal check).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


class _Deadline(BaseException):
    """Raised by the timer. A BaseException: math-verify catches Exception around its steps."""


def _expire(signum: int, frame: object) -> None:
    raise _Deadline


def _check(parse: Callable[..., Any], verify: Callable[..., Any], gold: str, answer: str,
           limit: float) -> dict[str, Any]:
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        try:
            ok = verify(parse(f"\\boxed{{{gold}}}", parsing_timeout=None),
                        parse(f"\\boxed{{{answer}}}", parsing_timeout=None),
                        timeout_seconds=None)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        return {"timeout": True}
    except Exception as exc:    # math-verify's failure on one answer is that answer's
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": bool(ok)}


def main() -> int:
    # Replies go through a private copy of stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj).encode() + b"\n")
        out.flush()

    try:
        from math_verify import parse, verify  # type: ignore[import-untyped]
    except ImportError as exc:
        reply({"error": f"cannot import math_verify: {exc}"})
        return 1
    # It warns once that its own (signal) timeouts are off: they are, on purpose.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _expire)
    reply({"ready": True})
    for line in sys.stdin.buffer:
        gold, answer, limit = json.loads(line)
        reply(_check(parse, verify, gold, answer, limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
