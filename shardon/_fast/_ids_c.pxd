# cython: language_level=3
# The compiled request ids' type, for the modules that take an id at C level (the exchange).

cimport cython


@cython.final
cdef class RequestIds:
    cdef public long long last

    cpdef long long next(self, double now) except? -1
    cpdef seed(self, long long newest)
