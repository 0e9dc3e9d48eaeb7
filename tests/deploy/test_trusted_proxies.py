"""``server.trusted_proxies``: a forwarded client address is believed only from a trusted proxy.

The rule itself (shardon/proxies.py) is tested directly; then end to end on every request path:
the request log's ``client_addr`` and the loopback-only admin check (tests/test_twins.py runs them
on the pure-Python twins too). tests/deploy/test_nginx.py does the same with a real nginx in front.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from shardon.config import load_config
from shardon.errors import ConfigError
from shardon.proxies import ClientAddress, peer_host
from tests.support import node_entry, wait_until

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'
STREAM = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"stream":true}'


class Scope:
    def __init__(self, client: str, **headers: str) -> None:
        self.client = client
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("127.0.0.1:5000", "127.0.0.1"),
        ("::1:5000", "::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.1:5000", "10.0.0.1"),
        ("10.0.0.7", "10.0.0.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("not-an-address:80", None),
        ("", None),
    ],
)
def test_peer_host(peer: str, expected: str | None) -> None:
    address = peer_host(peer)
    assert (None if address is None else str(address)) == expected


def test_no_trusted_proxy_means_the_tcp_peer() -> None:
    resolve = ClientAddress([])
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="203.0.113.7", x_real_ip="203.0.113.8")) == "10.0.0.5:4000"


def test_forwarded_address_believed_only_from_a_trusted_peer() -> None:
    resolve = ClientAddress(["10.0.0.0/8", "::1"])
    # From a trusted proxy: the right-most untrusted hop of X-Forwarded-For.
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="203.0.113.7")) == "203.0.113.7"
    assert resolve(Scope("::1:4000", x_forwarded_for="203.0.113.7")) == "203.0.113.7"
    # A client's own (forged) entry sits left of the address the proxy saw: it is not believed.
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="1.2.3.4, 198.51.100.9")) == "198.51.100.9"
    # Chains of trusted proxies are walked through.
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="198.51.100.9, 10.1.1.1, 10.2.2.2")) == "198.51.100.9"
    # Every hop trusted: the left-most.
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="10.9.9.9, 10.1.1.1")) == "10.9.9.9"
    # Garbage stops the walk at the last hop a trusted proxy vouched for.
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="<script>, 10.1.1.1")) == "10.1.1.1"
    assert resolve(Scope("10.0.0.5:4000", x_forwarded_for="nonsense")) == "10.0.0.5:4000"
    # X-Real-IP when there is no X-Forwarded-For; neither: the peer.
    assert resolve(Scope("10.0.0.5:4000", x_real_ip="198.51.100.10")) == "198.51.100.10"
    assert resolve(Scope("10.0.0.5:4000", x_real_ip="junk")) == "10.0.0.5:4000"
    assert resolve(Scope("10.0.0.5:4000")) == "10.0.0.5:4000"
    # An untrusted peer's headers are ignored, whatever they say.
    assert resolve(Scope("192.0.2.1:4000", x_forwarded_for="127.0.0.1", x_real_ip="127.0.0.1")) == "192.0.2.1:4000"


def test_bad_entry_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {trusted_proxies: [127.0.0.1, 10.0.0.0/33]}\n")
    with pytest.raises(ConfigError, match=r"server\.trusted_proxies\[1\]: not an address or network"):
        load_config(path, environ={})
    config = load_config(None, environ={"SHARDON_SERVER_TRUSTED_PROXIES": "[127.0.0.1, 'fd00::/8']"})
    assert config.server.trusted_proxies == ["127.0.0.1", "fd00::/8"]


def request(gw: Any, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def logged_client(gw: Any, request_id: str) -> str:
    def fetch() -> Any:
        status, body = request(gw, f"/admin/requests/{request_id}", None, {})
        return json.loads(body) if status == 200 else None

    return str(wait_until(fetch, timeout=5)["client_addr"])


def send(gw: Any, body: bytes, headers: dict[str, str]) -> str:
    """POST a completion; the x-request-id of the answer."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        return str(resp.getheader("x-request-id"))
    finally:
        conn.close()


def test_e2e_request_log_and_admin_see_the_forwarded_client(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"], chunks=3, name="n")
    nodes = [node_entry(node, "n", ["m1"], max_concurrent=8)]
    trusting = make_gateway(nodes=nodes, server={"trusted_proxies": ["127.0.0.1"]})
    forged = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
    for body in (CHAT, STREAM):
        assert logged_client(trusting, send(trusting, body, forged)) == "203.0.113.7"
        assert logged_client(trusting, send(trusting, body, {"X-Real-IP": "203.0.113.8"})) == "203.0.113.8"
        assert logged_client(trusting, send(trusting, body, {})).startswith("127.0.0.1:")
    # The admin API is loopback-only without admin keys: a forwarded remote client is not loopback.
    status, body = request(trusting, "/admin/stats", None, {"X-Forwarded-For": "203.0.113.7"})
    assert status == 403, body
    assert json.loads(body)["error"]["type"]
    status, _ = request(trusting, "/admin/stats", None, {})
    assert status == 200

    # Not trusted (the default): the headers change nothing.
    plain = make_gateway(nodes=nodes)
    for body in (CHAT, STREAM):
        assert logged_client(plain, send(plain, body, forged)).startswith("127.0.0.1:")
    status, _ = request(plain, "/admin/stats", None, {"X-Forwarded-For": "203.0.113.7"})
    assert status == 200
