"""The wire: every object that touches a request's bytes on the hot path (pure-Python reference).

``_wire_c.pyx`` is the same code in Cython (``shardon._fast.wire`` picks one); this module is the
reference the tests hold both to.

Client side (the native engine, `shardon.httpd`), modelled on uvicorn's ``httptools_impl.py``:

- `HTTPConnection` is the asyncio protocol of one client connection. Bytes are fed to httptools as
  they arrive. When a request's head is complete a `Request` is made; when its body is in too
  (usually within the same read) it goes to the application's callback path, `FastPath`, and if
  that declines, to the RSGI application as a task. A request whose body is still coming at the end
  of a read goes to the RSGI application at once (it reads the body as it arrives).
- A request that arrives while another is being answered (pipelining) waits in ``pipeline`` and
  reading pauses: a connection holds at most one running request plus what was already read.
- A response is complete when ``response_bytes`` is called, or, for a stream, when the application
  returns (the terminating chunk is written then). The connection then serves the next pipelined
  request, goes idle (keep-alive), or closes (``Connection: close``, HTTP/1.0, an unread body, a
  draining server).
- Flow control out: uvloop calls ``pause_writing`` above its write high-water mark; stream writers
  wait until ``resume_writing``.
- The client leaving (``connection_lost``) is told to every request of the connection at once:
  ``client_disconnect()`` completes, stream writes raise `ProtocolClosed`, the callback path's
  ``on_lost`` hook runs.
- Malformed HTTP gets a 400 (a head over ``MAX_HEAD_BYTES`` a 431, a head slower than the server's
  ``header_timeout_s`` a 408) in OpenAI's error shape and the connection closes; these never reach
  the application, as they are not API requests.

`Request` is both the RSGI scope and the RSGI HTTP protocol of a request (``app(request, request)``):
``await proto()`` is the body; ``response_bytes/str/empty`` send a whole response;
``response_stream`` returns a `ResponseStream` whose ``await send_bytes(data)`` writes one chunk;
``await client_disconnect()`` completes when the client has gone. `Headers` is a dict of lower-cased
names (RSGI's ``scope.headers``).

Node side: `NodePool` keeps idle keep-alive connections per node (LIFO: the warmest is reused).
`UpstreamConnection` is the asyncio protocol of one: a request is `send`; the response's bytes are
parsed by httptools as they arrive; the caller either awaits `wait()` (a future, resolved once per
read, raising the connection's `UpstreamError`) or sets a ``listener`` whose ``upstream_event()``
is called instead (the callback path). When the caller falls behind, reading pauses above
``_HIGH_WATER`` buffered bytes and resumes on `take`, so a slow client cannot make Shardon buffer a
whole generation. ``headers`` keeps the response's end-to-end headers only.

The callback path (`FastPath`, `FastRequest`) is described in ``shardon/fastpath.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools
import msgspec

from shardon import errors
from shardon._fast._sse_py import OutputHasher, UsageStripper, hash_response
from shardon.errors import PayloadTooLarge, ProtocolClosed, error_body
from shardon.schemas import PRIORITY_BY_NAME, PRIORITY_NAMES, routing_decoder, with_fields
from shardon.store import RequestRecord, format_request_id
from shardon.upstream.base import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout

__all__ = [
    "MAX_HEAD_BYTES",
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

log = logging.getLogger("shardon.httpd")
fast_log = logging.getLogger("shardon.fastpath")

MAX_HEAD_BYTES = 64 * 1024
_LARGE_WRITE = 16 * 1024  # above this, write head and body separately rather than copy them together
# Hop-by-hop and framing headers of a node's response: the connection's business, not the client's.
_FRAMING = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})
_HIGH_WATER = 256 * 1024
# A non-streamed answer not whole by this size is relayed by the general path, as it arrives.
_WHOLE_LIMIT = 256 * 1024

_STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus}
_METHODS = {m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")}
_JSON = [("content-type", "application/json")]


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def _encode_headers(headers: list[tuple[str, str]]) -> bytes:
    text = "".join([f"{name}: {value}\r\n" for name, value in headers])
    if text.count("\n") != len(headers):  # a CR/LF inside a name or value would split the head
        raise ValueError("response header names and values must not contain line breaks")
    return text.encode("latin-1")


# == client side ====================================================================================


class Headers(dict[str, str]):
    """Request headers: lower-cased names → values (repeated headers keep the last; ``get_all``)."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        super().__init__({name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw})
        self.raw = raw

    def get_all(self, key: str) -> list[str]:
        key_bytes = key.encode("latin-1")
        return [value.decode("latin-1") for name, value in self.raw if name.lower() == key_bytes]


