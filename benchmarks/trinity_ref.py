"""Loads Trinity-RFT 0.6.0's own modules, the reference that tests and benchmarks compare
against."""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import sysconfig


def trinity_module(relpath: str):
    """Load one file of the installed Trinity-RFT 0.6.0 wheel by path, without running
    ``trinity/__init__.py`` (which pulls in Ray and the rest of its stack)."""
    for base in (sysconfig.get_paths()["purelib"], *sys.path):
        path = pathlib.Path(base) / "trinity" / relpath
        if path.is_file():
            name = "_trinity_ref_" + relpath.replace("/", "_").removesuffix(".py")
            if name in sys.modules:
                return sys.modules[name]
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            return module
    raise RuntimeError(f"trinity-rft 0.6.0 is not installed (looked for trinity/{relpath}); "
                       "`make test` installs it with --no-deps")
