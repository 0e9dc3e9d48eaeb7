# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# FairQueue, compiled: strict priority classes, weighted start-time fair queueing (SFQ) across
# tenants inside a class, FIFO inside a tenant. Pure-Python twin and reference (the rules, and why):
# _queue_py.py. Both do the same float operations in the same order, so they make the same choices
# and hold bit-identical tags (the tests compare them on random operation sequences).
#
# Layout
#
#     FairQueue
#       _counts[4]       live entries per class (C array; top_priority scans it from 3 down)
#       _classes         tuple of 4 _Class: {vtime, heap, size}: heap[:size] are the active lanes
#                        of that class (tenants with live entries there), a binary min-heap on
#                        (tag, seq); each lane knows its index (pos). The list never shrinks (the
#                        slots past size hold None), so a tenant joining and leaving reallocates
#                        nothing.
#       _tenants         dict name -> _Tenant {weight, lanes[4], active}; a tenant without live
#                        entries keeps its record and tags; idle records are swept once they are
#                        > 1024 and > half of all (amortised O(1))
#       _handles         dict handle -> _Entry, for remove()
#
#     _Lane (one tenant in one class): the tenant's FIFO as an intrusive doubly-linked list of
#       _Entry {item, cost, handle, prev, next}, its tag, live count and heap position.
#       Entries come from a Cython freelist, so push/pop rarely touch the allocator.
#
# SFQ
#
#     join:   a lane that gets its first live entry: tag = max(tag, vtime - quantum), seq = next
#             join number, pushed on the class's heap.
#     pop:    p = highest class with live entries; lane = heap top; vtime = max(vtime, tag);
#             tag += head.cost / weight; the head leaves; the lane sifts down (or leaves the heap
#             when it has no live entry left, keeping its tag).
#     refund: tag -= amount / weight; while the lane waits, not below vtime - quantum (re-sifted).
#
# remove(handle) unlinks the entry from its lane's list in O(1) (a dict lookup and pointer
# updates) and, when it was the lane's last, takes the lane off the heap in O(log tenants): there
# are no tombstones, so len(), len_class() and tenants_waiting() are exact and memory is returned
# at once.

cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_SetItem
from libc.math cimport INFINITY

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
        double tag
        unsigned long long seq
        Py_ssize_t pos
        Py_ssize_t live
        int priority
        bint active

    def __cinit__(self, _Tenant tenant, int priority):
        self.tenant = tenant
        self.priority = priority
        self.live = 0
        self.tag = -INFINITY
        self.seq = 0
        self.pos = -1
        self.active = False


@cython.final
cdef class _Class:
    cdef:
        list heap
        Py_ssize_t size
        double vtime

    def __cinit__(self):
        self.heap = []
        self.size = 0
        self.vtime = 0.0


cdef inline int _check_priority(int priority) except -1:
    if priority < 0 or priority >= NUM_CLASSES:
        raise ValueError(f"priority must be 0..3, got {priority!r}")
    return 0


cdef inline bint _before(_Lane a, _Lane b) noexcept:
    return a.tag < b.tag or (a.tag == b.tag and a.seq < b.seq)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _sift_up(list heap, Py_ssize_t pos) noexcept:
    cdef _Lane lane = <_Lane>heap[pos]
    cdef _Lane above
    cdef Py_ssize_t parent
    while pos > 0:
        parent = (pos - 1) >> 1
        above = <_Lane>heap[parent]
        if not _before(lane, above):
            break
        heap[pos] = above
        above.pos = pos
        pos = parent
    heap[pos] = lane
    lane.pos = pos


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _sift_down(list heap, Py_ssize_t n, Py_ssize_t pos) noexcept:
    cdef _Lane lane = <_Lane>heap[pos]
    cdef _Lane below
    cdef Py_ssize_t child, right
    while True:
        child = 2 * pos + 1
        if child >= n:
            break
        right = child + 1
        if right < n and _before(<_Lane>heap[right], <_Lane>heap[child]):
            child = right
        below = <_Lane>heap[child]
        if not _before(below, lane):
            break
        heap[pos] = below
        below.pos = pos
        pos = child
    heap[pos] = lane
    lane.pos = pos


