"""Builds the private Cython core ``fastrollout._native.*`` from ``native/*.pyx``.

``FASTROLLOUT_DEBUG=1`` at install time gives a debug build (-O0 -g, line tracing,
bounds checks and the invariant checks guarded by the C macro ``FASTROLLOUT_DEBUG``);
the default is an optimized release build. Environment variables are used
because pip does not forward setup.py options.
"""
import hashlib
import os
import pathlib

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTROLLOUT_DEBUG", "") not in ("", "0")
HERE = pathlib.Path(__file__).parent

if DEBUG:
    cflags = ["-O0", "-g3", "-UNDEBUG"]
    macros = [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    directives = {"linetrace": True, "boundscheck": True, "wraparound": True,
                  "initializedcheck": True, "cdivision": False}
else:
    cflags = ["-O3"]
    macros = []
    directives = {"boundscheck": False, "wraparound": False,
                  "initializedcheck": False, "cdivision": True}
macros += [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
           ("FASTROLLOUT_DEBUG", "1" if DEBUG else "0")]
directives |= {"language_level": 3, "embedsignature": True}

# Generated C and compiled objects go to a build tree of their own for each set of build
# options: Cython regenerates C only when a source is newer than it and setuptools recompiles
# only when the C is newer than the .so, so in a shared tree a build would reuse the output
# of the other flavour (or of options since edited here).
fingerprint = hashlib.sha256(repr((cflags, macros, sorted(directives.items()))).encode())
BUILD = f"build/{'debug' if DEBUG else 'release'}-{fingerprint.hexdigest()[:8]}"

extensions = [
    Extension(
        f"fastrollout._native.{pyx.stem}",
        [str(pyx.relative_to(HERE))],
        include_dirs=[numpy.get_include(), "native"],
        extra_compile_args=cflags,
        define_macros=macros,
    )
    for pyx in sorted((HERE / "native").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["native", "src"],
        compiler_directives=directives,
        annotate=DEBUG,
        build_dir=f"{BUILD}/cython",
    ),
    options={"build": {"build_base": BUILD}},
)
