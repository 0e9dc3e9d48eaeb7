"""Mock OpenAI-compatible inference node (stands in for llama.cpp's server / vLLM in tests and benchmarks).

A raw asyncio ``Protocol`` on uvloop with an ``httptools`` request parser: HTTP/1.1 keep-alive,
``Connection: close`` honoured, no framework. Constant responses are encoded once.

Endpoints
    GET  /health                 200 {"status": "ok"}
    GET  /v1/models              OpenAI model list of ``MockConfig.models``
    POST /v1/chat/completions    deterministic "tok0 tok1 ..." text, streaming (SSE, chunked) or not
    POST /v1/completions         same, ``text_completion`` objects
    POST /v1/embeddings          deterministic vectors (``encoding_format`` float or base64)
    ...                          the rest of the OpenAI API, /metrics and /slots: ``mock_endpoints``
    GET  /mock/stats             the node's ``MockStats`` as JSON (control endpoints are never counted)
    POST /mock/reset             zero the counters
    POST /mock/fail              body {"mode": "before" | "mid" | "status500" | "status503" | "hang" | null}

Generation: N = min(max_completion_tokens or max_tokens, chunks) tokens, token i is ``"tok{i} "``;
finish_reason is "length" when the request's limit cut the text, else "stop". A stream sends its headers
at once, the first token ``ttft_ms`` later and each next one ``delay_ms`` after the previous, each token
as its own SSE event in its own HTTP chunk; then a final chunk with finish_reason, a usage chunk
(``"choices": []``) when ``stream_options.include_usage`` is true, and ``data: [DONE]``. The first chat
token's delta carries ``"role": "assistant"``. A non-streaming answer is sent when the last token would
have been (``ttft_ms + (N - 1) * delay_ms``).

Failure injection, per request through the body's ``"mock"`` object (the gateway forwards unknown fields
untouched) - ``{"chunks", "delay_ms", "ttft_ms", "fail", "fail_after"}`` - or for every request through
``MockNode.set_fail(mode)`` / ``POST /mock/fail``:
    before     close the connection without a response
    mid        send the headers and ``fail_after`` (default 2) tokens, then abort the connection
               (non-streaming: the headers and half of the body)
    status500  an OpenAI error body with status 500 (status503: 503)
    hang       accept and never answer, until the client goes away (counted as cancelled)

Run it: ``python -m shardon.upstream.mock --port 9001 --models a,b --delay-ms 20 --name node-a``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, cast

import httptools
import msgspec
import orjson

from ..listener import Listener, listen
from . import mock_endpoints

try:
    import uvloop as _uvloop_mod

    _uvloop: Any = _uvloop_mod
except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
    _uvloop = None

__all__ = ["FAIL_MODES", "MockConfig", "MockNode", "MockNodeThread", "MockStats", "main", "new_event_loop"]

FailMode = Literal["before", "mid", "status500", "status503", "hang"]
FAIL_MODES: tuple[str, ...] = ("before", "mid", "status500", "status503", "hang")


class MockConfig(msgspec.Struct, kw_only=True):
    """How a mock node behaves. ``chunks``/``delay_ms``/``ttft_ms``/``max_concurrent``/
    ``require_api_key`` are read per request (they may be changed on a running node);
    ``models``, ``name`` and ``embedding_dim`` are encoded when the node is built."""

    models: list[str] = msgspec.field(default_factory=lambda: ["mock-model"])
    chunks: int = 16
    delay_ms: float = 0.0
    ttft_ms: float = 0.0
    max_concurrent: int | None = None
    embedding_dim: int = 8
    name: str = "mock"
    require_api_key: str | None = None


class MockStats:
    """What reached the node. Control requests (``/mock/...``) are not counted.

    - ``total_requests``: every other request parsed.
    - ``completed``: 2xx responses sent in full.  ``errors``: error responses sent (4xx/5xx, incl.
      injected status500/503 and ``rejected``).  ``rejected``: 503s because of ``max_concurrent``.
    - ``aborted``: connections the node dropped on purpose (fail ``before``/``mid``).
    - ``cancelled``: the client closed the connection before its response was finished.
    - ``in_flight``/``max_in_flight``: generations (chat, completions, embeddings) running / high-water.
    """

    __slots__ = (
        "_last_headers_raw",
        "aborted",
        "cancelled",
        "completed",
        "connections_open",
        "errors",
        "in_flight",
        "last_body",
        "max_in_flight",
        "per_path_raw",
        "rejected",
        "total_requests",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.connections_open = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` and ``connections_open`` describe live state and stay."""
        self.max_in_flight = self.in_flight
        self.total_requests = 0
        self.completed = 0
        self.cancelled = 0
        self.errors = 0
        self.rejected = 0
        self.aborted = 0
        self.per_path_raw: dict[bytes, int] = {}
        self._last_headers_raw: list[tuple[bytes, bytes]] = []
        self.last_body = b""

    @property
    def per_path(self) -> dict[str, int]:
        return {k.decode("latin-1"): v for k, v in list(self.per_path_raw.items())}

    @property
    def last_headers(self) -> dict[str, str]:
        """Headers of the last counted request (a probe of /health, /metrics or /slots aside), names
        lower-cased (a repeated name keeps the last)."""
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._last_headers_raw}

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "total_requests": self.total_requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "errors": self.errors,
            "rejected": self.rejected,
            "aborted": self.aborted,
            "connections_open": self.connections_open,
            "per_path": self.per_path,
            "last_headers": self.last_headers,
            "last_body": self.last_body.decode("utf-8", "replace"),
        }

    def __repr__(self) -> str:
        return f"MockStats({self.as_dict()!r})"


