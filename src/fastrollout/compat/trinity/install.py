"""Make Trinity-RFT's Explorer build fastrollout's coordinator: ``install()``.

Trinity's explorer calls ``RolloutCoordinator.get_actor(config)``, a name its module
imported from ``trinity.explorer.rollout_coordinator``. ``patch()`` points that name, in
both modules, at ``fastrollout.compat.trinity.RolloutCoordinator``: now for modules
already imported, else the moment they are (an import hook; importing Trinity is left to
Trinity).

Trinity runs its Explorer as a Ray actor, in a worker process that never ran the user's
script; the patch must happen there too. ``install()`` therefore also makes every later
``ray.init`` start its workers with ``runtime_env["worker_process_setup_hook"]`` set to
``patch``. ``fastrollout-trinity`` (``main`` here) is Trinity's own command line with
``install()`` done first: ``fastrollout-trinity run --config job.yaml``.
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

# Where Trinity's explorer looks the coordinator class up.
TARGETS = ("trinity.explorer.rollout_coordinator", "trinity.explorer.explorer")
SETUP_HOOK = f"{__name__}.patch"


def _replace(module: ModuleType) -> None:
    from .coordinator import RolloutCoordinator

    module.RolloutCoordinator = RolloutCoordinator      # type: ignore[attr-defined]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches a target module right after it is executed, wherever it is loaded from."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _replace(module)


def patch() -> None:
    """Point Trinity's coordinator name at fastrollout's, in this process. Idempotent;
    imports Trinity only if it is imported already. Ray's ``worker_process_setup_hook``."""
    for name in TARGETS:
        module = sys.modules.get(name)
        if module is not None:
            _replace(module)
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def install() -> None:
    """The one call a Trinity user adds before the explorer starts: ``patch()`` here and in
    the workers of every Ray runtime started after it (``ray.init`` gets the setup hook).
    With Ray already initialized, only this process is patched: a warning says so."""
    import ray

    patch()
    if getattr(ray.init, "_fastrollout_hook", False):
        return
    if ray.is_initialized():
        logger.warning("fastrollout: Ray is already initialized, so only this process uses "
                       "fastrollout's coordinator; call install() before ray.init, or start Ray "
                       "with runtime_env={'worker_process_setup_hook': %r}", SETUP_HOOK)
    ray.init = _with_setup_hook(ray.init)


def _with_setup_hook(init: Any) -> Any:
    @functools.wraps(init)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        runtime_env = dict(kwargs.get("runtime_env") or {})
        hook = runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
        if hook != SETUP_HOOK:
            raise RuntimeError(f"ray.init: runtime_env['worker_process_setup_hook'] is {hook!r}; "
                               f"fastrollout.compat.trinity.install() needs it to be "
                               f"{SETUP_HOOK!r} (call yours from a hook of your own that also "
                               f"calls {SETUP_HOOK})")
        kwargs["runtime_env"] = runtime_env
        return init(*args, **kwargs)

    wrapper._fastrollout_hook = True    # type: ignore[attr-defined]
    return wrapper


def main() -> None:
    """``fastrollout-trinity``: Trinity's command line, on fastrollout's coordinator."""
    install()
    from trinity.cli.launcher import main as trinity_main

    trinity_main()
