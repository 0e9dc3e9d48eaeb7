"""The metrics' per-request tallies, against both implementations (compiled and pure Python)."""

from __future__ import annotations

import math
import os
import random
import sys
from bisect import bisect_left
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.support import twin

FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
BOUNDS = (0.125, 0.5, 2.0)  # binary fractions: the test's differences are exact


def _load(name: str) -> ModuleType:
    return twin("tally", name)


@pytest.fixture
def tally_mod(implementation: str) -> ModuleType:
    return _load(implementation)


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
    assert state(ct) == state(pt)


def state(t: Any) -> str:
    """Everything a tally shows, order and value types included (repr of floats is exact)."""
    hists = {
        model: [(h.counts, h.sum) for h in (series.duration, series.ttft, series.tpot)]
        for model, series in t.models.items()
    }
    return repr((list(t.requests.items()), list(t.tokens.items()), list(hists.items())))


def agree(records: list[Any], max_series: int) -> tuple[Any, Any]:
    """Observe ``records`` with both implementations; same exceptions, same state after each."""
    if FORCED:
        pytest.skip("SHARDON_NO_EXTENSIONS: only the twins")
    ct, pt = new(_load("c"), max_series), new(_load("py"), max_series)
    for i, r in enumerate(records):
        outcomes: list[type[BaseException] | None] = []
        for t in (ct, pt):
            try:
                t.observe(r)
                outcomes.append(None)
            except Exception as exc:  # the twin's exceptions are part of its results
                outcomes.append(type(exc))
        assert outcomes[0] is outcomes[1], (i, r, outcomes)
        assert state(ct) == state(pt), (i, r)
    return ct, pt


def test_overflow_through_cells_agrees() -> None:
    """Requests full before tokens, tokens full before models, new statuses and tenants of known cells."""
    records = [rec(model="a", tenant="x", status=200, prompt_tokens=None, finished_at=1001.0)]
    records += [rec(model="a", tenant="x", status=s) for s in (404, 429)]  # requests now full (3)
    records += [rec(model="b", tenant="x", prompt_tokens=2, finished_at=1001.0)]  # tokens, timed: new cell
    records += [rec(model="b", tenant="x", prompt_tokens=3, completion_tokens=1)]  # requests "other"
    records += [rec(model="a", tenant="y", status=503, completion_tokens=4)]  # a new tenant, all "other" but tokens
    records += [rec(model="a", tenant="x", status=500, prompt_tokens=1)]  # a new status of a known cell
    records += [rec(model=f"n{i}", tenant="z", status=200, prompt_tokens=1, finished_at=1002.0) for i in range(6)]
    records += [rec(model=m, tenant="x", status=200, finished_at=1003.0) for m in ("a", "b", "n0", "n5", "zz")]
    ct, _ = agree(records, max_series=3)
    assert len(ct.requests) == 4 and len(ct.tokens) == 4 and len(ct.models) == 4
    assert ct.requests[("other", "other", "other")] == len(records) - 4  # ("a", 200, "x") came twice


def test_same_model_as_other_str_objects_and_none_values() -> None:
    def fresh(text: str | None) -> str | None:
        return None if text is None else "".join(list(text))  # equal, not the same object

    records = []
    for i in range(40):
        model = [fresh("m1"), fresh("m2"), None, fresh("m1"), fresh("é"), fresh("m1\u20ac")][i % 6]
        tenant = [fresh("t"), None, "t"][i % 3]
        records.append(
            rec(model=model, tenant=tenant, status=[200, 200, 404][i % 3], prompt_tokens=i, completion_tokens=3)
        )
    ct, _ = agree(records, max_series=100)
    assert len(ct.requests) == len({(r.model, r.status, r.tenant) for r in records})
    assert ct.requests[("m1", 200, "t")] == 14  # 14 different str objects, one key


