"""Build the Cython speed-ups in ``shardon._fast``.

Knobs (environment variables), in the spirit of asyncpg's and uvloop's setup.py:

- ``SHARDON_NO_EXTENSIONS=1``: build nothing; the package runs on its pure-Python twins.
- ``SHARDON_CYTHON_DEBUG=1``: keep bounds/wrap-around checks and line tracing on (slower, for debugging).

A machine without a C compiler still installs: the build failure is reported as a warning and the
pure-Python twins are used at run time.
"""

from __future__ import annotations

import os
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FAST_MODULES = [
    "_queue_c",
    "_bucket_c",
    "_balancer_c",
    "_rowwriter_c",
    "_wire_c",
    "_sse_c",
    "_tally_c",
    "_rowqueue_c",
    "_accesslog_c",
]


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class OptionalBuildExt(build_ext):
    """Build the extensions if possible; never fail the install because of them."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers, ...
            warnings.warn(f"shardon: C extensions not built ({exc}); using pure-Python twins", stacklevel=1)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            warnings.warn(f"shardon: {ext.name} not built ({exc}); using its pure-Python twin", stacklevel=1)


def _extensions() -> list[Extension]:
    if _truthy("SHARDON_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("shardon: Cython missing, building no extensions", file=sys.stderr)
        return []
    debug = _truthy("SHARDON_CYTHON_DEBUG")
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": True,
        "initializedcheck": debug,
        "linetrace": debug,
    }
    exts = [
        Extension(f"shardon._fast.{name}", [f"shardon/_fast/{name}.pyx"], extra_compile_args=["-O3"])
        for name in FAST_MODULES
        if os.path.exists(f"shardon/_fast/{name}.pyx")
    ]
    return cythonize(exts, compiler_directives=directives, quiet=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
