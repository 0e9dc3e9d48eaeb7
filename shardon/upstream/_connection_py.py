"""Keep-alive HTTP/1.1 connections to the nodes. This module is also the source of its compiled twin
(``_connection_c``, typed by ``_connection_c.pxd``); ``shardon.upstream.connection`` picks one.

`NodePool` keeps one node's idle keep-alive connections (LIFO: the warmest is reused first).
`UpstreamConnection` is the asyncio protocol of one, one request at a time: a request is `send`;
the response's bytes are parsed by httptools as they arrive and its de-chunked body handed over
with `take`. The caller either awaits `wait()` (a future resolved once per read, raising the
connection's `UpstreamError`) or sets a ``listener``, whose ``upstream_event()`` is called
instead. When the caller falls behind, reading pauses above
``_HIGH_WATER`` buffered bytes and resumes on `take` (the flow control of uvicorn's
``flow_control.py``), so a slow client cannot make Shardon buffer a whole generation. ``headers``
keeps the response's end-to-end headers only; `client_headers` and `client_header_lines` give
them as the client gets them.

Timeouts cost nothing per request: `NodePool.sweep`, run by the registry twice a second, fails
any connection that has waited on its node longer than the read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import httptools

from .base import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout

__all__ = ["NodePool", "UpstreamConnection", "client_header_lines", "client_headers"]

_LARGE_WRITE = 16 * 1024  # above this, write head and body separately rather than copy them together
# Headers of a node's response the client does not get: hop-by-hop and framing ones (the
# connection's business), and the two Shardon sets itself (a node's own request id included).
_FRAMING = frozenset(
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
_HIGH_WATER = 256 * 1024
_monotonic = time.monotonic


class UpstreamConnection:
    """One keep-alive connection to a node, one request at a time (see the module docstring): an
    asyncio protocol."""

    __slots__ = (
        "_feed",
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
        self._feed: Any = self.parser.feed_data  # bound once: it runs per read
        self.closed = False
        self.in_use = False
        self.reused = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._held = False
        self.listener: Any = None  # an object with upstream_event(), told instead of wait()
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
            self._feed(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"bad response from node: {exc}", before_first_byte=False))
            self.close()
            return
        self._tell(None)  # one wake-up per read, however many parser events it produced

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
        # The parser holds this object's callbacks: a cycle the collector's rare full passes would free.
        self.parser = self._feed = None  # type: ignore[assignment]

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
        self._tell(error)

    def _tell(self, error: UpstreamError | None) -> None:
        """Tell the caller that more arrived or (``error``) the request failed: its listener, or the
        future it awaits."""
        listener = self.listener
        if listener is not None:
            listener.upstream_event()
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self.wait_started = 0.0
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    def wait(self) -> asyncio.Future[None]:
        """A future resolved when more of the response has arrived (raising if the request failed)."""
        waiter = self._loop.create_future()
        if self.error is not None:
            waiter.set_exception(self.error)
            return waiter
        self._waiter = waiter
        self.wait_started = _monotonic()
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


# A node sends the same headers every time: both forms are built once per set, up to a bound.
_header_lists: dict[tuple[tuple[bytes, bytes], ...], list[tuple[str, str]]] = {}
_header_lines: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}
_CACHED = 1024


def client_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """A node's end-to-end response headers (``UpstreamConnection.headers``) as the client gets
    them: a new list of lower-cased names and values."""
    key = tuple(upstream)
    cached = _header_lists.get(key)
    if cached is None:
        cached = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in upstream]
        if len(_header_lists) < _CACHED:
            _header_lists[key] = cached
    return list(cached)


def client_header_lines(upstream: list[tuple[bytes, bytes]]) -> bytes:
    """`client_headers` as HTTP/1.1 header lines (``name: value\\r\\n`` each), for a writer of bytes."""
    key = tuple(upstream)
    lines = _header_lines.get(key)
    if lines is None:
        lines = b"".join([name.lower() + b": " + value + b"\r\n" for name, value in upstream])
        if len(_header_lines) < _CACHED:
            _header_lines[key] = lines
    return lines


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

    async def acquire(self) -> UpstreamConnection:
        conn = self.take_idle()
        return conn if conn is not None else await self.connect()

    def open(self) -> asyncio.Task[UpstreamConnection]:
        """`connect` started as a task: a future of the new connection; cancel it to give up."""
        return self.loop.create_task(self.connect())

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
                _, conn = await self.loop.create_connection(
                    self.new_connection,  # type: ignore[type-var]  # an asyncio protocol by its methods
                    self.host,
                    self.port,
                )
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
