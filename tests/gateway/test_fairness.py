"""A quiet tenant's lone request is dispatched within one service time of a flood's, on a real gateway.

The scenario of issue 17, part 1, as a new user would set it up: one node, tenants ``team-a`` and
``team-b`` with their own keys, ``team-a`` floods the model with short requests (``max_tokens: 2``;
the gateway's estimate of each is larger than its real usage, so every one of them is refunded
when it ends), and once the flood waits in the queue ``team-b`` sends one request. It must be the
next request dispatched: at most one of the flood's goes between its entering the queue and its
dispatch.

The dispatch order is read from the request log's rows (``GET /admin/requests``), on both engines
and over both implementations of the fair queue (``queue_impl``).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
from typing import Any

import pytest

from tests.support import call, node_entry, post, twin, wait_until

SERVICE_MS = 60  # how long the node takes for each request


@pytest.fixture
def queue_impl(implementation: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The gateway's routes use this implementation of FairQueue (set before the gateway starts)."""
    import shardon.scheduler

    scheduler = "shardon._scheduler_c" if shardon.scheduler.COMPILED else "shardon._scheduler_py"
    monkeypatch.setattr(f"{scheduler}.FairQueue", twin("queue", implementation).FairQueue)
    return implementation


def _body(text: str, ms: int = SERVICE_MS) -> bytes:
    return json.dumps(
        {
            "model": "m1",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 2,
            "mock": {"ttft_ms": ms},
        }
    ).encode()


def _send(port: int, body: bytes, key: str, priority: str) -> socket.socket:
    """A request written on a raw socket; its answer is read (or the socket closed) later."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nX-Priority: {priority}\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _waiting(gw: Any) -> int:
    return int(gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting))


def _seen(gw: Any) -> int:
    """Requests of the model waiting or in flight in the gateway."""
    return int(gw.call(lambda: (route := gw.gateway.scheduler.routes["m1"]).waiting + sum(route.inflight.values())))


def _rows(gw: Any, tenant: str) -> list[dict[str, Any]]:
    status, _, body = call(gw.url, "GET", f"/admin/requests?tenant={tenant}&limit=1000")
    assert status == 200, body
    return list(body["data"])


def _row(gw: Any, request_id: str) -> dict[str, Any]:
    def fetch() -> Any:
        status, _, body = call(gw.url, "GET", f"/admin/requests/{request_id}")
        return body if status == 200 else None

    return dict(wait_until(fetch, timeout=10))


def _gateway(make_mock: Any, make_gateway: Any, max_concurrent: int, **scheduler: Any) -> tuple[Any, Any]:
    node = make_mock(models=["m1"], chunks=16)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=max_concurrent)],
        tenants=[
            {"name": "team-a", "keys": [{"key": "sk-team-a"}]},
            {"name": "team-b", "keys": [{"key": "sk-team-b"}]},
        ],
        scheduler={"queue_timeout_s": 60, "max_queue_size": 1000, **scheduler},
        log={"access_log": False},
    )
    return node, gw


def _flood_then_quiet(gw: Any, node: Any, flood: int, flood_priorities: list[str], quiet: bytes, priority: str) -> None:
    """team-a's flood waits in the queue (a few of its requests served and refunded already), then
    team-b sends one request and reads its answer; then the flood's clients leave."""
    socks = []
    try:
        for i in range(flood):
            socks.append(_send(gw.port, _body(f"flood {i}"), "sk-team-a", flood_priorities[i % len(flood_priorities)]))
        # Wait until every flood request has reached the gateway (so each gets its row), a few
        # of them have been served (and refunded) and the rest wait in the queue.
        wait_until(lambda: node.stats.completed >= 3 and _seen(gw) + node.stats.completed >= flood, timeout=30)
        headers = {"Authorization": "Bearer sk-team-b", "X-Priority": priority}
        assert post(gw.url, "/v1/chat/completions", quiet, headers)[0] == 200
    finally:
        for sock in socks:
            sock.close()  # the rest of the flood leaves the queue


def _flood_ahead(gw: Any, flood: int) -> tuple[int, float]:
    """How many flood requests were dispatched while team-b's request waited, and its wait in ms."""
    quiet = wait_until(lambda: _rows(gw, "team-b"), timeout=10)[0]
    # Every flood request has its row (served, or 499 when its client left), so the ones dispatched
    # while the quiet request waited are all there.
    rows = wait_until(lambda: (rows := _rows(gw, "team-a")) and len(rows) == flood and rows, timeout=30)
    # From the moment it entered the queue: before that (its body read, its key checked) slots that
    # free go to the queue as it is, and with two slots whose requests started together, two may.
    since = quiet["queued_at"] if quiet["queued_at"] is not None else quiet["received_at"]
    ahead = [r for r in rows if r["dispatched_at"] is not None and since < r["dispatched_at"] < quiet["dispatched_at"]]
    return len(ahead), (quiet["dispatched_at"] - quiet["received_at"]) * 1000


