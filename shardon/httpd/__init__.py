"""Shardon's native HTTP/1.1 engine: an RSGI host on uvloop + httptools, in this process.

`NativeServer` (``server.py``) serves any RSGI application over HTTP/1.1 with keep-alive,
pipelining, chunked streaming and flow control, and offers each whole request to the application's
``on_request`` first. The per-connection objects are in ``connection.py``; why this engine exists
next to granian is in ``shardon/server.py``.
"""

from .server import NativeServer

__all__ = ["NativeServer"]
