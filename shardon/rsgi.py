"""The RSGI side: the contract the gateway is written against, and the exchange's coroutine driver.

The structural types are what `app.py` and `admin.py` call, met by granian's ``rsgi`` objects and by
the native engine's `Request`. `serve` drives an `Exchange` (`shardon.exchange`) for an RSGI
engine: the same steps the native engine runs from its callbacks, awaited only where one waits (the
body, admission, a new connection, the node's bytes, a client slower than the node).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, Protocol

from .exchange import ANSWER, END, RETRY, START, START_END, WAIT, Exchange, RequestCore
from .upstream.base import UpstreamError

__all__ = ["HTTPProtocol", "Headers", "Scope", "StreamTransport", "serve"]


class Headers(Protocol):
    def get(self, key: str, default: str | None = None) -> str | None: ...


class Scope(Protocol):
    @property
    def proto(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query_string(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def headers(self) -> Headers: ...


class StreamTransport(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...
    async def send_str(self, data: str) -> None: ...


class HTTPProtocol(Protocol):
    def __call__(self) -> Awaitable[bytes]: ...
    def client_disconnect(self) -> Awaitable[None]: ...
    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...
    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None: ...
    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport: ...


async def serve(core: RequestCore, scope: Scope, proto: HTTPProtocol, watch_after_s: float) -> None:
    """Serve one exchange request. The client's leaving is watched once the body is in: at once,
    or (an engine whose notice costs a task) after ``watch_after_s``, so short requests never pay
    for it while generations are still cut."""
    ex = Exchange(core, scope.path, core.client_of(scope))
    watcher = _Watcher(ex, proto, watch_after_s)
    try:
        headers = scope.headers
        ex.authorize(headers)
        ex.announced(headers)
        body = await proto()
        ex.prepare(headers, body)
        watcher.start()
        await _forward(ex, proto)
    except BaseException as exc:
        answer = ex.error_answer(exc)
        if answer is not None:
            with contextlib.suppress(RuntimeError):  # (a response already started)
                proto.response_bytes(*answer)
        if isinstance(exc, asyncio.CancelledError):
            raise
    finally:
        watcher.stop()
        ex.finish()


async def _forward(ex: Exchange, proto: HTTPProtocol) -> None:
    """Admission, the node, the response: retried from admission when the node fails early."""
    transport: Any = None
    try:
        while True:
            wait = ex.admit()
            while wait is not None:
                await _settled(wait)
                wait = ex.admit()
            conn = ex.target()
            if conn is None:
                await _settled(ex.wait)
                try:
                    conn = ex.connected()
                except UpstreamError as error:
                    ex.failed(error)  # RETRY, or raises
                    continue
            ex.send(conn)
            while True:
                action = ex.respond()
                if action == RETRY:
                    break
                if action == ANSWER:
                    proto.response_bytes(ex.out_status, ex.headers(), ex.out_data)
                    return
                if action in (START, START_END):
                    transport = proto.response_stream(ex.out_status, ex.headers())
                if action != WAIT and ex.out_data:
                    await transport.send_bytes(ex.out_data)
                if action in (END, START_END):
                    return
                # WAIT: nothing to do until the node sends more (a whole answer's first part may be
                # in ``chunks`` already). After a send: more may have come meanwhile.
                if action == WAIT or not (conn.chunks or conn.complete or conn.error is not None):
                    with contextlib.suppress(UpstreamError):  # (kept on the connection: respond sees it)
                        await conn.wait()
    finally:
        # A raised error's traceback keeps this frame alive; it must not keep the client's stream
        # open (granian ends a streamed response when its transport is released).
        del transport


async def _settled(wait: asyncio.Future[Any]) -> None:
    """Until ``wait`` is done, however it ends (the exchange reads its outcome)."""
    if not wait.done():
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def settle(_: object) -> None:
            if not done.done():
                done.set_result(None)

        wait.add_done_callback(settle)
        await done


class _Watcher:
    """Tells the exchange when its client disconnects (``proto.client_disconnect()``)."""

    __slots__ = ("delay", "ex", "proto", "timer", "waiter")

    def __init__(self, ex: Exchange, proto: HTTPProtocol, delay: float) -> None:
        self.ex = ex
        self.proto = proto
        self.delay = delay
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[Any] | None = None

    def start(self) -> None:
        if self.delay:
            self.timer = asyncio.get_running_loop().call_later(self.delay, self.watch)
        else:
            self.watch()

    def watch(self) -> None:
        self.timer = None
        waiter = self.proto.client_disconnect()
        if not isinstance(waiter, asyncio.Future):
            waiter = asyncio.ensure_future(waiter)  # granian's is an awaitable: run it as a task
        self.waiter = waiter
        waiter.add_done_callback(self._gone)

    def _gone(self, waiter: asyncio.Future[Any]) -> None:
        if not waiter.cancelled():
            self.ex.client_lost()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if isinstance(waiter, asyncio.Task):
                waiter.cancel()
            else:
                waiter.remove_done_callback(self._gone)  # no exchange ↔ future cycle left
