"""Listening sockets (shardon/listener.py), of the native engine and the mock node: batches, pauses.

Each test runs on a fresh uvloop (the loop the gateway runs on), bounded in time; sockets are on
127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Sequence
from typing import Any

import pytest

from shardon import listener as listener_module
from shardon.listener import ACCEPT_PER_PASS, Listener, bind_sockets
from tests import support
from tests.support import until

TIMEOUT_S = 10.0


on_uvloop = support.on_uvloop(TIMEOUT_S)


class Echo(asyncio.Protocol):
    """Answers each read with the same bytes; counts connections in ``made``."""

    def __init__(self, made: list[Echo]) -> None:
        self.made = made
        self.transport: asyncio.Transport | None = None
        made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def close_all(listener: Listener, made: list[Echo], clients: Sequence[socket.socket] = ()) -> None:
    """The end of a test: its clients, the listener, then the transports it opened."""
    for client in clients:
        client.close()
    listener.close()
    for proto in made:
        if proto.transport is not None:
            proto.transport.close()
    await asyncio.sleep(0)  # the transports' close callbacks


def queued_clients(port: int, count: int) -> list[socket.socket]:
    """``count`` connected clients (the kernel completes the handshake; nobody has accepted yet)."""
    clients = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        clients.append(sock)
    return clients


@on_uvloop
async def test_one_wake_up_takes_every_queued_client_up_to_the_batch() -> None:
    # libuv's own listener would take one of these per loop pass; this one takes a batch per wake-up.
    loop = asyncio.get_running_loop()
    (sock,) = bind_sockets("127.0.0.1", 0, backlog=1024)
    made: list[Echo] = []
    listener = Listener(loop, sock, lambda: Echo(made))
    clients = queued_clients(sock.getsockname()[1], ACCEPT_PER_PASS + 20)
    try:
        listener._accept()  # what one readiness event runs
        assert listener.accepted == ACCEPT_PER_PASS
        listener._accept()
        assert listener.accepted == ACCEPT_PER_PASS + 20
        listener._accept()  # nothing queued: returns at once (EAGAIN), takes nothing
        assert listener.accepted == ACCEPT_PER_PASS + 20
        await until(lambda: len(made) == ACCEPT_PER_PASS + 20)
        await until(lambda: all(proto.transport is not None for proto in made))
        last = clients[-1]
        last.setblocking(False)
        await loop.sock_sendall(last, b"ping")
        assert await loop.sock_recv(last, 4) == b"ping"  # the last one taken is served
    finally:
        await close_all(listener, made, clients)


@on_uvloop
async def test_started_listener_serves_clients_and_close_refuses_new_ones() -> None:
    loop = asyncio.get_running_loop()
    (sock,) = bind_sockets("127.0.0.1", 0, backlog=16)
    port = sock.getsockname()[1]
    made: list[Echo] = []
    listener = Listener(loop, sock, lambda: Echo(made))
    listener.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        listener.close()
        listener.close()  # twice is harmless
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await close_all(listener, made)


class FailingSocket:
    """A listening socket whose accept raises ``error`` ``times`` times, then defers to ``real``."""

    def __init__(self, real: socket.socket, error: OSError, times: int) -> None:
        self.real, self.error, self.times = real, error, times
        self.calls = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.times:
            self.times -= 1
            raise self.error
        return self.real.accept()

    def close(self) -> None:
        self.real.close()


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.EINVAL])
@on_uvloop
async def test_a_failing_accept_pauses_then_resumes(
    code: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(listener_module, "RETRY_AFTER_S", 0.05)
    loop = asyncio.get_running_loop()
    (real,) = bind_sockets("127.0.0.1", 0, backlog=16)
    failing = FailingSocket(real, OSError(code, "no"), times=1)
    made: list[Echo] = []
    listener = Listener(loop, failing, lambda: Echo(made))  # type: ignore[arg-type]
    listener.start()
    clients = queued_clients(real.getsockname()[1], 2)
    try:
        with caplog.at_level(logging.WARNING, logger="shardon.listener"):
            await asyncio.sleep(0.02)
            # The failure paused accepting: one call, not a spin on a socket that stays readable.
            assert failing.calls == 1
            assert made == []
            assert "cannot accept a client" in caplog.text
            await until(lambda: len(made) == 2)  # accepting resumed after RETRY_AFTER_S
    finally:
        await close_all(listener, made, clients)


@on_uvloop
async def test_an_aborted_client_is_skipped() -> None:
    loop = asyncio.get_running_loop()
    (real,) = bind_sockets("127.0.0.1", 0, backlog=16)
    failing = FailingSocket(real, ConnectionAbortedError(errno.ECONNABORTED, "gone"), times=1)
    made: list[Echo] = []
    listener = Listener(loop, failing, lambda: Echo(made))  # type: ignore[arg-type]
    clients = queued_clients(real.getsockname()[1], 1)
    try:
        listener._accept()
        assert listener.accepted == 1  # the next client was taken in the same wake-up
        await until(lambda: len(made) == 1)
    finally:
        await close_all(listener, made, clients)


def test_bind_sockets_binds_every_address_and_refuses_a_taken_port() -> None:
    (sock,) = bind_sockets("127.0.0.1", 0, backlog=8)
    try:
        assert sock.getblocking() is False
        port = sock.getsockname()[1]
        with pytest.raises(OSError) as info:
            bind_sockets("127.0.0.1", port, backlog=8)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        sock.close()
    if socket.has_ipv6:
        try:
            sockets = bind_sockets("::1", 0, backlog=8)
        except OSError:
            pytest.skip("no IPv6 loopback here")
        try:
            assert [s.family for s in sockets] == [socket.AF_INET6]
            assert sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        finally:
            for s in sockets:
                s.close()


@on_uvloop
async def test_the_native_server_takes_a_queue_of_clients_in_a_few_loop_passes() -> None:
    # On loop.create_server (libuv) each pass takes one client, so 10 passes would hold 10 at most.
    from shardon.httpd import NativeServer

    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(200, [], b"ok")

    server = NativeServer(app, "127.0.0.1", 0)
    await server.start()
    clients = queued_clients(server.port, ACCEPT_PER_PASS + 50)  # the loop is not running meanwhile
    try:
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(server.connections) >= ACCEPT_PER_PASS
        await until(lambda: len(server.connections) == len(clients))
    finally:
        for client in clients:
            client.close()
        server.stop()
        await until(lambda: not server.connections)


@on_uvloop
async def test_opening_is_run_to_its_end_across_bare_yields_and_futures(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    (sock,) = bind_sockets("127.0.0.1", 0, backlog=4)
    listener = Listener(loop, sock, lambda: None)
    waited: asyncio.Future[str] = loop.create_future()
    steps: list[str] = []

    async def opening() -> None:
        steps.append("opened")
        await asyncio.sleep(0)  # a bare yield
        steps.append(await waited)

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ConnectionResetError("gone before connection_made")

    try:
        listener._step(opening())
        assert steps == ["opened"]  # run at once up to its first suspension
        await asyncio.sleep(0.01)
        waited.set_result("connected")
        await until(lambda: steps == ["opened", "connected"])
        with caplog.at_level(logging.DEBUG, logger="shardon.listener"):
            listener._step(failing())
            await until(lambda: "client dropped while opening" in caplog.text)
    finally:
        listener.close()
