# cython: language_level=3
"""The wire, compiled: the same objects and behaviour as ``_wire_py.py`` (read its docstring).

Why it is compiled: these objects run for every request, several callbacks each (httptools calls
``on_url``/``on_header``/... per request, uvloop ``data_received`` per read), and in Python their
attribute traffic and frames were most of the gateway's own per-request cost. Here they are
``cdef`` classes with typed fields, calling one another directly; what they call outside (the
gateway's scheduler, key store, metrics, request log) stays Python.

Differences from the twin are only of form: objects are built with ``__new__`` and fields filled
in directly (no ``__init__`` call), and cross-object calls are ``cdef`` methods.
"""

cimport cython
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_Append, PyList_GET_SIZE
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from shardon._fast._sse_c cimport OutputHasher, UsageStripper

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from http import HTTPStatus
from urllib.parse import unquote

import httptools
import msgspec

from shardon import errors
from shardon.errors import PayloadTooLarge, ProtocolClosed, error_body
from shardon._fast._sse_c import hash_response
from shardon.schemas import PRIORITY_BY_NAME, PRIORITY_NAMES, routing_decoder, with_fields
from shardon.store import RequestRecord, format_request_id, request_ids
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
cdef object _access_log = logging.getLogger("shardon.access")
cdef int _INFO = logging.INFO

MAX_HEAD_BYTES = 64 * 1024

