"""Scheduler unit tests: caps, DRR across tenants, headroom for quiet tenants, cancellation.

Every test runs on both implementations (``shardon._scheduler_c`` and ``_scheduler_py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from shardon import errors
from shardon._fast import LeastConnBalancer
from shardon.config import SchedulerConfig
from shardon.scheduler import Route, Scheduler
from tests.support import twin


@pytest.fixture
def impl(implementation: str) -> ModuleType:
    return twin("shardon._scheduler", implementation)


def run(impl: ModuleType, fn: Callable[[Scheduler], Any], **config: Any) -> Any:
    async def main() -> Any:
        sched = impl.Scheduler(SchedulerConfig(**config), LeastConnBalancer(), asyncio.get_running_loop())
        sched.add_node(0, 4, 1.0, {"m": "m"})
        return await fn(sched)

    return asyncio.run(main())


def seen(s: Scheduler, route: Route, tenant: str) -> None:
    """``tenant`` sends a request that ends at once: it counts as active for a while."""
    s.release(s.admit(route, tenant, 1.0), route, tenant)


def test_cap_is_never_exceeded_and_release_dispatches(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        assert [s.admit(route, "t", 1.0) for _ in range(5)] == [0, 0, 0, 0, -1]
        waiter = s.enqueue(route, 1, "t", 10, 1.0, 5)
        assert not waiter.future.done()
        s.release(0, route, "t")
        assert waiter.future.result() == 0
        assert s.balancer.inflight(0) == 4

    run(impl, scenario, headroom_slots=0)


def test_drr_interleaves_tenants_and_priority_is_strict(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> list[str]:
        route = s.route("m")
        assert route is not None
        for _ in range(4):
            s.admit(route, "x", 1.0)
        waiters = [s.enqueue(route, 1, "a", 100, 1.0, 5) for _ in range(6)]
        waiters += [s.enqueue(route, 1, "b", 100, 1.0, 5) for _ in range(2)]
        waiters.append(s.enqueue(route, 3, "c", 100, 1.0, 5))
        order = []
        for _ in range(len(waiters)):
            s.release(0, route, "x")
            done = [w for w in waiters if w.future.done() and w not in order]
            order += done
            for w in done:
                s.release(0, route, w.tenant)
                s.admit(route, "x", 1.0)  # keep the node full
        return [w.tenant for w in order]

    order = run(impl, scenario, headroom_slots=0, quantum_tokens=100)
    assert order[0] == "c"  # critical first
    # b's two requests do not wait behind all six of a's.
    assert order.index("b") < 4 and order[1:].count("b") == 2


def test_headroom_keeps_a_slot_for_a_tenant_under_its_share(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        seen(s, route, "quiet")  # quiet was seen recently: two active tenants
        seen(s, route, "noisy")
        assert [s.admit(route, "noisy", 1.0) for _ in range(3)] == [0, 0, 0]
        # The last free slot is headroom: noisy (over its share of 2) must wait...
        assert s.admit(route, "noisy", 1.0) == -1
        held = s.enqueue(route, 1, "noisy", 10, 1.0, 5)
        assert not held.future.done() and route.waiting == 1
        # ...while quiet gets it at once.
        assert s.admit(route, "quiet", 1.0) == -1  # someone waits: no queue jumping
        quiet = s.enqueue(route, 1, "quiet", 10, 1.0, 5)
        assert quiet.future.result() == 0
        assert not held.future.done()
        # When quiet is done and noisy frees a slot, two are free: the held request goes.
        s.release(0, route, "quiet")
        s.release(0, route, "noisy")
        assert held.future.done()

    run(impl, scenario, headroom_slots=1, active_window_s=60)


def test_single_active_tenant_may_use_every_slot(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> list[int]:
        route = s.route("m")
        assert route is not None
        seen(s, route, "noisy")
        return [s.admit(route, "noisy", 1.0) for _ in range(4)]

    assert run(impl, scenario, headroom_slots=1) == [0, 0, 0, 0]


def test_fifo_policy_ignores_tenants(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> list[int]:
        route = s.route("m")
        assert route is not None
        seen(s, route, "quiet")
        seen(s, route, "noisy")
        return [s.admit(route, "noisy", 1.0) for _ in range(4)]

    assert run(impl, scenario, policy="fifo") == [0, 0, 0, 0]


def test_cancel_and_deadline_of_queued_and_held_requests(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        seen(s, route, "quiet")
        for _ in range(3):
            s.admit(route, "noisy", 1.0)
        held = s.enqueue(route, 1, "noisy", 10, 1.0, 5)
        assert held.held
        assert s.cancel(held, errors.ClientGone())
        with pytest.raises(errors.ClientGone):
            held.future.result()
        assert route.waiting == 0
        s.admit(route, "quiet", 1.0)
        late = s.enqueue(route, 1, "noisy", 10, 1.0, 0.05)
        with pytest.raises(errors.QueueTimeout):
            await late.future
        assert route.waiting == 0

    run(impl, scenario, headroom_slots=1, active_window_s=60)


def test_queue_full_and_no_healthy_node(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        for _ in range(4):
            s.admit(route, "t", 1.0)
        s.enqueue(route, 1, "t", 1, 1.0, 5)
        with pytest.raises(errors.QueueFull) as info:
            s.enqueue(route, 1, "t", 1, 1.0, 5)
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        s.set_healthy(0, False)
        with pytest.raises(errors.NoCapacity):
            s.enqueue(route, 1, "t", 1, 1.0, 5)

    run(impl, scenario, max_queue_size=1)
