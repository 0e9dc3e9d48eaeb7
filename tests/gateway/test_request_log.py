"""Every /v1 request leaves exactly one log row; receipts, metrics and the admin queries agree."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    call,
    hold,
    in_background,
    node_entry,
    one_row,
    post,
    queued,
    raw_request,
    read_until,
    send,
    wait_until,
)
from tests.support import rows as _rows

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'
AUTH = {"Authorization": "Bearer sk-u"}


def rows(gw: Any, query: str = "") -> dict[str, Any]:
    return _rows(gw.url, query)


# == one row per request, whatever its fate ============================================================
#
# Each outcome sends its requests and says, for each, (its x-request-id, the status and error_type its
# row must have); the test then checks those rows and that the log holds nothing else.

Sent = list[tuple[str, int, str | None]]


def _ok(node: Any, gw: Any) -> Sent:
    status, headers, body = post(gw.url, "/v1/chat/completions", CHAT, AUTH)
    assert status == 200
    row = one_row(gw.url, headers["x-request-id"])
    text = json.loads(body)["choices"][0]["message"]["content"]
    assert row["model"] == "m1" and row["node_id"] == "n" and row["tenant"] == "t" and row["key_id"] == "ku"
    assert row["prompt_tokens"] >= 1 and row["completion_tokens"] == 3
    assert row["receipt"]["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    return [(headers["x-request-id"], 200, None)]


def _refused(body: bytes, headers: dict[str, str], status: int, error: str) -> Callable[[Any, Any], Sent]:
    def send(node: Any, gw: Any) -> Sent:
        got, answer_headers, _ = post(gw.url, "/v1/chat/completions", body, headers)
        assert got == status
        return [(answer_headers["x-request-id"], status, error)]

    return send


def _limited(node: Any, gw: Any) -> Sent:
    # A 2/min key: its burst of 2 is spent, the next token is 30 s away, past the 0.3 s deadline.
    sent: Sent = []
    for status in (200, 200, 429):
        got, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-t"})
        assert got == status
        sent.append((headers["x-request-id"], status, None if status == 200 else "rate_limit_exceeded"))
    return sent


def _full_and_deadline(node: Any, gw: Any) -> Sent:
    # Behind a request the node holds: one waits (and reaches its deadline), the next finds the queue full.
    blocker = hold(node, gw.url, headers=AUTH)
    waiting = in_background(post, gw.url, "/v1/chat/completions", CHAT, AUTH)
    wait_until(lambda: queued(gw) == 1)
    status, full, _ = post(gw.url, "/v1/chat/completions", CHAT, AUTH)
    assert status == 503
    status, deadline, _ = waiting.result(10)
    assert status == 504
    node.gate.open()
    status, held, _ = blocker.result(10)
    assert status == 200
    return [
        (held["x-request-id"], 200, None),
        (full["x-request-id"], 503, "queue_full"),
        (deadline["x-request-id"], 504, "queue_timeout"),
    ]


def _gone(node: Any, gw: Any) -> Sent:
    # The client leaves mid-stream (the node holds the stream after its first token).
    with raw_request(
        gw.port, b'{"model":"m1","prompt":"x","stream":true,"mock":{"hold_after":1}}', b"Authorization: Bearer sk-u\r\n"
    ) as sock:
        head = read_until(sock, lambda got: b"data: " in got)
    request_id = head.split(b"x-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    wait_until(lambda: node.stats.cancelled == 1)
    row = one_row(gw.url, request_id)
    assert row["stream"] is True and row["completion_tokens"] == 1
    return [(request_id, 499, "client_disconnected")]


def _midstream(node: Any, gw: Any) -> Sent:
    body = b'{"model":"m1","prompt":"x","stream":true,"mock":{"fail":"mid"}}'
    status, headers, _ = post(gw.url, "/v1/completions", body, AUTH)
    assert status == 200  # the failure is told in-band
    return [(headers["x-request-id"], 502, "upstream_error")]


def _node_500(node: Any, gw: Any) -> Sent:
    body = b'{"model":"m1","prompt":"x","mock":{"fail":"status500"}}'
    status, headers, _ = post(gw.url, "/v1/completions", body, AUTH)
    assert status == 500  # retried, then the node's own answer
    row = one_row(gw.url, headers["x-request-id"])
    assert row["retries"] == 2
    return [(headers["x-request-id"], 500, None)]


OUTCOMES: dict[str, Callable[[Any, Any], Sent]] = {
    "ok": _ok,
    "bad": _refused(b"{nope", AUTH, 400, "invalid_request"),
    "unauth": _refused(CHAT, {}, 401, "invalid_api_key"),
    "forbidden": _refused(CHAT.replace(b"m1", b"m2"), {"Authorization": "Bearer sk-t"}, 403, "model_not_allowed"),
    "unknown": _refused(CHAT.replace(b"m1", b"zz"), AUTH, 404, "model_not_found"),
    "too_large": _refused(b'{"model":"m1","prompt":"' + b"x" * 5000 + b'"}', AUTH, 413, "request_too_large"),
    "limited": _limited,
    "full_and_deadline": _full_and_deadline,
    "gone": _gone,
    "midstream": _midstream,
    "node_500": _node_500,
}


@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_every_outcome_leaves_one_row(make_mock: Any, make_gateway: Any, tmp_path: Path, outcome: str) -> None:
    node = make_mock(models=["m1", "m2"], chunks=6, name="n")
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1", "m2"], max_concurrent=1)],
        scheduler={"max_queue_size": 1, "queue_timeout_s": 0.3},
        server={"max_body_bytes": 4096},
        tenants=[
            {
                "name": "t",
                "keys": [{"key": "sk-t", "id": "kt", "rpm": 2, "models": ["m1"]}, {"key": "sk-u", "id": "ku"}],
            }
        ],
        store={"path": str(tmp_path / "log.db"), "flush_interval_ms": 20},
    )
    sent = OUTCOMES[outcome](node, gw)
    for request_id, status, error in sent:
        row = one_row(gw.url, request_id)
        assert (row["status"], row["error_type"]) == (status, error), row
        assert row["id"] == request_id  # the row shows the id as the client got it
        assert row["finished_at"] >= row["received_at"]
    # Exactly one row per request: nothing else was logged.
    assert sorted(r["id"] for r in rows(gw, "limit=1000")["data"]) == sorted(r for r, _, _ in sent)


def test_only_api_requests_are_logged(make_mock: Any, make_gateway: Any) -> None:
    """Health checks, scrapes, the model list and requests to no route leave no row (nor access line)."""
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    for path in ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/nothing"):
        assert send(gw.url, "GET", path)[0] in (200, 404, 405)
    assert post(gw.url, "/v2/chat/completions", CHAT)[0] == 404
    assert post(gw.url, "/v1/embeddings", b'{"model":"m1","input":"x"}')[0] == 200
    assert [r["endpoint"] for r in rows(gw)["data"]] == ["/v1/embeddings"]


def test_request_ids_are_hex_in_arrival_order_and_looked_up_by_it(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    ids = [post(gw.url, "/v1/chat/completions", body)[1]["x-request-id"] for body in (CHAT, b"{nope", CHAT)]
    assert ids == sorted(ids) and len(set(ids)) == 3  # the request log's integer key, in arrival order
    assert all(len(i) == 16 and int(i, 16) > 0 for i in ids)
    assert [one_row(gw.url, i)["status"] for i in ids] == [200, 400, 200]
    # A malformed id is a 400 on the id; a well-formed unknown one a 404.
    for bad in ("nope", ids[0] + "0", ids[0][:-1], "0x" + ids[0][2:]):
        status, _, body = call(gw.url, "GET", f"/admin/requests/{bad}")
        assert status == 400 and body["error"]["param"] == "id", (bad, body)
    status, _, body = call(gw.url, "GET", f"/admin/requests/{'f' * 15}0")
    assert status == 404 and "f" * 15 + "0" in body["error"]["message"], body


def test_stream_receipt_matches_what_the_client_received(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=7)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        request_id = raw.headers["x-request-id"]
        text = "".join((c.choices[0].delta.content or "") for c in raw.parse() if c.choices)
    row = one_row(gw.url, request_id)
    assert row["receipt"]["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert row["completion_tokens"] == 7


def test_burst_of_5000_loses_no_row_and_survives_restart(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=1)
    config = {
        "nodes": [node_entry(node, "n", ["m1"], max_concurrent=64)],
        "store": {"path": str(tmp_path / "burst.db")},
        "log": {"access_log": False},
        "scheduler": {"max_queue_size": 10000, "queue_timeout_s": 60},
    }
    gw = make_gateway(dict(config))

    def worker(n: int) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        ok = 0
        for _ in range(n):
            conn.request("POST", "/v1/chat/completions", body=CHAT, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            ok += resp.status == 200
        conn.close()
        return ok

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert sum(pool.map(worker, [250] * 20)) == 5000
    gw.stop()  # shutdown flushes the log
    gw2 = make_gateway(dict(config))
    assert rows(gw2, "limit=0")["total"] == 5000
    page1 = rows(gw2, "limit=100&offset=0")["data"]
    page2 = rows(gw2, "limit=100&offset=100")["data"]
    assert len(page1) == len(page2) == 100
    assert not {r["id"] for r in page1} & {r["id"] for r in page2}
    ids = [r["id"] for r in page1 + page2]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 200  # newest first, by id
    assert [r["received_at"] for r in page1] == sorted((r["received_at"] for r in page1), reverse=True)
    assert one_row(gw2.url, page2[-1]["id"])["received_at"] == page2[-1]["received_at"]  # found by its hex id
    assert gw2.call(lambda: gw2.gateway.request_log.newest_id) == int(page1[0]["id"], 16)  # restart seeded it


def test_filters_stats_and_usage_report(make_mock: Any, make_gateway: Any) -> None:
    a = make_mock(models=["m1"], name="a")
    b = make_mock(models=["m2"], name="b")
    gw = make_gateway(
        nodes=[node_entry(a, "a", ["m1"]), node_entry(b, "b", ["m2"])],
        tenants=[
            {"name": "t1", "keys": [{"key": "sk-1", "id": "k1"}]},
            {"name": "t2", "keys": [{"key": "sk-2", "id": "k2"}]},
        ],
    )
    for _ in range(3):
        post(gw.url, "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-1"})
    for _ in range(2):
        post(gw.url, "/v1/chat/completions", CHAT.replace(b"m1", b"m2"), {"Authorization": "Bearer sk-2"})
    post(gw.url, "/v1/chat/completions", CHAT.replace(b"m1", b"nope"), {"Authorization": "Bearer sk-2"})
    wait_until(lambda: rows(gw, "limit=0")["total"] == 6)
    assert rows(gw, "model=m1")["total"] == 3
    assert rows(gw, "node=b")["total"] == 2
    assert rows(gw, "tenant=t2")["total"] == 3
    assert rows(gw, "status=4xx")["total"] == 1
    assert rows(gw, "status=200&tenant=t2")["total"] == 2
    assert rows(gw, f"since={time.time() + 60}")["total"] == 0
    stats = call(gw.url, "GET", "/admin/stats")[2]
    assert stats["total"] == 6 and stats["completed"] == 5 and stats["failed"] == 1
    usage = {t["tenant"]: t for t in call(gw.url, "GET", "/admin/stats/tenants")[2]["data"]}
    assert usage["t1"]["requests"] == 3 and usage["t1"]["completion_tokens"] == 9
    assert usage["t2"]["keys"][0]["key_id"] == "k2"
    models = {m["model"]: m for m in call(gw.url, "GET", "/admin/stats/models")[2]["data"]}
    assert models["m2"]["total"] == 2
    status = call(gw.url, "GET", "/admin/status")[2]
    assert {n["id"] for n in status["nodes"]} == {"a", "b"} and status["version"]


def test_metrics_parse_and_match_the_log(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    for _ in range(4):
        post(gw.url, "/v1/chat/completions", CHAT)
    post(gw.url, "/v1/chat/completions", b"{bad")
    wait_until(lambda: rows(gw, "limit=0")["total"] == 5)
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_status: dict[str, float] = {}
    for sample in families["shardon_requests"].samples:
        if sample.name == "shardon_requests_total":
            by_status[sample.labels["status"]] = by_status.get(sample.labels["status"], 0) + sample.value
    assert by_status == {"200": 4.0, "400": 1.0}
    log_counts = {"200": rows(gw, "status=200")["total"], "400": rows(gw, "status=400")["total"]}
    assert {k: float(v) for k, v in log_counts.items()} == by_status
    assert any(s.value == 1 for s in families["shardon_node_up"].samples if s.labels["node"] == "n")
    ttft = [s for s in families["shardon_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft and ttft[0].value == 4
    tokens = {s.labels["kind"]: s.value for s in families["shardon_tokens"].samples if s.name == "shardon_tokens_total"}
    assert tokens["completion"] == 8


def test_embeddings_usage_is_logged_without_an_output_hash(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    status, headers, body = post(gw.url, "/v1/embeddings", b'{"model":"m1","input":["hello there","x"]}')
    assert status == 200
    row = one_row(gw.url, headers["x-request-id"])
    assert row["prompt_tokens"] == json.loads(body)["usage"]["prompt_tokens"] > 0
    assert row["output_sha256"] is None


def test_metrics_off_still_serves_and_logs(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], metrics={"enabled": False})
    status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {})
    assert status == 200
    assert one_row(gw.url, headers["x-request-id"])["status"] == 200
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""  # nothing counted, nothing exported
    conn.close()
