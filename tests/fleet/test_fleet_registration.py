"""Nodes registered, changed, drained and removed at run time through /admin/nodes (both engines)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fleet.fleet_helpers import ADMIN, NODE_SECRET, Stream, call, chat, node_state
from tests.support import node_entry, wait_until

V1_KEY = "sk-team-fleet"


def gateway_config(tmp_path: Path, *nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "nodes": list(nodes),
        "auth": {"admin_keys": [ADMIN]},
        "store": {"path": str(tmp_path / "fleet.db")},
        "log": {"access_log_path": str(tmp_path / "access.log")},
        **extra,
    }


def registration(node: Any, node_id: str, models: Any, **extra: Any) -> dict[str, Any]:
    return {"id": node_id, "url": node.url, "models": models, "max_concurrent": 2, "weight": 1, **extra}


def test_a_registered_node_is_routable_at_once_and_comes_back_after_a_restart(
    make_mock: Any, make_gateway: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    old = make_mock(models=["m1"], name="old")
    fresh = make_mock(models=["m2"], name="fresh", require_api_key=NODE_SECRET)
    config = gateway_config(tmp_path, node_entry(old, "old", ["m1"]))
    gw = make_gateway(config)
    assert chat(gw.url, "m2")[0] == 404

    status, _, node = call(gw.url, "POST", "/admin/nodes", registration(fresh, "fresh", ["m2"], api_key=NODE_SECRET))
    assert status == 201, node
    assert node["id"] == "fresh" and node["source"] == "admin" and node["url"] == fresh.url
    assert node["models"] == ["m2"] and node["max_concurrent"] == 2 and node["weight"] == 1
    assert node["circuit"] == "closed" and node["healthy"] is True and node["draining"] is False
    assert node["in_flight"] == 0 and "api_key" not in node

    status, headers, answer = chat(gw.url, "m2")  # at once: no restart, no wait for a probe
    assert status == 200, answer
    assert headers["x-shardon-node"] == "fresh"
    assert fresh.stats.last_headers["authorization"] == f"Bearer {NODE_SECRET}"
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"m1", "m2"}
    assert client.models.retrieve("m2").id == "m2"
    client.close()

    status, _, listing = call(gw.url, "GET", "/admin/nodes")
    assert status == 200
    nodes = {n["id"]: n for n in listing["data"]}
    assert set(nodes) == {"old", "fresh"} and nodes["old"]["source"] == "config"
    for shown in nodes.values():
        assert {
            "id",
            "url",
            "models",
            "max_concurrent",
            "weight",
            "in_flight",
            "healthy",
            "circuit",
            "draining",
        } <= set(shown)
        assert shown["source"] in ("config", "admin")

    # A duplicate is a 409, an unknown id a 404, a bad node a 400 naming the field.
    assert call(gw.url, "POST", "/admin/nodes", registration(fresh, "fresh", ["m3"]))[0] == 409
    assert call(gw.url, "POST", "/admin/nodes", registration(fresh, "old", ["m3"]))[0] == 409
    status, _, err = call(gw.url, "GET", "/admin/nodes/nope")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, _, err = call(gw.url, "POST", "/admin/nodes", {"id": "x", "url": "ftp://h", "models": ["m"]})
    assert status == 400 and err["error"]["param"] == "url"
    status, _, err = call(gw.url, "POST", "/admin/nodes", {"id": "x", "url": fresh.url})
    assert status == 400 and err["error"]["param"] == "models"
    status, _, err = call(gw.url, "POST", "/admin/nodes", {"id": "x", "url": fresh.url, "models": ["m"], "colour": 1})
    assert status == 400 and "colour" in err["error"]["message"]

    status, _, audit = call(gw.url, "GET", "/admin/audit")
    assert status == 200
    registered = [e for e in audit["data"] if e["action"] == "node.register"]
    assert [e["target"] for e in registered] == ["fresh"]
    requests = call(gw.url, "GET", "/admin/requests")[2]
    gw.stop()

    # Restarted on the same store: the registered node is back, with its key, and routable.
    gw = make_gateway(config)
    status, _, back = call(gw.url, "GET", "/admin/nodes/fresh")
    assert status == 200 and back["source"] == "admin" and back["models"] == ["m2"]
    status, headers, _ = chat(gw.url, "m2")
    assert status == 200 and headers["x-shardon-node"] == "fresh"
    gw.stop()

    # The node's key was never shown, audited, logged nor put in the request log.
    access = (tmp_path / "access.log").read_text()
    assert "fresh" in access
    for seen in (json.dumps(listing), json.dumps(audit), json.dumps(requests), access, caplog.text):
        assert NODE_SECRET not in seen


def test_the_admin_api_for_nodes_needs_the_admin_key(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], name="n")
    tenants = [{"name": "team", "keys": [{"key": V1_KEY}]}]
    gw = make_gateway(gateway_config(tmp_path, node_entry(node, "n", ["m1"]), tenants=tenants))
    spec = registration(node, "sneaky", ["m9"])
    for key in (None, V1_KEY, "sk-wrong"):
        for method, path, body in (
            ("POST", "/admin/nodes", spec),
            ("GET", "/admin/nodes", None),
            ("PATCH", "/admin/nodes/n", {"drain": True}),
            ("DELETE", "/admin/nodes/n", None),
        ):
            status, _, err = call(gw.url, method, path, body, key=key)
            assert status in (401, 403), (key, method, status)
            assert err["error"]["type"] == "invalid_request_error"
    assert node_state(gw, "n")["draining"] is False
    assert call(gw.url, "GET", "/admin/nodes/sneaky")[0] == 404
    assert chat(gw.url, "m9", key=V1_KEY)[0] == 404
    assert chat(gw.url, "m1", key=V1_KEY)[0] == 200


def test_patch_changes_a_node_and_config_nodes_are_drained_not_deleted(
    make_mock: Any, make_gateway: Any, tmp_path: Path
) -> None:
    node = make_mock(models=["m1", "m2"], name="n")
    other = make_mock(models=["m1"], name="other")
    gw = make_gateway(gateway_config(tmp_path, node_entry(node, "n", ["m1"]), node_entry(other, "other", ["m1"])))
    status, _, changed = call(
        gw.url, "PATCH", "/admin/nodes/n", {"weight": 3, "max_concurrent": 7, "models": ["m1", "m2"]}
    )
    assert status == 200, changed
    assert (changed["weight"], changed["max_concurrent"], changed["models"]) == (3, 7, ["m1", "m2"])
    assert chat(gw.url, "m2")[0] == 200  # the new model is routable at once
    assert gw.call(lambda: gw.gateway.scheduler.balancer.capacity(gw.gateway.registry.nodes["n"].index)) == 7
    status, _, err = call(gw.url, "PATCH", "/admin/nodes/n", {"weight": 0})
    assert status == 400 and err["error"]["param"] == "weight"
    assert call(gw.url, "PATCH", "/admin/nodes/n", {"models": []})[0] == 400
    assert call(gw.url, "PATCH", "/admin/nodes/nope", {"drain": True})[0] == 404

    status, _, err = call(gw.url, "DELETE", "/admin/nodes/n")
    assert status == 409 and "drained" in err["error"]["message"]
    status, _, drained = call(gw.url, "PATCH", "/admin/nodes/n", {"drain": True})
    assert status == 200 and drained["draining"] is True
    for _ in range(4):
        status, headers, _ = chat(gw.url, "m1")
        assert status == 200 and headers["x-shardon-node"] == "other"
    status, _, err = chat(gw.url, "m2")  # served by the draining node alone
    assert status == 503 and err["error"]["code"] == "no_capacity"
    assert call(gw.url, "PATCH", "/admin/nodes/n", {"drain": False})[2]["draining"] is False
    assert chat(gw.url, "m2")[0] == 200
    actions = [e["action"] for e in call(gw.url, "GET", "/admin/audit")[2]["data"] if e["target"] == "n"]
    assert actions.count("node.update") == 3


def test_drain_lets_a_running_stream_finish(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    a = make_mock(models=["m1"], name="a", chunks=12, delay_ms=40)
    b = make_mock(models=["m1"], name="b", chunks=12, delay_ms=40)
    gw = make_gateway(gateway_config(tmp_path, node_entry(a, "a", ["m1"]), node_entry(b, "b", ["m1"])))
    stream = Stream(gw.url)
    assert stream.first().startswith(b"data: ")
    busy = stream.node
    idle = "b" if busy == "a" else "a"
    status, _, drained = call(gw.url, "PATCH", f"/admin/nodes/{busy}", {"drain": True})
    assert status == 200 and drained["draining"] is True and drained["in_flight"] == 1
    for _ in range(3):
        assert chat(gw.url, max_tokens=1)[1]["x-shardon-node"] == idle
    data = stream.rest()
    assert data.endswith(b"data: [DONE]\n\n")
    assert data.count(b'"content":"tok') == 12  # not a token lost
    assert node_state(gw, busy)["in_flight"] == 0


def test_delete_drains_then_removes_the_node(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    keep = make_mock(models=["m1"], name="keep")
    leaving = make_mock(models=["m9"], name="leaving", chunks=12, delay_ms=40)
    config = gateway_config(tmp_path, node_entry(keep, "keep", ["m1"]))
    gw = make_gateway(config)
    assert call(gw.url, "POST", "/admin/nodes", registration(leaving, "leaving", ["m9"]))[0] == 201
    stream = Stream(gw.url, "m9")
    assert stream.node == "leaving" and stream.first().startswith(b"data: ")

    status, _, gone = call(gw.url, "DELETE", "/admin/nodes/leaving")
    assert status == 202 and gone["removed"] is False and gone["draining"] is True and gone["removing"] is True
    status, _, err = chat(gw.url, "m9")  # no new request goes to it
    assert status == 503 and err["error"]["code"] == "no_capacity"
    assert call(gw.url, "PATCH", "/admin/nodes/leaving", {"drain": False})[0] == 409
    data = stream.rest()
    assert data.endswith(b"data: [DONE]\n\n") and data.count(b'"content":"tok') == 12
    wait_until(lambda: call(gw.url, "GET", "/admin/nodes/leaving")[0] == 404)
    assert chat(gw.url, "m9")[0] == 404  # its model went with it
    assert "m9" not in {m["id"] for m in call(gw.url, "GET", "/v1/models", key=None)[2]["data"]}
    # An idle node goes at once.
    assert call(gw.url, "POST", "/admin/nodes", registration(leaving, "again", ["m9"]))[0] == 201
    status, _, gone = call(gw.url, "DELETE", "/admin/nodes/again")
    assert status == 200 and gone["removed"] is True
    assert call(gw.url, "GET", "/admin/nodes/again")[0] == 404
    gw.stop()
    gw = make_gateway(config)
    assert {n["id"] for n in call(gw.url, "GET", "/admin/nodes")[2]["data"]} == {"keep"}
