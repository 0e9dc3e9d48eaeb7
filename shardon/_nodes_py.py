"""The node registry: the nodes, their connection pools, their circuits and load; the one place they change.

Nodes come from the config (``source`` "config"), the admin API ("admin", kept in the store by
`shardon.fleet`) and the model lifecycle ("lifecycle"). `NodeRegistry.add`, `update`, `set_draining`,
`retire` and `remove` keep everything that depends on the set of nodes in step: the scheduler's
routes and slots, the pools' read-timeout sweep, the metrics' series, the gateway's cached model list
(``on_change``).

A node takes new requests while it is *routable*: its circuit closed (or half-open, for one trial
request) and not draining. The scheduler's balancer holds that bit per node, so picking a node stays
one array read; the registry sets it on every change.

Circuit breaker, per node:

- closed: ``failure_threshold`` consecutive failed requests (before any byte reached the client,
  or answered with a 5xx) open it, and so does one failed active probe (`shardon.probes`) or one
  refused connection (nothing listens: the node is down, not busy);
- open: no request is sent to it, nor probe; after the cool-down it half-opens;
- half-open: exactly one request is let through, a client's (the balancer's one-acquire trial) or,
  if none comes by the next probe, the probe itself; success closes the circuit, failure opens it
  again with the cool-down doubled (up to ``max_cooldown_s``). When a client's trial ended without a
  verdict (its client left) and nothing runs on the node, the next probe is the trial.

Draining: a draining node gets no new request; those running finish. `retire` drains, then removes
the node once nothing runs on it (checked by the sweep, twice a second).

The load a node reports (`shardon.nodeload`) beyond Shardon's own requests is handed to the
balancer, which counts it like requests in flight: a node that other clients keep busy gets less.
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
from .probes import Prober
from .upstream.base import node_tls
from .upstream.connection import NodePool

log = logging.getLogger("shardon.nodes")

# How often busy connections are checked against the read timeout (and retired nodes removed).
_SWEEP_S = 0.5

CLOSED = 0
OPEN = 1
HALF_OPEN = 2
CIRCUIT_NAMES = ("closed", "open", "half_open")


class Node:
    __slots__ = (
        "_heads",
        "api_key",
        "backend",
        "circuit",
        "config",
        "cooldown",
        "draining",
        "failures",
        "health_path",
        "healthy",
        "host_header",
        "id",
        "index",
        "labels",
        "last_error",
        "load",
        "load_path",
        "max_concurrent",
        "model_file_sha256",
        "models",
        "pool",
        "probe_path",
        "removing",
        "retry_at",
        "source",
        "timer",
        "weight",
    )

    def __init__(
        self, index: int, config: NodeConfig, pool: NodePool, *, backend: str | None = None, source: str = "config"
    ) -> None:
        parts = urlsplit(config.url)
        self.index = index
        self.config = config
        self.id = config.id
        self.source = source
        self.pool = pool
        self.models = config.model_map()
        self.max_concurrent = config.max_concurrent
        self.weight = config.weight
        self.api_key = config.api_key
        self.labels = dict(config.labels)
        self.health_path = config.health_path
        self.probe_path = config.health_path or "/health"  # /v1/models once a node is found without /health
        self.load_path: str | None = None if config.report_load else ""  # None: not known yet; "": none
        self.load: Any = None  # the last NodeLoad it reported
        self.healthy = True  # its circuit is closed
        self.circuit = CLOSED
        self.failures = 0
        self.cooldown = 0.0  # the current open period's length
        self.retry_at = 0.0  # monotonic time an open circuit half-opens
        self.timer: Any = None
        self.draining = False
        self.removing = False
        self.last_error: str | None = None
        self.backend = backend
        self.model_file_sha256: str | None = None
        self.host_header = parts.netloc
        self._heads: dict[bytes, bytes] = {}

    def _head_lines(self, request_line: bytes) -> list[bytes]:
        lines = [
            request_line + b" HTTP/1.1",
            b"Host: " + self.host_header.encode(),
            b"User-Agent: shardon",
            b"Accept: */*",
        ]
        if self.api_key:
            lines.append(b"Authorization: Bearer " + self.api_key.encode())
        return lines

    def request_head(self, request_line: bytes, content_length: int) -> bytes:
        """The head of a request to this node for ``b"POST /v1/..."`` (a JSON body) or ``b"GET ..."``;
        built once per line, then cached."""
        prefix = self._heads.get(request_line)
        if prefix is None:
            lines = self._head_lines(request_line)
            if request_line.startswith(b"POST"):
                lines.append(b"Content-Type: application/json")
            prefix = b"\r\n".join(lines) + b"\r\nContent-Length: "
            self._heads[request_line] = prefix
        return prefix + b"%d\r\n\r\n" % content_length

    def request_head_as(self, request_line: bytes, content_type: bytes, content_length: int) -> bytes:
        """The head of a request whose body is not JSON: the client's Content-Type (a form's boundary)."""
        lines = self._head_lines(request_line)
        lines.append(b"Content-Type: " + content_type)
        return b"\r\n".join(lines) + b"\r\nContent-Length: %d\r\n\r\n" % content_length

    @property
    def routable(self) -> bool:
        return self.circuit == CLOSED and not self.draining

    def snapshot(self) -> dict[str, object]:
        """The node as the admin API shows it (never its api_key)."""
        now = time.monotonic()
        return {
            "id": self.id,
            "url": self.config.url,
            "source": self.source,
            "models": sorted(self.models),
            "model_names": {public: served for public, served in self.models.items() if public != served},
            "max_concurrent": self.max_concurrent,
            "weight": self.weight,
            "labels": self.labels,
            "healthy": self.healthy,
            "circuit": CIRCUIT_NAMES[self.circuit],
            "cooldown_s": self.cooldown,
            "retry_in_s": round(max(0.0, self.retry_at - now), 3) if self.circuit == OPEN else None,
            "draining": self.draining,
            "removing": self.removing,
            "failures": self.failures,
            "last_error": self.last_error,
            "load": None if self.load is None else self.load.public(now),
            "idle_connections": self.pool.idle_count,
            "tls": self.pool.ssl is not None,
            "backend": self.backend,
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
        self.on_removed: Callable[[Node], object] | None = None
        self.nodes: dict[str, Node] = {}
        self.by_index: dict[int, Node] = {}
        self._next_index = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.prober: Any = None

    # -- the set of nodes ---------------------------------------------------------------------
    def add(self, config: NodeConfig, *, backend: str | None = None, source: str = "config") -> Node:
        if config.id in self.nodes:
            raise ValueError(f"a node with id {config.id!r} exists already")
        parts = urlsplit(config.url)
        context = node_tls(config.url, config.ca_file)
        pool = NodePool(
            parts.hostname or "127.0.0.1",
            parts.port or (443 if context is not None else 80),
            loop=self.loop,
            connect_timeout=self.upstream.connect_timeout_s,
            max_idle=min(config.max_concurrent, self.upstream.max_idle_per_node),
            ssl=context,
        )
        node = Node(self._next_index, config, pool, backend=backend, source=source)
        self._next_index += 1
        self.nodes[node.id] = node
        self.by_index[node.index] = node
        self.scheduler.add_node(node.index, node.max_concurrent, node.weight, node.models)
        self._changed()
        return node

    def update(self, node: Node, config: NodeConfig) -> None:
        """A node's weight, capacity, models or labels changed (its requests in flight run on)."""
        node.config = config
        node.max_concurrent = config.max_concurrent
        node.weight = config.weight
        node.models = config.model_map()
        node.labels = dict(config.labels)
        self.scheduler.update_node(node.index, node.max_concurrent, node.weight, node.models)
        self._changed()

    def set_draining(self, node: Node, draining: bool) -> None:
        """Drain (no new request; those running finish) or take new requests again."""
        if node.removing and not draining:
            return  # on its way out
        node.draining = draining
        self._sync(node)

    def retire(self, node: Node) -> bool:
        """Drain, then remove once nothing runs on it; True if it is gone already."""
        node.removing = True
        self.set_draining(node, True)
        if self.scheduler.balancer.inflight(node.index) == 0:
            self.remove(node.id)
            return True
        return False

    def remove(self, node_id: str) -> Node | None:
        node = self.nodes.pop(node_id, None)
        if node is not None:
            del self.by_index[node.index]
            self._cancel_timer(node)
            self.scheduler.remove_node(node.index)
            node.pool.close()
            self.metrics.forget_node(node.id)
            self._changed()
            if self.on_removed is not None:
                self.on_removed(node)
        return node

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _sync(self, node: Node) -> None:
        """Tell the balancer whether the node takes new requests (a half-open one: one)."""
        if node.draining or node.circuit == OPEN:
            self.scheduler.set_healthy(node.index, False)
        elif node.circuit == HALF_OPEN:
            self.scheduler.set_trial(node.index)
        else:
            self.scheduler.set_healthy(node.index, True)

    # -- circuit breaker ------------------------------------------------------------------------
    def record_success(self, node: Node) -> None:
        """A request or probe succeeded on the node."""
        node.failures = 0
        if node.circuit != CLOSED and node.index in self.by_index:
            self._close(node)

    def record_failure(self, node: Node, error: str, refused: bool = False) -> None:
        """A request failed on the node (before its first byte reached the client, or a 5xx);
        ``refused``: its connection was refused (nothing listens there: out at once)."""
        node.failures += 1
        node.last_error = error
        if node.index not in self.by_index or node.circuit == OPEN:
            return  # removed meanwhile, or out already
        if refused:
            self._open(node, error)
        elif node.circuit == HALF_OPEN or node.failures >= self.upstream.failure_threshold:
            self._open(node, f"{node.failures} consecutive failures: {error}")

    def probe_failed(self, node: Node, error: str) -> None:
        """An active probe failed: the node is out of rotation at once."""
        node.failures += 1
        node.last_error = error
        if node.circuit != OPEN and node.index in self.by_index:
            self._open(node, error)

    def to_probe(self) -> list[Node]:
        """The nodes an active probe checks now: those with a closed circuit, and the half-open ones
        whose trial the probe takes (no client request did)."""
        return [n for n in self.nodes.values() if n.circuit == CLOSED or self._take_trial(n)]

    def to_poll(self) -> list[Node]:
        """The nodes whose reported load is read now: in rotation, and reporting one."""
        return [n for n in self.nodes.values() if n.circuit == CLOSED and not n.removing and n.load_path != ""]

    def _take_trial(self, node: Node) -> bool:
        if node.circuit != HALF_OPEN or node.draining:
            return False
        balancer = self.scheduler.balancer
        if balancer.trial(node.index):
            balancer.set_healthy(node.index, False)
            return True
        # A trial that ended without a verdict (its client left): this probe decides.
        return bool(balancer.inflight(node.index) == 0)

    def _open(self, node: Node, why: str) -> None:
        first = node.circuit == CLOSED
        cooldown = self.upstream.cooldown_s if first else min(node.cooldown * 2, self.upstream.max_cooldown_s)
        node.circuit = OPEN
        node.healthy = False
        node.cooldown = cooldown
        node.retry_at = time.monotonic() + cooldown
        self._cancel_timer(node)
        node.timer = self.loop.call_later(cooldown, self._half_open, node)
        if first:
            log.warning("node %s taken out of rotation (circuit open for %gs): %s", node.id, cooldown, why)
        else:
            log.warning("node %s failed its trial: circuit open again for %gs: %s", node.id, cooldown, why)
        self._sync(node)
        self.metrics.set_node_up(node.id, False)

    def _half_open(self, node: Node) -> None:
        node.timer = None
        if node.circuit == OPEN and node.index in self.by_index:
            node.circuit = HALF_OPEN
            log.info("node %s half-open: one trial request", node.id)
            self._sync(node)

    def _close(self, node: Node) -> None:
        self._cancel_timer(node)
        node.circuit = CLOSED
        node.healthy = True
        node.cooldown = 0.0
        node.last_error = None
        log.info("node %s is healthy again: circuit closed", node.id)
        self._sync(node)
        self.metrics.set_node_up(node.id, True)

    def _cancel_timer(self, node: Node) -> None:
        timer = node.timer
        if timer is not None:
            node.timer = None
            timer.cancel()

    # -- reported load --------------------------------------------------------------------------
    def set_load(self, node: Node, load: Any) -> None:
        """What the node reports; the balancer counts the requests that are not Shardon's."""
        node.load = load
        if node.index in self.by_index:
            ours = self.scheduler.balancer.inflight(node.index)
            self.scheduler.set_load(node.index, 0.0 if load is None else max(0.0, load.requests - ours))

    # -- background work ------------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        """Fail the connections that have waited on their node longer than the read timeout, and
        remove the retired nodes that nothing runs on any more."""
        balancer = self.scheduler.balancer
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for node in list(self.nodes.values()):
                node.pool.sweep(now, self.upstream.read_timeout_s)
                if node.removing and balancer.inflight(node.index) == 0:
                    log.info("node %s drained: removed", node.id)
                    self.remove(node.id)

    def start(self) -> None:
        self.prober = Prober(self, self.upstream)
        self._tasks = [self.loop.create_task(self._sweep_forever()), *self.prober.start(self.loop)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for node in self.nodes.values():
            self._cancel_timer(node)
            node.pool.close()
