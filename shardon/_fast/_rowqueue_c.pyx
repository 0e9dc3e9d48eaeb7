# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# The request log's in-memory row queue, compiled. Pure-Python twin and specification:
# _rowqueue_py.py (same API, same results).
#
# The twin allocates a bytes object per row and the writer joins them and measures each; here the
# rows go into one C buffer that is reused from batch to batch:
#
#     append:  deferred[n] = record; n += 1          # a reference, no packing yet
#              if n == defer: pack the deferred ones  # `_pack_deferred`, below
#     pack:    encoder.encode_into(record, scratch, 0)  # one row, into a reused bytearray
#              data[used:used + n] = scratch; lengths[count] = n; used += n; count += 1
#     take:    pack the deferred ones; then
#              payload = bytes(data[start:start + cut]); lengths[first:first + k] as u32 LE bytes;
#              start += cut; first += k   (nothing moved: the space is reused once the queue is
#              empty, or moved down once when an append needs room and the front is free)
#
# Why rows are packed `defer` at a time: between two requests the kernel's network stack runs on
# the same core and, it seems, evicts the encoder's code and tables from the CPU caches, so packing
# one row per request pays those misses on every row (bench/README.md). Packed in a run, the rows
# after the first find everything in cache. The row is the record as it
# is when packed: a record must not change once appended (the gateway's do not: they are final).
#
# Packing into a reused bytearray at offset 0 makes no bytes object (cheaper than `encode`).
# Before each row its size is set back to the largest row seen (within its memory: no allocation),
# because msgspec grows a buffer from its current size, and growing one that a smaller row left
# small makes CPython reallocate it. The data and the lengths are C arrays grown by doubling, so
# after the first batches an append allocates nothing. A record that cannot be packed leaves the
# queue as it was and goes to ``refuse``.
#
# append and take run in different threads (event loop, writer); each runs with the GIL held from
# start to end and calls no Python code while the queue is half-updated (the encoder is C; ``wake``
# and ``refuse``, Python, are called last), so neither can see the other's step half done. The one
# way Python code can run inside a pack is a failing encode (the exception's allocation may run the
# garbage collector, and a finalizer): each deferred record is removed before it is encoded, and the
# pack loop rereads the deferred range after every row, so a pack by the other thread meanwhile
# continues in order where this one stopped.

cimport cython

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memmove

import sys

include "_held.pxi"

__all__ = ["RowQueue"]

cdef bint _BIG_ENDIAN = sys.byteorder == "big"
cdef Py_ssize_t _KEEP_BUFFER = 8 << 20  # a buffer grown past this (a long backlog) is not kept


cdef inline uint32_t _swap32(uint32_t v) noexcept:
    return ((v & 0xFF) << 24) | ((v & 0xFF00) << 8) | ((v >> 8) & 0xFF00) | (v >> 24)


