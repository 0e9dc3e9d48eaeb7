"""Admission and dispatch: who gets the next free slot on which node.

Each public model has a :class:`Route`: the nodes that serve it and one ``FairQueue`` (priority
classes, then deficit round robin across tenants, then FIFO). A request takes a slot at once when its
model's queue is empty and the least-loaded healthy node has room; otherwise it waits in the queue
as a :class:`Waiter` until

- a slot frees on one of its nodes (:meth:`Scheduler.release` hands it over before returning, so a
  freed slot never sits idle while someone waits),
- its deadline passes (``QueueTimeout``, 504), or
- its client leaves (:meth:`Scheduler.cancel`, O(1) removal from the queue).

A node's cap is never exceeded: slots are only taken through the balancer, which refuses a node at
its ``max_concurrent``. When a node serves several models, a freed slot goes to the model whose
queue holds the highest priority; ties rotate between models.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from . import errors
from ._fast import FairQueue, LeastConnBalancer
from .config import SchedulerConfig


class Route:
    __slots__ = ("candidates", "name", "queue", "served_names", "service_ewma")

    def __init__(self, name: str, quantum: float) -> None:
        self.name = name
        self.candidates: list[int] = []
        self.served_names: dict[int, str] = {}
        self.queue = FairQueue(quantum)
        self.service_ewma = 1.0


class Waiter:
    __slots__ = ("cost", "future", "handle", "priority", "route", "tenant", "timer")

    def __init__(self, route: Route, future: asyncio.Future[int], priority: int, tenant: str, cost: float) -> None:
        self.route = route
        self.future = future
        self.priority = priority
        self.tenant = tenant
        self.cost = cost
        self.handle = -1
        self.timer: asyncio.TimerHandle | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, balancer: LeastConnBalancer, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.balancer = balancer
        self.loop = loop
        self.routes: dict[str, Route] = {}
        self._node_routes: dict[int, list[Route]] = {}
        self._rotation = 0

    # -- routing table ----------------------------------------------------------------------
    def add_node(self, index: int, capacity: int, weight: float, models: dict[str, str]) -> None:
        self.balancer.add(index, capacity, weight)
        routes = self._node_routes.setdefault(index, [])
        for public, served in models.items():
            route = self.routes.get(public)
            if route is None:
                route = self.routes[public] = Route(public, self.config.quantum_tokens)
            if index not in route.candidates:
                route.candidates.append(index)
            route.served_names[index] = served
            if route not in routes:
                routes.append(route)
        self.dispatch(index)

    def remove_node(self, index: int) -> None:
        for route in self._node_routes.pop(index, []):
            if index in route.candidates:
                route.candidates.remove(index)
            route.served_names.pop(index, None)
        self.balancer.remove(index)

    def set_healthy(self, index: int, healthy: bool) -> None:
        self.balancer.set_healthy(index, healthy)
        if healthy:
            self.dispatch(index)

    def route(self, model: str) -> Route | None:
        return self.routes.get(model)

    def has_healthy_node(self, route: Route) -> bool:
        healthy = self.balancer.healthy
        return any(healthy(index) for index in route.candidates)

    # -- admission --------------------------------------------------------------------------
    def try_acquire(self, route: Route, exclude: Iterable[int] | None = None) -> int:
        """Take a slot now if nobody of this model is waiting; -1 if the request must queue."""
        if len(route.queue):
            return -1
        index = self.balancer.pick(route.candidates, exclude)
        if index >= 0:
            self.balancer.acquire(index)
        return index

    def enqueue(self, route: Route, priority: int, tenant: str, cost: float, weight: float, timeout: float) -> Waiter:
        if not self.has_healthy_node(route):
            raise errors.NoCapacity(f"no healthy node serves model '{route.name}'", retry_after=5)
        queued = len(route.queue)
        if queued >= self.config.max_queue_size:
            raise errors.QueueFull(
                f"the queue for model '{route.name}' is full ({queued} waiting)",
                retry_after=self.retry_after(route),
            )
        waiter = Waiter(route, self.loop.create_future(), priority, tenant, cost)
        waiter.handle = route.queue.push(waiter, priority, tenant, cost, weight)
        waiter.timer = self.loop.call_later(timeout, self._expire, waiter, timeout)
        return waiter

    def retry_after(self, route: Route) -> float:
        slots = sum(self.balancer.capacity(i) for i in route.candidates) or 1
        return min(60.0, max(1.0, route.service_ewma * len(route.queue) / slots))

    def _expire(self, waiter: Waiter, timeout: float) -> None:
        if waiter.route.queue.remove(waiter.handle) and not waiter.future.done():
            waiter.future.set_exception(
                errors.QueueTimeout(f"no capacity for model '{waiter.route.name}' within {timeout:g}s")
            )

    def cancel(self, waiter: Waiter, exc: BaseException) -> bool:
        """Take a still-queued waiter out (client gone, shutdown); False if it already has a slot."""
        if waiter.route.queue.remove(waiter.handle):
            if waiter.timer is not None:
                waiter.timer.cancel()
            if not waiter.future.done():
                waiter.future.set_exception(exc)
            return True
        return False

    def abandon(self, waiter: Waiter) -> None:
        """The waiting coroutine gave up after its future may have been resolved: free that slot."""
        fut = waiter.future
        if fut.done():
            if not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
        else:
            fut.cancel()
            if waiter.route.queue.remove(waiter.handle) and waiter.timer is not None:
                waiter.timer.cancel()

    # -- dispatch ---------------------------------------------------------------------------
    def release(self, index: int) -> None:
        self.balancer.release(index)
        self.dispatch(index)

    def dispatch(self, index: int) -> None:
        """Hand free slots reachable through node ``index`` to waiting requests."""
        routes = self._node_routes.get(index)
        if not routes:
            return
        balancer = self.balancer
        n = len(routes)
        while True:
            best: Route | None = None
            best_priority = -1
            start = self._rotation % n
            for k in range(n):
                route = routes[(start + k) % n]
                top = route.queue.top_priority()
                if top > best_priority:
                    best, best_priority = route, top
            if best is None:
                return
            target = balancer.pick(best.candidates, None)
            if target < 0:
                return
            self._rotation += 1
            waiter: Waiter = best.queue.pop()
            balancer.acquire(target)
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.future.set_result(target)

    def note_service_time(self, route: Route, seconds: float) -> None:
        route.service_ewma += 0.1 * (seconds - route.service_ewma)

    def queue_depths(self) -> dict[str, int]:
        return {name: len(route.queue) for name, route in self.routes.items()}

    def wake_all(self) -> None:
        for index in list(self._node_routes):
            self.dispatch(index)
