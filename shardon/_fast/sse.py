"""The SSE readers (`_sse_c` compiled, or the `_sse_py` reference): see ``_sse_py.py``.

Selected like every twin pair (`shardon._fast.load_twin`: ``SHARDON_NO_EXTENSIONS``, one
RuntimeWarning if the compiled module cannot be imported); ``SSE_COMPILED`` tells which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load_twin

__all__ = ["SSE_COMPILED", "OutputHasher", "UsageStripper", "hash_response"]

if TYPE_CHECKING:
    from ._sse_py import OutputHasher, UsageStripper, hash_response

    SSE_COMPILED: bool
else:
    _impl, SSE_COMPILED = load_twin("shardon._fast._sse", "SSE readers")
    OutputHasher = _impl.OutputHasher
    UsageStripper = _impl.UsageStripper
    hash_response = _impl.hash_response
