"""Overflow by deadline: when a request goes to a model's remote endpoint instead of its queue.

Only a request that would queue is considered, and it overflows only when

- no local node of the model is healthy (every circuit open), or
- the wait it would have in the queue, estimated from the current service rate, passes its
  deadline (the overflow's ``deadline_s``, or what is left of the queue deadline);

and only for a caller it allows: a tenant in ``tenants`` (all when omitted), a key without
``overflow: false``. The endpoint is a node of the registry (health, circuit, connection pool like
any other) that is no candidate of any route, so nothing but this rule sends it a request; its
``max_concurrent`` caps what it is sent, and past that the request queues locally.
"""

from __future__ import annotations

import math
from typing import Any

from .config import OverflowConfig
from .policies import eligible

__all__ = ["Overflow", "estimated_wait"]


class Overflow:
    __slots__ = ("deadline", "index", "model", "node_id", "served", "tenants")

    def __init__(self, model: str, config: OverflowConfig, node_id: str, index: int) -> None:
        self.model = model
        self.node_id = node_id
        self.index = index  # the endpoint's node index
        self.served = config.model or model  # the name the endpoint knows the model by
        self.tenants = None if config.tenants is None else frozenset(config.tenants)
        self.deadline = config.deadline_s

    def allows(self, principal: Any) -> bool:
        """Whether this caller's requests may overflow."""
        if not principal.overflow:
            return False
        tenants = self.tenants
        return tenants is None or principal.tenant.name in tenants

    def admit(self, ex: Any) -> bool:
        """Whether exchange ``ex``, which would queue, goes to the endpoint: it is needed and a slot
        there was taken (`Exchange.admit` then holds it)."""
        scheduler = ex.core.scheduler
        return self.needed(scheduler, ex.route, ex.budget) and self.take(scheduler.balancer)

    def needed(self, scheduler: Any, route: Any, budget: float) -> bool:
        """Whether a request that would join ``route``'s queue now, with ``budget`` seconds left of
        its deadline, should go to the endpoint instead."""
        if not scheduler.has_healthy_node(route):
            return True
        deadline = budget if self.deadline is None else min(budget, self.deadline)
        return estimated_wait(scheduler, route) > deadline

    def take(self, balancer: Any) -> bool:
        """A slot on the endpoint, if it is healthy and below its cap."""
        index = self.index
        if not eligible(balancer, index):
            return False
        balancer.acquire(index)
        return True


def estimated_wait(scheduler: Any, route: Any) -> float:
    """The wait of a request joining ``route``'s queue now: the requests ahead of it and itself,
    served at the route's current rate (its healthy nodes' slots over the mean service time)."""
    balancer = scheduler.balancer
    slots = 0
    for index in route.candidates:
        if balancer.healthy(index):
            slots += balancer.capacity(index)
    if slots == 0:
        return math.inf
    return float((route.waiting + 1) * route.service_ewma / slots)
