"""The native engine's client connection: `_connection_c` compiled, or the `_connection_py`
reference (read its docstring). ``COMPILED`` tells which; ``SHARDON_NO_EXTENSIONS`` forces the twin."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._fast import load_twin

__all__ = ["COMPILED", "MAX_HEAD_BYTES", "HTTPConnection", "Headers", "Request", "ResponseStream", "status_line"]

if TYPE_CHECKING:
    from ._connection_py import MAX_HEAD_BYTES, Headers, HTTPConnection, Request, ResponseStream, status_line

    COMPILED: bool
else:
    _impl, COMPILED = load_twin("shardon.httpd._connection", "client connection")
    MAX_HEAD_BYTES = _impl.MAX_HEAD_BYTES
    Headers = _impl.Headers
    HTTPConnection = _impl.HTTPConnection
    Request = _impl.Request
    ResponseStream = _impl.ResponseStream
    status_line = _impl.status_line
