"""Both implementations of the SSE readers (``shardon._fast._sse_c`` / ``_sse_py``), for the tests.

``sse_impl("c")`` skips the test, saying why, when the compiled module is not built;
tests/_fast/test_fast_selector.py is where a missing build fails (unless SHARDON_NO_EXTENSIONS).
"""

from __future__ import annotations

from types import ModuleType

from twin_impls import twin


def sse_impl(name: str) -> ModuleType:
    return twin("sse", name)
