"""The mock node's HTTP/1.1 side: one `Conn` per client connection (httptools parser, keep-alive,
pipelined requests answered in order, ``Expect: 100-continue``), and the bytes of its answers."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools
import orjson

if TYPE_CHECKING:
    from .node import MockNode

__all__ = ["BAD_JSON", "REASONS", "Conn", "chunk", "error_body"]

BAD_JSON = "We could not parse the JSON body of your request: {}"

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class Conn(asyncio.Protocol):
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
            self._protocolerror_body("Protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._protocolerror_body(f"Malformed HTTP request: {exc}")

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
    def _protocolerror_body(self, message: str) -> None:
        transport = self.transport
        if transport is None:
            return
        if not self.busy:
            transport.write(self.node._encode(400, error_body(message, "invalid_request_error"), False))
        self.busy = False
        transport.close()

    def _next(self) -> None:
        """Answer requests that arrived while the previous response was being produced."""
        while self.pending and not self.busy and self.transport is not None:
            req = self.pending.pop(0)
            self.node._handle(self, *req)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)
