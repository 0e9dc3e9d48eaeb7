"""`MockNode`: a mock inference node on the running event loop (see the package's docstring)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from ...listener import Listener, listen
from . import endpoints
from .config import FAIL_MODES, MockConfig, MockStats
from .control import Gate, control
from .generate import CHAT, COMPLETION, EMBEDDING, KINDS, embeddings, generate
from .protocol import REASONS, Conn, error_body

__all__ = ["MockNode"]


class MockNode:
    """An in-process mock node on the running event loop.

    ``port = await node.start()``, ``node.url``, ``node.stats``, ``node.set_fail(mode)``,
    ``node.gate`` (`Gate`), ``await node.stop()``; or ``async with MockNode(cfg) as node: ...``.
    """

    def __init__(self, config: MockConfig | None = None) -> None:
        self.config = config if config is not None else MockConfig()
        self.stats = MockStats()
        self.gate = Gate()
        self.host = "127.0.0.1"
        self.port = 0
        self._fail: str | None = None
        self._listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[Conn] = set()
        self._seq = 0
        self.reported = endpoints.Reported()  # what its /metrics and /slots say
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
        self._loop = asyncio.get_running_loop()
        self.host = host
        self._listeners, self.port = await self._listen(self._loop, host, port)
        return self.port

    async def _listen(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[list[Any], int]:
        """The listeners (each with a ``close()``) and the bound port."""
        # The gateway's own listener: every queued client per wake-up. libuv's takes one per loop
        # pass, which, on a node busy streaming, holds new connections for hundreds of ms and puts
        # the node's accept queue, not the proxy in front of it, in a benchmark's figures.
        listeners = listen(loop, host, port, 2048, lambda: Conn(self))
        return listeners, listeners[0].sock.getsockname()[1]

    async def stop(self) -> None:
        """Close the listening socket and every open connection.

        A client accepted in the pass that runs this has its ``connection_made`` still queued: the
        connections are closed again after each pass until none is left, so that none outlives the
        node (an open transport at the loop's close is a ``ResourceWarning``, and uvloop then leaves
        its handle open and the close waits on it).
        """
        listeners, self._listeners = self._listeners, []
        if not listeners:
            return
        for listener in listeners:
            listener.close()
        for _ in range(200):
            for conn in list(self._conns):
                self._drop(conn)
            await asyncio.sleep(0.005)
            if not self._conns:
                return
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)

    @staticmethod
    def _drop(conn: Conn) -> None:
        """Close ``conn``: at once if a response is under way, after what is written if not."""
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.transport is None:
            return
        if conn.busy:
            conn.transport.abort()
        else:
            conn.transport.close()

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
        for status, reason in REASONS.items():
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
        self._e401 = error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    def _encode(self, status: int, body: bytes, keep: bool) -> bytes:
        return b"%s%d\r\n\r\n%s" % (self._heads[status, keep], len(body), body)

    # -- request handling
    def _handle(
        self,
        conn: Conn,
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
            control(self, conn, method, path, body, keep)
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
                kind = KINDS.get(path, 0)
                if fail == "mid" and kind in (CHAT, COMPLETION) and method == b"POST":
                    generate(self, conn, kind, body, keep, "mid")
                else:
                    self._inject(conn, fail, keep, kind, 2, kind == 0)
                return
            if path == b"/health" and self.reported.health:
                if method != b"GET":
                    self._send_error(conn, 405, error_body("Method Not Allowed", "invalid_request_error"), keep)
                    return
                transport.write(self._const[b"/health", keep])
                self._finish(conn, keep, True)
                return
            key = self.config.require_api_key
            if key is not None and not self._authorized(headers, key):
                self._send_error(conn, 401, self._e401, keep)
                return
            kind = KINDS.get(path, 0)
            if kind:
                if method != b"POST":
                    self._send_error(conn, 405, error_body("Method Not Allowed", "invalid_request_error"), keep)
                    return
                if kind == EMBEDDING:
                    embeddings(self, conn, body, keep)
                else:
                    generate(self, conn, kind, body, keep)
                return
            if path == b"/v1/models" and method == b"GET":
                transport.write(self._const[b"/v1/models", keep])
                self._finish(conn, keep, True)
                return
            if endpoints.handle(self, conn, method, path, headers, body, keep):
                return
            msg = f"Invalid URL ({method.decode('latin-1')} {path.decode('latin-1')})"
            self._send_error(conn, 404, error_body(msg, "invalid_request_error"), keep)
        except Exception as exc:  # a bug in the mock: answer 500 rather than hang the client
            if conn.transport is not None and not conn.busy:
                body500 = error_body(f"mock node error: {exc!r}", "server_error")
                self._send_error(conn, 500, body500, False)

    @staticmethod
    def _authorized(headers: list[tuple[bytes, bytes]], key: str) -> bool:
        want = b"Bearer " + key.encode()
        for name, value in headers:
            if len(name) == 13 and name.lower() == b"authorization":
                return value.strip() == want
        return False

    def _send_error(self, conn: Conn, status: int, body: bytes, keep: bool) -> None:
        transport = conn.transport
        if transport is None:
            return
        transport.write(self._encode(status, body, keep))
        self._finish(conn, keep, False)

    def _finish(self, conn: Conn, keep: bool, ok: bool) -> None:
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

    def _abort(self, conn: Conn) -> None:
        """Drop the connection on purpose (injected failure)."""
        self.stats.aborted += 1
        conn.busy = False
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn.transport is not None:
            conn.transport.abort()

    def _begin(self, conn: Conn) -> None:
        st = self.stats
        conn.gen = True
        st.in_flight += 1
        if st.in_flight > st.max_in_flight:
            st.max_in_flight = st.in_flight

    def _inject(self, conn: Conn, fail: str, keep: bool, kind: int, fail_after: int, plain: bool) -> bool:
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
            self._send_error(conn, 500, error_body("Injected failure (mock status500)", "server_error"), keep)
            return True
        if fail == "status503":
            body = error_body("Injected failure (mock status503)", "server_error", "service_unavailable")
            self._send_error(conn, 503, body, keep)
            return True
        # mid on something that is not a generation: headers and half a body, then abort
        if plain or kind == EMBEDDING:
            payload = self._encode(200, b'{"status":"ok","mock":"mid-failure-padding"}', keep)
            transport.write(payload[: len(payload) - 20])
            self._abort(conn)
            return True
        return False

    def _abort_before(self, conn: Conn) -> None:
        self.stats.aborted += 1
        conn.busy = False
        if conn.transport is not None:
            conn.transport.close()

    def _next_id(self) -> int:
        self._seq += 1
        return self._seq

    def _check_model(self, conn: Conn, model: str | None, keep: bool) -> str | None:
        if model is None:
            return self._default_model
        if model in self._models:
            return model
        msg = f"The model `{model}` does not exist or you do not have access to it."
        self._send_error(conn, 404, error_body(msg, "invalid_request_error", "model_not_found", "model"), keep)
        return None

    def _at_capacity(self, conn: Conn, keep: bool) -> bool:
        cap = self.config.max_concurrent
        if cap is not None and self.stats.in_flight >= cap:
            self.stats.rejected += 1
            msg = f"The mock node is at capacity (max_concurrent={cap})."
            self._send_error(conn, 503, error_body(msg, "server_error", "overloaded"), keep)
            return True
        return False

    def _bad_request(self, conn: Conn, message: str, keep: bool, param: str | None = None) -> None:
        self._send_error(conn, 400, error_body(message, "invalid_request_error", None, param), keep)


_PROBED = frozenset({b"/health", b"/metrics", b"/slots"})
