# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# FairQueue, compiled: strict priority classes, weighted deficit round robin (DRR) across tenants
# inside a class, FIFO inside a tenant. Pure-Python twin and reference: _queue_py.py. Both do the
# same float operations in the same order, so they make the same choices and hold bit-identical
# deficits (the tests compare them on random operation sequences).
#
# Layout
#
#     FairQueue
#       _counts[4]       live entries per class (C array; top_priority scans it from 3 down)
#       _rings           tuple of 4 _Ring: {cursor, size}, a circular doubly-linked list of the
#                        active lanes of that class (tenants that have live entries there)
#       _tenants         dict name -> _Tenant {weight, lanes[4], active}; a tenant without live
#                        entries keeps its record (no rebuild when a queue keeps emptying); idle
#                        records are swept once they are > 1024 and > half of all (amortised O(1))
#       _handles         dict handle -> _Entry, for remove()
#
#     _Lane (one tenant in one class): the tenant's FIFO as an intrusive doubly-linked list of
#       _Entry {item, cost, handle, prev, next}, its deficit, its live count and its ring links.
#       Entries come from a Cython freelist, so push/pop rarely touch the allocator.
#
# DRR
#
#     join:   a lane that gets its first live entry is inserted just behind the cursor (last in
#             the current round) with deficit = quantum * weight (its first turn's credit).
#     pop:    p = highest class with live entries; look at the lane under the cursor:
#               deficit >= head.cost  -> serve head, deficit -= cost; the cursor stays, so a tenant
#                                        spends its whole deficit before the ring moves on
#               otherwise             -> deficit += quantum * weight (next turn's credit),
#                                        cursor = next lane
#             After a whole pass that served nobody (costs much larger than quanta), skip the idle
#             rounds in one step instead of looping cost/quantum times:
#               r = min over lanes of ceil((head.cost - deficit) / (quantum * weight)), 0 if paid
#               every lane: deficit += r * quantum * weight
#             which is the state r more passes would have reached; the next pass then serves. A pop
#             therefore visits at most about two passes of the ring (tenants, not costs).
#     leave:  a lane whose last live entry is served or removed leaves the ring at once and its
#             deficit resets to 0 (standard DRR: no credit is hoarded while idle).
#
# remove(handle) unlinks the entry from its lane's list in O(1) (a dict lookup and pointer
# updates): there are no tombstones, so len(), len_class() and tenants_waiting() are exact and
# memory is returned at once.
#
# Fairness: while tenants stay backlogged, at the start of any tenant's turn every pair has received
# the same number of quanta, so served_a / w_a and served_b / w_b differ by less than one max-cost
# (over the smaller weight); at any instant by less than that plus one quantum.

cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_SetItem
from libc.math cimport INFINITY, ceil

__all__ = ["FairQueue"]

cdef enum:
    NUM_CLASSES = 4
    IDLE_MIN = 1024


@cython.final
@cython.freelist(1024)
cdef class _Entry:
    cdef:
        object item
        object handle
        _Lane lane
        _Entry prev
        _Entry next
        double cost


@cython.final
cdef class _Tenant:
    cdef:
        object name
        list lanes
        double weight
        int active

    def __cinit__(self, name, double weight):
        self.name = name
        self.weight = weight
        self.active = 0
        self.lanes = [None, None, None, None]


@cython.final
cdef class _Lane:
    cdef:
        _Tenant tenant
        _Entry head
        _Entry tail
        _Lane prev
        _Lane next
        double deficit
        Py_ssize_t live
        int priority
        bint active

    def __cinit__(self, _Tenant tenant, int priority):
        self.tenant = tenant
        self.priority = priority
        self.live = 0
        self.deficit = 0.0
        self.active = False


@cython.final
cdef class _Ring:
    cdef:
        _Lane cursor
        Py_ssize_t size


cdef inline int _check_priority(int priority) except -1:
    if priority < 0 or priority >= NUM_CLASSES:
        raise ValueError(f"priority must be 0..3, got {priority!r}")
    return 0


