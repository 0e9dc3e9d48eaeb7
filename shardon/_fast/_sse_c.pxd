# cython: language_level=3
# The SSE classes' C interface, so that _wire_c calls them per chunk without a Python method
# lookup and call (their behaviour: _sse_py.py).

cimport cython


@cython.final
cdef class OutputHasher:
    cdef:
        bytearray _buf
        list _data
        object _hash
        bytearray _text  # choice 0's text, UTF-8, not yet given to _hash
        public int bad_events
        public bint done
        public int events
        public int text_events
        public object usage

    cpdef feed_sse(self, chunk)
    cdef _dispatch(self)
    cdef _payload(self, bytes payload)
    cdef _decode(self, payload)
    cdef _take(self, ev)
    cdef _flush_text(self)


@cython.final
cdef class UsageStripper:
    cdef bytes _pending

    cpdef bytes feed(self, bytes data)
    cpdef bytes flush(self)
