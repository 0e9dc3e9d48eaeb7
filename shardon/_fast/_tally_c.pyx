# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# Per-request tallies behind the Prometheus metrics, compiled. Pure-Python twin and reference:
# _tally_py.py (same API, same results; its docstring is the specification).
#
# RequestTally.observe runs once per finished request on the event loop. The twin keeps three
# dicts keyed by tuples; building, hashing and comparing three fresh tuples per request (the model
# str is a fresh object every time: decoded from the client's JSON) was most of its cost. Here the
# counters live in cells reached from the request's fields, with no tuple built:
#
#     _cells[model] -> _ModelCell      one dict lookup, or none when the model is the previous
#                                      request's (equal characters: the dict would answer the same)
#       .series                        its ModelSeries (or "other"'s): series(model), asked once
#       .tenants[tenant] -> _TenantCell    the tenant is usually the same str object: an identity
#                                          check against the cell's last tenant first
#         .request_counts[status] -> _Count     the last int status's _Count kept by its C value
#         .prompt_tokens, .completion_tokens -> _Count
#
# A _Count is the running total of one exported key (it holds the key tuple, built once): a C
# long long while every amount is an int that fits, Python arithmetic from the first that does
# not (a float, a big int), so a total is exactly the twin's 0 + a1 + a2 ... The requests and
# tokens dicts are built from the lists of _Counts, in first-seen order, when read (at scrape
# time); len(list) is the twin's len(dict).
#
# Cardinality follows the twin to the letter. A requests (tokens) key not counted yet, when
# max_series keys exist, is counted by the shared "other" _Count, listed under ("other", "other",
# "other") when first used; a request whose own key equals that one shares it. Cells are made
# only by a request that lists a key of its own, so memory stays bounded whatever the clients
# send; hence a model (tenant, status) without a cell has no key yet, and a lookup that misses
# takes the twin's path. Answers that never change are kept where they cost no memory: a tenant
# cell's token _Count once it is "other"'s (its key can never be listed: tokens only grow), a
# model's series (series(model) answers the same forever: models only grow).
#
# The record's eight fields are read straight from its slots when getattr would do just that
# (a generic __getattribute__, and member descriptors of its own type: a msgspec Struct such as
# RequestRecord, a __slots__ class), checked once per type and type version tag (a change to the
# type or a base gives it a new tag); an unset slot, or any other record, is read with getattr at
# the twin's moments (which exceptions show). Why: getattr from C is a type-attribute lookup per
# field, about 1,100 of the 1,600 instructions observe took without this.
#
# Each histogram is a C array of bounds and counts searched by bisection:
#
#     lo, hi = 0, n                    # first bound >= value (bisect_left), n = the +Inf bucket
#     while lo < hi:
#         mid = (lo + hi) >> 1
#         if bounds[mid] < value: lo = mid + 1
#         else: hi = mid
#     counts[lo] += 1; sum += value
#
# observe_later keeps a reference to the record and observes the held ones 64 at a time (and before
# any read): between two requests the kernel's network stack evicts this code and the cells from
# the CPU caches, and observing a run of records pays those misses once per run, not per request.
#
# A NaN compares false and lands in bucket 0, as with bisect_left. The sums are added in the
# twin's order, so both give bit-identical floats. Timestamps that are not all floats (or None)
# take the twin's Python arithmetic.

cimport cython

from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport Py_TYPE, PyObject, PyTypeObject
from cpython.unicode cimport PyUnicode_CheckExact
from libc.limits cimport LLONG_MAX, LLONG_MIN

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
        int flags
    enum:
        T_OBJECT
        T_OBJECT_EX
        READ_RESTRICTED