# (flood's priorities, in turn; the quiet request's priority)
PRIORITIES = {
    "same": (["normal"], "normal"),
    "mixed": (["low", "normal", "high"], "high"),
}
# (the node's max_concurrent, scheduler settings): the defaults, and with no slot held back for
# quiet tenants, so that the queue's order alone must put the lone request first.
SLOTS = {
    "1": (1, {}),
    "2": (2, {}),
    "2-no-headroom": (2, {"headroom_slots": 0}),
}


@pytest.mark.parametrize("flood", [40, 400])
@pytest.mark.parametrize("slots", list(SLOTS))
@pytest.mark.parametrize("priorities", list(PRIORITIES))
def test_lone_request_is_not_queued_behind_a_flood(
    make_mock: Any, make_gateway: Any, queue_impl: str, flood: int, slots: str, priorities: str
) -> None:
    flood_priorities, quiet_priority = PRIORITIES[priorities]
    max_concurrent, scheduler = SLOTS[slots]
    node, gw = _gateway(make_mock, make_gateway, max_concurrent, **scheduler)
    _flood_then_quiet(gw, node, flood, flood_priorities, _body("quiet"), quiet_priority)
    ahead, waited_ms = _flood_ahead(gw, flood)
    # Next in line: it waits for the request in progress to end (one service time), not for the
    # flood's backlog. At most one flood request may slip in while it is being admitted.
    assert ahead <= 1, (ahead, waited_ms)
    assert waited_ms < SERVICE_MS * 2 + 1000, (ahead, waited_ms)


def test_lone_request_costlier_than_a_quantum_is_not_queued_behind_a_flood(
    make_mock: Any, make_gateway: Any, queue_impl: str
) -> None:
    # The quiet request may generate 8,000 tokens (its estimated cost is eight quanta), the
    # flood's 2 each: it still goes next.
    node, gw = _gateway(make_mock, make_gateway, 1)
    big = json.loads(_body("quiet"))
    big["max_tokens"] = 8000
    _flood_then_quiet(gw, node, 200, ["normal"], json.dumps(big).encode(), "normal")
    ahead, waited_ms = _flood_ahead(gw, 200)
    assert ahead <= 1, (ahead, waited_ms)


def test_adaptive_headroom_keeps_a_slot_for_the_quiet_tenants_next_request(make_mock: Any, make_gateway: Any) -> None:
    # A quiet tenant that keeps a request in flight is likely to send another before a noisy
    # generation ends: the headroom grows (to three slots for this demand, the noisy tenant keeping
    # its fair share of four), and its next two requests both start at once (with one slot kept,
    # the second would wait for a noisy generation to end).
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=8)],
        tenants=[
            {"name": "team-a", "keys": [{"key": "sk-team-a"}]},
            {"name": "team-b", "keys": [{"key": "sk-team-b"}]},
        ],
        scheduler={"queue_timeout_s": 60},
        log={"access_log": False},
    )
    route = lambda: gw.gateway.scheduler.routes["m1"]  # noqa: E731
    pool = concurrent.futures.ThreadPoolExecutor(4)
    quiet = {"Authorization": "Bearer sk-team-b"}
    long_quiet = pool.submit(post, gw.url, "/v1/chat/completions", _body("long", 6000), quiet)
    wait_until(lambda: node.stats.in_flight == 1)
    socks = [_send(gw.port, _body(f"flood {i}", 3000), "sk-team-a", "normal") for i in range(20)]
    try:
        wait_until(lambda: gw.call(lambda: route().headroom) == 3, timeout=10)
        # The noisy tenant's generations end and it gets slots back only up to its share: three stay free.
        wait_until(lambda: gw.call(lambda: route().inflight.get("team-a")) == 4, timeout=10)
        assert gw.call(lambda: gw.gateway.scheduler.balancer.free_slots(route().candidates)) == 3
        both = [pool.submit(post, gw.url, "/v1/chat/completions", _body(f"quiet {i}", 100), quiet) for i in range(2)]
        answers = [f.result(10) for f in both]
        assert [status for status, _, _ in answers] == [200, 200]
        rows = [_row(gw, headers["x-request-id"]) for _, headers, _ in answers]
        waits = [(r["dispatched_at"] - r["received_at"]) * 1000 for r in rows]
        assert max(waits) < 1000, waits  # not behind a 3 s generation
        assert long_quiet.result(10)[0] == 200
    finally:
        for sock in socks:
            sock.close()
        pool.shutdown()
