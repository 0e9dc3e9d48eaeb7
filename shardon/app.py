"""The RSGI application: route table, the inference data path, and the error edge.

A request to ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings`` goes:

    auth → body read (size-checked) → routing fields decoded → model allowed? → rate limits
      → slot (now, or queued) → node's keep-alive connection → response streamed back as the
      node's bytes → slot released → usage corrected → request log row + metrics

Errors become OpenAI-shaped JSON here and nowhere else. Once the first response byte has reached the
client there is no retry: a failing stream gets an SSE ``error`` event and ends.

This is the general path. On the native engine the common request takes the callback path instead
(shardon/fastpath.py), which does the same steps without a coroutine and hands anything unusual
back here (`Gateway.resume`); both end in `Gateway.request_done`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson

from . import __version__, errors, proxies, rsgi
from ._fast import LeastConnBalancer
from .auth import KeyStore, Principal, RateLimiter
from .config import Config, NodeConfig
from .fastpath import FastPath, FastRequest
from .lifecycle import BackendEndpoint, LifecycleManager
from .metrics import Metrics
from .nodes import Node, NodeRegistry
from .receipts import OutputHasher, hash_response
from .rsgi import HTTPProtocol, Scope
from .scheduler import Route, Scheduler
from .schemas import (
    PRIORITY_BY_NAME,
    PRIORITY_NAMES,
    RoutingFields,
    UsageStripper,
    models_list,
    routing_decoder,
    with_fields,
)
from .store import RequestLog, RequestRecord, format_request_id, request_ids
from .upstream.base import UpstreamError
from .upstream.pool import Sweeper, UpstreamConnection, client_headers

log = logging.getLogger("shardon.app")
access_log = logging.getLogger("shardon.access")

JSON = [("content-type", "application/json")]
Handler = Callable[[Scope, HTTPProtocol], Awaitable[None]]


class Exchange:
    """Per-request state shared between the data path and the client watcher.

    The watcher: `watch` asks the engine to tell when the client disconnects
    (``proto.client_disconnect()``); then the node connection is closed (which stops the
    generation) and the callbacks added with `add_gone` run (a queued request leaves its queue).
    """

    __slots__ = (
        "_disconnect",
        "_on_gone",
        "conn",
        "gone",
        "hasher",
        "proto",
        "rec",
        "started",
        "stripper",
        "timer",
        "transport",
        "usage",
    )

    def __init__(self, proto: HTTPProtocol, rec: RequestRecord) -> None:
        self.proto = proto
        self.rec = rec
        self.conn: UpstreamConnection | None = None
        self.started = False  # a response byte has been handed to the client
        self.gone = False  # the client disconnected
        self.timer: asyncio.TimerHandle | None = None
        self.transport: Any = None  # the client's response stream, once started
        self.hasher: OutputHasher | None = None  # streams: the receipt's output hash, the usage
        self.stripper: UsageStripper | None = None
        self.usage: dict[str, Any] | None = None  # non-streamed: the usage the node reported
        self._disconnect: asyncio.Future[Any] | None = None
        self._on_gone: list[Callable[[], object]] | None = None

    def watch(self) -> None:
        """Start noticing the client leaving (idempotent)."""
        if self._disconnect is None:
            waiter = self.proto.client_disconnect()
            if not isinstance(waiter, asyncio.Future):
                waiter = asyncio.ensure_future(waiter)  # granian's is an awaitable: run it as a task
            self._disconnect = waiter
            waiter.add_done_callback(self._client_gone)

    def add_gone(self, callback: Callable[[], object]) -> None:
        self.watch()
        if self._on_gone is None:
            self._on_gone = []
        self._on_gone.append(callback)

    def remove_gone(self, callback: Callable[[], object]) -> None:
        if self._on_gone is not None and callback in self._on_gone:
            self._on_gone.remove(callback)

    def _client_gone(self, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled():
            return
        self.gone = True
        conn = self.conn
        if conn is not None:
            conn.close()  # stops the generation on the node
        if self._on_gone:
            for callback in list(self._on_gone):
                callback()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        waiter = self._disconnect
        if waiter is not None:
            if isinstance(waiter, asyncio.Task):
                waiter.cancel()
            else:
                waiter.remove_done_callback(self._client_gone)  # no exchange ↔ future cycle left
        self._on_gone = None
        # Granian ends a streamed response when its transport object is released: drop it now.
        self.transport = None


class Gateway:
    """The one object that owns all scheduling state; the HTTP engine calls it for every request."""

    def __init__(
        self, config: Config, *, request_log: RequestLog | None = None, metrics: Metrics | None = None
    ) -> None:
        self.config = config
        self.max_body = config.server.max_body_bytes
        self.queue_timeout = config.scheduler.queue_timeout_s
        self.default_priority = PRIORITY_BY_NAME[config.scheduler.default_priority]
        self.default_max_tokens = config.scheduler.default_max_tokens
        self.max_retries = config.upstream.max_retries
        self.tenant_header = config.auth.tenant_header.lower()
        self.client_address = proxies.ClientAddress(config.server.trusted_proxies)
        self.draining = False
        self.in_flight = 0
        self.started_at = time.time()
        self.request_log = request_log
        self.metrics = metrics or Metrics(enabled=False)
        self.keys = KeyStore(config.auth, config.tenants, request_log.path if request_log is not None else None)
        self.limiter = RateLimiter()
        self.on_finish: list[Callable[[RequestRecord], None]] = []
        self.access_logging = config.log.access_log
        """``log.access_log``: one ``shardon.access`` line per request (when that logger takes INFO)."""
        self._idle = asyncio.Event()
        self._models_body: bytes | None = None
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", "/v1/chat/completions"): self._inference,
            ("POST", "/v1/completions"): self._inference,
            ("POST", "/v1/embeddings"): self._inference,
            ("GET", "/v1/models"): self._models,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
        }
        self._paths = {path for _, path in self.routes}
        self._method_paths = {path: f"{method} {path}".encode() for method, path in self.routes if method == "POST"}
        # How long a request runs before the gateway watches for its client leaving: at once with
        # the native engine (its notice is a plain future); granian's costs a task per request, so
        # its engine sets 20 ms: short requests never pay for it, generations are still cut.
        self.watch_after_s = 0.0
        from .admin import Admin

        self.admin = Admin(self)
        # Set in startup(), on the serving loop.
        self.loop: asyncio.AbstractEventLoop
        self.scheduler: Scheduler
        self.registry: NodeRegistry
        self._sweeper: Sweeper
        self.lifecycle: LifecycleManager | None = None
        # The callback path for common requests (shardon/fastpath.py), for engines that can use it.
        self.fast_path: FastPath | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.scheduler = Scheduler(self.config.scheduler, LeastConnBalancer(), self.loop)
        self.registry = NodeRegistry(self.config.upstream, loop=self.loop, on_health_change=self._health_changed)
        self._sweeper = Sweeper([], self.config.upstream.read_timeout_s)
        for node_config in self.config.nodes:
            self.add_node(node_config)
        self._start_lifecycle()
        self._sweeper.start()
        self.registry.start()
        if self.config.server.fast_path:
            self.fast_path = FastPath(self)

    def _start_lifecycle(self) -> None:
        """Models started on demand: a route each (no node until loaded), and the side thread."""
        state_dir = self.config.store.resolved_path().parent / "lifecycle"
        manager = LifecycleManager(
            self.config.lifecycle(),
            state_dir=str(state_dir),
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
        node = self.add_node(
            NodeConfig(
                id=endpoint.node_id,
                url=endpoint.url,
                models={endpoint.model: endpoint.served_name},
                max_concurrent=max(1, endpoint.slots),
            ),
            backend=endpoint.backend,
        )
        node.model_file_sha256 = endpoint.model_file_sha256
        self.metrics.model_event(endpoint.model, "ready")

    def _backend_stopped(self, model: str, node_id: str) -> None:
        self.remove_node(node_id)
        self.metrics.model_event(model, "stopped")

    def add_node(self, node_config: NodeConfig, *, backend: str | None = None) -> Node:
        node = self.registry.add(node_config, backend=backend)
        self.scheduler.add_node(node.index, node.max_concurrent, node.weight, node.models)
        self._sweeper.pools.append(node.pool)
        self._models_body = None
        return node

    def remove_node(self, node_id: str) -> None:
        node = self.registry.remove(node_id)
        if node is not None:
            self.scheduler.remove_node(node.index)
            if node.pool in self._sweeper.pools:
                self._sweeper.pools.remove(node.pool)
            self.metrics.forget_node(node.id)
            self._models_body = None

    def _health_changed(self, node: Node) -> None:
        self.scheduler.set_healthy(node.index, node.healthy)
        self.metrics.set_node_up(node.id, node.healthy)

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests (503) and wait for those in flight; True if all finished in time."""
        self.draining = True
        if self.in_flight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def shutdown(self) -> None:
        await self.registry.stop()
        await self._sweeper.stop()
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
        if path.startswith("/admin/"):
            await self.admin.handle(scope, proto)
            return
        if path in self._paths:
            err: errors.ShardonError = errors.MethodNotAllowed(f"method {scope.method} not allowed on {path}")
        else:
            err = errors.NotFound(f"no route for {scope.method} {path}")
        proto.response_bytes(err.status, err.headers(), err.body())

    __rsgi__ = __call__

    # -- small routes -----------------------------------------------------------------------
    async def _models(self, scope: Scope, proto: HTTPProtocol) -> None:
        try:
            principal = self.keys.authenticate(scope.headers.get("authorization"), None)
        except errors.ShardonError as err:
            proto.response_bytes(err.status, err.headers(), err.body())
            return
        if principal.allowed_models is not None:
            names = sorted(m for m in self.scheduler.routes if m in principal.allowed_models)
            proto.response_bytes(200, JSON, models_list(names, int(self.started_at)))
            return
        body = self._models_body
        if body is None:
            body = self._models_body = models_list(sorted(self.scheduler.routes), int(self.started_at))
        proto.response_bytes(200, JSON, body)

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
        body, content_type = metrics.render()
        proto.response_bytes(200, [("content-type", content_type)], body)

    # -- the data path ----------------------------------------------------------------------
    @staticmethod
    def next_id(now: float) -> int:
        """A new request id (`shardon.store.RequestIds`): increasing, and the request log's key."""
        return request_ids.next(now)

    async def _inference(self, scope: Scope, proto: HTTPProtocol) -> None:
        now = time.time()
        rec = RequestRecord(
            id=self.next_id(now),
            received_at=now,
            endpoint=scope.path,
            client_addr=self.client_address(scope),
        )
        self.in_flight += 1
        ex = Exchange(proto, rec)
        await self._guarded(ex, self._serve(scope, ex))

    async def _guarded(self, ex: Exchange, work: Awaitable[None]) -> None:
        """The error edge: errors become OpenAI-shaped answers (or 499s); the record is finished."""
        rec = ex.rec
        proto = ex.proto
        try:
            await work
        except errors.ShardonError as err:
            rec.status = err.status
            rec.error_type = err.code
            if not ex.started:
                headers = err.headers()
                headers.append(("x-request-id", format_request_id(rec.id)))
                proto.response_bytes(err.status, headers, err.body())
        except errors.ClientGone:
            rec.status = 499
            rec.error_type = "client_disconnected"
        except rsgi.closed_errors:
            rec.status = 499
            rec.error_type = "client_disconnected"
        except Exception as exc:  # a bug: answer 500 in OpenAI's shape, log it, lose nothing
            log.exception("request %s failed", format_request_id(rec.id))
            rec.status = 500
            rec.error_type = "internal_error"
            if not ex.started:
                internal = errors.ShardonError(f"internal error: {type(exc).__name__}")
                proto.response_bytes(500, internal.headers(), internal.body())
        finally:
            ex.close()
            rec.finished_at = time.time()
            self.request_done(rec)

    def request_done(self, rec: RequestRecord) -> None:
        """A request has ended, whichever path served it: count it out, log it, measure it.

        (The compiled callback path does the same inline: ``_wire_c.pyx`` ``FastPath._done``.)
        """
        self.in_flight -= 1
        if self.in_flight == 0 and self.draining:
            self._idle.set()
        if self.request_log is not None:
            self.request_log.append(rec)
        self.metrics.observe_request(rec)
        for hook in self.on_finish:
            hook(rec)
        if self.access_logging and access_log.isEnabledFor(logging.INFO):
            self.log_access(rec)

    @staticmethod
    def log_access(rec: RequestRecord) -> None:
        """The access-log line of a finished request (logger ``shardon.access``)."""
        access_log.info(
            '%s "%s %s" %d model=%s tenant=%s node=%s %.1fms id=%s',
            rec.client_addr,
            "POST",
            rec.endpoint,
            rec.status,
            rec.model,
            rec.tenant,
            rec.node_id,
            ((rec.finished_at or rec.received_at) - rec.received_at) * 1000,
            format_request_id(rec.id),
        )

    def resume(self, job: FastRequest, error: UpstreamError | None) -> None:
        """Finish a callback-path request here: retry after ``error``, or relay a long answer."""
        ex = Exchange(job.request, job.rec)
        self.loop.create_task(self._guarded(ex, self._resumed(ex, job, error)))

    async def _resumed(self, ex: Exchange, job: FastRequest, error: UpstreamError | None) -> None:
        rec = ex.rec
        route, req, index = job.route, job.req, job.index
        prompt_estimate = len(job.body) // 4
        estimate = prompt_estimate + (req.max_tokens or req.max_completion_tokens or self.default_max_tokens)
        ex.hasher = job.hasher
        ex.stripper = job.stripper
        ex.watch()
        try:
            if error is not None:
                # job.payload: the body as sent (usage asked for, model alias applied).
                await self._dispatch(rec.endpoint, ex, route, req, job.payload, index, prior=error)
                return
            conn = job.conn
            assert conn is not None  # a long answer being relayed
            ex.conn = conn
            try:
                rec.first_token_at = time.time()
                status = rec.status = conn.status
                headers = client_headers(conn.headers)
                headers.append(("x-request-id", format_request_id(rec.id)))
                headers.append(("x-shardon-node", job.node.id))
                await self._relay(ex, conn, status, headers)
            finally:
                ex.conn = None
                conn.finish()
                self.scheduler.release(index, route, rec.tenant or "default", time.monotonic() - job.started)
            if job.node.failures:
                self.registry.record_success(job.node)
        finally:
            self._account(ex, route, job.principal, job.priority, prompt_estimate, estimate, [])

    @staticmethod
    def _bad_body(exc: msgspec.MsgspecError) -> errors.BadRequest:
        msg = str(exc)
        if isinstance(exc, msgspec.ValidationError):
            param = msg.rsplit("`$.", 1)[1].rstrip("`") if "`$." in msg else None
            if "missing required field" in msg:
                param = msg.split("`")[1]
            return errors.BadRequest(f"invalid request: {msg}", param=param)
        return errors.BadRequest(f"request body is not valid JSON: {msg}")

    def _priority(self, value: str, cap: int) -> int:
        priority = PRIORITY_BY_NAME.get(value.strip().lower())
        if priority is None:
            raise errors.BadRequest(
                f"X-Priority must be one of {', '.join(PRIORITY_NAMES)}, got {value!r}", param="X-Priority"
            )
        return min(priority, cap)

    async def _serve(self, scope: Scope, ex: Exchange) -> None:
        """Auth, body, routing fields, limits, a slot (now or queued), then the node."""
        rec = ex.rec
        if self.draining:
            raise errors.Draining("the gateway is shutting down", retry_after=5)
        headers = scope.headers
        principal = self.keys.authenticate(headers.get("authorization"), headers.get(self.tenant_header))
        tenant = principal.tenant
        rec.tenant = tenant.name
        if principal.key is not None:
            rec.key_id = principal.key.id
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise errors.PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        body = await ex.proto()
        size = rec.bytes_in = len(body)
        if size > self.max_body:
            raise errors.PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        try:
            req = routing_decoder.decode(body)
        except msgspec.MsgspecError as exc:
            raise self._bad_body(exc) from None
        model = rec.model = req.model
        stream = rec.stream = bool(req.stream)
        scheduler = self.scheduler
        route = scheduler.routes.get(model)
        lifecycle = self.lifecycle
        if route is None and lifecycle is not None:
            canonical = lifecycle.resolve(model)  # an alias of a managed model
            route = scheduler.routes.get(canonical) if canonical else None
        if route is None:
            raise errors.ModelNotFound(f"The model '{model}' does not exist", param="model")
        if principal.allowed_models is not None and model not in principal.allowed_models:
            raise errors.Forbidden(f"this API key may not use model '{model}'", param="model")
        value = headers.get("x-priority")
        if value is None:
            priority = min(self.default_priority, principal.max_priority)
        else:
            priority = self._priority(value, principal.max_priority)
        rec.priority = PRIORITY_NAMES[priority]
        prompt_estimate = size // 4
        estimate = prompt_estimate + (req.max_tokens or req.max_completion_tokens or self.default_max_tokens)

        budget = self.queue_timeout
        tok_buckets: list[Any] = []
        if principal.limited:
            req_buckets, tok_buckets = self.limiter.buckets(principal, time.monotonic())
            try:
                wait = self.limiter.admit(req_buckets, tok_buckets, estimate, time.monotonic(), budget)
            except errors.RateLimited:
                self.metrics.rate_limited(tenant.name, "tokens" if tok_buckets else "requests")
                raise
            if wait > 0:
                rec.overflow = True
                await self._wait_unless_gone(ex, wait)
                budget -= wait
        if stream:
            ex.hasher = OutputHasher()  # the receipt's output hash, and the real usage
            if not (req.stream_options and req.stream_options.include_usage):
                # Ask the node for the stream's real usage (for limits and the log); the client, who
                # did not ask for it, will not see the extra event.
                body = with_fields(body, stream_options={"include_usage": True})
                ex.stripper = UsageStripper()
        managed = lifecycle is not None and lifecycle.knows(route.name)
        if managed:
            assert lifecycle is not None
            if not route.candidates:  # not loaded: wait for it, queued, up to the deadline
                started = time.monotonic()
                await self._wait_for_model(ex, lifecycle, route.name, budget)
                budget = max(0.001, budget - (time.monotonic() - started))
            # In flight from now on: the model is not stopped or evicted under this request.
            lifecycle.request_started(route.name)
        try:
            index = scheduler.admit(route, tenant.name, tenant.weight)
            if index < 0:
                index = await self._wait_for_slot(ex, route, priority, tenant.name, estimate, tenant.weight, budget)
            elif self.watch_after_s:
                ex.timer = self.loop.call_later(self.watch_after_s, ex.watch)
            else:
                ex.watch()
            await self._dispatch(scope.path, ex, route, req, body, index)
        finally:
            if managed:
                assert lifecycle is not None
                lifecycle.request_finished(route.name)
            self._account(ex, route, principal, priority, prompt_estimate, estimate, tok_buckets)

    async def _wait_for_model(self, ex: Exchange, lifecycle: LifecycleManager, model: str, timeout: float) -> None:
        """Wait (queued) while a managed model loads; one load however many requests wait."""
        ex.rec.queued_at = ex.rec.queued_at or time.time()
        late = errors.QueueTimeout(f"model '{model}' was not ready within {timeout:g}s (still loading)")
        await self._wait_unless_gone(ex, timeout, late, lifecycle.ensure_ready(model))

    def _account(
        self,
        ex: Exchange,
        route: Route,
        principal: Principal,
        priority: int,
        prompt_estimate: int,
        estimate: float,
        tok_buckets: list[Any],
    ) -> None:
        """Real usage into the record; estimates corrected in the token buckets and the fair queue."""
        rec = ex.rec
        status = rec.status
        ok = 200 <= status < 300
        hasher = ex.hasher
        usage: dict[str, Any] | None = None
        if hasher is not None and ex.started:
            # A stream that reached the client, however it ended (a 502 or 499 keeps the usage
            # seen so far: the tokens the node did generate).
            if ok:
                rec.output_sha256 = hasher.hexdigest()
            usage = hasher.usage
            if not usage:
                rec.completion_tokens = hasher.text_events
        elif ok:
            usage = ex.usage
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
        if rec.dispatched_at is None:
            return  # never reached a node: nothing was used, nothing was charged
        actual = (rec.prompt_tokens or prompt_estimate) + (rec.completion_tokens or 0)
        delta = actual - estimate
        if tok_buckets:
            self.limiter.correct(tok_buckets, delta, time.monotonic())
        if rec.queued_at is not None:
            # Only a request the queue charged (popped) is corrected; one that left the queue
            # unserved (deadline, client gone) was never charged.
            route.queue.refund(self.scheduler.tenant_key(principal.tenant.name), priority, -delta)

    async def _wait_unless_gone(
        self,
        ex: Exchange,
        seconds: float,
        late: BaseException | None = None,
        event: asyncio.Future[Any] | None = None,
    ) -> None:
        """Wait for ``event`` (its exception is raised) or ``seconds`` (then ``late`` is raised, if
        given); :class:`~shardon.errors.ClientGone` as soon as the client leaves."""
        done: asyncio.Future[None] = self.loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if not done.done():
                if exc is None:
                    done.set_result(None)
                else:
                    done.set_exception(exc)

        def finished(fut: asyncio.Future[Any]) -> None:
            settle(None if fut.cancelled() else fut.exception())

        def gone() -> None:
            settle(errors.ClientGone())

        if event is not None:
            event.add_done_callback(finished)
        timer = self.loop.call_later(seconds, settle, late)
        ex.add_gone(gone)
        try:
            await done
        finally:
            timer.cancel()
            if event is not None:
                event.remove_done_callback(finished)
            ex.remove_gone(gone)

    async def _wait_for_slot(
        self, ex: Exchange, route: Route, priority: int, tenant: str, cost: float, weight: float, timeout: float
    ) -> int:
        scheduler = self.scheduler
        waiter = scheduler.enqueue(route, priority, tenant, cost, weight, timeout)
        if ex.rec.queued_at is None:
            ex.rec.queued_at = time.time()
        cancel = lambda: scheduler.cancel(waiter, errors.ClientGone())  # noqa: E731
        ex.add_gone(cancel)
        try:
            index = await waiter.future
        except asyncio.CancelledError:
            scheduler.abandon(waiter)
            raise
        finally:
            ex.remove_gone(cancel)
        if ex.gone:
            scheduler.release(index, route, tenant)
            raise errors.ClientGone()
        return index

    async def _dispatch(
        self,
        path: str,
        ex: Exchange,
        route: Route,
        req: RoutingFields,
        body: bytes,
        index: int,
        prior: UpstreamError | None = None,
    ) -> None:
        """Forward to the node holding slot ``index``; retry elsewhere while nothing reached the client.

        ``prior``: the first attempt already failed so (on the callback path); its slot is freed here.
        """
        rec = ex.rec
        tenant = rec.tenant or "default"
        scheduler = self.scheduler
        registry = self.registry
        tried: list[int] = []
        fresh = False
        method_path = self._method_paths.get(path) or b"POST " + path.encode()
        while True:
            node = registry.by_index[index]
            error: UpstreamError | None = prior
            if prior is not None:
                prior = None
                scheduler.release(index, route, tenant, time.time() - (rec.dispatched_at or time.time()))
            else:
                rec.node_id = node.id
                rec.backend = node.backend
                rec.model_file_sha256 = node.model_file_sha256
                rec.dispatched_at = dispatched = time.time()
                try:
                    served = route.served_names.get(index, req.model)
                    payload = body if served == req.model else with_fields(body, model=served)
                    await self._forward(ex, node, method_path, payload, fresh)
                except UpstreamError as exc:
                    error = exc
                finally:
                    scheduler.release(index, route, tenant, time.time() - dispatched)
            if error is None:
                if node.failures:
                    registry.record_success(node)
                return
            if ex.gone:
                raise errors.ClientGone()
            if not error.reused:
                registry.record_failure(node, str(error))
            if ex.started:
                await self._fail_stream(ex, error)
                return
            if rec.retries >= self.max_retries:
                raise errors.UpstreamFailed(f"node {node.id} failed: {error}")
            rec.retries += 1
            # A reused keep-alive connection the node had closed: same node, fresh connection.
            fresh = error.reused
            if not fresh:
                tried.append(index)
            index = scheduler.take(route, tenant, None if fresh else tried)
            if index < 0:
                index = await self._wait_for_slot(ex, route, 3, tenant, 0.0, 1.0, self.queue_timeout)
            log.info("request %s retried after: %s", format_request_id(rec.id), error)

    async def _forward(self, ex: Exchange, node: Node, method_path: bytes, body: bytes, fresh: bool) -> None:
        """One attempt on ``node``: send, wait for the head, answer at once or stream."""
        rec = ex.rec
        conn = None if fresh else node.pool.take_idle()
        if conn is None:
            conn = await node.pool.connect()
        ex.conn = conn
        try:
            conn.send(node.request_head(method_path, len(body)), body)
            while not conn.headers_done:
                await conn.wait()
            status = conn.status
            if status >= 500 and rec.retries < self.max_retries:
                # The node refused before producing anything: let another node try.
                while not conn.complete:
                    await conn.wait()
                raise UpstreamError(f"node answered {status}", before_first_byte=True)
            while not conn.chunks and not conn.complete:
                await conn.wait()
            rec.first_token_at = time.time()
            rec.status = status
            headers = client_headers(conn.headers)
            headers.append(("x-request-id", format_request_id(rec.id)))
            headers.append(("x-shardon-node", node.id))
            if conn.complete and not rec.stream:
                # The whole response arrived at once (the usual non-streamed answer): one write.
                data = conn.take()
                if status == 200:
                    sha, ex.usage = hash_response(data)
                    if rec.endpoint != "/v1/embeddings":  # no generated text to prove
                        rec.output_sha256 = sha
                rec.bytes_out = len(data)
                ex.started = True
                ex.proto.response_bytes(status, headers, data)
                return
            await self._relay(ex, conn, status, headers)
        finally:
            ex.conn = None
            conn.finish()

    async def _relay(self, ex: Exchange, conn: UpstreamConnection, status: int, headers: list[tuple[str, str]]) -> None:
        """Stream the node's response to the client chunk by chunk, as its bytes arrive."""
        rec = ex.rec
        transport = ex.transport = ex.proto.response_stream(status, headers)
        ex.started = True
        ok = status == 200
        hasher = ex.hasher if ok and rec.stream else None
        stripper = ex.stripper if ok else None
        whole = bytearray() if ok and not rec.stream else None  # a non-streamed body, for its hash
        sent = 0
        try:
            while True:
                data = conn.take()
                if data:
                    if hasher is not None:
                        hasher.feed_sse(data)
                    elif whole is not None:
                        whole += data
                    if stripper is not None:
                        data = stripper.feed(data)
                    if data:
                        sent += len(data)
                        try:
                            await transport.send_bytes(data)
                        except rsgi.closed_errors:
                            raise errors.ClientGone() from None
                if conn.complete:
                    break
                await conn.wait()
            if stripper is not None and (tail := stripper.flush()):
                sent += len(tail)
                await transport.send_bytes(tail)
            if whole is not None:
                sha, ex.usage = hash_response(bytes(whole))
                if rec.endpoint != "/v1/embeddings":
                    rec.output_sha256 = sha
        finally:
            rec.bytes_out = sent
            # A raised error's traceback keeps this frame alive; it must not keep the client's
            # stream open (granian closes it when the transport is released).
            del transport

    async def _fail_stream(self, ex: Exchange, error: UpstreamError) -> None:
        """After the first byte: no silent retry; the client is told in-band and the stream ends."""
        rec = ex.rec
        rec.status = 502
        rec.error_type = "upstream_error"
        if ex.transport is not None and rec.stream:
            event = errors.error_body(f"the node failed mid-stream: {error}", "server_error", "upstream_error")
            with contextlib.suppress(*rsgi.closed_errors):
                await ex.transport.send_bytes(b"data: " + event + b"\n\n")
