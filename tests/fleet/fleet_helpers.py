"""What the fleet's tests share: HTTP calls, the admin API's nodes, streams read piece by piece."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

from tests.support import GatewayThread, wait_until

ADMIN = "sk-admin-fleet"
NODE_SECRET = "node-secret-7f3c9a"  # a node's api_key: must never show


def call(
    url: str, method: str, path: str, body: Any = None, key: str | None = ADMIN, raw: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """One HTTP call; the answer's JSON decoded (bytes when it is not JSON)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
        out: Any = answer
        if resp.getheader("content-type", "").startswith("application/json") and answer:
            out = json.loads(answer)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, out
    finally:
        conn.close()


def chat(url: str, model: str = "m1", key: str | None = None, **fields: Any) -> tuple[int, dict[str, str], Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    return call(url, "POST", "/v1/chat/completions", body, key=key)


def node_state(gw: GatewayThread, node_id: str) -> dict[str, Any]:
    status, _, body = call(gw.url, "GET", f"/admin/nodes/{node_id}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def wait_circuit(gw: GatewayThread, node_id: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
    return wait_until(lambda: (n := node_state(gw, node_id))["circuit"] == state and n, timeout)  # type: ignore[no-any-return]


class Stream:
    """A streamed chat request read piece by piece (http.client: the pieces as they come)."""

    def __init__(self, url: str, model: str = "m1", **fields: Any) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True, **fields}
        self.conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        self.resp = self.conn.getresponse()
        self.node = self.resp.getheader("x-shardon-node")
        self.data = b""

    def events(self) -> Iterator[bytes]:
        buffer = b""
        while True:
            piece = self.resp.read1(65536)
            if not piece:
                return
            self.data += piece
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                yield event

    def first(self) -> bytes:
        return next(self.events())

    def rest(self) -> bytes:
        for _ in self.events():
            pass
        self.conn.close()
        return self.data
