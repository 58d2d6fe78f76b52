"""The build: the Makefile's stamps and setup.py's build flavours."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
OLD = 1_000_000_000  # an mtime long before the stamps


def _make(tree, *args):
    return subprocess.run(["make", "-C", str(tree), *args], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def stamped(tmp_path):
    """A tree with the Makefile, its build inputs and up-to-date stamps (make -q answers 0)."""
    shutil.copy(ROOT / "Makefile", tmp_path)
    for name in ("pyproject.toml", "setup.py", "native/a.pyx", "src/fastrollout/_native/a.pxd"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (OLD, OLD))
    (tmp_path / ".venv").mkdir()
    # Stamps just after the inputs and well before now: a file touched by a test is newer
    # even within one tick of the kernel's coarse file clock.
    for stamp in (".venv", ".core"):
        (tmp_path / ".venv" / stamp).touch()
        os.utime(tmp_path / ".venv" / stamp, (OLD + 10, OLD + 10))
    assert _make(tmp_path, "-q", ".venv/.core").returncode == 0
    return tmp_path


@pytest.mark.parametrize("source", ["native/a.pyx", "src/fastrollout/_native/a.pxd",
                                    "native/b.pxd", "src/fastrollout/_native/b.pyx"])
def test_native_change_rebuilds_core(stamped, source):
    (stamped / source).touch()   # edited, or new
    assert _make(stamped, "-q", ".venv/.core").returncode == 1


def test_debug_build_is_replaced_by_the_next_release_build(stamped):
    # PIP=: makes the install a no-op; what matters is what the stamps say afterwards.
    done = _make(stamped, "debug", "PIP=:")
    assert done.returncode == 0, done.stderr
    assert "FASTROLLOUT_DEBUG=1" in done.stdout
    assert _make(stamped, "-q", ".venv/.core").returncode == 1
    assert "FASTROLLOUT_DEBUG" not in _make(stamped, "-n", ".venv/.core").stdout


@pytest.mark.slow
def test_release_build_never_compiles_debug_c(tmp_path):
    """Cython regenerates C only when a source is newer than it, so a release build after a
    debug one must not find the debug build's C (line tracing, bounds checks) in its way."""
    shutil.copytree(ROOT / "native", tmp_path / "native",
                    ignore=shutil.ignore_patterns("*.c", "*.html"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path)
    shutil.copytree(ROOT / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
    for debug in ("1", "0"):   # setup.py cythonizes when loaded; --name builds nothing else
        run = subprocess.run([sys.executable, "setup.py", "-q", "--name"], cwd=tmp_path,
                             env={**os.environ, "FASTROLLOUT_DEBUG": debug},
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
    newest = {}
    for c in tmp_path.rglob("*.c"):
        if c.name not in newest or c.stat().st_mtime > newest[c.name].stat().st_mtime:
            newest[c.name] = c
    assert newest
    for c in newest.values():   # what a release build would compile now
        assert "__Pyx_TraceLine(" not in c.read_text(), c
