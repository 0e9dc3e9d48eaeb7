"""API keys, tenants, priority caps and rate limits, through the gateway with real sockets."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import call, node_entry, one_row, post, queued, release_in_order, send, wait_until

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'
ADMIN = "sk-admin-test"


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
                    {"key_sha256": hashlib.sha256(b"sk-hashed").hexdigest(), "id": "a-hashed"},
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


def test_the_caller_is_checked_before_the_body_size(make_mock: Any, make_gateway: Any) -> None:
    """A body over the limit from an unknown caller is a 401, from a known one a 413 logged under
    its tenant, on every path (regression: the callback path answered 413 before the key)."""
    node = make_mock(models=["m1"])
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"])],
        server={"max_body_bytes": 1000},
        tenants=[{"name": "team-a", "keys": [{"key": "sk-a", "id": "a-main"}]}],
    )
    big = json.dumps({"model": "m1", "prompt": "x" * 2000}).encode()
    assert post(gw.url, "/v1/completions", big, bearer("sk-wrong"))[0] == 401
    status, headers, _ = post(gw.url, "/v1/completions", big, bearer("sk-a"))
    assert status == 413
    row = one_row(gw.url, headers["x-request-id"])
    assert (row["tenant"], row["key_id"], row["error_type"]) == ("team-a", "a-main", "request_too_large")


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
    row = one_row(gw.url, headers["x-request-id"], key=ADMIN)
    assert row["priority"] == "high"
    assert row["tenant"] == "team-a" and row["key_id"] == "a-main"


def test_a_capped_priority_is_dispatched_as_the_cap(make_mock: Any, make_gateway: Any) -> None:
    """A key capped at low asking for critical waits behind a normal request, and behind nothing
    but higher classes: the cap decides the dispatch order, not only the logged field."""
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=1)],
        tenants=[
            {"name": "t", "keys": [{"key": "sk-low", "max_priority": "low"}, {"key": "sk-any"}]},
        ],
    )
    node.gate.close()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        sent = []

        def send(prompt: str, key: str, priority: str) -> None:
            body = json.dumps({"model": "m1", "prompt": prompt}).encode()
            sent.append(pool.submit(post, gw.url, "/v1/completions", body, {**bearer(key), "X-Priority": priority}))

        send("blocker", "sk-any", "normal")
        wait_until(lambda: node.gate.waiting == 1)
        for n, (prompt, key, priority) in enumerate(
            [("capped", "sk-low", "critical"), ("low", "sk-any", "low"), ("normal", "sk-any", "normal")], 1
        ):
            send(prompt, key, priority)
            wait_until(lambda n=n: queued(gw) == n)
        order = [json.loads(b)["prompt"] for b in release_in_order(node, 4)]
        assert [f.result(10)[0] for f in sent] == [200] * 4
    # The capped request is a low one: after normal, in arrival order among the lows.
    assert order == ["blocker", "normal", "capped", "low"]


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


def test_a_tenants_requests_per_minute_are_shared_by_its_keys(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=8)],
        scheduler={"queue_timeout_s": 0.5},
        tenants=[
            {"name": "t", "rpm": 20, "keys": [{"key": "sk-1"}, {"key": "sk-2"}]},
            {"name": "other", "keys": [{"key": "sk-o"}]},
        ],
    )
    # A burst of 20 for the tenant, whichever of its keys sends it; then one per 3 s, past the deadline.
    for i in range(20):
        assert post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-1" if i % 2 else "sk-2"))[0] == 200
    for key in ("sk-1", "sk-2"):
        status, headers, body = post(gw.url, "/v1/chat/completions", CHAT, bearer(key))
        assert status == 429, body
        assert int(headers["retry-after"]) >= 1
        assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    # Another tenant is not limited by it.
    assert post(gw.url, "/v1/chat/completions", CHAT, bearer("sk-o"))[0] == 200


def test_a_tenants_tokens_per_minute_are_shared_by_its_keys(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=1)
    gw = make_gateway(
        nodes=[node_entry(node, "n", ["m1"], max_concurrent=8)],
        scheduler={"queue_timeout_s": 0.5},
        tenants=[
            {"name": "t", "tpm": 2000, "keys": [{"key": "sk-1", "tpm": 100000}, {"key": "sk-2"}]},
            {"name": "other", "keys": [{"key": "sk-o"}]},
        ],
    )
    # ~1500 prompt tokens: the first fits the tenant's 2000, the second (by the other key) does not,
    # nor does a third by the key whose own limit is far higher.
    big = json.dumps({"model": "m1", "prompt": "y" * 6000, "max_tokens": 1}).encode()
    assert post(gw.url, "/v1/completions", big, bearer("sk-1"))[0] == 200
    for key in ("sk-2", "sk-1"):
        status, _, body = post(gw.url, "/v1/completions", big, bearer(key))
        assert status == 429, body
        assert "tokens per minute" in json.loads(body)["error"]["message"]
    assert post(gw.url, "/v1/completions", big, bearer("sk-o"))[0] == 200


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
    # The tests' clients are all on loopback: a trusted proxy (on loopback) forwards a remote one.
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], server={"trusted_proxies": ["127.0.0.1"]})
    assert post(gw.url, "/v1/chat/completions", CHAT)[0] == 200
    assert call(gw.url, "GET", "/admin/status")[0] == 200  # a loopback client
    remote = {"X-Forwarded-For": "203.0.113.7"}
    assert post(gw.url, "/v1/chat/completions", CHAT, remote)[0] == 200  # /v1 is open to anyone
    for method, path in (("GET", "/admin/status"), ("GET", "/admin/requests"), ("POST", "/admin/keys")):
        status, _, body = send(gw.url, method, path, {"tenant": "x"} if method == "POST" else None, remote)
        assert status == 403, (path, body)
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
    # A forwarded loopback client is loopback.
    assert send(gw.url, "GET", "/admin/status", None, {"X-Forwarded-For": "127.0.0.1"})[0] == 200


def test_tenant_header_only_when_trusted(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    for trusted, expected in ((False, "default"), (True, "team-x")):
        gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], auth={"trust_tenant_header": trusted})
        _, headers, _ = post(gw.url, "/v1/chat/completions", CHAT, {"X-Tenant-ID": "team-x"})
        assert one_row(gw.url, headers["x-request-id"])["tenant"] == expected
