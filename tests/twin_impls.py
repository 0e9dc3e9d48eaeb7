"""Either implementation of a ``shardon._fast`` module pair (``_<stem>_c`` / ``_<stem>_py``), for the tests.

``twin(stem, "c")`` skips the test, saying why, when the compiled module is not built; the
"compiled ... loaded" tests are where a missing build fails (unless SHARDON_NO_EXTENSIONS).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def twin(stem: str, name: str) -> ModuleType:
    """``shardon._fast._<stem>_py`` for ``name == "py"``, else the compiled ``_<stem>_c``."""
    if name == "py":
        return importlib.import_module(f"shardon._fast._{stem}_py")
    try:
        return importlib.import_module(f"shardon._fast._{stem}_c")
    except ImportError as exc:
        pytest.skip(f"compiled shardon._fast._{stem}_c not built: {exc}")
