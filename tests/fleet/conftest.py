"""The fleet's fixtures: a private CA and a node certificate it signed (openssl), TLS mock nodes."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


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
