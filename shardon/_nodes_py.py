"""The node registry: the nodes, their connection pools, their health; the one place they change.

`NodeRegistry.add` and `remove` keep everything that depends on the set of nodes in step: the
scheduler's routes and slots, the pools' read-timeout sweep, the metrics' series, and the gateway's
cached model list (``on_change``). Nodes come from the config and from the model lifecycle.

Health is a small circuit breaker per node. ``failure_threshold`` consecutive failures — failed
requests (before any byte arrived) or failed health checks — take the node out of rotation; while
out, only the periodic health check probes it, and one success puts it back. Every node is probed
once at start-up and then every ``health_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .config import NodeConfig, UpstreamConfig
from .upstream.base import UpstreamError
from .upstream.connection import NodePool

log = logging.getLogger("shardon.nodes")

# How often busy connections are checked against the read timeout.
_SWEEP_S = 0.5


class Node:
    __slots__ = (
        "_heads",
        "api_key",
        "backend",
        "config",
        "failures",
        "health_path",
        "healthy",
        "host_header",
        "id",
        "index",
        "last_error",
        "max_concurrent",
        "model_file_sha256",
        "models",
        "pool",
        "weight",
    )

    def __init__(self, index: int, config: NodeConfig, pool: NodePool, *, backend: str | None = None) -> None:
        parts = urlsplit(config.url)
        self.index = index
        self.config = config
        self.id = config.id
        self.pool = pool
        self.models = config.model_map()
        self.max_concurrent = config.max_concurrent
        self.weight = config.weight
        self.api_key = config.api_key
        self.health_path = config.health_path
        self.healthy = True
        self.failures = 0
        self.last_error: str | None = None
        self.backend = backend
        self.model_file_sha256: str | None = None
        self.host_header = parts.netloc
        self._heads: dict[bytes, bytes] = {}

    def request_head(self, request_line: bytes, content_length: int) -> bytes:
        """The head of a request to this node for ``b"POST /v1/..."``; built once per line, then cached."""
        prefix = self._heads.get(request_line)
        if prefix is None:
            lines = [
                request_line + b" HTTP/1.1",
                b"Host: " + self.host_header.encode(),
                b"User-Agent: shardon",
                b"Accept: */*",
            ]
            if self.api_key:
                lines.append(b"Authorization: Bearer " + self.api_key.encode())
            if request_line.startswith(b"POST"):
                lines.append(b"Content-Type: application/json")
            prefix = b"\r\n".join(lines) + b"\r\nContent-Length: "
            self._heads[request_line] = prefix
        return prefix + b"%d\r\n\r\n" % content_length

    def snapshot(self) -> dict[str, object]:
        return {
            "id": self.id,
            "url": self.config.url,
            "models": sorted(self.models),
            "healthy": self.healthy,
            "max_concurrent": self.max_concurrent,
            "weight": self.weight,
            "failures": self.failures,
            "last_error": self.last_error,
            "idle_connections": self.pool.idle_count,
        }


class NodeRegistry:
    """Owns the nodes; ``scheduler`` and ``metrics`` are told of each change, ``on_change`` too."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        scheduler: Any,
        metrics: Any,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self.upstream = upstream
        self.loop = loop
        self.scheduler = scheduler
        self.metrics = metrics
        self.on_change = on_change
        self.nodes: dict[str, Node] = {}
        self.by_index: dict[int, Node] = {}
        self._next_index = 0
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, config: NodeConfig, *, backend: str | None = None) -> Node:
        parts = urlsplit(config.url)
        pool = NodePool(
            parts.hostname or "127.0.0.1",
            parts.port or 80,
            loop=self.loop,
            connect_timeout=self.upstream.connect_timeout_s,
            max_idle=min(config.max_concurrent, self.upstream.max_idle_per_node),
        )
        node = Node(self._next_index, config, pool, backend=backend)
        self._next_index += 1
        self.nodes[node.id] = node
        self.by_index[node.index] = node
        self.scheduler.add_node(node.index, node.max_concurrent, node.weight, node.models)
        if self.on_change is not None:
            self.on_change()
        return node

    def remove(self, node_id: str) -> Node | None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            del self.by_index[node.index]
            self.scheduler.remove_node(node.index)
            node.pool.close()
            self.metrics.forget_node(node.id)
            if self.on_change is not None:
                self.on_change()
        return node

    # -- circuit breaker --------------------------------------------------------------------
    def record_success(self, node: Node) -> None:
        node.failures = 0
        if not node.healthy:
            node.healthy = True
            node.last_error = None
            log.info("node %s is healthy again", node.id)
            self._health_changed(node)

    def record_failure(self, node: Node, error: str) -> None:
        node.failures += 1
        node.last_error = error
        if node.healthy and node.failures >= self.upstream.failure_threshold:
            node.healthy = False
            log.warning("node %s taken out of rotation after %d failures: %s", node.id, node.failures, error)
            self._health_changed(node)

    def _health_changed(self, node: Node) -> None:
        self.scheduler.set_healthy(node.index, node.healthy)
        self.metrics.set_node_up(node.id, node.healthy)

    # -- health checks ----------------------------------------------------------------------
    async def check(self, node: Node) -> bool:
        try:
            conn = await node.pool.acquire()
        except UpstreamError as exc:
            self.record_failure(node, str(exc))
            return False
        ok = False
        try:
            conn.send(node.request_head(b"GET " + node.health_path.encode(), 0))
            status, _ = await asyncio.wait_for(conn.response_head(), self.upstream.health_timeout_s)
            while await asyncio.wait_for(conn.read(), self.upstream.health_timeout_s):
                pass
            ok = status == 200
            error = f"health check answered {status}"
        except (TimeoutError, UpstreamError) as exc:
            error = f"health check failed: {exc or 'timeout'}"
        finally:
            conn.finish()
        if ok:
            self.record_success(node)
        else:
            self.record_failure(node, error)
        return ok

    async def check_all(self) -> None:
        if self.nodes:
            await asyncio.gather(*(self.check(node) for node in list(self.nodes.values())))

    async def _check_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check_all()
            await asyncio.sleep(self.upstream.health_interval_s)

    async def _sweep_forever(self) -> None:
        """Fail the connections that have waited on their node longer than the read timeout."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for node in list(self.nodes.values()):
                node.pool.sweep(now, self.upstream.read_timeout_s)

    def start(self) -> None:
        self._tasks = [self.loop.create_task(self._check_forever()), self.loop.create_task(self._sweep_forever())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for node in self.nodes.values():
            node.pool.close()