cdef extern from "Python.h":
    ctypedef struct PyDescrObject:
        PyTypeObject *d_type
    ctypedef struct PyMemberDescrObject:
        PyDescrObject d_common
        PyMemberDef *d_member
    # Only the fields read here (Cython's PyTypeObject declares none of them).
    ctypedef struct _TypeFields "PyTypeObject":
        unsigned int tp_version_tag
        void *tp_getattro
    PyTypeObject PyMemberDescr_Type
    PyObject *_PyType_Lookup(PyTypeObject *cls, PyObject *name)
    PyObject *_generic_getattr "PyObject_GenericGetAttr"(PyObject *obj, PyObject *name)
    bint PyType_IsSubtype(PyTypeObject *cls, PyTypeObject *base)

cdef extern from *:
    """
    /* Whether two exact str hold the same characters. 0 when unsure (a legacy string not yet
       ready, before 3.12): the caller then asks the dict. Equal text has equal kinds (a str is
       stored in the narrowest kind that holds it). */
    static CYTHON_INLINE int shardon_tally_same_str(PyObject *a, PyObject *b) {
    #if PY_VERSION_HEX < 0x030C0000
        if (!PyUnicode_IS_READY(a) || !PyUnicode_IS_READY(b)) return 0;
    #endif
        Py_ssize_t length = PyUnicode_GET_LENGTH(a);
        int kind = PyUnicode_KIND(a);
        return length == PyUnicode_GET_LENGTH(b) && kind == (int)PyUnicode_KIND(b)
            && memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), (size_t)length * kind) == 0;
    }
    """
    bint _same_str "shardon_tally_same_str"(object a, object b)

cdef extern from *:
    """
    /* Whether the type's version tag can be trusted to change when the type (or a base) does.
       3.13 no longer sets Py_TPFLAGS_VALID_VERSION_TAG ("unused, legacy flag"): there a tag is
       valid exactly when it is not 0. */
    static CYTHON_INLINE int shardon_tally_version_valid(PyTypeObject *cls) {
    #if PY_VERSION_HEX >= 0x030D0000
        return cls->tp_version_tag != 0;
    #else
        return (cls->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) && cls->tp_version_tag != 0;
    #endif
    }
    """
    bint _version_valid "shardon_tally_version_valid"(PyTypeObject *cls)

include "_held.pxi"

__all__ = ["OTHER", "Histogram", "ModelSeries", "RequestTally"]

OTHER = "other"
cdef tuple _OTHER3 = (OTHER, OTHER, OTHER)
cdef str _PROMPT = "prompt"
cdef str _COMPLETION = "completion"
# The record's fields, in this order in RequestTally._offsets.
cdef tuple _FIELDS = (
    "model", "tenant", "status", "prompt_tokens", "completion_tokens", "received_at", "finished_at", "first_token_at"
)
cdef enum:
    _MODEL, _TENANT, _STATUS, _PROMPT_TOKENS, _COMPLETION_TOKENS, _RECEIVED_AT, _FINISHED_AT, _FIRST_TOKEN_AT
    _N_FIELDS


cdef tuple _check_bounds(bounds):
    out = tuple([float(b) for b in bounds])
    if not out:
        raise ValueError("a histogram needs at least one bucket bound")
    if any([b != b for b in out]) or any([a >= b for a, b in zip(out, out[1:])]):
        raise ValueError("histogram bounds must be ascending numbers")
    return out


cdef bint _slot_offsets(PyTypeObject *cls, Py_ssize_t *offsets) noexcept:
    """Whether getattr(obj, field) reads a plain member slot for each of _FIELDS (and where)."""
    cdef PyObject *descr
    cdef PyMemberDef *member
    cdef Py_ssize_t i
    cdef str name
    if (<_TypeFields *>cls).tp_getattro != <void *>_generic_getattr:
        return False  # __getattribute__ or __getattr__: only getattr knows
    for i in range(_N_FIELDS):
        name = <str>_FIELDS[i]
        descr = _PyType_Lookup(cls, <PyObject *>name)
        if descr == NULL or Py_TYPE(<object>descr) != &PyMemberDescr_Type:
            return False  # a property, a class attribute, the instance dict...
        member = (<PyMemberDescrObject *>descr).d_member
        if member.type != T_OBJECT_EX and member.type != T_OBJECT:
            return False
        if member.flags & READ_RESTRICTED:
            return False  # reading it raises an audit event
        if not PyType_IsSubtype(cls, (<PyMemberDescrObject *>descr).d_common.d_type):
            return False  # another class's slot descriptor: getattr raises TypeError
        offsets[i] = member.offset
    return True


