"""Listening sockets that take every waiting client per wake-up, not one.

Why not ``loop.create_server``: libuv accepts one connection per event-loop pass (by design since
libuv PR #3696, 2022; so does the libuv in uvloop 0.23, checked with strace: one ``accept4`` per
``epoll_pwait``). A gateway's passes are long while it forwards chunks for hundreds of streams
(milliseconds at 500 streams on one core here), so new clients waited in the kernel's queue,
behind chunks, at one per pass, and time to first token grew by tens to hundreds of milliseconds
under a standing load. nginx makes the same choice with ``multi_accept``.

Here the listening socket is watched with ``add_reader``; each time it is readable, up to
``ACCEPT_PER_PASS`` clients are accepted and handed to the loop with ``connect_accepted_socket``
(its transport is open when the call first waits; `Listener._step` then completes it, as a task would).

An accept that fails (out of descriptors, EMFILE and its kin, above all) pauses accepting for
``RETRY_AFTER_S`` instead of spinning on a listener that stays readable, as asyncio's own servers do;
clients meanwhile wait in the kernel's queue.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["ACCEPT_PER_PASS", "Listener", "bind_sockets", "listen"]

log = logging.getLogger("shardon.listener")

# Enough to empty a burst's queue in a few passes, few enough that one pass still reads the
# requests of the clients it has already accepted before taking in hundreds more.
ACCEPT_PER_PASS = 128
RETRY_AFTER_S = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind_sockets(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening, non-blocking sockets for every address ``host`` resolves to, as ``create_server`` binds.

    ``host`` empty or None binds every interface (IPv4 and IPv6). An IPv6 socket is IPv6-only,
    so that ``::`` and ``0.0.0.0`` can both be bound on one port.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen(
    loop: asyncio.AbstractEventLoop, host: str | None, port: int, backlog: int, protocol_factory: Callable[[], Any]
) -> list[Listener]:
    """`bind_sockets`, then a started `Listener` on each socket (what ``create_server`` does)."""
    listeners = [Listener(loop, sock, protocol_factory) for sock in bind_sockets(host, port, backlog)]
    for listener in listeners:
        listener.start()
    return listeners


class Listener:
    """Accepts clients on ``sock`` for ``protocol_factory``, up to `ACCEPT_PER_PASS` per wake-up."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol_factory: Callable[[], Any]
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self._fd = sock.fileno()
        self._retry: asyncio.TimerHandle | None = None
        self.accepted = 0  # clients taken from the kernel's queue so far
        self.closed = False

    def start(self) -> None:
        self.loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self._fd)
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_PER_PASS):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued; take the next
            except OSError as exc:
                # Out of descriptors (or memory), or a listener in a state accept cannot serve: the
                # socket stays readable, so pause instead of spinning, and say why.
                level = logging.WARNING if exc.errno in _OUT_OF_RESOURCES else logging.ERROR
                log.log(level, "cannot accept a client (%s); accepting again in %gs", exc, RETRY_AFTER_S)
                self.loop.remove_reader(self._fd)
                self._retry = self.loop.call_later(RETRY_AFTER_S, self._resume)
                return
            self.accepted += 1
            self._open(client)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            self.start()

    def _open(self, client: socket.socket) -> None:
        self._step(self.loop.connect_accepted_socket(self.protocol_factory, client))

    def _step(self, opening: Coroutine[Any, Any, Any], _: object = None) -> None:
        """Run ``opening`` on to its next suspension, as a task would, without a task per client.

        ``connect_accepted_socket`` opens the transport before it first waits (for
        ``connection_made``), so the client is served from this pass on; what follows only
        returns the pair. A task per client cost a sixth of a short connection: 8.2k against 10k
        connections a second here (wrk, ``Connection: close``).
        """
        try:
            waiting = opening.send(None)
        except StopIteration:
            return
        except Exception as exc:  # the client was gone before its transport opened; nothing was read
            log.debug("client dropped while opening: %r", exc)
            return
        if waiting is None:  # a bare yield (``asyncio.sleep(0)``): go on at the next pass
            self.loop.call_soon(self._step, opening)
        else:
            waiting.add_done_callback(functools.partial(self._step, opening))
