"""Keep-alive connections to the nodes: `_connection_c` compiled, or the `_connection_py` reference
(read its docstring). ``COMPILED`` tells which; ``SHARDON_NO_EXTENSIONS`` forces the twin."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._fast import load_twin

__all__ = ["COMPILED", "NodePool", "UpstreamConnection", "client_header_lines", "client_headers"]

if TYPE_CHECKING:
    from ._connection_py import (
        NodePool,
        UpstreamConnection,
        client_header_lines,
        client_headers,
    )

    COMPILED: bool
else:
    _impl, COMPILED = load_twin("shardon.upstream._connection", "upstream connection")
    NodePool = _impl.NodePool
    UpstreamConnection = _impl.UpstreamConnection
    client_header_lines = _impl.client_header_lines
    client_headers = _impl.client_headers
