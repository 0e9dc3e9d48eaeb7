"""Keep-alive HTTP/1.1 connections to the nodes, parsed with httptools.

One :class:`NodePool` per node holds idle connections (LIFO, so the warmest is reused first). A
:class:`UpstreamConnection` is an ``asyncio.Protocol``: bytes from the node are fed to httptools as
they arrive and the de-chunked body is queued for the caller, who drains it with :meth:`read`. When
the caller falls behind, reading from the node pauses at a high-water mark and resumes once drained
(the same flow control as uvicorn's ``flow_control.py``), so a slow client cannot make Shardon buffer
a whole generation.

Timeouts cost nothing per request: a sweeper wakes once per ``_SWEEP_S`` and fails any connection
that has waited on its node longer than the read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import httptools

from .base import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_SWEEP_S = 0.5


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_error",
        "_got_bytes",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_loop",
        "_paused",
        "_waiter",
        "closed",
        "in_use",
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
        self.wait_started = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._got_bytes = False

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if not self.in_use:
            # Bytes nobody asked for: the connection is out of sync; never reuse it.
            self.close()
            return
        self._got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"bad response from node: {exc}", before_first_byte=False))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.in_use and not self._complete:
            self._fail(
                UpstreamError(
                    "node closed the connection" + (f": {exc}" if exc else ""),
                    before_first_byte=not self._got_bytes,
                    reused=self.reused and not self._got_bytes,
                )
            )
        self.pool._forget(self)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- caller side ------------------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(error)

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        self.wait_started = time.monotonic()
        try:
            await waiter
        finally:
            self.wait_started = 0.0

    def send(self, head: bytes, body: bytes = b"") -> None:
        """Write one request; the body is written as given, not copied into the head."""
        self._reset()
        self.in_use = True
        assert self.transport is not None
        if len(body) > 16384:
            self.transport.writelines((head, body))  # large bodies are not copied
        else:
            self.transport.write(head + body)  # one small copy beats a vectored write

    async def response_head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.status, self._headers

    @property
    def complete(self) -> bool:
        """The whole response has arrived (what :meth:`read` returns next is all that is left)."""
        return self._complete

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; ``b""`` once the response is complete."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def timed_out(self, now: float, limit: float) -> bool:
        if self.wait_started and now - self.wait_started > limit:
            self._fail(
                UpstreamTimeout(
                    f"node sent nothing for {limit:g}s",
                    before_first_byte=not self._got_bytes,
                )
            )
            return True
        return False

    def finish(self) -> None:
        """Give the connection back: pooled if the response completed cleanly, else closed."""
        self.in_use = False
        if self._complete and self._keep_alive and not self.closed and self._error is None:
            self.reused = True
            self.pool._put_idle(self)
        else:
            self.close()
        self._error = None  # break the error → traceback → frame → connection cycle

    def close(self) -> None:
        if self.in_use and not self._complete:
            # Wake a reader still waiting on this response: it must not hang on a dead connection.
            self._fail(UpstreamError("connection closed by shardon", before_first_byte=not self._got_bytes))
        self.in_use = False
        if self.transport is not None and not self.closed:
            self.closed = True
            # abort(), not close(): no point flushing a request the node should stop working on.
            self.transport.abort()
        self.pool._forget(self)


class NodePool:
    """Idle keep-alive connections to one node."""

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
                _, conn = await self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port)
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


class Sweeper:
    """Fails connections that waited on their node longer than the read timeout."""

    def __init__(self, pools: list[NodePool], read_timeout: float) -> None:
        self.pools = pools
        self.read_timeout = read_timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for pool in self.pools:
                pool.sweep(now, self.read_timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
