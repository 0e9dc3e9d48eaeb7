"""Every /v1 request leaves exactly one log row; receipts, metrics and the admin queries agree."""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import time
from pathlib import Path
from typing import Any

import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import node_entry, wait_until
from tests.gateway.test_auth import call
from tests.gateway.test_forwarding import post
from tests.gateway.test_scheduling import _raw_request

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'


def rows(gw: Any, query: str = "") -> dict[str, Any]:
    status, _, body = call(gw.url, "GET", "/admin/requests?" + query)
    assert status == 200, body
    return body


def one_row(gw: Any, request_id: str) -> dict[str, Any]:
    def fetch() -> Any:
        status, _, body = call(gw.url, "GET", f"/admin/requests/{request_id}")
        return body if status == 200 else None

    return wait_until(fetch, timeout=5)


def test_every_outcome_leaves_one_row(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=6, name="n")
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)],
        scheduler={"max_queue_size": 1, "queue_timeout_s": 0.3},
        tenants=[{"name": "t", "keys": [{"key": "sk-t", "id": "kt", "rpm": 60}, {"key": "sk-u", "id": "ku"}]}],
        store={"path": str(tmp_path / "log.db"), "flush_interval_ms": 20},
    )
    auth = {"Authorization": "Bearer sk-u"}
    ids: dict[str, str] = {}
    # success (with a known output), 400, 401, 404
    status, headers, body = post(gw.url, "/v1/chat/completions", CHAT, auth)
    assert status == 200
    ids["ok"] = headers["x-request-id"]
    text = json.loads(body)["choices"][0]["message"]["content"]
    for name, req, hdrs, expect in [
        ("bad", b"{nope", auth, 400),
        ("unauth", CHAT, {}, 401),
        ("unknown", CHAT.replace(b"m1", b"zz"), auth, 404),
    ]:
        status, headers, _ = post(gw.url, "/v1/chat/completions", req, hdrs)
        assert status == expect
        ids[name] = headers["x-request-id"]
    # 429: a 60/min key's burst of 60 is spent, the next needs 1 s > the 0.3 s deadline
    for _ in range(60):
        post(gw.url, "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-t"})
    status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-t"})
    assert status == 429
    ids["limited"] = headers["x-request-id"]
    # 504 (deadline) and 503 (queue full) behind a request holding the only slot
    hold = json.dumps({"model": "m1", "prompt": "hold", "mock": {"ttft_ms": 700, "chunks": 1}}).encode()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, gw.url, "/v1/completions", hold, auth)
        wait_until(lambda: node.stats.in_flight == 1)
        queued = pool.submit(post, gw.url, "/v1/chat/completions", CHAT, auth)
        wait_until(lambda: gw.call(lambda: gw.gateway.scheduler.routes["m1"].waiting) == 1)
        status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, auth)
        assert status == 503
        ids["full"] = headers["x-request-id"]
        status, headers, _ = queued.result(5)
        assert status == 504
        ids["deadline"] = headers["x-request-id"]
        assert blocker.result(5)[0] == 200
    # 499: the client leaves mid-stream
    stream_body = b'{"model":"m1","prompt":"x","stream":true,"mock":{"chunks":50,"delay_ms":50}}'
    sock = _raw_request(gw.port, stream_body, b"Authorization: Bearer sk-u\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 200")
    sock.close()
    # 502 in-band: the node fails mid-stream
    status, headers, _ = post(
        gw.url, "/v1/completions", b'{"model":"m1","prompt":"x","stream":true,"mock":{"fail":"mid"}}', auth
    )
    assert status == 200
    ids["midstream"] = headers["x-request-id"]

    expected = {
        "ok": 200,
        "bad": 400,
        "unauth": 401,
        "unknown": 404,
        "limited": 429,
        "full": 503,
        "deadline": 504,
        "midstream": 502,
    }
    for name, request_id in ids.items():
        row = one_row(gw, request_id)
        assert row["status"] == expected[name], (name, row)
        assert row["id"] == request_id  # the row shows the id as the client got it
        assert row["finished_at"] >= row["received_at"]
    # ids are 16 hex digits in arrival order (the request log's integer key)
    order = ["ok", "bad", "unauth", "unknown", "limited"]
    assert [ids[n] for n in order] == sorted(ids[n] for n in order)
    assert all(len(ids[n]) == 16 and int(ids[n], 16) > 0 for n in order)
    ok = one_row(gw, ids["ok"])
    assert ok["model"] == "m1" and ok["node_id"] == "n" and ok["tenant"] == "t" and ok["key_id"] == "ku"
    assert ok["prompt_tokens"] >= 1 and ok["completion_tokens"] == 3
    assert ok["receipt"]["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert one_row(gw, ids["deadline"])["error_type"] == "queue_timeout"
    assert one_row(gw, ids["midstream"])["error_type"] == "upstream_error"
    # a malformed id is a 400 on the id; a well-formed unknown one a 404
    for bad in ("nope", ids["ok"] + "0", ids["ok"][:-1], "0x" + ids["ok"][2:]):
        status, _, body = call(gw.url, "GET", f"/admin/requests/{bad}")
        assert status == 400 and body["error"]["param"] == "id", (bad, body)
    status, _, body = call(gw.url, "GET", f"/admin/requests/{'f' * 15}0")
    assert status == 404 and "f" * 15 + "0" in body["error"]["message"], body
    gone = wait_until(lambda: rows(gw, "status=499")["data"])
    assert len(gone) == 1 and gone[0]["stream"] is True
    # Exactly one row per request: the total is what was sent
    # (ok 1 + bad/unauth/unknown 3 + burst 60 + limited 1 + blocker/full/deadline 3 + gone 1 + mid 1).
    wait_until(lambda: rows(gw, "limit=0")["total"] == 70)
    time.sleep(0.2)
    assert rows(gw, "limit=0")["total"] == 70


def test_stream_receipt_matches_what_the_client_received(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=7)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        request_id = raw.headers["x-request-id"]
        text = "".join((c.choices[0].delta.content or "") for c in raw.parse() if c.choices)
    row = one_row(gw, request_id)
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
    assert one_row(gw2, page2[-1]["id"])["received_at"] == page2[-1]["received_at"]  # found by its hex id
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
    row = one_row(gw, headers["x-request-id"])
    assert row["prompt_tokens"] == json.loads(body)["usage"]["prompt_tokens"] > 0
    assert row["output_sha256"] is None


def test_metrics_off_still_serves_and_logs(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=2)
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], metrics={"enabled": False})
    status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {})
    assert status == 200
    assert one_row(gw, headers["x-request-id"])["status"] == 200
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b""  # nothing counted, nothing exported
    conn.close()
