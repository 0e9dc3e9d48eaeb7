# cython: language_level=3
"""Keep-alive connections to the nodes, compiled: the same objects and behaviour as
``_connection_py.py`` (read its docstring); the field and method declarations are in the ``.pxd``.

They run for every request (httptools calls ``on_header``/``on_body``/... per response, uvloop
``data_received`` per read). Differences from the twin are only of form: typed fields, ``cdef``
calls between the objects, the clock read without a call.
"""

cimport cython
from cpython.list cimport PyList_Append, PyList_GET_SIZE
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import asyncio
import contextlib
import sys
import time
from collections import deque

import httptools

from shardon.upstream.base import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout

__all__ = ["NodePool", "UpstreamConnection", "client_header_lines", "client_headers"]

cdef:
    Py_ssize_t _LARGE_WRITE = 16 * 1024
    Py_ssize_t _HIGH_WATER = 256 * 1024
    # (the twin says why)
    frozenset _FRAMING = frozenset(
        {
            b"connection",
            b"keep-alive",
            b"transfer-encoding",
            b"content-length",
            b"date",
            b"server",
            b"x-request-id",
            b"x-shardon-node",
        }
    )
    object _HttpParserError = httptools.HttpParserError
    # A node sends the same headers every time: both forms are built once per set, up to a bound.
    dict _header_lists = {}
    dict _header_lines = {}
    Py_ssize_t _CACHED = 1024


# CPython's time.monotonic() reads CLOCK_MONOTONIC on Linux; elsewhere (macOS: mach time) it is
# another clock, and the values are compared with the Python side's, so it is called there.
cdef bint _CLOCK_IS_PYTHONS = sys.platform.startswith("linux")
cdef object _monotonic = time.monotonic


cdef inline double _monotonic_now() except? -1.0:
    """``time.monotonic()``, without a call and a float where the clock is the same."""
    cdef timespec ts
    if not _CLOCK_IS_PYTHONS:
        return _monotonic()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cpdef list client_headers(list upstream):
    """A node's end-to-end response headers as the client gets them (a new list)."""
    cdef tuple key = tuple(upstream)
    cdef object cached = _header_lists.get(key)
    if cached is None:
        cached = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in upstream]
        if len(_header_lists) < _CACHED:
            _header_lists[key] = cached
    return list(cached)


cpdef bytes client_header_lines(list upstream):
    """`client_headers` as HTTP/1.1 header lines (``name: value\\r\\n`` each), for a writer of bytes."""
    cdef tuple key = tuple(upstream)
    cdef object lines = _header_lines.get(key)
    if lines is None:
        lines = b"".join([name.lower() + b": " + value + b"\r\n" for name, value in upstream])
        if len(_header_lines) < _CACHED:
            _header_lines[key] = lines
    return <bytes>lines


cdef class UpstreamConnection:
    """One keep-alive connection to a node, one request at a time."""

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

    cdef void _reset(self):
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


cdef class NodePool:
    """Idle keep-alive connections to one node."""

    def __init__(self, str host, int port, *, loop, double connect_timeout, int max_idle):
        self.host = host
        self.port = port
        self.loop = loop
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle = deque()
        self._busy = set()

    async def acquire(self):
        conn = self.take_idle()
        return conn if conn is not None else await self.connect()

    def open(self):
        """`connect` started as a task: a future of the new connection; cancel it to give up."""
        return self.loop.create_task(self.connect())

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