@cython.final
cdef class FairQueue:
    """Strict priority classes; weighted deficit round robin across tenants inside a class."""

    cdef:
        double _quantum
        tuple _rings
        dict _tenants
        dict _handles
        unsigned long long _next_handle
        Py_ssize_t _len
        Py_ssize_t _idle
        Py_ssize_t _counts[NUM_CLASSES]

    def __cinit__(self, double quantum=1024.0):
        if not (0.0 < quantum < INFINITY):
            raise ValueError(f"quantum must be a positive finite number, got {quantum!r}")
        self._quantum = quantum
        self._rings = (_Ring(), _Ring(), _Ring(), _Ring())
        self._tenants = {}
        self._handles = {}
        self._next_handle = 1
        self._len = 0
        self._idle = 0
        cdef int p
        for p in range(NUM_CLASSES):
            self._counts[p] = 0

    @property
    def quantum(self):
        return self._quantum

    # -- queries -----------------------------------------------------------------------------------

    def __len__(self):
        return self._len

    def len_class(self, int priority):
        _check_priority(priority)
        return self._counts[priority]

    def tenants_waiting(self, int priority):
        _check_priority(priority)
        return (<_Ring>self._rings[priority]).size

    cdef inline int _top(self) noexcept:
        if self._counts[3]:
            return 3
        if self._counts[2]:
            return 2
        if self._counts[1]:
            return 1
        if self._counts[0]:
            return 0
        return -1

    def top_priority(self):
        return self._top()

    def snapshot(self):
        """(priority, tenant, live entries) per active tenant: classes high to low, ring order."""
        cdef list out = []
        cdef int p
        cdef Py_ssize_t left
        cdef _Ring ring
        cdef _Lane lane
        for p in range(NUM_CLASSES - 1, -1, -1):
            ring = <_Ring>self._rings[p]
            lane = ring.cursor
            left = ring.size
            while left > 0:
                out.append((p, lane.tenant.name, lane.live))
                lane = lane.next
                left -= 1
        return out

    # -- mutations ---------------------------------------------------------------------------------

    def push(self, item, int priority, tenant, double cost, double weight=1.0):
        _check_priority(priority)
        if not (0.0 <= cost < INFINITY):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if not (0.0 < weight < INFINITY) or not (0.0 < self._quantum * weight < INFINITY):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        cdef _Tenant t
        cdef object found = self._tenants.get(tenant)
        if found is None:
            t = _Tenant.__new__(_Tenant, tenant, weight)
            PyDict_SetItem(self._tenants, tenant, t)
        else:
            t = <_Tenant>found
            t.weight = weight
            if t.active == 0:
                self._idle -= 1
        cdef object lane_obj = t.lanes[priority]
        cdef _Lane lane
        if lane_obj is None:
            lane = _Lane.__new__(_Lane, t, priority)
            t.lanes[priority] = lane
        else:
            lane = <_Lane>lane_obj
        cdef object handle = self._next_handle
        self._next_handle += 1
        cdef _Entry entry = _Entry.__new__(_Entry)
        entry.item = item
        entry.handle = handle
        entry.cost = cost
        entry.lane = lane
        if lane.tail is None:
            lane.head = entry
        else:
            entry.prev = lane.tail
            lane.tail.next = entry
        lane.tail = entry
        lane.live += 1
        if not lane.active:
            self._join(<_Ring>self._rings[priority], lane)
        PyDict_SetItem(self._handles, handle, entry)
        self._counts[priority] += 1
        self._len += 1
        return handle

    def pop(self):
        cdef int p = self._top()
        if p < 0:
            return None
        cdef _Ring ring = <_Ring>self._rings[p]
        cdef _Lane lane = ring.cursor
        cdef _Entry head
        cdef Py_ssize_t misses = 0
        while True:
            head = lane.head
            if lane.deficit >= head.cost:
                lane.deficit -= head.cost
                self._unlink(head)
                PyDict_DelItem(self._handles, head.handle)
                item = head.item
                head.item = None
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

    def remove(self, handle):
        cdef object found = self._handles.pop(handle, None)
        if found is None:
            return False
        cdef _Entry entry = <_Entry>found
        self._unlink(entry)
        entry.item = None
        return True

    def refund(self, tenant, int priority, double amount):
        _check_priority(priority)
        if not (-INFINITY < amount < INFINITY):
            raise ValueError(f"amount must be finite, got {amount!r}")
        cdef object found = self._tenants.get(tenant)
        if found is None:
            return
        cdef object lane_obj = (<_Tenant>found).lanes[priority]
        cdef _Lane lane
        if lane_obj is not None:
            lane = <_Lane>lane_obj
            if lane.active:
                lane.deficit += amount

    # -- internals ---------------------------------------------------------------------------------

    cdef inline void _join(self, _Ring ring, _Lane lane) noexcept:
        lane.active = True
        lane.deficit = self._quantum * lane.tenant.weight
        cdef _Lane cursor = ring.cursor
        cdef _Lane last
        if cursor is None:
            lane.prev = lane
            lane.next = lane
            ring.cursor = lane
        else:  # just behind the cursor: last in the current round
            last = cursor.prev
            lane.prev = last
            lane.next = cursor
            last.next = lane
            cursor.prev = lane
        ring.size += 1
        lane.tenant.active += 1

    cdef int _leave(self, _Lane lane) except -1:
        cdef _Ring ring = <_Ring>self._rings[lane.priority]
        if ring.size == 1:
            ring.cursor = None
        else:
            if ring.cursor is lane:
                ring.cursor = lane.next
            lane.prev.next = lane.next
            lane.next.prev = lane.prev
        lane.prev = None
        lane.next = None
        lane.active = False
        lane.deficit = 0.0
        ring.size -= 1
        cdef _Tenant t = lane.tenant
        t.active -= 1
        if t.active == 0:
            self._idle += 1
            if self._idle > IDLE_MIN and self._idle * 2 > len(self._tenants):
                self._drop_idle_tenants()
        return 0

    cdef int _drop_idle_tenants(self) except -1:
        self._tenants = {name: t for name, t in self._tenants.items() if (<_Tenant>t).active}
        self._idle = 0
        return 0

    cdef int _unlink(self, _Entry entry) except -1:
        cdef _Lane lane = entry.lane
        if entry.prev is None:
            lane.head = entry.next
        else:
            entry.prev.next = entry.next
        if entry.next is None:
            lane.tail = entry.prev
        else:
            entry.next.prev = entry.prev
        entry.prev = None
        entry.next = None
        entry.lane = None
        lane.live -= 1
        self._counts[lane.priority] -= 1
        self._len -= 1
        if lane.live == 0:
            self._leave(lane)
        return 0

    cdef void _skip_rounds(self, _Ring ring) noexcept:
        cdef double quantum = self._quantum
        cdef double rounds = INFINITY
        cdef double need, r
        cdef Py_ssize_t left = ring.size
        cdef _Lane lane = ring.cursor
        while left > 0:
            left -= 1
            need = lane.head.cost - lane.deficit
            r = 0.0
            if need > 0.0:
                r = need / (quantum * lane.tenant.weight)
                if r < INFINITY:
                    r = ceil(r)
            if r < rounds:
                rounds = r
            lane = lane.next
        if rounds > 0.0:
            left = ring.size
            while left > 0:
                left -= 1
                lane.deficit += rounds * (quantum * lane.tenant.weight)
                lane = lane.next

    # -- diagnostics (tests) -----------------------------------------------------------------------

    def _stored_entries(self):
        """Entries held in memory (no tombstones here: always len(self))."""
        cdef Py_ssize_t total = 0
        cdef _Entry e
        for t in self._tenants.values():
            for lane_obj in (<_Tenant>t).lanes:
                if lane_obj is not None:
                    e = (<_Lane>lane_obj).head
                    while e is not None:
                        total += 1
                        e = e.next
        return total

    def _tenant_records(self):
        """Tenant records held, idle ones included."""
        return len(self._tenants)
