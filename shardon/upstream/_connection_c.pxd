# cython: language_level=3
# Types for the compiled upstream connection: Cython compiles ``_connection_py.py`` itself as
# ``_connection_c``, and this file makes its classes C types with typed fields and C-level calls
# (the exchange cimports it). The logic is only in ``_connection_py.py``.

cimport cython

cdef Py_ssize_t _LARGE_WRITE, _HIGH_WATER, _CACHED
cdef frozenset _FRAMING
cdef dict _header_lists, _header_lines
cdef object _monotonic


@cython.final
cdef class UpstreamConnection:
    cdef public object _feed
    cdef public bint _held
    cdef public bint _keep_alive
    cdef public object _loop
    cdef public bint _paused
    cdef public object _waiter
    cdef public Py_ssize_t buffered
    cdef public list chunks
    cdef public bint closed
    cdef public bint complete
    cdef public object error
    cdef public bint got_bytes
    cdef public list headers
    cdef public bint headers_done
    cdef public bint in_use
    cdef public object listener
    cdef public object parser
    cdef public NodePool pool
    cdef public bint reused
    cdef public int status
    cdef public object transport
    cdef public double wait_started

    cpdef data_received(self, data)
    cpdef on_header(self, bytes name, bytes value)
    cpdef on_headers_complete(self)
    cpdef on_body(self, bytes body)
    cpdef on_message_complete(self)
    cdef void _reset(self)
    cpdef _fail(self, error)
    cdef _tell(self, error)
    cpdef send(self, bytes head, bytes body=*)
    @cython.locals(chunks=list, data=bytes)
    cpdef bytes take(self)
    cpdef hold(self, bint held)
    cpdef finish(self)
    cpdef close(self)


@cython.final
cdef class NodePool:
    cdef public object _idle
    cdef public set _busy
    cdef public double connect_timeout
    cdef public str host
    cdef public object loop
    cdef public int max_idle
    cdef public int port

    cpdef UpstreamConnection new_connection(self)
    @cython.locals(conn=UpstreamConnection)
    cpdef UpstreamConnection take_idle(self)
    cpdef _put_idle(self, UpstreamConnection conn)
    cpdef _forget(self, UpstreamConnection conn)


@cython.locals(key=tuple)
cpdef list client_headers(list upstream)
@cython.locals(key=tuple)
cpdef bytes client_header_lines(list upstream)
