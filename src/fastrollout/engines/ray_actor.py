"""RayEngine: an engine in a Ray actor, driven by the coordinator like a local one.

The actor (``EngineActor``) builds its engine (``VLLMEngine``, ``OpenAIEngine``,
``SimulatedEngine``, ...) from a factory inside its own process, on whichever node Ray put
it. ``RayEngine``, the proxy in the coordinator's process, implements ``InferenceModel``.

One Ray call costs far more than a task does (about 0.7 ms here), so requests do not make a
call each: those issued in one event-loop iteration leave in one ``step`` call (with the
aborts of that iteration), and finished requests come back in batches through one
long-polling ``results`` call that is always outstanding. Completions cross Ray as numpy
arrays (token ids int32, logprobs float32), never as Python lists.

Liveness: the outstanding ``results`` call fails as soon as Ray knows the actor is gone
(killed or crashed: at once; node lost: after Ray's health checks, about 15 s by default),
idle or not. The proxy is then dead (``is_dead``), every request in flight fails with
``EngineDeadError`` (the coordinator runs that work on the other engines) and new ones are
refused; ``restart()`` starts a fresh actor on the same reserved resources and the engine
rejoins. An engine that reports ``EngineDeadError`` itself makes the proxy dead the same way.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError

from ..errors import EngineDeadError, EngineError
from ..task import GenerationConfig
from .base import Completion, HFTokenizerMixin, InferenceModel

# One request: (request id, prompt token ids, sampling parameters).
Request = tuple[str, "list[int] | np.ndarray", GenerationConfig]
# Requests as they cross Ray (``pack_requests``).
PackedRequests = tuple[list[str], np.ndarray, np.ndarray, list[GenerationConfig]]
# One finished request: its completions, or the EngineError it failed with.
Result = tuple[str, "list[Completion] | BaseException"]
# Finished requests as they cross Ray (``pack_results``).
Packed = tuple[Any, ...]
# Seconds an engine gets to shut down in its actor before the actor is killed.
_SHUTDOWN_TIMEOUT = 60.0


class EngineActor:
    """The actor's side: one engine, its requests, and a result queue per proxy.

    Each proxy copy (the coordinator's, a driver's) reads its own channel, so two copies of
    one ``RayEngine`` never take each other's results.
    """

    def __init__(self, factory: Callable[[], InferenceModel]) -> None:
        self.engine = factory()
        self._queued: set[str] = set()        # submitted, generate() not called yet
        self._aborted: set[str] = set()       # of those, aborted before they started
        self._running: dict[str, asyncio.Task[None]] = {}
        self._channels: dict[str, tuple[list[Result], asyncio.Event]] = {}

    async def prepare(self) -> tuple[int, Any]:
        """Start the engine: (model_version, its Hugging Face tokenizer or None)."""
        await self.engine.prepare()
        tokenizer = self.engine._tokenizer if isinstance(self.engine, HFTokenizerMixin) else None
        return self.engine.model_version, tokenizer

    async def step(self, channel: str, requests: PackedRequests, aborts: list[str]) -> None:
        """Start ``requests`` (results go to ``channel``), then abort ``aborts``."""
        if channel not in self._channels:
            self._channels[channel] = ([], asyncio.Event())
        for rid, prompt, params in unpack_requests(requests):
            if rid in self._running:
                self._deliver(channel, rid, EngineError(
                    f"engine actor: request id {rid} is already in flight"))
                continue
            self._queued.add(rid)
            self._running[rid] = asyncio.create_task(self._run(channel, rid, prompt, params))
        if aborts:
            # Requests whose generate() has not begun stop there; the engine aborts the rest.
            for rid in aborts:
                if rid in self._queued:
                    self._aborted.add(rid)
            await self.engine.abort([rid for rid in aborts if rid in self._running])

    async def _run(self, channel: str, rid: str, prompt: list[int],
                   params: GenerationConfig) -> None:
        self._queued.discard(rid)
        result: list[Completion] | BaseException
        try:
            if rid in self._aborted:
                self._aborted.discard(rid)
                result = [_aborted_empty() for _ in range(params.n)]
            else:
                result = await self.engine.generate(prompt, params, request_id=rid)
                if not (isinstance(result, list)
                        and all(isinstance(c, Completion) for c in result)):
                    raise TypeError(f"generate() returned {type(result).__name__}, "
                                    f"not a list of Completion")
        except EngineError as exc:
            result = exc
        except Exception as exc:    # an engine bug: this request fails, not the actor
            result = EngineError(f"engine actor: request {rid} failed: {exc!r}")
        finally:
            del self._running[rid]
        self._deliver(channel, rid, result)

    def _deliver(self, channel: str, rid: str, result: list[Completion] | BaseException
                 ) -> None:
        done, wake = self._channels[channel]
        done.append((rid, result))
        wake.set()

    async def results(self, channel: str) -> Packed:
        """Wait for finished requests of ``channel``; all of them that are there, packed."""
        if channel not in self._channels:
            self._channels[channel] = ([], asyncio.Event())
        done, wake = self._channels[channel]
        await wake.wait()
        wake.clear()
        packed = pack_results(done)
        done.clear()
        return packed

    async def update_weights(self, path: str, mode: str) -> int:
        return int(await self.engine.update_weights(path, mode=mode))  # type: ignore[attr-defined]

    def state(self) -> dict[str, Any]:
        """What the engine is doing, for tests and monitoring."""
        engine = self.engine
        return {"model_version": engine.model_version, "is_dead": engine.is_dead,
                "in_flight": len(self._running),
                "engine_unfinished": getattr(engine, "num_unfinished_requests", None),
                "requests_received": getattr(engine, "requests_received", None),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def pack_requests(requests: list[Request]) -> PackedRequests:
    """Requests as one array of all prompt tokens, their lengths, and their parameters
    (equal ones as one object, which pickling then writes once)."""
    rids, lengths, prompts, params = [], [], [], []
    last = None
    for rid, prompt, p in requests:
        rids.append(rid)
        lengths.append(len(prompt))
        prompts.append(prompt)
        if p is not last and p == last:
            p = last
        params.append(p)
        last = p
    tokens = np.fromiter(itertools.chain.from_iterable(prompts), np.int32, count=sum(lengths))
    return rids, np.asarray(lengths, np.int64), tokens, params


def unpack_requests(packed: PackedRequests) -> list[tuple[str, list[int], GenerationConfig]]:
    """``pack_requests`` undone; prompts as lists of ints, as ``generate`` takes them (vLLM
    refuses numpy integers)."""
    rids, lengths, tokens, params = packed
    flat = tokens.tolist()
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends][:len(ends)]
    return [(rid, flat[a:b], p) for rid, a, b, p in zip(rids, starts, ends, params, strict=True)]


def pack_results(results: list[Result]) -> Packed:
    """Finished requests as a few lists and three arrays: the token ids and logprobs of all
    completions, each concatenated, and their lengths. Ray pickles each array as one buffer,
    and its cost per array is what a request would cost if each completion were sent as is."""
    rids, counts, errors = [], [], []
    lengths: list[int] = []
    has_logprobs: list[bool] = []
    tokens, logprobs, reasons, texts, cumulative = [], [], [], [], []
    for rid, result in results:
        rids.append(rid)
        if isinstance(result, BaseException):
            counts.append(-1)
            errors.append(result)
            continue
        counts.append(len(result))
        for c in result:
            lengths.append(len(c.token_ids))
            tokens.append(c.token_ids)
            has_logprobs.append(c.logprobs is not None)
            if c.logprobs is not None:
                logprobs.append(c.logprobs)
            reasons.append(c.finish_reason)
            texts.append(c.text)
            cumulative.append(c.cumulative_logprob)
    return (rids, counts, errors, np.asarray(lengths, np.int64),
            np.concatenate(tokens, dtype=np.int32) if tokens else np.empty(0, np.int32),
            has_logprobs,
            np.concatenate(logprobs, dtype=np.float32) if logprobs else np.empty(0, np.float32),
            reasons, texts, cumulative)


def unpack_results(packed: Packed) -> list[Result]:
    """``pack_results`` undone; the arrays are writable views of one copy of each column."""
    rids, counts, errors, lengths, tokens, has_logprobs, logprobs, reasons, texts, cumulative \
        = packed
    # Ray hands back read-only views of its buffer; one copy per column, not per completion.
    tokens, logprobs = tokens.copy(), logprobs.copy()
    ends = np.cumsum(lengths).tolist()
    out: list[Result] = []
    errors_iter = iter(errors)
    k = t = p = 0
    for rid, count in zip(rids, counts, strict=True):
        if count < 0:
            out.append((rid, next(errors_iter)))
            continue
        completions = []
        for _ in range(count):
            end = ends[k]
            lp = None
            if has_logprobs[k]:
                lp = logprobs[p:p + end - t]
                p += end - t
            completions.append(Completion(tokens[t:end], lp, reasons[k], texts[k], cumulative[k]))
            t = end
            k += 1
        out.append((rid, completions))
    return out


def _aborted_empty() -> Completion:
    return Completion(np.empty(0, np.int32), np.empty(0, np.float32), "abort", "")


class _HFCodec(HFTokenizerMixin):
    """Tokenizing with the engine's Hugging Face tokenizer, in the coordinator's process."""

    def __init__(self, tokenizer: Any, name: str) -> None:
        self._tokenizer = tokenizer
        self.name = name


class RayEngine:
    """``InferenceModel`` of an engine in an ``EngineActor``.

    ``factory`` builds the engine in the actor's process (a class, a ``functools.partial``;
    Ray pickles it). ``actor_options`` are Ray's (``num_gpus``, ``scheduling_strategy``,
    ...). ``launch_engine_actors`` (``ray_launch.py``) makes these with one placement group
    per engine. The actor starts at once; ``prepare()`` starts its engine.

    Tokenizing happens here: with the engine's Hugging Face tokenizer (shipped from the actor
    by ``prepare()``), or for engines without one (``SimulatedEngine``) with a copy built from
    ``factory`` in this process and never started. A ``RayEngine`` can be pickled (to a
    coordinator actor): the copy drives the same actor once prepared.
    """

    def __init__(self, factory: Callable[[], InferenceModel], *, name: str = "ray-engine",
                 actor_options: dict[str, Any] | None = None,
                 placement_group: Any = None) -> None:
        self.factory = factory
        self.name = name
        self.actor_options = dict(actor_options or {})
        self.placement_group = placement_group      # removed by shutdown(), if any
        self.model_version = 0
        self.actor = _new_actor(factory, self.actor_options)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        """This process's state of the connection (not pickled)."""
        self._channel = uuid.uuid4().hex
        self._codec: _HFCodec | InferenceModel | None = None
        self._dead: str | None = None
        self._shut = False
        self._pending: dict[str, asyncio.Future[list[Completion]]] = {}
        self._outbox: list[Request] = []
        self._abort_box: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._steps: set[asyncio.Future[Any]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"factory": self.factory, "name": self.name, "actor_options": self.actor_options,
                "placement_group": self.placement_group, "model_version": self.model_version,
                "actor": self.actor}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    # -- lifecycle ---------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Start the remote engine (idempotent) and begin listening for its results."""
        if self._shut:
            raise EngineDeadError(f"{self.name}: prepare() after shutdown()")
        loop = asyncio.get_running_loop()
        if self._poller is not None and not self._dead:
            if self._loop is loop:
                return
            # Prepared on another event loop (one that has ended): listen again from this one.
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._poller.cancel)
            self._reset_runtime()
        try:
            version, tokenizer = await self.actor.prepare.remote()
        except RayActorError as exc:
            self._dead = f"engine actor died: {exc}"
            raise EngineDeadError(f"{self.name}: {self._dead}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise EngineDeadError(f"{self.name}: the engine failed to start in its actor: "
                                  f"{exc.cause!r}") from exc
        self.model_version = version
        self._codec = _HFCodec(tokenizer, self.name) if tokenizer is not None else self.factory()
        self._loop = loop
        self._dead = None
        self._poller = self._loop.create_task(
            _poll(weakref.ref(self), self.actor, self._channel),
            name=f"{self.name}-results")

    async def restart(self) -> None:
        """Replace the actor (dead or not) by a fresh one on the same resources and start it;
        the coordinator's slots of this engine take work again."""
        if self._shut:
            raise EngineDeadError(f"{self.name}: restart() after shutdown()")
        await self._stop("restarted")
        ray.kill(self.actor, no_restart=True)
        self.actor = _new_actor(self.factory, self.actor_options)
        self._channel = uuid.uuid4().hex
        await self.prepare()

    async def shutdown(self) -> None:
        """Stop the engine and its actor, and release its reserved resources (idempotent)."""
        if self._shut:
            return
        self._shut = True
        if not self._dead:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.actor.shutdown.remote().future()),
                                       _SHUTDOWN_TIMEOUT)
            except (ray.exceptions.RayError, TimeoutError):
                pass        # dead, dying or stuck: killing it is all that is left
        await self._stop("shut down")
        ray.kill(self.actor, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)

    async def _stop(self, reason: str) -> None:
        poller, self._poller = self._poller, None
        self._died(reason)
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        if self._steps:
            await asyncio.gather(*self._steps, return_exceptions=True)

    @property
    def is_dead(self) -> bool:
        return self._dead is not None or self._shut

    def _died(self, reason: str) -> None:
        """The actor or its engine is gone: fail what is in flight, refuse what comes."""
        if self._dead is None:
            self._dead = reason
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._outbox.clear()
        self._abort_box.clear()
        pending, self._pending = self._pending, {}
        for rid, fut in pending.items():
            if not fut.done():
                fut.set_exception(EngineDeadError(f"{self.name}: {reason}; request {rid} lost"))

    # -- generation --------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int] | np.ndarray, params: GenerationConfig,
                       *, request_id: str) -> list[Completion]:
        if self._dead or self._shut:
            raise EngineDeadError(f"{self.name}: {self._dead or 'shut down'}; request "
                                  f"{request_id} refused")
        if self._poller is None:
            raise EngineError(f"{self.name}: call prepare() first")
        if request_id in self._pending:
            raise EngineError(f"{self.name}: request id {request_id} is already in flight")
        fut: asyncio.Future[list[Completion]] = self._loop.create_future()  # type: ignore[union-attr]
        self._pending[request_id] = fut
        self._outbox.append((request_id, prompt_token_ids, params))
        self._schedule_flush()
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelling a generate call aborts its request in the engine.
            if self._pending.pop(request_id, None) is not None:
                self._abort_box.append(request_id)
                self._schedule_flush()
            raise

    async def abort(self, request_ids: list[str]) -> None:
        """Abort requests in the remote engine; their ``generate`` calls return the tokens
        made so far (none for a request that had not started)."""
        ids = [rid for rid in request_ids if rid in self._pending]
        if ids and not self.is_dead:
            self._abort_box.extend(ids)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)  # type: ignore[union-attr]

    def _flush(self) -> None:
        """Send this loop iteration's requests and aborts in one call."""
        self._flush_handle = None
        requests, self._outbox = self._outbox, []
        aborts, self._abort_box = self._abort_box, []
        try:
            ref = self.actor.step.remote(self._channel, pack_requests(requests), aborts)
        except Exception as exc:    # e.g. a request Ray cannot serialize
            self._requests_failed(requests, aborts, exc)
            return
        step = asyncio.wrap_future(ref.future(), loop=self._loop)
        self._steps.add(step)
        step.add_done_callback(lambda f: self._step_done(f, requests, aborts))

    def _step_done(self, step: asyncio.Future[Any], requests: list[Request],
                   aborts: list[str]) -> None:
        self._steps.discard(step)
        if step.cancelled():
            return
        exc = step.exception()
        if exc is None:
            return
        if isinstance(exc, RayActorError):
            self._died(f"engine actor died: {exc}")
        else:
            self._requests_failed(requests, aborts, exc)

    def _requests_failed(self, requests: list[Request], aborts: list[str],
                         exc: BaseException) -> None:
        """The call carrying ``requests`` and ``aborts`` failed: those requests fail (an
        abort that did not arrive leaves its request's fate unknown), the engine lives on."""
        for rid in itertools.chain((r[0] for r in requests), aborts):
            fut = self._pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(EngineError(f"{self.name}: request {rid} could not be sent "
                                              f"to the engine actor: {exc!r}"))

    def _deliver(self, results: list[Result]) -> None:
        pending = self._pending
        for rid, result in results:
            fut = pending.pop(rid, None)
            if fut is None or fut.done():
                continue        # cancelled meanwhile
            if isinstance(result, BaseException):
                if isinstance(result, EngineDeadError):
                    self._dead = f"engine died in its actor: {result}"
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if self._dead:
            self._died(self._dead)

    # -- weights and state -------------------------------------------------------------------

    async def update_weights(self, path: str | os.PathLike[str], *, mode: str = "wait") -> int:
        """Load a checkpoint folder into the remote engine (the path as the actor's node sees
        it); returns the new ``model_version``."""
        if self.is_dead:
            raise EngineDeadError(f"{self.name}: {self._dead or 'shut down'}; no weight update")
        try:
            self.model_version = await self.actor.update_weights.remote(os.fspath(path), mode)
        except RayActorError as exc:
            self._died(f"engine actor died: {exc}")
            raise EngineDeadError(f"{self.name}: {self._dead}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None
        return self.model_version

    async def remote_state(self) -> dict[str, Any]:
        """The actor's view: its engine's ``model_version``, ``is_dead``, requests in flight,
        its process id and node."""
        state: dict[str, Any] = await self.actor.state.remote()
        return state

    # -- tokenizer ---------------------------------------------------------------------------

    def _tok(self) -> _HFCodec | InferenceModel:
        if self._codec is None:
            raise EngineError(f"{self.name}: tokenizer not loaded; call prepare() first")
        return self._codec

    def encode(self, text: str) -> list[int]:
        return self._tok().encode(text)

    def decode(self, token_ids: list[int] | np.ndarray) -> str:
        return self._tok().decode(token_ids)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        return self._tok().apply_chat_template(messages)


async def _poll(ref: weakref.ref[RayEngine], actor: Any, channel: str) -> None:
    """The always-outstanding ``results`` call: delivers finished requests, and notices the
    actor's death at once, busy or idle. Holds the proxy weakly."""
    while True:
        try:
            results = unpack_results(await actor.results.remote(channel))
        except Exception as exc:
            # Dead, or (a bug) the results cannot be read: either way they never come, so
            # the requests waiting for them fail now rather than hang.
            reason = (f"engine actor died: {exc}" if isinstance(exc, RayActorError)
                      else f"results of the engine actor cannot be read: {exc!r}")
            engine = ref()
            if engine is not None:
                engine._died(reason)
            return
        engine = ref()
        if engine is None:
            return
        engine._deliver(results)
        if engine.is_dead:
            return
        del engine


def _new_actor(factory: Callable[[], InferenceModel], options: dict[str, Any]) -> Any:
    # max_concurrency bounds the calls the actor runs at once: the long poll, a step, and
    # the control calls; requests run as tasks inside the actor, not as calls.
    return _REMOTE_ACTOR.options(max_concurrency=64, **options).remote(factory)


_REMOTE_ACTOR = ray.remote(EngineActor)
