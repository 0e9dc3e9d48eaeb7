# cython: language_level=3
"""Request ids, compiled: the same as ``_ids_py.py`` (read its docstring), in C integers."""

cimport cython

__all__ = ["RequestIds"]


@cython.final
cdef class RequestIds:
    def __init__(self):
        self.last = 0

    cpdef long long next(self, double now) except? -1:
        """A new id for a request that arrived at ``now`` (unix seconds)."""
        cdef long long value = (<long long>(now * 1000.0)) << 20
        if value <= self.last:
            value = self.last + 1
        self.last = value
        return value

    cpdef seed(self, long long newest):
        """Ids handed out from now on exceed ``newest``."""
        if newest > self.last:
            self.last = newest
