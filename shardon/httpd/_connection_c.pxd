# cython: language_level=3
# The compiled client connection's types, for the modules that call it at C level (the exchange).

cimport cython


cdef class Headers(dict):
    cdef public list raw


@cython.final
cdef class Request:
    cdef:
        public object _body_waiter
        public object _disconnect
        public list body
        public bint body_done
        public Py_ssize_t body_size
        public bint chunked
        public str client
        public HTTPConnection conn
        public bint disconnected
        public object headers
        public str http_version
        public bint keep_alive
        public str method
        public object on_lost
        public str path
        public str query_string
        public bint response_done
        public bint response_started
        public str server
        public int status
        public object stream
        public bint too_large

    cpdef wake_body(self)
    cpdef lost(self)
    cpdef response_bytes(self, int status, list headers, bytes body)


@cython.final
cdef class ResponseStream:
    cdef public Request request
    cdef object _drain

    cpdef wake(self)


@cython.final
cdef class HTTPConnection:
    cdef:
        bytes _url
        list _headers
        object _write  # transport.write, bound once: it runs per chunk of every stream
        public object app
        public str client
        public bint closed
        public Request current
        public object drain_hook
        public bint final
        public Py_ssize_t head_raw
        public list drain_waiters
        public Py_ssize_t head_bytes
        public double head_started
        public double idle_since
        public object loop
        public object parser
        public Request parsing
        public Request pending
        public double pending_since
        public object pipeline
        public bint reading_paused
        public object server
        public str server_addr
        public object transport
        public bint write_paused

    cdef _end_reading(self)
    cdef _wake_drain(self)
    cdef _dispatch(self, Request request)
    cdef _start_app(self, Request request)
    cdef bytes _head_encoded(self, Request request, int status, bytes encoded, bytes framing)
    cpdef send_response(self, Request request, int status, list headers, bytes body)
    cpdef send_encoded(self, Request request, int status, bytes encoded_headers, bytes body)
    cpdef start_stream(self, Request request, int status, list headers, bytes first=*)
    cpdef start_encoded(self, Request request, int status, bytes encoded_headers, bytes first)
    cpdef end_stream(self, Request request, bytes last=*)
    cpdef write_chunk(self, Request request, bytes data)
    cpdef write(self, bytes data)
    cdef _response_complete(self, Request request)
