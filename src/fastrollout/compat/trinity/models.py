"""Trinity's model actors as the facade's slots see them.

Trinity gives each of its runner actors its own ``ModelWrapper`` over the engine actors
(its own history, workflow state and OpenAI clients). Here every slot of the scheduler
gets the same: one ``ModelWrapper`` per slot and model, built over the engine's actor
handle as Trinity's ``Allocator.get_model`` builds it. The handle is wrapped so that the
slot knows the engine calls its attempt has in flight: cancelling the attempt cancels
them (``ray.cancel``: Trinity's engine actors are async actors, so the call's coroutine is
cancelled there, and vLLM aborts a request whose coroutine is cancelled).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from ...coordinator import CANCEL_GRACE

logger = logging.getLogger(__name__)


class EngineRef:
    """One Trinity engine as fastrollout's scheduler sees it: its slots' liveness and the
    weight version its last attempt read. Requests go through the slots' model wrappers."""

    __slots__ = ("config", "handle", "api_address", "model_version")

    is_dead = False     # a dead actor fails its attempts, which retry; nothing waits on it

    def __init__(self, config: Any, handle: Any = None, api_address: str | None = None) -> None:
        self.config = config            # the engine's InferenceModelConfig
        self.handle = handle            # its Ray actor (Trinity's InferenceModel), once found
        self.api_address = api_address
        self.model_version = 0

    @classmethod
    def given(cls, model: Any, config: Any) -> EngineRef:
        """An engine handed to the coordinator: a Trinity ``ModelWrapper`` (what the Explorer
        holds) or a Ray actor handle of a Trinity ``InferenceModel``."""
        if hasattr(model, "models") and hasattr(model, "config"):     # a ModelWrapper
            return cls(model.config, model.model, getattr(model, "api_address", None))
        if isinstance(model, ray.actor.ActorHandle):
            return cls(config, model)
        raise TypeError(f"expected a Trinity ModelWrapper or a Ray actor handle of a Trinity "
                        f"InferenceModel, got {type(model).__name__}")

    def locate(self, allocator: Any, role: str, engine_id: int) -> None:
        """Find the actor Trinity's explorer created for this engine, by its name."""
        self.handle = allocator.get_model(self.config, role, engine_id).model

    async def prepare(self) -> None:
        """Nothing to start: Trinity's explorer owns the engine actors."""

    async def shutdown(self) -> None:
        """Nothing to stop: Trinity's explorer shuts its engine actors down."""


class TrackedActor:
    """An engine's actor handle that records the calls made through it, for ``cancel()``.

    Only ``.method.remote(...)`` is used by Trinity's ModelWrapper; anything else is the
    handle's own."""

    __slots__ = ("_handle", "_inflight")

    def __init__(self, handle: Any, inflight: set[Any]) -> None:
        self._handle = handle
        self._inflight = inflight

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handle, name)
        if isinstance(attr, ray.actor.ActorMethod):
            return _TrackedMethod(attr, self._inflight)
        return attr

    def __reduce__(self) -> Any:
        return (_untracked, (self._handle,))


def _untracked(handle: Any) -> Any:
    """A TrackedActor sent elsewhere (a workflow pickling its model) is the plain handle."""
    return handle


class _TrackedMethod:
    __slots__ = ("_method", "_inflight")

    def __init__(self, method: Any, inflight: set[Any]) -> None:
        self._method = method
        self._inflight = inflight

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        ref = self._method.remote(*args, **kwargs)
        self._inflight.add(ref)
        return ref

    def options(self, **options: Any) -> _TrackedMethod:
        return _TrackedMethod(self._method.options(**options), self._inflight)


class SlotModels:
    """What one slot's workflows get: its own ``ModelWrapper`` of the rollout engine and of
    each auxiliary engine (as a Trinity runner has), the slot's runner state, and the engine
    calls in flight."""

    __slots__ = ("index", "engine", "aux_engines", "model", "auxiliary", "inflight", "state",
                 "workflow", "owner")

    def __init__(self, index: int, engine: EngineRef, aux_engines: list[EngineRef],
                 owner: Any) -> None:
        from trinity.common.models.model import ModelWrapper

        self.index = index
        self.engine = engine
        self.aux_engines = aux_engines
        self.inflight: set[Any] = set()
        self.model = ModelWrapper(model=TrackedActor(engine.handle, self.inflight),
                                  config=engine.config, api_address=engine.api_address)
        self.auxiliary = [ModelWrapper(model=TrackedActor(e.handle, self.inflight),
                                       config=e.config, api_address=e.api_address)
                          for e in aux_engines]
        # Trinity's runner state: what get_runner_state reports (plus the workflow state).
        self.state: dict[str, Any] = {"workflow_id": None, "model_version": None,
                                      "begin_time": 0, "terminate_time": 0}
        self.workflow: Any = None   # kept for reuse by resettable workflows
        self.owner = owner          # the slot worker these wrappers belong to

    def fresh(self) -> SlotModels:
        """New wrappers for this slot, owned by no worker yet (Trinity restarts the runner)."""
        return SlotModels(self.index, self.engine, self.aux_engines, None)

    async def prepare(self) -> None:
        """Trinity's ModelWrapper.prepare: waits for the engine's OpenAI server, if enabled."""
        for wrapper in (self.model, *self.auxiliary):
            await wrapper.prepare()

    async def cancel(self) -> None:
        """Cancel this slot's engine calls still in flight (its attempt was cancelled) and
        give the engines up to ``CANCEL_GRACE`` seconds to confirm."""
        refs = list(self.inflight)
        self.inflight.clear()
        for ref in refs:
            try:
                ray.cancel(ref)
            except Exception:   # the actor is gone: nothing to stop
                logger.debug("ray.cancel(%s) failed", ref, exc_info=True)
        if refs:
            ends = [asyncio.ensure_future(_outcome(ref)) for ref in refs]
            _, late = await asyncio.wait(ends, timeout=CANCEL_GRACE)
            for end in late:
                end.cancel()

    async def close(self) -> None:
        """Close the OpenAI clients workflows made from this slot's wrappers."""
        for wrapper in (self.model, *self.auxiliary):
            await close_clients(wrapper.openai_client, wrapper.openai_async_client)

    async def report(self) -> dict[str, Any]:
        """The runner state as Trinity's scheduler reports it."""
        state = dict(self.state)
        state.update(await self.model.get_workflow_state())
        state["running_time"] = time.time() - state.get("begin_time", time.time())
        return state


async def _outcome(ref: Any) -> None:
    """Wait for a cancelled call to end, however it ends."""
    try:
        await ref
    except BaseException:   # TaskCancelledError, or whatever the engine raised meanwhile
        pass


async def close_clients(*clients: Any) -> None:
    """Close OpenAI clients (sync or async; None skipped). A client that cannot be closed
    (made on another thread's event loop) is logged and left to the garbage collector."""
    for client in clients:
        if client is not None:
            try:
                result = client.close()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                logger.warning("closing %r failed", client, exc_info=True)
