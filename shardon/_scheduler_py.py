"""Admission and dispatch: who gets the next free slot on which node.

Each public model has a :class:`Route`: the nodes that serve it and one ``FairQueue`` (priority
classes, strict; inside a class start-time fair queueing across tenants weighted by tenant weight,
so a tenant that was idle goes first; FIFO within a tenant). A request takes a slot at once when
nobody of its model waits and the least-loaded healthy node has room; otherwise it waits as a
:class:`Waiter` until

- a slot frees on one of its nodes (:meth:`Scheduler.release` hands it over before returning, so a
  freed slot never sits idle while an eligible request waits),
- its deadline passes (``QueueTimeout``, 504), or
- its client leaves (:meth:`Scheduler.cancel`).

A node's cap is never exceeded: slots are only taken through the balancer, which refuses a node at
its ``max_concurrent``.

Headroom for quiet tenants
--------------------------
Queue order alone cannot protect a quiet tenant: when a noisy tenant holds every slot, the quiet
tenant's request is first in line but still waits for a whole generation to end. So while more than
one tenant is active on a route (a request in flight, waiting, or sent within ``active_window_s``), a
tenant at or above its fair share of the route's slots (slots x its weight / the active tenants'
weights) may not take the last ``route.headroom`` free slots; its request is *held* (FIFO, ahead of
its later requests) until more slots free up or the others go quiet. A tenant under its share takes
a free slot at once, so no tenant is ever held below its share, and with a single active tenant the
rule is off.

``headroom_slots`` fixes the number; ``"auto"`` (the default) sizes it per route every ``_TICK_S``
from the light tenants' recent demand (requests in flight or waiting, averaged): the fewest slots
that keep the chance of a light tenant's request finding none free under ``headroom_wait_target``
(:meth:`Scheduler._size_headroom`; docs/scheduling.md has the model and the measurements).

Which node: the balancer's least connections, unless the route has a policy (``Route.policy``,
`shardon.routing.policies`: round robin, prefix affinity), which picks among the route's
candidates for the request's affinity key and is told the node it got (``placed``).

Starvation: priority classes are strict, so a low-priority request waits while higher classes have
work queued; it is served whenever they leave capacity. The queue deadline bounds every wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any

from . import errors
from ._fast import FairQueue, LeastConnBalancer
from .config import SchedulerConfig

_FIFO_TENANT = "*"
# Adaptive headroom: demand is sampled every _TICK_S and averaged over about _DEMAND_TAU_S.
_TICK_S = 0.5
_DEMAND_TAU_S = 20.0
_ALPHA = 1.0 - math.exp(-_TICK_S / _DEMAND_TAU_S)
_SAMPLES = int(1 / _ALPHA)  # a new tenant's first samples are averaged plainly, then exponentially


class Route:
    __slots__ = (
        "busy",
        "candidates",
        "demand",
        "demand_samples",
        "headroom",
        "held",
        "held_by",
        "inflight",
        "last_seen",
        "name",
        "policy",
        "queue",
        "rules",
        "served_names",
        "service_ewma",
        "weights",
    )

    def __init__(self, name: str, quantum: float, headroom: int) -> None:
        self.name = name
        self.candidates: list[int] = []
        self.served_names: dict[int, str] = {}
        self.queue = FairQueue(quantum)
        self.held: deque[Waiter] = deque()
        self.held_by: dict[str, int] = {}  # tenant -> its requests in held
        self.inflight: dict[str, int] = {}
        self.last_seen: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.service_ewma = 1.0
        self.policy: Any = None  # the node choice (shardon.routing.policies); None: least connections
        self.rules: Any = None  # the requests' routing rules (shardon.routing.router.Rules)
        # Free slots a tenant at or over its share must leave (fixed, or set by Scheduler._estimate).
        self.headroom = headroom
        self.demand: dict[str, float] = {}  # tenant -> its requests in flight or waiting, averaged
        self.demand_samples: dict[str, int] = {}  # tenant -> samples in its average, up to _SAMPLES
        self.busy = 0.0  # requests in flight, averaged (from the first sample; 0 while idle)

    @property
    def waiting(self) -> int:
        return len(self.queue) + len(self.held)


class Waiter:
    __slots__ = ("affinity", "cost", "future", "handle", "held", "priority", "route", "tenant", "timer")

    def __init__(
        self, route: Route, future: asyncio.Future[int], priority: int, tenant: str, cost: float, affinity: Any
    ) -> None:
        self.route = route
        self.affinity = affinity
        self.future = future
        self.priority = priority
        self.tenant = tenant
        self.cost = cost
        self.handle = -1
        self.held = False
        self.timer: asyncio.TimerHandle | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, balancer: LeastConnBalancer, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.balancer = balancer
        self.loop = loop
        self.routes: dict[str, Route] = {}
        self.node_weights: dict[int, float] = {}
        self._node_routes: dict[int, list[Route]] = {}
        self._kept: set[str] = set()  # models kept without a node (started on demand)
        self._recovering: set[int] = set()  # nodes whose circuit is half-open
        self._rotation = 0
        self.fair = config.policy == "fair"
        slots = config.headroom_slots
        self.adaptive = self.fair and slots == "auto"
        # A new route's headroom; with "auto", re-estimated for each route every _TICK_S.
        self.headroom = 0 if not self.fair else 1 if slots == "auto" else int(slots)
        self.wait_target = config.headroom_wait_target
        self.window = config.active_window_s
        self._timer = loop.call_later(_TICK_S, self._tick) if self.adaptive else None

    # -- routing table ----------------------------------------------------------------------
    def add_node(self, index: int, capacity: int, weight: float, models: dict[str, str]) -> None:
        self.balancer.add(index, capacity, weight)
        self.node_weights[index] = weight
        self._join(index, models)
        self.dispatch(index)

    def _join(self, index: int, models: dict[str, str]) -> None:
        routes = self._node_routes.setdefault(index, [])
        for public, served in models.items():
            route = self.routes.get(public)
            if route is None:
                route = self.routes[public] = Route(public, self.config.quantum_tokens, self.headroom)
            if index not in route.candidates:
                route.candidates.append(index)
            route.served_names[index] = served
            if route not in routes:
                routes.append(route)

    def _leave(self, index: int, keep: dict[str, str]) -> None:
        """Node ``index`` no longer serves the models not in ``keep``; a model left without a node
        (one no lifecycle keeps, nobody waiting for) is gone from the table."""
        routes = self._node_routes.get(index, [])
        for route in list(routes):
            if route.name in keep:
                continue
            routes.remove(route)
            if index in route.candidates:
                route.candidates.remove(index)
            route.served_names.pop(index, None)
            if not route.candidates and route.name not in self._kept and not route.waiting:
                self.routes.pop(route.name, None)

    def ensure_route(self, model: str) -> Route:
        """A route for a model that has no node yet (one started on demand); kept without nodes."""
        self._kept.add(model)
        route = self.routes.get(model)
        if route is None:
            route = self.routes[model] = Route(model, self.config.quantum_tokens, self.headroom)
        return route

    def update_node(self, index: int, capacity: int, weight: float, models: dict[str, str]) -> None:
        """A node's capacity, weight or models changed at run time (its requests in flight stay)."""
        self.balancer.add(index, capacity, weight)  # a known node: capacity and weight only
        self._leave(index, models)
        self._join(index, models)
        self.dispatch(index)

    def remove_node(self, index: int) -> None:
        self._leave(index, {})
        self._node_routes.pop(index, None)
        self._recovering.discard(index)
        self.balancer.remove(index)
        self.node_weights.pop(index, None)

    def set_healthy(self, index: int, healthy: bool) -> None:
        """Whether new requests may go to the node (its circuit closed, not draining)."""
        self._recovering.discard(index)
        self.balancer.set_healthy(index, healthy)
        if healthy:
            self.dispatch(index)

    def set_trial(self, index: int) -> None:
        """A half-open circuit: one request may go to the node, and requests for its models queue
        meanwhile (its trial decides) instead of being refused."""
        self._recovering.add(index)
        self.balancer.set_trial(index)
        self.dispatch(index)

    def set_load(self, index: int, load: float) -> None:
        """The requests the node reports beyond Shardon's own: the balancer counts them as busy."""
        self.balancer.set_load(index, load)

    def route(self, model: str) -> Route | None:
        return self.routes.get(model)

    def has_healthy_node(self, route: Route) -> bool:
        healthy = self.balancer.healthy
        recovering = self._recovering
        return any(healthy(index) or index in recovering for index in route.candidates)

    # -- fairness -----------------------------------------------------------------------------
    def tenant_key(self, tenant: str) -> str:
        return tenant if self.fair else _FIFO_TENANT

    def _active(self, route: Route, now: float) -> list[str]:
        """Tenants with a request in flight, or one seen within ``active_window_s``."""
        window = self.window
        inflight = route.inflight
        last_seen = route.last_seen
        return [
            name
            for name in last_seen.keys() | inflight.keys()
            if inflight.get(name, 0) > 0 or now - last_seen.get(name, -window) <= window
        ]

    def _slots(self, route: Route) -> int:
        balancer = self.balancer
        return sum(balancer.capacity(i) for i in route.candidates if balancer.healthy(i))

    def _over_share(self, route: Route, tenant: str) -> bool:
        """Whether ``tenant`` holds at least its fair share of the route's slots right now."""
        active = self._active(route, time.monotonic())
        if len(active) <= 1:
            return False
        weights = route.weights
        share = self._slots(route) * weights.get(tenant, 1.0) / sum(weights.get(name, 1.0) for name in active)
        return route.inflight.get(tenant, 0) >= share

    def _restricted(self, route: Route) -> bool:
        headroom = route.headroom
        return headroom > 0 and self.balancer.free_slots(route.candidates) <= headroom

    # -- adaptive headroom ------------------------------------------------------------------------
    def _tick(self) -> None:
        self._timer = self.loop.call_later(_TICK_S, self._tick)
        now = time.monotonic()
        for route in self.routes.values():
            if route.inflight or route.demand or route.waiting:
                self._estimate(route, now)
            else:
                route.busy = 0.0  # idle: the average starts again from the next sample

    def _estimate(self, route: Route, now: float) -> None:
        """Average each tenant's demand (requests in flight or waiting), then size the headroom."""
        waiting: dict[str, int] = {}
        for _priority, name, live in route.queue.snapshot():
            waiting[name] = waiting.get(name, 0) + live
        for name, count in route.held_by.items():
            waiting[name] = waiting.get(name, 0) + count
        inflight = route.inflight
        demand = route.demand
        samples = route.demand_samples
        for name in demand.keys() | inflight.keys() | waiting.keys():
            sample = inflight.get(name, 0) + waiting.get(name, 0)
            n = samples.get(name, 0) + 1
            level = demand.get(name, 0.0)
            level += (sample - level) / n if n < _SAMPLES else _ALPHA * (sample - level)
            if sample == 0 and level < 0.01:
                demand.pop(name, None)
                samples.pop(name, None)
            else:
                demand[name] = level
                samples[name] = min(n, _SAMPLES)
        busy = sum(inflight.values())
        route.busy = busy if not route.busy else route.busy + _ALPHA * (busy - route.busy)
        route.headroom = self._size_headroom(route, now)

    def _size_headroom(self, route: Route, now: float) -> int:
        """The fewest free slots that keep a light tenant's chance of finding none under the target.

        Light tenants are the active ones under their fair share of the slots, on average and now.
        While r slots are kept free, their requests take them at rate lambda and any request that
        ends (rate mu) gives one back, so the slots in use by them are a birth-death chain with
        rho = lambda / mu = (their demand) / (requests in flight) by Little's law, and a light
        request finds none free with probability rho^r (1 - rho) / (1 - rho^(r + 1)).
        """
        active = self._active(route, now)
        if len(active) <= 1:
            return 1  # the rule is off; kept at 1 so a second tenant is covered at once
        slots = self._slots(route)
        weights = route.weights
        total = sum(weights.get(name, 1.0) for name in active)
        demand = route.demand
        inflight = route.inflight
        light = 0.0
        for name in active:
            level = demand.get(name, 0.0)
            share = slots * weights.get(name, 1.0) / total
            if level < share and inflight.get(name, 0) < share:
                light += level
        rho = light / max(route.busy, 1.0)
        target = self.wait_target
        headroom = 1
        while headroom < slots and _none_free(rho, headroom) > target:
            headroom += 1
        return headroom

    # -- admission --------------------------------------------------------------------------
    def admit(self, route: Route, tenant: str, weight: float, affinity: Any = None) -> int:
        """A slot now (the node's index) if nobody of this model waits and one is free for
        ``tenant``; -1 if the request must queue. Notes the tenant as active either way.
        ``affinity``: the request's key for the route's policy."""
        route.last_seen[tenant] = time.monotonic()
        route.weights[tenant] = weight
        if route.held or len(route.queue):
            return -1
        balancer = self.balancer
        policy = route.policy
        if policy is None:
            index = balancer.pick(route.candidates, None)
        else:
            index = policy.pick(self, route.candidates, affinity)
        if index < 0:
            return -1
        headroom = route.headroom
        if headroom and balancer.free_slots(route.candidates) <= headroom and self._over_share(route, tenant):
            return -1
        balancer.acquire(index)
        if policy is not None:
            policy.placed(affinity, index)
        inflight = route.inflight
        inflight[tenant] = inflight.get(tenant, 0) + 1
        return index

    def take(self, route: Route, tenant: str, exclude: list[int] | None) -> int:
        """A slot for a retry (already admitted once): prefer a node not in ``exclude``; -1 if none."""
        index = self.balancer.pick(route.candidates, exclude)
        if index < 0 and exclude:
            index = self.balancer.pick(route.candidates, None)
        if index >= 0:
            self.balancer.acquire(index)
            route.inflight[tenant] = route.inflight.get(tenant, 0) + 1
        return index

    def enqueue(
        self, route: Route, priority: int, tenant: str, cost: float, weight: float, timeout: float, affinity: Any = None
    ) -> Waiter:
        if not self.has_healthy_node(route):
            raise errors.NoCapacity(f"no healthy node serves model '{route.name}'", retry_after=5)
        queued = route.waiting
        if queued >= self.config.max_queue_size:
            raise errors.QueueFull(
                f"the queue for model '{route.name}' is full ({queued} waiting)",
                retry_after=self.retry_after(route),
            )
        waiter = Waiter(route, self.loop.create_future(), priority, tenant, cost, affinity)
        waiter.handle = route.queue.push(waiter, priority, self.tenant_key(tenant), cost, weight)
        waiter.timer = self.loop.call_later(timeout, self._expire, waiter, timeout)
        # A slot may be free for this request (headroom kept for tenants under their share).
        while self._serve_one(route):
            pass
        return waiter

    def retry_after(self, route: Route) -> float:
        slots = sum(self.balancer.capacity(i) for i in route.candidates) or 1
        return min(60.0, max(1.0, route.service_ewma * route.waiting / slots))

    def _unlink(self, waiter: Waiter) -> bool:
        """Take a waiting (queued or held) request out; False if it already got a slot."""
        if waiter.held:
            try:
                waiter.route.held.remove(waiter)
            except ValueError:
                return False
            _count_out(waiter.route.held_by, waiter.tenant)
            waiter.held = False
            return True
        return waiter.route.queue.remove(waiter.handle)

    def _expire(self, waiter: Waiter, timeout: float) -> None:
        if self._unlink(waiter) and not waiter.future.done():
            waiter.future.set_exception(
                errors.QueueTimeout(f"no capacity for model '{waiter.route.name}' within {timeout:g}s")
            )

    def cancel(self, waiter: Waiter, exc: BaseException) -> bool:
        """Take a still-waiting request out (client gone, shutdown); False if it already has a slot."""
        if self._unlink(waiter):
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return True
        return False

    def cancel_all(self, exc: BaseException) -> int:
        """Take every waiting request out, failing it with ``exc`` (the drain timeout); how many."""
        count = 0
        for route in self.routes.values():
            waiters = list(route.held)
            route.held.clear()
            while (waiter := route.queue.pop()) is not None:
                waiters.append(waiter)  # type: ignore[arg-type]  # the queue holds Waiters
            for waiter in waiters:
                waiter.held = False
                if waiter.timer is not None:
                    waiter.timer.cancel()
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
                    count += 1
        return count

    def abandon(self, waiter: Waiter) -> None:
        """The waiting coroutine gave up after its future may have been resolved: free that slot."""
        fut = waiter.future
        if fut.done():
            if not fut.cancelled() and fut.exception() is None:
                self.release(fut.result(), waiter.route, waiter.tenant)
        else:
            fut.cancel()
            if self._unlink(waiter) and waiter.timer is not None:
                waiter.timer.cancel()

    # -- dispatch ---------------------------------------------------------------------------
    def release(self, index: int, route: Route, tenant: str, service_s: float | None = None) -> None:
        """Free the slot; ``service_s`` (how long the request held it) feeds ``Retry-After`` estimates."""
        self.balancer.release(index)
        if service_s is not None:
            route.service_ewma += 0.1 * (service_s - route.service_ewma)
        inflight = route.inflight
        left = inflight.get(tenant, 0) - 1
        if left > 0:
            inflight[tenant] = left
        else:
            inflight.pop(tenant, None)
        routes = self._node_routes.get(index)
        if routes is not None and (len(routes) > 1 or routes[0].held or len(routes[0].queue)):
            self.dispatch(index)

    def _give(self, waiter: Waiter, index: int) -> None:
        route = waiter.route
        policy = route.policy
        if policy is not None:
            # The policy's choice among the free nodes (one is free: ``index``).
            chosen = policy.pick(self, route.candidates, waiter.affinity)
            if chosen >= 0:
                index = chosen
        self.balancer.acquire(index)
        if policy is not None:
            policy.placed(waiter.affinity, index)
        route.inflight[waiter.tenant] = route.inflight.get(waiter.tenant, 0) + 1
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.future.set_result(index)

    def _serve_one(self, route: Route) -> bool:
        """Give one free slot of ``route`` to its next eligible waiter; False if none can go now."""
        if not route.waiting:
            return False
        index = self.balancer.pick(route.candidates, None)
        if index < 0:
            return False
        restricted = self._restricted(route)
        held = route.held
        if (
            held
            and held[0].priority >= route.queue.top_priority()
            and (not restricted or not self._over_share(route, held[0].tenant))
        ):
            waiter = held.popleft()
            waiter.held = False
            _count_out(route.held_by, waiter.tenant)
            self._give(waiter, index)
            return True
        queue = route.queue
        while True:
            waiter = queue.pop()  # type: ignore[assignment]  # the queue holds Waiters
            if waiter is None:
                return False
            if restricted and self._over_share(route, waiter.tenant):
                waiter.held = True
                held.append(waiter)
                held_by = route.held_by
                held_by[waiter.tenant] = held_by.get(waiter.tenant, 0) + 1
                continue
            self._give(waiter, index)
            return True

    def dispatch(self, index: int) -> None:
        """Hand free slots reachable through node ``index`` to waiting requests."""
        routes = self._node_routes.get(index)
        if not routes:
            return
        n = len(routes)
        if n == 1:
            route = routes[0]
            while self._serve_one(route):
                pass
            return
        candidates = list(routes)
        while candidates:
            # The model whose queue holds the highest priority goes first; ties rotate.
            self._rotation += 1
            start = self._rotation % len(candidates)
            ordered = candidates[start:] + candidates[:start]
            best = max(ordered, key=_top_priority)
            if best.waiting == 0:
                return
            if not self._serve_one(best):
                candidates.remove(best)

    def queue_depths(self) -> dict[str, int]:
        return {name: route.waiting for name, route in self.routes.items()}


def _count_out(counts: dict[str, int], name: str) -> None:
    left = counts.get(name, 0) - 1
    if left > 0:
        counts[name] = left
    else:
        counts.pop(name, None)


def _none_free(rho: float, slots: int) -> float:
    """P(all ``slots`` taken) in a birth-death chain of ``slots`` places with ratio ``rho``."""
    if rho >= 1.0:
        return 1.0
    return rho**slots * (1.0 - rho) / (1.0 - rho ** (slots + 1))


def _top_priority(route: Route) -> int:
    top = route.queue.top_priority()
    if route.held:
        top = max(top, route.held[0].priority)
    return top
