"""Caps, queueing, priorities, deadlines, retries and cancellation, with real sockets."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import time
from typing import Any

import pytest

from tests.support import (
    free_port,
    get,
    hold,
    in_background,
    node_entry,
    post,
    queued,
    raw_request,
    read_until,
    release_in_order,
    rows,
    wait_until,
)

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


def test_priority_orders_the_queue(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    node.gate.close()  # every request is held at the node until released: one at a time, below
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        sent = [pool.submit(post, gw.url, "/v1/completions", {"model": "m1", "prompt": "first", "max_tokens": 1})]
        wait_until(lambda: node.gate.waiting == 1)
        for n, priority in enumerate(["low", "normal", "low", "critical", "high", "normal"], 1):
            body = {"model": "m1", "prompt": priority, "max_tokens": 1}
            sent.append(pool.submit(post, gw.url, "/v1/completions", body, {"X-Priority": priority}))
            wait_until(lambda n=n: queued(gw) == n)  # queued in a known order before the slot frees
        order = [json.loads(body)["prompt"] for body in release_in_order(node, 7)]
        assert [f.result(10)[0] for f in sent] == [200] * 7
    assert order == ["first", "critical", "high", "normal", "normal", "low", "low"]


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
    blocker = hold(node, gw.url)
    waiting = in_background(post, gw.url, "/v1/completions", {"model": "m1", "prompt": "queued", "max_tokens": 1})
    wait_until(lambda: queued(gw) == 1)
    status, headers, body = post(gw.url, "/v1/chat/completions", CHAT)
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    err = json.loads(body)["error"]
    assert err["code"] == "queue_full" and err["type"] == "server_error"
    node.gate.open()
    assert blocker.result(10)[0] == 200 and waiting.result(10)[0] == 200


def test_queue_deadline_is_504(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)], scheduler={"queue_timeout_s": 0.3})
    blocker = hold(node, gw.url)
    started = time.monotonic()
    status, _, body = post(gw.url, "/v1/chat/completions", CHAT)
    waited = time.monotonic() - started
    assert status == 504
    assert json.loads(body)["error"]["code"] == "queue_timeout"
    assert 0.29 <= waited < 5  # the deadline, not before it (and not long after)
    node.gate.open()
    assert blocker.result(10)[0] == 200
    assert post(gw.url, "/v1/completions", {"model": "m1", "prompt": "after", "max_tokens": 1})[0] == 200
    # The expired request never reached the node: only the blocker and the one after it did.
    assert node.stats.per_path.get("/v1/completions", 0) == 2
    assert node.stats.per_path.get("/v1/chat/completions", 0) == 0


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
    tried = dead.stats.per_path.get("/v1/chat/completions", 0)
    # The dead node was tried (until it was taken out) and each try was retried on the other one.
    assert tried >= 1
    assert sum(r["retries"] for r in rows(gw.url, "limit=100")["data"]) == tried


def test_unreachable_node_fails_over_and_is_taken_out(make_mock: Any, make_gateway: Any) -> None:
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
    gw = make_gateway(
        nodes=[{"id": "gone", "url": f"http://127.0.0.1:{free_port()}", "models": ["m1"]}],
        upstream={"health_interval_s": 0.05, "failure_threshold": 1},
    )
    wait_until(lambda: gw.call(lambda: not gw.gateway.registry.nodes["gone"].healthy))
    status, headers, body = post(gw.url, "/v1/chat/completions", CHAT)
    assert status == 503
    assert json.loads(body)["error"]["code"] == "no_capacity"
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


def test_disconnect_while_queued_leaves_the_queue(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    blocker = hold(node, gw.url)
    sock = raw_request(gw.port, b'{"model":"m1","prompt":"queued"}')
    wait_until(lambda: queued(gw) == 1)
    sock.close()
    wait_until(lambda: queued(gw) == 0)
    gone = wait_until(lambda: rows(gw.url, "status=499")["data"])
    assert [r["error_type"] for r in gone] == ["client_disconnected"] and gone[0]["node_id"] is None
    node.gate.open()
    assert blocker.result(10)[0] == 200
    # The next request is the next the node sees: the one that left was never dispatched.
    assert post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"next","max_tokens":1}')[0] == 200
    assert node.stats.per_path.get("/v1/completions", 0) == 2


def test_disconnect_mid_stream_frees_the_slot_at_once(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=200)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    # The node sends 3 tokens, then holds the stream (until the test's end: it is never released).
    sock = raw_request(gw.port, b'{"model":"m1","prompt":"x","stream":true,"mock":{"hold_after":3}}')
    assert read_until(sock, lambda got: got.count(b"data: ") == 3).startswith(b"HTTP/1.1 200")
    wait_until(lambda: node.gate.waiting == 1)
    sock.close()
    # The node sees its connection closed (generation stopped) and the gateway frees the slot.
    wait_until(lambda: node.stats.cancelled == 1)
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.balancer.inflight(0)) == 0)
    assert post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"y","max_tokens":1}')[0] == 200


def test_disconnect_during_long_non_streamed_generation(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)])
    sock = raw_request(gw.port, b'{"model":"m1","prompt":"x","mock":{"hold":true}}')
    wait_until(lambda: node.gate.waiting == 1)
    sock.close()
    wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.balancer.inflight(0)) == 0)
    wait_until(lambda: node.stats.cancelled == 1)  # the node's connection was closed: generation stopped
    assert node.gate.waiting == 0


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
    long = json.dumps({"model": "m1", "prompt": "x", "mock": {"hold": True}}).encode()
    # The quiet tenant has been seen (it is active), then the noisy one floods with long requests.
    quiet = b'{"model":"m1","prompt":"q","max_tokens":1}'
    assert post(gw.url, "/v1/completions", quiet, {"X-Tenant-ID": "quiet"})[0] == 200
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        noisy = [pool.submit(post, gw.url, "/v1/completions", long, {"X-Tenant-ID": "noisy"}) for _ in range(10)]
        wait_until(lambda: queued(gw) == 7)
        wait_until(lambda: node.gate.waiting == 3)  # (on their way to the node) the fourth slot is kept
        assert queued(gw) == 7
        # Served while every noisy generation still runs (held) and seven more wait.
        assert post(gw.url, "/v1/completions", quiet, {"X-Tenant-ID": "quiet"})[0] == 200
        assert node.gate.waiting == 3 and queued(gw) == 7
        node.gate.open()
        assert all(f.result(30)[0] == 200 for f in noisy)


def test_read_timeout_fails_a_silent_node(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], upstream={"read_timeout_s": 0.5, "max_retries": 0})
    started = time.monotonic()
    status, _, raw = post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"x","mock":{"fail":"hang"}}')
    assert status == 502
    assert json.loads(raw)["error"]["code"] == "upstream_error"
    assert 0.49 <= time.monotonic() - started < 10  # the timeout (checked every 0.5 s), not before it
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
    blocker = hold(node, gw.url)  # held until the end: nothing leaves the queue meanwhile
    body = b'{"model":"m1","prompt":"q","max_tokens":1}'
    socks = []
    try:
        for _ in range(1100):
            socks.append(raw_request(gw.port, body))
        wait_until(lambda: queued(gw) == 1100, timeout=30)
        # Every one of them is in Shardon's queue, and the gateway still answers at once.
        assert get(gw.url, "/health")[0] == 200
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: queued(gw) == 0, timeout=30)
    node.gate.open()
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
    # All 300 are held at the node together, then let go.
    body = json.dumps({"model": "m1", "prompt": "x", "mock": {"hold": True}}).encode()
    with concurrent.futures.ThreadPoolExecutor(max_workers=300) as pool:
        results = [pool.submit(post, gw.url, "/v1/completions", body) for _ in range(300)]
        wait_until(lambda: node.gate.waiting == 300, timeout=30)
        node.gate.open()
        assert [f.result(30)[0] for f in results] == [200] * 300
    assert node.stats.max_in_flight == 300  # the burst really needed 300 connections at once
    wait_until(lambda: node.stats.connections_open == kept)
    # And no more are closed after a while: two more rounds of health checks reuse them.
    checks = node.stats.per_path["/health"]  # (the probe's path)
    wait_until(lambda: node.stats.per_path["/health"] >= checks + 2)
    assert node.stats.connections_open == kept


def test_tenants_share_the_queue_by_weight(make_mock: Any, make_gateway: Any) -> None:
    """Weighted fair queueing across tenants (start-time tags), seen in the order requests reach the node."""
    node = make_mock(models=["m1"], chunks=1000)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)],
        auth={"trust_tenant_header": True},
        tenants=[{"name": "heavy", "weight": 3}, {"name": "light", "weight": 1}],
        # Each request below is estimated at 1011 tokens (its 45 bytes / 4, and max_tokens): one per
        # round for a tenant of weight 1, three for weight 3. (Its real usage, 1001, corrects little.)
        scheduler={"quantum_tokens": 1011, "headroom_slots": 0},
    )
    node.gate.close()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        sent = [pool.submit(post, gw.url, "/v1/completions", {"model": "m1", "prompt": "b", "max_tokens": 1})]
        wait_until(lambda: node.gate.waiting == 1)
        for n in range(12):
            tenant = "heavy" if n % 2 else "light"
            body = b'{"model":"m1","prompt":"%s","max_tokens":1000}' % tenant[0].encode()
            sent.append(pool.submit(post, gw.url, "/v1/completions", body, {"X-Tenant-ID": tenant}))
            wait_until(lambda n=n: queued(gw) == n + 1)
        order = "".join(json.loads(b)["prompt"] for b in release_in_order(node, 13))[1:]
        assert [f.result(10)[0] for f in sent] == [200] * 13
    # The light tenant queued first; then three to one while both wait.
    assert order == "lhhhlhhhllll", order


def test_real_usage_corrects_a_tenants_share(make_mock: Any, make_gateway: Any) -> None:
    """Two tenants of equal weight, each request estimated at 1016 tokens: "cheap" ones really use 2,
    "full" ones 1000. Charged the estimate, they would alternate; corrected by their real usage (the
    difference given back once each ends), the cheap tenant's requests go more often."""
    node = make_mock(models=["m1"])
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)],
        auth={"trust_tenant_header": True},
        scheduler={"quantum_tokens": 1016, "headroom_slots": 0},
    )
    bodies = {  # 66 bytes each: 16 + max_tokens 1000 estimated
        "cheap": b'{"model":"m1","prompt":"c","max_tokens":1000,"mock":{"chunks":  1}}',
        "full": b'{"model":"m1","prompt":"f","max_tokens":1000,"mock":{"chunks":999}}',
    }
    node.gate.close()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        sent = [pool.submit(post, gw.url, "/v1/completions", {"model": "m1", "prompt": "b", "max_tokens": 1})]
        wait_until(lambda: node.gate.waiting == 1)
        for n in range(12):
            tenant = "cheap" if n % 2 else "full"
            sent.append(pool.submit(post, gw.url, "/v1/completions", bodies[tenant], {"X-Tenant-ID": tenant}))
            wait_until(lambda n=n: queued(gw) == n + 1)
        order = "".join(json.loads(b)["prompt"] for b in release_in_order(node, 13))[1:]
        assert [f.result(10)[0] for f in sent] == [200] * 13
    # Alternating at first (a request's usage is given back after the next one is picked), then
    # the cheap tenant's surplus lets its requests through in a row: all six within the first nine.
    assert order[:9].count("c") == 6 and order.endswith("fff"), order