cdef:
    Py_ssize_t _MAX_HEAD = MAX_HEAD_BYTES
    Py_ssize_t _LARGE_WRITE = 16 * 1024
    Py_ssize_t _HIGH_WATER = 256 * 1024
    Py_ssize_t _WHOLE_LIMIT = 256 * 1024
    frozenset _FRAMING = frozenset(
        {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"}
    )
    dict _STATUS_LINES = {int(s): f"HTTP/1.1 {int(s)} {s.phrase}\r\n".encode() for s in HTTPStatus}
    dict _METHODS = {m: m.decode() for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH")}
    list _JSON = [("content-type", "application/json")]
    dict _header_cache = {}
    object _time = time.time
    object _decode_routing = routing_decoder.decode
    object _ShardonError = errors.ShardonError
    object _MsgspecError = msgspec.MsgspecError
    object _HttpParserError = httptools.HttpParserError
    object _HttpParserUpgrade = httptools.HttpParserUpgrade


# CPython's time.monotonic() reads CLOCK_MONOTONIC on Linux; elsewhere (macOS: mach time) it is
# another clock, and the values are compared with the Python side's, so it is called there.
cdef bint _CLOCK_IS_PYTHONS = sys.platform.startswith("linux")
cdef object _monotonic = time.monotonic


cdef inline double _monotonic_now() except? -1.0:
    """``time.monotonic()``, without a call and a float per chunk where the clock is the same."""
    cdef timespec ts
    if not _CLOCK_IS_PYTHONS:
        return _monotonic()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


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


cdef dict _block_cache = {}


cdef bytes _header_block(list upstream):
    """`client_headers`, encoded as header lines (the callback path writes bytes directly)."""
    cdef tuple key = tuple(upstream)
    cdef object block = _block_cache.get(key)
    if block is None:
        block = _encode_headers(client_headers(upstream))
        if len(_block_cache) < 1024:
            _block_cache[key] = block
    return <bytes>block


def client_headers(list upstream):
    """A node's end-to-end response headers as the client gets them (a new list, from a cache)."""
    cdef tuple key = tuple(upstream)
    cdef object cached = _header_cache.get(key)
    if cached is None:
        cached = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in upstream]
        if len(_header_cache) < 1024:
            _header_cache[key] = cached
    return list(cached)


# == client side ====================================================================================


cdef class Headers(dict):
    """Request headers: lower-cased names → values (repeated headers keep the last; ``get_all``)."""

    cdef public list raw

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


@cython.final
cdef class Request:
    """One request: its scope, its body as it arrives, the response sent for it."""

    cdef:
        public object _body_waiter
        public object _disconnect
        public list body
        public bint body_done
        public Py_ssize_t body_size
        public bint chunked
        public str client
        public HTTPConnection conn
        public bint disconnected
        public object headers
        public str http_version
        public bint keep_alive
        public str method
        public object on_lost
        public str path
        public str query_string
        public bint response_done
        public bint response_started
        public str server
        public int status
        public object stream
        public bint too_large

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


@cython.final
cdef class ResponseStream:
    """A streamed (chunked) response: each ``send_bytes`` is one HTTP chunk, written at once."""

    cdef public Request request
    cdef object _drain

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


@cython.final
cdef class HTTPConnection:
    """One client connection of the native engine (``server``: its `NativeServer`)."""

    cdef:
        bytes _url
        list _headers
        object _write  # transport.write, bound once: it runs per chunk of every stream
        public object app
        public str client
        public bint closed
        public Request current
        public object drain_hook
        public bint final
        public Py_ssize_t head_raw
        public list drain_waiters
        public Py_ssize_t head_bytes
        public double head_started
        public double idle_since
        public object loop
        public object parser
        public Request parsing
        public Request pending
        public double pending_since
        public object pipeline
        public bint reading_paused
        public object server
        public str server_addr
        public object transport
        public bint write_paused

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
        """A whole request: the callback path if it takes it, else the RSGI application."""
        fast = self.server.fast_path
        if fast is None:
            self._start_app(request)
        elif type(fast) is FastPath:
            if not (<FastPath>fast).serve(request):
                self._start_app(request)
        elif not fast(request):
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
    cdef bytes _head(self, Request request, int status, list headers, bytes framing):
        return self._head_encoded(request, status, _encode_headers(headers), framing)

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
            head = self._head(request, status, headers, framing)
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


@cython.final
cdef class UpstreamConnection:
    """One keep-alive connection to a node, one request at a time."""

    cdef:
        object _feed  # parser.feed_data, bound once: it runs per read
        bint _held
        bint _keep_alive
        object _loop
        bint _paused
        object _waiter
        public Py_ssize_t buffered
        public list chunks
        public bint closed
        public bint complete
        public object error
        public bint got_bytes
        public list headers
        public bint headers_done
        public bint in_use
        public object listener
        public object parser
        public NodePool pool
        public bint reused
        public int status
        public object transport
        public double wait_started

    def __init__(self, NodePool pool):
        self.pool = pool
        self._loop = pool.loop
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self._feed = self.parser.feed_data
        self.closed = False
        self.in_use = False
        self.reused = False
        self._waiter = None
        self._paused = False
        self._held = False
        self.listener = None
        self._reset()

    cdef inline void _reset(self):
        self.status = 0
        self.headers = []
        self.headers_done = False
        self.chunks = []
        self.buffered = 0
        self.complete = False
        self._keep_alive = False
        self.error = None
        self.got_bytes = False
        self.wait_started = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        if not self.in_use:
            # Bytes nobody asked for: the connection is out of sync; never reuse it.
            self.close()
            return
        self.got_bytes = True
        try:
            self._feed(data)
        except _HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"bad response from node: {exc}", before_first_byte=False))
            self.close()
            return
        listener = self.listener
        if listener is not None:
            if type(listener) is FastRequest:
                (<FastRequest>listener).upstream_event()
            else:
                listener.upstream_event()
            return
        # One wake-up per read, however many parser events it produced.
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.wait_started = 0.0
            if not waiter.done():
                waiter.set_result(None)

    def connection_lost(self, exc):
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
        self.parser = self._feed = None  # a cycle through this object's callbacks (see HTTPConnection)

    def eof_received(self):
        return None

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass

    # -- httptools callbacks ----------------------------------------------------------------
    def on_header(self, bytes name, bytes value):
        if name.lower() not in _FRAMING:
            PyList_Append(self.headers, (name, value))

    def on_headers_complete(self):
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, bytes body):
        PyList_Append(self.chunks, body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self):
        self.complete = True
        self._keep_alive = self.parser.should_keep_alive()

    # -- caller side ------------------------------------------------------------------------
    cpdef _fail(self, error):
        if self.error is None:
            self.error = error
        listener = self.listener
        if listener is not None:
            if type(listener) is FastRequest:
                (<FastRequest>listener).upstream_event()
            else:
                listener.upstream_event()
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.wait_started = 0.0
            if not waiter.done():
                waiter.set_exception(error)

    def wait(self):
        """A future resolved when more of the response has arrived (raising if the request failed)."""
        waiter = self._loop.create_future()
        if self.error is not None:
            waiter.set_exception(self.error)
            return waiter
        self._waiter = waiter
        self.wait_started = _monotonic_now()
        return waiter

    cpdef send(self, bytes head, bytes body=b""):
        """Write one request; the body is written as given, not copied into the head."""
        self._reset()
        self.in_use = True
        if len(body) > _LARGE_WRITE:
            self.transport.writelines((head, body))  # large bodies are not copied
        else:
            self.transport.write(head + body)  # one small copy beats a vectored write

    cpdef bytes take(self):
        """The body bytes that arrived since the last call (``b""`` if none)."""
        cdef list chunks = self.chunks
        if not chunks:
            return b""
        cdef bytes data = chunks[0] if PyList_GET_SIZE(chunks) == 1 else b"".join(chunks)
        self.chunks = []
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            if not self._held:
                self.transport.resume_reading()
        return data

    cpdef hold(self, bint held):
        """Stop (True) or restart (False) reading from the node: the caller's own flow control."""
        if held == self._held or self.transport is None or self.closed:
            return
        self._held = held
        if held:
            self.transport.pause_reading()
        elif not self._paused:
            self.transport.resume_reading()

    async def response_head(self):
        while not self.headers_done:
            await self.wait()
        return self.status, self.headers

    async def read(self):
        """The body bytes that arrived since the last call; ``b""`` once the response is complete."""
        while not self.chunks:
            if self.complete:
                return b""
            await self.wait()
        return self.take()

    def timed_out(self, double now, double limit):
        if self.wait_started and now - self.wait_started > limit:
            self._fail(UpstreamTimeout(f"node sent nothing for {limit:g}s", before_first_byte=not self.got_bytes))
            return True
        return False

    cpdef finish(self):
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

    cpdef close(self):
        if self.in_use and not self.complete:
            # Wake a reader still waiting on this response: it must not hang on a dead connection.
            self._fail(UpstreamError("connection closed by shardon", before_first_byte=not self.got_bytes))
        self.in_use = False
        if self.transport is not None and not self.closed:
            self.closed = True
            # abort(), not close(): no point flushing a request the node should stop working on.
            self.transport.abort()
        self.pool._forget(self)


