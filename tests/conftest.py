"""Shared fixtures: mock nodes (TLS ones with a private CA too), the gateway on each request path, the
implementation of a twin pair.

The helpers they use are in tests/support.py (``free_port``, ``wait_until``, ``GatewayThread`` and
``node_entry`` are importable from here too).
"""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardon.config import load_config
from tests.support import PATHS, TWINS, GatewayThread, free_port, node_entry, path_server, wait_until

__all__ = ["GatewayThread", "free_port", "node_entry", "wait_until"]


@pytest.fixture(params=TWINS)
def implementation(request: pytest.FixtureRequest) -> str:
    """Which implementation of a twin pair a test runs on: ``c`` (compiled) or ``py`` (its Python
    twin); ``tests.support.twin(stem, implementation)`` is the module."""
    return str(request.param)


@pytest.fixture
def make_mock() -> Iterator[Callable[..., Any]]:
    """``make_mock(**MockConfig fields)``: a started `MockNodeThread`, stopped at the end."""
    from shardon.upstream.mock import MockConfig, MockNodeThread

    nodes: list[MockNodeThread] = []

    def make(**kwargs: Any) -> MockNodeThread:
        node = MockNodeThread(MockConfig(**kwargs))
        node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture(params=[p for p in PATHS if p in os.environ.get("SHARDON_TEST_ENGINES", ",".join(PATHS)).split(",")])
def engine(request: pytest.FixtureRequest) -> str:
    """The request path an end-to-end test runs on (tests/support.py `PATHS`): ``native`` (the
    native engine's callbacks), ``native-coroutine`` (``server.callbacks: false``) or ``granian``."""
    return str(request.param)


def _check_path(gw: GatewayThread) -> None:
    """Every exchange went its gateway's path: by callbacks on the native engine with callbacks on
    (but those the test said it sends to the coroutine), by the coroutine elsewhere."""
    server = gw.config.server
    path = "granian" if server.engine == "granian" else "native" if server.callbacks else "native-coroutine"
    callbacks, coroutine = gw.served()
    if path == "native":
        assert coroutine == gw.coroutines_expected, f"{coroutine} request(s) left the callback path"
    else:
        assert callbacks == 0, f"{callbacks} request(s) served by callbacks on {path}"


@pytest.fixture
def make_gateway(tmp_path: Any, engine: str) -> Iterator[Callable[..., GatewayThread]]:
    """``make_gateway(raw=None, **sections)``: a started gateway on the test's request path with the
    config sections given (a store in ``tmp_path``, a 0.2 s health interval, no models of its own
    unless given). At the end each is stopped, and every exchange it served must have gone the
    test's path."""
    gateways: list[GatewayThread] = []

    def make(raw: dict[str, Any] | None = None, **sections: Any) -> GatewayThread:
        import yaml

        raw = dict(raw or {})
        raw.update(sections)
        server = path_server(engine) | dict(raw.get("server", {}))
        server.setdefault("port", free_port())
        server.setdefault("drain_timeout_s", 5)
        raw["server"] = server
        upstream = dict(raw.get("upstream", {}))
        upstream.setdefault("health_interval_s", 0.2)
        raw["upstream"] = upstream
        raw.setdefault("store", {"path": str(tmp_path / f"shardon-{len(gateways)}.db")})
        # No models started on demand unless a test asks (the demo package may be installed).
        raw.setdefault("demo", False)
        raw.setdefault("models_dir", str(tmp_path / "no-models"))
        path = tmp_path / f"shardon-{len(gateways)}.yaml"
        path.write_text(yaml.safe_dump(raw))
        gateway = GatewayThread(load_config(path, environ={}))
        gateways.append(gateway)
        return gateway.start()

    yield make
    for gateway in gateways:
        gateway.stop()
    for gateway in gateways:
        _check_path(gateway)


# == TLS: a private CA, a node certificate it signed (openssl), TLS mock nodes ====================
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ca`` (a self-signed CA), ``cert`` and ``key`` (a node's, for localhost and 127.0.0.1,
    signed by that CA), ``other_ca`` (a CA that signed nothing here)."""
    where = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other_ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
            "-subj", f"/CN=Shardon test {name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=where,
        )  # fmt: skip
    _openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=localhost", cwd=where)
    (where / "node.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    _openssl(
        "x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "node.pem", "-days", "2", "-extfile", "node.ext",
        cwd=where,
    )  # fmt: skip
    return {
        "ca": where / "ca.pem",
        "other_ca": where / "other_ca.pem",
        "cert": where / "node.pem",
        "key": where / "node.key",
    }


@pytest.fixture
def make_tls_mock(certificates: dict[str, Path]) -> Iterator[Callable[..., Any]]:
    """``make(**MockConfig fields)``: a started mock node that speaks TLS (``https://localhost:port``)."""
    from shardon.upstream.mock import MockConfig
    from shardon.upstream.mock.tls import TLSMockNodeThread

    nodes: list[Any] = []

    def make(**kwargs: Any) -> Any:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificates["cert"], certificates["key"])
        node = TLSMockNodeThread(MockConfig(**kwargs), context)
        node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()
