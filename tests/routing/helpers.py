"""What the routing tests through the gateway share: conversations, a keep-alive client, the gateway's
node indexes and load."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from tests.support import get

ADMIN = "sk-admin-test"
SYSTEM = "You are the assistant of a small shop. Answer briefly and politely. " * 8


def turns(user: str, count: int) -> list[bytes]:
    """A multi-turn conversation's requests: each repeats the conversation so far, then asks more."""
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    bodies = []
    for i in range(count):
        messages.append({"role": "user", "content": f"{user} asks question {i}: " + "why? " * 20})
        bodies.append(json.dumps({"model": "chat", "messages": messages, "max_tokens": 2}).encode())
        messages.append({"role": "assistant", "content": "tok0 tok1 " * 10})
    return bodies


class Client:
    """One keep-alive connection to the gateway."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(
            "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        resp = self.conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def close(self) -> None:
        self.conn.close()


def node_index(gw: Any, node_id: str) -> int:
    return int(gw.call(lambda: gw.gateway.registry.nodes[node_id].index))


def inflight(gw: Any, node_id: str) -> int:
    index = node_index(gw, node_id)
    return int(gw.call(lambda: gw.gateway.scheduler.balancer.inflight(index)))


def hold(port: int, body: bytes, path: str = "/v1/chat/completions", headers: bytes = b"") -> socket.socket:
    """A request written on a raw socket, its answer left unread (closed by the test to end it)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def metrics(url: str) -> str:
    """The gateway's ``/metrics`` text."""
    return get(url, "/metrics")[2].decode()