cdef inline bint _fits_long_long(amount, long long *value) noexcept:
    """Whether ``amount`` is an int (exactly) that fits a long long, then in ``value``."""
    cdef int overflow = 0
    if not PyLong_CheckExact(amount):
        return False
    value[0] = PyLong_AsLongLongAndOverflow(amount, &overflow)  # never raises for an int
    return not overflow


def _reads_slots(cls):
    """Whether ``observe`` reads a ``cls`` record's fields straight from their slots (for tests)."""
    cdef Py_ssize_t offsets[_N_FIELDS]
    if not isinstance(cls, type):
        raise TypeError("a type is needed")
    return _slot_offsets(<PyTypeObject *>cls, offsets)


@cython.final
cdef class Histogram:
    """Bucket counts and the sum of the observed values, for upper ``bounds`` (ascending)."""

    cdef:
        readonly tuple bounds
        readonly double sum
        Py_ssize_t n
        double *_bounds
        long long *_counts

    def __cinit__(self, bounds):
        cdef tuple checked = _check_bounds(bounds)
        cdef Py_ssize_t i, n = len(checked)
        self.bounds = checked
        self.n = n
        self.sum = 0.0
        self._bounds = <double *>PyMem_Malloc(n * sizeof(double))
        self._counts = <long long *>PyMem_Malloc((n + 1) * sizeof(long long))
        if self._bounds == NULL or self._counts == NULL:
            raise MemoryError()
        for i in range(n):
            self._bounds[i] = checked[i]
        for i in range(n + 1):
            self._counts[i] = 0

    def __dealloc__(self):
        PyMem_Free(self._bounds)
        PyMem_Free(self._counts)

    cdef inline void add(self, double value) noexcept:
        cdef Py_ssize_t lo = 0, hi = self.n, mid
        cdef double *bounds = self._bounds
        while lo < hi:
            mid = (lo + hi) >> 1
            if bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        self._counts[lo] += 1
        self.sum += value

    def observe(self, double value):
        self.add(value)

    @property
    def counts(self):
        """Per bucket (not cumulative), the ``+Inf`` bucket last."""
        return [self._counts[i] for i in range(self.n + 1)]

    @property
    def count(self):
        cdef long long total = 0
        cdef Py_ssize_t i
        for i in range(self.n + 1):
            total += self._counts[i]
        return total


@cython.final
cdef class ModelSeries:
    """A model's three latency histograms."""

    cdef:
        readonly Histogram duration
        readonly Histogram ttft
        readonly Histogram tpot

    def __init__(self, tuple duration_bounds, tuple ttft_bounds, tuple tpot_bounds):
        self.duration = Histogram(duration_bounds)
        self.ttft = Histogram(ttft_bounds)
        self.tpot = Histogram(tpot_bounds)


@cython.final
cdef class _Count:
    """The running total of one exported key (a requests or tokens key)."""

    cdef:
        tuple key
        long long exact  # the total while every amount was an int that fits
        object spilled  # None, or the total as a Python number (a float, a big int, ... was added)

    def __cinit__(self, tuple key):
        self.key = key

    cdef inline int add(self, amount, bint fits, long long value) except -1:
        """Add ``amount``: ``value`` when it ``fits`` (see _fits_long_long)."""
        if fits and self.spilled is None and (
            self.exact <= LLONG_MAX - value if value >= 0 else self.exact >= LLONG_MIN - value
        ):
            self.exact += value
            return 0
        # The twin's arithmetic from here on: (0 + a1 + ... + ak) + amount, exactly.
        self.spilled = (self.exact if self.spilled is None else self.spilled) + amount
        return 0

    cdef object total(self):
        return self.exact if self.spilled is None else self.spilled


