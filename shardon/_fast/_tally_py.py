"""Per-request tallies behind the gateway's Prometheus metrics: the reference implementation.

`RequestTally.observe(record)` runs once per finished request, on the event loop: it counts the
request by ``(model, status, tenant)``, adds its tokens by ``(model, tenant, kind)``, and for a 2xx
request puts its duration, time to first token and time per output token into the model's three
`Histogram` s. ``shardon.metrics`` turns the tallies into metric families when ``/metrics`` is
scraped; nothing here knows Prometheus.

Cardinality is bounded: once a dict holds ``max_series`` keys, a new key is counted under
``("other", ...)`` (the model names come from clients). Histogram buckets follow Prometheus' ``le``:
a value lands in the first bucket whose upper bound is >= it (``bisect_left``); the last bucket is
``+Inf``.

The exact rules, which the compiled twin keeps to the letter:

- ``requests`` counts each request under ``(model, status, tenant)`` (``None`` is a value like any
  other). A key not yet counted when ``requests`` already holds ``max_series`` keys is counted under
  ``("other", "other", "other")`` instead (so ``requests`` ends with at most ``max_series + 1`` keys).
- ``tokens`` adds ``prompt_tokens`` under ``(model, tenant, "prompt")`` and ``completion_tokens`` under
  ``(model, tenant, "completion")``, each only when truthy (a failed request that used tokens counts
  them too), with the same ``max_series`` rule. A total is ``0 + amount + amount ...`` in arrival order.
- Only a 2xx request is timed, in ``series(model)``: that model's histograms, or ``"other"``'s for a
  model first timed when ``max_series`` models already have some. Duration is ``finished_at -
  received_at`` and time to first token ``first_token_at - received_at``, each when known and not
  negative; time per output token ``(finished_at - first_token_at) / (completion_tokens - 1)`` when the
  first token was timed, ``completion_tokens > 1`` and it is not negative.
- ``observe_later(record)`` holds the record and observes the held ones, in order, once ``defer``
  are held or at the next read of ``requests``, ``tokens`` or ``models`` (or `drain`): the same
  counts as `observe`, batched (see ``_tally_c.pyx`` for why). A held record that raises is
  skipped and counted in ``unobserved`` (``drain`` returns how many did).
- ``requests``, ``tokens`` and ``models`` are read-only snapshots (fresh dicts, in first-seen order;
  ``models``' values are the live `ModelSeries`): the compiled twin does not keep these dicts but
  builds them when asked (at scrape time).

``shardon/_fast/_tally_c.pyx`` is the compiled twin (same API, same results); ``shardon._fast.tally``
selects.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from collections.abc import Iterable
from itertools import pairwise
from typing import Any

__all__ = ["OTHER", "Histogram", "ModelSeries", "RequestTally"]

OTHER = "other"
_OTHER3 = (OTHER, OTHER, OTHER)


class Histogram:
    """Bucket counts and the sum of the observed values, for upper ``bounds`` (ascending)."""

    __slots__ = ("_counts", "bounds", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = _check_bounds(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def counts(self) -> list[int]:
        """Per bucket (not cumulative), the ``+Inf`` bucket last."""
        return list(self._counts)

    @property
    def count(self) -> int:
        return sum(self._counts)


class ModelSeries:
    """A model's three latency histograms."""

    __slots__ = ("duration", "tpot", "ttft")

    def __init__(
        self, duration_bounds: tuple[float, ...], ttft_bounds: tuple[float, ...], tpot_bounds: tuple[float, ...]
    ) -> None:
        self.duration = Histogram(duration_bounds)
        self.ttft = Histogram(ttft_bounds)
        self.tpot = Histogram(tpot_bounds)


class RequestTally:
    """The per-request counters and histograms (see the module docstring)."""

    __slots__ = (
        "_later",
        "_models",
        "_requests",
        "_tokens",
        "defer",
        "duration_bounds",
        "max_series",
        "tpot_bounds",
        "ttft_bounds",
        "unobserved",
    )

    def __init__(
        self,
        max_series: int,
        duration_bounds: Iterable[float],
        ttft_bounds: Iterable[float],
        tpot_bounds: Iterable[float],
        defer: int = 64,
    ) -> None:
        if max_series < 1:
            raise ValueError("max_series must be >= 1")
        if defer < 1:
            raise ValueError("defer must be >= 1")
        self.defer = defer
        self.unobserved = 0
        self._later: deque[Any] = deque()
        self.max_series = max_series
        self.duration_bounds = _check_bounds(duration_bounds)
        self.ttft_bounds = _check_bounds(ttft_bounds)
        self.tpot_bounds = _check_bounds(tpot_bounds)
        self._requests: dict[tuple[Any, ...], int] = {}
        self._tokens: dict[tuple[Any, ...], int] = {}
        self._models: dict[Any, ModelSeries] = {}

    @property
    def requests(self) -> dict[tuple[Any, ...], int]:
        """Request counts by ``(model, status, tenant)`` (a snapshot)."""
        self.drain()
        return dict(self._requests)

    @property
    def tokens(self) -> dict[tuple[Any, ...], int]:
        """Token totals by ``(model, tenant, "prompt"|"completion")`` (a snapshot)."""
        self.drain()
        return dict(self._tokens)

    @property
    def models(self) -> dict[Any, ModelSeries]:
        """Each timed model's histograms (a snapshot of the live `ModelSeries`)."""
        self.drain()
        return dict(self._models)

    def observe_later(self, record: Any) -> None:
        """`observe` ``record`` with the next ones: ``defer`` at a time, or at the next read."""
        later = self._later
        later.append(record)
        if len(later) >= self.defer:
            self.drain()

    def drain(self) -> int:
        """Observe the records held, in order; how many raised (also added to ``unobserved``)."""
        later = self._later
        failed = 0
        while later:
            record = later.popleft()
            try:
                self.observe(record)
            except Exception:  # a record no series can take (the gateway's can): counted, not raised
                failed += 1
        self.unobserved += failed
        return failed

    def series(self, model: Any) -> ModelSeries:
        """The histograms of ``model`` (``"other"``'s once ``max_series`` models have some)."""
        models = self._models
        found = models.get(model)
        if found is not None:
            return found
        if len(models) >= self.max_series:
            model = OTHER
            found = models.get(model)
            if found is not None:
                return found
        found = models[model] = ModelSeries(self.duration_bounds, self.ttft_bounds, self.tpot_bounds)
        return found

    def observe(self, record: Any) -> None:
        """Count one finished request (a `RequestRecord`, or anything with its fields)."""
        model = record.model
        tenant = record.tenant
        status = record.status
        requests = self._requests
        key: tuple[Any, ...] = (model, status, tenant)
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
        series = self.series(model)
        received = record.received_at
        finished = record.finished_at
        first = record.first_token_at
        if finished is not None and finished >= received:
            series.duration.observe(finished - received)
        if first is not None and first >= received:
            series.ttft.observe(first - received)
            if finished is not None and completion is not None and completion > 1 and finished >= first:
                series.tpot.observe((finished - first) / (completion - 1))

    def _add_tokens(self, key: tuple[Any, ...], amount: int) -> None:
        tokens = self._tokens
        if key not in tokens and len(tokens) >= self.max_series:
            key = _OTHER3
        tokens[key] = tokens.get(key, 0) + amount


def _check_bounds(bounds: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(b) for b in bounds)
    if not out:
        raise ValueError("a histogram needs at least one bucket bound")
    if any(b != b for b in out) or any(a >= b for a, b in pairwise(out)):
        raise ValueError("histogram bounds must be ascending numbers")
    return out
