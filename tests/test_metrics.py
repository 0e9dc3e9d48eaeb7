"""Prometheus metrics (shardon.metrics): each Metrics has its own registry; render() parses back."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shardon.metrics import CONTENT_TYPE_LATEST, Metrics
from shardon.store import RequestRecord


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, ctype = m.render()
    assert ctype == CONTENT_TYPE_LATEST
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return samples(m).get((name, tuple(sorted(labels.items()))))


def rec(**kw: Any) -> RequestRecord:
    kw.setdefault("received_at", 1000.0)
    kw.setdefault("status", 200)
    return RequestRecord(**kw)


def test_observe_request_counts_and_histograms() -> None:
    m = Metrics()
    for _ in range(3):
        m.observe_request(
            rec(
                model="m1",
                tenant="a",
                first_token_at=1000.25,
                finished_at=1002.25,
                prompt_tokens=10,
                completion_tokens=5,
            )
        )
    m.observe_request(rec(model="m1", tenant="a", status=429))
    m.observe_request(rec(model="m1", tenant="b", status=499, finished_at=1050.0, completion_tokens=2))
    m.observe_request(rec(status=401))  # nothing known yet: labels say "unknown"

    assert value(m, "shardon_requests_total", model="m1", status="200", tenant="a") == 3
    assert value(m, "shardon_requests_total", model="m1", status="429", tenant="a") == 1
    assert value(m, "shardon_requests_total", model="m1", status="499", tenant="b") == 1
    assert value(m, "shardon_requests_total", model="unknown", status="401", tenant="unknown") == 1
    assert value(m, "shardon_tokens_total", model="m1", tenant="a", kind="prompt") == 30
    assert value(m, "shardon_tokens_total", model="m1", tenant="a", kind="completion") == 15
    assert value(m, "shardon_tokens_total", model="m1", tenant="b", kind="completion") == 2  # partial usage

    # histograms: successful requests only
    assert value(m, "shardon_request_duration_seconds_count", model="m1") == 3
    assert value(m, "shardon_request_duration_seconds_sum", model="m1") == pytest.approx(6.75)
    assert value(m, "shardon_request_duration_seconds_bucket", model="m1", le="2.5") == 3
    assert value(m, "shardon_request_duration_seconds_bucket", model="m1", le="1.0") == 0
    assert value(m, "shardon_time_to_first_token_seconds_sum", model="m1") == pytest.approx(0.75)
    assert value(m, "shardon_time_to_first_token_seconds_bucket", model="m1", le="0.25") == 3
    # (2.25 - 0.25) s over 4 tokens after the first
    assert value(m, "shardon_time_per_output_token_seconds_sum", model="m1") == pytest.approx(1.5)
    assert value(m, "shardon_time_per_output_token_seconds_count", model="m1") == 3


def test_gauges_rate_limits_and_model_events() -> None:
    m = Metrics()
    m.set_queue_depth("m1", "high", 4)
    m.set_queue_depth("m1", "high", 2)
    m.set_queue_depth("m1", "low", 7)
    m.set_inflight("n1", 3)
    m.set_node_up("n1", True)
    m.set_node_up("n2", False)
    m.rate_limited("a", "requests")
    m.rate_limited("a", "requests")
    m.rate_limited("b", "tokens")
    m.model_event("m1", "load", load_seconds=12.5)
    m.model_event("m1", "unload")
    m.model_event("m1", "load", load_seconds=3.0)

    assert value(m, "shardon_queue_depth", model="m1", priority="high") == 2
    assert value(m, "shardon_queue_depth", model="m1", priority="low") == 7
    assert value(m, "shardon_inflight", node="n1") == 3
    assert value(m, "shardon_node_up", node="n1") == 1
    assert value(m, "shardon_node_up", node="n2") == 0
    assert value(m, "shardon_rate_limited_total", tenant="a", kind="requests") == 2
    assert value(m, "shardon_rate_limited_total", tenant="b", kind="tokens") == 1
    assert value(m, "shardon_model_events_total", model="m1", event="load") == 2
    assert value(m, "shardon_model_events_total", model="m1", event="unload") == 1
    assert value(m, "shardon_model_load_seconds_count", model="m1") == 2
    assert value(m, "shardon_model_load_seconds_sum", model="m1") == pytest.approx(15.5)

    m.forget_node("n2")
    s = samples(m)
    assert ("shardon_node_up", (("node", "n2"),)) not in s
    assert s[("shardon_node_up", (("node", "n1"),))] == 1


def test_every_family_is_exposed_with_its_type() -> None:
    m = Metrics()
    body, _ = m.render()
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    expected = {
        "shardon_requests": "counter",
        "shardon_tokens": "counter",
        "shardon_metrics_unobserved": "counter",
        "shardon_rate_limited": "counter",
        "shardon_model_events": "counter",
        "shardon_queue_depth": "gauge",
        "shardon_inflight": "gauge",
        "shardon_node_up": "gauge",
        "shardon_request_duration_seconds": "histogram",
        "shardon_time_to_first_token_seconds": "histogram",
        "shardon_time_per_output_token_seconds": "histogram",
        "shardon_model_load_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert families.get(name) == kind, name
    assert any(name.startswith("process_") for name in families)


def test_instances_are_independent_and_off_the_global_registry() -> None:
    a, b = Metrics(), Metrics(process_metrics=False)
    a.observe_request(rec(model="m", tenant="t"))
    assert value(a, "shardon_requests_total", model="m", status="200", tenant="t") == 1
    assert value(b, "shardon_requests_total", model="m", status="200", tenant="t") is None
    assert REGISTRY.get_sample_value("shardon_requests_total", {"model": "m", "status": "200", "tenant": "t"}) is None
    assert not any(k[0].startswith("process_") for k in samples(b))


def test_disabled_metrics_are_no_ops() -> None:
    m = Metrics(enabled=False)
    m.observe_request(rec(model="m", finished_at=1001.0, completion_tokens=3))
    m.set_queue_depth("m", "low", 1)
    m.set_inflight("n", 1)
    m.set_node_up("n", True)
    m.forget_node("n")
    m.rate_limited("t", "requests")
    m.model_event("m", "load", 1.0)
    body, ctype = m.render()
    assert body == b"" and ctype == CONTENT_TYPE_LATEST
    assert list(text_string_to_metric_families(body.decode())) == []


def test_label_cardinality_is_bounded() -> None:
    m = Metrics(max_series=3, process_metrics=False)
    for i in range(10):
        m.observe_request(rec(model=f"m{i}", tenant="t", status=404))
    s = samples(m)
    series = {k for k in s if k[0] == "shardon_requests_total"}
    assert len(series) == 4  # three real label sets and "other"
    assert s[("shardon_requests_total", (("model", "other"), ("status", "other"), ("tenant", "other")))] == 7
    assert sum(s[k] for k in series) == 10
    assert len(m._hot.tally.requests) == 4  # three real label sets and "other": it grows no further


def test_request_series_are_plain_aggregates() -> None:
    m = Metrics(process_metrics=False)
    r = rec(model="m", tenant="t", finished_at=1001.0, first_token_at=1000.5, completion_tokens=3)
    m.observe_request(r)
    m.observe_request(r)
    assert m._hot.tally.requests == {("m", 200, "t"): 2}
    hist = m._hot.tally.models["m"].ttft
    assert sum(hist.counts) == 2 and hist.sum > 0


def test_a_record_the_series_cannot_take_is_counted_as_unobserved() -> None:
    m = Metrics()
    assert value(m, "shardon_metrics_unobserved_total") == 0
    m.observe_request(rec(model="m1", tenant="a", prompt_tokens="ten"))  # type: ignore[arg-type]
    m.observe_request(rec(model="m1", tenant="a"))
    assert value(m, "shardon_metrics_unobserved_total") == 1
    # The request counter comes before the tokens, where the bad record raised: it has both.
    assert value(m, "shardon_requests_total", model="m1", status="200", tenant="a") == 2
    assert value(m, "shardon_tokens_total", model="m1", tenant="a", kind="prompt") is None
