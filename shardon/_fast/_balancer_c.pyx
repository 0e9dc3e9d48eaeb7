# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# Least-connections balancer, compiled. Pure-Python twin and reference: _balancer_py.py (same API,
# same choices).
#
# Per-node state lives in one C array of structs indexed by the node id (ids are small ints, 0..65535,
# chosen by the caller); the array grows by doubling when a larger id is added and is never shrunk:
#
#     nodes[id] = {present, healthy, trial, inflight, capacity, weight, load}
#
# pick(candidates, exclude):
#
#     start = rr % len(candidates); rr += 1             # rotate the scan start: round-robin ties
#     for each candidate c, from `start`, wrapping:
#         skip unless present and healthy and inflight < capacity
#         score = (inflight + load) / weight
#         keep c if score < best score and c not in exclude
#     return best or -1
#
# The candidates come as a list or tuple: the loop reads the item pointers straight out of it
# (PySequence_Fast_ITEMS, no copy when it is a list or tuple already), converts each to a C integer
# and indexes the array: no allocation, no dict lookup. `exclude` (a set, usually None) is consulted
# only for a node that would become the best, so the common path never touches it. acquire, release,
# inflight and capacity are an array access each.

cimport cython
from cpython.long cimport PyLong_AsLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport PyObject
from cpython.sequence cimport PySequence_Fast, PySequence_Fast_GET_SIZE, PySequence_Fast_ITEMS
from libc.math cimport INFINITY
from libc.string cimport memset

__all__ = ["LeastConnBalancer", "MAX_NODE_ID"]

cdef enum:
    _MAX_NODE_ID = 65535

MAX_NODE_ID = _MAX_NODE_ID


ctypedef struct _Node:
    Py_ssize_t inflight
    Py_ssize_t capacity
    double weight
    double load
    bint present
    bint healthy
    bint trial


cdef inline long _node_id(object obj) except? -2:
    """The id as a C integer; -1 for an int that can be no node id (negative or too large)."""
    cdef int overflow = 0
    cdef long value = PyLong_AsLongAndOverflow(obj, &overflow)
    if overflow or value < 0 or value > _MAX_NODE_ID:
        return -1
    return value


