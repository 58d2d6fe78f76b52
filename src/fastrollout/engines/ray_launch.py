"""Starting engine actors across a Ray cluster: one actor per GPU group, each on resources
reserved for it by a placement group of one bundle (so the group sits on one node, and a
restarted actor gets the same reservation back).

``launch_engine_actors`` takes one engine factory per actor; ``launch_from_config`` builds
those from a job's ``engines:`` section with ``placement: ray``. A CPU-only cluster runs the
same path with ``gpus_per_engine: 0``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..errors import ConfigError, EngineError
from .base import InferenceModel
from .ray_actor import RayEngine

if TYPE_CHECKING:
    from ..job import EnginesConfig


def launch_engine_actors(factories: Sequence[Callable[[], InferenceModel]], *,
                         gpus_per_engine: int = 0, cpus_per_engine: float = 1.0,
                         resources: Mapping[str, float] | None = None,
                         name: str = "engine", ready_timeout: float = 300.0) -> list[RayEngine]:
    """One ``RayEngine`` per factory, each actor holding ``gpus_per_engine`` GPUs (Ray sets
    its ``CUDA_VISIBLE_DEVICES``), ``cpus_per_engine`` CPUs and ``resources`` (custom Ray
    resources, e.g. a label that nodes of one kind were started with) on one node.

    Connects to the Ray cluster first if this process is not connected (``ray.init()``: the
    cluster of ``RAY_ADDRESS`` or one started here with ``ray start``, else a local one).
    Raises ``EngineError`` naming what is missing if the cluster cannot place every engine
    within ``ready_timeout`` seconds; nothing stays reserved then.
    """
    if not factories:
        raise ValueError("launch_engine_actors: no engine factories given")
    if gpus_per_engine < 0 or cpus_per_engine < 0 or gpus_per_engine + cpus_per_engine == 0:
        raise ValueError(f"launch_engine_actors: an engine needs some resources, got "
                         f"gpus_per_engine={gpus_per_engine}, cpus_per_engine={cpus_per_engine}")
    if not ray.is_initialized():
        ray.init()
    bundle = {"CPU": float(cpus_per_engine)} if cpus_per_engine else {}
    if gpus_per_engine:
        bundle["GPU"] = float(gpus_per_engine)
    extra = dict(resources or {})
    bundle.update(extra)
    groups = [placement_group([bundle], strategy="STRICT_PACK") for _ in factories]
    try:
        ray.get([g.ready() for g in groups], timeout=ready_timeout)
    except ray.exceptions.GetTimeoutError:
        for g in groups:
            remove_placement_group(g)
        raise EngineError(
            f"launch_engine_actors: the cluster cannot place {len(groups)} engine(s) of "
            f"{bundle} within {ready_timeout} s (cluster resources: "
            f"{ray.cluster_resources()}); lower count or gpus_per_engine, or add nodes"
        ) from None
    return [RayEngine(factory, name=f"{name}{i}", placement_group=group,
                      actor_options={"num_cpus": cpus_per_engine, "num_gpus": gpus_per_engine,
                                     "resources": extra,
                                     "scheduling_strategy": PlacementGroupSchedulingStrategy(
                                         group, placement_group_bundle_index=0)})
            for i, (factory, group) in enumerate(zip(factories, groups, strict=True))]


def launch_from_config(spec: EnginesConfig) -> list[RayEngine]:
    """The engine actors of a job's ``engines:`` section with ``placement: ray``: each builds
    its one engine from the same section with ``placement: local``, in its own process."""
    from ..job import OpenAIEngines, SimulatedEngines

    local = msgspec.structs.replace(spec, placement="local")
    gpus = 0
    if isinstance(spec, SimulatedEngines):
        specs = [msgspec.structs.replace(local, count=1, seed=spec.seed + i)
                 for i in range(spec.count)]
    elif isinstance(spec, OpenAIEngines):
        specs = [msgspec.structs.replace(local, base_url=url) for url in spec.urls]
    else:
        if not ray.is_initialized():
            ray.init()
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        if spec.gpus_per_engine is not None:
            gpus = spec.gpus_per_engine
        elif cluster_gpus:
            gpus = spec.tensor_parallel_size
        count = spec.count
        if count is None:
            count = cluster_gpus // gpus if gpus else spec.cpu_engines
        if count < 1:
            raise ConfigError(f"engines.count: the cluster's {cluster_gpus} GPU(s) hold no "
                              f"engine of gpus_per_engine={gpus}")
        args = dict(spec.engine_args)
        if spec.tensor_parallel_size > 1:
            # Inside a placement group vLLM would start Ray workers of its own, which the
            # actor's bundle has no room for: its tensor-parallel workers are processes.
            args.setdefault("distributed_executor_backend", "mp")
        one = msgspec.structs.replace(local, gpus=None, cpu_engines=1, count=None,
                                      gpus_per_engine=None, engine_args=args)
        specs = [one] * count
    try:
        return launch_engine_actors([functools.partial(_first_engine, s) for s in specs],
                                    gpus_per_engine=gpus, cpus_per_engine=spec.cpus_per_engine,
                                    name=f"{spec.__struct_config__.tag}-")
    except (ValueError, EngineError) as exc:
        raise ConfigError(f"engines: {exc}") from None


def _first_engine(spec: Any) -> InferenceModel:
    """The one engine a local ``spec`` describes (runs in the actor's process)."""
    from ..job import build_engines

    (engine,) = build_engines(spec)
    return engine  # type: ignore[no-any-return]
