"""Shardon's native HTTP/1.1 engine: an RSGI host on uvloop + httptools, in this process.

`NativeServer` serves any RSGI application (``async def app(scope, proto)``) over HTTP/1.1 with
keep-alive, pipelining, chunked streaming and flow control, and hands whole requests to the
application's callback path first when it has one (``app.fast_path``). The per-connection objects
live in ``shardon._fast`` (``_wire_py.py`` says how they behave); why this engine exists next to
granian is in ``shardon/server.py``.
"""

from .._fast.wire import MAX_HEAD_BYTES, Headers, HTTPConnection, Request, ResponseStream, status_line
from ..errors import ProtocolClosed
from .server import NativeServer

__all__ = [
    "MAX_HEAD_BYTES",
    "HTTPConnection",
    "Headers",
    "NativeServer",
    "ProtocolClosed",
    "Request",
    "ResponseStream",
    "status_line",
]
