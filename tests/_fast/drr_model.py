"""A literal model of FairQueue's DRR, for exact comparisons in the tests."""

from __future__ import annotations

from typing import Any


class NaiveFairQueue:
    """The queue's rules spelled out with lists, visiting every round one by one.

    A tenant joins its class's ring just behind the cursor with one quantum of deficit; pop serves
    the tenant under the cursor if its deficit covers its head entry, else credits it a quantum and
    moves on; a tenant that runs out of entries leaves and its deficit is forgotten.
    """

    def __init__(self, quantum: float) -> None:
        self.quantum = quantum
        self.rings: list[list[str]] = [[], [], [], []]
        self.cursor = [0, 0, 0, 0]
        self.fifo: dict[tuple[int, str], list[tuple[int, object, float]]] = {}
        self.deficit: dict[tuple[int, str], float] = {}
        self.weight: dict[str, float] = {}
        self.next_handle = 1

    def push(self, item: object, priority: int, tenant: str, cost: float, weight: float = 1.0) -> int:
        self.weight[tenant] = weight
        key = (priority, tenant)
        if not self.fifo.get(key):
            self.fifo[key] = []
            self.deficit[key] = self.quantum * weight
            ring = self.rings[priority]
            if not ring:
                ring.append(tenant)
                self.cursor[priority] = 0
            else:
                ring.insert(self.cursor[priority], tenant)
                self.cursor[priority] += 1
        handle = self.next_handle
        self.next_handle += 1
        self.fifo[key].append((handle, item, cost))
        return handle

    def _leave(self, priority: int, tenant: str) -> None:
        ring = self.rings[priority]
        i = ring.index(tenant)
        ring.pop(i)
        if i < self.cursor[priority]:
            self.cursor[priority] -= 1
        if self.cursor[priority] >= len(ring):
            self.cursor[priority] = 0
        del self.deficit[(priority, tenant)]

    def pop(self) -> object | None:
        for p in (3, 2, 1, 0):
            if self.rings[p]:
                break
        else:
            return None
        ring = self.rings[p]
        while True:
            tenant = ring[self.cursor[p]]
            key = (p, tenant)
            _, item, cost = self.fifo[key][0]
            if self.deficit[key] >= cost:
                self.deficit[key] -= cost
                self.fifo[key].pop(0)
                if not self.fifo[key]:
                    self._leave(p, tenant)
                return item
            self.deficit[key] += self.quantum * self.weight[tenant]
            self.cursor[p] = (self.cursor[p] + 1) % len(ring)

    def remove(self, handle: int) -> bool:
        for (p, tenant), entries in self.fifo.items():
            for i, entry in enumerate(entries):
                if entry[0] == handle:
                    entries.pop(i)
                    if not entries:
                        self._leave(p, tenant)
                    return True
        return False

    def refund(self, tenant: str, priority: int, amount: float) -> None:
        key = (priority, tenant)
        if self.fifo.get(key):
            self.deficit[key] += amount

    def __len__(self) -> int:
        return sum(len(v) for v in self.fifo.values())

    def len_class(self, priority: int) -> int:
        return sum(len(v) for (p, _), v in self.fifo.items() if p == priority)

    def snapshot(self) -> list[tuple[int, str, int]]:
        out = []
        for p in (3, 2, 1, 0):
            ring = self.rings[p]
            for k in range(len(ring)):
                tenant = ring[(self.cursor[p] + k) % len(ring)]
                out.append((p, tenant, len(self.fifo[(p, tenant)])))
        return out


def drain(q: Any) -> list[Any]:
    """Pop until empty."""
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out
