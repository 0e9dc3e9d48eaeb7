# cython: language_level=3
# Types for the compiled exchange: Cython compiles ``_exchange_py.py`` itself as ``_exchange_c``, and
# this file (its "augmenting .pxd") makes its classes C types with typed fields and C-level calls
# between them and the connection objects. The logic is only in ``_exchange_py.py``.

cimport cython

# Modules cimported under their own names: the Python source imports the same class names.
cimport shardon._fast._ids_c as ids
cimport shardon._fast._sse_c as sse
cimport shardon.httpd._connection_c as httpd
cimport shardon.upstream._connection_c as upstream
cimport shardon._scheduler_c as scheduling
cimport shardon._nodes_c as nodes

cdef int _PREPARED, _LIMITED, _LOADING, _QUEUED, _RETRYING, _CONNECTING, _SENT
cdef Py_ssize_t _WHOLE_LIMIT
cdef bytes _INCLUDE_USAGE
cdef str _EMBEDDINGS
cdef object _clock, _monotonic


@cython.final
cdef class Endpoint:
    cdef public bint form
    cdef public bint generative
    cdef public bytes line
    cdef public Py_ssize_t max_body
    cdef public bint opaque
    cdef public str path


@cython.final
cdef class RequestCore:
    cdef public object loop
    cdef public dict endpoints
    cdef public Py_ssize_t max_body
    cdef public double queue_timeout
    cdef public int default_priority
    cdef public int default_max_tokens
    cdef public int max_retries
    cdef public str tenant_header
    cdef public ids.RequestIds ids
    cdef public object keys
    cdef public object limiter
    cdef public scheduling.Scheduler scheduler
    cdef public nodes.NodeRegistry registry
    cdef public object lifecycle
    cdef public object metrics
    cdef public object records
    cdef public object log_row
    cdef public object observe
    cdef public list on_finish
    cdef public object on_idle
    cdef public object client_address
    cdef public Py_ssize_t in_flight
    cdef public bint draining
    cdef public bint cutting
    cdef public bint callbacks
    cdef public Py_ssize_t served_by_callbacks

    cpdef bint on_request(self, httpd.Request request) except -1
    cpdef done(self, rec)
    cpdef str client_of(self, scope)


@cython.final
cdef class Exchange:
    cdef public object affinity
    cdef public bytes body
    cdef public double budget
    cdef public object buckets
    cdef public upstream.UpstreamConnection conn
    cdef public bytes content_type
    cdef public RequestCore core
    cdef public double dispatched
    cdef public bint done
    cdef public Endpoint endpoint
    cdef public double estimate
    cdef public bint fresh
    cdef public bint gone
    cdef public sse.OutputHasher hasher
    cdef public int index
    cdef public bint inject
    cdef public double limit_wait
    cdef public bint managed
    cdef public bint model_held
    cdef public nodes.Node node
    cdef public list node_headers
    cdef public bytes out_data
    cdef public int out_status
    cdef public object overflow
    cdef public bint overflowed
    cdef public object principal
    cdef public int priority
    cdef public Py_ssize_t prompt_estimate
    cdef public object rec
    cdef public object req
    cdef public httpd.Request request
    cdef public scheduling.Route route
    cdef public Py_ssize_t sent
    cdef public double since
    cdef public int stage
    cdef public bint streaming
    cdef public sse.UsageStripper stripper
    cdef public str tenant
    cdef public object timer
    cdef public object tried
    cdef public object usage
    cdef public str variant
    cdef public object wait
    cdef public scheduling.Waiter waiter
    cdef public double weight
    cdef public object whole

    @cython.locals(max_body=Py_ssize_t)
    cpdef authorize(self, headers)
    cpdef announced(self, headers)
    @cython.locals(size=Py_ssize_t, core=RequestCore, endpoint=Endpoint, route=scheduling.Route)
    cpdef prepare(self, headers, bytes body)
    @cython.locals(core=RequestCore, stage=int, index=int)
    cpdef admit(self)
    cdef _took(self, int index)
    cdef _enqueue(self, int priority, double cost, double weight, double timeout)
    cdef _sleep(self, int stage, double seconds, late)
    cdef _load_model(self)
    cpdef target(self)
    cpdef connected(self)
    cpdef send(self, upstream.UpstreamConnection conn)
    @cython.locals(conn=upstream.UpstreamConnection, status=int, data=bytes)
    cpdef int respond(self) except -1
    @cython.locals(data=bytes)
    cdef int _start(self, upstream.UpstreamConnection conn, int status) except -1
    cdef bytes _relayed(self, bytes data)
    @cython.locals(tail=bytes)
    cdef bytes _tail(self)
    cpdef list headers(self)
    cpdef bytes header_lines(self)
    cpdef int failed(self, error) except -1
    @cython.locals(conn=upstream.UpstreamConnection)
    cdef _release(self, error=*)
    @cython.locals(index=int)
    cdef _free_slot(self)
    @cython.locals(conn=upstream.UpstreamConnection)
    cdef _drop(self)
    cpdef error_answer(self, exc)
    @cython.locals(core=RequestCore, hasher=sse.OutputHasher)
    cpdef finish(self)
    @cython.locals(request=httpd.Request)
    cpdef finish_with(self, exc)
    cpdef serve(self, httpd.Request request)
    @cython.locals(conn=upstream.UpstreamConnection)
    cdef _advance(self)
    @cython.locals(request=httpd.Request, http=httpd.HTTPConnection, action=int, data=bytes)
    cpdef upstream_event(self)
    @cython.locals(http=httpd.HTTPConnection)
    cdef _watch(self)