def test_odd_values_agree() -> None:
    """Equal keys of other types, amounts that are not small ints, timestamps that are not floats."""
    big = 2**63
    records = [
        rec(status=200, prompt_tokens=5),
        rec(status=200.0, prompt_tokens=True),  # equal to 200: the same key, its first form kept
        rec(status=True, completion_tokens=2),
        rec(status=1, completion_tokens=2.5),  # a float total from here on
        rec(status=1, completion_tokens=3),
        rec(prompt_tokens=big - 6),  # the long long total would overflow: Python ints from here
        rec(prompt_tokens=big * big),
        rec(prompt_tokens=-(big * 4), completion_tokens=-1),
        rec(status=2**70, prompt_tokens=1),  # a status beyond a C long
        rec(received_at=1000, first_token_at=1001, finished_at=1003, completion_tokens=3),  # ints
        rec(received_at=1000.0, first_token_at=1000.5, finished_at=1002, completion_tokens=big * 2),
        rec(received_at=1000.0, first_token_at=1000.5, finished_at=1002.0, completion_tokens=2.0),
        rec(received_at=float("nan"), first_token_at=1000.5, finished_at=1002.0, completion_tokens=9),
        rec(model="other", tenant="other", status="other"),  # the "other" key itself (then a TypeError)
        rec(model=["unhashable"]),  # TypeError before anything is counted
        rec(model="new", tenant={"un": "hashable"}),
        rec(model="m", status=[404]),
        rec(prompt_tokens="7"),  # truthy but not addable: TypeError, nothing listed
        rec(model="q", prompt_tokens="7"),
        rec(model="q", prompt_tokens=7),
        rec(status=201, received_at=None, finished_at=1000.0),  # TypeError at the comparison
        rec(status=201, received_at=None),  # nothing timed: no comparison, no error
    ]
    agree(records, max_series=8)
    agree(records, max_series=2)


def test_other_key_counted_before_overflow() -> None:
    """A request whose own key equals ("other", "other", "other") shares it with later overflow."""
    records = [rec(model="other", tenant="other", status="other"), rec(model="a"), rec(model="b"), rec(model="c")]
    ct, _ = agree(records, max_series=2)  # the first raises TypeError (a str status), counted
    assert list(ct.requests.items()) == [(("other", "other", "other"), 3), (("a", 200, "t"), 1)]


class SlotRecord:
    __slots__ = (
        "completion_tokens",
        "finished_at",
        "first_token_at",
        "model",
        "prompt_tokens",
        "received_at",
        "status",
        "tenant",
    )

    def __init__(self, **kw: Any) -> None:
        for name, value in vars(rec(**kw)).items():
            SlotRecord.__dict__[name].__set__(self, value)  # the slot, whatever a subclass made of the name


def test_record_fields_read_like_getattr() -> None:
    """Slots read directly only where getattr would read them; changed classes are looked at again."""
    from shardon.store import RequestRecord

    if FORCED:
        pytest.skip("SHARDON_NO_EXTENSIONS: only the twins")
    c = _load("c")
    assert c._reads_slots(RequestRecord)  # the gateway's records: the fast path
    assert c._reads_slots(SlotRecord)
    assert not c._reads_slots(SimpleNamespace)

    class Renamed(SlotRecord):
        __slots__ = ()

        @property
        def model(self) -> str:
            return "renamed"

    class Hooked(SlotRecord):
        __slots__ = ()

        def __getattribute__(self, name: str) -> Any:
            return "hooked" if name == "tenant" else object.__getattribute__(self, name)

    assert not c._reads_slots(Renamed) and not c._reads_slots(Hooked)

    class Mutable(SlotRecord):
        __slots__ = ()

    unset = SlotRecord(model="u", prompt_tokens=1)
    delattr(unset, "received_at")  # getattr raises AttributeError: after the request and its tokens count
    records: list[Any] = [
        RequestRecord(model="r", tenant="t", status=200, received_at=1000.0, finished_at=1001.0, prompt_tokens=3),
        SlotRecord(model="s", finished_at=1000.5),
        Renamed(model="s"),
        Hooked(model="s"),
        unset,
        RequestRecord(model="r", tenant="t", status=200, received_at=1000.0, completion_tokens=2),
        Mutable(model="before"),  # last: the type whose layout is kept
    ]
    ct, pt = agree(records, max_series=100)
    assert c._keeps_layout(ct, Mutable)  # not looked at again per record (3.13+: trusts a non-zero version tag)
    setattr(Mutable, "model", property(lambda self: "after"))  # noqa: B010 (a class changed after use)
    try:
        for t in (ct, pt):
            t.observe(Mutable(model="before"))
        assert state(ct) == state(pt)
        assert ("after", 200, "t") in ct.requests and ("before", 200, "t") in ct.requests
        assert ("renamed", 200, "t") in ct.requests and ("s", 200, "hooked") in ct.requests
        assert ("u", "t", "prompt") in ct.tokens
    finally:
        delattr(Mutable, "model")


