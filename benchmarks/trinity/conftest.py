"""Local Ray and the engine actors for the Trinity benchmarks.

These benchmarks import Trinity-RFT 0.6.0 with its explorer dependencies and Ray, which only
``.venv-trinity`` has (``.ci/trinity-venv`` builds it); ``benchmarks/conftest.py`` leaves this
folder out of ``make bench``. Run them by path::

    .venv-trinity/bin/python -m pytest benchmarks/trinity --benchmark-only
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    import ray

    from benchmarks.trinity.latency_engine import NAMESPACE, LatencyEngine, engine_config
except ImportError as error:    # the project venv: Trinity is there without its dependencies
    raise ImportError(f"benchmarks/trinity needs Trinity-RFT's explorer dependencies and Ray "
                      f"({error}); run it in .venv-trinity, which .ci/trinity-venv builds"
                      ) from error

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    # Ray workers (engines, coordinators, Trinity's runners) import the benchmark's engine and
    # workflow classes from the repository root.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=NAMESPACE,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def latency_engines(local_ray, request):
    """The requesting module's ``ENGINES`` LatencyEngine actors, named as Trinity's explorer
    names its rollout engines, so that both coordinators find them from the config."""
    count = request.module.ENGINES
    model = engine_config(count).explorer.rollout_model
    actors = [ray.remote(LatencyEngine).options(
        name=f"explorer_rollout_model_{i}_0", namespace=NAMESPACE).remote(model)
        for i in range(count)]
    ray.get([actor.__ray_ready__.remote() for actor in actors])
    yield actors
    for actor in actors:
        ray.kill(actor)