@cython.final
cdef class FairQueue:
    """Strict priority classes; weighted start-time fair queueing across tenants inside a class."""

    cdef:
        double _quantum
        tuple _classes
        dict _tenants
        dict _handles
        unsigned long long _next_handle
        unsigned long long _next_seq
        Py_ssize_t _len
        Py_ssize_t _idle
        Py_ssize_t _counts[NUM_CLASSES]

    def __cinit__(self, double quantum=1024.0):
        if not (0.0 < quantum < INFINITY):
            raise ValueError(f"quantum must be a positive finite number, got {quantum!r}")
        self._quantum = quantum
        self._classes = (_Class(), _Class(), _Class(), _Class())
        self._tenants = {}
        self._handles = {}
        self._next_handle = 1
        self._next_seq = 1
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
        return (<_Class>self._classes[priority]).size

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
        """(priority, tenant, live entries) per waiting tenant: classes high to low, each in the
        order its tenants come up (tag, then seq)."""
        cdef list out = []
        cdef int p
        cdef _Lane lane
        cdef _Class cls
        for p in range(NUM_CLASSES - 1, -1, -1):
            cls = <_Class>self._classes[p]
            order = sorted([((<_Lane>x).tag, (<_Lane>x).seq, x) for x in cls.heap[:cls.size]])
            for _tag, _seq, x in order:
                lane = <_Lane>x
                out.append((p, lane.tenant.name, lane.live))
        return out

    # -- mutations ---------------------------------------------------------------------------------

    def push(self, item, int priority, tenant, double cost, double weight=1.0):
        _check_priority(priority)
        if not (0.0 <= cost < INFINITY):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        if not (0.0 < weight < INFINITY) or not (0.0 < self._quantum * weight < INFINITY):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if not (cost / weight < INFINITY):
            raise ValueError(f"cost / weight must be finite, got {cost!r} / {weight!r}")
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
            self._join(<_Class>self._classes[priority], lane)
        PyDict_SetItem(self._handles, handle, entry)
        self._counts[priority] += 1
        self._len += 1
        return handle

    def pop(self):
        cdef int p = self._top()
        if p < 0:
            return None
        cdef _Class cls = <_Class>self._classes[p]
        cdef _Lane lane = <_Lane>cls.heap[0]
        cdef _Entry head = lane.head
        if lane.tag > cls.vtime:
            cls.vtime = lane.tag
        lane.tag += head.cost / lane.tenant.weight
        self._unlink(head)
        if lane.active:
            _sift_down(cls.heap, cls.size, lane.pos)
        PyDict_DelItem(self._handles, head.handle)
        item = head.item
        head.item = None
        return item

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
        cdef _Tenant t = <_Tenant>found
        cdef object lane_obj = t.lanes[priority]
        if lane_obj is None:
            return
        cdef _Lane lane = <_Lane>lane_obj
        lane.tag -= amount / t.weight
        cdef _Class cls
        cdef double floor
        if lane.active:
            cls = <_Class>self._classes[priority]
            floor = cls.vtime - self._quantum
            if lane.tag < floor:
                lane.tag = floor
            _sift_up(cls.heap, lane.pos)
            _sift_down(cls.heap, cls.size, lane.pos)

    # -- internals ---------------------------------------------------------------------------------

    cdef int _join(self, _Class cls, _Lane lane) except -1:
        lane.active = True
        cdef double floor = cls.vtime - self._quantum
        if lane.tag < floor:
            lane.tag = floor
        lane.seq = self._next_seq
        self._next_seq += 1
        if cls.size == len(cls.heap):
            cls.heap.append(lane)
        else:
            cls.heap[cls.size] = lane
        cls.size += 1
        _sift_up(cls.heap, cls.size - 1)
        lane.tenant.active += 1
        return 0

    cdef int _leave(self, _Lane lane) except -1:
        cdef _Class cls = <_Class>self._classes[lane.priority]
        cdef list heap = cls.heap
        cls.size -= 1
        cdef _Lane last = <_Lane>heap[cls.size]
        heap[cls.size] = None
        cdef Py_ssize_t pos
        if last is not lane:
            pos = lane.pos
            heap[pos] = last
            last.pos = pos
            _sift_up(heap, pos)
            _sift_down(heap, cls.size, last.pos)
        lane.pos = -1
        lane.active = False
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
