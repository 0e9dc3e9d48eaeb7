"""The request log"s row queue (`_rowqueue_c` compiled, or the `_rowqueue_py` reference).

Selected like every twin pair (`shardon._fast.load_twin`: ``SHARDON_NO_EXTENSIONS``, one
RuntimeWarning if the compiled module cannot be imported); ``ROWQUEUE_COMPILED`` tells which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load_twin

__all__ = ["ROWQUEUE_COMPILED", "RowQueue"]

if TYPE_CHECKING:
    from ._rowqueue_py import RowQueue

    ROWQUEUE_COMPILED: bool
else:
    _impl, ROWQUEUE_COMPILED = load_twin("shardon._fast._rowqueue", "request-log row queue")
    RowQueue = _impl.RowQueue
