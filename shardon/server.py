"""Run the gateway: one RSGI application on this process's uvloop, so one process owns all state.

The HTTP engine that hosts it is picked by name (``server.engine``) from `ENGINES`:

- ``native`` (default): Shardon's own HTTP/1.1 server (`shardon.httpd`: uvloop protocol, httptools
  parser) in the event loop's thread. A request costs one loop callback and no thread hop, and a
  whole request is served by the exchange's callbacks, without a task or a coroutine.
- ``granian``: Granian's embedded RSGI server. Its Rust runtime thread hands each request to the
  Python loop across threads (GIL hand-off, wake-up), and every request runs as a coroutine: the
  choice for HTTP/2 or its other features, not the default (bench/README.md has the figures).

Both run the same `Gateway`; the test suite runs its end-to-end tests against both.

SIGTERM or SIGINT drains: new requests get 503, requests in flight (streams and queued ones included)
finish up to ``server.drain_timeout_s``; what is left then is cut (`RequestCore.cut`: 503s, a stream
ended by an SSE error event), the listener closes and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Callable
from typing import Protocol

from .app import Gateway
from .config import Config, NodeConfig
from .endpoints import body_limits
from .metrics import Metrics
from .store import RequestLog
from .store.access import access_log_for

log = logging.getLogger("shardon")

EMBEDDED_MOCK_MODEL = "mock-model"
# After the drain timeout: how long the requests cut are given to end (their answers written).
_CUT_GRACE_S = 2.0


class Engine(Protocol):
    """What `run` needs of an HTTP engine."""

    async def serve(self) -> None:
        """Listen and serve until `stop`; raise if the address cannot be served."""

    def begin_drain(self) -> None:
        """SIGTERM arrived: keep answering (the gateway sends 503), stop keeping connections alive."""

    def stop(self) -> None:
        """Close the listener and every connection; `serve` returns."""


def _native_engine(gateway: Gateway, config: Config) -> Engine:
    from .httpd import NativeServer

    server = config.server
    return NativeServer(
        gateway,
        server.host,
        server.port,
        backlog=server.backlog,
        max_body=max(body_limits(server).values()),  # the exchange holds each endpoint to its own
        keepalive_timeout_s=server.keepalive_timeout_s,
        header_timeout_s=server.header_timeout_s,
    )


class _QuietEmbedded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "experimental" not in record.getMessage()


class _GranianEngine:
    def __init__(self, gateway: Gateway, config: Config) -> None:
        from granian.constants import HTTPModes, Interfaces
        from granian.rsgi import ProtocolClosed
        from granian.server.embed import Server

        from .errors import register_closed_error

        register_closed_error(ProtocolClosed)
        gateway.watch_after_s = 0.02
        logging.getLogger("_granian").addFilter(_QuietEmbedded())
        self.server = Server(
            gateway,
            address=config.server.host,
            port=config.server.port,
            interface=Interfaces.RSGI,
            http=HTTPModes.http1,
            websockets=False,
            backlog=config.server.backlog,
            backpressure=config.server.max_concurrent_requests,
            log_level=config.log.level,  # type: ignore[arg-type]
            log_access=False,
        )

    async def serve(self) -> None:
        await self.server.serve()

    def begin_drain(self) -> None:
        pass  # granian has no such state; the gateway's 503s do the draining

    def stop(self) -> None:
        self.server.stop()


ENGINES: dict[str, Callable[[Gateway, Config], Engine]] = {
    "native": _native_engine,
    "granian": _GranianEngine,
}


async def _start_embedded_mock(gateway: Gateway) -> object:
    from .upstream.mock import MockConfig, MockNode

    mock = MockNode(MockConfig(models=[EMBEDDED_MOCK_MODEL], chunks=16, delay_ms=30, name="embedded-mock"))
    await mock.start("127.0.0.1", 0)
    gateway.registry.add(NodeConfig(id="embedded-mock", url=mock.url, models=[EMBEDDED_MOCK_MODEL], max_concurrent=64))
    log.info("no nodes configured: serving model %r from the built-in mock node", EMBEDDED_MOCK_MODEL)
    return mock


async def run(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    started: Callable[[Gateway], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set, for embedding in tests), then drain and exit."""
    problem = _cannot_listen(config.server.host, config.server.port)
    if problem:
        log.error("cannot listen on %s:%d: %s", config.server.host, config.server.port, problem)
        return 1
    paths = config.data_paths()  # the one place the data directory is resolved
    access_log = access_log_for(config)
    if access_log is not None:
        access_log.start()
    request_log = None
    if config.request_log:
        request_log = RequestLog(paths.database, config.store, backlog=paths.backlog, access=access_log)
        await asyncio.get_running_loop().run_in_executor(None, request_log.start)
    gateway = Gateway(
        config,
        request_log=request_log,
        metrics=Metrics(enabled=config.metrics.enabled),
        access_log=access_log,
        paths=paths,
    )
    await gateway.startup()
    mock = None
    if config.embedded_mock or (config.embedded_mock is None and not config.nodes and gateway.lifecycle is None):
        mock = await _start_embedded_mock(gateway)

    server = ENGINES[config.server.engine](gateway, config)
    # Everything allocated so far (modules, config, tables) lives as long as the process: moving it
    # out of the collector's reach keeps its full passes from walking it again and again (each one
    # took milliseconds, a tail-latency spike, under load).
    gc.collect()
    gc.freeze()
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    serving = asyncio.ensure_future(server.serve())
    if started is not None:
        started(gateway)
    stopping = asyncio.ensure_future(stop.wait())
    log.info("shardon serving on http://%s:%d", config.server.host, config.server.port)
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if serving.done():
        # The server ended by itself: it could not bind, or crashed.
        exc = serving.exception()
        log.error("server stopped: %s", exc or "unexpectedly")
        code = 1
    else:
        log.info("draining: %d request(s) in flight", gateway.in_flight)
        server.begin_drain()
        if not await gateway.drain(config.server.drain_timeout_s):
            log.warning("drain timeout: %d request(s) cut", gateway.in_flight)
            gateway.core.cut()
            await gateway.drain(_CUT_GRACE_S)  # their answers written before the connections close
        server.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
        # What the engine's stop ended (a connection closed, a coroutine cancelled) is recorded
        # before the request log closes.
        await gateway.drain(_CUT_GRACE_S)
    stopping.cancel()
    await gateway.shutdown()
    if mock is not None:
        await mock.stop()  # type: ignore[attr-defined]
    if request_log is not None:
        await request_log.aclose()  # flushes every row appended so far
    if access_log is not None:
        await asyncio.to_thread(access_log.close)  # after the request log: it hands its last rows over
    return code


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the address cannot be bound (port taken, bad host), before anything is started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc.strerror or exc)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def serve(config: Config) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(run(config))
    return uvloop.run(run(config))
