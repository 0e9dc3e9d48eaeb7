"""Access-log lines from packed request rows (`_accesslog_c` compiled, or the `_accesslog_py` reference).

Selected like the rest of ``shardon._fast`` (``SHARDON_NO_EXTENSIONS``, one RuntimeWarning if the
compiled module cannot be imported); ``ACCESSLOG_COMPILED`` tells which.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import _NO_EXTENSIONS

__all__ = ["ACCESSLOG_COMPILED", "AccessFormatter"]

ACCESSLOG_COMPILED: bool

if TYPE_CHECKING or _NO_EXTENSIONS:
    from ._accesslog_py import AccessFormatter

    ACCESSLOG_COMPILED = False
else:
    try:
        from ._accesslog_c import AccessFormatter

        ACCESSLOG_COMPILED = True
    except ImportError as exc:
        from ._accesslog_py import AccessFormatter

        ACCESSLOG_COMPILED = False
        warnings.warn(
            f"shardon: compiled access-log formatter unavailable ({exc}), using its pure-Python twin",
            RuntimeWarning,
            stacklevel=2,
        )
