"""The native engine's callback driver of the exchange (`Exchange.serve`): every whole request is
served from socket callbacks, errors, streams, retries and new connections included, and behaves as
the coroutine driver does.

These run on the native engine only (the rest of tests/gateway runs both engines).
``RequestCore.served_by_callbacks`` counts the requests the callbacks took, so each test can tell.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.support import node_entry, wait_until

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def engine() -> str:
    """Only the native engine serves by callbacks (this overrides tests/conftest.py's fixture)."""
    return "native"


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def served(gw: Any) -> int:
    return int(gw.call(lambda: gw.gateway.core.served_by_callbacks))


def rows(gw: Any) -> list[dict[str, Any]]:
    status, _, body = post_admin(gw, "/admin/requests?limit=1000")
    assert status == 200
    return list(json.loads(body)["data"])


def post_admin(gw: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def events(stream: bytes) -> list[bytes]:
    return [e for e in stream.split(b"\n\n") if e.startswith(b"data: ")]


def test_whole_requests_are_served_by_callbacks(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1", "e1"], chunks=4)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1", "e1"])])
    before = served(gw)
    for _ in range(3):
        assert post(gw.url, "/v1/chat/completions", CHAT)[0] == 200
    assert post(gw.url, "/v1/chat/completions", CHAT, {"X-Priority": "high"})[0] == 200
    assert post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True})[0] == 200
    assert post(gw.url, "/v1/embeddings", {"model": "e1", "input": "x"})[0] == 200
    assert served(gw) - before == 6
    # Errors too, in OpenAI's shape.
    assert post(gw.url, "/v1/chat/completions", CHAT, {"X-Priority": "urgent"})[0] == 400
    assert post(gw.url, "/v1/chat/completions", {"model": "nope", "messages": []})[0] == 404
    assert post(gw.url, "/v1/chat/completions", b"{not json")[0] == 400
    assert served(gw) - before == 9
    logged = rows(gw)
    assert sorted(r["status"] for r in logged) == [200] * 6 + [400, 400, 404]


def test_streams_ask_the_node_for_usage_and_hide_it(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=5)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    before = served(gw)
    status, headers, via_gateway = post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert served(gw) - before == 1
    # The node was asked for the usage (the client's bytes, one member more, not re-encoded) ...
    sent = node.stats.last_body
    assert sent.startswith(b'{"stream_options":{"include_usage":true},') and sent.endswith(b'"stream": true}')
    # ... and the client sees the stream it asked for: no usage event, no "usage": null.
    _, _, direct = post(node.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True})
    assert b"usage" not in via_gateway
    assert len(events(via_gateway)) == len(events(direct)) == 5 + 2  # tokens, finish, [DONE]
    row = rows(gw)[0]
    assert row["status"] == 200 and row["stream"] is True
    assert row["completion_tokens"] == 5 and row["prompt_tokens"] is not None  # the node's usage
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events(via_gateway)[:-1])
    import hashlib

    assert row["receipt"]["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_client_stream_options_are_the_clients(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=3)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    before = served(gw)
    asked = {"model": "m1", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    status, _, body = post(gw.url, "/v1/completions", asked)
    assert status == 200 and b'"usage":{' in body  # asked for: passed through
    assert served(gw) - before == 1
    # include_usage false: Shardon's request is merged into the client's options.
    declined = {"model": "m1", "prompt": "x", "stream": True, "stream_options": {"include_usage": False}}
    status, _, body = post(gw.url, "/v1/completions", declined)
    assert status == 200 and b"usage" not in body
    assert json.loads(node.stats.last_body)["stream_options"] == {"include_usage": True}
    assert served(gw) - before == 2


def test_new_connections_are_opened_by_callbacks(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2, delay_ms=100)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=16)])
    before = served(gw)
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(post(gw.url, "/v1/chat/completions", CHAT)[0])) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [200] * 8
    assert served(gw) - before == 8
    assert node.stats.max_in_flight == 8


def test_a_refused_connect_is_retried_on_another_node(make_mock: Any, make_gateway: Any) -> None:
    good = make_mock(models=["m1"], chunks=2, name="good")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # nothing listens here once closed
    gw = make_gateway(
        upstream={"health_interval_s": 60, "failure_threshold": 100},
        nodes=[
            {"id": "dead", "url": f"http://127.0.0.1:{dead_port}", "models": ["m1"]},
            node_entry(good, "good", ["m1"]),
        ],
    )
    gw.call(lambda: [gw.gateway.registry.record_success(n) for n in gw.gateway.registry.nodes.values()])
    for _ in range(4):
        status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-shardon-node"] == "good"
    logged = rows(gw)
    assert any(r["retries"] == 1 for r in logged)  # a first try on the dead node


def test_node_5xx_is_retried_elsewhere(make_mock: Any, make_gateway: Any) -> None:
    bad = make_mock(models=["m1"], chunks=2, name="bad")
    bad.node.set_fail("status500")
    good = make_mock(models=["m1"], chunks=2, name="good")
    gw = make_gateway(
        upstream={"failure_threshold": 100},
        nodes=[node_entry(bad, "bad", ["m1"]), node_entry(good, "good", ["m1"])],
    )
    for _ in range(4):
        status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-shardon-node"] == "good"


def test_client_leaving_mid_stream_stops_the_node_and_logs_partial_usage(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=200, delay_ms=10)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    before = served(gw)
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m1", "prompt": "x", "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        got = b""
        while got.count(b"data: ") < 3:
            got += sock.recv(65536)
    assert served(gw) - before == 1
    wait_until(lambda: node.stats.cancelled == 1, 5)
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.balancer.inflight(0)) == 0, 5)
    row = wait_until(lambda: [r for r in rows(gw) if r["status"] == 499], 5)[0]
    assert row["error_type"] == "client_disconnected"
    assert 3 <= row["completion_tokens"] < 200  # what the node generated before it was stopped
    # The slot is free: the next request is served at once.
    assert post(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200


def test_a_slow_reader_pauses_the_node_instead_of_buffering(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=60000, delay_ms=0)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    host, port = gw.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "m1", "prompt": "x", "stream": True, "max_tokens": 60000}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )

        def held() -> bool:
            def look() -> bool:
                conns = [c for n in gw.gateway.registry.nodes.values() for c in n.pool._busy]
                return any(c.transport is not None and not c.transport.is_reading() for c in conns)

            return bool(gw.call(look))

        wait_until(held, 10)  # the client is not reading: Shardon stopped reading the node
        time.sleep(0.3)
        assert held()
        total = b""
        deadline = time.monotonic() + 30
        while not total.endswith(b"0\r\n\r\n") and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            total += chunk
    assert total.count(b"data: ") == 60000 + 2  # every token, the finish event and [DONE]


def test_mid_stream_node_failure_ends_the_stream_with_an_sse_error(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=10, delay_ms=5)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    before = served(gw)
    req = {"model": "m1", "prompt": "x", "stream": True, "mock": {"fail": "mid", "fail_after": 3}}
    status, _, body = post(gw.url, "/v1/completions", req)
    assert status == 200
    assert served(gw) - before == 1
    last = json.loads(events(body)[-1][6:])
    assert last["error"]["code"] == "upstream_error"
    row = rows(gw)[0]
    assert row["status"] == 502 and row["error_type"] == "upstream_error"
    assert row["completion_tokens"] == 3  # the partial usage: the tokens that did arrive
