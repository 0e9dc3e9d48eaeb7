# cython: language_level=3
# Types for the compiled scheduler: Cython compiles ``_scheduler_py.py`` itself as ``_scheduler_c``,
# and this file (its "augmenting .pxd") makes its classes C types, so that admission and release,
# which every request takes, are C calls from the exchange. The logic is only in ``_scheduler_py.py``.

cimport cython

cdef str _FIFO_TENANT
cdef double _TICK_S, _DEMAND_TAU_S, _ALPHA
cdef int _SAMPLES


@cython.final
cdef class Route:
    cdef public double busy
    cdef public list candidates
    cdef public dict demand
    cdef public dict demand_samples
    cdef public int headroom
    cdef public object held
    cdef public dict held_by
    cdef public dict inflight
    cdef public dict last_seen
    cdef public str name
    cdef public object queue
    cdef public dict served_names
    cdef public double service_ewma
    cdef public dict weights


@cython.final
cdef class Waiter:
    cdef public double cost
    cdef public object future
    cdef public object handle
    cdef public bint held
    cdef public int priority
    cdef public Route route
    cdef public str tenant
    cdef public object timer


@cython.final
cdef class Scheduler:
    cdef public object config
    cdef public object balancer
    cdef public object loop
    cdef public dict routes
    cdef public dict _node_routes
    cdef public Py_ssize_t _rotation
    cdef public bint fair
    cdef public bint adaptive
    cdef public int headroom
    cdef public double wait_target
    cdef public double window
    cdef public object _timer

    cpdef str tenant_key(self, str tenant)
    @cython.locals(share=double)
    cdef bint _over_share(self, Route route, str tenant) except -1
    @cython.locals(headroom=int)
    cdef bint _restricted(self, Route route) except -1
    @cython.locals(index=int, headroom=int, inflight=dict)
    cpdef int admit(self, Route route, str tenant, double weight) except -2
    @cython.locals(index=int)
    cpdef int take(self, Route route, str tenant, exclude) except -2
    cpdef Waiter enqueue(self, Route route, int priority, str tenant, double cost, double weight, double timeout)
    cdef bint _unlink(self, Waiter waiter) except -1
    cpdef bint cancel(self, Waiter waiter, exc) except -1
    cpdef abandon(self, Waiter waiter)
    @cython.locals(left=Py_ssize_t, inflight=dict, routes=list)
    cpdef release(self, int index, Route route, str tenant, service_s=*)
    cdef _give(self, Waiter waiter, int index)
    @cython.locals(index=int, restricted=bint, waiter=Waiter)
    cdef bint _serve_one(self, Route route) except -1
    cpdef dispatch(self, int index)
