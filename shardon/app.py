"""The gateway: its services wired together, the route table, the small routes.

`Gateway` owns all scheduling state, on one event loop. It is an RSGI application: the native engine
(`shardon.httpd`) first offers each whole request to ``on_request`` (the exchange core, served by
callbacks), and runs the RSGI coroutine for the rest; granian runs the coroutine for all. A request
to one of the ``/v1`` endpoints of `shardon.endpoints` (chat, completions, embeddings, responses,
audio, images...) is an exchange (`shardon.exchange`, driven by `shardon.rsgi.serve` here);
``/admin/*`` goes to `shardon.admin`, its nodes to `shardon.fleet`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from . import __version__, errors, proxies, rsgi
from ._fast import LeastConnBalancer
from .admin import Admin
from .auth import KeyStore, RateLimiter
from .config import Config, DataPaths, NodeConfig
from .endpoints import ENDPOINTS, body_limits
from .exchange import RequestCore
from .fleet import Fleet
from .lifecycle import BackendEndpoint, LifecycleManager
from .metrics import Metrics
from .nodes import NodeRegistry
from .routing.router import Router
from .rsgi import HTTPProtocol, Scope
from .scheduler import Scheduler
from .schemas import PRIORITY_NAMES, model_object, models_list
from .store import AccessLog, RequestLog, RequestRecord
from .web import Dashboard

JSON = [("content-type", "application/json")]
Handler = Callable[[Scope, HTTPProtocol], Awaitable[None]]
_MODEL_PREFIX = "/v1/models/"
_CIRCUIT_GAUGE = (0, 2, 1)  # by the registry's closed, open, half-open: 0 closed, 1 half-open, 2 open


class Gateway:
    """The one object that owns all scheduling state; the HTTP engine calls it for every request."""

    def __init__(
        self,
        config: Config,
        *,
        request_log: RequestLog | None = None,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        paths: DataPaths | None = None,
    ) -> None:
        self.config = config
        self.client_address = proxies.ClientAddress(config.server.trusted_proxies)
        self.started_at = time.time()
        self.paths = paths if paths is not None else config.data_paths()
        self.request_log = request_log
        self.access_log = access_log
        # Where a finished request's record goes: the request log, whose writer also feeds the
        # access log, else the access log alone, else nowhere.
        self.records: RequestLog | AccessLog | None = request_log if request_log is not None else access_log
        self.metrics = metrics or Metrics(enabled=False)
        self.keys = KeyStore(config.auth, config.tenants, self.paths.database)
        self.limiter = RateLimiter(self.metrics.rate_limited)
        self.on_finish: list[Callable[[RequestRecord], object]] = []
        # How long a request runs before its client's leaving is watched: at once on the native
        # engine (its notice is a plain future); granian's costs a task per request, so that engine
        # sets 20 ms: short requests never pay for it, generations are still cut.
        self.watch_after_s = 0.0
        self._idle = asyncio.Event()
        self._models_body: bytes | None = None
        # The exchanges: forwarded to a node that serves the request's model.
        self.routes: dict[tuple[str, str], Handler] = {("POST", path): self._exchange for path in ENDPOINTS}
        self.routes[("GET", "/v1/models")] = self._models
        self.routes[("GET", "/health")] = self._health
        self.routes[("GET", "/metrics")] = self._metrics
        self._paths = {path for _, path in self.routes}
        self.admin = Admin(self)
        self.ui = Dashboard(self)
        # Set in startup(), on the serving loop.
        self.loop: asyncio.AbstractEventLoop
        self.scheduler: Scheduler
        self.registry: NodeRegistry
        self.router: Router
        self.fleet: Fleet
        self.core: RequestCore
        self.lifecycle: LifecycleManager | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def startup(self) -> None:
        config = self.config
        limits = body_limits(config.server)
        self.loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(config.scheduler, LeastConnBalancer(), self.loop)
        self.registry = NodeRegistry(
            config.upstream,
            loop=self.loop,
            scheduler=self.scheduler,
            metrics=self.metrics,
            on_change=self._nodes_changed,
        )
        for node_config in config.nodes:
            self.registry.add(node_config)
        self.fleet = Fleet(self)
        self.fleet.restore()  # the nodes registered through the admin API
        self._start_lifecycle()
        self.router = Router(config.routing, scheduler=self.scheduler, registry=self.registry)
        self.router.apply()
        self.core = RequestCore(
            config,
            loop=self.loop,
            keys=self.keys,
            limiter=self.limiter,
            scheduler=self.scheduler,
            registry=self.registry,
            lifecycle=self.lifecycle,
            records=self.records,
            metrics=self.metrics,
            endpoints={path: (role, limits[path]) for path, role in ENDPOINTS.items()},
        )
        self.core.on_finish = self.on_finish
        if self.client_address.networks:
            self.core.client_address = self.client_address
        self.core.on_idle = self._idle.set
        self.core.callbacks = config.server.callbacks
        self.registry.start()

    def _start_lifecycle(self) -> None:
        """Models started on demand: a route each (no node until loaded), and the side thread."""
        manager = LifecycleManager(
            self.config.lifecycle(),
            state_dir=str(self.paths.lifecycle),
            loop=self.loop,
            on_ready=self._backend_ready,
            on_stopped=self._backend_stopped,
        )
        if not manager.public_models():
            manager.close()
            return
        self.lifecycle = manager
        for name in manager.public_models():
            self.scheduler.ensure_route(name)
        self._models_body = None
        self.admin.enable_models()
        manager.start()

    def _backend_ready(self, endpoint: BackendEndpoint) -> None:
        node = self.registry.add(
            NodeConfig(
                id=endpoint.node_id,
                url=endpoint.url,
                models={endpoint.model: endpoint.served_name},
                max_concurrent=max(1, endpoint.slots),
            ),
            backend=endpoint.backend,
            source="lifecycle",
        )
        node.model_file_sha256 = endpoint.model_file_sha256
        self.metrics.model_event(endpoint.model, "ready")

    def _backend_stopped(self, model: str, node_id: str) -> None:
        self.registry.remove(node_id)
        self.metrics.model_event(model, "stopped")

    def _nodes_changed(self) -> None:
        self._models_body = None

    @property
    def draining(self) -> bool:
        return self.core.draining

    @property
    def in_flight(self) -> int:
        return self.core.in_flight

    @property
    def on_request(self) -> Callable[[Any], bool]:
        """The native engine's entry for a whole request: `RequestCore.on_request` (once started)."""
        return self.core.on_request

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests (503) and wait for those in flight; True if all finished in time."""
        self.core.draining = True
        if self.core.in_flight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def shutdown(self) -> None:
        await self.registry.stop()
        if self.lifecycle is not None:
            await self.loop.run_in_executor(None, self.lifecycle.close)

    # -- RSGI entry point -------------------------------------------------------------------
    async def __call__(self, scope: Scope, proto: HTTPProtocol) -> None:
        if scope.proto != "http":
            return
        path = scope.path
        handler = self.routes.get((scope.method, path))
        if handler is not None:
            await handler(scope, proto)
            return
        if path.startswith(_MODEL_PREFIX) and scope.method == "GET":
            await self._model(scope, proto)
            return
        if path.startswith("/admin/"):
            await self.admin.handle(scope, proto)
            return
        if path == "/ui" or path.startswith("/ui/"):
            await self.ui.handle(scope, proto)
            return
        if path in self._paths:
            err: errors.ShardonError = errors.MethodNotAllowed(f"method {scope.method} not allowed on {path}")
        else:
            err = errors.NotFound(f"no route for {scope.method} {path}")
        proto.response_bytes(err.status, err.headers(), err.body())

    __rsgi__ = __call__

    async def _exchange(self, scope: Scope, proto: HTTPProtocol) -> None:
        await rsgi.serve(self.core, scope, proto, self.watch_after_s)

    # -- small routes -----------------------------------------------------------------------
    async def _models(self, scope: Scope, proto: HTTPProtocol) -> None:
        try:
            principal = self.keys.authenticate(scope.headers.get("authorization"), None)
        except errors.ShardonError as err:
            proto.response_bytes(err.status, err.headers(), err.body())
            return
        # Models started on demand also show their context length and whether they are loaded.
        extra = self.lifecycle.model_fields if self.lifecycle is not None else dict
        if principal.allowed_models is not None:
            names = sorted(m for m in self.scheduler.routes if m in principal.allowed_models)
            proto.response_bytes(200, JSON, models_list(names, int(self.started_at), extra()))
            return
        body = self._models_body
        if body is None:
            body = self._models_body = models_list(sorted(self.scheduler.routes), int(self.started_at), extra())
        proto.response_bytes(200, JSON, body)

    async def _model(self, scope: Scope, proto: HTTPProtocol) -> None:
        """``GET /v1/models/{id}``: one model of the list, or a 404 in OpenAI's shape."""
        name = scope.path[len(_MODEL_PREFIX) :]
        try:
            principal = self.keys.authenticate(scope.headers.get("authorization"), None)
            allowed = principal.allowed_models
            if name not in self.scheduler.routes or (allowed is not None and name not in allowed):
                raise errors.ModelNotFound(f"The model '{name}' does not exist", param="model")
        except errors.ShardonError as err:
            proto.response_bytes(err.status, err.headers(), err.body())
            return
        extra = self.lifecycle.model_fields().get(name) if self.lifecycle is not None else None
        proto.response_bytes(200, JSON, orjson.dumps(model_object(name, int(self.started_at), extra)))

    async def _health(self, scope: Scope, proto: HTTPProtocol) -> None:
        nodes = self.registry.nodes.values()
        body = {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "nodes": len(nodes),
            "nodes_healthy": sum(1 for n in nodes if n.healthy),
            "in_flight": self.in_flight,
        }
        proto.response_bytes(503 if self.draining else 200, JSON, orjson.dumps(body))

    async def _metrics(self, scope: Scope, proto: HTTPProtocol) -> None:
        # Gauges are read at scrape time: the request path pays nothing for them.
        metrics = self.metrics
        now = time.monotonic()
        for name, route in self.scheduler.routes.items():
            counts = [0, 0, 0, 0]
            for priority, _tenant, live in route.queue.snapshot():
                counts[priority] += live
            for waiter in route.held:
                counts[waiter.priority] += 1
            for priority, count in enumerate(counts):
                metrics.set_queue_depth(name, PRIORITY_NAMES[priority], count)
        for node in self.registry.nodes.values():
            metrics.set_inflight(node.id, self.scheduler.balancer.inflight(node.index))
            metrics.set_node_up(node.id, node.healthy)
            load = None if node.load is None else node.load.public(now)
            metrics.set_node_state(node.id, _CIRCUIT_GAUGE[node.circuit], node.draining, load)
        body, content_type = metrics.render()
        proto.response_bytes(200, [("content-type", content_type)], body)
