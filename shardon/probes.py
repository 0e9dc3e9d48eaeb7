"""Active health probes and the load the nodes report, read off the request path.

Every ``upstream.health_interval_s`` (and once at start) each node the registry names
(`NodeRegistry.to_probe`: closed circuits, and half-open ones whose trial the probe takes) gets a
``GET`` of its health path: ``/health`` (llama.cpp's server and vLLM answer 200 when ready; llama.cpp
503 while loading), else, for a node without one (a 404 or 405), ``/v1/models`` from then on. A
200 is a success; anything else, a refused connection or no answer within ``health_timeout_s`` is
a failure, and a failed probe takes the node out of rotation at once (its circuit opens).

Every ``upstream.load_interval_s`` each node in rotation that reports its load gets a ``GET`` of
``/metrics`` (vLLM, ``llama-server --metrics``) or, failing that, ``/slots`` (llama.cpp); a node with
neither is asked again only every ``_REDETECT`` rounds. Parsing is `shardon.nodeload`'s.

Probes use the node's keep-alive pool and send its ``api_key``, like requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .nodeload import parse_metrics, parse_slots
from .upstream.base import UpstreamError

__all__ = ["Prober", "fetch"]

log = logging.getLogger("shardon.probes")

_MAX_BODY = 4 << 20  # a probe answer larger than this is cut (a /metrics page is kilobytes)
_REDETECT = 30  # rounds between two looks for the load of a node that reports none


async def fetch(node: Any, path: str, timeout: float) -> tuple[int, bytes]:
    """``GET path`` on the node: (status, body). Raises UpstreamError or TimeoutError."""
    async with asyncio.timeout(timeout):
        conn = await node.pool.acquire()
    try:
        conn.send(node.request_head(b"GET " + path.encode(), 0))
        async with asyncio.timeout(timeout):
            status, _ = await conn.response_head()
            body = bytearray()
            while chunk := await conn.read():
                if len(body) < _MAX_BODY:
                    body += chunk
        return status, bytes(body)
    finally:
        conn.finish()


class Prober:
    """The registry's probes: health on one interval, reported load on another."""

    def __init__(self, registry: Any, upstream: Any) -> None:
        self.registry = registry
        self.upstream = upstream
        self._rounds = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[None]]:
        return [loop.create_task(self._probe_forever()), loop.create_task(self._poll_forever())]

    # -- health ---------------------------------------------------------------------------------
    async def probe(self, node: Any) -> bool:
        """One health probe; the registry is told its outcome."""
        timeout = self.upstream.health_timeout_s
        try:
            status, _ = await fetch(node, node.probe_path, timeout)
            if status in (404, 405) and node.health_path is None and node.probe_path != "/v1/models":
                node.probe_path = "/v1/models"  # a node without /health (llama-cpp-python, hosted APIs)
                status, _ = await fetch(node, node.probe_path, timeout)
            error = f"health check {node.probe_path} answered {status}"
        except TimeoutError:
            status, error = 0, f"health check {node.probe_path}: no answer within {timeout:g}s"
        except UpstreamError as exc:
            status, error = 0, f"health check {node.probe_path} failed: {exc}"
        if status == 200:
            self.registry.record_success(node)
            return True
        self.registry.probe_failed(node, error)
        return False

    async def probe_all(self) -> None:
        nodes = self.registry.to_probe()
        if nodes:
            await asyncio.gather(*(self.probe(node) for node in nodes))

    async def _probe_forever(self) -> None:
        while True:
            try:
                await self.probe_all()
            except Exception:  # a bug must not stop the probes
                log.exception("health probes failed")
            await asyncio.sleep(self.upstream.health_interval_s)

    # -- reported load --------------------------------------------------------------------------
    async def read_load(self, node: Any) -> None:
        """The node's reported load into the registry (None when it reports none)."""
        timeout = self.upstream.health_timeout_s
        paths = (node.load_path,) if node.load_path else ("/metrics", "/slots")
        load = None
        for path in paths:
            try:
                status, body = await fetch(node, path, timeout)
            except (TimeoutError, UpstreamError):
                return  # the health probes judge a node that does not answer
            if status != 200:
                continue
            now = time.monotonic()
            load = parse_slots(body, now) if path == "/slots" else parse_metrics(body.decode("utf-8", "replace"), now)
            if load is not None:
                node.load_path = path
                break
        if load is None and not node.load_path:
            node.load_path = ""  # reports nothing: asked again every _REDETECT rounds
        self.registry.set_load(node, load)

    async def poll_all(self) -> None:
        self._rounds += 1
        if self._rounds % _REDETECT == 0:
            for node in self.registry.nodes.values():
                if node.load_path == "" and node.config.report_load:
                    node.load_path = None
        nodes = self.registry.to_poll()
        if nodes:
            await asyncio.gather(*(self.read_load(node) for node in nodes))

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_all()
            except Exception:  # a bug must not stop the polling
                log.exception("load polling failed")
            await asyncio.sleep(self.upstream.load_interval_s)
