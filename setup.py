"""Build Shardon's compiled modules: the ``_x_c`` twin of each ``_x_py`` reference.

- ``.pyx`` twins, written in Cython: the ``shardon._fast`` primitives;
- twins compiled from their Python reference itself, typed by a ``.pxd`` beside it: the request
  path (``shardon/_exchange_py.py`` + ``_exchange_c.pxd`` → ``shardon._exchange_c``; the scheduler,
  the node registry, the client and upstream connections).
  The source is copied under ``build/`` with the compiled module's name, which is all Cython needs.

Knobs (environment variables), in the spirit of asyncpg's and uvloop's setup.py:

- ``SHARDON_NO_EXTENSIONS=1``: build nothing; the package runs on its pure-Python twins.
- ``SHARDON_CYTHON_DEBUG=1``: keep bounds/wrap-around checks and line tracing on (slower, for debugging).

A machine without a C compiler still installs: the build failure is reported as a warning and the
pure-Python twins are used at run time.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PYX_MODULES = [
    *(f"shardon._fast.{name}" for name in ("_queue_c", "_bucket_c", "_balancer_c", "_rowwriter_c")),
    *(f"shardon._fast.{name}" for name in ("_sse_c", "_tally_c", "_rowqueue_c", "_accesslog_c", "_ids_c")),
]
# Compiled from the Python reference: module → its source.
PY_MODULES = {
    "shardon.httpd._connection_c": "shardon/httpd/_connection_py.py",
    "shardon.upstream._connection_c": "shardon/upstream/_connection_py.py",
    "shardon._exchange_c": "shardon/_exchange_py.py",
    "shardon._scheduler_c": "shardon/_scheduler_py.py",
    "shardon._nodes_c": "shardon/_nodes_py.py",
}


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
        Extension(name, [name.replace(".", "/") + ".pyx"], extra_compile_args=["-O3"])
        for name in PYX_MODULES
        if os.path.exists(name.replace(".", "/") + ".pyx")
    ]
    twins = [Extension(name, [_staged(name, source)], extra_compile_args=["-O3"]) for name, source in PY_MODULES.items()]
    return [
        *cythonize(exts, compiler_directives=directives, quiet=True),
        # The .pxd alone types these: annotations are for mypy and readers, not for Cython.
        *cythonize(twins, compiler_directives={**directives, "annotation_typing": False}, include_path=["."], quiet=True),
    ]


def _staged(name: str, source: str) -> str:
    """``source`` copied to ``build/twins/<package path>/<compiled name>.py``, with its ``.pxd`` (and
    the packages' ``__init__.py`` files, so Cython sees the module's full name)."""
    parts = name.split(".")
    folder = os.path.join("build", "twins", *parts[:-1])
    os.makedirs(folder, exist_ok=True)
    for depth in range(1, len(parts)):
        init = os.path.join("build", "twins", *parts[:depth], "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
    staged = os.path.join(folder, parts[-1] + ".py")
    shutil.copyfile(source, staged)
    shutil.copyfile(os.path.join(*parts[:-1], parts[-1] + ".pxd"), os.path.join(folder, parts[-1] + ".pxd"))
    return staged


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
