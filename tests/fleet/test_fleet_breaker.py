"""The node registry's circuit breaker, drain and reported load, without sockets.

Every test runs on both implementations of the registry and the scheduler (compiled and Python)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

import pytest

from shardon._fast import LeastConnBalancer
from shardon.config import NodeConfig, SchedulerConfig, UpstreamConfig
from shardon.metrics import Metrics
from shardon.nodeload import NodeLoad
from tests.support import twin

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


@pytest.fixture(params=["c", "py"])
def impls(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    return twin("shardon._nodes", str(request.param)), twin("shardon._scheduler", str(request.param))


def run(impls: tuple[ModuleType, ModuleType], test: Callable[[Any, Any], Awaitable[None]], **upstream: Any) -> None:
    nodes, scheduling = impls

    async def main() -> None:
        loop = asyncio.get_running_loop()
        scheduler = scheduling.Scheduler(SchedulerConfig(), LeastConnBalancer(), loop)
        registry = nodes.NodeRegistry(
            UpstreamConfig(**{"failure_threshold": 2, "cooldown_s": 0.01, "max_cooldown_s": 0.04, **upstream}),
            loop=loop,
            scheduler=scheduler,
            metrics=Metrics(enabled=False),
        )
        for name in ("a", "b"):
            registry.add(NodeConfig(id=name, url=f"http://127.0.0.1:{9000 + len(registry.nodes)}", models=["m"]))
        await test(registry, scheduler)
        await registry.stop()

    asyncio.run(main())


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not met")


def test_open_half_open_one_trial_closed(impls: tuple[ModuleType, ModuleType]) -> None:
    async def test(registry: Any, scheduler: Any) -> None:
        a = registry.nodes["a"]
        route = scheduler.routes["m"]
        balancer = scheduler.balancer
        registry.record_failure(a, "boom")
        assert a.circuit == CLOSED and balancer.healthy(a.index)
        registry.record_failure(a, "boom")
        assert (a.circuit, a.healthy, a.cooldown) == (OPEN, False, 0.01)
        assert not balancer.healthy(a.index)
        assert {scheduler.admit(route, "t", 1.0) for _ in range(3)} == {registry.nodes["b"].index}
        for _ in range(3):
            scheduler.release(registry.nodes["b"].index, route, "t")
        await until(lambda: a.circuit == HALF_OPEN)
        assert balancer.trial(a.index) and a.snapshot()["circuit"] == "half_open"
        # b full: exactly one request goes to a, the next ones wait for the trial's verdict.
        scheduler.update_node(registry.nodes["b"].index, 0, 1.0, {"m": "m"})
        assert scheduler.admit(route, "t", 1.0) == a.index
        assert scheduler.admit(route, "t", 1.0) == -1
        waiter = scheduler.enqueue(route, 1, "t", 1.0, 1.0, 5.0)  # queued, not refused: it may recover
        assert a not in registry.to_probe()  # the trial is a client's: no probe
        scheduler.release(a.index, route, "t")
        registry.record_success(a)
        assert (a.circuit, a.healthy, a.cooldown) == (CLOSED, True, 0.0)
        assert await waiter.future == a.index  # served once the circuit closed

    run(impls, test)


def test_a_failed_trial_doubles_the_cooldown_up_to_the_maximum(impls: tuple[ModuleType, ModuleType]) -> None:
    async def test(registry: Any, scheduler: Any) -> None:
        a = registry.nodes["a"]
        registry.probe_failed(a, "health check answered 503")  # a probe: out at once
        assert (a.circuit, a.cooldown, a.last_error) == (OPEN, 0.01, "health check answered 503")
        seen = []
        for _ in range(3):
            await until(lambda: a.circuit == HALF_OPEN)
            assert a in registry.to_probe()  # no client came: the probe takes the trial
            assert not scheduler.balancer.healthy(a.index)
            registry.record_failure(a, "trial failed")
            seen.append(a.cooldown)
        assert seen == [0.02, 0.04, 0.04]

    run(impls, test)


def test_a_trial_without_a_verdict_goes_to_the_probe(impls: tuple[ModuleType, ModuleType]) -> None:
    async def test(registry: Any, scheduler: Any) -> None:
        a = registry.nodes["a"]
        route = scheduler.routes["m"]
        registry.record_failure(a, "refused", True)  # a refused connection: out at once
        assert a.circuit == OPEN
        await until(lambda: a.circuit == HALF_OPEN)
        scheduler.update_node(registry.nodes["b"].index, 0, 1.0, {"m": "m"})
        assert scheduler.admit(route, "t", 1.0) == a.index  # the trial goes...
        assert a not in registry.to_probe()  # ... and runs: the probe waits for it
        scheduler.release(a.index, route, "t")  # its client left before anything was sent
        assert set(registry.to_probe()) == {registry.nodes["b"], a}
        registry.record_success(a)
        assert a.circuit == CLOSED

    run(impls, test)


def test_drain_retire_and_reported_load(impls: tuple[ModuleType, ModuleType]) -> None:
    async def test(registry: Any, scheduler: Any) -> None:
        a, b = registry.nodes["a"], registry.nodes["b"]
        route = scheduler.routes["m"]
        balancer = scheduler.balancer
        registry.set_draining(a, True)
        assert not balancer.healthy(a.index) and a.circuit == CLOSED and a in registry.to_probe()
        assert {scheduler.admit(route, "t", 1.0) for _ in range(2)} == {b.index}
        registry.set_draining(a, False)
        assert balancer.healthy(a.index)
        # Reported load: the requests that are not Shardon's count for the balancer.
        registry.set_load(b, NodeLoad(source="vllm /metrics", running=3, waiting=4))
        assert balancer.load(b.index) == 7 - 2
        assert b.snapshot()["load"]["waiting"] == 4
        registry.set_load(b, None)
        assert balancer.load(b.index) == 0
        # Retire: drained at once, removed by the sweep once nothing runs on it.
        sweep = asyncio.get_running_loop().create_task(registry._sweep_forever())
        assert registry.retire(b) is False
        assert b.removing and b.draining and "b" in registry.nodes
        registry.set_draining(b, False)  # on its way out: stays draining
        assert b.draining
        for _ in range(2):
            scheduler.release(b.index, route, "t")
        await until(lambda: "b" not in registry.nodes)  # the sweep removed it
        assert registry.retire(a) is True and not registry.nodes
        assert "m" not in scheduler.routes  # no node serves it any more
        sweep.cancel()
        registry.add(NodeConfig(id="c", url="http://127.0.0.1:1", models=["m"]))
        with pytest.raises(ValueError):
            registry.add(NodeConfig(id="c", url="http://127.0.0.1:2", models=["m"]))

    run(impls, test)
