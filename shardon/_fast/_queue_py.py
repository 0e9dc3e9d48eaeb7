"""Pure-Python twin of :mod:`shardon._fast._queue_c`: the readable reference.

FairQueue orders the requests waiting for one model.

* Priority classes 0..3 (low, normal, high, critical) are strict: ``pop`` serves the highest non-empty
  class; a lower class waits as long as a higher one has anything.
* Inside a class, tenants share by start-time fair queueing (SFQ, Goyal, Vin & Cheng 1996) weighted
  by tenant weight. The cost of an entry is a float (estimated tokens); entries of one tenant leave
  in FIFO order.

SFQ as implemented here (the compiled module does exactly the same float operations, so both make
the same choices and hold bit-identical tags):

* Each class has a virtual time ``vtime`` and each tenant in it a *tag*, in tokens per unit of
  weight: the virtual time at which its head entry may start. ``pop`` serves the tenant with the
  smallest tag (ties: the one that has been waiting longest), sets ``vtime`` to that tag if it is
  later, and moves the tag on by ``cost / weight``. A backlogged tenant therefore gets service in
  proportion to its weight, and one whose tag lags (it has had less) goes first until it catches up.
* A tenant that gets its first entry in a class (it was idle there) starts at
  ``max(its last tag, vtime - quantum)``: it goes before every tenant already waiting, with up to
  one quantum of tokens (``quantum * weight``) of credit for having been idle, but keeps any debt
  it ran up. So a quiet tenant's lone request is the next one served, whatever the length of the
  others' backlog and whatever its own cost; a tenant that sends one request at a time still pays
  for each (its tag persists while it is idle).
* ``refund`` corrects a tenant's tag once its real usage is known: the amount over (or under) the
  estimate, divided by its weight, is given back (or charged). Credit never takes a tag below
  ``vtime - quantum``: over-estimates cannot buy a tenant a longer head start than idleness could.

Fairness: while tenants stay backlogged, ``served_a / w_a`` and ``served_b / w_b`` differ by less than
``max_cost / w_a + max_cost / w_b`` plus the quantum of idle credit (SFQ's bound).

Each class keeps its waiting tenants in a binary heap ordered by (tag, seq), ``seq`` numbering the
times tenants joined: push, pop, remove and refund are O(log tenants).

A tenant without live entries keeps its (inactive) record and tags, so that a tenant whose queue keeps
emptying does not rebuild it on every push and its debt is remembered; idle records are dropped in one
sweep once they are more than 1,024 and more than half of all records (amortised O(1)); a dropped
tenant comes back as a new one.

Cancellation (``remove``) marks the entry dead (a tombstone) and drops its item at once; ``len``,
``len_class`` and ``tenants_waiting`` change at once. A cancelled entry is never charged. Tombstones
are purged as soon as they reach the head of their tenant's FIFO (popped past), all of them go when
the FIFO has no live entry left, and a FIFO is rebuilt without them once they outnumber its live
entries (and are more than 32): a FIFO never holds more than about twice its live entries, whatever
the churn of cancellations. (The compiled module unlinks cancelled entries at once and has no
tombstones.)
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
        self.active = 0  # number of classes where this tenant has live entries
        self.lanes: list[_Lane | None] = [None] * _NUM_CLASSES


class _Lane:
    """One tenant inside one priority class: its FIFO, its tag and its place in the class's heap."""

    __slots__ = ("active", "dead", "fifo", "live", "pos", "priority", "seq", "tag", "tenant")

    def __init__(self, tenant: _Tenant, priority: int) -> None:
        self.tenant = tenant
        self.priority = priority
        self.fifo: deque[_Entry] = deque()  # head is always a live entry while the lane is active
        self.live = 0
        self.dead = 0  # tombstones in fifo
        self.tag = -_INF  # start tag of the head entry; while idle, the finish tag of the last one
        self.seq = 0
        self.pos = -1  # index in the class's heap while active
        self.active = False


class _Class:
    __slots__ = ("count", "heap", "vtime")

    def __init__(self) -> None:
        self.heap: list[_Lane] = []  # active lanes, a binary min-heap on (tag, seq)
        self.count = 0  # live entries
        self.vtime = 0.0


def _before(a: _Lane, b: _Lane) -> bool:
    return a.tag < b.tag or (a.tag == b.tag and a.seq < b.seq)


def _sift_up(heap: list[_Lane], pos: int) -> None:
    lane = heap[pos]
    while pos > 0:
        parent = (pos - 1) >> 1
        above = heap[parent]
        if not _before(lane, above):
            break
        heap[pos] = above
        above.pos = pos
        pos = parent
    heap[pos] = lane
    lane.pos = pos


def _sift_down(heap: list[_Lane], pos: int) -> None:
    lane = heap[pos]
    n = len(heap)
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        right = child + 1
        if right < n and _before(heap[right], heap[child]):
            child = right
        below = heap[child]
        if not _before(below, lane):
            break
        heap[pos] = below
        below.pos = pos
        pos = child
    heap[pos] = lane
    lane.pos = pos


