"""Caps, queueing, priorities, deadlines, retries and cancellation, with real sockets."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.conftest import node_entry, wait_until
from tests.gateway.test_forwarding import post

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}]}'


def test_200_concurrent_requests_never_exceed_node_caps(make_mock: Any, make_gateway: Any) -> None:
    # Each mock refuses (503) anything past its cap, so one refusal would fail a request.
    a = make_mock(models=["m1"], chunks=3, delay_ms=5, max_concurrent=3, name="a")
    b = make_mock(models=["m1"], chunks=3, delay_ms=5, max_concurrent=2, name="b")
    gw = make_gateway(
        nodes=[node_entry(a, "a", ["m1"], max_concurrent=3), node_entry(b, "b", ["m1"], max_concurrent=2)],
        scheduler={"max_queue_size": 1000, "queue_timeout_s": 60},
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=200) as pool:
        results = list(pool.map(lambda _: post(gw.url, "/v1/chat/completions", CHAT)[0], range(200)))
    assert results == [200] * 200
    assert a.stats.max_in_flight <= 3 and b.stats.max_in_flight <= 2
    assert a.stats.max_in_flight == 3 and b.stats.max_in_flight == 2  # both nodes were used to the full
    assert a.stats.per_path["/v1/chat/completions"] + b.stats.per_path["/v1/chat/completions"] == 200


def _hold_slot(url: str, delay_ms: int) -> concurrent.futures.Future[Any]:
    body = json.dumps({"model": "m1", "prompt": "hold", "mock": {"ttft_ms": delay_ms, "chunks": 1}}).encode()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(post, url, "/v1/completions", body)
    pool.shutdown(wait=False)
    return fut


def test_priority_orders_the_queue(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    blocker = _hold_slot(gw.url, 400)
    wait_until(lambda: node.stats.in_flight == 1)
    order: list[str] = []
    lock = threading.Lock()

    def send(priority: str) -> None:
        # Each holds the single slot 60 ms, so completion order is dispatch order.
        body = json.dumps({"model": "m1", "prompt": priority, "max_tokens": 1, "mock": {"ttft_ms": 60}}).encode()
        status, _, _ = post(gw.url, "/v1/completions", body, {"X-Priority": priority})
        assert status == 200
        with lock:
            order.append(priority)

    threads = []
    for priority in ["low", "normal", "low", "critical", "high", "normal"]:
        t = threading.Thread(target=send, args=(priority,))
        t.start()
        threads.append(t)
        # Queue them in a known order before the slot frees.
        queued = len(threads)
        wait_until(lambda n=queued: gw.call(lambda: len(gw.gateway.scheduler.routes["m1"].queue)) == n)
    assert blocker.result(10)[0] == 200
    for t in threads:
        t.join(10)
    assert order == ["critical", "high", "normal", "normal", "low", "low"]


def test_bad_priority_is_400(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    status, _, body = post(gw.url, "/v1/chat/completions", CHAT, {"X-Priority": "urgent"})
    assert status == 400
    assert json.loads(body)["error"]["param"] == "X-Priority"


def test_queue_full_is_503_with_retry_after(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)],
        scheduler={"max_queue_size": 1, "queue_timeout_s": 10},
    )
    blocker = _hold_slot(gw.url, 600)
    wait_until(lambda: node.stats.in_flight == 1)
    queued = _hold_slot(gw.url, 0)
    wait_until(lambda: gw.call(lambda: len(gw.gateway.scheduler.routes["m1"].queue)) == 1)
    status, headers, body = post(gw.url, "/v1/chat/completions", CHAT)
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    err = json.loads(body)["error"]
    assert err["code"] == "queue_full" and err["type"] == "server_error"
    assert blocker.result(10)[0] == 200 and queued.result(10)[0] == 200


def test_queue_deadline_is_504(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)], scheduler={"queue_timeout_s": 0.3})
    blocker = _hold_slot(gw.url, 1500)
    wait_until(lambda: node.stats.in_flight == 1)
    started = time.monotonic()
    status, _, body = post(gw.url, "/v1/chat/completions", CHAT)
    waited = time.monotonic() - started
    assert status == 504
    assert json.loads(body)["error"]["code"] == "queue_timeout"
    assert 0.25 < waited < 1.4
    assert blocker.result(10)[0] == 200
    assert (
        node.stats.per_path.get("/v1/completions", 0) + node.stats.per_path.get("/v1/chat/completions", 0) == 1
    )  # the expired request never reached the node


def test_retry_on_another_node_before_first_byte(make_mock: Any, make_gateway: Any) -> None:
    dead = make_mock(models=["m1"], name="dead")
    alive = make_mock(models=["m1"], name="alive")
    gw = make_gateway(
        nodes=[
            node_entry(dead, "dead", ["m1"], max_concurrent=8),
            node_entry(alive, "alive", ["m1"], max_concurrent=8),
        ],
        upstream={"health_interval_s": 30},
    )
    # It fails once its first probe has passed (a failed probe would take it out of rotation at once).
    wait_until(lambda: dead.stats.per_path.get("/health", 0) >= 1)
    dead.set_fail("before")
    for _ in range(6):
        status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT)
        assert status == 200
        assert headers["x-shardon-node"] == "alive"
    assert dead.stats.per_path.get("/v1/chat/completions", 0) >= 1  # it was tried, and failed over


def test_unreachable_node_fails_over_and_is_taken_out(make_mock: Any, make_gateway: Any) -> None:
    from tests.conftest import free_port

    alive = make_mock(models=["m1"], name="alive")
    gw = make_gateway(
        nodes=[
            {"id": "gone", "url": f"http://127.0.0.1:{free_port()}", "models": ["m1"]},
            node_entry(alive, "alive", ["m1"]),
        ]
    )
    for _ in range(4):
        assert post(gw.url, "/v1/chat/completions", CHAT)[0] == 200
    wait_until(lambda: gw.call(lambda: not gw.gateway.registry.nodes["gone"].healthy))


def test_no_healthy_node_is_503(make_gateway: Any) -> None:
    from tests.conftest import free_port

    gw = make_gateway(
        nodes=[{"id": "gone", "url": f"http://127.0.0.1:{free_port()}", "models": ["m1"]}],
        upstream={"health_interval_s": 0.05, "failure_threshold": 1},
    )
    wait_until(lambda: gw.call(lambda: not gw.gateway.registry.nodes["gone"].healthy))
    status, headers, body = post(gw.url, "/v1/chat/completions", CHAT)
    assert status == 503
    assert json.loads(body)["error"]["code"] in ("no_capacity", "upstream_error")
    assert "retry-after" in headers


def test_mid_stream_failure_sends_sse_error_and_no_retry(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["m1"], chunks=10, name="a")
    b = make_mock(models=["m1"], chunks=10, name="b")
    gw = make_gateway(nodes=[node_entry(a, "a", ["m1"]), node_entry(b, "b", ["m1"])])
    body = b'{"model":"m1","prompt":"x","stream":true,"mock":{"fail":"mid","fail_after":3}}'
    status, _, raw = post(gw.url, "/v1/completions", body)
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e]
    assert b"[DONE]" not in raw
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "upstream_error"
    assert (
        a.stats.per_path.get("/v1/completions", 0) + b.stats.per_path.get("/v1/completions", 0) == 1
    )  # no silent retry


def _raw_request(port: int, body: bytes, headers: bytes = b"") -> socket.socket:
    """A request written on a raw socket, its answer left unread (for tests that hang up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + headers
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def test_disconnect_while_queued_leaves_the_queue(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    blocker = _hold_slot(gw.url, 500)
    wait_until(lambda: node.stats.in_flight == 1)
    sock = _raw_request(gw.port, b'{"model":"m1","prompt":"queued"}')
    wait_until(lambda: gw.call(lambda: len(gw.gateway.scheduler.routes["m1"].queue)) == 1)
    sock.close()
    wait_until(lambda: gw.call(lambda: len(gw.gateway.scheduler.routes["m1"].queue)) == 0, timeout=2)
    assert blocker.result(10)[0] == 200
    time.sleep(0.2)
    assert node.stats.per_path.get("/v1/completions", 0) == 1  # the cancelled request was never dispatched


def test_disconnect_mid_stream_frees_the_slot_at_once(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=200, delay_ms=50)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    sock = _raw_request(gw.port, b'{"model":"m1","prompt":"x","stream":true}')
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    wait_until(lambda: node.stats.in_flight == 1)
    t0 = time.monotonic()
    sock.close()
    # The node sees its connection closed (generation stopped) and the gateway frees the slot.
    wait_until(lambda: node.stats.cancelled == 1, timeout=2)
    assert time.monotonic() - t0 < 1.0
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.balancer.inflight(0)) == 0, timeout=2)
    assert post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"y","max_tokens":1}')[0] == 200