@cython.final
cdef class _TenantCell:
    """One (model, tenant)'s _Counts."""

    cdef:
        dict request_counts  # status -> _Count (its own, or "other"'s when equal to its key)
        long last_status  # the C value of an int status whose _Count is last_request_count
        _Count last_request_count
        _Count prompt_tokens  # None until the first prompt tokens; "other"'s past max_series
        _Count completion_tokens

    def __cinit__(self):
        self.request_counts = {}

    cdef inline _Count request_count(self, status, long status_code, bint status_is_code):
        """The _Count of ``status``, or None when it has none yet."""
        if status_is_code and status_code == self.last_status and self.last_request_count is not None:
            return self.last_request_count  # an int equal to it: the dict would answer the same
        found = self.request_counts.get(status)
        if found is None:
            return None
        if status_is_code:
            self.last_status = status_code
            self.last_request_count = <_Count>found
        return <_Count>found

    cdef int keep_request_count(self, status, long status_code, bint status_is_code, _Count count) except -1:
        self.request_counts[status] = count
        if status_is_code:
            self.last_status = status_code
            self.last_request_count = count
        return 0


@cython.final
cdef class _ModelCell:
    """One model's series and tenant cells."""

    cdef:
        object model  # the key in RequestTally._cells
        ModelSeries series  # None until its first 2xx request, then what series(model) answered
        dict tenants  # tenant -> _TenantCell
        object last_tenant  # the tenant object last found (usually the same object every time)
        _TenantCell last_tenant_cell

    def __cinit__(self, model):
        self.model = model
        self.tenants = {}

    cdef inline _TenantCell tenant_cell(self, tenant):
        """The cell of ``tenant``, or None when it has none yet."""
        if tenant is self.last_tenant and self.last_tenant_cell is not None:
            return self.last_tenant_cell
        found = self.tenants.get(tenant)
        if found is None:
            return None
        self.last_tenant = tenant
        self.last_tenant_cell = <_TenantCell>found
        return <_TenantCell>found

    cdef _TenantCell new_tenant_cell(self, tenant):
        cdef _TenantCell made = _TenantCell()
        self.tenants[tenant] = made
        self.last_tenant = tenant
        self.last_tenant_cell = made
        return made


