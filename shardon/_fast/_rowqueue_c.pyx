# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# The request log's in-memory row queue, compiled. Pure-Python twin and specification:
# _rowqueue_py.py (same API, same results).
#
# The twin allocates a bytes object per row and the writer joins them and measures each; here the
# rows go straight into one buffer that is reused from batch to batch:
#
#     append:  encoder.encode_into(record, buf, used)   # msgpack written at buf[used:]
#              lengths[count] = len(buf) - used; used = len(buf); count += 1
#     take:    payload = bytes(buf[:cut]); lengths[:k] as u32 LE bytes; the rest moved to the front
#
# encode_into sets the bytearray's size to the end of what it wrote without shrinking its memory, so
# after the first few batches an append allocates nothing. A row that cannot be packed leaves `used`
# where it was: the next row overwrites whatever it left. The lengths are a C array grown by
# doubling. append and take run in different threads (event loop, writer); each runs with the GIL
# held from start to end and calls no Python code while the queue is half-updated (the encoder is C;
# the writer's wake-up, Python, is called last), so neither can see the other's step half done.

cimport cython

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
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
        bytearray _buf
        Py_ssize_t _used  # bytes of rows in _buf (its size may be larger: a refused row's leftovers)
        uint32_t *_lengths
        Py_ssize_t _count
        Py_ssize_t _capacity  # of _lengths
        bint _armed
        readonly Py_ssize_t batch_max
        readonly bint closed

    def __cinit__(self):
        self._lengths = NULL

    def __init__(self, encoder, wake, Py_ssize_t batch_max):
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self._encode_into = encoder.encode_into
        self._wake = wake
        self._buf = bytearray()
        self._used = 0
        self._count = 0
        self._grow(max(batch_max, 64))
        self._armed = True
        self.batch_max = batch_max
        self.closed = False

    def __dealloc__(self):
        PyMem_Free(self._lengths)

    cdef int _grow(self, Py_ssize_t capacity) except -1:
        cdef uint32_t *grown = <uint32_t *>PyMem_Realloc(self._lengths, capacity * sizeof(uint32_t))
        if grown == NULL:
            raise MemoryError()
        self._lengths = grown
        self._capacity = capacity
        return 0

    cpdef bint append(self, record):
        cdef bytearray buf = self._buf
        cdef Py_ssize_t used = self._used, size
        if self.closed:
            return False
        if self._count == self._capacity:
            try:
                self._grow(2 * self._capacity)
            except MemoryError:
                return False
        try:
            self._encode_into(record, buf, used)
        except Exception:  # a value no row can hold (the caller says which and counts it)
            return False
        size = PyByteArray_GET_SIZE(buf)
        if size - used > 0xFFFFFFFF:  # pragma: no cover - a 4 GiB row; a frame's lengths are u32
            return False
        self._lengths[self._count] = <uint32_t>(size - used)
        self._used = size
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
        for i in range(k):
            cut += self._lengths[i]
        cdef char *data = PyByteArray_AS_STRING(self._buf)
        payload = PyBytes_FromStringAndSize(data, cut)
        lengths = PyBytes_FromStringAndSize(NULL, k * 4)
        cdef uint32_t *out = <uint32_t *>PyBytes_AS_STRING(lengths)
        if _BIG_ENDIAN:  # pragma: no cover - big-endian hosts
            for i in range(k):
                out[i] = _swap32(self._lengths[i])
        else:
            memcpy(out, self._lengths, k * sizeof(uint32_t))
        if k < count:  # the rest moves to the front (rare: the writer takes batch_max at a time)
            memmove(data, data + cut, self._used - cut)
            memmove(self._lengths, self._lengths + k, (count - k) * sizeof(uint32_t))
        elif self._used > _KEEP_BUFFER:
            self._buf = bytearray()
        self._used -= cut
        self._count = count - k
        self._armed = True
        return payload, lengths, k

    def clear(self):
        """Drop every queued row; how many there were."""
        cdef Py_ssize_t n = self._count
        self._count = 0
        self._used = 0
        return n

    def close(self):
        """Refuse rows from now on (`append` returns False); those queued can still be taken."""
        self.closed = True

    def __len__(self):
        return self._count
