"""Both implementations of the SSE readers (``shardon._fast._sse_c`` / ``_sse_py``), for the tests.

``sse_impl("c")`` skips the test, saying why, when the compiled module is not built;
tests/_fast/test_fast_selector.py is where a missing build fails (unless SHARDON_NO_EXTENSIONS).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def sse_impl(name: str) -> ModuleType:
    if name == "py":
        return importlib.import_module("shardon._fast._sse_py")
    try:
        return importlib.import_module("shardon._fast._sse_c")
    except ImportError as exc:
        pytest.skip(f"compiled SSE readers (shardon._fast._sse_c) not built: {exc}")
