"""Prometheus metrics for the gateway.

Each `Metrics` owns its own `CollectorRegistry` (never the process-global one), so several can live
in one process (tests, embedded use). ``render()`` gives the exposition body and content type for
``GET /metrics``.

Metrics (label values that are None are reported as ``unknown``)::

    shardon_requests_total{model,status,tenant}              counter  one per finished request
    shardon_tokens_total{model,tenant,kind}                  counter  kind = prompt | completion
    shardon_rate_limited_total{tenant,kind}                  counter  kind = the limit hit
    shardon_model_events_total{model,event}                  counter  load, unload, evict, fail, ...
    shardon_queue_depth{model,priority}                      gauge
    shardon_inflight{node}                                   gauge
    shardon_node_up{node}                                    gauge    1 healthy, 0 down
    shardon_node_circuit{node}                               gauge    0 closed, 1 half-open, 2 open
    shardon_node_draining{node}                              gauge    1 while draining
    shardon_node_reported_requests{node,state}               gauge    what the node reports:
                                                                        state = running | waiting
    shardon_node_kv_cache_usage{node}                        gauge    the node's KV cache in use (0-1)
    shardon_request_duration_seconds{model}                  histogram  received → finished
    shardon_time_to_first_token_seconds{model}               histogram  received → first token
    shardon_time_per_output_token_seconds{model}             histogram  (finished - first token)
                                                                        / (completion_tokens - 1)
    shardon_model_load_seconds{model}                        histogram
    shardon_metrics_unobserved_total                         counter  requests whose record raised
                                                                        while counted (a bug if > 0)

The histograms observe successful (2xx) requests only, like the admin stats of the request log;
failures are visible in ``shardon_requests_total`` by status. Plus the standard ``process_*`` and
``python_gc_*`` collectors when ``process_metrics`` is true.

Hot path: the labelled children are cached in dicts keyed by label tuple, so an observation is a dict
lookup and an ``inc``/``observe``; ``.labels()`` runs once per new label set. To bound cardinality
(model names come from clients), a metric that already has ``max_series`` label sets maps new ones to
``other``. With ``enabled=False`` every method returns at once and ``render()`` returns an empty body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric

from ._fast.tally import OTHER, RequestTally

if TYPE_CHECKING:
    from shardon.store import RequestRecord

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_INF = float("inf")

UNKNOWN = "unknown"

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
LOAD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

M = TypeVar("M", Counter, Gauge, Histogram)


class _Family:
    """A labelled metric and its cache of children, keyed by the tuple of label values."""

    __slots__ = ("children", "max_series", "metric")

    def __init__(self, metric: Any, max_series: int) -> None:
        self.metric = metric
        self.children: dict[tuple[Any, ...], Any] = {}
        self.max_series = max_series

    def child(self, key: tuple[Any, ...]) -> Any:
        c = self.children.get(key)
        if c is None:
            c = self._new(key)
        return c

    def _new(self, key: tuple[Any, ...]) -> Any:
        if len(self.children) >= self.max_series:
            # Full: the key is not cached (the cache must not grow with client-chosen names).
            return self.metric.labels(*((OTHER,) * len(key)))
        c = self.metric.labels(*(UNKNOWN if v is None else str(v) for v in key))
        self.children[key] = c
        return c

    def forget(self, match: Callable[[tuple[Any, ...]], bool]) -> None:
        for key in [k for k in self.children if match(k)]:
            self.children.pop(key)
            with contextlib.suppress(KeyError):
                self.metric.remove(*(UNKNOWN if v is None else str(v) for v in key))


class Metrics:
    """The gateway's Prometheus metrics, on a private registry (see the module docstring)."""

    def __init__(self, enabled: bool = True, *, max_series: int = 10_000, process_metrics: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        if not enabled:
            return
        reg = self.registry
        if process_metrics:
            ProcessCollector(registry=reg)
            GCCollector(registry=reg)

        def fam(cls: type[M], name: str, doc: str, labels: Sequence[str], **kw: Any) -> _Family:
            return _Family(cls(name, doc, labels, registry=reg, **kw), max_series)

        # The per-request series are plain dicts and lists updated without locks on the event
        # loop, and turned into metric families only when scraped (see _RequestCollector).
        self._hot = _RequestCollector(max_series)
        reg.register(self._hot)
        self.observe_request = self._hot.observe  # type: ignore[method-assign]  # one call per request
        self._rate_limited = fam(
            Counter,
            "shardon_rate_limited_total",
            "Requests refused or delayed by a rate limit.",
            ("tenant", "kind"),
        )
        self._model_events = fam(
            Counter,
            "shardon_model_events_total",
            "Model lifecycle events (load, unload, evict, fail...).",
            ("model", "event"),
        )
        self._queue_depth = fam(
            Gauge, "shardon_queue_depth", "Requests waiting, by model and priority.", ("model", "priority")
        )
        self._inflight = fam(Gauge, "shardon_inflight", "Requests running on a node.", ("node",))
        self._node_up = fam(Gauge, "shardon_node_up", "1 if the node is healthy, else 0.", ("node",))
        self._circuit = fam(
            Gauge, "shardon_node_circuit", "The node's circuit: 0 closed, 1 half-open, 2 open.", ("node",)
        )
        self._draining = fam(Gauge, "shardon_node_draining", "1 while the node drains, else 0.", ("node",))
        self._reported = fam(
            Gauge,
            "shardon_node_reported_requests",
            "Requests the node reports (all its clients'), by state: running | waiting.",
            ("node", "state"),
        )
        self._kv_cache = fam(
            Gauge, "shardon_node_kv_cache_usage", "The KV cache in use the node reports (1 = full).", ("node",)
        )
        self._load = fam(
            Histogram,
            "shardon_model_load_seconds",
            "Time to load a model and see it healthy.",
            ("model",),
            buckets=LOAD_BUCKETS,
        )

    # -- the hot path ---------------------------------------------------------------------------

    def observe_request(self, record: RequestRecord) -> None:
        """Count a finished request and observe its timings (from the record's timestamps).

        (When enabled, the instance attribute set in ``__init__`` calls the collector directly.)
        """

    def set_queue_depth(self, model: str | None, priority: str | None, n: int) -> None:
        if self.enabled:
            self._queue_depth.child((model, priority)).set(n)

    def set_inflight(self, node: str, n: int) -> None:
        if self.enabled:
            self._inflight.child((node,)).set(n)

    def set_node_up(self, node: str, up: bool) -> None:
        if self.enabled:
            self._node_up.child((node,)).set(1 if up else 0)

    def set_node_state(self, node: str, circuit: int, draining: bool, load: dict[str, Any] | None) -> None:
        """A node's circuit, drain and reported load (``NodeLoad.public``; None: it reports none)."""
        if not self.enabled:
            return
        self._circuit.child((node,)).set(circuit)
        self._draining.child((node,)).set(1 if draining else 0)
        if load is None:
            self._reported.forget(lambda k: k[0] == node)
            self._kv_cache.forget(lambda k: k[0] == node)
            return
        self._reported.child((node, "running")).set(load["running"])
        self._reported.child((node, "waiting")).set(load["waiting"])
        if load["kv_cache_usage"] is not None:
            self._kv_cache.child((node,)).set(load["kv_cache_usage"])

    def forget_node(self, node: str) -> None:
        """Drop the series of a node that left the configuration."""
        if self.enabled:
            families = (self._inflight, self._node_up, self._circuit, self._draining, self._reported, self._kv_cache)
            for family in families:
                family.forget(lambda k: k[0] == node)

    def rate_limited(self, tenant: str | None, kind: str) -> None:
        if self.enabled:
            self._rate_limited.child((tenant, kind)).inc()

    def model_event(self, model: str, event: str, load_seconds: float | None = None) -> None:
        """Count a lifecycle event; ``load_seconds`` (for a completed load) feeds the load histogram."""
        if not self.enabled:
            return
        self._model_events.child((model, event)).inc()
        if load_seconds is not None and load_seconds >= 0:
            self._load.child((model,)).observe(load_seconds)

    # -- exposition -----------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for ``GET /metrics``."""
        if not self.enabled:
            return b"", CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _RequestCollector:
    """The per-request counters and histograms, exported when ``/metrics`` is scraped.

    ``prometheus_client`` takes a lock per ``inc``/``observe`` (it must be thread-safe); the gateway
    observes every request on one event-loop thread, so the series live in a `RequestTally`
    (``shardon._fast.tally``: compiled, with a pure-Python twin) of plain dicts and bucket counts,
    and this collector builds the metric families from it only when scraped, on that same thread.
    ``observe`` is the tally's ``observe_later``: one compiled call per request, which holds the
    record; the tally counts the held ones 64 at a time (cheaper: see ``_tally_c.pyx``) and before
    any read, so a scrape sees every request observed before it. Cardinality is bounded like the
    other series: past ``max_series`` label sets, new ones are counted under ``other``. The tally's
    ``requests``, ``tokens`` and ``models`` are snapshots built when read: read once per scrape.
    """

    def __init__(self, max_series: int) -> None:
        self.tally = RequestTally(max_series, DURATION_BUCKETS, TTFT_BUCKETS, TPOT_BUCKETS)
        self.observe = self.tally.observe_later  # observed in runs, and before each scrape

    def collect(self) -> Iterator[Metric]:
        def label(value: Any) -> str:
            return UNKNOWN if value is None else str(value)

        tally = self.tally

        requests = CounterMetricFamily(
            "shardon_requests",
            "Requests answered, by model, HTTP status and tenant.",
            labels=("model", "status", "tenant"),
        )
        for key, count in tally.requests.items():
            requests.add_metric([label(v) for v in key], count)
        yield requests
        tokens = CounterMetricFamily(
            "shardon_tokens",
            "Tokens processed, by model, tenant and kind (prompt|completion).",
            labels=("model", "tenant", "kind"),
        )
        for key, amount in tally.tokens.items():
            tokens.add_metric([label(v) for v in key], amount)
        yield tokens
        # Read after the series above, which first count the records held: a record that raised
        # part-way (a field of the wrong type: a bug) is counted here; the series it reached
        # before the error keep it, the others miss it.
        yield CounterMetricFamily(
            "shardon_metrics_unobserved",
            "Finished requests whose record raised while counted; some series miss them (0 unless a bug).",
            value=tally.unobserved,
        )
        docs = {
            "duration": ("shardon_request_duration_seconds", "Time from receipt to the end of the response."),
            "ttft": ("shardon_time_to_first_token_seconds", "Time from receipt to the first token."),
            "tpot": ("shardon_time_per_output_token_seconds", "Time per output token after the first."),
        }
        models = tally.models
        for name, (metric, doc) in docs.items():
            family = HistogramMetricFamily(metric, doc, labels=("model",))
            for model, series in models.items():
                hist = getattr(series, name)
                counts = hist.counts
                if hist.sum or any(counts):
                    family.add_metric([label(model)], _cumulative(hist.bounds, counts), hist.sum)
            yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus buckets (``le`` label, cumulative count) from per-bucket counts, ``+Inf`` last."""
    out = []
    running = 0
    for bound, count in zip((*bounds, _INF), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == _INF else repr(float(bound)), float(running)))
    return out
