"""Shared fixtures: a gateway on its own loop in a thread, mock nodes, free ports."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shardon.app import Gateway
from shardon.config import Config, load_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class GatewayThread:
    """``shardon.server.run`` on a uvloop in a daemon thread, bound to a free loopback port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.gateway: Gateway | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.exit_code: int | None = None

    @property
    def port(self) -> int:
        return self.config.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> GatewayThread:
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("gateway did not start")

        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(accepting, timeout)
        return self

    def _run(self) -> None:
        import uvloop

        from shardon.server import run

        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(gateway: Gateway) -> None:
                self.gateway = gateway
                self._started.set()

            return await run(self.config, stop=self._stop, started=started)

        self.exit_code = uvloop.run(main())

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the gateway's loop and return its result (reads state safely)."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []

        def wrapper() -> None:
            box.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(wrapper)
        if not done.wait(timeout):
            raise TimeoutError
        return box[0]

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)


@pytest.fixture
def make_mock() -> Iterator[Callable[..., Any]]:
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


# SHARDON_TEST_ENGINES narrows the engines (tests/test_twins.py runs the native one alone).
ENGINES = tuple(os.environ.get("SHARDON_TEST_ENGINES", "native,granian").split(","))


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """Every end-to-end test runs on both HTTP engines: the native one (its common requests on
    the callback path, shardon/fastpath.py) and granian (every request on the general path)."""
    return str(request.param)


@pytest.fixture
def make_gateway(tmp_path: Any, engine: str) -> Iterator[Callable[..., GatewayThread]]:
    gateways: list[GatewayThread] = []

    def make(raw: dict[str, Any] | None = None, **sections: Any) -> GatewayThread:
        import yaml

        raw = dict(raw or {})
        raw.update(sections)
        server = dict(raw.get("server", {}))
        server.setdefault("engine", engine)
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


def node_entry(node: Any, node_id: str, models: Any, **extra: Any) -> dict[str, Any]:
    entry = {"id": node_id, "url": node.url, "models": models}
    entry.update(extra)
    return entry
