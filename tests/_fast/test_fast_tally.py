"""The metrics' per-request tallies, against both implementations (compiled and pure Python)."""

from __future__ import annotations

import importlib
import math
import os
import random
from bisect import bisect_left
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
BOUNDS = (0.125, 0.5, 2.0)  # binary fractions: the test's differences are exact


def _load(name: str) -> ModuleType:
    if name == "py":
        return importlib.import_module("shardon._fast._tally_py")
    try:
        return importlib.import_module("shardon._fast._tally_c")
    except ImportError as exc:
        pytest.skip(f"compiled tallies (shardon._fast._tally_c) not built: {exc}")


@pytest.fixture(params=["c", "py"])
def tally_mod(request: pytest.FixtureRequest) -> ModuleType:
    return _load(request.param)


def rec(**kw: Any) -> SimpleNamespace:
    fields: dict[str, Any] = {
        "model": "m",
        "tenant": "t",
        "status": 200,
        "prompt_tokens": None,
        "completion_tokens": None,
        "received_at": 1000.0,
        "first_token_at": None,
        "finished_at": None,
    }
    fields.update(kw)
    return SimpleNamespace(**fields)


def new(mod: ModuleType, max_series: int = 100) -> Any:
    return mod.RequestTally(max_series, BOUNDS, BOUNDS, BOUNDS)


def test_counts_requests_by_model_status_and_tenant(tally_mod: ModuleType) -> None:
    t = new(tally_mod)
    t.observe(rec())
    t.observe(rec())
    t.observe(rec(status=404, tenant=None))
    assert t.requests == {("m", 200, "t"): 2, ("m", 404, None): 1}
    assert t.tokens == {}
    assert set(t.models) == {"m"}  # only the 2xx request has timings


def test_tokens_by_kind(tally_mod: ModuleType) -> None:
    t = new(tally_mod)
    t.observe(rec(prompt_tokens=7, completion_tokens=16))
    t.observe(rec(prompt_tokens=3, completion_tokens=0))
    t.observe(rec(status=499, completion_tokens=2))  # a client that left still used tokens
    assert t.tokens == {("m", "t", "prompt"): 10, ("m", "t", "completion"): 18}


def test_histograms_follow_prometheus_le(tally_mod: ModuleType) -> None:
    t = new(tally_mod)
    # duration 0.5 (exactly a bound: that bucket), ttft 0.0625, tpot (0.5 - 0.0625) / (8 - 1) = 0.0625
    t.observe(rec(first_token_at=1000.0625, finished_at=1000.5, completion_tokens=8))
    series = t.models["m"]
    assert series.duration.counts == [0, 1, 0, 0]
    assert series.ttft.counts == [1, 0, 0, 0]
    assert series.tpot.counts == [1, 0, 0, 0]
    assert series.duration.sum == 0.5
    assert series.tpot.sum == 0.0625
    assert series.duration.bounds == BOUNDS and series.duration.count == 1


def test_timings_that_cannot_be_measured_are_skipped(tally_mod: ModuleType) -> None:
    t = new(tally_mod)
    t.observe(rec(first_token_at=999.0, finished_at=998.0, completion_tokens=5))  # a clock step back
    t.observe(rec(first_token_at=1000.5, finished_at=None, completion_tokens=5))  # no end
    t.observe(rec(first_token_at=1000.5, finished_at=1001.0, completion_tokens=1))  # one token: no tpot
    t.observe(rec(status=503, first_token_at=1000.5, finished_at=1001.0))  # not a success
    series = t.models["m"]
    assert series.duration.count == 1
    assert series.ttft.count == 2
    assert series.tpot.count == 0
    assert sum(t.requests.values()) == 4


def test_cardinality_is_bounded(tally_mod: ModuleType) -> None:
    t = new(tally_mod, max_series=3)
    for i in range(10):
        t.observe(rec(model=f"m{i}", prompt_tokens=1))
    assert len(t.requests) == 4 and t.requests[("other", "other", "other")] == 7
    assert len(t.tokens) == 4 and t.tokens[("other", "other", "other")] == 7
    assert set(t.models) == {"m0", "m1", "m2", "other"}
    assert t.models["other"].duration.count == 0  # no finished_at: counted, not timed
    assert t.series("m1") is t.models["m1"]
    assert t.series("new-model") is t.models["other"]


def test_bad_bounds_and_sizes_are_refused(tally_mod: ModuleType) -> None:
    for bounds in ((), (1.0, 0.5), (1.0, 1.0), (float("nan"),)):
        with pytest.raises(ValueError):
            tally_mod.Histogram(bounds)
    with pytest.raises(ValueError):
        tally_mod.RequestTally(0, BOUNDS, BOUNDS, BOUNDS)


def test_histogram_matches_bisect_left(tally_mod: ModuleType) -> None:
    bounds = (0.001, 0.0025, 0.005, 0.01, 0.05, 0.5, 1.0, 10.0)
    h = tally_mod.Histogram(bounds)
    expected = [0] * (len(bounds) + 1)
    rng = random.Random(7)
    values = [*bounds, 0.0, -1.0, 1e9, math.inf, *(rng.uniform(0, 12) for _ in range(2000))]
    total = 0.0
    for v in values:
        h.observe(v)
        expected[bisect_left(bounds, v)] += 1
        total += v
    assert h.counts == expected
    assert h.sum == total


def test_both_implementations_agree(request: pytest.FixtureRequest) -> None:
    if FORCED:
        pytest.skip("SHARDON_NO_EXTENSIONS: only the twins")
    c, py = _load("c"), _load("py")
    rng = random.Random(11)
    tallies = [new(c, max_series=5), new(py, max_series=5)]
    for _ in range(3000):
        received = 1000.0 + rng.random()
        r = rec(
            model=rng.choice(["a", "b", "c", "d", "e", "f", None]),
            tenant=rng.choice(["x", "y", None]),
            status=rng.choice([200, 200, 201, 400, 499, 503]),
            prompt_tokens=rng.choice([None, 0, 5, 100]),
            completion_tokens=rng.choice([None, 0, 1, 2, 64]),
            received_at=received,
            first_token_at=rng.choice([None, received + rng.random() * 0.2, received - 0.1]),
            finished_at=rng.choice([None, received + rng.random() * 3]),
        )
        for t in tallies:
            t.observe(r)
    ct, pt = tallies
    assert ct.requests == pt.requests
    assert ct.tokens == pt.tokens
    assert set(ct.models) == set(pt.models)
    for model in ct.models:
        for name in ("duration", "ttft", "tpot"):
            hc, hp = getattr(ct.models[model], name), getattr(pt.models[model], name)
            assert hc.counts == hp.counts
            assert hc.sum == hp.sum  # the same additions in the same order: bit-identical


def test_compiled_tally_loaded() -> None:
    """The metrics use the compiled tallies (fails when they were not built)."""
    import shardon._fast.tally as tally
    from shardon.metrics import Metrics

    m = Metrics(process_metrics=False)
    if FORCED:
        assert not tally.TALLY_COMPILED
        assert type(m._hot.tally).__module__ == "shardon._fast._tally_py"
        return
    assert tally.TALLY_COMPILED, "shardon._fast._tally_c not built (python setup.py build_ext --inplace)"
    assert type(m._hot.tally).__module__ == "shardon._fast._tally_c"
