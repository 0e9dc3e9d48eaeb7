"""Conformance of the upstream connection: UpstreamConnection, NodePool, client_headers.

Every test runs against both implementations (the ``wire`` fixture: ``shardon.upstream._connection_c``,
skipped with the reason only when it cannot be imported, and ``_connection_py``), talking to
`Node`, a scripted HTTP/1.1 server written here on raw asyncio streams: each request it reads is
recorded and answered by the next action of its script, byte for byte. Each test runs on a fresh
uvloop, bounded by ``SCENARIO_TIMEOUT``. The expected behaviour is the one
``shardon/upstream/_connection_py.py`` specifies in its module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from shardon.upstream.base import UpstreamConnectError, UpstreamError, UpstreamProtocolError, UpstreamTimeout
from tests import support
from tests.support import twin, until

SCENARIO_TIMEOUT = 10.0
HIGH_WATER = 256 * 1024  # the connection's read high-water mark (``_HIGH_WATER``)


@pytest.fixture
def wire(implementation: str) -> ModuleType:
    """One implementation of the upstream connection (the compiled one runs under SHARDON_NO_EXTENSIONS too)."""
    return twin("shardon.upstream._connection", implementation)


on_uvloop = support.on_uvloop(SCENARIO_TIMEOUT)


# ---------------------------------------------------------------------------------------------- the node


CLOSE = "close"  # close the connection without answering
HANG = "hang"  # never answer; wait for the client to go away

Write = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Action = bytes | str | Write


def pieces(*parts: bytes, pause: float = 0.03) -> Write:
    """An action writing ``parts`` one at a time, ``pause`` apart."""

    async def write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()

    return write


def then_hang(data: bytes) -> Write:
    """An action writing ``data``, then nothing more until the client leaves."""

    async def write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()
        await reader.read()
        raise ConnectionError("the client left")

    return write


def response(body: bytes = b"ok", *, status: str = "200 OK", headers: tuple[bytes, ...] = ()) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n\r\n%s" % (status.encode(), extra, len(body), body)


class Node:
    """A scripted HTTP/1.1 node: each request read is recorded and gets the next action of ``script``."""

    def __init__(self, *script: Action) -> None:
        self.script: deque[Action] = deque(script)
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.connections = 0
        self.gone = 0  # connections that ended
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> Node:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.requests.append((head, body))
                action = self.script.popleft()
                if action == CLOSE:
                    return
                if action == HANG:
                    await reader.read()
                    return
                if isinstance(action, bytes):
                    writer.write(action)
                    await writer.drain()
                else:
                    assert callable(action)
                    await action(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return
        finally:
            self.gone += 1
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            self._tasks.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()


@contextlib.asynccontextmanager
async def node_and_pool(wire: ModuleType, *script: Action, max_idle: int = 4) -> AsyncIterator[tuple[Node, Any]]:
    node = await Node(*script).start()
    pool = wire.NodePool(
        "127.0.0.1", node.port, loop=asyncio.get_running_loop(), connect_timeout=2.0, max_idle=max_idle
    )
    try:
        yield node, pool
    finally:
        pool.close()
        await asyncio.sleep(0)  # let the aborted transports go
        await node.stop()


def request_head(path: str = "/v1/chat/completions", length: int = 0) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: node\r\nContent-Length: %d\r\n\r\n" % (path.encode(), length)


async def read_all(conn: Any) -> bytes:
    parts = []
    while data := await conn.read():
        parts.append(data)
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------- requests


@on_uvloop
async def test_request_and_response_via_response_head_and_read(wire: ModuleType) -> None:
    big = bytes(range(256)) * 100  # 25 600 bytes: over the 16 KiB large-write threshold
    answer = response(b'{"ok": true}', headers=(b"Content-Type: application/json", b"X-Node: a"))
    async with node_and_pool(wire, answer, response(b"second")) as (node, pool):
        conn = await pool.acquire()
        assert isinstance(conn, wire.UpstreamConnection)
        assert pool.busy_count == 1
        conn.send(request_head(length=2), b"{}")
        status, headers = await conn.response_head()
        assert status == 200
        assert headers == [(b"Content-Type", b"application/json"), (b"X-Node", b"a")]
        assert conn.headers is headers
        assert await read_all(conn) == b'{"ok": true}'
        assert conn.complete
        assert await conn.read() == b""  # still b"" once complete
        assert node.requests == [(request_head(length=2), b"{}")]
        conn.finish()
        conn = await pool.acquire()
        conn.send(request_head(length=len(big)), big)  # head and body written separately
        assert (await conn.response_head())[0] == 200
        assert await read_all(conn) == b"second"
        assert node.requests[1] == (request_head(length=len(big)), big)
        assert node.connections == 1


@on_uvloop
async def test_response_via_wait_and_take(wire: ModuleType) -> None:
    answer = pieces(b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n", b"\r\n01234", b"56789")
    async with node_and_pool(wire, answer) as (_, pool):
        conn = await pool.acquire()
        assert conn.take() == b""
        conn.send(request_head())
        received = []
        while not conn.complete:
            await conn.wait()
            received.append(conn.take())
        assert (conn.status, conn.headers_done) == (201, True)
        assert b"".join(received) == b"0123456789"
        assert len([r for r in received if r]) >= 2  # the body came in more than one read
        assert conn.take() == b""
        assert conn.buffered == 0


@on_uvloop
async def test_framing_headers_are_not_kept(wire: ModuleType) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nDate: Wed, 02 Dec 2026 00:00:00 GMT\r\nServer: llama.cpp\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Type: text/event-stream\r\n"
        b"X-Request-Id: abc\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nCONTENT-LENGTH: 2\r\n\r\nhi"
    )
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Other: 1\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    async with node_and_pool(wire, answer, chunked) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        _, headers = await conn.response_head()
        # (the node's own X-Request-Id is not kept either: Shardon sets its own)
        assert headers == [
            (b"Content-Type", b"text/event-stream"),
            (b"Set-Cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
        ]
        assert await read_all(conn) == b"hi"
        conn.finish()
        conn = await pool.acquire()
        conn.send(request_head())
        assert (await conn.response_head())[1] == [(b"X-Other", b"1")]  # reset for each request
        assert await read_all(conn) == b"hi"


@on_uvloop
async def test_chunked_response_is_dechunked(wire: ModuleType) -> None:
    events = [b'data: {"n": %d}\n\n' % i for i in range(5)]
    parts = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"]
    parts += [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    parts.append(b"0\r\n\r\n")
    async with node_and_pool(wire, pieces(*parts, pause=0.01)) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        _, headers = await conn.response_head()
        assert headers == [(b"Content-Type", b"text/event-stream")]
        assert await read_all(conn) == b"".join(events)
        assert conn.complete
        conn.finish()
        assert pool.idle_count == 1


# ---------------------------------------------------------------------------------------------- the pool


@on_uvloop
async def test_finish_pools_a_complete_keep_alive_connection(wire: ModuleType) -> None:
    async with node_and_pool(wire, response(b"1"), response(b"2"), max_idle=4) as (node, pool):
        conn = await pool.acquire()
        assert not conn.reused
        conn.send(request_head())
        assert await read_all(conn) == b"1"
        conn.finish()
        assert (pool.idle_count, pool.busy_count) == (1, 0)
        again = await pool.acquire()
        assert again is conn and again.reused
        assert (pool.idle_count, pool.busy_count) == (0, 1)
        again.send(request_head())
        assert await read_all(again) == b"2"
        again.finish()
        assert pool.idle_count == 1
        assert node.connections == 1


@on_uvloop
async def test_pool_is_lifo_and_keeps_at_most_max_idle(wire: ModuleType) -> None:
    async with node_and_pool(wire, *[response(b"%d" % i) for i in range(3)], max_idle=2) as (node, pool):
        conns = [await pool.connect() for _ in range(3)]
        for conn in conns:
            conn.send(request_head())
            await read_all(conn)
        for conn in conns:
            conn.finish()
        assert pool.idle_count == 2
        assert conns[2].closed  # over max_idle: closed, not kept
        assert pool.take_idle() is conns[1]  # the warmest first
        assert pool.take_idle() is conns[0]
        assert pool.take_idle() is None
        assert node.connections == 3


@pytest.mark.parametrize(
    "answer",
    [
        then_hang(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"),
        response(b"bye", headers=(b"Connection: close",)),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold",
    ],
    ids=["incomplete", "connection-close", "http10"],
)
@on_uvloop
async def test_finish_closes_a_connection_that_cannot_be_reused(wire: ModuleType, answer: Action) -> None:
    async with node_and_pool(wire, answer) as (node, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        await conn.response_head()
        await until(lambda: conn.buffered or conn.complete)
        conn.finish()
        assert conn.closed
        assert (pool.idle_count, pool.busy_count) == (0, 0)
        assert pool.take_idle() is None
        await until(lambda: node.gone == 1)  # the node sees the connection go


@on_uvloop
async def test_idle_connection_closed_by_the_node_is_dropped(wire: ModuleType) -> None:
    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(response(b"once"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with node_and_pool(wire, answer_then_close) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        assert await read_all(conn) == b"once"
        conn.finish()
        assert pool.idle_count == 1
        await until(lambda: conn.closed)
        assert pool.idle_count == 0
        assert pool.take_idle() is None


@on_uvloop
async def test_a_closed_connection_is_freed_without_the_cycle_collector(wire: ModuleType) -> None:
    # As on the client side (tests/httpd): a cycle through the parser would keep every connection
    # a node closed, with its transport, until a full pass of the collector.
    closing = response(b"bye", headers=(b"Connection: close",))

    def alive() -> int:
        return sum(1 for obj in gc.get_objects() if type(obj) is wire.UpstreamConnection)

    gc.collect()
    gc.disable()
    try:
        async with node_and_pool(wire, *[closing] * 10) as (node, pool):
            before = alive()

            async def one() -> None:
                conn = await pool.acquire()
                conn.send(request_head())
                assert await read_all(conn) == b"bye"
                conn.finish()
                await until(lambda: conn.closed)

            for _ in range(10):
                await one()
            await until(lambda: node.gone == 10)
            await until(lambda: alive() == before)  # after the transports' close callbacks; a leak times out
            assert pool.idle_count == 0
    finally:
        gc.enable()


@on_uvloop
async def test_unsolicited_bytes_close_an_idle_connection(wire: ModuleType) -> None:
    async def answer_then_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(response(b"once"))
        await writer.drain()
        await asyncio.sleep(0.05)
        await then_hang(b"HTTP/1.1 200 OK\r\n")(reader, writer)  # bytes nobody asked for

    async with node_and_pool(wire, answer_then_garbage) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        assert await read_all(conn) == b"once"
        conn.finish()
        assert pool.idle_count == 1
        await until(lambda: conn.closed)
        assert pool.idle_count == 0


# ---------------------------------------------------------------------------------------------- flow control


@on_uvloop
async def test_reading_pauses_above_high_water_and_resumes_on_take(wire: ModuleType) -> None:
    body = bytes(range(256)) * (4 * 1024)  # 1 MiB, sent at once
    async with node_and_pool(wire, response(body)) as (node, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        await conn.response_head()
        while conn.buffered <= HIGH_WATER:  # nobody takes: the bytes pile up...
            await conn.wait()
        await asyncio.sleep(0.1)
        held = conn.buffered
        assert not conn.transport.is_reading()  # ...until reading pauses
        await asyncio.sleep(0.05)
        assert conn.buffered == held  # nothing more is read meanwhile
        assert held < 2 * HIGH_WATER + 64 * 1024
        assert not conn.complete
        received = [conn.take()]
        assert conn.buffered == 0
        assert conn.transport.is_reading()  # take() resumed it
        received.append(await read_all(conn))
        assert b"".join(received) == body
        conn.finish()
        assert pool.idle_count == 1
        assert node.connections == 1


# ---------------------------------------------------------------------------------------------- failures


@on_uvloop
async def test_node_closing_before_answering(wire: ModuleType) -> None:
    async with node_and_pool(wire, CLOSE) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        with pytest.raises(UpstreamError) as info:
            await conn.response_head()
        assert type(info.value) is UpstreamError
        assert info.value.before_first_byte is True
        assert info.value.reused is False
        assert conn.closed
        assert pool.busy_count == 0
        with pytest.raises(UpstreamError):  # every later wait fails at once too
            await conn.wait()
        conn.finish()
        assert pool.idle_count == 0


@on_uvloop
async def test_node_closing_a_reused_connection(wire: ModuleType) -> None:
    async with node_and_pool(wire, response(b"first"), CLOSE) as (node, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        assert await read_all(conn) == b"first"
        conn.finish()
        conn = await pool.acquire()
        assert conn.reused
        conn.send(request_head())
        with pytest.raises(UpstreamError) as info:
            await conn.response_head()
        assert (info.value.before_first_byte, info.value.reused) == (True, True)
        conn.finish()
        assert (pool.idle_count, pool.busy_count) == (0, 0)
        assert len(node.requests) == 2


@on_uvloop
async def test_node_closing_mid_body(wire: ModuleType) -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    async with node_and_pool(wire, response(b"first"), half) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        await read_all(conn)
        conn.finish()
        conn = await pool.acquire()
        conn.send(request_head())
        assert (await conn.response_head())[0] == 200
        with pytest.raises(UpstreamError) as info:
            await read_all(conn)
        assert (info.value.before_first_byte, info.value.reused) == (False, False)


@on_uvloop
async def test_bad_response_is_a_protocol_error(wire: ModuleType) -> None:
    async with node_and_pool(wire, then_hang(b"SPDY/9 what\r\n\r\n")) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        with pytest.raises(UpstreamProtocolError) as info:
            await conn.response_head()
        assert info.value.before_first_byte is False
        assert conn.closed
        assert pool.busy_count == 0


@on_uvloop
async def test_connect_failure(wire: ModuleType) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens there once closed
    pool = wire.NodePool("127.0.0.1", port, loop=asyncio.get_running_loop(), connect_timeout=2.0, max_idle=1)
    with pytest.raises(UpstreamConnectError) as info:
        await pool.acquire()
    assert info.value.before_first_byte is True
    assert f"127.0.0.1:{port}" in str(info.value)
    assert pool.busy_count == 0


@on_uvloop
async def test_timed_out_fails_the_waiter(wire: ModuleType) -> None:
    async with node_and_pool(wire, HANG, then_hang(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")) as (_, pool):
        conn = await pool.acquire()
        assert not conn.timed_out(time.monotonic() + 100, 1.0)  # not waiting: never timed out
        conn.send(request_head())
        waiter = conn.wait()
        assert not conn.timed_out(time.monotonic(), 10.0)
        assert conn.timed_out(time.monotonic() + 5, 1.0)
        with pytest.raises(UpstreamTimeout) as info:
            await waiter
        assert info.value.before_first_byte is True
        conn.close()
        # The pool's sweep does the same for every busy connection, and closes it; here some of
        # the response had arrived.
        other = await pool.acquire()
        other.send(request_head())
        await other.response_head()
        waiter = other.wait()
        pool.sweep(time.monotonic() + 5, 1.0)
        with pytest.raises(UpstreamTimeout) as info:
            await waiter
        assert info.value.before_first_byte is False
        assert other.closed
        assert (pool.busy_count, pool.idle_count) == (0, 0)


@on_uvloop
async def test_close_wakes_a_waiting_reader(wire: ModuleType) -> None:
    async with node_and_pool(wire, HANG) as (_, pool):
        conn = await pool.acquire()
        conn.send(request_head())
        reader = asyncio.ensure_future(conn.response_head())
        await asyncio.sleep(0.02)
        conn.close()
        with pytest.raises(UpstreamError) as info:
            await asyncio.wait_for(reader, 2)
        assert info.value.before_first_byte is True
        assert conn.closed
        assert pool.busy_count == 0


# ---------------------------------------------------------------------------------------------- the callback path


class Listener:
    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[tuple[bool, bool, int, Any]] = []

    def upstream_event(self) -> None:
        conn = self.conn
        self.events.append((conn.headers_done, conn.complete, conn.buffered, conn.error))


@on_uvloop
async def test_listener_is_told_instead_of_a_waiter(wire: ModuleType) -> None:
    answer = pieces(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n", b"abc", b"def")
    async with node_and_pool(wire, answer, CLOSE) as (_, pool):
        conn = await pool.acquire()
        listener = conn.listener = Listener(conn)
        conn.send(request_head())
        await until(lambda: listener.events and listener.events[-1][1])
        assert len(listener.events) == 3  # one call per read
        assert listener.events[0] == (True, False, 0, None)
        assert listener.events[-1] == (True, True, 6, None)
        assert conn.take() == b"abcdef"
        conn.listener = None
        conn.finish()
        # A failure is told to the listener too, with the connection's error set.
        conn = await pool.acquire()
        listener = conn.listener = Listener(conn)
        conn.send(request_head())
        await until(lambda: listener.events)
        error = listener.events[-1][3]
        assert isinstance(error, UpstreamError)
        assert (error.before_first_byte, error.reused) == (True, True)
        conn.listener = None
        conn.finish()


# ---------------------------------------------------------------------------------------------- client_headers


def test_client_headers(wire: ModuleType) -> None:
    upstream = [(b"Content-Type", b"application/json"), (b"X-Caf\xe9", b"\xe9t\xe9"), (b"set-cookie", b"a=1")]
    expected = [("content-type", "application/json"), ("x-caf\xe9", "\xe9t\xe9"), ("set-cookie", "a=1")]
    first = wire.client_headers(upstream)
    assert first == expected
    assert all(type(name) is str and type(value) is str for name, value in first)
    first.append(("x-request-id", "1"))  # the gateway appends its own headers to what it gets
    second = wire.client_headers(list(upstream))
    assert second == expected
    assert second is not first
    assert wire.client_headers([]) == []
    assert upstream == [(b"Content-Type", b"application/json"), (b"X-Caf\xe9", b"\xe9t\xe9"), (b"set-cookie", b"a=1")]