class FairQueue:
    """Strict priority classes; weighted start-time fair queueing across tenants inside a class."""

    __slots__ = ("_classes", "_handles", "_idle", "_len", "_next_handle", "_next_seq", "_quantum", "_tenants")

    def __reduce__(self) -> str | tuple[object, ...]:
        # Live scheduling state belongs to one process; like the compiled class, refuse to pickle.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __init__(self, quantum: float = 1024.0) -> None:
        quantum = float(quantum)
        if not 0.0 < quantum < _INF:
            raise ValueError(f"quantum must be a positive finite number, got {quantum!r}")
        self._quantum = quantum
        self._classes = tuple(_Class() for _ in range(_NUM_CLASSES))
        self._tenants: dict[str, _Tenant] = {}
        self._handles: dict[int, _Entry] = {}
        self._idle = 0  # tenants kept in _tenants without live entries
        self._next_handle = 1
        self._next_seq = 1
        self._len = 0

    @property
    def quantum(self) -> float:
        return self._quantum

    # -- queries -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def len_class(self, priority: int) -> int:
        return self._class(priority).count

    def tenants_waiting(self, priority: int) -> int:
        return len(self._class(priority).heap)

    def top_priority(self) -> int:
        classes = self._classes
        for p in range(_NUM_CLASSES - 1, -1, -1):
            if classes[p].count:
                return p
        return -1

    def snapshot(self) -> list[tuple[int, str, int]]:
        """(priority, tenant, live entries) per waiting tenant: classes high to low, each in the
        order its tenants come up (tag, then seq)."""
        out: list[tuple[int, str, int]] = []
        for p in range(_NUM_CLASSES - 1, -1, -1):
            for lane in sorted(self._classes[p].heap, key=lambda lane: (lane.tag, lane.seq)):
                out.append((p, lane.tenant.name, lane.live))
        return out

    # -- mutations ---------------------------------------------------------------------------------

    def push(self, item: object, priority: int, tenant: str, cost: float, weight: float = 1.0) -> int:
        cls = self._class(priority)
        cost = float(cost)
        weight = float(weight)
        if not 0.0 <= cost < _INF:
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if not 0.0 < weight < _INF or not 0.0 < self._quantum * weight < _INF:
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if not cost / weight < _INF:
            raise ValueError(f"cost / weight must be finite, got {cost!r} / {weight!r}")
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
            self._join(cls, lane)
        self._handles[handle] = entry
        cls.count += 1
        self._len += 1
        return handle

    def pop(self) -> object | None:
        p = self.top_priority()
        if p < 0:
            return None
        cls = self._classes[p]
        lane = cls.heap[0]
        head = lane.fifo[0]
        if lane.tag > cls.vtime:
            cls.vtime = lane.tag
        lane.tag += head.cost / lane.tenant.weight
        self._take_head(cls, lane)
        del self._handles[head.handle]
        item = head.item
        head.item = None
        head.alive = False
        return item

    def remove(self, handle: int) -> bool:
        entry = self._handles.pop(handle, None)
        if entry is None:
            return False
        entry.alive = False
        entry.item = None
        lane = entry.lane
        cls = self._classes[lane.priority]
        lane.live -= 1
        cls.count -= 1
        self._len -= 1
        if lane.live == 0:
            self._leave(cls, lane)
        else:
            lane.dead += 1
            self._purge(lane)
        return True

    def refund(self, tenant: str, priority: int, amount: float) -> None:
        cls = self._class(priority)
        amount = float(amount)
        if not -_INF < amount < _INF:
            raise ValueError(f"amount must be finite, got {amount!r}")
        t = self._tenants.get(tenant)
        if t is None:
            return
        lane = t.lanes[priority]
        if lane is None:
            return
        lane.tag -= amount / t.weight
        if lane.active:
            floor = cls.vtime - self._quantum
            if lane.tag < floor:
                lane.tag = floor
            _sift_up(cls.heap, lane.pos)
            _sift_down(cls.heap, lane.pos)

    # -- internals ---------------------------------------------------------------------------------

    def _class(self, priority: int) -> _Class:
        if not 0 <= priority < _NUM_CLASSES:
            raise ValueError(f"priority must be 0..3, got {priority!r}")
        return self._classes[priority]

    def _join(self, cls: _Class, lane: _Lane) -> None:
        lane.active = True
        floor = cls.vtime - self._quantum
        if lane.tag < floor:
            lane.tag = floor
        lane.seq = self._next_seq
        self._next_seq += 1
        heap = cls.heap
        heap.append(lane)
        _sift_up(heap, len(heap) - 1)
        lane.tenant.active += 1

    def _leave(self, cls: _Class, lane: _Lane) -> None:
        heap = cls.heap
        last = heap.pop()
        if last is not lane:
            pos = lane.pos
            heap[pos] = last
            last.pos = pos
            _sift_up(heap, pos)
            _sift_down(heap, last.pos)
        lane.pos = -1
        lane.active = False
        lane.fifo.clear()
        lane.dead = 0
        t = lane.tenant
        t.active -= 1
        if t.active == 0:
            self._idle += 1
            if self._idle > _IDLE_MIN and self._idle * 2 > len(self._tenants):
                self._drop_idle_tenants()

    def _drop_idle_tenants(self) -> None:
        self._tenants = {name: t for name, t in self._tenants.items() if t.active}
        self._idle = 0

    def _take_head(self, cls: _Class, lane: _Lane) -> None:
        lane.fifo.popleft()
        lane.live -= 1
        cls.count -= 1
        self._len -= 1
        if lane.live == 0:
            self._leave(cls, lane)
        else:
            self._purge(lane)
            _sift_down(cls.heap, lane.pos)

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

    # -- diagnostics (tests) -----------------------------------------------------------------------

    def _stored_entries(self) -> int:
        """Entries held in memory, tombstones included (== len(self) once tombstones are purged)."""
        return sum(len(lane.fifo) for t in self._tenants.values() for lane in t.lanes if lane is not None)

    def _tenant_records(self) -> int:
        """Tenant records held, idle ones included."""
        return len(self._tenants)
