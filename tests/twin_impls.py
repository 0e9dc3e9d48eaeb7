"""Either implementation of a twin pair (``<module>_c`` / ``<module>_py``), for the tests.

``twin(stem, "c")`` skips the test, saying why, when the compiled module is not built; the
"compiled ... loaded" tests are where a missing build fails (unless SHARDON_NO_EXTENSIONS).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def twin(stem: str, name: str) -> ModuleType:
    """``<module>_py`` for ``name == "py"``, else the compiled ``<module>_c``; ``stem`` is the module
    without its suffix (``shardon.httpd._connection``), or a ``shardon._fast`` primitive's (``sse``)."""
    module = stem if "." in stem else f"shardon._fast._{stem}"
    if name == "py":
        return importlib.import_module(f"{module}_py")
    try:
        return importlib.import_module(f"{module}_c")
    except ImportError as exc:
        pytest.skip(f"compiled {module}_c not built (pip install --no-deps -e .): {exc}")
