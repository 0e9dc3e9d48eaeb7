# Records held by reference until a run of them is processed: the row queue's records waiting to
# be packed, the tally's waiting to be observed (both do their per-record work in runs; see
# _rowqueue_c.pyx and _tally_c.pyx for why). Included by both modules (`include "_held.pxi"`).
#
# A fixed C array of owned references, filled at `n`, consumed from `head`:
#
#     push:  items[n] = record (a new reference); n += 1     the caller checks `held_full` first
#     take:  record = items[head]; head += 1                 its reference passes to the caller
#     reset: head = n = 0                                    once a run is consumed
#
# Taking a record out before processing it lets a run be resumed in order if the processing runs
# Python code that reenters its owner (a finalizer, a getattr): the other call takes from `head` on.

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF


cdef struct Held:
    PyObject **items
    Py_ssize_t head
    Py_ssize_t n
    Py_ssize_t capacity


cdef inline int held_init(Held *held, Py_ssize_t capacity) except -1:
    if capacity < 1:
        raise ValueError("defer must be >= 1")
    if held.items != NULL:
        raise RuntimeError("__init__ called twice")
    held.items = <PyObject **>PyMem_Malloc(capacity * sizeof(PyObject *))
    if held.items == NULL:
        raise MemoryError()
    held.capacity = capacity
    held.head = held.n = 0
    return 0


cdef inline bint held_full(Held *held) noexcept:
    return held.n == held.capacity


cdef inline Py_ssize_t held_count(Held *held) noexcept:
    return held.n - held.head


cdef inline void held_push(Held *held, object record) noexcept:
    Py_INCREF(record)
    held.items[held.n] = <PyObject *>record
    held.n += 1


cdef inline object held_take(Held *held):
    """The oldest record held (there must be one), removed: its reference passes to the caller."""
    cdef PyObject *item = held.items[held.head]
    held.head += 1
    record = <object>item  # a new reference: the array's is released next
    Py_DECREF(record)
    return record


cdef inline void held_reset(Held *held) noexcept:
    """Once a run is consumed (``held_count`` is 0): fill from the front again."""
    held.head = held.n = 0


cdef inline Py_ssize_t held_drop(Held *held) noexcept:
    """Release every record held; how many there were."""
    cdef Py_ssize_t dropped = 0
    cdef PyObject *item
    while held.head < held.n:
        item = held.items[held.head]
        held.head += 1
        Py_DECREF(<object>item)
        dropped += 1
    held_reset(held)
    return dropped


cdef inline void held_free(Held *held) noexcept:
    held_drop(held)
    PyMem_Free(held.items)
    held.items = NULL