# ---------------------------------------------------------------------------------------------- requests


class _Overrides(msgspec.Struct, kw_only=True):
    chunks: int | None = None
    delay_ms: float | None = None
    ttft_ms: float | None = None
    fail: FailMode | None = None
    fail_after: int | None = None


class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class _Part(msgspec.Struct, kw_only=True):
    text: str | None = None


class _Message(msgspec.Struct, kw_only=True):
    content: str | list[_Part] | None = None


class _ChatReq(msgspec.Struct, kw_only=True):
    messages: list[_Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    mock: _Overrides | None = None


class _CompletionReq(msgspec.Struct, kw_only=True):
    prompt: str | list[Any]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    mock: _Overrides | None = None


class _EmbeddingReq(msgspec.Struct, kw_only=True):
    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    mock: _Overrides | None = None


class _FailReq(msgspec.Struct, kw_only=True):
    mode: FailMode | None = None


_chat_decoder = msgspec.json.Decoder(_ChatReq)
_completion_decoder = msgspec.json.Decoder(_CompletionReq)
_embedding_decoder = msgspec.json.Decoder(_EmbeddingReq)
_fail_decoder = msgspec.json.Decoder(_FailReq)


def _text_bytes(value: Any) -> int:
    """Byte length of the text in a prompt / content value (token-id lists count one per id)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int):
                total += 4
            else:
                total += _text_bytes(item)
        return total
    if isinstance(value, _Part):
        return len(value.text.encode()) if value.text else 0
    return 0


def _estimate(nbytes: int) -> int:
    return max(1, nbytes // 4)


_TOKENS: list[str] = []
_CONTENT: dict[int, str] = {}


def _content(n: int) -> str:
    text = _CONTENT.get(n)
    if text is None:
        text = "".join(f"tok{i} " for i in range(n))
        if len(_CONTENT) < 4096:
            _CONTENT[n] = text
    return text


def _vector(text: bytes, dim: int) -> list[float]:
    """Deterministic vector in [-1, 1) from the text; values are multiples of 1/128 so they are exact
    in float32 (the base64 encoding returns the same numbers)."""
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.blake2b(text, digest_size=64, person=counter.to_bytes(16, "little")).digest()
        out.extend((b - 128) / 128.0 for b in digest)
        counter += 1
    return out[:dim]


# ---------------------------------------------------------------------------------------------- HTTP

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def _error(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


_E_BAD_JSON = "We could not parse the JSON body of your request: {}"
_CHAT = 1
_COMPLETION = 2
_EMBEDDING = 3


class _Conn(asyncio.Protocol):
    """One client connection. Requests are answered one at a time; a request that arrives while a
    response is still being produced waits its turn (``pending``)."""

    __slots__ = (
        "body",
        "busy",
        "expect",
        "gen",
        "headers",
        "node",
        "parser",
        "pending",
        "timer",
        "transport",
        "url",
    )

    def __init__(self, node: MockNode) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.expect = False
        self.busy = False  # a response is still being produced
        self.gen = False  # counted in stats.in_flight
        self.timer: asyncio.TimerHandle | None = None
        self.pending: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes, bool]] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.node._conns.add(self)
        self.node.stats.connections_open += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("Protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._protocol_error(f"Malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        node = self.node
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.busy:
            self.busy = False
            node.stats.cancelled += 1
        if self.gen:
            self.gen = False
            node.stats.in_flight -= 1
        self.pending = None
        if self in node._conns:
            node._conns.discard(self)
            node.stats.connections_open -= 1
        self.transport = None
        self.parser = None  # type: ignore[assignment]  # a cycle through its callbacks: free it at once

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []
        self.expect = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            self.expect = True

    def on_headers_complete(self) -> None:
        if self.expect and not self.busy and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        parts = self.body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        req = (self.parser.get_method(), self.url, self.headers, body, self.parser.should_keep_alive())
        if self.busy:
            if self.pending is None:
                self.pending = []
            self.pending.append(req)
            return
        self.node._handle(self, *req)

    # -- helpers used by the node
    def _protocol_error(self, message: str) -> None:
        transport = self.transport
        if transport is None:
            return
        if not self.busy:
            transport.write(self.node._encode(400, _error(message, "invalid_request_error"), False))
        self.busy = False
        transport.close()

    def _next(self) -> None:
        """Answer requests that arrived while the previous response was being produced."""
        while self.pending and not self.busy and self.transport is not None:
            req = self.pending.pop(0)
            self.node._handle(self, *req)


class _Gen:
    """A deferred generation: one timer at a time, stored on the connection so ``connection_lost``
    can cancel it."""

    __slots__ = (
        "conn",
        "fail",
        "fail_after",
        "final",
        "i",
        "keep",
        "kind",
        "n",
        "node",
        "payload",
        "post",
        "pre",
        "pre0",
        "start",
        "step",
    )

    def __init__(self, node: MockNode, conn: _Conn, kind: int, keep: bool) -> None:
        self.node = node
        self.conn = conn
        self.kind = kind
        self.keep = keep
        self.n = 0
        self.i = 0
        self.start = 0.0
        self.step = 0.0
        self.fail: str | None = None
        self.fail_after = 2
        self.pre = b""
        self.pre0 = b""
        self.post = b""
        self.final = b""
        self.payload = b""

    def schedule(self, when: float, callback: Callable[[], None]) -> None:
        self.conn.timer = self.node._loop_or_raise().call_at(when, callback)

    # non-streaming: the whole response at once (or half of it, then abort, for fail=mid)
    def send_payload(self) -> None:
        conn = self.conn
        conn.timer = None
        transport = conn.transport
        if transport is None:
            return
        if self.fail == "mid":
            head_end = self.payload.find(b"\r\n\r\n") + 4
            transport.write(self.payload[: head_end + (len(self.payload) - head_end) // 2])
            self.node._abort(conn)
            return
        transport.write(self.payload)
        self.node._finish(conn, self.keep, True)

    # streaming
    def tick(self) -> None:
        conn = self.conn
        conn.timer = None
        transport = conn.transport
        if transport is None:
            return
        if self.fail == "mid" and self.i >= min(self.fail_after, self.n):
            self.node._abort(conn)
            return
        n = self.n
        limit = n if self.fail != "mid" else min(n, self.fail_after)
        if self.step <= 0.0:
            # no inter-token delay: every remaining token now, each still its own HTTP chunk
            out = [self.event(i) for i in range(self.i, limit)]
            self.i = limit
        else:
            out = [self.event(self.i)] if self.i < limit else []
            self.i += len(out)
        if self.i >= n and self.fail != "mid":
            out.append(self.final)
            transport.write(b"".join(out))
            self.node._finish(conn, self.keep, True)
            return
        if out:
            transport.write(b"".join(out))
        when = self.start + self.step * self.i if self.i < n else self.node._loop_or_raise().time()
        self.schedule(when, self.tick)

    def event(self, i: int) -> bytes:
        ev = b"%s%d%s" % (self.pre0 if i == 0 else self.pre, i, self.post)
        return b"%x\r\n%s\r\n" % (len(ev), ev)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class MockNode:
    """An in-process mock node on the running event loop.

    ``port = await node.start()``, ``node.url``, ``node.stats``, ``node.set_fail(mode)``,
    ``await node.stop()``; or ``async with MockNode(cfg) as node: ...``.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config if config is not None else MockConfig()
        self.stats = MockStats()
        self.host = "127.0.0.1"
        self.port = 0
        self._fail: str | None = None
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_Conn] = set()
        self._seq = 0
        self.reported = mock_endpoints.Reported()  # what its /metrics and /slots say
        self._build()

    # -- lifecycle
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve; returns the bound port."""
        if self._listeners:
            raise RuntimeError("mock node already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.host = host
        # The gateway's own listener: every queued client per wake-up. libuv's takes one per loop
        # pass, which, on a node busy streaming, holds new connections for hundreds of ms and puts
        # the node's accept queue, not the proxy in front of it, in a benchmark's figures.
        self._listeners = listen(loop, host, port, 2048, lambda: _Conn(self))
        self.port = self._listeners[0].sock.getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the listening socket and every open connection."""
        listeners, self._listeners = self._listeners, []
        if not listeners:
            return
        for listener in listeners:
            listener.close()
        for conn in list(self._conns):
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            if conn.transport is None:
                continue
            if conn.busy:
                conn.transport.abort()
            else:
                conn.transport.close()
        for _ in range(200):
            if not self._conns:
                break
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> MockNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_fail(self, mode: str | None) -> None:
        """Make every request (control endpoints excepted) fail this way until ``set_fail(None)``."""
        if mode is not None and mode not in FAIL_MODES:
            raise ValueError(f"unknown fail mode {mode!r}; expected one of {FAIL_MODES}")
        self._fail = mode

    @property
    def fail_mode(self) -> str | None:
        return self._fail

    def reset_stats(self) -> None:
        self.stats.reset()

    def _loop_or_raise(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            raise RuntimeError("mock node not started")
        return loop

    # -- pre-encoded pieces
    def _build(self) -> None:
        cfg = self.config
        self._models = frozenset(cfg.models)
        self._default_model = cfg.models[0] if cfg.models else "mock-model"
        name_hdr = cfg.name.encode("latin-1", "replace").replace(b"\r", b"").replace(b"\n", b"")
        self._fingerprint = cfg.name
        self._heads: dict[tuple[int, bool], bytes] = {}
        for status, reason in _REASONS.items():
            for keep in (True, False):
                self._heads[status, keep] = (
                    b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nX-Mock-Node: %s\r\n"
                    b"Connection: %s\r\nContent-Length: "
                    % (status, reason, name_hdr, b"keep-alive" if keep else b"close")
                )
        self._stream_heads = {
            keep: b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nX-Mock-Node: %s\r\nConnection: %s\r\n\r\n"
            % (name_hdr, b"keep-alive" if keep else b"close")
            for keep in (True, False)
        }
        created = int(time.time())
        health = orjson.dumps({"status": "ok"})
        models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": created, "owned_by": "shardon-mock"} for m in cfg.models
                ],
            }
        )
        self._const = {(b"/health", keep): self._encode(200, health, keep) for keep in (True, False)} | {
            (b"/v1/models", keep): self._encode(200, models, keep) for keep in (True, False)
        }
        self._e401 = _error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    def _encode(self, status: int, body: bytes, keep: bool) -> bytes:
        return b"%s%d\r\n\r\n%s" % (self._heads[status, keep], len(body), body)

    # -- request handling
    def _handle(
        self,
        conn: _Conn,
        method: bytes,
        url: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep: bool,
    ) -> None:
        transport = conn.transport
        if transport is None:
            return
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        if path.startswith(b"/mock/"):
            self._control(conn, method, path, body, keep)
            return
        st = self.stats
        st.total_requests += 1
        pp = st.per_path_raw
        pp[path] = pp.get(path, 0) + 1
        if path not in _PROBED:  # the last request a client made, not a gateway's probe
            st._last_headers_raw = headers
            st.last_body = body
        try:
            fail = self._fail
            if fail is not None:
                kind = _KINDS.get(path, 0)
                if fail == "mid" and kind in (_CHAT, _COMPLETION) and method == b"POST":
                    self._generate(conn, kind, body, keep, "mid")
                else:
                    self._inject(conn, fail, keep, kind, 2, kind == 0)
                return
            if path == b"/health" and self.reported.health:
                if method != b"GET":
                    self._send_error(conn, 405, _error("Method Not Allowed", "invalid_request_error"), keep)
                    return
                transport.write(self._const[b"/health", keep])
                self._finish(conn, keep, True)
                return
            key = self.config.require_api_key
            if key is not None and not self._authorized(headers, key):
                self._send_error(conn, 401, self._e401, keep)
                return
            kind = _KINDS.get(path, 0)
            if kind:
                if method != b"POST":
                    self._send_error(conn, 405, _error("Method Not Allowed", "invalid_request_error"), keep)
                    return
                if kind == _EMBEDDING:
                    self._embeddings(conn, body, keep)
                else:
                    self._generate(conn, kind, body, keep)
                return
            if path == b"/v1/models" and method == b"GET":
                transport.write(self._const[b"/v1/models", keep])
                self._finish(conn, keep, True)
                return
            if mock_endpoints.handle(self, conn, method, path, headers, body, keep):
                return
            msg = f"Invalid URL ({method.decode('latin-1')} {path.decode('latin-1')})"
            self._send_error(conn, 404, _error(msg, "invalid_request_error"), keep)
        except Exception as exc:  # a bug in the mock: answer 500 rather than hang the client
            if conn.transport is not None and not conn.busy:
                body500 = _error(f"mock node error: {exc!r}", "server_error")
                self._send_error(conn, 500, body500, False)

    @staticmethod
    def _authorized(headers: list[tuple[bytes, bytes]], key: str) -> bool:
        want = b"Bearer " + key.encode()
        for name, value in headers:
            if len(name) == 13 and name.lower() == b"authorization":
                return value.strip() == want
        return False

    def _send_error(self, conn: _Conn, status: int, body: bytes, keep: bool) -> None:
        transport = conn.transport
        if transport is None:
            return
        transport.write(self._encode(status, body, keep))
        self._finish(conn, keep, False)

    def _finish(self, conn: _Conn, keep: bool, ok: bool) -> None:
        """The response has been written in full."""
        st = self.stats
        if ok:
            st.completed += 1
        else:
            st.errors += 1
        conn.busy = False
        if conn.gen:
            conn.gen = False
            st.in_flight -= 1
        transport = conn.transport
        if not keep:
            conn.pending = None
            if transport is not None:
                transport.close()
        elif conn.pending:
            conn._next()

    def _abort(self, conn: _Conn) -> None:
        """Drop the connection on purpose (injected failure)."""
        self.stats.aborted += 1
        conn.busy = False
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.transport is not None:
            conn.transport.abort()

    def _begin(self, conn: _Conn) -> None:
        st = self.stats
        conn.gen = True
        st.in_flight += 1
        if st.in_flight > st.max_in_flight:
            st.max_in_flight = st.in_flight

    def _inject(self, conn: _Conn, fail: str, keep: bool, kind: int, fail_after: int, plain: bool) -> bool:
        """Apply an injected failure that needs no generation; False when the caller must run one
        (``mid`` on a generation endpoint)."""
        transport = conn.transport
        assert transport is not None
        if fail == "before":
            self._abort_before(conn)
            return True
        if fail == "hang":
            conn.busy = True
            return True
        if fail == "status500":
            self._send_error(conn, 500, _error("Injected failure (mock status500)", "server_error"), keep)
            return True
        if fail == "status503":
            body = _error("Injected failure (mock status503)", "server_error", "service_unavailable")
            self._send_error(conn, 503, body, keep)
            return True
        # mid on something that is not a generation: headers and half a body, then abort
        if plain or kind == _EMBEDDING:
            payload = self._encode(200, b'{"status":"ok","mock":"mid-failure-padding"}', keep)
            transport.write(payload[: len(payload) - 20])
            self._abort(conn)
            return True
        return False

    def _abort_before(self, conn: _Conn) -> None:
        self.stats.aborted += 1
        conn.busy = False
        if conn.transport is not None:
            conn.transport.close()

    def _next_id(self) -> int:
        self._seq += 1
        return self._seq

    def _check_model(self, conn: _Conn, model: str | None, keep: bool) -> str | None:
        if model is None:
            return self._default_model
        if model in self._models:
            return model
        msg = f"The model `{model}` does not exist or you do not have access to it."
        self._send_error(conn, 404, _error(msg, "invalid_request_error", "model_not_found", "model"), keep)
        return None

    def _at_capacity(self, conn: _Conn, keep: bool) -> bool:
        cap = self.config.max_concurrent
        if cap is not None and self.stats.in_flight >= cap:
            self.stats.rejected += 1
            msg = f"The mock node is at capacity (max_concurrent={cap})."
            self._send_error(conn, 503, _error(msg, "server_error", "overloaded"), keep)
            return True
        return False

    def _bad_request(self, conn: _Conn, message: str, keep: bool, param: str | None = None) -> None:
        self._send_error(conn, 400, _error(message, "invalid_request_error", None, param), keep)

    def _generate(self, conn: _Conn, kind: int, body: bytes, keep: bool, forced: str | None = None) -> None:
        req: _ChatReq | _CompletionReq
        try:
            req = _chat_decoder.decode(body) if kind == _CHAT else _completion_decoder.decode(body)
        except msgspec.DecodeError as exc:
            self._bad_request(conn, _E_BAD_JSON.format(exc), keep)
            return
        model = self._check_model(conn, req.model, keep)
        if model is None:
            return
        cfg = self.config
        chunks, delay_ms, ttft_ms, fail_after = cfg.chunks, cfg.delay_ms, cfg.ttft_ms, 2
        fail: str | None = None
        mock = req.mock
        if mock is not None:
            if mock.chunks is not None:
                chunks = mock.chunks
            if mock.delay_ms is not None:
                delay_ms = mock.delay_ms
            if mock.ttft_ms is not None:
                ttft_ms = mock.ttft_ms
            fail = mock.fail
            if mock.fail_after is not None:
                fail_after = mock.fail_after
        if forced is not None:
            fail = forced
        if chunks < 0 or delay_ms < 0 or ttft_ms < 0 or fail_after < 0:
            self._bad_request(conn, "mock overrides must not be negative", keep, "mock")
            return
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if limit is not None and limit < 1:
            self._bad_request(conn, f"max_tokens must be at least 1, got {limit}.", keep, "max_tokens")
            return
        if self._at_capacity(conn, keep):
            return
        self._begin(conn)
        if fail is not None and self._inject(conn, fail, keep, kind, fail_after, False):
            return
        if limit is not None and limit <= chunks:
            n, finish = limit, "length"
        else:
            n, finish = chunks, "stop"
        if kind == _CHAT:
            assert isinstance(req, _ChatReq)
            nbytes = 0
            for m in req.messages:
                c = m.content
                if c is not None:
                    nbytes += len(c.encode()) if isinstance(c, str) else _text_bytes(c)
        else:
            assert isinstance(req, _CompletionReq)
            p = req.prompt
            nbytes = len(p.encode()) if isinstance(p, str) else _text_bytes(p)
        prompt_tokens = _estimate(nbytes)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        created = int(time.time())
        seq = self._next_id()
        ttft = ttft_ms / 1000.0
        step = delay_ms / 1000.0
        if req.stream:
            include_usage = bool(req.stream_options is not None and req.stream_options.include_usage)
            self._stream(
                conn,
                kind,
                keep,
                model,
                n,
                finish,
                usage,
                include_usage,
                created,
                seq,
                ttft,
                step,
                fail,
                fail_after,
            )
            return
        if kind == _CHAT:
            obj: dict[str, Any] = {
                "id": f"chatcmpl-mock-{seq}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": self._fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": _content(n)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
            }
        else:
            obj = {
                "id": f"cmpl-mock-{seq}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": self._fingerprint,
                "choices": [{"index": 0, "text": _content(n), "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            }
        payload = self._encode(200, orjson.dumps(obj), keep)
        wait = ttft + step * (n - 1) if n > 0 else ttft
        if wait <= 0.0 and fail is None:
            transport = conn.transport
            assert transport is not None
            transport.write(payload)
            self._finish(conn, keep, True)
            return
        g = _Gen(self, conn, kind, keep)
        g.payload = payload
        g.fail = fail
        conn.busy = True
        g.schedule(self._loop_or_raise().time() + wait, g.send_payload)

    def _stream(
        self,
        conn: _Conn,
        kind: int,
        keep: bool,
        model: str,
        n: int,
        finish: str,
        usage: dict[str, int],
        include_usage: bool,
        created: int,
        seq: int,
        ttft: float,
        step: float,
        fail: str | None,
        fail_after: int,
    ) -> None:
        transport = conn.transport
        assert transport is not None
        if kind == _CHAT:
            base: dict[str, Any] = {
                "id": f"chatcmpl-mock-{seq}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": self._fingerprint,
            }
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": "\x00"},
                "logprobs": None,
                "finish_reason": None,
            }
        else:
            base = {
                "id": f"cmpl-mock-{seq}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": self._fingerprint,
            }
            choice = {"index": 0, "text": "\x00", "logprobs": None, "finish_reason": None}
        extra = {"usage": None} if include_usage else {}
        ev = b"data: " + orjson.dumps(base | {"choices": [choice]} | extra) + b"\n\n"
        pre, post = ev.split(b'"\\u0000"', 1)
        pre += b'"tok'
        post = b' "' + post
        if kind == _CHAT:
            first = dict(choice, delta={"role": "assistant", "content": "\x00"})
            ev0 = b"data: " + orjson.dumps(base | {"choices": [first]} | extra) + b"\n\n"
            pre0 = ev0.split(b'"\\u0000"', 1)[0] + b'"tok'
            last_delta: dict[str, Any] = {"role": "assistant"} if n == 0 else {}
            last = dict(choice, delta=last_delta, finish_reason=finish)
        else:
            pre0 = pre
            last = dict(choice, text="", finish_reason=finish)
        final = [_chunk(b"data: " + orjson.dumps(base | {"choices": [last]} | extra) + b"\n\n")]
        if include_usage:
            final.append(_chunk(b"data: " + orjson.dumps(base | {"choices": [], "usage": usage}) + b"\n\n"))
        final.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        g = _Gen(self, conn, kind, keep)
        g.n = n
        g.pre, g.pre0, g.post = pre, pre0, post
        g.final = b"".join(final)
        g.fail = fail
        g.fail_after = fail_after
        g.step = step
        conn.busy = True
        transport.write(self._stream_heads[keep])
        now = self._loop_or_raise().time()
        g.start = now + ttft
        if ttft <= 0.0 and fail is None:
            g.tick()
        else:
            g.schedule(g.start, g.tick)

    def _embeddings(self, conn: _Conn, body: bytes, keep: bool) -> None:
        try:
            req = _embedding_decoder.decode(body)
        except msgspec.DecodeError as exc:
            self._bad_request(conn, _E_BAD_JSON.format(exc), keep)
            return
        model = self._check_model(conn, req.model, keep)
        if model is None:
            return
        raw = req.input
        texts: list[bytes]
        if isinstance(raw, str):
            texts = [raw.encode()]
        elif raw and all(isinstance(x, int) for x in raw):
            texts = [orjson.dumps(raw)]
        elif raw and all(isinstance(x, str) for x in raw):
            texts = [x.encode() for x in raw]
        elif raw and all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
            texts = [orjson.dumps(x) for x in raw]
        else:
            msg = "'input' must be a non-empty string, list of strings, or list of token lists"
            self._bad_request(conn, msg, keep, "input")
            return
        dim = req.dimensions if req.dimensions is not None else self.config.embedding_dim
        if dim < 1:
            self._bad_request(conn, "dimensions must be at least 1", keep, "dimensions")
            return
        mock = req.mock
        ttft_ms = self.config.ttft_ms
        fail = None
        if mock is not None:
            fail = mock.fail
            if mock.ttft_ms is not None:
                ttft_ms = mock.ttft_ms
        if self._at_capacity(conn, keep):
            return
        self._begin(conn)
        if fail is not None and self._inject(conn, fail, keep, _EMBEDDING, 2, False):
            return
        b64 = req.encoding_format == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = _vector(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = _estimate(sum(len(t) for t in texts))
        obj = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        payload = self._encode(200, orjson.dumps(obj), keep)
        if ttft_ms <= 0:
            transport = conn.transport
            assert transport is not None
            transport.write(payload)
            self._finish(conn, keep, True)
            return
        g = _Gen(self, conn, _EMBEDDING, keep)
        g.payload = payload
        conn.busy = True
        g.schedule(self._loop_or_raise().time() + ttft_ms / 1000.0, g.send_payload)

    def _control(self, conn: _Conn, method: bytes, path: bytes, body: bytes, keep: bool) -> None:
        transport = conn.transport
        assert transport is not None
        if path == b"/mock/stats" and method == b"GET":
            out = self.stats.as_dict() | {"fail": self._fail, "name": self.config.name}
        elif path == b"/mock/reset" and method == b"POST":
            self.stats.reset()
            out = self.stats.as_dict()
        elif path == b"/mock/fail" and method == b"POST":
            try:
                self._fail = _fail_decoder.decode(body or b"{}").mode
            except msgspec.DecodeError as exc:
                err = _error(_E_BAD_JSON.format(exc), "invalid_request_error")
                transport.write(self._encode(400, err, keep))
                if not keep:
                    transport.close()
                return
            out = {"fail": self._fail}
        else:
            msg = f"Invalid URL ({method.decode('latin-1')} {path.decode('latin-1')})"
            transport.write(self._encode(404, _error(msg, "invalid_request_error"), keep))
            if not keep:
                transport.close()
            return
        transport.write(self._encode(200, orjson.dumps(out), keep))
        if not keep:
            transport.close()


_KINDS = {b"/v1/chat/completions": _CHAT, b"/v1/completions": _COMPLETION, b"/v1/embeddings": _EMBEDDING}
_PROBED = frozenset({b"/health", b"/metrics", b"/slots"})


# ---------------------------------------------------------------------------------------------- helpers


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default asyncio loop."""
    if _uvloop is not None:
        loop: asyncio.AbstractEventLoop = _uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


class MockNodeThread:
    """A mock node on its own event loop in a daemon thread, for synchronous tests.

    ``t = MockNodeThread(cfg); t.start()`` (returns once bound), ``t.url``, ``t.stats``,
    ``t.set_fail(mode)``, ``t.stop()``; also a context manager.
    """

    def __init__(self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.node = MockNode(config)
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def stats(self) -> MockStats:
        return self.node.stats

    @property
    def config(self) -> MockConfig:
        return self.node.config

    def start(self, timeout: float = 10.0) -> MockNodeThread:
        if self._thread is not None:
            raise RuntimeError("already started")
        name = f"mock-node-{self.node.config.name}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("mock node did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError("mock node failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        await self.node.start(self._host, self._port)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.node.stop()

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the node's loop and return its result."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return fn()

        async def runner() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(runner(), loop).result(timeout)

    def set_fail(self, mode: str | None) -> None:
        self.call(lambda: self.node.set_fail(mode))

    def reset_stats(self) -> None:
        self.call(self.node.reset_stats)

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, ev = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and ev is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(ev.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("mock node thread did not stop")
        self._thread = None

    def __enter__(self) -> MockNodeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> tuple[MockConfig, str, int]:
    p = argparse.ArgumentParser(prog="python -m shardon.upstream.mock", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--models", default="mock-model", help="comma-separated model names")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--name", default="mock")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>'")
    a = p.parse_args(argv)
    cfg = MockConfig(
        models=[m.strip() for m in a.models.split(",") if m.strip()],
        chunks=a.chunks,
        delay_ms=a.delay_ms,
        ttft_ms=a.ttft_ms,
        max_concurrent=a.max_concurrent,
        embedding_dim=a.embedding_dim,
        name=a.name,
        require_api_key=a.api_key,
    )
    return cfg, a.host, a.port


async def _serve(cfg: MockConfig, host: str, port: int) -> None:
    node = MockNode(cfg)
    await node.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    print(f"mock node {cfg.name!r} serving {','.join(cfg.models)} on {node.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await node.stop()


def main(argv: list[str] | None = None) -> int:
    cfg, host, port = _parse_args(argv)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(cfg, host, port))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
