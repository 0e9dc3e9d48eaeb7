"""Overflow by deadline through the gateway, on both engines: a remote endpoint (a mock node with its
own key and model name) takes what the local node cannot serve in time, for the callers allowed."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.routing.helpers import metrics
from tests.support import call, node_entry, post, wait_until


def chat(text: str, **extra: Any) -> bytes:
    return json.dumps({"model": "chat", "messages": [{"role": "user", "content": text}], **extra}).encode()


def burst(url: str, key: str, count: int) -> list[tuple[int, str]]:
    """``count`` requests at once: each one's status and the node that served it."""

    def one(i: int) -> tuple[int, str]:
        status, headers, _ = post(url, "/v1/chat/completions", chat(f"burst {i}"), {"Authorization": f"Bearer {key}"})
        return status, headers.get("x-shardon-node", "")

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(one, range(count)))


def test_overflow_takes_only_what_the_local_node_cannot_serve_in_time(
    make_mock: Any, make_gateway: Any, tmp_path: Path
) -> None:
    local = make_mock(models=["chat"], chunks=1, ttft_ms=100, name="local")
    remote = make_mock(models=["remote-chat"], chunks=3, require_api_key="remote-key", name="remote")
    access_log = tmp_path / "access.log"
    gw = make_gateway(
        nodes=[node_entry(local, "local", ["chat"], max_concurrent=1)],
        routing={
            "chat": {
                "overflow": {
                    "url": remote.url,
                    "api_key": "remote-key",
                    "model": "remote-chat",
                    "tenants": ["team-a"],
                    "deadline_s": 0.25,
                }
            }
        },
        tenants=[
            {"name": "team-a", "keys": [{"key": "ka"}, {"key": "ka-local", "overflow": False}]},
            {"name": "team-b", "keys": [{"key": "kb"}]},
        ],
        store={"path": str(tmp_path / "log.db"), "flush_interval_ms": 20},
        log={"access_log_path": str(access_log)},
    )
    remote_calls = lambda: remote.stats.per_path.get("/v1/chat/completions", 0)  # noqa: E731

    # The local node keeps up with one request at a time: the overflow endpoint gets nothing.
    for i in range(8):
        status, headers, _ = post(gw.url, "/v1/chat/completions", chat(f"q{i}"), {"Authorization": "Bearer ka"})
        assert status == 200 and headers["x-shardon-node"] == "local"
    assert remote_calls() == 0

    def with_the_local_node_busy(key: str, count: int) -> list[tuple[int, str]]:
        blocker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        held = blocker.submit(
            post, gw.url, "/v1/chat/completions", chat("hold", mock={"ttft_ms": 600}), {"Authorization": "Bearer kb"}
        )
        try:
            wait_until(lambda: local.stats.in_flight == 1)
            return burst(gw.url, key, count)
        finally:
            assert held.result(10)[0] == 200
            blocker.shutdown()

    # A burst the local node cannot serve in time: the excess goes to the endpoint.
    results = with_the_local_node_busy("ka", 6)
    assert [status for status, _ in results] == [200] * 6
    overflowed = sum(1 for _, node in results if node == "overflow:chat")
    assert overflowed >= 4 and remote_calls() == overflowed
    # (The endpoint answers 404 to a model name it does not know, 401 without its key: the requests
    # reached it as "remote-chat", with "Bearer remote-key".)

    # Never for a tenant outside overflow.tenants, nor for a key with overflow: false: they queue.
    for key in ("kb", "ka-local"):
        results = with_the_local_node_busy(key, 3)
        assert results == [(200, "local")] * 3
    assert remote_calls() == overflowed

    # Recorded: the request log, its statistics per tenant, /metrics, the access log.
    def logged() -> Any:
        _status, _, body = call(gw.url, "GET", "/admin/requests?limit=100")
        rows = [r for r in body["data"] if r["overflow"]]
        return rows if len(rows) == overflowed else None

    rows = wait_until(logged)
    assert {(r["node_id"], r["tenant"], r["model"]) for r in rows} == {("overflow:chat", "team-a", "chat")}
    assert all(r["completion_tokens"] == 3 for r in rows)
    status, _, usage = call(gw.url, "GET", "/admin/stats/tenants")
    team_a = next(t for t in usage["data"] if t["tenant"] == "team-a")
    assert team_a["overflow"]["requests"] == overflowed and team_a["overflow"]["completion_tokens"] == 3 * overflowed

    def counted() -> Any:
        families = {f.name: f for f in text_string_to_metric_families(metrics(gw.url))}
        count = {
            s.labels["tenant"]: s.value for s in families["shardon_overflow_requests"].samples if "_total" in s.name
        }
        tokens = {s.labels["kind"]: s.value for s in families["shardon_overflow_tokens"].samples if "_total" in s.name}
        return count == {"team-a": overflowed} and tokens.get("completion") == 3 * overflowed

    wait_until(counted)
    wait_until(lambda: access_log.read_text().count(" overflow=1\n") == overflowed)
    assert all("node=overflow:chat" in line for line in access_log.read_text().splitlines() if "overflow=1" in line)


