# cython: language_level=3
"""The native engine's client connection, compiled: the same objects and behaviour as
``_connection_py.py`` (read its docstring); the field and method declarations are in the ``.pxd``.

Why it is compiled: these objects run for every request, several callbacks each (httptools calls
``on_url``/``on_header``/... per request, uvloop ``data_received`` per read), and in Python their
attribute traffic and frames were most of the engine's per-request cost. Differences from the twin
are only of form: objects are built with ``__new__`` and fields filled in directly, cross-object
calls are ``cdef`` methods, chunk frames are built in one allocation.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_Append
from libc.string cimport memcpy

import asyncio
import logging
from collections import deque
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from shardon.errors import PayloadTooLarge, ProtocolClosed, error_body

__all__ = ["MAX_HEAD_BYTES", "HTTPConnection", "Headers", "Request", "ResponseStream", "status_line"]

log = logging.getLogger("shardon.httpd")

MAX_HEAD_BYTES = 64 * 1024

cdef:
    Py_ssize_t _MAX_HEAD = MAX_HEAD_BYTES
    Py_ssize_t _LARGE_WRITE = 16 * 1024
    dict _STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus}
    dict _METHODS = {m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")}
    list _JSON = [("content-type", "application/json")]
    object _HttpParserError = httptools.HttpParserError
    object _HttpParserUpgrade = httptools.HttpParserUpgrade


cdef bytes _HEX = b"0123456789abcdef"


cdef bytes _chunk_frame(bytes data):
    """``b"%x\\r\\n%b\\r\\n" % (len(data), data)``: one chunk of a chunked body, built in one allocation."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef char digits[16]
    cdef int width = 0
    cdef Py_ssize_t rest = n
    cdef const char* hex = PyBytes_AS_STRING(_HEX)
    while True:
        digits[width] = hex[rest & 15]
        width += 1
        rest >>= 4
        if rest == 0:
            break
    cdef bytes frame = PyBytes_FromStringAndSize(NULL, width + 2 + n + 2)
    cdef char* out = PyBytes_AS_STRING(frame)
    cdef int i
    for i in range(width):
        out[i] = digits[width - 1 - i]
    out[width] = 13
    out[width + 1] = 10
    memcpy(out + width + 2, PyBytes_AS_STRING(data), n)
    out[width + 2 + n] = 13
    out[width + 3 + n] = 10
    return frame


def status_line(int status):
    cdef object line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


cdef bytes _encode_headers(list headers):
    cdef str text = "".join([f"{name}: {value}\r\n" for name, value in headers])
    if text.count("\n") != len(headers):  # a CR/LF inside a name or value would split the head
        raise ValueError("response header names and values must not contain line breaks")
    return text.encode("latin-1")


cdef class Headers(dict):
    """Request headers: lower-cased names → values (repeated headers keep the last; ``get_all``)."""

    def __init__(self, list raw):
        self.raw = raw
        for name, value in raw:
            PyDict_SetItem(self, (<bytes>name).decode("latin-1").lower(), (<bytes>value).decode("latin-1"))

    def get_all(self, str key):
        cdef bytes key_bytes = key.encode("latin-1")
        return [value.decode("latin-1") for name, value in self.raw if name.lower() == key_bytes]


