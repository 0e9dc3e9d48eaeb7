"""The SSE readers (`_sse_c` compiled, or the `_sse_py` reference): see ``_sse_py.py``.

Selected like the rest of ``shardon._fast`` (``SHARDON_NO_EXTENSIONS``, one RuntimeWarning if the
compiled module cannot be imported); ``SSE_COMPILED`` tells which.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import _NO_EXTENSIONS

__all__ = ["SSE_COMPILED", "OutputHasher", "UsageStripper", "hash_response"]

SSE_COMPILED: bool

if TYPE_CHECKING or _NO_EXTENSIONS:
    from ._sse_py import OutputHasher, UsageStripper, hash_response

    SSE_COMPILED = False
else:
    try:
        from ._sse_c import OutputHasher, UsageStripper, hash_response

        SSE_COMPILED = True
    except ImportError as exc:
        from ._sse_py import OutputHasher, UsageStripper, hash_response

        SSE_COMPILED = False
        warnings.warn(
            f"shardon: compiled SSE readers unavailable ({exc}), using their pure-Python twins",
            RuntimeWarning,
            stacklevel=2,
        )
