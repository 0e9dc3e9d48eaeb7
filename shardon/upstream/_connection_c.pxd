# cython: language_level=3
# The compiled upstream connection's types, for the modules that call it at C level (the exchange).

cimport cython


@cython.final
cdef class UpstreamConnection:
    cdef:
        object _feed  # parser.feed_data, bound once: it runs per read
        bint _held
        bint _keep_alive
        object _loop
        bint _paused
        object _waiter
        public Py_ssize_t buffered
        public list chunks
        public bint closed
        public bint complete
        public object error
        public bint got_bytes
        public list headers
        public bint headers_done
        public bint in_use
        public object listener  # an object with upstream_event(), told instead of wait()
        public object parser
        public NodePool pool
        public bint reused
        public int status
        public object transport
        public double wait_started

    cdef void _reset(self)
    cpdef _fail(self, error)
    cpdef send(self, bytes head, bytes body=*)
    cpdef bytes take(self)
    cpdef hold(self, bint held)
    cpdef finish(self)
    cpdef close(self)


@cython.final
cdef class NodePool:
    cdef:
        public object _idle
        public set _busy
        public double connect_timeout
        public str host
        public object loop
        public int max_idle
        public int port

    cpdef UpstreamConnection new_connection(self)
    cpdef UpstreamConnection take_idle(self)
    cpdef _put_idle(self, UpstreamConnection conn)
    cpdef _forget(self, UpstreamConnection conn)


cpdef list client_headers(list upstream)
cpdef bytes client_header_lines(list upstream)