class Request:
    """One request: its scope, its body as it arrives, the response sent for it (RSGI's scope and
    HTTP protocol in one object)."""

    __slots__ = (
        "_body_waiter",
        "_disconnect",
        "body",
        "body_done",
        "body_size",
        "chunked",
        "client",
        "conn",
        "disconnected",
        "headers",
        "http_version",
        "keep_alive",
        "method",
        "on_lost",
        "path",
        "query_string",
        "response_done",
        "response_started",
        "server",
        "status",
        "stream",
        "too_large",
    )

    proto = "http"
    rsgi_version = "1.5"
    scheme = "http"

    def __init__(
        self,
        conn: HTTPConnection,
        method: str,
        path: str,
        query_string: str,
        http_version: str,
        headers: Headers,
        keep_alive: bool,
    ) -> None:
        self.conn = conn
        self.method = method
        self.path = path
        self.query_string = query_string
        self.http_version = http_version
        self.headers = headers
        self.client = conn.client
        self.server = conn.server_addr
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_done = False
        self.too_large = False
        self._body_waiter: asyncio.Future[None] | None = None
        self._disconnect: asyncio.Future[None] | None = None
        self.disconnected = False
        self.response_started = False
        self.response_done = False
        self.status = 0
        self.stream: ResponseStream | None = None
        self.chunked = True  # a streamed response is chunked (not for HTTP/1.0 clients)
        self.on_lost: Callable[[], object] | None = None  # the callback path's disconnect hook

    @property
    def authority(self) -> str | None:
        return self.headers.get("host")

    # -- told by the connection -----------------------------------------------------------------
    def wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def lost(self) -> None:
        """The client's connection is gone."""
        self.disconnected = True
        self.keep_alive = False
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost()
        waiter = self._disconnect
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.wake_body()
        if self.stream is not None:
            self.stream.wake()

    # -- RSGI HTTPProtocol ----------------------------------------------------------------------
    async def __call__(self) -> bytes:
        if not self.body_done:
            await self._wait_body()
        if self.too_large:
            raise PayloadTooLarge(f"request body exceeds {self.conn.server.max_body} bytes")
        body = self.body
        return body[0] if len(body) == 1 else b"".join(body)

    async def _wait_body(self) -> None:
        continue_sent = False
        while not self.body_done and not self.too_large:
            if self.disconnected:
                raise ProtocolClosed("client disconnected while sending the body")
            if not continue_sent and (self.headers.get("expect") or "").lower() == "100-continue":
                continue_sent = True
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            waiter = self._body_waiter = self.conn.loop.create_future()
            await waiter

    def client_disconnect(self) -> asyncio.Future[None]:
        waiter = self._disconnect
        if waiter is None:
            waiter = self._disconnect = self.conn.loop.create_future()
            if self.disconnected:
                waiter.set_result(None)
        return waiter

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if self.response_started:
            raise RuntimeError("response already started")
        self.conn.send_response(self, status, headers, body)

    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None:
        self.response_bytes(status, headers, body.encode())

    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.response_bytes(status, headers, b"")

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> ResponseStream:
        if self.response_started:
            raise RuntimeError("response already started")
        self.conn.start_stream(self, status, headers)
        stream = self.stream = ResponseStream(self)
        return stream


class ResponseStream:
    """A streamed (chunked) response: each ``send_bytes`` is one HTTP chunk, written at once."""

    __slots__ = ("_drain", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self._drain: asyncio.Future[None] | None = None

    async def send_bytes(self, data: bytes) -> None:
        request = self.request
        if request.disconnected:
            raise ProtocolClosed("client disconnected")
        if not data or request.method == "HEAD":
            return
        conn = request.conn
        conn.write_chunk(request, data)
        while conn.write_paused and not request.disconnected:
            # The client reads slower than the node writes: wait until its socket drains.
            drain = self._drain = conn.loop.create_future()
            conn.drain_waiters.append(drain)
            await drain
        if request.disconnected:
            raise ProtocolClosed("client disconnected")

    async def send_str(self, data: str) -> None:
        await self.send_bytes(data.encode())

    def wake(self) -> None:
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)


