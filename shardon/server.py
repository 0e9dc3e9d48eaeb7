"""Run the gateway: Granian (RSGI) embedded in this process's uvloop, so one process owns all state.

SIGTERM or SIGINT drains: new requests get 503, requests in flight (streams included) finish up to
``server.drain_timeout_s``, then the listener closes and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable

from granian.constants import HTTPModes, Interfaces
from granian.server.embed import Server

from .app import Gateway
from .config import Config, NodeConfig
from .metrics import Metrics
from .store import RequestLog

log = logging.getLogger("shardon")

EMBEDDED_MOCK_MODEL = "mock-model"


class _QuietEmbedded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "experimental" not in record.getMessage()


async def _start_embedded_mock(gateway: Gateway) -> object:
    from .upstream.mock import MockConfig, MockNode

    mock = MockNode(MockConfig(models=[EMBEDDED_MOCK_MODEL], chunks=16, delay_ms=30, name="embedded-mock"))
    await mock.start("127.0.0.1", 0)
    gateway.add_node(NodeConfig(id="embedded-mock", url=mock.url, models=[EMBEDDED_MOCK_MODEL], max_concurrent=64))
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
    request_log = None
    if config.request_log:
        request_log = RequestLog(config.store)
        await asyncio.get_running_loop().run_in_executor(None, request_log.start)
    gateway = Gateway(config, request_log=request_log, metrics=Metrics(enabled=config.metrics.enabled))
    await gateway.startup()
    mock = None
    if config.embedded_mock or (config.embedded_mock is None and not config.nodes and gateway.lifecycle is None):
        mock = await _start_embedded_mock(gateway)

    logging.getLogger("_granian").addFilter(_QuietEmbedded())
    server = Server(
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
        if not await gateway.drain(config.server.drain_timeout_s):
            log.warning("drain timeout: %d request(s) cut", gateway.in_flight)
        server.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)
    stopping.cancel()
    await gateway.shutdown()
    if mock is not None:
        await mock.stop()  # type: ignore[attr-defined]
    if request_log is not None:
        await request_log.aclose()  # flushes every row appended so far
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
