"""``PATCH /admin/models/{name}``: a model's policy, split and overflow changed at run time."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tests.routing.helpers import ADMIN, Client
from tests.support import call, node_entry, wait_until

CHAT = b'{"model":"chat","messages":[{"role":"user","content":"hi"}],"max_tokens":2}'


def variants(gw: Any, count: int) -> Counter[str]:
    client = Client(gw.url)
    try:
        seen: Counter[str] = Counter()
        for _ in range(count):
            status, headers, _ = client.post(CHAT, {"Authorization": "Bearer sk-user"})
            assert status == 200
            seen[headers["x-shardon-variant"]] += 1
        return seen
    finally:
        client.close()


def test_policy_split_and_overflow_change_at_run_time(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    v1 = make_mock(models=["chat-v1"], chunks=1, name="v1")
    v2 = make_mock(models=["chat-v2"], chunks=1, name="v2")
    remote = make_mock(models=["chat"], name="remote")
    gw = make_gateway(
        nodes=[node_entry(v1, "n1", ["chat-v1"]), node_entry(v2, "n2", ["chat-v2"])],
        auth={"admin_keys": [ADMIN]},
        tenants=[{"name": "t", "keys": [{"key": "sk-user"}]}],
        store={"path": str(tmp_path / "log.db"), "flush_interval_ms": 20},
    )
    client = Client(gw.url)
    try:
        assert client.post(CHAT, {"Authorization": "Bearer sk-user"})[0] == 404  # no model "chat" yet
    finally:
        client.close()

    status, _, body = call(gw.url, "PATCH", "/admin/models/chat", {"split": {"chat-v1": 1, "chat-v2": 1}}, ADMIN)
    assert status == 200, body
    assert body["split"] == {"chat-v1": 1, "chat-v2": 1} and body["policy"] == "least_conn"
    assert variants(gw, 10) == {"chat-v1": 5, "chat-v2": 5}
    status, _, body = call(
        gw.url, "PATCH", "/admin/models/chat", {"split": {"chat-v1": 1, "chat-v2": 3}, "policy": "round_robin"}, ADMIN
    )
    assert status == 200 and body["policy"] == "round_robin"
    assert variants(gw, 20) == {"chat-v1": 5, "chat-v2": 15}
    # The split's policy reaches its variants' nodes; a variant's own entry wins.
    status, _, body = call(gw.url, "PATCH", "/admin/models/chat-v1", {"policy": "prefix_affinity"}, ADMIN)
    assert status == 200 and body["policy"] == "prefix_affinity"
    policies = gw.call(lambda: {n: type(r.policy).__name__ for n, r in gw.gateway.scheduler.routes.items()})
    assert policies["chat-v1"] == "PrefixAffinity" and policies["chat-v2"] == "RoundRobin"

    overflow = {"url": remote.url, "api_key": "sk-remote-secret", "tenants": ["t"], "deadline_s": 5}
    status, _, body = call(gw.url, "PATCH", "/admin/models/chat", {"overflow": overflow}, ADMIN)
    assert status == 200
    assert body["overflow"]["node"] == "overflow:chat" and body["overflow"]["url"] == remote.url
    assert "sk-remote-secret" not in json.dumps(body)
    status, _, models = call(gw.url, "GET", "/admin/models", key=ADMIN)
    rows = {row["name"]: row for row in models["data"]}
    assert rows["chat"]["routing"]["overflow"]["tenants"] == ["t"]
    assert rows["chat-v2"]["routing"]["overflow"]["from"] == "chat"  # the split's, for its variants
    assert "sk-remote-secret" not in json.dumps(models)
    status, _, state = call(gw.url, "GET", "/admin/status", key=ADMIN)
    assert "overflow:chat" in {n["id"] for n in state["nodes"]}

    # A change that keeps the endpoint is made in place; a new endpoint replaces the node.
    index = lambda: gw.call(lambda: gw.gateway.registry.nodes["overflow:chat"].index)  # noqa: E731
    before = index()
    status, _, body = call(
        gw.url, "PATCH", "/admin/models/chat", {"overflow": {**overflow, "tenants": ["t", "u"]}}, ADMIN
    )
    assert status == 200 and body["overflow"]["tenants"] == ["t", "u"] and index() == before
    other = make_mock(models=["chat"], name="remote-2")
    status, _, body = call(gw.url, "PATCH", "/admin/models/chat", {"overflow": {**overflow, "url": other.url}}, ADMIN)
    assert status == 200 and body["overflow"]["url"] == other.url and index() != before

    status, _, body = call(gw.url, "PATCH", "/admin/models/chat", {"overflow": None}, ADMIN)
    assert status == 200 and body["overflow"] is None
    status, _, state = call(gw.url, "GET", "/admin/status", key=ADMIN)
    assert "overflow:chat" not in {n["id"] for n in state["nodes"]}
    assert "sk-remote-secret" not in json.dumps(state)

    # Each change is in the audit trail (an overflow's key never).
    def audited() -> Any:
        _status, _, entries = call(gw.url, "GET", "/admin/audit", key=ADMIN)
        changes = [e for e in entries["data"] if e["action"] == "model.routing"]
        return changes if len(changes) == 7 else None

    changes = wait_until(audited)
    assert {c["target"] for c in changes} == {"chat", "chat-v1"}
    assert "sk-remote-secret" not in json.dumps(changes)


def test_a_bad_change_is_refused_naming_its_field(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m"], name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m"])], auth={"admin_keys": [ADMIN]})
    for patch, param in [
        ({"policy": "fastest"}, "routing.m.policy"),
        ({"split": {"m2": 0}}, "routing.m.split.m2"),
        ({"sticky": "session"}, "routing.m.sticky"),
        ({"overflow": {"url": "ftp://x"}}, "routing.m.overflow.url"),
        ({"color": "red"}, "routing.m.color"),
    ]:
        status, _, body = call(gw.url, "PATCH", "/admin/models/m", patch, ADMIN)
        assert status == 400, (patch, body)
        assert body["error"]["param"] == param, body
    status, _, body = call(gw.url, "PATCH", "/admin/models/nope", {"policy": "round_robin"}, ADMIN)
    assert status == 404
    status, _, _ = call(gw.url, "PATCH", "/admin/models/m", {"policy": "round_robin"})  # no admin key
    assert status == 401
    status, _, _ = call(gw.url, "PATCH", "/admin/models/m", {"policy": "round_robin"}, "sk-not-admin")
    assert status == 401
    status, _, body = call(gw.url, "PATCH", "/admin/models/m", {"policy": "round_robin"}, ADMIN)
    assert status == 200 and body["policy"] == "round_robin"
    status, _, body = call(gw.url, "PATCH", "/admin/models/m", {"policy": None}, ADMIN)
    assert status == 200 and body["policy"] == "least_conn"
    assert gw.call(lambda: gw.gateway.scheduler.routes["m"].policy) is None