cdef Headers _new_headers(list raw):
    cdef Headers headers = Headers.__new__(Headers, raw)
    headers.raw = raw
    cdef bytes name, value
    for name, value in raw:
        PyDict_SetItem(headers, name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


cdef class Request:
    """One request: its scope, its body as it arrives, the response sent for it."""

    proto = "http"
    rsgi_version = "1.5"
    scheme = "http"

    def __init__(self, HTTPConnection conn, str method, str path, str query_string, str http_version,
                 headers, bint keep_alive):
        _init_request(self, conn, method, path, query_string, http_version, headers, keep_alive)

    @property
    def authority(self):
        return self.headers.get("host")

    # -- told by the connection -----------------------------------------------------------------
    cpdef wake_body(self):
        cdef object waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    cpdef lost(self):
        """The client's connection is gone."""
        self.disconnected = True
        self.keep_alive = False
        cdef object on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost()
        cdef object waiter = self._disconnect
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.wake_body()
        if self.stream is not None:
            (<ResponseStream>self.stream).wake()

    # -- RSGI HTTPProtocol ----------------------------------------------------------------------
    async def __call__(self):
        if not self.body_done:
            await self._wait_body()
        if self.too_large:
            raise PayloadTooLarge(f"request body exceeds {self.conn.server.max_body} bytes")
        cdef list body = self.body
        return body[0] if len(body) == 1 else b"".join(body)

    async def _wait_body(self):
        cdef bint continue_sent = False
        while not self.body_done and not self.too_large:
            if self.disconnected:
                raise ProtocolClosed("client disconnected while sending the body")
            if not continue_sent and (self.headers.get("expect") or "").lower() == "100-continue":
                continue_sent = True
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            waiter = self._body_waiter = self.conn.loop.create_future()
            await waiter

    def client_disconnect(self):
        cdef object waiter = self._disconnect
        if waiter is None:
            waiter = self._disconnect = self.conn.loop.create_future()
            if self.disconnected:
                waiter.set_result(None)
        return waiter

    cpdef response_bytes(self, int status, list headers, bytes body):
        if self.response_started:
            raise RuntimeError("response already started")
        self.conn.send_response(self, status, headers, body)

    def response_str(self, int status, list headers, str body):
        self.response_bytes(status, headers, body.encode())

    def response_empty(self, int status, list headers):
        self.response_bytes(status, headers, b"")

    def response_stream(self, int status, list headers):
        if self.response_started:
            raise RuntimeError("response already started")
        self.conn.start_stream(self, status, headers)
        cdef ResponseStream stream = ResponseStream(self)
        self.stream = stream
        return stream


cdef inline void _init_request(Request self, HTTPConnection conn, str method, str path, str query_string,
                               str http_version, object headers, bint keep_alive):
    self.conn = conn
    self.method = method
    self.path = path
    self.query_string = query_string
    self.http_version = http_version
    self.headers = headers
    self.client = conn.client
    self.server = conn.server_addr
    self.keep_alive = keep_alive
    self.body = []
    self.body_size = 0
    self.body_done = False
    self.too_large = False
    self._body_waiter = None
    self._disconnect = None
    self.disconnected = False
    self.response_started = False
    self.response_done = False
    self.status = 0
    self.stream = None
    self.chunked = True
    self.on_lost = None


cdef class ResponseStream:
    """A streamed (chunked) response: each ``send_bytes`` is one HTTP chunk, written at once."""

    def __init__(self, Request request):
        self.request = request
        self._drain = None

    async def send_bytes(self, bytes data):
        cdef Request request = self.request
        if request.disconnected:
            raise ProtocolClosed("client disconnected")
        if not data or request.method == "HEAD":
            return
        cdef HTTPConnection conn = request.conn
        conn.write_chunk(request, data)
        while conn.write_paused and not request.disconnected:
            # The client reads slower than the node writes: wait until its socket drains.
            drain = self._drain = conn.loop.create_future()
            conn.drain_waiters.append(drain)
            await drain
        if request.disconnected:
            raise ProtocolClosed("client disconnected")

    async def send_str(self, str data):
        await self.send_bytes(data.encode())

    cpdef wake(self):
        cdef object drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)


