"""The RSGI application: route table, the inference data path, and the error edge.

A request to ``/v1/chat/completions``, ``/v1/completions`` or ``/v1/embeddings`` goes:

    auth → body read (size-checked) → routing fields decoded → model allowed? → rate limits
      → slot (now, or queued) → node's keep-alive connection → response streamed back as the
      node's bytes → slot released → usage corrected → request log row + metrics

Errors become OpenAI-shaped JSON here and nowhere else. Once the first response byte has reached the
client there is no retry: a failing stream gets an SSE ``error`` event and ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import orjson
from granian.rsgi import HTTPProtocol, ProtocolClosed, Scope

from . import __version__, errors
from ._fast import LeastConnBalancer
from .auth import KeyStore, Principal, RateLimiter
from .config import Config, NodeConfig
from .lifecycle import BackendEndpoint, LifecycleManager
from .metrics import Metrics
from .nodes import Node, NodeRegistry
from .receipts import OutputHasher
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
from .store import RequestLog, RequestRecord
from .upstream.base import UpstreamError
from .upstream.pool import Sweeper, UpstreamConnection

log = logging.getLogger("shardon.app")
access_log = logging.getLogger("shardon.access")

JSON = [("content-type", "application/json")]
# Hop-by-hop and framing headers are Granian's business, not the node's.
_SKIP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})
# How long a request may run before Shardon starts watching for its client leaving. Short requests
# never pay for the watcher; long ones (generations) are cancelled within this delay.
_WATCH_AFTER_S = 0.02

Handler = Callable[[Scope, HTTPProtocol], Awaitable[None]]


class ClientWatch:
    """Notices a client that disconnects, and runs callbacks when it does."""

    __slots__ = ("callbacks", "gone", "task")

    def __init__(self, proto: HTTPProtocol) -> None:
        self.gone = False
        self.callbacks: list[Callable[[], object]] = []
        self.task = asyncio.ensure_future(proto.client_disconnect())
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        self.gone = True
        for cb in list(self.callbacks):
            cb()

    def close(self) -> None:
        self.task.cancel()
        self.callbacks.clear()


class Exchange:
    """Per-request state shared between the data path and the client watcher."""

    __slots__ = ("conn", "hasher", "proto", "rec", "started", "stripper", "timer", "transport", "watch")

    def __init__(self, proto: HTTPProtocol, rec: RequestRecord) -> None:
        self.proto = proto
        self.rec = rec
        self.conn: UpstreamConnection | None = None
        self.started = False  # a response byte has been handed to the client
        self.watch: ClientWatch | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.transport: Any = None  # the client's response stream, once started
        self.hasher: OutputHasher | None = None
        self.stripper: UsageStripper | None = None

    def ensure_watch(self) -> ClientWatch:
        if self.watch is None:
            self.watch = ClientWatch(self.proto)
            self.watch.callbacks.append(self._client_gone)
        return self.watch

    def _client_gone(self) -> None:
        conn = self.conn
        if conn is not None:
            conn.close()  # stops the generation on the node

    @property
    def client_gone(self) -> bool:
        return self.watch is not None and self.watch.gone

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watch is not None:
            self.watch.close()
        # Granian ends a streamed response when its transport object is released: drop it now,
        # not whenever the garbage collector breaks the exchange ↔ watcher cycle.
        self.transport = None


class Gateway:
    """The one object that owns all scheduling state; Granian calls it for every request."""

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
        self.draining = False
        self.in_flight = 0
        # Request ids: a random per-process prefix and a counter (unique, sortable, no syscall).
        self._id_prefix = os.urandom(6).hex()
        self._seq = 0
        self.started_at = time.time()
        self.request_log = request_log
        self.metrics = metrics or Metrics(enabled=False)
        self.keys = KeyStore(config.auth, config.tenants, request_log.path if request_log is not None else None)
        self.limiter = RateLimiter()
        self.on_finish: list[Callable[[RequestRecord], None]] = []
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
        from .admin import Admin

        self.admin = Admin(self)
        # Set in startup(), on the serving loop.
        self.loop: asyncio.AbstractEventLoop
        self.scheduler: Scheduler
        self.registry: NodeRegistry
        self._sweeper: Sweeper
        self.lifecycle: LifecycleManager | None = None

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
    async def _inference(self, scope: Scope, proto: HTTPProtocol) -> None:
        self._seq += 1
        rec = RequestRecord(
            id=f"{self._id_prefix}{self._seq:012x}",
            received_at=time.time(),
            endpoint=scope.path,
            client_addr=scope.client,
        )
        ex = Exchange(proto, rec)
        self.in_flight += 1
        try:
            await self._serve(scope, ex)
        except errors.ShardonError as err:
            rec.status = err.status
            rec.error_type = err.code
            if not ex.started:
                headers = err.headers()
                headers.append(("x-request-id", rec.id))
                proto.response_bytes(err.status, headers, err.body())
        except (errors.ClientGone, ProtocolClosed):
            rec.status = 499
            rec.error_type = "client_disconnected"
        except Exception as exc:  # a bug: answer 500 in OpenAI's shape, log it, lose nothing
            log.exception("request %s failed", rec.id)
            rec.status = 500
            rec.error_type = "internal_error"
            if not ex.started:
                internal = errors.ShardonError(f"internal error: {type(exc).__name__}")
                proto.response_bytes(500, internal.headers(), internal.body())
        finally:
            ex.close()
            rec.finished_at = time.time()
            self.in_flight -= 1
            if self.in_flight == 0 and self.draining:
                self._idle.set()
            self._finish(rec)

    def _finish(self, rec: RequestRecord) -> None:
        if self.request_log is not None:
            self.request_log.append(rec)
        self.metrics.observe_request(rec)
        for hook in self.on_finish:
            hook(rec)
        if access_log.isEnabledFor(logging.INFO):
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
                rec.id,
            )

    def _decode(self, body: bytes) -> RoutingFields:
        try:
            return routing_decoder.decode(body)
        except msgspec.ValidationError as exc:
            msg = str(exc)
            param = msg.rsplit("`$.", 1)[1].rstrip("`") if "`$." in msg else None
            if "missing required field" in msg:
                param = msg.split("`")[1]
            raise errors.BadRequest(f"invalid request: {msg}", param=param) from None
        except msgspec.DecodeError as exc:
            raise errors.BadRequest(f"request body is not valid JSON: {exc}") from None

    def _priority(self, value: str | None, cap: int) -> int:
        if value is None:
            return min(self.default_priority, cap)
        priority = PRIORITY_BY_NAME.get(value.strip().lower())
        if priority is None:
            raise errors.BadRequest(
                f"X-Priority must be one of {', '.join(PRIORITY_NAMES)}, got {value!r}", param="X-Priority"
            )
        return min(priority, cap)

    async def _serve(self, scope: Scope, ex: Exchange) -> None:
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
        rec.bytes_in = len(body)
        if len(body) > self.max_body:
            raise errors.PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        req = self._decode(body)
        rec.model = req.model
        stream = rec.stream = bool(req.stream)
        route = self.scheduler.route(req.model)
        lifecycle = self.lifecycle
        if route is None and lifecycle is not None:
            canonical = lifecycle.resolve(req.model)  # an alias of a managed model
            route = self.scheduler.route(canonical) if canonical else None
        if route is None:
            raise errors.ModelNotFound(f"The model '{req.model}' does not exist", param="model")
        if principal.allowed_models is not None and req.model not in principal.allowed_models:
            raise errors.Forbidden(f"this API key may not use model '{req.model}'", param="model")
        priority = self._priority(headers.get("x-priority"), principal.max_priority)
        rec.priority = PRIORITY_NAMES[priority]
        prompt_estimate = len(body) // 4
        estimate = prompt_estimate + (req.max_tokens or req.max_completion_tokens or self.default_max_tokens)

        budget = self.queue_timeout
        req_buckets, tok_buckets = self.limiter.buckets(principal, time.monotonic())
        if req_buckets or tok_buckets:
            try:
                wait = self.limiter.admit(req_buckets, tok_buckets, estimate, time.monotonic(), budget)
            except errors.RateLimited:
                self.metrics.rate_limited(tenant.name, "tokens" if tok_buckets else "requests")
                raise
            if wait > 0:
                rec.overflow = True
                await self._wait_unless_gone(ex, wait)
                budget -= wait
        if stream and not (req.stream_options and req.stream_options.include_usage):
            # Ask the node for the stream's real usage (for limits and the log); the client, who
            # did not ask for it, will not see the extra event.
            body = with_fields(body, stream_options={"include_usage": True})
            ex.stripper = UsageStripper()
        ex.hasher = OutputHasher()  # the receipt's output hash, and the real usage
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
            await self._admit_and_dispatch(scope, ex, route, req, body, principal, priority, estimate, budget)
        finally:
            if managed:
                assert lifecycle is not None
                lifecycle.request_finished(route.name)
            self._account(ex, route, principal, priority, prompt_estimate, estimate, tok_buckets)

    async def _admit_and_dispatch(
        self,
        scope: Scope,
        ex: Exchange,
        route: Route,
        req: RoutingFields,
        body: bytes,
        principal: Principal,
        priority: int,
        estimate: float,
        budget: float,
    ) -> None:
        tenant = principal.tenant
        self.scheduler.arrive(route, tenant.name, tenant.weight)
        index = self.scheduler.try_acquire(route, tenant.name)
        if index < 0:
            index = await self._wait_for_slot(ex, route, priority, tenant.name, estimate, tenant.weight, budget)
        else:
            ex.timer = self.loop.call_later(_WATCH_AFTER_S, ex.ensure_watch)
        await self._dispatch(scope, ex, route, req, body, index)

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
        hasher = ex.hasher
        if hasher is not None and rec.status and 200 <= rec.status < 300:
            if rec.endpoint != "/v1/embeddings":  # no generated text to prove
                rec.output_sha256 = hasher.hexdigest()
            usage = hasher.usage
            if usage:
                rec.prompt_tokens = usage.get("prompt_tokens")
                rec.completion_tokens = usage.get("completion_tokens")
            elif rec.stream:
                rec.completion_tokens = hasher.text_events
        actual = (rec.prompt_tokens or prompt_estimate) + (rec.completion_tokens or 0)
        if rec.dispatched_at is None:
            actual = 0  # never reached a node: nothing was used
        delta = actual - estimate
        if tok_buckets:
            self.limiter.correct(tok_buckets, delta, time.monotonic())
        if rec.queued_at is not None and rec.dispatched_at is not None:
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
        watch = ex.ensure_watch()
        watch.callbacks.append(gone)
        try:
            await done
        finally:
            timer.cancel()
            if event is not None:
                event.remove_done_callback(finished)
            if gone in watch.callbacks:
                watch.callbacks.remove(gone)

    async def _wait_for_slot(
        self, ex: Exchange, route: Route, priority: int, tenant: str, cost: float, weight: float, timeout: float
    ) -> int:
        scheduler = self.scheduler
        waiter = scheduler.enqueue(route, priority, tenant, cost, weight, timeout)
        if ex.rec.queued_at is None:
            ex.rec.queued_at = time.time()
        watch = ex.ensure_watch()
        cancel = lambda: scheduler.cancel(waiter, errors.ClientGone())  # noqa: E731
        watch.callbacks.append(cancel)
        try:
            index = await waiter.future
        except asyncio.CancelledError:
            scheduler.abandon(waiter)
            raise
        finally:
            if cancel in watch.callbacks:
                watch.callbacks.remove(cancel)
        if watch.gone:
            scheduler.release(index, route, tenant)
            raise errors.ClientGone()
        return index

    async def _dispatch(
        self, scope: Scope, ex: Exchange, route: Route, req: RoutingFields, body: bytes, index: int
    ) -> None:
        """Forward to the node holding slot ``index``; retry elsewhere while nothing reached the client."""
        rec = ex.rec
        tenant = rec.tenant or "default"
        scheduler = self.scheduler
        registry = self.registry
        tried: list[int] = []
        fresh = False
        method_path = b"POST " + scope.path.encode()
        while True:
            node = registry.by_index[index]
            rec.node_id = node.id
            rec.backend = node.backend
            rec.model_file_sha256 = node.model_file_sha256
            rec.dispatched_at = time.time()
            error: UpstreamError | None = None
            try:
                served = route.served_names.get(index, req.model)
                payload = body if served == req.model else with_fields(body, model=served)
                await self._forward(ex, node, method_path, payload, fresh=fresh)
            except UpstreamError as exc:
                error = exc
            finally:
                scheduler.release(index, route, tenant)
                scheduler.note_service_time(route, time.time() - rec.dispatched_at)
            if error is None:
                registry.record_success(node)
                return
            if ex.client_gone:
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
            log.info("request %s retried after: %s", rec.id, error)

    async def _forward(self, ex: Exchange, node: Node, method_path: bytes, body: bytes, *, fresh: bool) -> None:
        rec = ex.rec
        conn = None if fresh else node.pool.take_idle()
        if conn is None:
            conn = await node.pool.connect()
        ex.conn = conn
        transport = None
        try:
            conn.send(node.request_head(method_path, len(body)), body)
            status, upstream_headers = await conn.response_head()
            if status >= 500 and rec.retries < self.max_retries:
                # The node refused before producing anything: let another node try.
                while await conn.read():
                    pass
                raise UpstreamError(f"node answered {status}", before_first_byte=True)
            headers = _client_headers(upstream_headers)
            headers.append(("x-request-id", rec.id))
            headers.append(("x-shardon-node", node.id))
            hasher = ex.hasher if status == 200 else None
            data = await conn.read()
            rec.first_token_at = time.time()
            rec.status = status
            if conn.complete and not rec.stream:
                # The whole response arrived at once (the usual non-streamed answer): one write.
                if hasher is not None:
                    hasher.feed_json(data)
                rec.bytes_out = len(data)
                ex.started = True
                ex.proto.response_bytes(status, headers, data)
                return
            transport = ex.transport = ex.proto.response_stream(status, headers)
            ex.started = True
            stripper = ex.stripper if status == 200 else None
            sse = rec.stream
            sent = 0
            while data:
                if hasher is not None and sse:
                    hasher.feed_sse(data)
                if stripper is not None:
                    data = stripper.feed(data)
                if data:
                    sent += len(data)
                    try:
                        await transport.send_bytes(data)
                    except ProtocolClosed:
                        rec.bytes_out = sent
                        raise errors.ClientGone() from None
                data = await conn.read()
            if stripper is not None and (tail := stripper.flush()):
                sent += len(tail)
                await transport.send_bytes(tail)
            rec.bytes_out = sent
        finally:
            # A raised error's traceback keeps this frame alive; it must not keep the client's
            # stream open (Granian closes it when the transport is released).
            transport = None
            ex.conn = None
            conn.finish()

    async def _fail_stream(self, ex: Exchange, error: UpstreamError) -> None:
        """After the first byte: no silent retry; the client is told in-band and the stream ends."""
        rec = ex.rec
        rec.status = 502
        rec.error_type = "upstream_error"
        if ex.transport is not None and rec.stream:
            event = errors.error_body(f"the node failed mid-stream: {error}", "server_error", "upstream_error")
            with contextlib.suppress(ProtocolClosed):
                await ex.transport.send_bytes(b"data: " + event + b"\n\n")


_header_cache: dict[tuple[tuple[bytes, bytes], ...], list[tuple[str, str]]] = {}


def _client_headers(upstream: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The node's response headers for the client, minus framing; cached, as nodes repeat them."""
    key = tuple(pair for pair in upstream if pair[0].lower() not in _SKIP_HEADERS)
    cached = _header_cache.get(key)
    if cached is None:
        cached = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in key]
        if len(_header_cache) < 1024:
            _header_cache[key] = cached
    return list(cached)
