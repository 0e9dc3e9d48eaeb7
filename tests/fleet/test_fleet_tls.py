"""HTTPS upstreams: verified against the node's CA (or the system's), SNI, keep-alive, its api_key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai

from tests.fleet.fleet_helpers import ADMIN, NODE_SECRET, call, chat, node_state
from tests.support import node_entry, wait_until


def test_an_https_node_with_its_ca_serves(make_tls_mock: Any, make_gateway: Any, certificates: dict[str, Path]) -> None:
    node = make_tls_mock(models=["m1"], chunks=4, name="secure", require_api_key=NODE_SECRET)
    assert node.url.startswith("https://localhost:")
    gw = make_gateway(
        nodes=[node_entry(node, "secure", ["m1"], ca_file=str(certificates["ca"]), api_key=NODE_SECRET)],
        auth={"admin_keys": [ADMIN]},
    )
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=10)
    for _ in range(3):
        reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}], stream=True)
        if c.choices
    )
    assert text == "tok0 tok1 tok2 tok3 "
    client.close()
    assert node.stats.last_headers["authorization"] == f"Bearer {NODE_SECRET}"
    assert node.stats.last_headers["host"] == node.url.removeprefix("https://")
    # The keep-alive pool works over TLS: the requests shared connections (probes included).
    assert node.stats.connections_open <= 2
    state = node_state(gw, "secure")
    assert state["tls"] is True and state["circuit"] == "closed" and state["idle_connections"] >= 1


def test_an_https_node_is_refused_without_its_ca(
    make_tls_mock: Any, make_gateway: Any, certificates: dict[str, Path]
) -> None:
    node = make_tls_mock(models=["m1"], name="unknown-ca")
    other = make_tls_mock(models=["m1"], name="wrong-ca")
    gw = make_gateway(
        nodes=[
            node_entry(node, "system", ["m1"]),  # the system's trust store: it does not know this CA
            node_entry(other, "wrong", ["m1"], ca_file=str(certificates["other_ca"])),
        ],
        auth={"admin_keys": [ADMIN]},
        upstream={"max_retries": 0},
    )
    for node_id in ("system", "wrong"):
        state = wait_until(lambda node_id=node_id: (n := node_state(gw, node_id))["circuit"] == "open" and n)
        assert "certificate verify failed" in state["last_error"]
    status, _, err = chat(gw.url)
    assert status in (502, 503) and err["error"]["type"] == "server_error"
    assert "/v1/chat/completions" not in node.stats.per_path and "/v1/chat/completions" not in other.stats.per_path


def test_a_registered_https_node(make_tls_mock: Any, make_gateway: Any, certificates: dict[str, Path]) -> None:
    node = make_tls_mock(models=["m7"], name="later")
    gw = make_gateway(auth={"admin_keys": [ADMIN]}, embedded_mock=False)
    spec = {"id": "later", "url": node.url, "models": ["m7"], "ca_file": str(certificates["ca"])}
    status, _, shown = call(gw.url, "POST", "/admin/nodes", spec)
    assert status == 201 and shown["tls"] is True
    assert chat(gw.url, "m7")[0] == 200
    status, _, err = call(gw.url, "POST", "/admin/nodes", {**spec, "id": "bad", "ca_file": "/nonexistent.pem"})
    assert status == 400 and err["error"]["param"] == "ca_file"
    status, _, err = call(gw.url, "POST", "/admin/nodes", {**spec, "id": "bad", "url": "http://127.0.0.1:1"})
    assert status == 400 and err["error"]["param"] == "ca_file"  # a CA for a plain-HTTP node: a mistake
