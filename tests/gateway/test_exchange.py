"""The exchange's steps end to end, on every request path (the `engine` fixture: the native engine's
callbacks, its coroutine, granian), which tests/conftest.py checks each request went: whole
requests, streams and the usage asked for on the client's behalf, new connections, retries,
a client leaving, a slow reader, a node failing mid-stream, pipelining, keep-alive.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from typing import Any

import pytest

from tests.support import (
    events,
    get,
    hold,
    node_entry,
    post,
    raw_request,
    read_responses,
    read_until,
    wait_until,
)
from tests.support import rows as _rows

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


def served(gw: Any) -> int:
    """Exchanges finished so far (by whichever driver the path has)."""
    return sum(gw.served())


def rows(gw: Any) -> list[dict[str, Any]]:
    return list(_rows(gw.url, "limit=1000")["data"])


def test_whole_requests_and_errors_are_exchanges(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1", "e1"], chunks=4)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1", "e1"])])
    before = served(gw)
    for _ in range(3):
        assert post(gw.url, "/v1/chat/completions", CHAT)[0] == 200
    assert post(gw.url, "/v1/chat/completions", CHAT, {"X-Priority": "high"})[0] == 200
    assert post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True})[0] == 200
    assert post(gw.url, "/v1/embeddings", {"model": "e1", "input": "x"})[0] == 200
    wait_until(lambda: served(gw) - before == 6)
    # Errors too, in OpenAI's shape.
    assert post(gw.url, "/v1/chat/completions", CHAT, {"X-Priority": "urgent"})[0] == 400
    assert post(gw.url, "/v1/chat/completions", {"model": "nope", "messages": []})[0] == 404
    assert post(gw.url, "/v1/chat/completions", b"{not json")[0] == 400
    wait_until(lambda: served(gw) - before == 9)
    logged = rows(gw)
    assert sorted(r["status"] for r in logged) == [200] * 6 + [400, 400, 404]


def test_streams_ask_the_node_for_usage_and_hide_it(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=5)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    before = served(gw)
    status, headers, via_gateway = post(gw.url, "/v1/completions", {"model": "m1", "prompt": "x", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    wait_until(lambda: served(gw) - before == 1)
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
    assert row["receipt"]["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_client_stream_options_are_the_clients(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=3)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    before = served(gw)
    asked = {"model": "m1", "prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    status, _, body = post(gw.url, "/v1/completions", asked)
    assert status == 200 and b'"usage":{' in body  # asked for: passed through
    wait_until(lambda: served(gw) - before == 1)
    # include_usage false: Shardon's request is merged into the client's options.
    declined = {"model": "m1", "prompt": "x", "stream": True, "stream_options": {"include_usage": False}}
    status, _, body = post(gw.url, "/v1/completions", declined)
    assert status == 200 and b"usage" not in body
    assert json.loads(node.stats.last_body)["stream_options"] == {"include_usage": True}
    wait_until(lambda: served(gw) - before == 2)


def test_new_connections_are_opened_for_requests_at_once(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=16)])
    before = served(gw)
    held = [hold(node, gw.url) for _ in range(8)]  # each on a connection of its own, all at once
    assert node.stats.in_flight == 8
    node.gate.open()
    assert [f.result(20)[0] for f in held] == [200] * 8
    wait_until(lambda: served(gw) - before == 8)
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
    # The start-up probe finds the dead node refusing and opens its circuit; closed again, the next
    # request that picks it is refused at connect, and retried on the good node.
    dead = gw.gateway.registry.nodes["dead"]
    wait_until(lambda: gw.call(lambda: dead.circuit) != 0, 5)
    gw.call(lambda: gw.gateway.registry.record_success(dead))
    for _ in range(4):
        status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT)
        assert status == 200 and headers["x-shardon-node"] == "good"
    # The first request that picks the dead node is refused at connect and retried on the good
    # one; the refusal opens the dead node's circuit at once, so the others go straight to the good.
    assert sorted(r["retries"] for r in rows(gw)) == [0, 0, 0, 1]
    assert gw.call(lambda: dead.circuit) != 0 and "refused" in str(gw.call(lambda: dead.last_error)).lower()


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
    node = make_mock(models=["m1"], chunks=200)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    # The node sends 3 tokens, then holds the stream until its connection closes.
    body = json.dumps({"model": "m1", "prompt": "x", "stream": True, "mock": {"hold_after": 3}}).encode()
    with raw_request(gw.port, body) as sock:
        read_until(sock, lambda got: got.count(b"data: ") == 3)
        wait_until(lambda: node.gate.waiting == 1)
    wait_until(lambda: node.stats.cancelled == 1, 5)
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.balancer.inflight(0)) == 0, 5)
    row = wait_until(lambda: [r for r in rows(gw) if r["status"] == 499], 5)[0]
    assert row["error_type"] == "client_disconnected"
    assert row["completion_tokens"] == 3  # what the node generated before it was stopped
    # The slot is free: the next request is served at once.
    assert post(gw.url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})[0] == 200


# Granian takes what the gateway sends whatever the client reads (it buffers the whole answer of a
# client that does not read): flow control back to the node is the native engine's (README, Engines).
@pytest.mark.parametrize("engine", ["native", "native-coroutine"])
def test_a_slow_reader_pauses_the_node_instead_of_buffering(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=60000, delay_ms=0)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    body = json.dumps({"model": "m1", "prompt": "x", "stream": True, "max_tokens": 60000}).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as sock:
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
    wait_until(lambda: served(gw) - before == 1)
    last = json.loads(events(body)[-1][6:])
    assert last["error"]["code"] == "upstream_error"
    row = rows(gw)[0]
    assert row["status"] == 502 and row["error_type"] == "upstream_error"
    assert row["completion_tokens"] == 3  # the partial usage: the tokens that did arrive


def test_pipelined_requests_are_answered_in_order(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=3)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=4)])
    bodies = [
        {"model": "m1", "prompt": "one", "max_tokens": 1},
        {"model": "m1", "prompt": "two", "stream": True},
        {"model": "m1", "messages": [{"role": "user", "content": "three"}], "max_tokens": 2},
    ]
    paths = ["/v1/completions", "/v1/completions", "/v1/chat/completions"]
    before = served(gw)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"".join(request_bytes(path, body) for path, body in zip(paths, bodies, strict=True)))
        answers = read_responses(sock, 3)
    assert [status for status, _, _ in answers] == [200, 200, 200]
    assert json.loads(answers[0][2])["choices"][0]["text"] == "tok0 "
    assert answers[1][1]["content-type"].startswith("text/event-stream")
    assert events(answers[1][2])[-1] == b"data: [DONE]"
    assert json.loads(answers[2][2])["choices"][0]["message"]["content"] == "tok0 tok1 "
    ids = [headers["x-request-id"] for _, headers, _ in answers]
    assert ids == sorted(ids)  # answered in the order they were sent
    wait_until(lambda: served(gw) - before == 3)
    # The connection stayed open and serves the next request too.
    assert node.stats.per_path["/v1/completions"] == 2


def test_keep_alive_serves_one_request_after_another(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        for i in range(3):
            sock.sendall(request_bytes("/v1/completions", {"model": "m1", "prompt": str(i)}))
            ((status, headers, _),) = read_responses(sock, 1)
            assert status == 200 and headers.get("connection", "keep-alive") != "close"
    assert get(gw.url, "/health")[0] == 200


def request_bytes(path: str, body: Any) -> bytes:
    data = json.dumps(body).encode()
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        len(data),
        data,
    )