@cython.final
cdef class RowQueue:
    """Packed request rows waiting for the writer thread (see _rowqueue_py.py)."""

    cdef:
        object _encode_into
        object _wake
        object _refuse
        Held _deferred  # records appended, not packed yet
        bytearray _scratch  # one row, packed
        Py_ssize_t _scratch_size  # the size it is given before each row
        char *_data  # the rows back to back, from _start to _used
        Py_ssize_t _start
        Py_ssize_t _used
        Py_ssize_t _room  # bytes _data can hold
        uint32_t *_lengths  # the rows' lengths, from _first, _count of them
        Py_ssize_t _first
        Py_ssize_t _count
        Py_ssize_t _capacity  # of _lengths
        bint _armed
        readonly Py_ssize_t batch_max
        readonly Py_ssize_t limit
        readonly bint closed

    def __cinit__(self):
        self._lengths = NULL
        self._data = NULL
        self._deferred.items = NULL

    def __init__(self, encoder, wake, Py_ssize_t batch_max, refuse, Py_ssize_t defer=64, Py_ssize_t limit=0):
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        if limit < 0:
            raise ValueError("limit must be >= 0")
        held_init(&self._deferred, defer)
        self._encode_into = encoder.encode_into
        self._wake = wake
        self._refuse = refuse
        self._scratch = bytearray(4096)
        self._scratch_size = 4096
        self._start = 0
        self._used = 0
        self._first = 0
        self._room = 0
        self._reserve(64 * 1024)
        self._count = 0
        self._grow(max(batch_max, 64))
        self._armed = True
        self.batch_max = batch_max
        self.limit = limit
        self.closed = False

    def __dealloc__(self):
        held_free(&self._deferred)
        PyMem_Free(self._lengths)
        PyMem_Free(self._data)

    cdef int _reserve(self, Py_ssize_t room) except -1:
        cdef char *grown = <char *>PyMem_Realloc(self._data, room)
        if grown == NULL:
            raise MemoryError()
        self._data = grown
        self._room = room
        return 0

    cdef int _grow(self, Py_ssize_t capacity) except -1:
        cdef uint32_t *grown = <uint32_t *>PyMem_Realloc(self._lengths, capacity * sizeof(uint32_t))
        if grown == NULL:
            raise MemoryError()
        self._lengths = grown
        self._capacity = capacity
        return 0

    cpdef bint append(self, record):
        if self.closed:
            return False
        if self.limit and self._count + held_count(&self._deferred) >= self.limit:
            return False
        if held_full(&self._deferred):  # only while another thread's pack is interrupted: see the top
            self._pack_deferred()
            if held_full(&self._deferred):  # pragma: no cover - interrupted again
                return False
        held_push(&self._deferred, record)
        if held_full(&self._deferred):
            self._pack_deferred()
        if self._armed and self._count + held_count(&self._deferred) >= self.batch_max:
            self._armed = False
            self._wake()  # last: Python code, during which the writer may run
        return True

    cdef int _pack_deferred(self) except -1:
        """Pack the deferred records in order; those that cannot be packed go to ``refuse``."""
        cdef list refused = None
        while held_count(&self._deferred):
            record = held_take(&self._deferred)
            if not self._pack(record):
                if refused is None:
                    refused = []
                refused.append(record)
        held_reset(&self._deferred)
        if refused is not None:
            for record in refused:
                self._refuse(record)  # last: Python code
        return 0

    cdef bint _pack(self, record):
        """One row, packed into the buffer; False (nothing changed) if it cannot be packed."""
        cdef bytearray scratch = self._scratch
        cdef Py_ssize_t n, room
        try:
            self._encode_into(record, scratch, 0)
        except Exception:  # a value no row can hold (refuse says which and counts it)
            return False
        n = PyByteArray_GET_SIZE(scratch)
        if n > 0xFFFFFFFF:  # pragma: no cover - a 4 GiB row; a frame's lengths are u32
            return False
        try:
            if n > self._scratch_size:
                self._scratch_size = n
            PyByteArray_Resize(scratch, self._scratch_size)  # for the next row: see the top
            if self._first + self._count == self._capacity:
                if self._first:  # the front is free: move the lengths down
                    memmove(self._lengths, self._lengths + self._first, self._count * sizeof(uint32_t))
                    self._first = 0
                else:
                    self._grow(2 * self._capacity)
            if self._used + n > self._room:
                if self._start:  # the front is free: move the rows down
                    memmove(self._data, self._data + self._start, self._used - self._start)
                    self._used -= self._start
                    self._start = 0
                if self._used + n > self._room:
                    room = 2 * self._room
                    while room < self._used + n:
                        room *= 2
                    self._reserve(room)
        except MemoryError:
            return False
        memcpy(self._data + self._used, PyByteArray_AS_STRING(scratch), n)
        self._lengths[self._first + self._count] = <uint32_t>n
        self._used += n
        self._count += 1
        return True

    def take(self, Py_ssize_t max_rows):
        if max_rows <= 0:
            return None
        self._pack_deferred()
        cdef Py_ssize_t count = self._count, k, i, cut = 0
        if count <= 0:
            return None
        k = count if count <= max_rows else max_rows
        cdef uint32_t *taken = self._lengths + self._first
        for i in range(k):
            cut += taken[i]
        payload = PyBytes_FromStringAndSize(self._data + self._start, cut)
        lengths = PyBytes_FromStringAndSize(NULL, k * 4)
        cdef uint32_t *out = <uint32_t *>PyBytes_AS_STRING(lengths)
        if _BIG_ENDIAN:  # pragma: no cover - big-endian hosts
            for i in range(k):
                out[i] = _swap32(taken[i])
        else:
            memcpy(out, taken, k * sizeof(uint32_t))
        self._count = count - k
        if self._count:
            self._first += k
            self._start += cut
        else:  # empty: start again at the front
            self._first = self._start = self._used = 0
            if self._room > _KEEP_BUFFER:
                self._reserve(64 * 1024)  # a long backlog is over: give its memory back
        self._armed = True
        return payload, lengths, k

    def clear(self):
        """Drop every queued row; how many there were."""
        cdef Py_ssize_t n = self._count
        self._count = self._first = self._start = self._used = 0
        return n + held_drop(&self._deferred)

    def close(self):
        """Refuse rows from now on (`append` returns False); those queued can still be taken."""
        self.closed = True

    def __len__(self):
        return self._count + held_count(&self._deferred)