@cython.final
cdef class LeastConnBalancer:
    cdef:
        _Node* _nodes
        Py_ssize_t _allocated
        size_t _rr

    def __cinit__(self):
        self._nodes = NULL
        self._allocated = 0
        self._rr = 0

    def __dealloc__(self):
        PyMem_Free(self._nodes)
        self._nodes = NULL

    cdef inline _Node* _find(self, Py_ssize_t node) noexcept:
        if node < 0 or node >= self._allocated or not self._nodes[node].present:
            return NULL
        return &self._nodes[node]

    cdef _Node* _get(self, object node) except NULL:
        cdef _Node* n = self._find(_node_id(node))
        if n is NULL:
            raise KeyError(node)
        return n

    cdef int _grow(self, Py_ssize_t node) except -1:
        cdef Py_ssize_t size = self._allocated * 2
        if size < 8:
            size = 8
        while size <= node:
            size *= 2
        cdef _Node* mem = <_Node*>PyMem_Realloc(self._nodes, size * sizeof(_Node))
        if mem is NULL:
            raise MemoryError()
        memset(&mem[self._allocated], 0, (size - self._allocated) * sizeof(_Node))
        self._nodes = mem
        self._allocated = size
        return 0

    def add(self, node, capacity, weight=1.0):
        """Add a node (healthy, nothing in flight); re-adding one updates capacity and weight only."""
        cdef int overflow = 0
        cdef long cnode = PyLong_AsLongAndOverflow(node, &overflow)
        cdef Py_ssize_t ccap = capacity
        cdef double cweight = weight
        if overflow or cnode < 0 or cnode > _MAX_NODE_ID:
            raise ValueError(f"node id must be 0..{MAX_NODE_ID}, got {node!r}")
        if ccap < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity!r}")
        if not (0.0 < cweight < INFINITY):
            raise ValueError(f"weight must be a positive finite number, got {weight!r}")
        if cnode >= self._allocated:
            self._grow(cnode)
        cdef _Node* n = &self._nodes[cnode]
        if not n.present:
            n.present = True
            n.healthy = True
            n.trial = False
            n.inflight = 0
            n.load = 0.0
        n.capacity = ccap
        n.weight = cweight

    def remove(self, node):
        cdef _Node* n = self._find(_node_id(node))
        if n is not NULL:
            memset(n, 0, sizeof(_Node))

    def set_healthy(self, node, healthy):
        cdef _Node* n = self._get(node)
        n.healthy = bool(healthy)
        n.trial = False

    def set_trial(self, node):
        """Eligible for one more ``acquire`` only: it makes the node unhealthy again."""
        cdef _Node* n = self._get(node)
        n.healthy = True
        n.trial = True

    def trial(self, node):
        """Whether the node waits for its one trial ``acquire``."""
        cdef _Node* n = self._find(_node_id(node))
        return n is not NULL and n.trial

    def healthy(self, node):
        cdef _Node* n = self._find(_node_id(node))
        return n is not NULL and n.healthy

    def set_capacity(self, node, capacity):
        cdef Py_ssize_t ccap = capacity
        if ccap < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity!r}")
        self._get(node).capacity = ccap

    def set_load(self, node, load):
        """The requests the node reports beyond this balancer's own (>= 0), counted like in-flight ones."""
        cdef double cload = load
        if not (0.0 <= cload < INFINITY):
            raise ValueError(f"load must be a finite number >= 0, got {float(load)!r}")
        self._get(node).load = cload

    def load(self, node):
        cdef _Node* n = self._find(_node_id(node))
        return 0.0 if n is NULL else n.load

    def pick(self, candidates, exclude=None):
        """The eligible candidate with the fewest connections per weight; -1 if there is none."""
        cdef object seq = candidates
        if type(seq) is not list and type(seq) is not tuple:
            seq = PySequence_Fast(candidates, "candidates must be a sequence of node ids")
        cdef Py_ssize_t count = PySequence_Fast_GET_SIZE(seq)
        if count == 0:
            return -1
        cdef PyObject** items = PySequence_Fast_ITEMS(seq)
        cdef Py_ssize_t start = <Py_ssize_t>(self._rr % <size_t>count)
        self._rr += 1
        cdef Py_ssize_t i, j, node
        cdef Py_ssize_t best = -1
        cdef double best_score = INFINITY
        cdef double score
        cdef _Node* n
        cdef _Node* nodes = self._nodes
        cdef Py_ssize_t allocated = self._allocated
        for i in range(count):
            j = start + i
            if j >= count:
                j -= count
            node = _node_id(<object>items[j])
            if node < 0 or node >= allocated:
                continue
            n = &nodes[node]
            if not n.present or not n.healthy or n.inflight >= n.capacity:
                continue
            score = (<double>n.inflight + n.load) / n.weight
            if score < best_score and (exclude is None or <object>items[j] not in exclude):
                best = node
                best_score = score
        return best

    def acquire(self, node):
        cdef _Node* n = self._get(node)
        n.inflight += 1
        if n.trial:
            n.trial = False
            n.healthy = False

    def release(self, node):
        cdef _Node* n = self._find(_node_id(node))
        if n is not NULL and n.inflight > 0:
            n.inflight -= 1

    def inflight(self, node):
        cdef _Node* n = self._find(_node_id(node))
        return 0 if n is NULL else n.inflight

    def capacity(self, node):
        cdef _Node* n = self._find(_node_id(node))
        return 0 if n is NULL else n.capacity

    def free_slots(self, candidates):
        """Free slots summed over the healthy known candidates."""
        cdef Py_ssize_t total = 0
        cdef _Node* n
        for obj in candidates:
            n = self._find(_node_id(obj))
            if n is not NULL and n.healthy and n.inflight < n.capacity:
                total += n.capacity - n.inflight
        return total
