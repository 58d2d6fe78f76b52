"""MathVerifier: math-verify's equivalence check, in worker processes with hard deadlines.

math-verify (sympy underneath) can take seconds on one answer, holds the GIL while it
does, and its own timeouts rely on ``signal.alarm``, which only works in a main thread: in
a workflow's worker thread or on the event loop it can neither be bounded nor kept from
stalling the loop. So the check runs in separate processes (``_verify_worker``), one
request at a time each, under a deadline of ``timeout`` seconds enforced inside the
process; a process that overruns it by ``grace`` seconds more is killed and replaced.
A timed-out or failed check counts as "not equivalent" (and is counted and logged).

``verify`` blocks the calling thread (never the event loop's: use ``verify_async``, which
waits in one of the verifier's own threads).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from typing import IO, Any, cast

from ..errors import FastRolloutError

logger = logging.getLogger(__name__)

# Seconds a new process may take to start and import math-verify (sympy) on a busy machine.
STARTUP_TIMEOUT = 60.0
_MISSING_HINT = "math-verify is not installed; install it with: pip install 'fastrollout[math]'"
# The worker runs as a file, not as a module of this package: it needs neither this package
# nor its imports, only the standard library and math-verify.
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


class VerifierError(FastRolloutError, RuntimeError):
    """A math-verify worker process could not be started."""


_found = False


def require_math_verify() -> None:
    """Raise ImportError naming the extra to install unless math-verify is importable
    (looked up once found: a lookup costs ~0.2 ms)."""
    global _found
    if not _found:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError(_MISSING_HINT)
        _found = True


class _Overrun(Exception):
    """The worker did not reply by the deadline."""


class _Worker:
    """One worker process and its pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, _WORKER_FILE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            # Its own session: a Ctrl-C meant for this process does not reach it; it exits
            # when its stdin closes.
            start_new_session=True)
        # Both pipes exist: they were asked for.
        self._stdin = cast(IO[bytes], self.proc.stdin)
        self._stdout = cast(IO[bytes], self.proc.stdout)
        self._fd = self._stdout.fileno()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        try:
            hello = self._read(time.monotonic() + STARTUP_TIMEOUT)
        except (_Overrun, EOFError) as exc:
            self.kill()
            raise VerifierError(f"math-verify worker process did not start: {exc!r}") from None
        if not hello.get("ready"):
            self.kill()
            error = hello.get("error", hello)
            if "cannot import math_verify" in str(error):
                raise ImportError(f"{_MISSING_HINT} ({error})")
            raise VerifierError(f"math-verify worker process failed to start: {error}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, gold: str, answer: str, timeout: float, grace: float) -> dict[str, Any]:
        """The worker's reply; raises _Overrun (the worker must then be killed) or EOFError."""
        self._stdin.write(json.dumps([gold, answer, timeout]).encode() + b"\n")
        self._stdin.flush()
        return self._read(time.monotonic() + timeout + grace)

    def _read(self, deadline: float) -> dict[str, Any]:
        buf = b""
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not self._selector.select(left):
                raise _Overrun(f"no reply within the deadline from pid {self.pid}")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError(f"math-verify worker process {self.pid} exited "
                               f"(code {self.proc.poll()})")
            buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        return reply

    def kill(self) -> None:
        self._selector.close()
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):      # unsent bytes to a dead process
            self._stdin.close()
        self._stdout.close()


def _close_workers(workers: list[_Worker], lock: threading.Lock) -> None:
    with lock:
        idle = list(workers)
        workers.clear()
    for worker in idle:
        worker.kill()


