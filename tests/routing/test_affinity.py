"""Prefix affinity and round robin through the gateway, with real sockets, on both engines."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from tests.routing.helpers import Client, hold, inflight, turns
from tests.support import node_entry, wait_until


def test_a_conversation_stays_on_its_node_and_moves_past_the_load_bound(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["chat", "side-a"], chunks=2, name="a")
    b = make_mock(models=["chat", "side-b"], chunks=2, name="b")
    gw = make_gateway(
        nodes=[
            node_entry(a, "a", ["chat", "side-a"], max_concurrent=8),
            node_entry(b, "b", ["chat", "side-b"], max_concurrent=8),
        ],
        routing={"chat": {"policy": "prefix_affinity"}},
    )
    conversation = turns("alice", 7)
    client = Client(gw.url)
    try:
        served = []
        for body in conversation[:3]:
            status, headers, _ = client.post(body)
            assert status == 200
            served.append(headers["x-shardon-node"])
        home = served[0]
        assert served == [home] * 3
        other = "b" if home == "a" else "a"
        # Other conversations each keep their own node too.
        for user in ("bob", "carol", "dave"):
            first, second = turns(user, 2)
            assert client.post(first)[1]["x-shardon-node"] == client.post(second)[1]["x-shardon-node"]

        # The home node gets busy with other work: 3 requests that hang there. Its bound for one more
        # request is ceil(1.25 x (3 + 1) / 2) = 3 < 4: the next turn moves.
        side = json.dumps({"model": f"side-{home}", "prompt": "x", "mock": {"fail": "hang"}}).encode()
        hanging = [hold(gw.port, side, "/v1/completions") for _ in range(3)]
        try:
            wait_until(lambda: inflight(gw, home) == 3)
            status, headers, _ = client.post(conversation[3])
            assert status == 200 and headers["x-shardon-node"] == other
            status, headers, _ = client.post(conversation[4])
            assert status == 200 and headers["x-shardon-node"] == other  # and stays where it moved
        finally:
            for sock in hanging:
                sock.close()
        wait_until(lambda: inflight(gw, home) == 0)
        # Home is idle again; the conversation is remembered where its prefix was placed last.
        for body in conversation[5:]:
            status, headers, _ = client.post(body)
            assert status == 200 and headers["x-shardon-node"] == other
    finally:
        client.close()


def test_the_load_bound_spreads_requests_that_share_a_prefix(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["chat"], name="a")
    b = make_mock(models=["chat"], name="b")
    gw = make_gateway(
        nodes=[node_entry(a, "a", ["chat"], max_concurrent=16), node_entry(b, "b", ["chat"], max_concurrent=16)],
        routing={"chat": {"policy": "prefix_affinity"}},
    )
    # Ten conversations at once with the same system prompt: no node takes more than the bound,
    # ceil(1.25 x 10 / 2) = 7 of them.
    hanging = []
    try:
        for i in range(10):
            body = json.loads(turns(f"user-{i}", 1)[0])
            body["mock"] = {"fail": "hang"}
            hanging.append(hold(gw.port, json.dumps(body).encode()))
            wait_until(lambda n=i + 1: inflight(gw, "a") + inflight(gw, "b") == n)
        loads = [inflight(gw, "a"), inflight(gw, "b")]
        assert sum(loads) == 10 and max(loads) <= 7, loads
    finally:
        for sock in hanging:
            sock.close()


def test_a_session_stays_on_its_node(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["chat"], chunks=2, name="a")
    b = make_mock(models=["chat"], chunks=2, name="b")
    gw = make_gateway(
        nodes=[node_entry(a, "a", ["chat"], max_concurrent=8), node_entry(b, "b", ["chat"], max_concurrent=8)],
        routing={"chat": {"policy": "prefix_affinity"}},
    )
    client = Client(gw.url)
    try:
        for session in ("s1", "s2", "s3", "s4"):
            nodes = set()
            for i in range(3):  # unrelated prompts: the session, not the prefix, decides
                body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": f"q{i}"}]}).encode()
                status, headers, _ = client.post(body, {"X-Session-ID": session})
                assert status == 200
                nodes.add(headers["x-shardon-node"])
                body = json.dumps({"model": "chat", "user": session, "messages": [{"role": "user", "content": "p"}]})
                status, headers, _ = client.post(body.encode())
                assert status == 200
                nodes.add(headers["x-shardon-node"])
            assert len(nodes) == 1
    finally:
        client.close()


def test_round_robin_deals_requests_by_node_weight(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["chat"], chunks=1, name="a")
    b = make_mock(models=["chat"], chunks=1, name="b")
    gw = make_gateway(
        nodes=[
            node_entry(a, "a", ["chat"], max_concurrent=4, weight=1),
            node_entry(b, "b", ["chat"], max_concurrent=4, weight=3),
        ],
        routing={"chat": {"policy": "round_robin"}},
    )
    client = Client(gw.url)
    try:
        body = b'{"model":"chat","messages":[{"role":"user","content":"hi"}]}'
        served = [client.post(body)[1]["x-shardon-node"] for _ in range(40)]
    finally:
        client.close()
    assert Counter(served) == {"a": 10, "b": 30}
    assert a.stats.per_path["/v1/chat/completions"] == 10 and b.stats.per_path["/v1/chat/completions"] == 30
