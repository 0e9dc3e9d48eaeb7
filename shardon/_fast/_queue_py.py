"""Pure-Python twin of :mod:`shardon._fast._queue_c`: the readable reference.

FairQueue orders the requests waiting for one model.

* Priority classes 0..3 (low, normal, high, critical) are strict: ``pop`` serves the highest non-empty
  class; a lower class waits as long as a higher one has anything.
* Inside a class, tenants share by deficit round robin (DRR, Shreedhar & Varghese 1995) weighted by
  tenant weight. The cost of an entry is a float (estimated tokens); entries of one tenant leave in
  FIFO order.

DRR as implemented here (the compiled module does exactly the same, operation for operation, so
both give the same results down to the last bit of every deficit):

* Each class keeps a ring of *active* tenants (tenants with live entries there) and a cursor.
  A tenant joins the ring just behind the cursor (last in the current round) with a deficit of one
  quantum, ``quantum * weight``; it leaves as soon as it has no live entry, and its deficit resets to 0.
* ``pop`` looks at the tenant under the cursor. If its deficit covers the cost of its head entry, the
  entry is served and the cost is taken from the deficit; the cursor stays, so a tenant spends its
  whole deficit before the ring moves on. Otherwise the tenant is credited one quantum (for its
  next turn) and the cursor moves to the next tenant.
* When costs are much larger than the quantum, a whole pass over the ring may serve nobody. Instead
  of going round again and again, ``pop`` then computes the smallest number of whole rounds ``r``
  after which some tenant can pay for its head entry, ``r = min(ceil((cost - deficit) / q))``, and
  credits every tenant ``r * q`` at once: the same state as going round ``r`` times, in one step.
  A ``pop`` therefore visits at most about two passes of the ring, whatever the costs.

Fairness: while tenants stay backlogged, at the start of each tenant's turn every pair has received
the same number of quanta, so ``served_a / w_a`` and ``served_b / w_b`` differ by less than one
max-cost (divided by the smaller weight); at any instant by less than that plus one quantum.

A tenant without live entries keeps its (empty, inactive) record so that a tenant whose queue keeps
emptying does not rebuild it on every push; idle records are dropped in one sweep once they are more
than 1,024 and more than half of all records (amortised O(1)).

Cancellation (``remove``) marks the entry dead (a tombstone) and drops its item at once; ``len``,
``len_class`` and ``tenants_waiting`` change at once. Tombstones are purged as soon as they reach the
head of their tenant's FIFO (popped past), all of them go when the FIFO has no live entry left, and a
FIFO is rebuilt without them once they outnumber its live entries (and are more than 32): a FIFO
never holds more than about twice its live entries, whatever the churn of cancellations.
(The compiled module unlinks cancelled entries at once and has no tombstones.)
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["FairQueue"]

_NUM_CLASSES = 4
_INF = math.inf
_IDLE_MIN = 1024
_COMPACT_MIN = 32


class _Entry:
    __slots__ = ("alive", "cost", "handle", "item", "lane")

    def __init__(self, item: object, cost: float, lane: _Lane, handle: int) -> None:
        self.item = item
        self.cost = cost
        self.lane = lane
        self.handle = handle
        self.alive = True


class _Tenant:
    __slots__ = ("active", "lanes", "name", "weight")

    def __init__(self, name: str, weight: float) -> None:
        self.name = name
        self.weight = weight
        self.active = 0  # number of classes where this tenant is in the ring
        self.lanes: list[_Lane | None] = [None] * _NUM_CLASSES


class _Lane:
    """One tenant inside one priority class: its FIFO, its deficit and its place in the ring."""

    __slots__ = ("active", "dead", "deficit", "fifo", "live", "next", "prev", "priority", "tenant")

    def __init__(self, tenant: _Tenant, priority: int) -> None:
        self.tenant = tenant
        self.priority = priority
        self.fifo: deque[_Entry] = deque()  # head is always a live entry while the lane is active
        self.live = 0
        self.dead = 0  # tombstones in fifo
        self.deficit = 0.0
        self.active = False
        self.prev: _Lane = self
        self.next: _Lane = self


class _Ring:
    __slots__ = ("count", "cursor", "size")

    def __init__(self) -> None:
        self.cursor: _Lane | None = None
        self.size = 0  # active tenants
        self.count = 0  # live entries


class FairQueue:
    """Strict priority classes; weighted deficit round robin across tenants inside a class."""

    __slots__ = ("_handles", "_idle", "_len", "_next_handle", "_quantum", "_rings", "_tenants")

    def __reduce__(self) -> str | tuple[object, ...]:
        # Live scheduling state belongs to one process; like the compiled class, refuse to pickle.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __init__(self, quantum: float = 1024.0) -> None:
        quantum = float(quantum)
        if not 0.0 < quantum < _INF:
            raise ValueError(f"quantum must be a positive finite number, got {quantum!r}")
        self._quantum = quantum
        self._rings = tuple(_Ring() for _ in range(_NUM_CLASSES))
        self._tenants: dict[str, _Tenant] = {}
        self._handles: dict[int, _Entry] = {}
        self._idle = 0  # tenants kept in _tenants without live entries
        self._next_handle = 1
        self._len = 0

    @property
    def quantum(self) -> float:
        return self._quantum

    # -- queries -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def len_class(self, priority: int) -> int:
        return self._ring(priority).count

    def tenants_waiting(self, priority: int) -> int:
        return self._ring(priority).size

    def top_priority(self) -> int:
        rings = self._rings
        for p in range(_NUM_CLASSES - 1, -1, -1):
            if rings[p].count:
                return p
        return -1

    def snapshot(self) -> list[tuple[int, str, int]]:
        """(priority, tenant, live entries) per active tenant: classes high to low, ring order."""
        out: list[tuple[int, str, int]] = []
        for p in range(_NUM_CLASSES - 1, -1, -1):
            ring = self._rings[p]
            lane = ring.cursor
            for _ in range(ring.size):
                assert lane is not None
                out.append((p, lane.tenant.name, lane.live))
                lane = lane.next
        return out

    # -- mutations ---------------------------------------------------------------------------------

    def push(self, item: object, priority: int, tenant: str, cost: float, weight: float = 1.0) -> int:
        ring = self._ring(priority)
        cost = float(cost)
        weight = float(weight)
        if not 0.0 <= cost < _INF:
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if not 0.0 < weight < _INF or not 0.0 < self._quantum * weight < _INF:
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant(tenant, weight)
        else:
            t.weight = weight
            if t.active == 0:
                self._idle -= 1
        lane = t.lanes[priority]
        if lane is None:
            lane = t.lanes[priority] = _Lane(t, priority)
        handle = self._next_handle
        self._next_handle = handle + 1
        entry = _Entry(item, cost, lane, handle)
        lane.fifo.append(entry)
        lane.live += 1
        if not lane.active:
            self._join(ring, lane)
        self._handles[handle] = entry
        ring.count += 1
        self._len += 1
        return handle

    def pop(self) -> object | None:
        p = self.top_priority()
        if p < 0:
            return None
        ring = self._rings[p]
        lane = ring.cursor
        assert lane is not None
        misses = 0
        while True:
            head = lane.fifo[0]
            if lane.deficit >= head.cost:
                lane.deficit -= head.cost
                self._take_head(ring, lane)
                del self._handles[head.handle]
                item = head.item
                head.item = None
                head.alive = False
                return item
            # Cannot pay this turn: credit the quantum for the next turn and move on.
            lane.deficit += self._quantum * lane.tenant.weight
            lane = lane.next
            ring.cursor = lane
            misses += 1
            if misses == ring.size:
                # A full pass served nobody: skip the idle rounds in one step.
                self._skip_rounds(ring)
                misses = 0

    def remove(self, handle: int) -> bool:
        entry = self._handles.pop(handle, None)
        if entry is None:
            return False
        entry.alive = False
        entry.item = None
        lane = entry.lane
        ring = self._rings[lane.priority]
        lane.live -= 1
        ring.count -= 1
        self._len -= 1
        if lane.live == 0:
            self._leave(ring, lane)
        else:
            lane.dead += 1
            self._purge(lane)
        return True

    def refund(self, tenant: str, priority: int, amount: float) -> None:
        self._ring(priority)
        amount = float(amount)
        if not -_INF < amount < _INF:
            raise ValueError(f"amount must be finite, got {amount!r}")
        t = self._tenants.get(tenant)
        if t is None:
            return
        lane = t.lanes[priority]
        if lane is not None and lane.active:
            lane.deficit += amount

    # -- internals ---------------------------------------------------------------------------------

    def _ring(self, priority: int) -> _Ring:
        if not 0 <= priority < _NUM_CLASSES:
            raise ValueError(f"priority must be 0..3, got {priority!r}")
        return self._rings[priority]

    def _join(self, ring: _Ring, lane: _Lane) -> None:
        lane.active = True
        lane.deficit = self._quantum * lane.tenant.weight
        cursor = ring.cursor
        if cursor is None:
            lane.prev = lane.next = lane
            ring.cursor = lane
        else:  # just behind the cursor: last in the current round
            last = cursor.prev
            lane.prev = last
            lane.next = cursor
            last.next = lane
            cursor.prev = lane
        ring.size += 1
        lane.tenant.active += 1

    def _leave(self, ring: _Ring, lane: _Lane) -> None:
        if ring.size == 1:
            ring.cursor = None
        else:
            if ring.cursor is lane:
                ring.cursor = lane.next
            lane.prev.next = lane.next
            lane.next.prev = lane.prev
        lane.prev = lane.next = lane
        lane.active = False
        lane.deficit = 0.0
        lane.fifo.clear()
        lane.dead = 0
        ring.size -= 1
        t = lane.tenant
        t.active -= 1
        if t.active == 0:
            self._idle += 1
            if self._idle > _IDLE_MIN and self._idle * 2 > len(self._tenants):
                self._drop_idle_tenants()

    def _drop_idle_tenants(self) -> None:
        self._tenants = {name: t for name, t in self._tenants.items() if t.active}
        self._idle = 0

    def _take_head(self, ring: _Ring, lane: _Lane) -> None:
        fifo = lane.fifo
        fifo.popleft()
        lane.live -= 1
        ring.count -= 1
        self._len -= 1
        if lane.live == 0:
            self._leave(ring, lane)
        else:
            self._purge(lane)

    @staticmethod
    def _purge(lane: _Lane) -> None:
        """Drop tombstones from the head; rebuild the FIFO when they outnumber the live entries."""
        fifo = lane.fifo
        while not fifo[0].alive:
            fifo.popleft()
            lane.dead -= 1
        if lane.dead > _COMPACT_MIN and lane.dead > lane.live:
            lane.fifo = deque(e for e in fifo if e.alive)
            lane.dead = 0

    def _skip_rounds(self, ring: _Ring) -> None:
        quantum = self._quantum
        start = ring.cursor
        assert start is not None
        rounds = _INF
        lane = start
        for _ in range(ring.size):
            need = lane.fifo[0].cost - lane.deficit
            r = 0.0
            if need > 0.0:
                r = need / (quantum * lane.tenant.weight)
                if r < _INF:
                    r = float(math.ceil(r))
            if r < rounds:
                rounds = r
            lane = lane.next
        if rounds > 0.0:
            for _ in range(ring.size):
                lane.deficit += rounds * (quantum * lane.tenant.weight)
                lane = lane.next

    # -- diagnostics (tests) -----------------------------------------------------------------------

    def _stored_entries(self) -> int:
        """Entries held in memory, tombstones included (== len(self) once tombstones are purged)."""
        return sum(len(lane.fifo) for t in self._tenants.values() for lane in t.lanes if lane is not None)

    def _tenant_records(self) -> int:
        """Tenant records held, idle ones included."""
        return len(self._tenants)
