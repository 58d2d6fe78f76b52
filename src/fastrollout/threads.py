"""Worker threads for synchronous workflows.

A sync ``Workflow.run()`` must never block the event loop, and one that overruns
its timeout cannot be killed: it is detached and its slot is freed at once. A
fixed-size executor would then lose a worker for good, so this pool starts a
new thread whenever no idle one is left; threads that finish go back to idle.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class WorkerPool:
    def __init__(self, name: str = "fastrollout-worker") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def busy(self) -> int:
        """Threads running a job now (detached ones included)."""
        with self._lock:
            return sum(t.is_alive() for t in self._threads) - self._idle

    def run(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn()`` in a worker thread; the returned future resolves on the calling loop.

        Cancelling the future does not stop ``fn`` (threads cannot be killed); its
        result is then dropped.
        """
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._idle:
                self._idle -= 1
            else:
                thread = threading.Thread(target=self._work,
                                          name=f"{self._name}-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
        self._jobs.put((fn, loop, fut))
        return fut

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, loop, fut = job
            try:
                result, error = fn(), None
            except BaseException as exc:  # delivered to the awaiting caller
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_resolve, fut, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
            del job, fn, fut, result, error
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        """Stop idle threads; busy (detached) ones end when their job returns."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(_STOP)


def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