def test_every_local_node_down_sends_the_allowed_callers_to_the_endpoint(make_mock: Any, make_gateway: Any) -> None:
    local = make_mock(models=["chat"], name="local")
    remote = make_mock(models=["chat"], name="remote")
    gw = make_gateway(
        nodes=[node_entry(local, "local", ["chat"])],
        routing={"chat": {"overflow": {"url": remote.url, "tenants": ["team-a"]}}},
        tenants=[{"name": "team-a", "keys": [{"key": "ka"}]}, {"name": "team-b", "keys": [{"key": "kb"}]}],
    )
    status, headers, _ = post(gw.url, "/v1/chat/completions", chat("up"), {"Authorization": "Bearer ka"})
    assert status == 200 and headers["x-shardon-node"] == "local"
    local.stop()
    wait_until(lambda: not gw.call(lambda: gw.gateway.registry.nodes["local"].healthy))
    status, headers, _ = post(gw.url, "/v1/chat/completions", chat("down"), {"Authorization": "Bearer ka"})
    assert status == 200 and headers["x-shardon-node"] == "overflow:chat"
    status, _, body = post(gw.url, "/v1/chat/completions", chat("down"), {"Authorization": "Bearer kb"})
    assert status == 503, body  # not allowed to overflow: no capacity


def test_a_request_the_endpoint_fails_is_retried_locally(make_mock: Any, make_gateway: Any) -> None:
    local = make_mock(models=["chat"], chunks=1, name="local")
    remote = make_mock(models=["chat"], max_concurrent=0, name="remote")  # answers every request 503
    gw = make_gateway(
        nodes=[node_entry(local, "local", ["chat"], max_concurrent=1)],
        routing={"chat": {"overflow": {"url": remote.url, "deadline_s": 0.01}}},
    )
    blocker = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    held = blocker.submit(post, gw.url, "/v1/chat/completions", chat("hold", mock={"ttft_ms": 300}))
    try:
        wait_until(lambda: local.stats.in_flight == 1)
        status, headers, _ = post(gw.url, "/v1/chat/completions", chat("after"))
    finally:
        assert held.result(10)[0] == 200
        blocker.shutdown()
    assert status == 200 and headers["x-shardon-node"] == "local"
    assert remote.stats.rejected == 1  # it went there first

    def row() -> Any:
        _status, _, body = call(gw.url, "GET", f"/admin/requests/{headers['x-request-id']}")
        return body if _status == 200 else None

    logged = wait_until(row)
    assert logged["overflow"] is False and logged["retries"] == 1 and logged["node_id"] == "local"


def test_the_endpoint_may_be_https_with_its_own_key_ca_and_model_name(
    make_mock: Any, make_tls_mock: Any, make_gateway: Any, certificates: dict[str, Path]
) -> None:
    local = make_mock(models=["chat"], name="local")
    hosted = make_tls_mock(models=["hosted-chat"], chunks=2, require_api_key="sk-hosted", name="hosted")
    overflow = {"url": hosted.url, "api_key": "sk-hosted", "model": "hosted-chat", "ca_file": str(certificates["ca"])}
    gw = make_gateway(
        nodes=[node_entry(local, "local", ["chat"])],
        routing={"chat": {"overflow": overflow}},
        auth={"admin_keys": ["sk-admin"]},
    )
    local.stop()
    wait_until(lambda: not gw.call(lambda: gw.gateway.registry.nodes["local"].healthy))
    status, headers, body = post(gw.url, "/v1/chat/completions", chat("over TLS"))
    assert status == 200, body
    assert headers["x-shardon-node"] == "overflow:chat"
    assert json.loads(body)["choices"][0]["message"]["content"] == "tok0 tok1 "
    assert hosted.stats.per_path["/v1/chat/completions"] == 1
    # The endpoint is a node of the registry, shown (never its key) but no route's candidate.
    status, _, nodes = call(gw.url, "GET", "/admin/nodes", key="sk-admin")
    shown = next(n for n in nodes["data"] if n["id"] == "overflow:chat")
    assert shown["source"] == "routing" and shown["tls"] is True and shown["models"] == []
    assert "sk-hosted" not in json.dumps(nodes)
    status, _, _ = call(gw.url, "DELETE", "/admin/nodes/overflow:chat", key="sk-admin")
    assert status == 409  # routing's own: changed through PATCH /admin/models/chat
    status, _, _ = call(gw.url, "PATCH", "/admin/nodes/overflow:chat", {"models": ["chat"]}, key="sk-admin")
    assert status == 409  # nor does it become a node of the model


def test_a_rate_limit_wait_is_limited_not_overflow(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    """The request log keeps the two apart: ``limited`` waited for a rate limit's tokens, ``overflow``
    was served by the overflow endpoint (before schema version 4, ``overflow`` meant the first)."""
    local = make_mock(models=["chat"], chunks=1, name="local")
    remote = make_mock(models=["chat"], name="remote")
    gw = make_gateway(
        nodes=[node_entry(local, "local", ["chat"])],
        routing={"chat": {"overflow": {"url": remote.url}}},
        tenants=[{"name": "t", "keys": [{"key": "sk-t", "rpm": 60}]}],
        store={"path": str(tmp_path / "log.db"), "flush_interval_ms": 20},
    )
    for _ in range(60):  # the bucket's burst
        assert post(gw.url, "/v1/chat/completions", chat("burst"), {"Authorization": "Bearer sk-t"})[0] == 200
    status, headers, _ = post(gw.url, "/v1/chat/completions", chat("waits"), {"Authorization": "Bearer sk-t"})
    assert status == 200 and headers["x-shardon-node"] == "local"

    def row() -> Any:
        _status, _, body = call(gw.url, "GET", f"/admin/requests/{headers['x-request-id']}")
        return body if _status == 200 else None

    logged = wait_until(row)
    assert logged["limited"] is True and logged["overflow"] is False
    assert remote.stats.per_path.get("/v1/chat/completions", 0) == 0
