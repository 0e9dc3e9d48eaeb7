# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# Per-request tallies behind the Prometheus metrics, compiled. Pure-Python twin and reference:
# _tally_py.py (same API, same results; its docstring is the specification).
#
# RequestTally.observe runs once per finished request on the event loop. The dicts stay Python
# dicts (the exporter iterates them at scrape time); what is compiled is the path between them:
# the record's fields read once into C locals, and each histogram a C array of bounds and counts
# searched by bisection:
#
#     lo, hi = 0, n                    # first bound >= value (bisect_left), n = the +Inf bucket
#     while lo < hi:
#         mid = (lo + hi) >> 1
#         if bounds[mid] < value: lo = mid + 1
#         else: hi = mid
#     counts[lo] += 1; sum += value
#
# A NaN compares false and lands in bucket 0, as with bisect_left. The sums are added in the
# twin's order, so both give bit-identical floats.

cimport cython

from cpython.mem cimport PyMem_Free, PyMem_Malloc

__all__ = ["OTHER", "Histogram", "ModelSeries", "RequestTally"]

OTHER = "other"
cdef tuple _OTHER3 = (OTHER, OTHER, OTHER)


cdef tuple _check_bounds(bounds):
    out = tuple([float(b) for b in bounds])
    if not out:
        raise ValueError("a histogram needs at least one bucket bound")
    if any([b != b for b in out]) or any([a >= b for a, b in zip(out, out[1:])]):
        raise ValueError("histogram bounds must be ascending numbers")
    return out


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
cdef class RequestTally:
    """The per-request counters and histograms (see _tally_py.py)."""

    cdef:
        readonly Py_ssize_t max_series
        readonly tuple duration_bounds
        readonly tuple ttft_bounds
        readonly tuple tpot_bounds
        readonly dict requests
        readonly dict tokens
        readonly dict models

    def __init__(self, Py_ssize_t max_series, duration_bounds, ttft_bounds, tpot_bounds):
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        self.max_series = max_series
        self.duration_bounds = _check_bounds(duration_bounds)
        self.ttft_bounds = _check_bounds(ttft_bounds)
        self.tpot_bounds = _check_bounds(tpot_bounds)
        self.requests = {}
        self.tokens = {}
        self.models = {}

    cpdef ModelSeries series(self, model):
        """The histograms of ``model`` (``"other"``'s once ``max_series`` models have some)."""
        cdef dict models = self.models
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
        model = record.model
        tenant = record.tenant
        status = record.status
        cdef dict requests = self.requests
        cdef tuple key = (model, status, tenant)
        count = requests.get(key)
        if count is None and len(requests) >= self.max_series:
            key = _OTHER3
            count = requests.get(key)
        requests[key] = (count or 0) + 1
        prompt = record.prompt_tokens
        completion = record.completion_tokens
        if prompt:
            self._add_tokens((model, tenant, "prompt"), prompt)
        if completion:
            self._add_tokens((model, tenant, "completion"), completion)
        if not 200 <= status < 300:
            return
        cdef ModelSeries series = self.series(model)
        cdef double received = record.received_at
        finished_at = record.finished_at
        first_at = record.first_token_at
        cdef double finished = 0.0, first = 0.0
        cdef bint has_finished = finished_at is not None
        if has_finished:
            finished = finished_at
            if finished >= received:
                series.duration.add(finished - received)
        if first_at is not None:
            first = first_at
            if first >= received:
                series.ttft.add(first - received)
                if has_finished and completion is not None and completion > 1 and finished >= first:
                    series.tpot.add((finished - first) / <double>(completion - 1))

    cdef _add_tokens(self, tuple key, amount):
        cdef dict tokens = self.tokens
        if key not in tokens and len(tokens) >= self.max_series:
            key = _OTHER3
        tokens[key] = tokens.get(key, 0) + amount
