"""Scheduler unit tests: caps, fair queueing across tenants, fixed and adaptive headroom, cancellation.

Every test runs on both implementations (``shardon._scheduler_c`` and ``_scheduler_py``)."""

from __future__ import annotations

import asyncio
import time
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


# -- adaptive headroom ---------------------------------------------------------------------------------


def run_on(impl: ModuleType, slots: int, fn: Callable[[Scheduler], Any], **config: Any) -> Any:
    async def main() -> Any:
        sched = impl.Scheduler(SchedulerConfig(**config), LeastConnBalancer(), asyncio.get_running_loop())
        sched.add_node(0, slots, 1.0, {"m": "m"})
        return await fn(sched)

    return asyncio.run(main())


def _fill(s: Scheduler, route: Any, quiet: int) -> list[Any]:
    """``quiet`` requests of a quiet tenant in flight (it is active in any case); a noisy tenant takes
    every slot it may and queues 20 more."""
    for _ in range(quiet):
        assert s.admit(route, "quiet", 1.0) == 0
    if not quiet:
        s.release(s.admit(route, "quiet", 1.0), route, "quiet")
    while s.admit(route, "noisy", 1.0) == 0:
        pass
    return [s.enqueue(route, 1, "noisy", 10, 1.0, 60) for _ in range(20)]


def test_demand_is_averaged_from_requests_in_flight_and_waiting(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        _fill(s, route, 1)  # quiet 1 in flight; noisy 6 in flight (two slots free for quiet) + 20 waiting
        # A tenant's first samples are averaged plainly (no ramp from zero).
        s._estimate(route, time.monotonic())
        assert route.demand == {"quiet": 1.0, "noisy": 26.0} and route.busy == 7.0
        s.release(0, route, "quiet")
        s._estimate(route, time.monotonic())
        assert route.demand["quiet"] == 0.5
        assert s.enqueue(route, 1, "quiet", 10, 1.0, 60).future.result() == 0  # in flight again
        for _ in range(400):
            s._estimate(route, time.monotonic())
        assert route.demand["quiet"] == pytest.approx(1.0, abs=0.01)
        assert route.demand["noisy"] == pytest.approx(26.0, abs=0.3)
        assert route.busy == pytest.approx(7.0, abs=0.1)
        s.release(0, route, "quiet")  # quiet goes quiet: its demand decays, then its entry goes
        for _ in range(400):
            s._estimate(route, time.monotonic())
        assert "quiet" not in route.demand

    run_on(impl, 8, scenario, active_window_s=600)


@pytest.mark.parametrize(
    ("quiet_demand", "target", "expected"),
    [
        (0.0, 0.01, 1),  # seen, nothing in flight: one slot
        (0.05, 0.01, 1),
        (0.6, 0.01, 2),  # often one in flight: a second may come before a slot frees
        (0.6, 0.1, 1),  # ... unless that risk is accepted
        (1.0, 0.01, 3),
        (3.0, 0.01, 5),  # near its share: the noisy one is held to its share anyway
        (30.0, 0.01, 1),  # over its share: not light, nobody to keep slots for
    ],
)
def test_headroom_is_sized_from_the_light_tenants_demand(
    impl: ModuleType, quiet_demand: float, target: float, expected: int
) -> None:
    async def scenario(s: Scheduler) -> int:
        route = s.route("m")
        assert route is not None
        assert route.headroom == 1  # until the first estimate
        _fill(s, route, 0)
        route.demand = {"quiet": quiet_demand, "noisy": 27.0}
        route.busy = 7.0
        return s._size_headroom(route, time.monotonic())

    assert run_on(impl, 8, scenario, headroom_wait_target=target, active_window_s=60) == expected


def test_adaptive_headroom_holds_the_noisy_tenant_back_and_serves_the_quiet_one_at_once(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        waiting = _fill(s, route, 0)  # noisy: 7 in flight
        route.demand = {"quiet": 0.6, "noisy": 27.0}
        route.busy = 7.0
        route.headroom = s._size_headroom(route, time.monotonic())
        assert route.headroom == 2
        # Noisy requests end; their slots go back to noisy only while two stay free.
        for _ in range(3):
            s.release(0, route, "noisy")
        assert s.balancer.free_slots(route.candidates) == 2
        assert sum(w.future.done() for w in waiting) == 2
        assert route.held_by == {"noisy": 18} and len(route.held) == 18
        assert s.cancel(waiting[-1], errors.ClientGone())
        assert route.held_by == {"noisy": 17}
        # Two quiet requests arrive together: both start at once (queued first, then served).
        first = s.enqueue(route, 1, "quiet", 10, 1.0, 60)
        second = s.enqueue(route, 1, "quiet", 10, 1.0, 60)
        assert first.future.result() == 0 and second.future.result() == 0
        assert route.inflight == {"quiet": 2, "noisy": 6}

    run_on(impl, 8, scenario, active_window_s=60)


def test_adaptive_headroom_is_off_for_a_single_tenant_and_with_fixed_or_fifo(impl: ModuleType) -> None:
    async def alone(s: Scheduler) -> list[int]:
        route = s.route("m")
        assert route is not None
        got = [s.admit(route, "noisy", 1.0) for _ in range(8)]
        for _ in range(50):
            s._estimate(route, time.monotonic())
        assert route.headroom == 1
        return got

    assert run_on(impl, 8, alone) == [0] * 8

    async def fixed(s: Scheduler) -> tuple[int, bool]:
        route = s.route("m")
        assert route is not None
        return route.headroom, s._timer is None

    assert run_on(impl, 8, fixed, headroom_slots=3) == (3, True)
    assert run_on(impl, 8, fixed, policy="fifo") == (0, True)
    assert run_on(impl, 8, fixed) == (1, False)


def test_the_timer_keeps_the_estimate_current(impl: ModuleType) -> None:
    async def scenario(s: Scheduler) -> None:
        route = s.route("m")
        assert route is not None
        _fill(s, route, 2)
        deadline = time.monotonic() + 10
        while "quiet" not in route.demand and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert route.demand["quiet"] > 0

    run_on(impl, 8, scenario)


def test_none_free_probability(impl: ModuleType) -> None:
    _none_free = impl._none_free
    assert _none_free(0.0, 1) == 0.0
    assert _none_free(1.0, 3) == 1.0 and _none_free(2.0, 1) == 1.0
    assert _none_free(0.1, 1) == pytest.approx(0.1 / 1.1)
    assert _none_free(0.1, 2) == pytest.approx(0.01 * 0.9 / 0.999)
