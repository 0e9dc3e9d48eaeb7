"""API keys, tenants, priority caps and rate limits, through the gateway with real sockets."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import node_entry, wait_until
from tests.gateway.test_forwarding import post

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
ADMIN = "sk-admin-test"


def call(url: str, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body).encode() if body is not None else None
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(raw) if raw else None
    finally:
        conn.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(make_mock: Any, make_gateway: Any) -> Any:
    node = make_mock(models=["m1", "m2"], chunks=4, name="n")
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1", "m2"], max_concurrent=8)],
        auth={"admin_keys": [ADMIN]},
        tenants=[
            {
                "name": "team-a",
                "weight": 2,
                "keys": [
                    {"key": "sk-a", "id": "a-main", "max_priority": "high", "models": ["m1"]},
                    {"key_sha256": __import__("hashlib").sha256(b"sk-hashed").hexdigest(), "id": "a-hashed"},
                ],
            },
            {"name": "team-b", "keys": [{"key": "sk-b-slow", "id": "b-slow", "rpm": 120}]},
        ],
    )
    return node, gw


def test_missing_and_bad_keys_are_401(keyed: Any) -> None:
    _, gw = keyed
    for headers in ({}, bearer("sk-wrong"), {"Authorization": "Basic abc"}):
        status, _, body = post(gw.url, "/v1/chat/completions", CHAT, headers)
        assert status == 401
        err = json.loads(body)["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
    assert call(gw.url, "GET", "/v1/models")[0] == 401


def test_valid_keys_work_including_hashed_ones(keyed: Any) -> None:
    node, gw = keyed
    assert post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-a"))[0] == 200
    assert post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-hashed"))[0] == 200
    # The client's key never reaches the node.
    assert "authorization" not in node.stats.last_headers


def test_model_outside_allow_list_is_403(keyed: Any) -> None:
    _, gw = keyed
    status, _, body = post(gw.url, "/v1/chat/completions", CHAT.replace(b"m1", b"m2"), bearer("sk-a"))
    assert status == 403
    assert json.loads(body)["error"]["param"] == "model"
    # /v1/models shows only what the key may use.
    status, _, models = call(gw.url, "GET", "/v1/models", key="sk-a")
    assert [m["id"] for m in models["data"]] == ["m1"]


def test_priority_is_capped_by_the_key(keyed: Any) -> None:
    _, gw = keyed
    status, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {**bearer("sk-a"), "X-Priority": "critical"})
    assert status == 200
    request_id = headers["x-request-id"]
    row = wait_until(lambda: (r := call(gw.url, "GET", f"/admin/requests/{request_id}", key=ADMIN))[0] == 200 and r[2])
    assert row["priority"] == "high"
    assert row["tenant"] == "team-a" and row["key_id"] == "a-main"


def test_rate_limit_waits_when_it_can_then_429_with_retry_after(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"])],
        scheduler={"queue_timeout_s": 2},
        tenants=[{"name": "t", "keys": [{"key": "sk-t", "rpm": 60}]}],
    )
    # 60 per minute: a burst of 60, then one a second.
    burst_started = time.monotonic()
    for _ in range(60):
        assert post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-t"))[0] == 200
    started = time.monotonic()
    refilled = started - burst_started  # tokens (at 1/s) that came back during the burst
    assert post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-t"))[0] == 200
    # It waited for its token rather than failing: the rest of a second, less what the burst refilled.
    assert time.monotonic() - started > 0.9 * (1.0 - refilled), refilled
    # Reserve the next few seconds; past the 2 s deadline the answer is 429 at once.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-t")), range(8)))
    limited = [r for r in results if r[0] == 429]
    assert limited, [r[0] for r in results]
    _status, headers, body = limited[0]
    assert int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"


def test_tokens_per_minute_uses_the_real_usage_of_streams(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=4)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"])],
        scheduler={"queue_timeout_s": 1},
        tenants=[{"name": "t", "keys": [{"key": "sk-t", "tpm": 2000}]}],
    )
    body = json.dumps({"model": "m1", "prompt": "x", "stream": True, "max_tokens": 1000}).encode()
    # Each request is estimated at ~1000 tokens but really uses ~5: were the estimate kept, the
    # third request would be refused; with the real usage from the stream, all pass.
    for _ in range(10):
        status, _, raw = post(gw.url, "/v1/completions", body, bearer("sk-t"))
        assert status == 200
        # Shardon asked the node for usage; the client, who did not, gets no usage event.
        assert b'"usage"' not in raw
        assert raw.rstrip().endswith(b"data: [DONE]")
    sent = json.loads(node.stats.last_body)
    assert sent["stream_options"] == {"include_usage": True}
    # Real usage larger than the estimate is charged: a huge prompt with max_tokens 1 drains it.
    big = json.dumps({"model": "m1", "prompt": "y" * 6000, "stream": True, "max_tokens": 1}).encode()
    assert post(gw.url, "/v1/completions", big, bearer("sk-t"))[0] == 200
    assert post(gw.url, "/v1/completions", big, bearer("sk-t"))[0] == 429


def test_runtime_keys_revocation_and_persistence(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"])
    db = tmp_path / "keys.db"
    config = {"nodes": [node_entry(node, "n", ["m1"])], "auth": {"admin_keys": [ADMIN]}, "store": {"path": str(db)}}
    gw = make_gateway(dict(config))
    status, _, created = call(
        gw.url, "POST", "/admin/keys", {"tenant": "team-c", "rpm": 100, "max_priority": "low", "models": ["m1"]}, ADMIN
    )
    assert status == 201
    secret, key_id = created["key"], created["id"]
    assert created["tenant"] == "team-c" and created["rpm"] == 100
    assert post(gw.url, "/v1/chat/completions", CHAT, bearer(secret))[0] == 200
    listed = call(gw.url, "GET", "/admin/keys", key=ADMIN)[2]["data"]
    assert [k["id"] for k in listed] == [key_id]
    assert "key" not in listed[0] and "key_sha256" not in listed[0]
    gw.stop()
    # Restart on the same database: the key still works, and its secret is nowhere on disk.
    gw2 = make_gateway(dict(config))
    assert post(gw2.url, "/v1/chat/completions", CHAT, bearer(secret))[0] == 200
    for path in tmp_path.glob("keys.db*"):
        assert secret.encode() not in path.read_bytes()
    # Revoked: refused on the very next request.
    assert call(gw2.url, "DELETE", f"/admin/keys/{key_id}", key=ADMIN)[0] == 200
    assert post(gw2.url, "/v1/chat/completions", CHAT, bearer(secret))[0] == 401
    assert call(gw2.url, "DELETE", f"/admin/keys/{key_id}", key=ADMIN)[0] == 404
    audit = call(gw2.url, "GET", "/admin/audit", key=ADMIN)[2]
    assert {e["action"] for e in audit["data"]} >= {"key.revoke"}


def test_admin_refuses_v1_keys_and_bad_input(keyed: Any) -> None:
    _, gw = keyed
    assert call(gw.url, "GET", "/admin/keys", key="sk-a")[0] == 401
    assert call(gw.url, "GET", "/admin/keys")[0] == 401
    status, _, body = call(gw.url, "POST", "/admin/keys", {"tenant": "x", "rpm": -1}, ADMIN)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert call(gw.url, "GET", "/admin/requests?limit=abc", key=ADMIN)[0] == 400
    assert call(gw.url, "GET", "/admin/nothing", key=ADMIN)[0] == 404


def test_without_keys_v1_is_open_and_admin_is_loopback_only(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    assert post(gw.url, "/v1/chat/completions", CHAT)[0] == 200
    assert call(gw.url, "GET", "/admin/status")[0] == 200  # we are on loopback


def test_tenant_header_only_when_trusted(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    for trusted, expected in ((False, "default"), (True, "team-x")):
        gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], auth={"trust_tenant_header": trusted})
        _, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {"X-Tenant-ID": "team-x"})
        path = f"/admin/requests/{headers['x-request-id']}"
        row = wait_until(lambda url=gw.url, path=path: (r := call(url, "GET", path))[0] == 200 and r[2])
        assert row["tenant"] == expected
