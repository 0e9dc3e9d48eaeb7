# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# The request log's in-memory row queue, compiled. Pure-Python twin and specification:
# _rowqueue_py.py (same API, same results).
#
# The twin allocates a bytes object per row and the writer joins them and measures each; here the
# rows go into one C buffer that is reused from batch to batch:
#
#     append:  encoder.encode_into(record, scratch, 0)  # one row, into a reused bytearray
#              data[used:used + n] = scratch; lengths[count] = n; used += n; count += 1
#     take:    payload = bytes(data[start:start + cut]); lengths[first:first + k] as u32 LE bytes;
#              start += cut; first += k   (nothing moved: the space is reused once the queue is
#              empty, or moved down once when an append needs room and the front is free)
#
# Packing into a reused bytearray at offset 0 costs about 2/3 of `encode` (no bytes object made).
# Before each row its size is set back to the largest row seen (within its memory: no allocation),
# because msgspec grows a buffer from its current size, and growing one that a smaller row left
# small makes CPython reallocate it. The data and the
# lengths are C arrays grown by doubling, so after the first batches an append allocates nothing.
# A row that cannot be packed leaves the queue as it was. append and take run in different threads (event loop, writer); each runs with the GIL
# held from start to end and calls no Python code while the queue is half-updated (the encoder is C;
# the writer's wake-up, Python, is called last), so neither can see the other's step half done.

cimport cython

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memmove

import sys

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
        readonly bint closed

    def __cinit__(self):
        self._lengths = NULL
        self._data = NULL

    def __init__(self, encoder, wake, Py_ssize_t batch_max):
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self._encode_into = encoder.encode_into
        self._wake = wake
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
        self.closed = False

    def __dealloc__(self):
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
        cdef bytearray scratch = self._scratch
        cdef Py_ssize_t n, room
        if self.closed:
            return False
        try:
            self._encode_into(record, scratch, 0)
        except Exception:  # a value no row can hold (the caller says which and counts it)
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
        if self._armed and self._count >= self.batch_max:
            self._armed = False
            self._wake()  # last: Python code, during which the writer may run
        return True

    def take(self, Py_ssize_t max_rows):
        cdef Py_ssize_t count = self._count, k, i, cut = 0
        if count <= 0 or max_rows <= 0:
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
        return n

    def close(self):
        """Refuse rows from now on (`append` returns False); those queued can still be taken."""
        self.closed = True

    def __len__(self):
        return self._count
