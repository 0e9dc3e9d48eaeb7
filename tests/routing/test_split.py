"""A weighted traffic split under one public name, through the gateway, on both engines."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.routing.helpers import Client, metrics
from tests.support import call, node_entry, wait_until

CHAT = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


def split_gateway(make_mock: Any, make_gateway: Any, tmp_path: Path, routing: dict[str, Any]) -> Any:
    v1 = make_mock(models=["chat-v1"], chunks=2, name="v1")
    v2 = make_mock(models=["chat-v2"], chunks=2, name="v2")
    gw = make_gateway(
        nodes=[
            node_entry(v1, "n1", ["chat-v1"], max_concurrent=8),
            node_entry(v2, "n2", ["chat-v2"], max_concurrent=8),
        ],
        routing=routing,
        store={"path": str(tmp_path / "log.db"), "flush_interval_ms": 20},
    )
    return v1, v2, gw


def test_the_split_follows_its_weights_over_2000_requests(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    v1, v2, gw = split_gateway(make_mock, make_gateway, tmp_path, {"chat": {"split": {"chat-v1": 90, "chat-v2": 10}}})
    client = Client(gw.url)
    variants: Counter[str] = Counter()
    try:
        for _ in range(2000):
            status, headers, _ = client.post(CHAT)
            assert status == 200
            variants[headers["x-shardon-variant"]] += 1
            assert headers["x-shardon-node"] == {"chat-v1": "n1", "chat-v2": "n2"}[headers["x-shardon-variant"]]
    finally:
        client.close()
    assert abs(variants["chat-v2"] / 2000 - 0.10) <= 0.02 and abs(variants["chat-v1"] / 2000 - 0.90) <= 0.02
    assert v1.stats.per_path["/v1/chat/completions"] == variants["chat-v1"]
    assert v2.stats.per_path["/v1/chat/completions"] == variants["chat-v2"]
    assert json.loads(v2.stats.last_body)["model"] == "chat-v2"  # the variant's name, as its node knows it

    # The request log: the name asked and the variant; the statistics per model show the shares.
    def stats() -> Any:
        status, _, body = call(gw.url, "GET", "/admin/stats/models")
        assert status == 200
        chat = [d for d in body["data"] if d["model"] == "chat"]
        return chat[0] if chat and chat[0]["total"] == 2000 else None

    chat = wait_until(stats, timeout=15)
    assert chat["variants"]["chat-v1"]["total"] == variants["chat-v1"]
    assert abs(chat["variants"]["chat-v2"]["share"] - 0.10) <= 0.02
    status, _, rows = call(gw.url, "GET", "/admin/requests?limit=5")
    assert {(r["model"], r["variant"]) for r in rows["data"]} <= {("chat", "chat-v1"), ("chat", "chat-v2")}

    # /metrics: the requests per variant (counted once each has finished, maybe just after its answer).
    def counts() -> dict[str, float]:
        return {
            s.labels["variant"]: s.value
            for f in text_string_to_metric_families(metrics(gw.url))
            if f.name == "shardon_variant_requests"
            for s in f.samples
            if s.name.endswith("_total")
        }

    wait_until(lambda: counts() == {"chat-v1": variants["chat-v1"], "chat-v2": variants["chat-v2"]})


def test_a_sticky_split_keeps_each_session_on_its_variant(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    _, _, gw = split_gateway(
        make_mock, make_gateway, tmp_path, {"chat": {"split": {"chat-v1": 90, "chat-v2": 10}, "sticky": "session"}}
    )
    client = Client(gw.url)
    seen: dict[str, set[str]] = {}
    total: Counter[str] = Counter()
    try:
        for i in range(1000):
            session = f"session-{i}"
            # The same session by the X-Session-ID header, then by the request's user field.
            for headers, body in (
                ({"X-Session-ID": session}, CHAT),
                (
                    {},
                    json.dumps(
                        {"model": "chat", "user": session, "messages": [{"role": "user", "content": "yo"}]}
                    ).encode(),
                ),
            ):
                status, got, _ = client.post(body, headers)
                assert status == 200
                seen.setdefault(session, set()).add(got["x-shardon-variant"])
                total[got["x-shardon-variant"]] += 1
    finally:
        client.close()
    assert all(len(variants) == 1 for variants in seen.values())
    assert abs(total["chat-v2"] / 2000 - 0.10) <= 0.02


def test_an_error_answer_names_the_variant_too(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    _, v2, gw = split_gateway(make_mock, make_gateway, tmp_path, {"chat": {"split": {"chat-v2": 1}}})
    v2.set_fail("status500")
    client = Client(gw.url)
    try:
        status, headers, _ = client.post(CHAT)
    finally:
        client.close()
    assert status >= 500 and headers["x-shardon-variant"] == "chat-v2"


def test_the_split_name_is_listed_and_its_variants_reachable(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    _, _, gw = split_gateway(make_mock, make_gateway, tmp_path, {"chat": {"split": {"chat-v1": 1, "chat-v2": 1}}})
    status, _, body = call(gw.url, "GET", "/v1/models")
    assert {"chat", "chat-v1", "chat-v2"} <= {m["id"] for m in body["data"]}
    client = Client(gw.url)
    try:
        status, headers, _ = client.post(CHAT.replace(b'"chat"', b'"chat-v2"'))  # a variant by its own name
    finally:
        client.close()
    assert status == 200 and headers["x-shardon-node"] == "n2" and "x-shardon-variant" not in headers
    client = Client(gw.url)
    try:  # a streamed answer names its variant too
        status, headers, body = client.post(CHAT.replace(b'"max_tokens":2', b'"stream":true'))
    finally:
        client.close()
    assert status == 200 and headers["x-shardon-variant"] in ("chat-v1", "chat-v2") and body.endswith(b"[DONE]\n\n")


def test_a_user_field_that_is_no_session_is_a_400(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    _, _, gw = split_gateway(
        make_mock, make_gateway, tmp_path, {"chat": {"split": {"chat-v1": 1, "chat-v2": 1}, "sticky": "session"}}
    )
    client = Client(gw.url)
    try:
        status, _, body = client.post(b'{"model":"chat","user":42,"messages":[{"role":"user","content":"hi"}]}')
    finally:
        client.close()
    assert status == 400 and json.loads(body)["error"]["param"] == "user"
