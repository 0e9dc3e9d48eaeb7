# cython: language_level=3
# Types for the compiled node registry: Cython compiles ``_nodes_py.py`` itself as ``_nodes_c``, and
# this file makes `Node` a C type, so that the exchange reads a node's fields and builds its request
# head without Python calls. The logic is only in ``_nodes_py.py``.

cimport cython

cdef double _SWEEP_S
cdef int CLOSED, OPEN, HALF_OPEN


@cython.final
cdef class Node:
    cdef public dict _heads
    cdef public str api_key
    cdef public str backend
    cdef public int circuit
    cdef public object config
    cdef public double cooldown
    cdef public bint draining
    cdef public int failures
    cdef public str health_path
    cdef public bint healthy
    cdef public str host_header
    cdef public str id
    cdef public int index
    cdef public dict labels
    cdef public str last_error
    cdef public object load
    cdef public str load_path
    cdef public int max_concurrent
    cdef public str model_file_sha256
    cdef public dict models
    cdef public object pool
    cdef public str probe_path
    cdef public bint removing
    cdef public double retry_at
    cdef public str source
    cdef public object timer
    cdef public double weight

    cdef list _head_lines(self, bytes request_line)
    @cython.locals(prefix=bytes)
    cpdef bytes request_head(self, bytes request_line, Py_ssize_t content_length)
    cpdef bytes request_head_as(self, bytes request_line, bytes content_type, Py_ssize_t content_length)


@cython.final
cdef class NodeRegistry:
    cdef public object upstream
    cdef public object loop
    cdef public object scheduler
    cdef public object metrics
    cdef public object on_change
    cdef public object on_removed
    cdef public dict nodes
    cdef public dict by_index
    cdef public int _next_index
    cdef public list _tasks
    cdef public object prober

    cpdef record_success(self, Node node)
    cpdef record_failure(self, Node node, str error, bint refused=*)