def test_disconnect_during_long_non_streamed_generation(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    sock = _raw_request(gw.port, b'{"model":"m1","prompt":"x","mock":{"fail":"hang"}}')
    wait_until(lambda: node.stats.per_path.get("/v1/completions", 0) == 1)
    sock.close()
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.balancer.inflight(0)) == 0, timeout=2)
    wait_until(lambda: node.stats.connections_open == 0 or node.stats.cancelled >= 1, timeout=2)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b'{"messages":[]}', 400, "invalid_request"),
        (b'{"model": 5}', 400, "invalid_request"),
        (b'{"model":"nope","messages":[]}', 404, "model_not_found"),
    ],
)
def test_bad_requests_get_openai_errors(make_mock: Any, make_gateway: Any, body: bytes, status: int, code: str) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    got, headers, raw = post(gw.url, "/v1/chat/completions", body)
    assert got == status
    assert headers["content-type"] == "application/json"
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["type"] == "invalid_request_error"
    assert node.stats.per_path.get("/v1/chat/completions", 0) == 0


def test_missing_model_names_the_param(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    _, _, raw = post(gw.url, "/v1/chat/completions", b'{"messages":[]}')
    assert json.loads(raw)["error"]["param"] == "model"


def test_body_over_limit_is_413(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], server={"max_body_bytes": 1000})
    big = json.dumps({"model": "m1", "prompt": "x" * 2000}).encode()
    status, _, raw = post(gw.url, "/v1/completions", big)
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "request_too_large"
    assert post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"ok"}')[0] == 200


