"""The node registry (shardon/nodes.py) without a gateway, on both implementations: adding and
removing nodes keeps the scheduler, the pools, the metrics and the model list in step; a node's
request head; health probes (shardon/probes.py) against a mock node. The circuit breaker's rule is
tested on the registry in tests/fleet/test_fleet_breaker.py, end to end in
tests/gateway/test_node_health.py and tests/fleet/test_fleet_health.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from shardon._fast import LeastConnBalancer
from shardon.config import NodeConfig, SchedulerConfig, UpstreamConfig
from shardon.metrics import Metrics
from shardon.probes import Prober
from shardon.upstream.mock import MockConfig, MockNode
from tests.support import twin


@pytest.fixture
def nodes(implementation: str) -> ModuleType:
    return twin("shardon._nodes", implementation)


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def run(nodes: ModuleType, scenario: Callable[[Any, Any, Changes], Awaitable[None]], **upstream: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        scheduler = twin("shardon._scheduler", "py" if nodes.__name__.endswith("_py") else "c").Scheduler(
            SchedulerConfig(), LeastConnBalancer(), loop
        )
        changes = Changes()
        registry = nodes.NodeRegistry(
            UpstreamConfig(**upstream), loop=loop, scheduler=scheduler, metrics=Metrics(enabled=True), on_change=changes
        )
        try:
            await asyncio.wait_for(scenario(registry, scheduler, changes), 10)
        finally:
            await registry.stop()

    asyncio.run(main())


def test_adding_and_removing_nodes_keeps_everything_in_step(nodes: ModuleType) -> None:
    async def scenario(registry: Any, scheduler: Any, changes: Changes) -> None:
        a = registry.add(NodeConfig(id="a", url="http://127.0.0.1:9", models=["m1", "m2"], max_concurrent=3))
        b = registry.add(NodeConfig(id="b", url="http://127.0.0.1:10", models={"m1": "served-m1"}, weight=2))
        assert (a.index, b.index) == (0, 1) and registry.by_index == {0: a, 1: b}
        assert changes.count == 2
        assert scheduler.routes["m1"].candidates == [0, 1] and scheduler.routes["m2"].candidates == [0]
        assert scheduler.routes["m1"].served_names == {0: "m1", 1: "served-m1"}
        assert scheduler.balancer.capacity(0) == 3 and scheduler.balancer.capacity(1) == 4
        assert a.pool.max_idle == b.pool.max_idle == 2  # min(max_concurrent, upstream.max_idle_per_node)
        assert registry.remove("a") is a and registry.remove("a") is None
        assert changes.count == 3 and list(registry.nodes) == ["b"] and registry.by_index == {1: b}
        assert scheduler.routes["m1"].candidates == [1] and "m2" not in scheduler.routes  # no node serves it
        c = registry.add(NodeConfig(id="c", url="http://127.0.0.1:11", models=["m1"]))
        assert c.index == 2  # indexes are never reused

    run(nodes, scenario, max_idle_per_node=2)


def test_a_nodes_request_head(nodes: ModuleType) -> None:
    async def scenario(registry: Any, scheduler: Any, changes: Changes) -> None:
        node = registry.add(NodeConfig(id="n", url="http://10.0.0.5:8000", models=["m1"], api_key="node-secret"))
        head = node.request_head(b"POST /v1/completions", 42)
        assert head == (
            b"POST /v1/completions HTTP/1.1\r\nHost: 10.0.0.5:8000\r\nUser-Agent: shardon\r\nAccept: */*\r\n"
            b"Authorization: Bearer node-secret\r\nContent-Type: application/json\r\nContent-Length: 42\r\n\r\n"
        )
        assert node.request_head(b"POST /v1/completions", 7).endswith(b"Content-Length: 7\r\n\r\n")
        assert b"Content-Type" not in node.request_head(b"GET /v1/models", 0)
        snapshot = node.snapshot()
        assert "api_key" not in snapshot and "node-secret" not in repr(snapshot)
        assert {k: snapshot[k] for k in ("id", "url", "source", "models", "healthy", "circuit", "draining")} == {
            "id": "n",
            "url": "http://10.0.0.5:8000",
            "source": "config",
            "models": ["m1"],
            "healthy": True,
            "circuit": "closed",
            "draining": False,
        }
        assert (snapshot["max_concurrent"], snapshot["weight"], snapshot["failures"]) == (4, 1.0, 0)

    run(nodes, scenario)


@pytest.mark.parametrize(("fail", "healthy"), [(None, True), ("status503", False), ("before", False), ("hang", False)])
def test_a_health_probe_asks_the_node(nodes: ModuleType, fail: str | None, healthy: bool) -> None:
    async def scenario(registry: Any, scheduler: Any, changes: Changes) -> None:
        async with MockNode(MockConfig(models=["m1"])) as mock:
            mock.set_fail(fail)
            node = registry.add(NodeConfig(id="n", url=mock.url, models=["m1"]))
            assert await Prober(registry, UpstreamConfig(health_timeout_s=0.2)).probe(node) is healthy
            assert mock.stats.per_path == {"/health": 1}
            assert node.routable is healthy  # a failed probe takes the node out at once
            if not healthy:
                assert node.last_error and node.snapshot()["circuit"] == "open"

    run(nodes, scenario, health_timeout_s=0.2)


def test_a_node_without_health_is_probed_on_its_model_list(nodes: ModuleType) -> None:
    async def scenario(registry: Any, scheduler: Any, changes: Changes) -> None:
        async with MockNode(MockConfig(models=["m1"])) as mock:
            mock.reported.health = False  # a 404 there, like llama-cpp-python's server
            node = registry.add(NodeConfig(id="n", url=mock.url, models=["m1"]))
            prober = Prober(registry, UpstreamConfig())
            assert await prober.probe(node) and await prober.probe(node)
            assert mock.stats.per_path == {"/health": 1, "/v1/models": 2}  # asked once, then not again

    run(nodes, scenario)


def test_a_refused_health_check_is_a_failure(nodes: ModuleType) -> None:
    async def scenario(registry: Any, scheduler: Any, changes: Changes) -> None:
        from tests.support import free_port

        node = registry.add(NodeConfig(id="n", url=f"http://127.0.0.1:{free_port()}", models=["m1"]))
        assert await Prober(registry, UpstreamConfig()).probe(node) is False
        assert "connect" in node.last_error.lower() and not node.routable

    run(nodes, scenario)
