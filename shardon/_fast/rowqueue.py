"""The request log's row queue (`_rowqueue_c` compiled, or the `_rowqueue_py` reference).

Selected like the rest of ``shardon._fast`` (``SHARDON_NO_EXTENSIONS``, one RuntimeWarning if the
compiled module cannot be imported); ``ROWQUEUE_COMPILED`` tells which.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import _NO_EXTENSIONS

__all__ = ["ROWQUEUE_COMPILED", "RowQueue"]

ROWQUEUE_COMPILED: bool

if TYPE_CHECKING or _NO_EXTENSIONS:
    from ._rowqueue_py import RowQueue

    ROWQUEUE_COMPILED = False
else:
    try:
        from ._rowqueue_c import RowQueue

        ROWQUEUE_COMPILED = True
    except ImportError as exc:
        from ._rowqueue_py import RowQueue

        ROWQUEUE_COMPILED = False
        warnings.warn(
            f"shardon: compiled request-log row queue unavailable ({exc}), using its pure-Python twin",
            RuntimeWarning,
            stacklevel=2,
        )