def test_unknown_route_and_method(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    assert post(gw.url, "/v2/nothing", b"{}")[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/v1/chat/completions")
    resp = conn.getresponse()
    assert resp.status == 405 and json.loads(resp.read())["error"]["code"] == "method_not_allowed"
    conn.close()


def test_quiet_tenant_is_served_at_once_while_a_noisy_one_floods(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=4)],
        auth={"trust_tenant_header": True},
        scheduler={"queue_timeout_s": 20, "headroom_slots": 1},
    )
    slow = json.dumps({"model": "m1", "prompt": "x", "mock": {"ttft_ms": 1500, "chunks": 1}}).encode()
    # The quiet tenant has been seen (it is active), then the noisy one floods with long requests.
    assert (
        post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"q","max_tokens":1}', {"X-Tenant-ID": "quiet"})[0]
        == 200
    )
    pool = concurrent.futures.ThreadPoolExecutor(12)
    noisy = [pool.submit(post, gw.url, "/v1/completions", slow, {"X-Tenant-ID": "noisy"}) for _ in range(10)]
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting) == 7)
    assert node.stats.in_flight == 3  # the fourth slot is kept for tenants under their share
    started = time.monotonic()
    status, _, _ = post(
        gw.url, "/v1/completions", b'{"model":"m1","prompt":"q","max_tokens":1}', {"X-Tenant-ID": "quiet"}
    )
    assert status == 200
    assert time.monotonic() - started < 0.5  # not behind a 1.5 s generation, let alone the queue
    assert all(f.result(30)[0] == 200 for f in noisy)
    pool.shutdown()


def test_read_timeout_fails_a_silent_node(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], upstream={"read_timeout_s": 0.5, "max_retries": 0})
    started = time.monotonic()
    status, _, raw = post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"x","mock":{"fail":"hang"}}')
    assert status == 502
    assert json.loads(raw)["error"]["code"] == "upstream_error"
    assert 0.4 < time.monotonic() - started < 2.5
    # The slot was freed: the node serves the next request.
    assert post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"y","max_tokens":1}')[0] == 200


def test_a_thousand_queued_requests_do_not_block_new_ones(make_mock: Any, make_gateway: Any) -> None:
    """Shardon's queue, not the server's concurrency cap, bounds admission (regression: Granian's
    default backpressure of `backlog` requests left new requests waiting unseen in the socket)."""
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)],
        scheduler={"max_queue_size": 5000, "queue_timeout_s": 60},
        log={"access_log": False},
    )
    blocker = _hold_slot(gw.url, 4000)
    wait_until(lambda: node.stats.in_flight == 1)
    body = b'{"model":"m1","prompt":"q","max_tokens":1}'
    socks = []
    try:
        for _ in range(1100):
            socks.append(_raw_request(gw.port, body))
        wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting) == 1100, timeout=30)
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        assert time.monotonic() - started < 1.0
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting) == 0, timeout=30)
    assert blocker.result(30)[0] == 200


@pytest.mark.parametrize(("setting", "kept"), [(None, 300), (40, 40)])
def test_a_burst_leaves_its_connections_warm_for_the_next(
    make_mock: Any, make_gateway: Any, setting: int | None, kept: int
) -> None:
    # A busy uvloop/uvicorn node accepts one new connection per event-loop pass, so a burst that has
    # to connect again waits seconds (bench/README.md): the pool keeps as many idle connections as
    # the node can use at once (its max_concurrent), up to upstream.max_idle_per_node.
    node = make_mock(models=["m1"], chunks=1, name="n1")
    upstream = {} if setting is None else {"max_idle_per_node": setting}
    gw = make_gateway(
        nodes=[node_entry(node, "n1", ["m1"], max_concurrent=300)],
        scheduler={"max_queue_size": 1000, "queue_timeout_s": 60},
        upstream=upstream,
    )
    # Long enough that all 300 overlap even on the Python twins of a loaded 2-core machine.
    body = json.dumps({"model": "m1", "prompt": "x", "mock": {"ttft_ms": 1500}}).encode()
    with concurrent.futures.ThreadPoolExecutor(max_workers=300) as pool:
        results = list(pool.map(lambda _: post(gw.url, "/v1/completions", body)[0], range(300)))
    assert results == [200] * 300
    assert node.stats.max_in_flight == 300  # the burst really needed 300 connections at once
    wait_until(lambda: node.stats.connections_open == kept)
    time.sleep(0.3)  # and no more are closed after a while (health checks reuse them)
    assert node.stats.connections_open == kept