@cython.final
cdef class NodePool:
    """Idle keep-alive connections to one node."""

    cdef:
        public object _idle
        public set _busy
        public double connect_timeout
        public str host
        public object loop
        public int max_idle
        public int port

    def __init__(self, str host, int port, *, loop, double connect_timeout, int max_idle):
        self.host = host
        self.port = port
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle = deque()
        self._busy = set()

    async def acquire(self, *, bint fresh=False):
        conn = None if fresh else self.take_idle()
        return conn if conn is not None else await self.connect()

    cpdef UpstreamConnection new_connection(self):
        """The protocol factory of this pool's connections (``loop.create_connection``)."""
        return UpstreamConnection(self)

    cpdef UpstreamConnection take_idle(self):
        """A kept-alive connection, without awaiting anything; None if there is none."""
        idle = self._idle
        cdef UpstreamConnection conn
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self._busy.add(conn)
                return conn
        return None

    async def connect(self):
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

    cpdef _put_idle(self, UpstreamConnection conn):
        self._busy.discard(conn)
        if len(self._idle) >= self.max_idle:
            conn.close()
            return
        self._idle.append(conn)

    cpdef _forget(self, UpstreamConnection conn):
        self._busy.discard(conn)
        if conn.closed:
            with contextlib.suppress(ValueError):
                self._idle.remove(conn)

    def sweep(self, double now, double read_timeout):
        for conn in list(self._busy):
            if conn.timed_out(now, read_timeout):
                conn.close()

    @property
    def idle_count(self):
        return len(self._idle)

    @property
    def busy_count(self):
        return len(self._busy)

    def close(self):
        for conn in list(self._idle) + list(self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()


# == the callback path (shardon/fastpath.py) =========================================================

cdef bytes _INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'


@cython.final
cdef class FastPath:
    """Decides, for a request whose body has arrived, whether the callback path can serve it."""

    cdef:
        public object gateway
        public dict method_paths
        public str tenant_header
        object ids
        object scheduler
        object balancer
        object node_routes
        object request_log
        object log_row
        object observe
        list on_finish
        bint access_logging
        dict node_names
        public long long served

    def __init__(self, gateway):
        self.gateway = gateway
        self.method_paths = dict(gateway._method_paths)
        self.tenant_header = gateway.tenant_header
        self.ids = request_ids  # the process's id sequence, shared with the general path
        # What admission, release and the end of a request touch, looked up once (the
        # objects are the gateway's own, so nothing is copied: see _admit, _release, _done).
        self.scheduler = gateway.scheduler
        self.balancer = gateway.scheduler.balancer
        self.node_routes = gateway.scheduler._node_routes
        self.request_log = gateway.request_log
        # RequestLog.append minus its Python frame: the compiled row queue's own append.
        self.log_row = None if gateway.request_log is None else gateway.request_log.row_queue.append
        # None with metrics off: not even a call to the no-op.
        self.observe = gateway.metrics.observe_request if gateway.metrics.enabled else None
        self.on_finish = gateway.on_finish
        self.access_logging = gateway.access_logging  # config, loaded once
        self.node_names = {}
        self.served = 0

    cdef bytes node_name(self, str node_id):
        """A node's id as header bytes (latin-1, as every header value), encoded once."""
        cdef object name = self.node_names.get(node_id)
        if name is None:
            name = node_id.encode("latin-1")
            if "\r" in node_id or "\n" in node_id:
                raise ValueError("a node id must not contain line breaks")
            self.node_names[node_id] = name
        return <bytes>name

    cdef int _admit(self, route, str tenant, weight) except -2:
        """`Scheduler.admit`, compiled: the same steps on the same objects."""
        route.last_seen[tenant] = _monotonic_now()
        route.weights[tenant] = weight
        if route.held or len(route.queue):
            return -1
        balancer = self.balancer
        candidates = route.candidates
        cdef int index = balancer.pick(candidates, None)
        if index < 0:
            return -1
        cdef int headroom = route.headroom
        if headroom and balancer.free_slots(candidates) <= headroom and self.scheduler._over_share(route, tenant):
            return -1
        balancer.acquire(index)
        cdef dict inflight = route.inflight
        inflight[tenant] = inflight.get(tenant, 0) + 1
        return index

    cdef _release(self, int index, route, str tenant, double service_s):
        """`Scheduler.release`, compiled: the same steps on the same objects."""
        self.balancer.release(index)
        if service_s >= 0:
            route.service_ewma += 0.1 * (service_s - route.service_ewma)
        cdef dict inflight = route.inflight
        left = inflight.get(tenant, 0) - 1
        if left > 0:
            inflight[tenant] = left
        else:
            inflight.pop(tenant, None)
        routes = self.node_routes.get(index)
        if routes is not None and (len(routes) > 1 or routes[0].held or len(routes[0].queue)):
            self.scheduler.dispatch(index)

    cdef _done(self, rec):
        """`Gateway.request_done`, compiled: count it out, log it, measure it."""
        gateway = self.gateway
        gateway.in_flight -= 1
        if gateway.draining and gateway.in_flight == 0:
            gateway._idle.set()
        if self.log_row is not None and not self.log_row(rec):
            self.request_log.refused(rec)
        if self.observe is not None:
            self.observe(rec)
        if self.on_finish:
            for hook in self.on_finish:
                hook(rec)
        if self.access_logging and _access_log.isEnabledFor(_INFO):
            gateway.log_access(rec)

    def __call__(self, Request request):
        """Serve ``request`` (True), or leave it to the RSGI application untouched (False)."""
        return self.serve(request)

    cdef bint serve(self, Request request) except -1:
        gateway = self.gateway
        cdef object method_path = self.method_paths.get(request.path)
        if method_path is None or request.method != "POST" or gateway.draining or request.too_large:
            return False
        headers = request.headers
        try:
            principal = gateway.keys.authenticate(headers.get("authorization"), headers.get(self.tenant_header))
        except _ShardonError:
            return False
        if principal.limited:
            return False
        cdef list chunks = request.body
        cdef bytes body = chunks[0] if PyList_GET_SIZE(chunks) == 1 else b"".join(chunks)
        if len(body) > gateway.max_body:
            return False
        try:
            req = _decode_routing(body)
        except _MsgspecError:
            return False
        model = req.model
        cdef bint stream = bool(req.stream)
        cdef bint inject = False
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
        allowed = principal.allowed_models
        if allowed is not None and model not in allowed:
            return False
        value = headers.get("x-priority")
        cdef int priority
        if value is None:
            priority = min(<int>gateway.default_priority, <int>principal.max_priority)
        else:
            named = PRIORITY_BY_NAME.get(value.strip().lower())
            if named is None:
                return False
            priority = min(<int>named, <int>principal.max_priority)
        tenant = principal.tenant
        cdef int index = self._admit(route, tenant.name, tenant.weight)
        if index < 0:
            return False
        node = gateway.registry.by_index[index]
        served = route.served_names.get(index, model)
        cdef bytes payload
        if served != model:
            fields = {"model": served}
            if inject:
                fields["stream_options"] = {"include_usage": True}
            payload = with_fields(body, **fields)
        elif inject:
            # The same JSON object with one member more, without decoding and re-encoding it (the
            # client sent no stream_options, so the key is not repeated).
            payload = _INCLUDE_USAGE + body.lstrip()[1:]
        else:
            payload = body
        now = _time()
        key = principal.key
        # request_ids.next(now), inline (see shardon.store.RequestIds)
        ids = self.ids
        request_id = (<long long>(<double>now * 1000.0)) << 20
        last = ids.last
        if request_id <= last:
            request_id = last + 1
        ids.last = request_id
        rec = RequestRecord(
            id=request_id,
            received_at=now,
            dispatched_at=now,
            endpoint=request.path,
            tenant=tenant.name,
            key_id=None if key is None else key.id,
            model=model,
            node_id=node.id,
            backend=node.backend,
            model_file_sha256=node.model_file_sha256,
            priority=PRIORITY_NAMES[priority],
            stream=stream,
            bytes_in=len(body),
            client_addr=request.client,
        )
        gateway.in_flight += 1
        cdef FastRequest job = FastRequest.__new__(FastRequest)
        job.gateway = gateway
        job.path = self
        job.request = request
        job.rec = rec
        job.route = route
        job.index = index
        job.node = node
        job.principal = principal
        job.req = req
        job.body = body
        job.priority = priority
        job.conn = None
        job.connecting = None
        job.connect_timer = None
        prefix = node._heads.get(method_path)  # Node.request_head, inline once its prefix is cached
        if prefix is None:
            job.head = node.request_head(method_path, len(payload))
        else:
            job.head = (<bytes>prefix) + (b"%d\r\n\r\n" % len(payload))
        job.payload = payload
        job.is_stream = stream
        if stream:
            job.hasher = OutputHasher()
            job.stripper = UsageStripper() if inject else None
        else:
            job.hasher = None
            job.stripper = None
        job.streaming = False
        job.sent = 0
        job.done = False
        job.started = _monotonic_now()
        request.on_lost = job.client_lost
        self.served += 1
        cdef NodePool pool = <NodePool>node.pool
        cdef UpstreamConnection conn = pool.take_idle()
        if conn is not None:
            job.start(conn)
        else:
            # No idle connection: open one; the request is sent when it is up (or handed to the
            # general path, with its retry rules, if it cannot be opened). A task and a timer, no
            # coroutine of ours: a burst of new streams opens hundreds of connections at once.
            loop = gateway.loop
            task = loop.create_task(loop.create_connection(pool.new_connection, pool.host, pool.port))
            job.connecting = task
            job.connect_timer = loop.call_later(pool.connect_timeout, task.cancel)
            task.add_done_callback(job.connected)
        return True


@cython.final
cdef class FastRequest:
    """One request on the callback path, from the node's connection to its record."""

    cdef:
        public bytes body
        public UpstreamConnection conn
        FastPath path
        public object connect_timer
        public object connecting
        public bint done
        public object gateway
        public OutputHasher hasher
        public bytes head
        public int index
        public bint is_stream
        public object node
        public bytes payload
        public object principal
        public int priority
        public object rec
        public object req
        public Request request
        public object route
        public Py_ssize_t sent
        public double started
        public bint streaming
        public UsageStripper stripper

    def __init__(self, *args, **kwargs):
        raise TypeError("FastRequest objects are made by FastPath")

    # -- the node's connection ------------------------------------------------------------------
    cdef start(self, UpstreamConnection conn):
        self.conn = conn
        conn.listener = self
        conn.send(self.head, self.payload)
        conn.wait_started = _monotonic_now()  # the sweeper's read timeout applies from now

    def connected(self, task):
        self.connecting = None
        timer = self.connect_timer
        if timer is not None:
            self.connect_timer = None
            timer.cancel()
        cdef NodePool pool = <NodePool>self.node.pool
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
        cdef UpstreamConnection conn = task.result()[1]
        pool._busy.add(conn)
        if self.done:  # the client left meanwhile
            conn.finish()
            return
        self.start(conn)

    cpdef upstream_event(self):
        """The node sent bytes, or the connection failed (called by `UpstreamConnection`)."""
        cdef UpstreamConnection conn = self.conn
        if conn is None or self.done:
            return
        cdef int status
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
                conn.wait_started = _monotonic_now()
                return
            status = conn.status
            if status >= 500 and self.gateway.max_retries > 0:
                # The node refused before producing anything: the general path retries elsewhere.
                if conn.complete:
                    self._hand_over(UpstreamError(f"node answered {status}", before_first_byte=True))
                return
            if self.is_stream:
                if conn.chunks or conn.complete:
                    self._start_stream(conn, status)
                return
            if conn.complete:
                self._answer(conn, status)
            elif conn.buffered > _WHOLE_LIMIT:
                self._hand_over(None)
            else:
                conn.wait_started = _monotonic_now()
        except Exception:  # a bug: answer 500 in OpenAI's shape, log it, lose nothing
            fast_log.exception("request %s failed", format_request_id(self.rec.id))
            self._fail_internal()

    # -- answers --------------------------------------------------------------------------------
    cdef _answer(self, UpstreamConnection conn, int status):
        """A whole non-streamed answer: one write."""
        rec = self.rec
        cdef bytes data = conn.take()
        now = _time()
        rec.first_token_at = now
        rec.status = status
        node = self.node
        cdef bytes headers = _header_block(conn.headers) + b"x-request-id: %016x\r\nx-shardon-node: %b\r\n" % (
            rec.id,
            self.path.node_name(node.id),
        )
        if status == 200:
            sha, usage = hash_response(data)
            if rec.endpoint != "/v1/embeddings":  # no generated text to prove
                rec.output_sha256 = sha
            if usage:
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.completion_tokens = usage.get("completion_tokens")
        rec.bytes_out = len(data)
        self._release_node(conn)
        cdef Request request = self.request
        request.on_lost = None
        if request.response_started:
            raise RuntimeError("response already started")
        request.conn.send_encoded(request, status, headers, data)
        self._finish(now)

    cdef _start_stream(self, UpstreamConnection conn, int status):
        rec = self.rec
        rec.first_token_at = _time()
        rec.status = status
        cdef list headers = client_headers(conn.headers)
        PyList_Append(headers, ("x-request-id", "%016x" % rec.id))
        PyList_Append(headers, ("x-shardon-node", self.node.id))
        if status != 200:
            self.hasher = None  # an error body: passed through as it is
            self.stripper = None
        cdef Request request = self.request
        self.streaming = True
        cdef bytes data = self._filter(conn.take())
        cdef bint complete = conn.complete
        if complete and self.stripper is not None:
            data += self._counted(self.stripper.flush())
        # The head and the first chunk in one write: one wake-up of the client, not two.
        request.conn.start_stream(request, status, headers, data)
        if complete:
            self._release_node(conn)
            self._end_stream(b"")
        else:
            self._watch(conn)

    cdef _relay(self, UpstreamConnection conn):
        """Forward what arrived (as the node's bytes, minus a usage event the client did not ask for)."""
        cdef bytes data = self._filter(conn.take())
        cdef Request request
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

    cdef bytes _filter(self, bytes data):
        """The receipt's hash sees the node's bytes; the client gets them minus the usage event."""
        if data:
            if self.hasher is not None:
                self.hasher.feed_sse(data)
            if self.stripper is not None:
                data = self.stripper.feed(data)
            self.sent += len(data)
        return data

    cdef bytes _counted(self, bytes data):
        self.sent += len(data)
        return data

    cdef _watch(self, UpstreamConnection conn):
        """More is coming: the read timeout restarts; a client that reads slower than the node
        writes stops the reading of the node until its socket drains."""
        conn.wait_started = _monotonic_now()
        cdef HTTPConnection http = self.request.conn
        if http.write_paused and not http.closed:
            conn.hold(True)
            http.drain_hook = self._client_drained

    def _client_drained(self):
        conn = self.conn
        if conn is not None and not self.done:
            conn.hold(False)

    cdef _end_stream(self, bytes last):
        cdef Request request = self.request
        request.on_lost = None
        request.conn.end_stream(request, last)
        self._finish(_time())

    cdef _fail_stream(self, error):
        """After the first byte: no silent retry; the client is told in-band and the stream ends."""
        rec = self.rec
        node = self.node
        if not error.reused:
            self.gateway.registry.record_failure(node, str(error))
        rec.status = 502
        rec.error_type = "upstream_error"
        cdef Request request = self.request
        cdef bytes event = b""
        if self.hasher is not None and not request.disconnected:
            event = b"data: " + error_body(f"the node failed mid-stream: {error}", "server_error", "upstream_error")
            event += b"\n\n"
        self._release_node(self.conn)
        self._end_stream(event)

    # -- endings --------------------------------------------------------------------------------
    cdef _release_node(self, UpstreamConnection conn):
        """Give the connection and the slot back (once)."""
        if conn is not None:
            conn.listener = None
            conn.finish()
        self.conn = None
        self.path._release(self.index, self.route, self.rec.tenant, _monotonic_now() - self.started)

    cdef _finish(self, now):
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
        self.path._done(rec)

    def client_lost(self):
        """The client disconnected: stop the node (closing its connection stops the generation),
        free the slot, log 499 (a started stream with the usage seen so far)."""
        if self.done:
            return
        cdef UpstreamConnection conn = self.conn
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
        self.path._release(self.index, self.route, rec.tenant, _monotonic_now() - self.started)
        self._finish(_time())

    cdef _hand_over(self, error):
        """Let the general path finish: retry after ``error``, or relay a long answer (None)."""
        self.done = True
        cdef UpstreamConnection conn = self.conn
        if conn is not None:
            conn.listener = None
            if error is not None:
                conn.finish()  # pooled again if the node answered cleanly (a 5xx), else closed
                self.conn = None
        self.request.on_lost = None
        self.gateway.resume(self, error)

    cdef _fail_internal(self):
        cdef UpstreamConnection conn = self.conn
        if conn is not None:
            conn.listener = None
            conn.close()
        self.conn = None
        rec = self.rec
        rec.status = 500
        rec.error_type = "internal_error"
        cdef Request request = self.request
        request.on_lost = None
        if not request.response_started and not request.disconnected:
            internal = _ShardonError("internal error")
            request.response_bytes(500, internal.headers(), internal.body())
        elif request.response_started and not request.response_done:
            request.conn.end_stream(request)
        self.path._release(self.index, self.route, rec.tenant, -1.0)
        self.done = True
        rec.finished_at = _time()
        self.path._done(rec)