class MathVerifier:
    """Up to ``max_workers`` math-verify processes, started on demand and kept for reuse.

    ``timeout``: default seconds for one check (inside the worker); ``grace``: extra
    seconds before a worker that has not answered is killed. ``timeouts`` and
    ``failures`` count the checks that ended either way (both answer False).
    """

    def __init__(self, max_workers: int = 2, *, timeout: float = 5.0, grace: float = 2.0) -> None:
        if not (isinstance(max_workers, int) and max_workers >= 1):
            raise ValueError(f"MathVerifier: max_workers must be an int >= 1, got {max_workers!r}")
        self.timeout = _check_seconds("timeout", timeout)
        self.grace = _check_seconds("grace", grace)
        self.max_workers = max_workers
        self.timeouts = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._idle: list[_Worker] = []
        self._started = 0                # workers alive, idle or in use
        self._closed = False
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._finalizer = weakref.finalize(self, _close_workers, self._idle, self._lock)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the idle workers (for monitoring)."""
        with self._lock:
            return [w.pid for w in self._idle]

    def verify(self, gold: str, answer: str, *, timeout: float | None = None) -> bool:
        """Whether ``answer`` is mathematically equivalent to ``gold`` (both bare answers,
        such as ``\\frac{1}{2}`` and ``0.5``). Blocks for at most ``timeout + grace`` seconds
        once a worker is free (plus a worker's start-up the first time)."""
        require_math_verify()
        limit = self.timeout if timeout is None else _check_seconds("timeout", timeout)
        worker = self._acquire()
        try:
            reply = worker.ask(gold, answer, limit, self.grace)
        except (_Overrun, EOFError, OSError) as exc:
            self._discard(worker)
            self._count("failures" if not isinstance(exc, _Overrun) else "timeouts",
                        f"{exc}; worker replaced", gold, answer)
            return False
        except BaseException:
            self._discard(worker)
            raise
        self._release(worker)
        if "ok" in reply:
            return bool(reply["ok"])
        if reply.get("timeout"):
            self._count("timeouts", f"timed out after {limit} s", gold, answer)
        else:
            self._count("failures", f"failed: {reply.get('error')}", gold, answer)
        return False

    async def verify_async(self, gold: str, answer: str, *, timeout: float | None = None) -> bool:
        """``verify`` without blocking the event loop: it waits in a thread of this verifier."""
        require_math_verify()
        with self._lock:
            if self._threads is None:
                self._threads = concurrent.futures.ThreadPoolExecutor(
                    self.max_workers, thread_name_prefix="fastrollout-math-verify")
            threads = self._threads
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            threads, lambda: self.verify(gold, answer, timeout=timeout))

    def close(self) -> None:
        """Stop the idle workers; busy ones stop when their check returns."""
        with self._lock:
            self._closed = True
            threads, self._threads = self._threads, None
            self._free.notify_all()
        self._finalizer()
        if threads is not None:
            threads.shutdown(wait=False)

    # -- the pool ------------------------------------------------------------------------------

    def _acquire(self) -> _Worker:
        with self._lock:
            while True:
                if self._closed:
                    raise VerifierError("MathVerifier is closed")
                if self._idle:
                    worker = self._idle.pop()
                    if worker.proc.poll() is None:
                        return worker
                    self._started -= 1          # it died while idle: not this check's fault
                    worker.kill()
                    continue
                if self._started < self.max_workers:
                    self._started += 1
                    break
                self._free.wait()
        try:
            return _Worker()
        except BaseException:
            with self._lock:
                self._started -= 1
                self._free.notify()
            raise

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                self._free.notify()
                return
            self._started -= 1
        worker.kill()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._started -= 1
            self._free.notify()

    def _count(self, what: str, message: str, gold: str, answer: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)
        logger.warning("math-verify check of %.80r against %.80r %s (counted as wrong)",
                       answer, gold, message)


def _check_seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not (isinstance(value, (int, float))
                                       and 0 < value < float("inf")):
        raise ValueError(f"MathVerifier: {name} must be a positive number of seconds, "
                         f"got {value!r}")
    return float(value)


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier the math reward uses unless given another (one worker per
    CPU, at most four), made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier(min(4, os.cpu_count() or 1))
        return _default


def set_default_verifier(verifier: MathVerifier | None) -> None:
    """Make ``verifier`` the process-wide one (e.g. with more workers or another timeout),
    or with None go back to the built-in one, made on next use. The previous one is closed."""
    global _default
    if verifier is not None and not isinstance(verifier, MathVerifier):
        raise TypeError(f"expected a MathVerifier or None, got {type(verifier).__name__}")
    with _default_lock:
        old, _default = _default, verifier
    if old is not None and old is not verifier:
        old.close()
