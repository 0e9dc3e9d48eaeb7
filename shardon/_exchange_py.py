"""One request's life, from its bytes to its record: the exchange both HTTP engines drive.

    prepare   routing fields, auth, body limits, route, priority, rate limits: a plan or an error
    admit     a slot now, or a future to wait on: the rate limit's tokens, a model load, the queue
    forward   the node picked, its connection, the request written
    respond   the node's response read and turned into what the client gets, one action at a time
    finish    the one place that fills the record, frees what the request holds, logs and counts it

An `Exchange` does no client I/O of its own (the design of h11's state machine): its steps return
what to do, and the engine's driver does it. The native engine drives it from socket callbacks
(`Exchange.serve` and the methods under "native engine": no task, no coroutine); the RSGI engines
from a coroutine that awaits only where a step waits (`shardon.rsgi.serve`). `RequestCore` is what
every exchange shares. The whole flow is described in docs/request-path.md.

This module is the reference and the source of its compiled form: setup.py compiles this very
file with Cython into ``_exchange_c``, typed by ``_exchange_c.pxd``; ``shardon.exchange`` picks one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from . import errors
from ._fast.sse import OutputHasher, UsageStripper, hash_response
from .endpoints import FORM, GENERATIVE, JSON_BODY
from .multipart import replace_field
from .schemas import (
    PRIORITY_BY_NAME,
    PRIORITY_NAMES,
    answer_usage,
    form_routing,
    node_body,
    priority_named,
    routing_fields,
)
from .store import RequestRecord, format_request_id, request_ids
from .upstream.base import UpstreamError
from .upstream.connection import client_header_lines, client_headers

__all__ = ["ANSWER", "DATA", "END", "RETRY", "START", "START_END", "WAIT", "Endpoint", "Exchange", "RequestCore"]

log = logging.getLogger("shardon.exchange")

# What `Exchange.respond` asks of its driver (the fields it reads are named with each).
WAIT = 0  # nothing to do until the node sends more
ANSWER = 1  # send a whole response: out_status, headers, out_data
START = 2  # start a streamed response: out_status, headers, out_data its first bytes
START_END = 3  # START, then END with no more bytes: the response arrived whole at once
DATA = 4  # send out_data (maybe empty) as more of the stream
END = 5  # send out_data as the stream's last bytes and end it
RETRY = 6  # the node failed before anything reached the client: `admit` again, then forward

# Admission stages (`Exchange.stage`).
_PREPARED = 0
_LIMITED = 1  # waiting for the rate limit's tokens
_LOADING = 2  # waiting for a model to load
_QUEUED = 3  # waiting in the model's queue
_RETRYING = 4  # a retry wants a slot
_CONNECTING = 5  # waiting for a new connection to the node
_SENT = 6  # the request is on the node

# A non-streamed answer not whole by this size is relayed as it arrives.
_WHOLE_LIMIT = 256 * 1024
_EMBEDDINGS = "/v1/embeddings"
_clock = time.time
_monotonic = time.monotonic


class Endpoint:
    """A ``/v1`` path served as an exchange, and its role (`shardon.endpoints`): how its body is read,
    limited and forwarded, and what is read of the answer."""

    __slots__ = ("form", "generative", "line", "max_body", "opaque", "path")

    def __init__(self, path: str, role: str, max_body: int) -> None:
        self.path = path
        self.line = b"POST " + path.encode()  # the request line to the node, less its version
        self.max_body = max_body
        self.generative = role == GENERATIVE  # usage asked for, output hashed, max_tokens shaped
        self.form = role == FORM  # a multipart form, forwarded with the client's Content-Type
        self.opaque = role in (JSON_BODY, FORM)  # the answer relayed as it comes, not hashed


class RequestCore:
    """What every exchange shares: settings read once, the gateway's services, the in-flight count.

    ``on_request`` is the native engine's entry (a whole request, served by callbacks). A finished
    record goes, in this order, to ``records`` (the request log, or the access log alone: ``log_row``
    is its row queue's own append, ``records.refused`` the fallback), the metrics (``observe``) and
    the ``on_finish`` hooks.
    """

    def __init__(
        self,
        config: Any,
        *,
        loop: Any,
        keys: Any,
        limiter: Any,
        scheduler: Any,
        registry: Any,
        lifecycle: Any,
        records: Any,
        metrics: Any,
        endpoints: dict[str, tuple[str, int]],
    ) -> None:
        self.loop = loop
        # path → Endpoint, from path → (role, body limit)
        self.endpoints = {path: Endpoint(path, role, limit) for path, (role, limit) in endpoints.items()}
        self.max_body = max(limit for _, limit in endpoints.values())  # the largest any endpoint takes
        self.queue_timeout = config.scheduler.queue_timeout_s
        self.default_priority = PRIORITY_BY_NAME[config.scheduler.default_priority]
        self.default_max_tokens = config.scheduler.default_max_tokens
        self.max_retries = config.upstream.max_retries
        self.tenant_header = config.auth.tenant_header.lower()
        self.ids = request_ids  # the process's id sequence (the request log seeds it at start)
        self.keys = keys
        self.limiter = limiter
        self.scheduler = scheduler
        self.registry = registry
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.records = records
        self.log_row = None if records is None else records.row_queue.append
        self.observe = metrics.observe_request if metrics.enabled else None
        self.on_finish: list[Callable[[RequestRecord], object]] = []
        self.on_idle: Callable[[], object] | None = None
        # ``server.trusted_proxies``' rule (shardon.proxies), when there are trusted proxies.
        self.client_address: Callable[[Any], str] | None = None
        self.in_flight = 0
        self.draining = False
        self.cutting = False  # the drain timeout has passed: what is left ends now (`cut`)
        self.callbacks = True  # the native engine serves whole requests by callbacks
        self.served_by_callbacks = 0

    def on_request(self, request: Any) -> bool:
        """The native engine's entry: serve a whole request by callbacks (True), or decline (False:
        not an exchange, or callbacks are off) so that it runs as an RSGI coroutine."""
        if not self.callbacks or request.method != "POST" or request.path not in self.endpoints:
            return False
        self.served_by_callbacks += 1
        Exchange(self, request.path, self.client_of(request)).serve(request)
        return True

    def cut(self) -> None:
        """The drain timeout has passed: what is in flight ends now, as a 503 (``shutting_down``):
        waiters told at once, node connections closed (a stream ends with an SSE error event)."""
        self.cutting = True
        self.scheduler.cancel_all(errors.Draining())
        for node in list(self.registry.nodes.values()):
            node.pool.close()

    def client_of(self, scope: Any) -> str:
        """The address a request is attributed to: its TCP peer, or whom a trusted proxy says."""
        client_address = self.client_address
        return scope.client if client_address is None else client_address(scope)

    def done(self, rec: RequestRecord) -> None:
        """A request has ended: count it out, log it, measure it."""
        self.in_flight -= 1
        if self.in_flight == 0 and self.draining and self.on_idle is not None:
            self.on_idle()
        log_row = self.log_row
        if log_row is not None and not log_row(rec):
            self.records.refused(rec)
        observe = self.observe
        if observe is not None:
            observe(rec)
        for hook in self.on_finish:
            hook(rec)


class Exchange:
    """One request, from its head to its record (see the module docstring for the steps)."""

    __slots__ = (
        "affinity",
        "body",
        "buckets",
        "budget",
        "conn",
        "content_type",
        "core",
        "dispatched",
        "done",
        "endpoint",
        "estimate",
        "fresh",
        "gone",
        "hasher",
        "index",
        "inject",
        "limit_wait",
        "managed",
        "model_held",
        "node",
        "node_headers",
        "out_data",
        "out_status",
        "overflow",
        "overflowed",
        "principal",
        "priority",
        "prompt_estimate",
        "rec",
        "req",
        "request",
        "route",
        "sent",
        "since",
        "stage",
        "streaming",
        "stripper",
        "tenant",
        "timer",
        "tried",
        "usage",
        "variant",
        "wait",
        "waiter",
        "weight",
        "whole",
    )

    def __init__(self, core: RequestCore, path: str, client: str) -> None:
        now = _clock()
        self.core = core
        self.endpoint = core.endpoints[path]
        self.content_type: bytes | None = None  # a form's, forwarded as the client sent it
        self.rec = RequestRecord(id=core.ids.next(now), received_at=now, endpoint=path, client_addr=client)
        core.in_flight += 1
        self.request: Any = None  # the native engine's request, when it drives this exchange
        self.stage = _PREPARED
        self.wait: Any = None  # the future the current step waits on
        self.waiter: Any = None  # the scheduler's queue entry, while queued
        self.timer: Any = None
        self.principal: Any = None
        self.tenant = "default"
        self.weight = 1.0
        self.route: Any = None
        self.variant: str | None = None  # the split's variant (its route is ``route``)
        self.affinity: Any = None  # the key of the route's policy (shardon.routing.policies)
        self.overflow: Any = None  # the overflow this request may take (shardon.routing.overflow)
        self.overflowed = False  # its slot is the overflow endpoint's
        self.req: Any = None
        self.body = b""
        self.priority = 0
        self.prompt_estimate = 0
        self.estimate = 0.0
        self.buckets: list[Any] | None = None  # the token buckets charged (rate-limited callers)
        self.limit_wait = 0.0
        self.budget = 0.0  # what is left of the queue deadline
        self.managed = False
        self.model_held = False  # lifecycle.request_started was called
        self.inject = False  # ask the node for the stream's usage (the client did not)
        self.index = -1  # the slot held (a node's index), -1 when none
        self.node: Any = None
        self.node_headers: list[tuple[bytes, bytes]] = []  # the node's response headers
        self.conn: Any = None
        self.fresh = False  # the next attempt needs a new connection (a kept-alive one was stale)
        self.tried: list[int] | None = None
        self.dispatched = 0.0  # monotonic time the slot was taken
        self.since = 0.0  # monotonic time the current wait began
        self.hasher: OutputHasher | None = None
        self.stripper: UsageStripper | None = None
        self.whole: bytearray | None = None  # a long non-streamed answer, for its hash
        self.usage: dict[str, Any] | None = None
        self.sent = 0
        self.streaming = False  # the client's response has started, as a stream
        self.gone = False  # the client disconnected
        self.done = False
        self.out_status = 0
        self.out_data = b""

    # == prepare =====================================================================================
    def authorize(self, headers: Any) -> None:
        """The head's checks: draining, the caller's key."""
        core = self.core
        rec = self.rec
        if core.draining:
            raise errors.Draining()
        principal = core.keys.authenticate(headers.get("authorization"), headers.get(core.tenant_header))
        self.principal = principal
        tenant = principal.tenant
        self.tenant = rec.tenant = tenant.name
        self.weight = tenant.weight
        if principal.key is not None:
            rec.key_id = principal.key.id

    def announced(self, headers: Any) -> None:
        """Before a body is read: one announced larger than the limit is refused unread (413)."""
        length = headers.get("content-length")
        max_body = self.endpoint.max_body
        if length is not None and length.isdigit() and int(length) > max_body:
            self.rec.bytes_in = int(length)  # (what it would have been, as a body read and refused logs)
            raise errors.PayloadTooLarge(f"request body exceeds {max_body} bytes")

    def prepare(self, headers: Any, body: bytes) -> None:
        """The body's checks and the plan: routing fields, model, priority, estimate, rate limits."""
        core = self.core
        rec = self.rec
        endpoint = self.endpoint
        size = rec.bytes_in = len(body)
        if size > endpoint.max_body:
            raise errors.PayloadTooLarge(f"request body exceeds {endpoint.max_body} bytes")
        if endpoint.form:
            content_type = headers.get("content-type")
            req: Any = form_routing(body, content_type)  # (400 for a bad form or no model)
            self.req = req
            self.content_type = content_type.encode("latin-1")
        else:
            req = self.req = routing_fields(body)  # (400 naming the field when one is missing or wrong)
        self.body = body
        model = rec.model = req.model
        stream = rec.stream = bool(req.stream)
        route = core.scheduler.routes.get(model)
        lifecycle = core.lifecycle
        if route is None and lifecycle is not None:
            canonical = lifecycle.resolve(model)  # an alias of a managed model
            if canonical is not None:
                route = core.scheduler.routes.get(canonical)
        if route is None:
            raise errors.ModelNotFound(f"The model '{model}' does not exist", param="model")
        self.route = route
        principal = self.principal
        allowed = principal.allowed_models
        if allowed is not None and model not in allowed:
            raise errors.Forbidden(f"this API key may not use model '{model}'", param="model")
        rules = route.rules
        if rules is not None:  # the split's variant, the policy's key, the overflow (shardon.routing)
            route = rules.apply(self, headers)
        value = headers.get("x-priority")  # (most requests send none: no call then)
        priority = core.default_priority if value is None else priority_named(value)
        priority = self.priority = min(priority, principal.max_priority)  # capped by the key
        rec.priority = PRIORITY_NAMES[priority]
        max_tokens = req.max_tokens or req.max_completion_tokens
        self.managed = lifecycle is not None and lifecycle.knows(route.name)
        if self.managed and not endpoint.opaque:
            # A model Shardon runs: its max_tokens default and cap, its request defaults.
            applied, self.body = lifecycle.shape_request(route.name, rec.endpoint, req, body)
            rec.max_tokens = applied
            max_tokens = applied or max_tokens
        self.prompt_estimate = size // 4
        self.estimate = self.prompt_estimate + (max_tokens or core.default_max_tokens)
        self.budget = core.queue_timeout
        if stream and endpoint.generative:
            self.hasher = OutputHasher()  # the receipt's output hash, and the real usage
            options = req.stream_options
            if options is None or not options.include_usage:
                # Ask the node for the stream's real usage (for limits and the log); the client, who
                # did not ask for it, does not see the extra event.
                self.inject = True
                self.stripper = UsageStripper()
        if principal.limited:  # (429 when the limits would hold it past its deadline)
            self.buckets, self.limit_wait = core.limiter.charge(principal, self.estimate, self.budget, _monotonic())

    # == admit =======================================================================================
    def admit(self) -> Any:
        """Take admission as far as it goes now: None once a slot is held (``index``), else a future
        to wait on; call again when it is done (a failure it carries is raised then)."""
        core = self.core
        stage = self.stage
        wait = self.wait
        if wait is not None:  # the wait is over
            self.wait = None
            timer = self.timer
            if timer is not None:
                self.timer = None
                timer.cancel()
            if stage == _QUEUED:
                self.waiter = None
                self._took(wait.result())  # raises QueueTimeout, ClientGone, ...
                if self.gone:
                    raise errors.ClientGone()
                return None
            wait.result()  # raises for a wait that failed (a model that did not load, the client gone)
            if stage == _LOADING:
                self.budget = max(0.001, self.budget - (_monotonic() - self.since))
        if self.gone:
            raise errors.ClientGone()
        route = self.route
        if stage == _RETRYING:
            self.overflowed = self.rec.overflow = False
            index = core.scheduler.take(route, self.tenant, None if self.fresh else self.tried)
            if index >= 0:
                self._took(index)
                return None
            return self._enqueue(3, 0.0, 1.0, core.queue_timeout)
        if stage == _PREPARED and self.limit_wait > 0:
            # Over a rate limit, but served in time once the tokens are there: wait for them.
            self.rec.limited = True
            self.budget -= self.limit_wait
            return self._sleep(_LIMITED, self.limit_wait, None)
        if self.managed and stage != _LOADING and not route.candidates:
            return self._load_model()
        if self.managed and not self.model_held:
            # In flight from now on: the model is not stopped or evicted under this request.
            self.model_held = True
            core.lifecycle.request_started(route.name)
        index = core.scheduler.admit(route, self.tenant, self.weight, self.affinity)
        if index >= 0:
            self._took(index)
            return None
        overflow = self.overflow
        if overflow is not None and overflow.admit(self):  # a slot on the overflow endpoint (shardon.routing)
            self.overflowed = self.rec.overflow = True
            self._took(overflow.index)
            return None
        return self._enqueue(self.priority, self.estimate, self.weight, self.budget)

    def _took(self, index: int) -> None:
        self.index = index
        self.dispatched = _monotonic()

    def _enqueue(self, priority: int, cost: float, weight: float, timeout: float) -> Any:
        waiter = self.core.scheduler.enqueue(self.route, priority, self.tenant, cost, weight, timeout, self.affinity)
        self.waiter = waiter
        if self.rec.queued_at is None:
            self.rec.queued_at = _clock()
        self.stage = _QUEUED
        wait = self.wait = waiter.future
        return wait

    def _sleep(self, stage: int, seconds: float, late: BaseException | None) -> Any:
        """A future of ours: done after ``seconds`` (failing with ``late`` if given), or sooner."""
        loop = self.core.loop
        wait = self.wait = loop.create_future()
        self.timer = loop.call_later(seconds, _settle, wait, late)
        self.stage = stage
        self.since = _monotonic()
        return wait

    def _load_model(self) -> Any:
        """Wait, queued, up to the deadline, while the model loads (one load however many wait)."""
        rec = self.rec
        model = self.route.name
        if rec.queued_at is None:
            rec.queued_at = _clock()
        late = errors.QueueTimeout(f"model '{model}' was not ready within {self.budget:g}s (still loading)")
        wait = self._sleep(_LOADING, self.budget, late)
        self.core.lifecycle.ensure_ready(model).add_done_callback(self._model_ready)
        return wait

    def _model_ready(self, ready: Any) -> None:
        wait = self.wait
        if self.stage == _LOADING and wait is not None:
            _settle(wait, None if ready.cancelled() else ready.exception())

    # == forward =====================================================================================
    def target(self) -> Any:
        """The node of the slot held, made this attempt's: an idle connection to it, or None while a
        new one opens (``wait``, its future: then `connected`)."""
        rec = self.rec
        node = self.node = self.core.registry.by_index[self.index]
        rec.node_id = node.id
        rec.backend = node.backend
        rec.model_file_sha256 = node.model_file_sha256
        rec.dispatched_at = _clock()
        pool = node.pool
        conn = None if self.fresh else pool.take_idle()
        if conn is None:
            self.stage = _CONNECTING
            self.wait = pool.open()
        return conn

    def connected(self) -> Any:
        """The new connection the wait was for (an `UpstreamError` if it could not be opened)."""
        wait = self.wait
        self.wait = None
        if self.gone:
            raise errors.ClientGone()
        return wait.result()

    def send(self, conn: Any) -> None:
        """Write the request on ``conn``: the client's bytes, unless the node knows the model by
        another name or the stream's usage must be asked for."""
        self.conn = conn
        self.stage = _SENT
        if self.request is not None:
            conn.listener = self
        model = self.req.model
        served = self.route.served_names.get(self.index, model)
        body = self.body
        content_type = self.content_type
        if content_type is not None:  # a form, with the client's Content-Type
            if served != model:
                body = replace_field(body, self.req.boundary, "model", served)
            conn.send(self.node.request_head_as(self.endpoint.line, content_type, len(body)), body)
            conn.wait_started = _monotonic()
            return
        if served != model or self.inject:
            body = node_body(body, self.req, served, self.inject)
        conn.send(self.node.request_head(self.endpoint.line, len(body)), body)
        conn.wait_started = _monotonic()  # the read timeout applies from now

    # == respond =====================================================================================
    def respond(self) -> int:
        """What to do after the node sent bytes or failed (an action, above); raises the error to
        answer (the retries spent, the client gone)."""
        conn = self.conn
        if self.gone:
            raise errors.ClientGone()
        error = conn.error
        if error is not None:
            return self.failed(error)
        if self.streaming:
            data = self._relayed(conn.take())
            if conn.complete:
                self.out_data = data + self._tail()
                self._release()
                return END
            self.out_data = data
            conn.wait_started = _monotonic()  # the read timeout starts again
            return DATA
        if not conn.headers_done:
            conn.wait_started = _monotonic()
            return WAIT
        status = conn.status
        rec = self.rec
        if status >= 500 and rec.retries < self.core.max_retries:
            # The node refused before producing anything: another node may do better.
            if conn.complete:
                return self.failed(UpstreamError(f"node answered {status}", before_first_byte=True))
            conn.wait_started = _monotonic()
            return WAIT
        if rec.stream:
            if conn.chunks or conn.complete:
                return self._start(conn, status)
            conn.wait_started = _monotonic()
            return WAIT
        if conn.complete:
            rec.first_token_at = _clock()
            rec.status = self.out_status = status
            self.node_headers = conn.headers
            data = self.out_data = conn.take()
            if status == 200:
                if self.endpoint.opaque:
                    self.usage = answer_usage(data)
                else:
                    sha, self.usage = hash_response(data)
                    if rec.endpoint != _EMBEDDINGS:  # no generated text to prove
                        rec.output_sha256 = sha
            rec.bytes_out = len(data)
            self._release()
            return ANSWER
        if conn.buffered > _WHOLE_LIMIT or (conn.chunks and self.endpoint.opaque):
            return self._start(conn, status)  # a long answer, or a node that streams: relayed as it arrives
        conn.wait_started = _monotonic()
        return WAIT

    def _start(self, conn: Any, status: int) -> int:
        rec = self.rec
        rec.first_token_at = _clock()
        rec.status = self.out_status = status
        self.node_headers = conn.headers
        if status != 200:
            self.hasher = self.stripper = None  # an error body: passed through as it is
        elif not rec.stream and not self.endpoint.opaque:
            self.whole = bytearray()
        self.streaming = True
        data = self._relayed(conn.take())
        if conn.complete:
            self.out_data = data + self._tail()
            self._release()
            return START_END
        self.out_data = data
        conn.wait_started = _monotonic()
        return START

    def _relayed(self, data: bytes) -> bytes:
        """The receipt's hash sees the node's bytes; the client gets them minus the usage event."""
        if data:
            hasher = self.hasher
            if hasher is not None:
                hasher.feed_sse(data)
            elif self.whole is not None:
                self.whole += data
            stripper = self.stripper
            if stripper is not None:
                data = stripper.feed(data)
            self.sent += len(data)
        return data

    def _tail(self) -> bytes:
        """The end of a relayed response: what the usage stripper held back, the long answer's hash."""
        tail = b""
        stripper = self.stripper
        if stripper is not None:
            tail = stripper.flush()
            self.sent += len(tail)
        whole = self.whole
        if whole is not None:
            sha, self.usage = hash_response(bytes(whole))
            if self.rec.endpoint != _EMBEDDINGS:
                self.rec.output_sha256 = sha
            self.whole = None
        return tail

    def headers(self) -> list[tuple[str, str]]:
        """The response's headers: the node's end-to-end ones, then the request's id and node."""
        headers = client_headers(self.node_headers)
        headers.append(("x-request-id", format_request_id(self.rec.id)))
        headers.append(("x-shardon-node", self.node.id))
        if self.variant is not None:
            headers.append(("x-shardon-variant", self.variant))
        return headers

    def header_lines(self) -> bytes:
        """`headers`, as the HTTP/1.1 header lines a writer of bytes sends."""
        lines = client_header_lines(self.node_headers) + b"x-request-id: %016x\r\nx-shardon-node: %s\r\n" % (
            self.rec.id,
            self.node.id.encode("latin-1"),
        )
        return lines if self.variant is None else lines + b"x-shardon-variant: %s\r\n" % self.variant.encode()

    def failed(self, error: UpstreamError) -> int:
        """The node failed (``error``): after the first byte the stream ends with an SSE error event
        (END); before it, the request is retried (RETRY) while retries are left."""
        rec = self.rec
        node = self.node
        self._release(error)
        if self.gone:
            raise errors.ClientGone()
        if self.core.cutting:  # Shardon closed it (the drain timeout): not the node's failure, no retry
            if not self.streaming:
                raise errors.Draining()
            return self._cut_short(errors.Draining())
        if not error.reused:
            self.core.registry.record_failure(node, str(error), error.refused)
        if self.streaming:  # after the first byte there is no silent retry: the client is told in-band
            return self._cut_short(errors.UpstreamFailed(f"the node failed mid-stream: {error}"))
        if rec.retries >= self.core.max_retries:
            raise errors.UpstreamFailed(f"node {node.id} failed: {error}")
        rec.retries += 1
        # A reused keep-alive connection the node had closed: the same node, on a fresh connection.
        self.fresh = error.reused
        if not self.fresh:
            if self.tried is None:
                self.tried = []
            self.tried.append(node.index)
        self.stage = _RETRYING
        log.info("request %s retried after: %s", format_request_id(rec.id), error)
        return RETRY

    def _cut_short(self, error: errors.ShardonError) -> int:
        """A started response ends on ``error``: in the record, and for SSE as a last error event."""
        self.rec.status = error.status
        self.rec.error_type = error.code
        self.out_data = b"" if self.hasher is None else b"data: " + error.body() + b"\n\n"
        return END

    def _release(self, error: UpstreamError | None = None) -> None:
        """The node's part is over: its connection back (pooled if its answer completed cleanly)
        and its slot freed, for the next waiting request."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.listener = None
            conn.finish()
        if self.index >= 0:
            self._free_slot()
            if error is None:
                node = self.node
                if self.rec.status >= 500:  # the node's own error answer, passed through
                    self.core.registry.record_failure(node, f"node answered {self.rec.status}")
                elif node.failures:
                    self.core.registry.record_success(node)

    def _free_slot(self) -> None:
        index = self.index
        if index >= 0:
            self.index = -1
            if self.overflowed:
                self.core.scheduler.balancer.release(index)  # the overflow endpoint's, no route's
                return
            self.core.scheduler.release(index, self.route, self.tenant, _monotonic() - self.dispatched)

    def _drop(self) -> None:
        """Stop the node's part now: its connection closed (which stops a generation), its slot freed."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.listener = None
            conn.close()  # wakes an RSGI driver waiting on it
        self._free_slot()

    # == the client ==================================================================================
    def client_lost(self) -> None:
        """The client disconnected: whatever the request waits on or runs is stopped at once (closing
        the node's connection stops the generation) and its slot freed; it ends as a 499."""
        if self.done or self.gone:
            return
        self.gone = True
        waiter = self.waiter
        if waiter is not None:
            self.core.scheduler.cancel(waiter, errors.ClientGone())  # its future fails
        wait = self.wait
        if wait is not None and not wait.done():
            if self.stage == _CONNECTING:
                wait.cancel()
            elif self.stage != _QUEUED:
                _settle(wait, errors.ClientGone())
        self._drop()
        if self.request is not None and self.wait is None:
            self.finish_with(errors.ClientGone())  # (a wait's callback does, once it has run)

    def error_answer(self, exc: BaseException) -> tuple[int, list[tuple[str, str]], bytes] | None:
        """The error edge: ``exc`` into the record, and the OpenAI-shaped answer to send (None when
        the response has started or the client is gone)."""
        rec = self.rec
        if self.core.cutting and not isinstance(exc, errors.ShardonError):
            exc = errors.Draining()  # the drain timeout: the engine's stop ended it
        rec.status, rec.error_type, answer = errors.answer(exc, format_request_id(rec.id), self.streaming, self.gone)
        if answer is not None and self.variant is not None:
            answer[1].append(("x-shardon-variant", self.variant))
        return answer

    # == finish ======================================================================================
    def finish(self) -> None:
        """The request is over, however it ended: the record's last fields, what it still holds
        freed, the usage charged, then the log, the metrics and the hooks. Runs once."""
        if self.done:
            return
        self.done = True
        core = self.core
        rec = self.rec
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            core.scheduler.abandon(waiter)
        elif self.wait is not None:
            self.wait.cancel()
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        self._drop()
        hasher = self.hasher
        usage = self.usage
        if hasher is not None and self.streaming:
            # A stream that reached the client, however it ended (a 502 or 499 keeps the usage
            # seen so far: the tokens the node did generate).
            if 200 <= rec.status < 300:
                rec.output_sha256 = hasher.hexdigest()
            usage = hasher.usage
            if not usage:
                rec.completion_tokens = hasher.text_events
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
        if self.streaming:
            rec.bytes_out = self.sent
        if self.model_held:
            core.lifecycle.request_finished(self.route.name)
        if rec.dispatched_at is not None and (self.buckets or rec.queued_at is not None):
            # The estimate charged, corrected by the real usage: the token buckets, and the fair
            # queue of a request it charged (popped; one that left unserved was never charged).
            delta = (rec.prompt_tokens or self.prompt_estimate) + (rec.completion_tokens or 0) - self.estimate
            if self.buckets:
                core.limiter.correct(self.buckets, delta, _monotonic())
            if rec.queued_at is not None:
                self.route.queue.refund(core.scheduler.tenant_key(self.tenant), self.priority, -delta)
        rec.finished_at = _clock()
        if self.overflowed or self.variant is not None:
            core.metrics.observe_routed(rec)
        core.done(rec)

    def finish_with(self, exc: BaseException) -> None:
        """End on ``exc`` (native engine): its answer sent if the response has not started; a
        stream cut by a fault closes its connection, so the client sees it was cut short."""
        answer = self.error_answer(exc)
        request = self.request
        request.on_lost = None
        if not request.disconnected:
            if not request.response_started:
                if answer is not None:
                    status, headers, body = answer
                    request.response_bytes(status, headers, body)
            elif not request.response_done:
                request.conn.close()
        self.finish()

    # == native engine: driven by socket callbacks ===================================================
    def serve(self, request: Any) -> None:
        """Serve a whole request of the native engine, from now on by callbacks."""
        self.request = request
        request.on_lost = self.client_lost
        try:
            headers = request.headers
            self.authorize(headers)  # (the caller first, as the coroutine does: then the body's size)
            if request.too_large:
                self.announced(headers)  # (raises as the coroutine does, when the size was announced)
                raise errors.PayloadTooLarge(f"request body exceeds {self.endpoint.max_body} bytes")
            chunks = request.body
            self.prepare(headers, chunks[0] if len(chunks) == 1 else b"".join(chunks))
            self._advance()
        except BaseException as exc:
            self.finish_with(exc)

    def _advance(self) -> None:
        """Admission, then the node: as far as it goes without waiting."""
        wait = self.admit()
        if wait is not None:
            wait.add_done_callback(self._admitted)
            return
        conn = self.target()
        if conn is None:
            self.wait.add_done_callback(self._opened)
            return
        self.send(conn)

    def _admitted(self, wait: Any) -> None:
        if self.done:
            return
        try:
            self._advance()
        except BaseException as exc:
            self.finish_with(exc)

    def _opened(self, wait: Any) -> None:
        if self.done:
            if not wait.cancelled() and wait.exception() is None:
                wait.result().finish()  # (unused: closed)
            return
        try:
            try:
                conn = self.connected()
            except UpstreamError as error:
                if self.failed(error) == RETRY:
                    self._advance()
                return
            self.send(conn)
        except BaseException as exc:
            self.finish_with(exc)

    def upstream_event(self) -> None:
        """The node sent bytes, or the request on it failed (told by its connection)."""
        if self.done:
            return
        request = self.request
        try:
            action = self.respond()
            if action == WAIT:
                return
            http = request.conn
            if action == DATA:
                data = self.out_data
                if data:
                    http.write_chunk(request, data)
                self._watch()
            elif action == ANSWER:
                request.on_lost = None
                http.send_encoded(request, self.out_status, self.header_lines(), self.out_data)
                self.finish()
            elif action == START:
                # The head and the first bytes in one write: one wake-up of the client, not two.
                http.start_encoded(request, self.out_status, self.header_lines(), self.out_data)
                self._watch()
            elif action == START_END:
                request.on_lost = None
                http.start_encoded(request, self.out_status, self.header_lines(), self.out_data)
                http.end_stream(request, b"")
                self.finish()
            elif action == END:
                request.on_lost = None
                http.end_stream(request, self.out_data)  # the last bytes and the terminating chunk
                self.finish()
            else:  # RETRY
                self._advance()
        except BaseException as exc:
            self.finish_with(exc)

    def _watch(self) -> None:
        """A client that reads slower than the node writes stops the reading of the node until
        its socket drains."""
        http = self.request.conn
        if http.write_paused and not http.closed:
            self.conn.hold(True)
            http.drain_hook = self._client_drained

    def _client_drained(self) -> None:
        conn = self.conn
        if conn is not None and not self.done:
            conn.hold(False)


def _settle(wait: Any, exc: BaseException | None) -> None:
    if not wait.done():
        if exc is None:
            wait.set_result(None)
        else:
            wait.set_exception(exc)
