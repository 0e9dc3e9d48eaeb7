"""Access-log lines from packed request rows (`_accesslog_c` compiled, or the `_accesslog_py` reference).

Selected like every twin pair (`shardon._fast.load_twin`: ``SHARDON_NO_EXTENSIONS``, one
RuntimeWarning if the compiled module cannot be imported); ``ACCESSLOG_COMPILED`` tells which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import load_twin

__all__ = ["ACCESSLOG_COMPILED", "AccessFormatter"]

if TYPE_CHECKING:
    from ._accesslog_py import AccessFormatter

    ACCESSLOG_COMPILED: bool
else:
    _impl, ACCESSLOG_COMPILED = load_twin("shardon._fast._accesslog", "access-log formatter")
    AccessFormatter = _impl.AccessFormatter
