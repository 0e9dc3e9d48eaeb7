"""The wire objects (`_wire_c` compiled, or the `_wire_py` reference): see ``_wire_py.py``.

Selected like the rest of ``shardon._fast``: the compiled module unless ``SHARDON_NO_EXTENSIONS``
is set or it cannot be imported (then with one RuntimeWarning). ``WIRE_COMPILED`` tells which.
It is its own selector, not part of ``shardon._fast``'s, because it imports modules (the request log
among them) that themselves import ``shardon._fast``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from . import _NO_EXTENSIONS

__all__ = [
    "MAX_HEAD_BYTES",
    "WIRE_COMPILED",
    "FastPath",
    "FastRequest",
    "HTTPConnection",
    "Headers",
    "NodePool",
    "Request",
    "ResponseStream",
    "UpstreamConnection",
    "client_headers",
    "status_line",
]

WIRE_COMPILED: bool

if TYPE_CHECKING or _NO_EXTENSIONS:
    from ._wire_py import (
        MAX_HEAD_BYTES,
        FastPath,
        FastRequest,
        Headers,
        HTTPConnection,
        NodePool,
        Request,
        ResponseStream,
        UpstreamConnection,
        client_headers,
        status_line,
    )

    WIRE_COMPILED = False
else:
    try:
        from ._wire_c import (
            MAX_HEAD_BYTES,
            FastPath,
            FastRequest,
            Headers,
            HTTPConnection,
            NodePool,
            Request,
            ResponseStream,
            UpstreamConnection,
            client_headers,
            status_line,
        )

        WIRE_COMPILED = True
    except ImportError as exc:
        from ._wire_py import (
            MAX_HEAD_BYTES,
            FastPath,
            FastRequest,
            Headers,
            HTTPConnection,
            NodePool,
            Request,
            ResponseStream,
            UpstreamConnection,
            client_headers,
            status_line,
        )

        WIRE_COMPILED = False
        warnings.warn(
            f"shardon: compiled wire module unavailable ({exc}), using its pure-Python twin",
            RuntimeWarning,
            stacklevel=2,
        )