class HTTPConnection(asyncio.Protocol):
    """One client connection of the native engine (``server``: its `NativeServer`)."""

    __slots__ = (
        "_headers",
        "_url",
        "app",
        "client",
        "closed",
        "current",
        "drain_hook",
        "drain_waiters",
        "final",
        "head_bytes",
        "head_raw",
        "head_started",
        "idle_since",
        "loop",
        "parser",
        "parsing",
        "pending",
        "pending_since",
        "pipeline",
        "reading_paused",
        "server",
        "server_addr",
        "transport",
        "write_paused",
    )

    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = server.loop
        self.app = server.app
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.server_addr = ""
        self.current: Request | None = None  # the request being answered
        self.parsing: Request | None = None  # the request whose body is being read
        self.pending: Request | None = None  # current, not started yet: its body is still coming
        self.pending_since = 0.0  # loop time it was left pending at the end of a read
        self.pipeline: deque[Request] = deque()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_started = 0.0  # loop time the current request's head began; 0 between heads
        self.idle_since = 0.0
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiters: list[asyncio.Future[None]] = []
        # Called once when the client's socket drains (the callback path's flow control).
        self.drain_hook: Callable[[], object] | None = None
        self.final = False  # the last request parsed ends the connection: read nothing more
        self.head_raw = 0  # bytes received since the last head was complete
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = f"{peer[0]}:{peer[1]}"
        self.server_addr = getattr(self.server, "address", "")
        self.idle_since = self.loop.time()
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.final:
            return  # after a request that ends the connection (Connection: close, an upgrade)
        if self.parsing is None:
            self.head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No protocol switch is offered: the request is answered, then the connection closes.
            self._end_reading()
        except httptools.HttpParserError as exc:
            if not self.final:  # (bytes after a Connection: close request are ignored)
                self.pending = None
                if self.head_bytes > MAX_HEAD_BYTES:
                    self.reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
                else:
                    self.reject(400, f"malformed HTTP request: {exc}")
                return
        pending = self.pending
        if pending is not None:
            if pending.body_done:
                self.pending = None
                self._dispatch(pending)
            elif self.pending_since == 0.0:
                # Its body is still coming (many clients write the head and the body apart). It
                # stays pending, for the callback path to take when the body is in, unless the
                # client waits to be told to send it (100-continue) or it is already too large:
                # then the application runs now and reads (or refuses) the body as it arrives.
                # A body that stalls is handed to the application by the server's sweep
                # (start_stalled) within a second or two.
                if pending.too_large or (pending.headers.get("expect") or "").lower() == "100-continue":
                    self.pending = None
                    self._start_app(pending)
                else:
                    self.pending_since = self.loop.time()
        if self.head_started and self.head_raw > MAX_HEAD_BYTES and not self.closed:
            # A head still incomplete past the limit (httptools buffers a header line until it ends).
            self.reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")

    def _end_reading(self) -> None:
        """No request after the last one parsed: it is answered, then the connection closes."""
        self.final = True
        request = self.parsing
        if request is not None:
            self.parsing = None
            request.body_done = True
            request.wake_body()
        last = self.pipeline[-1] if self.pipeline else self.current
        if last is not None:
            last.keep_alive = False

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost tells the requests

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        pending = self.pending
        if pending is not None:
            # Gone before its body was in: the application still runs (and logs a 499).
            self.pending = None
            self._start_app(pending)
        for request in (self.current, self.parsing, *self.pipeline):
            if request is not None:
                request.lost()
        self.pipeline.clear()
        self._wake_drain()
        # The parser holds this object's callbacks: a cycle that only the collector's rare full
        # passes would free, with the transport and buffers it holds (megabytes under churn).
        self.parser = None  # type: ignore[assignment]  # nothing reads it after connection_lost

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiters = self.drain_waiters
        if waiters:
            self.drain_waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        hook = self.drain_hook
        if hook is not None:
            self.drain_hook = None
            hook()

    # -- httptools callbacks ----------------------------------------------------------------
    # (No on_message_begin: httptools skips the callbacks a protocol does not define, and the
    # head's state is reset when the head is complete.)
    def on_url(self, url: bytes) -> None:
        if not self.head_started:
            self.head_started = self.loop.time()
        self._url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("request head too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        path, _, query = self._url.partition(b"?")
        path_str = path.decode("latin-1")
        if "%" in path_str:
            path_str = unquote(path_str, encoding="latin-1")
        request = Request(
            self,
            method,
            path_str,
            query.decode("latin-1") if query else "",
            parser.get_http_version(),
            Headers(self._headers),
            parser.should_keep_alive() and not self.server.draining,
        )
        self._url = b""
        self._headers = []
        self.head_bytes = 0
        self.head_raw = 0
        self.head_started = 0.0
        self.parsing = request
        if self.current is None:
            # Started when its body is in (usually later in this read), or at the end of the read.
            self.current = self.pending = request
        else:
            self.pipeline.append(request)
            if not self.reading_paused and self.transport is not None:
                self.reading_paused = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.too_large:
            return
        size = request.body_size = request.body_size + len(body)
        if size > self.server.max_body:
            # Stop buffering: the application answers 413 and the connection closes after it.
            request.too_large = True
            request.keep_alive = False
            request.body = []
            request.wake_body()
            return
        request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.parsing
        if request is not None:
            self.parsing = None
            request.body_done = True
            if not request.keep_alive:
                self.final = True  # whatever follows this request on the connection is not read
            if request._body_waiter is not None:
                request.wake_body()
            if request is self.pending:
                self.pending = None
                self.pending_since = 0.0
                self._dispatch(request)

    # -- running the application ------------------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        """A whole request: the callback path if it takes it, else the RSGI application."""
        fast = self.server.fast_path
        if fast is None or not fast(request):
            self._start_app(request)

    def _start_app(self, request: Request) -> None:
        self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        """Run the application for ``request``, then finish its response if the app did not."""
        try:
            await self.app(request, request)
        except Exception:
            log.exception("application error on %s %s", request.method, request.path)
            if request.response_started and not request.response_done:
                # A stream cut by an error: close without the terminating chunk, so the client
                # sees the body was cut short rather than a complete one.
                request.response_done = True
                if self.current is request:
                    self.current = None
                self.close()
                return
        if not request.response_started:
            if not request.disconnected:
                body = error_body("the application sent no response", "server_error", "internal_error")
                request.response_bytes(500, _JSON, body)
            else:
                self._response_complete(request)
        elif not request.response_done:
            self.end_stream(request)  # a stream: it ends when the application returns

    # -- writing ----------------------------------------------------------------------------
    def _head(self, request: Request, status: int, headers: list[tuple[str, str]], framing: bytes) -> bytes:
        return self._head_encoded(request, status, _encode_headers(headers), framing)

    def _head_encoded(self, request: Request, status: int, encoded: bytes, framing: bytes) -> bytes:
        server = self.server
        if server.draining or not request.body_done:
            # (A body not read to its end leaves the connection out of step: it closes.)
            request.keep_alive = False
        if not request.keep_alive:
            end = b"connection: close\r\n\r\n"
        elif request.http_version == "1.0":
            end = b"connection: keep-alive\r\n\r\n"
        else:
            end = b"\r\n"
        return b"".join((status_line(status), encoded, framing, server.date_header, end))

    def send_response(self, request: Request, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Write a whole response (the head is built first: a bad header raises, nothing is sent)."""
        self.send_encoded(request, status, _encode_headers(headers), body)

    def send_encoded(self, request: Request, status: int, encoded_headers: bytes, body: bytes) -> None:
        """`send_response` with the header lines already encoded (``name: value\\r\\n`` each)."""
        head = None
        if not request.disconnected and not self.closed:
            head = self._head_encoded(request, status, encoded_headers, b"content-length: %d\r\n" % len(body))
        request.response_started = request.response_done = True
        request.status = status
        if head is not None:
            transport = self.transport
            assert transport is not None
            if not body or request.method == "HEAD":
                transport.write(head)
            elif len(body) > _LARGE_WRITE:
                transport.writelines((head, body))
            else:
                transport.write(head + body)
        self._response_complete(request)

    def start_stream(self, request: Request, status: int, headers: list[tuple[str, str]], first: bytes = b"") -> None:
        """Write a streamed response's head, and ``first`` as its first chunk in the same write
        (the head is built first: a bad header raises, nothing is sent)."""
        head = None
        if not request.disconnected and not self.closed:
            if request.http_version == "1.0":
                # No chunked encoding in HTTP/1.0: the body ends when the connection does.
                request.keep_alive = False
                request.chunked = False
                framing = b""
            else:
                framing = b"transfer-encoding: chunked\r\n"
            head = self._head(request, status, headers, framing)
        request.response_started = True
        request.status = status
        if head is not None:
            if first and request.method != "HEAD":
                head += b"%x\r\n%b\r\n" % (len(first), first) if request.chunked else first
            self.transport.write(head)  # type: ignore[union-attr]

    def end_stream(self, request: Request, last: bytes = b"") -> None:
        """The streamed response is over: ``last`` and the terminating chunk (one write), then the
        next request."""
        request.response_done = True
        if not request.disconnected and not self.closed and request.method != "HEAD":
            transport = self.transport
            assert transport is not None
            if request.chunked:
                transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n")
            elif last:
                transport.write(last)
        self._response_complete(request)

    def write_chunk(self, request: Request, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None:
            return
        if not request.chunked:
            transport.write(data)
        elif len(data) > _LARGE_WRITE:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def _response_complete(self, request: Request) -> None:
        if self.current is not request:
            return
        self.current = None
        transport = self.transport
        if transport is None or self.closed:
            return
        if not request.keep_alive or self.server.draining:
            self.closed = True
            transport.close()  # flushes what was written, then closes
            return
        if self.pipeline:
            request = self.current = self.pipeline.popleft()
            if request.body_done:
                self._dispatch(request)
            else:
                self._start_app(request)
            if self.pipeline:
                return
        else:
            self.idle_since = self.loop.time()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def reject(self, status: int, message: str) -> None:
        """A protocol-level error: answer in OpenAI's shape and close the connection."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.current is None or not self.current.response_started:
            body = error_body(message, "invalid_request_error", "invalid_request")
            transport.write(
                b"".join(
                    (
                        status_line(status),
                        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                        self.server.date_header,
                        b"connection: close\r\n\r\n",
                        body,
                    )
                )
            )
        self.closed = True
        transport.close()

    # -- housekeeping (the server's once-a-second sweep) ------------------------------------
    def start_stalled(self, limit: float) -> None:
        """A request whose body has been coming since before ``limit`` goes to the application."""
        pending = self.pending
        if pending is not None and self.pending_since and self.pending_since < limit:
            self.pending = None
            self.pending_since = 0.0
            self._start_app(pending)

    def is_idle(self) -> bool:
        return self.current is None and self.parsing is None and not self.pipeline and not self.head_started

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


# == node side ======================================================================================


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a node, one request at a time (see the module docstring)."""

    __slots__ = (
        "_held",
        "_keep_alive",
        "_loop",
        "_paused",
        "_waiter",
        "buffered",
        "chunks",
        "closed",
        "complete",
        "error",
        "got_bytes",
        "headers",
        "headers_done",
        "in_use",
        "listener",
        "parser",
        "pool",
        "reused",
        "status",
        "transport",
        "wait_started",
    )

    def __init__(self, pool: NodePool) -> None:
        self.pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.in_use = False
        self.reused = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._held = False
        self.listener: Any = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.complete = False
        self._keep_alive = False
        self.error: UpstreamError | None = None
        self.got_bytes = False
        self.wait_started = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.in_use:
            # Bytes nobody asked for: the connection is out of sync; never reuse it.
            self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"bad response from node: {exc}", before_first_byte=False))
            self.close()
            return
        listener = self.listener
        if listener is not None:
            listener.upstream_event()
            return
        # One wake-up per read, however many parser events it produced.
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.wait_started = 0.0
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_use and not self.complete:
            self._fail(
                UpstreamError(
                    "node closed the connection" + (f": {exc}" if exc else ""),
                    before_first_byte=not self.got_bytes,
                    reused=self.reused and not self.got_bytes,
                )
            )
        self.pool._forget(self)
        self.parser = None  # type: ignore[assignment]  # a cycle through its callbacks (see HTTPConnection)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in _FRAMING:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        self._keep_alive = self.parser.should_keep_alive()

    # -- caller side ------------------------------------------------------------------------
    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        listener = self.listener
        if listener is not None:
            listener.upstream_event()
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.wait_started = 0.0
            if not waiter.done():
                waiter.set_exception(error)

    def wait(self) -> asyncio.Future[None]:
        """A future resolved when more of the response has arrived (raising if the request failed)."""
        waiter = self._loop.create_future()
        if self.error is not None:
            waiter.set_exception(self.error)
            return waiter
        self._waiter = waiter
        self.wait_started = time.monotonic()
        return waiter

    def send(self, head: bytes, body: bytes = b"") -> None:
        """Write one request; the body is written as given, not copied into the head."""
        self._reset()
        self.in_use = True
        transport = self.transport
        assert transport is not None
        if len(body) > _LARGE_WRITE:
            transport.writelines((head, body))  # large bodies are not copied
        else:
            transport.write(head + body)  # one small copy beats a vectored write

    def take(self) -> bytes:
        """The body bytes that arrived since the last call (``b""`` if none)."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            if not self._held:
                self.transport.resume_reading()
        return data

    def hold(self, held: bool) -> None:
        """Stop (True) or restart (False) reading from the node: the caller's own flow control."""
        if held == self._held or self.transport is None or self.closed:
            return
        self._held = held
        if held:
            self.transport.pause_reading()
        elif not self._paused:
            self.transport.resume_reading()

    async def response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self.headers_done:
            await self.wait()
        return self.status, self.headers

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; ``b""`` once the response is complete."""
        while not self.chunks:
            if self.complete:
                return b""
            await self.wait()
        return self.take()

    def timed_out(self, now: float, limit: float) -> bool:
        if self.wait_started and now - self.wait_started > limit:
            self._fail(UpstreamTimeout(f"node sent nothing for {limit:g}s", before_first_byte=not self.got_bytes))
            return True
        return False

    def finish(self) -> None:
        """Give the connection back: pooled if the response completed cleanly, else closed."""
        self.in_use = False
        if self._held:
            self.hold(False)  # an idle connection must see the node close it
        if self.complete and self._keep_alive and not self.closed and self.error is None:
            self.reused = True
            self.pool._put_idle(self)
        else:
            self.close()
        self.error = None  # break the error → traceback → frame → connection cycle

    def close(self) -> None:
        if self.in_use and not self.complete:
            # Wake a reader still waiting on this response: it must not hang on a dead connection.
            self._fail(UpstreamError("connection closed by shardon", before_first_byte=not self.got_bytes))
        self.in_use = False
        if self.transport is not None and not self.closed:
            self.closed = True
            # abort(), not close(): no point flushing a request the node should stop working on.
            self.transport.abort()
        self.pool._forget(self)


_header_cache: dict[tuple[tuple[bytes, bytes], ...], list[tuple[str, str]]] = {}


def client_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """A node's end-to-end response headers (``UpstreamConnection.headers``) as the client gets
    them: a new list, built from a cache, as a node sends the same headers every time."""
    key = tuple(upstream)
    cached = _header_cache.get(key)
    if cached is None:
        cached = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in upstream]
        if len(_header_cache) < 1024:
            _header_cache[key] = cached
    return list(cached)


class NodePool:
    """Idle keep-alive connections to one node."""

    __slots__ = ("_busy", "_idle", "connect_timeout", "host", "loop", "max_idle", "port")

    def __init__(
        self,
        host: str,
        port: int,
        *,
        loop: asyncio.AbstractEventLoop,
        connect_timeout: float,
        max_idle: int,
    ) -> None:
        self.host = host
        self.port = port
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: deque[UpstreamConnection] = deque()
        self._busy: set[UpstreamConnection] = set()

    async def acquire(self, *, fresh: bool = False) -> UpstreamConnection:
        conn = None if fresh else self.take_idle()
        return conn if conn is not None else await self.connect()

    def new_connection(self) -> UpstreamConnection:
        """The protocol factory of this pool's connections (``loop.create_connection``)."""
        return UpstreamConnection(self)

    def take_idle(self) -> UpstreamConnection | None:
        """A kept-alive connection, without awaiting anything; None if there is none."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self._busy.add(conn)
                return conn
        return None

    async def connect(self) -> UpstreamConnection:
        try:
            # asyncio.timeout, unlike wait_for, does not wrap the connect in a task of its own.
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await self.loop.create_connection(self.new_connection, self.host, self.port)
        except TimeoutError:
            raise UpstreamConnectError(f"connect to {self.host}:{self.port} timed out") from None
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {self.host}:{self.port} failed: {exc.strerror or exc}") from None
        self._busy.add(conn)
        return conn

    def _put_idle(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        self._idle.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        if conn.closed:
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)

    def sweep(self, now: float, read_timeout: float) -> None:
        for conn in list(self._busy):
            if conn.timed_out(now, read_timeout):
                conn.close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def busy_count(self) -> int:
        return len(self._busy)

    def close(self) -> None:
        for conn in list(self._idle) + list(self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()


# == the callback path (shardon/fastpath.py) =========================================================

_INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'


class FastPath:
    """Decides, for a request whose body has arrived, whether the callback path can serve it."""

    __slots__ = ("gateway", "method_paths", "served", "tenant_header")

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.method_paths: dict[str, bytes] = dict(gateway._method_paths)
        self.tenant_header: str = gateway.tenant_header
        self.served = 0  # requests taken (the rest went the general way)

    def __call__(self, request: Request) -> bool:
        """Serve ``request`` (True), or leave it to the RSGI application untouched (False)."""
        gateway = self.gateway
        method_path = self.method_paths.get(request.path)
        if method_path is None or request.method != "POST" or gateway.draining or request.too_large:
            return False
        headers = request.headers
        try:
            principal = gateway.keys.authenticate(headers.get("authorization"), headers.get(self.tenant_header))
        except errors.ShardonError:
            return False
        if principal.limited:
            return False
        chunks = request.body
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(body) > gateway.max_body:
            return False
        try:
            req = routing_decoder.decode(body)
        except msgspec.MsgspecError:
            return False
        model = req.model
        stream = bool(req.stream)
        inject = False
        if stream:
            options = req.stream_options
            if options is None:
                inject = True  # ask the node for the stream's usage (the client will not see it)
            elif not options.include_usage:
                return False  # the general path rewrites the client's own stream_options
        scheduler = gateway.scheduler
        route = scheduler.routes.get(model)
        if route is None:
            return False
        lifecycle = gateway.lifecycle
        if lifecycle is not None and lifecycle.knows(route.name):
            return False
        if principal.allowed_models is not None and model not in principal.allowed_models:
            return False
        value = headers.get("x-priority")
        if value is None:
            priority = min(gateway.default_priority, principal.max_priority)
        else:
            named = PRIORITY_BY_NAME.get(value.strip().lower())
            if named is None:
                return False
            priority = min(named, principal.max_priority)
        tenant = principal.tenant
        index = scheduler.admit(route, tenant.name, tenant.weight)
        if index < 0:
            return False
        node = gateway.registry.by_index[index]
        served = route.served_names.get(index, model)
        if served != model:
            fields: dict[str, Any] = {"model": served}
            if inject:
                fields["stream_options"] = {"include_usage": True}
            payload = with_fields(body, **fields)
        elif inject:
            # The same JSON object with one member more, without decoding and re-encoding it (the
            # client sent no stream_options, so the key is not repeated).
            payload = _INCLUDE_USAGE + body.lstrip()[1:]
        else:
            payload = body
        now = time.time()
        rec = RequestRecord(
            id=gateway.next_id(now),
            received_at=now,
            dispatched_at=now,
            endpoint=request.path,
            tenant=tenant.name,
            key_id=None if principal.key is None else principal.key.id,
            model=model,
            node_id=node.id,
            backend=node.backend,
            model_file_sha256=node.model_file_sha256,
            priority=PRIORITY_NAMES[priority],
            stream=stream,
            bytes_in=len(body),
            client_addr=gateway.client_address(request),
        )
        gateway.in_flight += 1
        job = FastRequest(gateway, request, rec, route, index, node, principal, req, body, priority)
        job.head = node.request_head(method_path, len(payload))
        job.payload = payload
        if stream:
            job.hasher = OutputHasher()
            if inject:
                job.stripper = UsageStripper()
        request.on_lost = job.client_lost
        self.served += 1
        pool = node.pool
        conn = pool.take_idle()
        if conn is not None:
            job.start(conn)
        else:
            # No idle connection: open one; the request is sent when it is up (or handed to the
            # general path, with its retry rules, if it cannot be opened). A task and a timer, no
            # coroutine of ours: a burst of new streams opens hundreds of connections at once.
            loop = gateway.loop
            job.connecting = task = loop.create_task(loop.create_connection(pool.new_connection, pool.host, pool.port))
            job.connect_timer = loop.call_later(pool.connect_timeout, task.cancel)
            task.add_done_callback(job.connected)
        return True


class FastRequest:
    """One request on the callback path, from the node's connection to its record."""

    __slots__ = (
        "body",
        "conn",
        "connect_timer",
        "connecting",
        "done",
        "gateway",
        "hasher",
        "head",
        "index",
        "node",
        "payload",
        "principal",
        "priority",
        "rec",
        "req",
        "request",
        "route",
        "sent",
        "started",
        "streaming",
        "stripper",
    )

    def __init__(
        self,
        gateway: Any,
        request: Request,
        rec: RequestRecord,
        route: Any,
        index: int,
        node: Any,
        principal: Any,
        req: Any,
        body: bytes,
        priority: int,
    ) -> None:
        self.gateway = gateway
        self.request = request
        self.rec = rec
        self.route = route
        self.index = index
        self.node = node
        self.principal = principal
        self.req = req
        self.body = body
        self.priority = priority
        self.conn: UpstreamConnection | None = None
        self.connecting: asyncio.Task[Any] | None = None
        self.connect_timer: asyncio.TimerHandle | None = None
        self.head = b""
        self.payload = b""
        self.hasher: OutputHasher | None = None
        self.stripper: UsageStripper | None = None
        self.streaming = False  # the client's response has started
        self.sent = 0
        self.done = False
        self.started = time.monotonic()

    # -- the node's connection ------------------------------------------------------------------
    def start(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.listener = self
        conn.send(self.head, self.payload)
        conn.wait_started = time.monotonic()  # the sweeper's read timeout applies from now

    def connected(self, task: asyncio.Task[tuple[Any, UpstreamConnection]]) -> None:
        self.connecting = None
        timer = self.connect_timer
        if timer is not None:
            self.connect_timer = None
            timer.cancel()
        pool = self.node.pool
        if task.cancelled():
            if not self.done:  # not the client leaving: the connect timed out
                self._hand_over(UpstreamConnectError(f"connect to {pool.host}:{pool.port} timed out"))
            return
        exc = task.exception()
        if exc is not None:
            if not self.done:
                if isinstance(exc, OSError):
                    reason = exc.strerror or exc
                    error = UpstreamConnectError(f"connect to {pool.host}:{pool.port} failed: {reason}")
                else:
                    error = UpstreamConnectError(f"connect to {pool.host}:{pool.port} failed: {exc!r}")
                self._hand_over(error)
            return
        conn = task.result()[1]
        pool._busy.add(conn)
        if self.done:  # the client left meanwhile
            conn.finish()
            return
        self.start(conn)

    def upstream_event(self) -> None:
        """The node sent bytes, or the connection failed (called by `UpstreamConnection`)."""
        conn = self.conn
        if conn is None or self.done:
            return
        try:
            if conn.error is not None:
                if self.streaming:
                    self._fail_stream(conn.error)
                else:
                    self._hand_over(conn.error)
                return
            if self.streaming:
                self._relay(conn)
                return
            if not conn.headers_done:
                conn.wait_started = time.monotonic()
                return
            status = conn.status
            if status >= 500 and self.gateway.max_retries > 0:
                # The node refused before producing anything: the general path retries elsewhere.
                if conn.complete:
                    self._hand_over(UpstreamError(f"node answered {status}", before_first_byte=True))
                return
            if self.rec.stream:
                if conn.chunks or conn.complete:
                    self._start_stream(conn, status)
                return
            if conn.complete:
                self._answer(conn, status)
            elif conn.buffered > _WHOLE_LIMIT:
                self._hand_over(None)
            else:
                conn.wait_started = time.monotonic()
        except Exception:  # a bug: answer 500 in OpenAI's shape, log it, lose nothing
            fast_log.exception("request %s failed", format_request_id(self.rec.id))
            self._fail_internal()

    # -- answers --------------------------------------------------------------------------------
    def _answer(self, conn: UpstreamConnection, status: int) -> None:
        """A whole non-streamed answer: one write."""
        rec = self.rec
        data = conn.take()
        rec.first_token_at = now = time.time()
        rec.status = status
        headers = client_headers(conn.headers)
        headers.append(("x-request-id", format_request_id(rec.id)))
        headers.append(("x-shardon-node", self.node.id))
        if status == 200:
            sha, usage = hash_response(data)
            if rec.endpoint != "/v1/embeddings":  # no generated text to prove
                rec.output_sha256 = sha
            if usage:
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.completion_tokens = usage.get("completion_tokens")
        rec.bytes_out = len(data)
        self._release_node(conn)
        request = self.request
        request.on_lost = None
        request.response_bytes(status, headers, data)
        self._finish(now)

    def _start_stream(self, conn: UpstreamConnection, status: int) -> None:
        rec = self.rec
        rec.first_token_at = time.time()
        rec.status = status
        headers = client_headers(conn.headers)
        headers.append(("x-request-id", format_request_id(rec.id)))
        headers.append(("x-shardon-node", self.node.id))
        if status != 200:
            self.hasher = self.stripper = None  # an error body: passed through as it is
        request = self.request
        self.streaming = True
        data = self._filter(conn.take())
        complete = conn.complete
        if complete and self.stripper is not None:
            data += self._counted(self.stripper.flush())
        # The head and the first chunk in one write: one wake-up of the client, not two.
        request.conn.start_stream(request, status, headers, data)
        if complete:
            self._release_node(conn)
            self._end_stream(b"")
        else:
            self._watch(conn)

    def _relay(self, conn: UpstreamConnection) -> None:
        """Forward what arrived (as the node's bytes, minus a usage event the client did not ask for)."""
        data = self._filter(conn.take())
        if conn.complete:
            if self.stripper is not None:
                data += self._counted(self.stripper.flush())
            self._release_node(conn)
            self._end_stream(data)  # the last bytes and the terminating chunk: one write
            return
        if data:
            request = self.request
            request.conn.write_chunk(request, data)
        self._watch(conn)

    def _filter(self, data: bytes) -> bytes:
        """The receipt's hash sees the node's bytes; the client gets them minus the usage event."""
        if data:
            if self.hasher is not None:
                self.hasher.feed_sse(data)
            if self.stripper is not None:
                data = self.stripper.feed(data)
            self.sent += len(data)
        return data

    def _counted(self, data: bytes) -> bytes:
        self.sent += len(data)
        return data

    def _watch(self, conn: UpstreamConnection) -> None:
        """More is coming: the read timeout restarts; a client that reads slower than the node
        writes stops the reading of the node until its socket drains."""
        conn.wait_started = time.monotonic()
        http = self.request.conn
        if http.write_paused and not http.closed:
            conn.hold(True)
            http.drain_hook = self._client_drained

    def _client_drained(self) -> None:
        conn = self.conn
        if conn is not None and not self.done:
            conn.hold(False)

    def _end_stream(self, last: bytes) -> None:
        request = self.request
        request.on_lost = None
        request.conn.end_stream(request, last)
        self._finish(time.time())

    def _fail_stream(self, error: UpstreamError) -> None:
        """After the first byte: no silent retry; the client is told in-band and the stream ends."""
        rec = self.rec
        node = self.node
        if not error.reused:
            self.gateway.registry.record_failure(node, str(error))
        rec.status = 502
        rec.error_type = "upstream_error"
        request = self.request
        event = b""
        if self.hasher is not None and not request.disconnected:
            event = b"data: " + error_body(f"the node failed mid-stream: {error}", "server_error", "upstream_error")
            event += b"\n\n"
        self._release_node(self.conn)
        self._end_stream(event)

    # -- endings --------------------------------------------------------------------------------
    def _release_node(self, conn: UpstreamConnection | None) -> None:
        """Give the connection and the slot back (once)."""
        if conn is not None:
            conn.listener = None
            conn.finish()
        self.conn = None
        self.gateway.scheduler.release(self.index, self.route, self.rec.tenant, time.monotonic() - self.started)

    def _finish(self, now: float) -> None:
        """The record's last fields, then the log and metrics."""
        self.done = True
        rec = self.rec
        hasher = self.hasher
        if hasher is not None:
            if 200 <= rec.status < 300:
                rec.output_sha256 = hasher.hexdigest()
            usage = hasher.usage
            if usage:
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.completion_tokens = usage.get("completion_tokens")
            else:
                rec.completion_tokens = hasher.text_events
            rec.bytes_out = self.sent
        elif self.streaming:
            rec.bytes_out = self.sent
        node = self.node
        if rec.status < 500 and node.failures:
            self.gateway.registry.record_success(node)
        rec.finished_at = now
        self.gateway.request_done(rec)

    def client_lost(self) -> None:
        """The client disconnected: stop the node (closing its connection stops the generation),
        free the slot, log 499 (a started stream with the usage seen so far)."""
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            conn.listener = None
            conn.close()
        task = self.connecting
        if task is not None:
            self.connecting = None
            task.cancel()
        timer = self.connect_timer
        if timer is not None:
            self.connect_timer = None
            timer.cancel()
        rec = self.rec
        rec.status = 499
        rec.error_type = "client_disconnected"
        self.conn = None
        self.gateway.scheduler.release(self.index, self.route, rec.tenant, time.monotonic() - self.started)
        self._finish(time.time())

    def _hand_over(self, error: UpstreamError | None) -> None:
        """Let the general path finish: retry after ``error``, or relay a long answer (None)."""
        self.done = True
        conn = self.conn
        if conn is not None:
            conn.listener = None
            if error is not None:
                conn.finish()  # pooled again if the node answered cleanly (a 5xx), else closed
                self.conn = None
        self.request.on_lost = None
        self.gateway.resume(self, error)

    def _fail_internal(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.listener = None
            conn.close()
        self.conn = None
        rec = self.rec
        rec.status = 500
        rec.error_type = "internal_error"
        request = self.request
        request.on_lost = None
        if not request.response_started and not request.disconnected:
            internal = errors.ShardonError("internal error")
            request.response_bytes(500, internal.headers(), internal.body())
        elif request.response_started and not request.response_done:
            request.conn.end_stream(request)
        self.gateway.scheduler.release(self.index, self.route, rec.tenant)
        self.done = True
        rec.finished_at = time.time()
        self.gateway.request_done(rec)
