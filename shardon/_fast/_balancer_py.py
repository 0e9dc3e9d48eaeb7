"""Pure-Python twin of :mod:`shardon._fast._balancer_c`: the readable reference.

LeastConnBalancer keeps, per backend node (a small int id, 0..MAX_NODE_ID, chosen by the caller), its
capacity (concurrent requests it accepts), weight, health, the number of requests in flight and the
load the node reports beyond them (other clients' requests), and picks a node for the next request by
least connections:

* eligible: the id is known, the node is healthy (routable), ``inflight < capacity`` and the id is not
  in ``exclude`` (the nodes a retry has already tried);
* best: the smallest ``(inflight + load) / weight``; a node of weight 2 gets twice the connections of
  one of weight 1 before it looks as busy, and a node that others keep busy gets less;
* ties: broken round robin. Every ``pick`` starts scanning the candidate list one place further along
  (a counter modulo its length) and keeps the first best node it meets, so nodes that stay equal take
  turns instead of the first one taking everything.

``pick`` only chooses; the caller then calls ``acquire`` on the chosen node and ``release`` when the
request ends. ``set_trial`` makes a node eligible for exactly one more ``acquire`` (a circuit
breaker's half-open trial): that acquire takes its health away again.

Unknown ids are skipped by ``pick`` and ``free_slots``, ignored by ``release`` and
``remove``, read as 0 / False by ``inflight``, ``capacity`` and ``healthy``, and rejected (KeyError)
by ``acquire``, ``set_healthy``, ``set_trial``, ``set_capacity`` and ``set_load``.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from operator import index

__all__ = ["MAX_NODE_ID", "LeastConnBalancer"]

MAX_NODE_ID = 65535


class _Node:
    __slots__ = ("capacity", "healthy", "inflight", "load", "trial", "weight")

    def __init__(self, capacity: int, weight: float) -> None:
        self.capacity = capacity
        self.weight = weight
        self.healthy = True
        self.trial = False
        self.inflight = 0
        self.load = 0.0


def _check(node: int, capacity: int, weight: float) -> None:
    if not 0 <= node <= MAX_NODE_ID:
        raise ValueError(f"node id must be 0..{MAX_NODE_ID}, got {node!r}")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity!r}")
    if not 0.0 < weight < math.inf:
        raise ValueError(f"weight must be a positive finite number, got {weight!r}")


class LeastConnBalancer:
    __slots__ = ("_nodes", "_rr")

    def __reduce__(self) -> str | tuple[object, ...]:
        # Live scheduling state belongs to one process; like the compiled class, refuse to pickle.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {}
        self._rr = 0

    def add(self, node: int, capacity: int, weight: float = 1.0) -> None:
        """Add a node (healthy, nothing in flight); re-adding one updates capacity and weight only."""
        node = index(node)
        capacity = index(capacity)
        weight = float(weight)
        _check(node, capacity, weight)
        n = self._nodes.get(node)
        if n is None:
            self._nodes[node] = _Node(capacity, weight)
        else:
            n.capacity = capacity
            n.weight = weight

    def remove(self, node: int) -> None:
        self._nodes.pop(node, None)

    def _get(self, node: int) -> _Node:
        n = self._nodes.get(node)
        if n is None:
            raise KeyError(node)
        return n

    def set_healthy(self, node: int, healthy: bool) -> None:
        n = self._get(node)
        n.healthy = bool(healthy)
        n.trial = False

    def set_trial(self, node: int) -> None:
        """Eligible for one more ``acquire`` only: it makes the node unhealthy again."""
        n = self._get(node)
        n.healthy = True
        n.trial = True

    def trial(self, node: int) -> bool:
        """Whether the node waits for its one trial ``acquire``."""
        n = self._nodes.get(node)
        return n is not None and n.trial

    def healthy(self, node: int) -> bool:
        n = self._nodes.get(node)
        return n is not None and n.healthy

    def set_capacity(self, node: int, capacity: int) -> None:
        capacity = index(capacity)
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity!r}")
        self._get(node).capacity = capacity

    def set_load(self, node: int, load: float) -> None:
        """The requests the node reports beyond this balancer's own (>= 0), counted like in-flight ones."""
        load = float(load)
        if not 0.0 <= load < math.inf:
            raise ValueError(f"load must be a finite number >= 0, got {load!r}")
        self._get(node).load = load

    def load(self, node: int) -> float:
        n = self._nodes.get(node)
        return 0.0 if n is None else n.load

    def pick(self, candidates: Sequence[int], exclude: Container[int] | None = None) -> int:
        """The eligible candidate with the fewest connections per weight; -1 if there is none."""
        count = len(candidates)
        if count == 0:
            return -1
        nodes = self._nodes
        start = self._rr % count
        self._rr += 1
        best = -1
        best_score = math.inf
        for i in range(count):
            j = start + i
            if j >= count:
                j -= count
            node = candidates[j]
            n = nodes.get(node)
            if n is None or not n.healthy or n.inflight >= n.capacity:
                continue
            score = (n.inflight + n.load) / n.weight
            if score < best_score and (exclude is None or node not in exclude):
                best = node
                best_score = score
        return best

    def acquire(self, node: int) -> None:
        n = self._get(node)
        n.inflight += 1
        if n.trial:
            n.trial = False
            n.healthy = False

    def release(self, node: int) -> None:
        n = self._nodes.get(node)
        if n is not None and n.inflight > 0:
            n.inflight -= 1

    def inflight(self, node: int) -> int:
        n = self._nodes.get(node)
        return 0 if n is None else n.inflight

    def capacity(self, node: int) -> int:
        n = self._nodes.get(node)
        return 0 if n is None else n.capacity

    def free_slots(self, candidates: Sequence[int]) -> int:
        """Free slots summed over the healthy known candidates."""
        total = 0
        nodes = self._nodes
        for node in candidates:
            n = nodes.get(node)
            if n is not None and n.healthy and n.inflight < n.capacity:
                total += n.capacity - n.inflight
        return total
