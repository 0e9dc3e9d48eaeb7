"""The native engine's client connection, modelled on uvicorn's ``httptools_impl.py``. This module is
also the source of its compiled twin (``_connection_c``, typed by ``_connection_c.pxd``);
``shardon.httpd.connection`` picks one.

- `HTTPConnection` is the asyncio protocol of one client connection. Bytes are fed to httptools as
  they arrive. When a request's head is complete a `Request` is made; when its body is in too
  (usually within the same read) it is offered to the application's ``on_request`` (served by
  callbacks, no task), and if that declines, the RSGI application runs as a task. A request whose
  body is still coming at the end of a read is held for ``on_request`` until it is in; the server's
  sweep hands a stalled one to the RSGI application, which reads the body as it arrives.
- A request that arrives while another is being answered (pipelining) waits in ``pipeline`` and
  reading pauses: a connection holds at most one running request plus what was already read.
- A response is complete when ``response_bytes`` is called, or, for a stream, when the application
  returns (the terminating chunk is written then). The connection then serves the next pipelined
  request, goes idle (keep-alive), or closes (``Connection: close``, HTTP/1.0, an unread body, a
  draining server).
- Flow control out: uvloop calls ``pause_writing`` above its write high-water mark; stream writers
  wait until ``resume_writing`` (``drain_hook`` for a callback writer).
- The client leaving (``connection_lost``) is told to every request of the connection at once:
  ``client_disconnect()`` completes, stream writes raise `ProtocolClosed`, ``on_lost`` runs.
- Malformed HTTP gets a 400 (a head over ``MAX_HEAD_BYTES`` a 431, a head slower than the server's
  ``header_timeout_s`` a 408) in OpenAI's error shape and the connection closes; these never reach
  the application, as they are not API requests.

`Request` is both the RSGI scope and the RSGI HTTP protocol of a request (``app(request, request)``):
``await proto()`` is the body; ``response_bytes/str/empty`` send a whole response;
``response_stream`` returns a `ResponseStream` whose ``await send_bytes(data)`` writes one chunk;
``await client_disconnect()`` completes when the client has gone. `Headers` is a dict of lower-cased
names (RSGI's ``scope.headers``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

from ..errors import PayloadTooLarge, ProtocolClosed, error_body

__all__ = ["MAX_HEAD_BYTES", "HTTPConnection", "Headers", "Request", "ResponseStream", "status_line"]

log = logging.getLogger("shardon.httpd")

MAX_HEAD_BYTES = 64 * 1024
_LARGE_WRITE = 16 * 1024  # above this, write head and body separately rather than copy them together
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


class Headers(dict):  # (not dict[str, str]: a generic base would not compile)
    """Request headers: lower-cased names → values (repeated headers keep the last; ``get_all``)."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        self._fill(raw)

    def _fill(self, raw: list[tuple[bytes, bytes]]) -> None:
        for name, value in raw:
            self[name.decode("latin-1").lower()] = value.decode("latin-1")

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
        self.on_lost: Callable[[], object] | None = None  # a callback driver's disconnect hook

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


class HTTPConnection:
    """One client connection of the native engine (``server``: its `NativeServer`): an asyncio protocol."""

    __slots__ = (
        "_headers",
        "_url",
        "_write",
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
        self._write: Callable[[bytes], object] | None = None  # transport.write: it runs per chunk
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
        # Called once when the client's socket drains (a callback driver's flow control).
        self.drain_hook: Callable[[], object] | None = None
        self.final = False  # the last request parsed ends the connection: read nothing more
        self.head_raw = 0  # bytes received since the last head was complete
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self._write = self.transport.write  # type: ignore[union-attr]
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
                # stays pending, for ``on_request`` to take when the body is in, unless the
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
        """A whole request: served by the application's callbacks if it takes it, else by its RSGI
        coroutine."""
        on_request = self.server.on_request
        if on_request is None or not on_request(request):
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
        self.start_encoded(request, status, _encode_headers(headers), first)

    def start_encoded(self, request: Request, status: int, encoded_headers: bytes, first: bytes) -> None:
        """`start_stream` with the header lines already encoded (``name: value\\r\\n`` each)."""
        head = None
        if not request.disconnected and not self.closed:
            if request.http_version == "1.0":
                # No chunked encoding in HTTP/1.0: the body ends when the connection does.
                request.keep_alive = False
                request.chunked = False
                framing = b""
            else:
                framing = b"transfer-encoding: chunked\r\n"
            head = self._head_encoded(request, status, encoded_headers, framing)
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
        write = self._write
        assert write is not None
        if not request.chunked:
            write(data)
        elif len(data) > _LARGE_WRITE:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            write(b"%x\r\n%b\r\n" % (len(data), data))

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