@cython.final
cdef class RequestTally:
    """The per-request counters and histograms (see _tally_py.py)."""

    cdef:
        readonly Py_ssize_t max_series
        readonly tuple duration_bounds
        readonly tuple ttft_bounds
        readonly tuple tpot_bounds
        dict _models  # model -> ModelSeries, as series() gives them out
        dict _cells  # model -> _ModelCell, only for models with requests or tokens keys of their own
        _ModelCell _last_cell  # the cell of the last model found
        list _request_counts  # the _Count of every requests key, in first-seen order
        list _token_counts  # the same for tokens
        _Count _other_requests  # ("other", "other", "other") in requests
        _Count _other_tokens
        bint _other_requests_listed  # in _request_counts (it is, from its first request on)
        bint _other_tokens_listed
        # The record type whose fields were last looked up, and how to read them.
        object _layout_type
        unsigned int _layout_version
        bint _layout_direct  # its fields are plain slots, at these offsets
        Py_ssize_t _offsets[_N_FIELDS]
        Held _later  # the records observe_later holds
        readonly long long unobserved

    def __cinit__(self):
        self._later.items = NULL

    def __dealloc__(self):
        held_free(&self._later)

    def __init__(self, Py_ssize_t max_series, duration_bounds, ttft_bounds, tpot_bounds, Py_ssize_t defer=64):
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        held_init(&self._later, defer)
        self.unobserved = 0
        self.max_series = max_series
        self.duration_bounds = _check_bounds(duration_bounds)
        self.ttft_bounds = _check_bounds(ttft_bounds)
        self.tpot_bounds = _check_bounds(tpot_bounds)
        self._models = {}
        self._cells = {}
        self._last_cell = None
        self._request_counts = []
        self._token_counts = []
        self._other_requests = _Count(_OTHER3)
        self._other_tokens = _Count(_OTHER3)
        self._other_requests_listed = False
        self._other_tokens_listed = False
        self._layout_type = None
        self._layout_direct = False

    @property
    def requests(self):
        """Request counts by ``(model, status, tenant)`` (a snapshot)."""
        self.drain()
        cdef _Count count
        return {count.key: count.total() for count in self._request_counts}

    @property
    def tokens(self):
        """Token totals by ``(model, tenant, "prompt"|"completion")`` (a snapshot)."""
        self.drain()
        cdef _Count count
        return {count.key: count.total() for count in self._token_counts}

    @property
    def models(self):
        """Each timed model's histograms (a snapshot of the live `ModelSeries`)."""
        self.drain()
        return dict(self._models)

    @property
    def defer(self):
        """How many records `observe_later` holds before it observes them."""
        return self._later.capacity

    cpdef observe_later(self, record):
        """`observe` ``record`` with the next ones: ``defer`` at a time, or at the next read."""
        if held_full(&self._later):  # only while a drain is under way (a record's getattr called us)
            self.drain()
        held_push(&self._later, record)
        if held_full(&self._later):
            self.drain()

    cpdef Py_ssize_t drain(self) except -1:
        """Observe the records held, in order; how many raised (also added to ``unobserved``)."""
        cdef Py_ssize_t failed = 0
        while held_count(&self._later):
            record = held_take(&self._later)
            try:
                self.observe(record)
            except Exception:  # a record no series can take (the gateway's can): counted, not raised
                failed += 1
        held_reset(&self._later)
        self.unobserved += failed
        return failed

    cpdef ModelSeries series(self, model):
        """The histograms of ``model`` (``"other"``'s once ``max_series`` models have some)."""
        cdef dict models = self._models
        found = models.get(model)
        if found is not None:
            return <ModelSeries>found
        if len(models) >= self.max_series:
            model = OTHER
            found = models.get(model)
            if found is not None:
                return <ModelSeries>found
        cdef ModelSeries made = ModelSeries(self.duration_bounds, self.ttft_bounds, self.tpot_bounds)
        models[model] = made
        return made

    cpdef observe(self, record):
        """Count one finished request (a `RequestRecord`, or anything with its fields)."""
        cdef PyObject *slots[_N_FIELDS]
        cdef char *base
        cdef Py_ssize_t i
        cdef bint direct = False
        cdef PyTypeObject *cls = Py_TYPE(record)
        if cls != <PyTypeObject *>self._layout_type or (<_TypeFields *>cls).tp_version_tag != self._layout_version:
            self._learn_layout(cls)
        if self._layout_direct:
            base = <char *><PyObject *>record
            direct = True
            for i in range(_N_FIELDS):
                slots[i] = (<PyObject **>(base + self._offsets[i]))[0]
                if slots[i] == NULL:
                    direct = False  # an unset slot: getattr raises (or says None) at the twin's moment
                    break
        if direct:
            model = <object>slots[_MODEL]
            tenant = <object>slots[_TENANT]
            status = <object>slots[_STATUS]
        else:
            model = record.model
            tenant = record.tenant
            status = record.status

        # requests[(model, status, tenant)] += 1
        cdef int overflow = 0
        cdef long status_code = 0
        cdef bint status_is_code = False
        if PyLong_CheckExact(status):
            status_code = PyLong_AsLongAndOverflow(status, &overflow)
            status_is_code = not overflow
        cdef _ModelCell cell = self._model_cell(model)
        cdef _TenantCell tenant_cell = None
        cdef _Count count = None
        if cell is not None:
            tenant_cell = cell.tenant_cell(tenant)
            if tenant_cell is not None:
                count = tenant_cell.request_count(status, status_code, status_is_code)
        if count is None:
            key = (model, status, tenant)
            hash(key)  # unhashable: TypeError before anything is counted, as in the twin
            if len(self._request_counts) >= self.max_series:
                count = self._listed_other_requests(_OTHER3)
            else:
                # An int never equals "other": only an odd status needs the full comparison.
                if not status_is_code and key == _OTHER3:
                    count = self._listed_other_requests(key)
                else:
                    count = _Count(key)
                    self._request_counts.append(count)
                if cell is None:
                    cell = self._new_model_cell(model)
                if tenant_cell is None:
                    tenant_cell = cell.new_tenant_cell(tenant)
                tenant_cell.keep_request_count(status, status_code, status_is_code, count)
        count.exact += 1  # one per request: a long long cannot overflow

        # tokens[(model, tenant, kind)] += amount, for a truthy amount
        if direct:
            prompt = <object>slots[_PROMPT_TOKENS]
            completion = <object>slots[_COMPLETION_TOKENS]
        else:
            prompt = record.prompt_tokens
            completion = record.completion_tokens
        cdef long long prompt_value = 0, completion_value = 0
        cdef bint prompt_fits = _fits_long_long(prompt, &prompt_value)
        cdef bint completion_fits = _fits_long_long(completion, &completion_value)
        tenant_cell = self._add_tokens(cell, tenant_cell, model, tenant, _PROMPT, prompt, prompt_fits, prompt_value)
        tenant_cell = self._add_tokens(
            cell, tenant_cell, model, tenant, _COMPLETION, completion, completion_fits, completion_value
        )
        if cell is None and tenant_cell is not None:
            cell = self._model_cell(model)  # made for the model's first tokens

        # 2xx: the model's histograms
        if status_is_code:
            if not 200 <= status_code < 300:
                return
        elif not 200 <= status < 300:
            return
        cdef ModelSeries series = cell.series if cell is not None else None
        if series is None:
            series = self.series(model)
            if cell is not None:
                cell.series = series
        if direct:
            received = <object>slots[_RECEIVED_AT]
            finished = <object>slots[_FINISHED_AT]
            first = <object>slots[_FIRST_TOKEN_AT]
        else:
            received = record.received_at
            finished = record.finished_at
            first = record.first_token_at
        if not (
            PyFloat_CheckExact(received)
            and (finished is None or PyFloat_CheckExact(finished))
            and (first is None or PyFloat_CheckExact(first))
        ):
            self._time_objects(series, received, finished, first, completion)
            return
        cdef double received_s = PyFloat_AS_DOUBLE(received), finished_s = 0.0, first_s
        if finished is not None:
            finished_s = PyFloat_AS_DOUBLE(finished)
            if finished_s >= received_s:
                series.duration.add(finished_s - received_s)
        if first is not None:
            first_s = PyFloat_AS_DOUBLE(first)
            if first_s >= received_s:
                series.ttft.add(first_s - received_s)
                if finished is not None and completion is not None:
                    if completion_fits:
                        if completion_value > 1 and finished_s >= first_s:
                            series.tpot.add((finished_s - first_s) / <double>(completion_value - 1))
                    elif completion > 1 and finished_s >= first_s:
                        series.tpot.add((finished_s - first_s) / (completion - 1))

    cdef int _time_objects(self, ModelSeries series, received, finished, first, completion) except -1:
        """The histograms' part of observe for timestamps that are not all floats: Python arithmetic."""
        if finished is not None and finished >= received:
            series.duration.add(finished - received)
        if first is not None and first >= received:
            series.ttft.add(first - received)
            if finished is not None and completion is not None and completion > 1 and finished >= first:
                series.tpot.add((finished - first) / (completion - 1))
        return 0

    cdef inline _ModelCell _model_cell(self, model):
        """The cell of ``model``, or None when it has none yet."""
        cdef _ModelCell last = self._last_cell
        if last is not None and (
            model is last.model
            or (PyUnicode_CheckExact(model) and PyUnicode_CheckExact(last.model) and _same_str(model, last.model))
        ):
            return last  # the same text: the dict would answer the same
        found = self._cells.get(model)
        if found is None:
            return None
        self._last_cell = <_ModelCell>found
        return <_ModelCell>found

    cdef _ModelCell _new_model_cell(self, model):
        cdef _ModelCell made = _ModelCell(model)
        self._cells[model] = made
        self._last_cell = made
        return made

    cdef _Count _listed_other_requests(self, tuple key):
        """The "other" requests _Count, listed (under ``key``, equal to _OTHER3) when first used."""
        cdef _Count other = self._other_requests
        if not self._other_requests_listed:
            self._other_requests_listed = True
            other.key = key
            self._request_counts.append(other)
        return other

    cdef inline _TenantCell _add_tokens(
        self, _ModelCell cell, _TenantCell tenant_cell, model, tenant, str kind, amount, bint fits, long long value
    ):
        """tokens[(model, tenant, kind)] += amount, for a truthy amount; the tenant cell after it."""
        cdef bint truthy
        if fits:
            truthy = value != 0  # an int is true when not 0: no truthiness call for the usual amounts
        else:
            truthy = amount
        if not truthy:
            return tenant_cell
        cdef _Count count = None
        if tenant_cell is not None:
            count = tenant_cell.prompt_tokens if kind is _PROMPT else tenant_cell.completion_tokens
        if count is not None:
            count.add(amount, fits, value)
            return tenant_cell
        return self._add_first_tokens(cell, tenant_cell, model, tenant, kind, amount, fits, value)

    cdef _TenantCell _add_first_tokens(
        self, _ModelCell cell, _TenantCell tenant_cell, model, tenant, str kind, amount, bint fits, long long value
    ):
        """Add the first tokens of (model, tenant, kind); the tenant cell, made if they made a key.

        The amount is added before its key is listed: an amount that cannot be added lists
        nothing, as the twin's ``tokens[key] = tokens.get(key, 0) + amount``.
        """
        cdef _Count count
        if len(self._token_counts) >= self.max_series:
            count = self._other_tokens
            count.add(amount, fits, value)
            if not self._other_tokens_listed:
                self._other_tokens_listed = True
                self._token_counts.append(count)
            if tenant_cell is None:
                return None  # no key of its own: no cell
        else:
            count = _Count((model, tenant, kind))
            count.add(amount, fits, value)
            self._token_counts.append(count)
            if tenant_cell is None:
                if cell is None:
                    cell = self._new_model_cell(model)
                tenant_cell = cell.new_tenant_cell(tenant)
        # "other" stays its answer: (model, tenant, kind) can never be listed once max_series are
        if kind is _PROMPT:
            tenant_cell.prompt_tokens = count
        else:
            tenant_cell.completion_tokens = count
        return tenant_cell

    cdef int _learn_layout(self, PyTypeObject *cls) except -1:
        """How to read the fields of a ``cls`` record, kept until ``cls`` (or its version) changes."""
        self._layout_direct = _slot_offsets(cls, self._offsets)
        if _version_valid(cls):
            self._layout_type = <object>cls
            self._layout_version = (<_TypeFields *>cls).tp_version_tag
        else:
            self._layout_type = None  # no version to trust: look again next time
        return 0


def _keeps_layout(RequestTally tally, cls):
    """Whether ``tally`` keeps how to read ``cls`` records, not looking again per record (for tests)."""
    return tally._layout_type is cls
