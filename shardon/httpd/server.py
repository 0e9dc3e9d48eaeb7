"""The native engine's server: `Listener` sockets + one `HTTPConnection` per client.

It has the same two-call surface as granian's embedded server, so ``shardon.server`` drives either:
``await serve()`` listens until ``stop()``; ``stop()`` closes the listener and every connection.

Draining (``begin_drain``): idle keep-alive connections close and every response from then on
carries ``Connection: close``; requests in flight finish normally. The listener stays open until
``stop()``, so a client arriving meanwhile is told why (the gateway answers 503) instead of being
refused.

A once-a-second sweep refreshes the cached ``Date`` header, closes keep-alive connections idle
longer than ``keepalive_timeout_s``, answers 408 to a request head that has taken longer than
``header_timeout_s`` (a slow-loris client cannot hold a connection forever), and hands to the
application a request whose body is still coming after ``_BODY_WAIT_S`` (it was held for
``on_request``, which takes whole requests only). No timer is armed per request.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..listener import Listener, listen
from .connection import HTTPConnection

App = Callable[[Any, Any], Coroutine[Any, Any, None]]

__all__ = ["NativeServer"]

_SWEEP_S = 1.0
# A request whose body is slow to come is held for ``on_request`` at most this long (then up to
# one sweep more) before the application runs and reads the body itself.
_BODY_WAIT_S = 0.5


def _date_header() -> bytes:
    return b"date: " + email.utils.formatdate(time.time(), usegmt=True).encode() + b"\r\n"


class NativeServer:
    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        *,
        backlog: int = 1024,
        max_body: int = 1 << 20,
        keepalive_timeout_s: float = 75.0,
        header_timeout_s: float = 30.0,
        connection_class: Callable[[NativeServer], Any] = HTTPConnection,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.backlog = backlog
        self.max_body = max_body
        self.keepalive_timeout_s = keepalive_timeout_s
        self.header_timeout_s = header_timeout_s
        # One protocol object per client connection (the compiled wire class, or a twin in tests).
        self.connection_class = connection_class
        self.connections: set[Any] = set()
        self.draining = False
        self.date_header = _date_header()
        self.address = f"{host}:{port}"
        # The application's entry for a whole request, if it has one: ``on_request(request)``
        # serves it by callbacks when it returns True; otherwise the RSGI coroutine runs.
        self.on_request: Callable[[Any], bool] | None = getattr(app, "on_request", None)
        self.loop: asyncio.AbstractEventLoop
        self._listeners: list[Listener] = []
        self._stopped: asyncio.Future[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = self.loop.create_future()
        connection_class = self.connection_class
        self._listeners = listen(self.loop, self.host, self.port, self.backlog, lambda: connection_class(self))
        if self.port == 0:
            self.port = self._listeners[0].sock.getsockname()[1]
        # The scope's "server" (one listener: the same for every connection, no syscall each).
        self.address = f"{self.host}:{self.port}"
        self._sweeper = self.loop.call_later(_SWEEP_S, self._sweep)

    async def serve(self) -> None:
        """Listen until `stop` is called."""
        await self.start()
        assert self._stopped is not None
        await self._stopped

    def begin_drain(self) -> None:
        """Idle connections close; responses from now on close their connection."""
        self.draining = True
        for conn in list(self.connections):
            if conn.is_idle():
                conn.close()

    def stop(self) -> None:
        self.draining = True
        for listener in self._listeners:
            listener.close()
        self._close_connections()
        # A client accepted in this pass has its connection_made still queued, to run before this.
        self.loop.call_soon(self._close_connections)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close()

    def _sweep(self) -> None:
        self.date_header = _date_header()
        now = self.loop.time()
        idle_limit = now - self.keepalive_timeout_s
        head_limit = now - self.header_timeout_s
        body_limit = now - _BODY_WAIT_S
        for conn in list(self.connections):
            if conn.head_started and conn.head_started < head_limit:
                conn.reject(408, f"request head not received within {self.header_timeout_s:g}s")
            elif conn.is_idle() and conn.idle_since < idle_limit:
                conn.close()
            else:
                conn.start_stalled(body_limit)
        self._sweeper = self.loop.call_later(_SWEEP_S, self._sweep)