cdef class HTTPConnection:
    """One client connection of the native engine (``server``: its `NativeServer`)."""

    def __init__(self, server):
        self.server = server
        self.loop = server.loop
        self.app = server.app
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.client = ""
        self.server_addr = ""
        self.current = None
        self.parsing = None
        self.pending = None
        self.pending_since = 0.0
        self.pipeline = deque()
        self._url = b""
        self._headers = []
        self.head_bytes = 0
        self.head_started = 0.0
        self.idle_since = 0.0
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiters = []
        self.drain_hook = None
        self.final = False  # the last request parsed ends the connection: read nothing more
        self.head_raw = 0  # bytes received since the last head was complete
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        self._write = transport.write
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = f"{peer[0]}:{peer[1]}"
        self.server_addr = getattr(self.server, "address", "")
        self.idle_since = self.loop.time()
        self.server.connections.add(self)

    def data_received(self, data):
        cdef Request pending, request
        if self.final:
            return  # after a request that ends the connection (Connection: close, an upgrade)
        if self.parsing is None:
            self.head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except _HttpParserUpgrade:
            # No protocol switch is offered: the request is answered, then the connection closes.
            self._end_reading()
        except _HttpParserError as exc:
            if not self.final:  # (bytes after a Connection: close request are ignored)
                self.pending = None
                if self.head_bytes > _MAX_HEAD:
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
        if self.head_started and self.head_raw > _MAX_HEAD and not self.closed:
            # A head still incomplete past the limit (httptools buffers a header line until it ends).
            self.reject(431, f"request head larger than {MAX_HEAD_BYTES} bytes")

    cdef _end_reading(self):
        """No request after the last one parsed: it is answered, then the connection closes."""
        self.final = True
        cdef Request request = self.parsing
        if request is not None:
            self.parsing = None
            request.body_done = True
            request.wake_body()
        if self.pipeline:
            request = self.pipeline[len(self.pipeline) - 1]
        else:
            request = self.current
        if request is not None:
            request.keep_alive = False

    def eof_received(self):
        return None  # the transport closes itself; connection_lost tells the requests

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        cdef Request request
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
        self.parser = None

    def pause_writing(self):
        self.write_paused = True

    def resume_writing(self):
        self.write_paused = False
        self._wake_drain()

    cdef _wake_drain(self):
        cdef list waiters = self.drain_waiters
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
    def on_url(self, bytes url):
        if not self.head_started:
            self.head_started = self.loop.time()
        self._url += url
        self.head_bytes += len(url)
        if self.head_bytes > _MAX_HEAD:
            raise _HttpParserError("request head too large")

    def on_header(self, bytes name, bytes value):
        PyList_Append(self._headers, (name, value))
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > _MAX_HEAD:
            raise _HttpParserError("request head too large")

    def on_headers_complete(self):
        parser = self.parser
        cdef bytes raw_method = parser.get_method()
        cdef object method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("latin-1")
        cdef bytes path, query
        path, _, query = self._url.partition(b"?")
        cdef str path_str = path.decode("latin-1")
        if "%" in path_str:
            path_str = unquote(path_str, encoding="latin-1")
        cdef Request request = Request.__new__(Request)
        _init_request(
            request,
            self,
            method,
            path_str,
            query.decode("latin-1") if query else "",
            parser.get_http_version(),
            _new_headers(self._headers),
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

    def on_body(self, bytes body):
        cdef Request request = self.parsing
        if request is None or request.too_large:
            return
        request.body_size += len(body)
        if request.body_size > self.server.max_body:
            # Stop buffering: the application answers 413 and the connection closes after it.
            request.too_large = True
            request.keep_alive = False
            request.body = []
            request.wake_body()
            return
        PyList_Append(request.body, body)

    def on_message_complete(self):
        cdef Request request = self.parsing
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
    cdef _dispatch(self, Request request):
        """A whole request: served by the application's callbacks if it takes it, else by its RSGI
        coroutine."""
        on_request = self.server.on_request
        if on_request is None or not on_request(request):
            self._start_app(request)

    cdef _start_app(self, Request request):
        self.loop.create_task(self._serve(request))

    async def _serve(self, Request request):
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
    cdef bytes _head_encoded(self, Request request, int status, bytes encoded, bytes framing):
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

    cpdef send_response(self, Request request, int status, list headers, bytes body):
        """Write a whole response (the head is built first: a bad header raises, nothing is sent)."""
        self.send_encoded(request, status, _encode_headers(headers), body)

    cpdef send_encoded(self, Request request, int status, bytes encoded_headers, bytes body):
        """`send_response` with the header lines already encoded (``name: value\\r\\n`` each)."""
        cdef bytes head = None
        if not request.disconnected and not self.closed:
            head = self._head_encoded(request, status, encoded_headers, b"content-length: %d\r\n" % len(body))
        request.response_started = request.response_done = True
        request.status = status
        if head is not None:
            transport = self.transport
            if not body or request.method == "HEAD":
                transport.write(head)
            elif len(body) > _LARGE_WRITE:
                transport.writelines((head, body))
            else:
                transport.write(head + body)
        self._response_complete(request)

    cpdef start_stream(self, Request request, int status, list headers, bytes first=b""):
        """Write a streamed response's head, and ``first`` as its first chunk in the same write
        (the head is built first: a bad header raises, nothing is sent)."""
        self.start_encoded(request, status, _encode_headers(headers), first)

    cpdef start_encoded(self, Request request, int status, bytes encoded_headers, bytes first):
        """`start_stream` with the header lines already encoded (``name: value\\r\\n`` each)."""
        cdef bytes framing
        cdef bytes head = None
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
            self.transport.write(head)

    cpdef end_stream(self, Request request, bytes last=b""):
        """The streamed response is over: ``last`` and the terminating chunk (one write), then the
        next request."""
        request.response_done = True
        if not request.disconnected and not self.closed and request.method != "HEAD":
            if request.chunked:
                self.transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(last), last) if last else b"0\r\n\r\n")
            elif last:
                self.transport.write(last)
        self._response_complete(request)

    cpdef write_chunk(self, Request request, bytes data):
        transport = self.transport
        if self.closed or transport is None:
            return
        if not request.chunked:
            self._write(data)
        elif len(data) > _LARGE_WRITE:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self._write(_chunk_frame(data))

    cpdef write(self, bytes data):
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    cdef _response_complete(self, Request request):
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
        cdef Request nxt
        if self.pipeline:
            nxt = self.current = self.pipeline.popleft()
            if nxt.body_done:
                self._dispatch(nxt)
            else:
                self._start_app(nxt)
            if self.pipeline:
                return
        else:
            self.idle_since = self.loop.time()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()

    def reject(self, int status, str message):
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
    def start_stalled(self, double limit):
        """A request whose body has been coming since before ``limit`` goes to the application."""
        pending = self.pending
        if pending is not None and self.pending_since and self.pending_since < limit:
            self.pending = None
            self.pending_since = 0.0
            self._start_app(pending)

    def is_idle(self):
        return self.current is None and self.parsing is None and not self.pipeline and not self.head_started

    def close(self):
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()


# == node side ======================================================================================
