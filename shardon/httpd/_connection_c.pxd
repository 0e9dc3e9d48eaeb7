# cython: language_level=3
# Types for the compiled client connection: Cython compiles ``_connection_py.py`` itself as
# ``_connection_c``, and this file makes its classes C types with typed fields and C-level calls
# (the exchange cimports it). The logic is only in ``_connection_py.py``.

cimport cython

cdef Py_ssize_t _LARGE_WRITE
cdef dict _STATUS_LINES, _METHODS
cdef list _JSON

cpdef bytes status_line(int status)
cdef bytes _encode_headers(list headers)


cdef class Headers(dict):
    cdef public list raw

    @cython.locals(name=bytes, value=bytes)
    cdef _fill(self, list raw)
    @cython.locals(name=bytes, value=bytes)
    cpdef list get_all(self, str key)


@cython.final
cdef class Request:
    cdef public object _body_waiter
    cdef public object _disconnect
    cdef public list body
    cdef public bint body_done
    cdef public Py_ssize_t body_size
    cdef public bint chunked
    cdef public str client
    cdef public HTTPConnection conn
    cdef public bint disconnected
    cdef public object headers
    cdef public str http_version
    cdef public bint keep_alive
    cdef public str method
    cdef public object on_lost
    cdef public str path
    cdef public str query_string
    cdef public bint response_done
    cdef public bint response_started
    cdef public str server
    cdef public int status
    cdef public object stream
    cdef public bint too_large

    cpdef wake_body(self)
    cpdef lost(self)
    cpdef response_bytes(self, int status, list headers, bytes body)


@cython.final
cdef class ResponseStream:
    cdef public Request request
    cdef public object _drain

    cpdef wake(self)


@cython.final
cdef class HTTPConnection:
    cdef public list _headers
    cdef public bytes _url
    cdef public object _write
    cdef public object app
    cdef public str client
    cdef public bint closed
    cdef public Request current
    cdef public object drain_hook
    cdef public list drain_waiters
    cdef public bint final
    cdef public Py_ssize_t head_bytes
    cdef public Py_ssize_t head_raw
    cdef public double head_started
    cdef public double idle_since
    cdef public object loop
    cdef public object parser
    cdef public Request parsing
    cdef public Request pending
    cdef public double pending_since
    cdef public object pipeline
    cdef public bint reading_paused
    cdef public object server
    cdef public str server_addr
    cdef public object transport
    cdef public bint write_paused

    @cython.locals(pending=Request)
    cpdef data_received(self, data)
    cpdef on_url(self, bytes url)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(raw_method=bytes, path=bytes, query=bytes, path_str=str, request=Request)
    cpdef on_headers_complete(self)
    @cython.locals(request=Request, size=Py_ssize_t)
    cpdef on_body(self, bytes body)
    @cython.locals(request=Request)
    cpdef on_message_complete(self)
    @cython.locals(request=Request)
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