def test_memory_is_bounded_whatever_the_clients_send(implementation: str) -> None:
    import gc
    import tracemalloc

    t = new(_load(implementation), max_series=10)
    records = [
        rec(model=f"model-{i}", tenant=f"tenant-{i % 7}", prompt_tokens=1, completion_tokens=2) for i in range(6000)
    ]
    for r in records[:1000]:
        t.observe(r)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for r in records[1000:]:
            t.observe(r)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 10_000, grown  # 5000 new models, none kept
    assert len(t.requests) == 11 and t.requests[("other", "other", "other")] == 5990


def test_compiled_tally_loaded() -> None:
    """The metrics use the compiled tallies (fails when they were not built)."""
    import shardon._fast.tally as tally
    from shardon.metrics import Metrics

    m = Metrics(process_metrics=False)
    if FORCED:
        assert not tally.TALLY_COMPILED
        assert type(m._hot.tally).__module__ == "shardon._fast._tally_py"
        return
    assert tally.TALLY_COMPILED, "shardon._fast._tally_c not built (pip install --no-deps -e .)"
    assert type(m._hot.tally).__module__ == "shardon._fast._tally_c"


# -- observe_later: the same counts, in runs ---------------------------------------------------------


def mixed_records(n: int, seed: int) -> list[Any]:
    """Records of a few models, tenants and statuses, timed or not, some that `observe` rejects."""
    rnd = random.Random(seed)
    out: list[Any] = []
    for i in range(n):
        if i % 37 == 5:
            out.append(rec(status="200"))  # a str status: observe raises TypeError after counting it
            continue
        first = 1000.0 + rnd.choice([0.0625, 0.25, 4.0]) if rnd.random() < 0.7 else None
        out.append(
            rec(
                model=rnd.choice(["a", "b", "c", None]),
                tenant=rnd.choice(["x", "y", None]),
                status=rnd.choice([200, 200, 201, 404, 429, 499, 503]),
                prompt_tokens=rnd.choice([None, 0, 3, 7]),
                completion_tokens=rnd.choice([None, 0, 1, 16]),
                first_token_at=first,
                finished_at=None if first is None else first + 0.5,
            )
        )
    return out


@pytest.mark.parametrize("defer", [1, 5, 64])
def test_observe_later_counts_what_observe_counts(tally_mod: ModuleType, defer: int) -> None:
    records = mixed_records(500, seed=defer)
    now, later = new(tally_mod, max_series=6), tally_mod.RequestTally(6, BOUNDS, BOUNDS, BOUNDS, defer)
    raised = 0
    for r in records:
        try:
            now.observe(r)
        except TypeError:
            raised += 1
        later.observe_later(r)
    assert raised > 0
    assert state(later) == state(now)  # the read observes what is held first
    assert later.unobserved == raised  # each rejected record counted, none raised to the caller
    assert later.drain() == 0  # nothing left


def test_observe_later_holds_records_until_a_run_or_a_read(tally_mod: ModuleType) -> None:
    t = tally_mod.RequestTally(100, BOUNDS, BOUNDS, BOUNDS, 3)
    r = rec()
    before = sys.getrefcount(r)
    t.observe_later(r)
    t.observe_later(r)
    assert sys.getrefcount(r) == before + 2  # held
    t.observe_later(r)  # the third: a run of three, observed now
    assert sys.getrefcount(r) == before
    t.observe_later(rec(status=500))
    assert t.drain() == 0
    t.observe_later(r)
    assert t.requests == {("m", 200, "t"): 4, ("m", 500, "t"): 1}  # a read observes the held one
    assert sys.getrefcount(r) == before
    t.observe_later(r)
    del t  # a tally dropped with records held releases them
    assert sys.getrefcount(r) == before


def test_defer_must_be_positive(tally_mod: ModuleType) -> None:
    with pytest.raises(ValueError, match="defer"):
        tally_mod.RequestTally(100, BOUNDS, BOUNDS, BOUNDS, 0)
