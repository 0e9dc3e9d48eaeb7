"""Shared fixtures: mock nodes, the gateway on each request path, the implementation of a twin pair.

The helpers they use are in tests/support.py (``free_port``, ``wait_until``, ``GatewayThread`` and
``node_entry`` are importable from here too).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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
