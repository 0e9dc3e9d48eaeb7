"""A literal model of FairQueue's start-time fair queueing, for exact comparisons in the tests."""

from __future__ import annotations

import math
from typing import Any


class NaiveFairQueue:
    """The queue's rules spelled out with dicts and lists, no heap.

    Per class a virtual time; per (class, tenant) a FIFO and a tag. ``pop`` serves the waiting tenant
    with the smallest (tag, join number), raises the virtual time to its tag and moves the tag on by
    cost / weight. A tenant that gets its first entry starts at max(its tag, vtime - quantum); a
    refund moves the tag back by amount / weight, not below vtime - quantum while it waits.
    """

    def __init__(self, quantum: float) -> None:
        self.quantum = quantum
        self.vtime = [0.0, 0.0, 0.0, 0.0]
        self.fifo: dict[tuple[int, str], list[tuple[int, object, float]]] = {}
        self.tag: dict[tuple[int, str], float] = {}
        self.joined: dict[tuple[int, str], int] = {}
        self.weight: dict[str, float] = {}
        self.next_handle = 1
        self.next_join = 1

    def push(self, item: object, priority: int, tenant: str, cost: float, weight: float = 1.0) -> int:
        self.weight[tenant] = weight
        key = (priority, tenant)
        if not self.fifo.get(key):
            self.fifo[key] = []
            self.tag[key] = max(self.tag.get(key, -math.inf), self.vtime[priority] - self.quantum)
            self.joined[key] = self.next_join
            self.next_join += 1
        handle = self.next_handle
        self.next_handle += 1
        self.fifo[key].append((handle, item, cost))
        return handle

    def _waiting(self, priority: int) -> list[str]:
        keys = [t for (p, t), entries in self.fifo.items() if p == priority and entries]
        return sorted(keys, key=lambda t: (self.tag[(priority, t)], self.joined[(priority, t)]))

    def pop(self) -> object | None:
        for p in (3, 2, 1, 0):
            if self._waiting(p):
                break
        else:
            return None
        tenant = self._waiting(p)[0]
        key = (p, tenant)
        _, item, cost = self.fifo[key].pop(0)
        self.vtime[p] = max(self.vtime[p], self.tag[key])
        self.tag[key] += cost / self.weight[tenant]
        return item

    def remove(self, handle: int) -> bool:
        for entries in self.fifo.values():
            for i, entry in enumerate(entries):
                if entry[0] == handle:
                    entries.pop(i)
                    return True
        return False

    def refund(self, tenant: str, priority: int, amount: float) -> None:
        key = (priority, tenant)
        if key not in self.tag:
            return
        self.tag[key] -= amount / self.weight[tenant]
        if self.fifo[key]:
            self.tag[key] = max(self.tag[key], self.vtime[priority] - self.quantum)

    def __len__(self) -> int:
        return sum(len(v) for v in self.fifo.values())

    def len_class(self, priority: int) -> int:
        return sum(len(v) for (p, _), v in self.fifo.items() if p == priority)

    def snapshot(self) -> list[tuple[int, str, int]]:
        return [(p, t, len(self.fifo[(p, t)])) for p in (3, 2, 1, 0) for t in self._waiting(p)]


def drain(q: Any) -> list[Any]:
    """Pop until empty."""
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out
