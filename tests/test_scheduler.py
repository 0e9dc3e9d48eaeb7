"""Scheduler unit tests: caps, DRR across tenants, headroom for quiet tenants, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from shardon import errors
from shardon._fast import LeastConnBalancer
from shardon.config import SchedulerConfig
from shardon.scheduler import Scheduler


def run(fn: Callable[[Scheduler], Any], **config: Any) -> Any:
    async def main() -> Any:
        sched = Scheduler(SchedulerConfig(**config), LeastConnBalancer(), asyncio.get_running_loop())
        sched.add_node(0, 4, 1.0, {"m": "m"})
        return await fn(sched)

    return asyncio.run(main())


def test_cap_is_never_exceeded_and_release_dispatches() -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        assert [s.try_acquire(route, "t") for _ in range(5)] == [0, 0, 0, 0, -1]
        waiter = s.enqueue(route, 1, "t", 10, 1.0, 5)
        assert not waiter.future.done()
        s.release(0, route, "t")
        assert waiter.future.result() == 0
        assert s.balancer.inflight(0) == 4

    run(scenario, headroom_slots=0)


def test_drr_interleaves_tenants_and_priority_is_strict() -> None:
    async def scenario(s: Scheduler) -> list[str]:
        route = s.route("m")
        assert route is not None
        for _ in range(4):
            s.try_acquire(route, "x")
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
                s.try_acquire(route, "x")  # keep the node full
        return [w.tenant for w in order]

    order = run(scenario, headroom_slots=0, quantum_tokens=100)
    assert order[0] == "c"  # critical first
    # b's two requests do not wait behind all six of a's.
    assert order.index("b") < 4 and order[1:].count("b") == 2


def test_headroom_keeps_a_slot_for_a_tenant_under_its_share() -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        s.arrive(route, "quiet", 1.0)  # quiet was seen recently: two active tenants
        s.arrive(route, "noisy", 1.0)
        assert [s.try_acquire(route, "noisy") for _ in range(3)] == [0, 0, 0]
        # The last free slot is headroom: noisy (over its share of 2) must wait...
        assert s.try_acquire(route, "noisy") == -1
        held = s.enqueue(route, 1, "noisy", 10, 1.0, 5)
        assert not held.future.done() and route.waiting == 1
        # ...while quiet gets it at once.
        assert s.try_acquire(route, "quiet") == -1  # someone waits: no queue jumping on the fast path
        quiet = s.enqueue(route, 1, "quiet", 10, 1.0, 5)
        assert quiet.future.result() == 0
        assert not held.future.done()
        # When quiet is done and noisy frees a slot, two are free: the held request goes.
        s.release(0, route, "quiet")
        s.release(0, route, "noisy")
        assert held.future.done()

    run(scenario, headroom_slots=1, active_window_s=60)


def test_single_active_tenant_may_use_every_slot() -> None:
    async def scenario(s: Scheduler) -> list[int]:
        route = s.route("m")
        assert route is not None
        s.arrive(route, "noisy", 1.0)
        return [s.try_acquire(route, "noisy") for _ in range(4)]

    assert run(scenario, headroom_slots=1) == [0, 0, 0, 0]


def test_fifo_policy_ignores_tenants() -> None:
    async def scenario(s: Scheduler) -> list[int]:
        route = s.route("m")
        assert route is not None
        s.arrive(route, "quiet", 1.0)
        s.arrive(route, "noisy", 1.0)
        return [s.try_acquire(route, "noisy") for _ in range(4)]

    assert run(scenario, policy="fifo") == [0, 0, 0, 0]


def test_cancel_and_deadline_of_queued_and_held_requests() -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        s.arrive(route, "quiet", 1.0)
        for _ in range(3):
            s.try_acquire(route, "noisy")
        held = s.enqueue(route, 1, "noisy", 10, 1.0, 5)
        assert held.held
        assert s.cancel(held, errors.ClientGone())
        with pytest.raises(errors.ClientGone):
            held.future.result()
        assert route.waiting == 0
        s.try_acquire(route, "quiet")
        late = s.enqueue(route, 1, "noisy", 10, 1.0, 0.05)
        with pytest.raises(errors.QueueTimeout):
            await late.future
        assert route.waiting == 0

    run(scenario, headroom_slots=1, active_window_s=60)


def test_queue_full_and_no_healthy_node() -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        for _ in range(4):
            s.try_acquire(route, "t")
        s.enqueue(route, 1, "t", 1, 1.0, 5)
        with pytest.raises(errors.QueueFull) as info:
            s.enqueue(route, 1, "t", 1, 1.0, 5)
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        s.set_healthy(0, False)
        with pytest.raises(errors.NoCapacity):
            s.enqueue(route, 1, "t", 1, 1.0, 5)

    run(scenario, max_queue_size=1)
