"""FairQueue: strict priorities, weighted fair queueing across tenants, FIFO per tenant (both implementations)."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest

from tests._fast.queue_model import NaiveFairQueue, drain

# -- basics ------------------------------------------------------------------------------------------


def test_empty(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    assert q.quantum == 1024.0
    assert q.pop() is None
    assert len(q) == 0
    assert q.top_priority() == -1
    assert [q.len_class(p) for p in range(4)] == [0, 0, 0, 0]
    assert [q.tenants_waiting(p) for p in range(4)] == [0, 0, 0, 0]
    assert q.snapshot() == []
    assert q.remove(1) is False


def test_handles_are_unique_ints(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    handles = [q.push(i, i % 4, f"t{i % 3}", 10.0) for i in range(100)]
    assert all(type(h) is int for h in handles)
    assert len(set(handles)) == 100
    drain(q)
    more = [q.push(i, 1, "t", 1.0) for i in range(10)]
    assert not set(more) & set(handles)


@pytest.mark.parametrize("priority", [-1, 4, 100])
def test_invalid_priority(impl: SimpleNamespace, priority: int) -> None:
    q = impl.FairQueue()
    with pytest.raises(ValueError):
        q.push("x", priority, "t", 1.0)
    with pytest.raises(ValueError):
        q.len_class(priority)
    with pytest.raises(ValueError):
        q.tenants_waiting(priority)
    with pytest.raises(ValueError):
        q.refund("t", priority, 1.0)
    assert len(q) == 0


@pytest.mark.parametrize(
    ("cost", "weight"),
    [
        (-1.0, 1.0),
        (float("nan"), 1.0),
        (float("inf"), 1.0),
        (1.0, 0.0),
        (1.0, -2.0),
        (1.0, float("nan")),
        (1.0, 1e307),  # quantum * weight overflows
    ],
)
def test_invalid_cost_or_weight(impl: SimpleNamespace, cost: float, weight: float) -> None:
    q = impl.FairQueue()
    with pytest.raises(ValueError):
        q.push("x", 1, "t", cost, weight)
    assert len(q) == 0
    assert q.pop() is None


def test_weight_whose_quantum_underflows_is_rejected(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(0.25)
    with pytest.raises(ValueError):
        q.push("x", 1, "t", 1.0, 5e-324)  # 0.25 * 5e-324 == 0.0: the tenant could never earn credit
    assert len(q) == 0


@pytest.mark.parametrize("quantum", [0.0, -1.0, float("inf"), float("nan")])
def test_invalid_quantum(impl: SimpleNamespace, quantum: float) -> None:
    with pytest.raises(ValueError):
        impl.FairQueue(quantum)


def test_refund_rejects_non_finite(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    q.push("x", 1, "t", 1.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            q.refund("t", 1, bad)


def test_zero_cost_entries(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(1.0)
    for i in range(5):
        q.push(i, 1, "t", 0.0)
    assert drain(q) == [0, 1, 2, 3, 4]


# -- priority ----------------------------------------------------------------------------------------


def test_priority_is_strict(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(10.0)
    rng = random.Random(1)
    pushed = []
    for i in range(200):
        p = rng.randrange(4)
        q.push((p, i), p, f"t{rng.randrange(5)}", float(rng.randint(1, 50)), rng.choice([1.0, 2.0]))
        pushed.append(p)
    assert [q.len_class(p) for p in range(4)] == [pushed.count(p) for p in range(4)]
    assert q.top_priority() == 3
    served = [item[0] for item in drain(q)]
    assert served == sorted(pushed, reverse=True)


def test_higher_priority_arriving_later_goes_first(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    for i in range(3):
        q.push(("low", i), 0, "a", 1.0)
    assert q.top_priority() == 0
    assert q.pop() == ("low", 0)
    q.push(("crit", 0), 3, "b", 5000.0)
    q.push(("high", 0), 2, "c", 1.0)
    assert q.top_priority() == 3
    assert q.pop() == ("crit", 0)
    assert q.top_priority() == 2
    assert q.pop() == ("high", 0)
    assert drain(q) == [("low", 1), ("low", 2)]
    assert q.top_priority() == -1


# -- FIFO and fair queueing ---------------------------------------------------------------------------


def test_fifo_within_tenant(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(100.0)
    rng = random.Random(2)
    for i in range(300):
        tenant = f"t{rng.randrange(4)}"
        q.push((tenant, i), 1, tenant, float(rng.randint(1, 500)), 1.0 + rng.randrange(3))
    served = drain(q)
    assert len(served) == 300
    for t in ("t0", "t1", "t2", "t3"):
        seq = [i for (tenant, i) in served if tenant == t]
        assert seq == sorted(seq)


def test_order_small_example(impl: SimpleNamespace) -> None:
    # Equal costs and weights: tenants take turns, in the order they started waiting.
    q = impl.FairQueue(10.0)
    for i in range(3):
        q.push(("a", i), 1, "a", 10.0)
        q.push(("b", i), 1, "b", 10.0)
    q.push(("c", 0), 1, "c", 10.0)
    assert q.snapshot() == [(1, "a", 3), (1, "b", 3), (1, "c", 1)]
    assert drain(q) == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_newcomer_goes_before_the_tenants_already_waiting(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(10.0)
    for i in range(4):
        q.push(("a", i), 1, "a", 10.0)
        q.push(("b", i), 1, "b", 10.0)
    assert [q.pop() for _ in range(3)] == [("a", 0), ("b", 0), ("a", 1)]
    q.push(("c", 0), 1, "c", 10.0)  # idle until now: it starts a quantum before the virtual time
    assert q.snapshot() == [(1, "c", 1), (1, "b", 3), (1, "a", 2)]
    assert [q.pop() for _ in range(4)] == [("c", 0), ("b", 1), ("a", 2), ("b", 2)]


def test_weight_is_updated_by_the_latest_push(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(10.0)
    for i in range(40):
        q.push(("a", i), 1, "a", 10.0, 1.0)
    for i in range(40):
        q.push(("b", i), 1, "b", 10.0, 1.0)
    q.push(("a", 40), 1, "a", 10.0, 3.0)  # from now on a is charged a third per entry
    served = [t for (t, _) in (q.pop() for _ in range(40))]
    assert abs(served.count("a") - 30) <= 2


def _backlog(impl: SimpleNamespace, weights: dict[str, float], n: int, max_cost: int, quantum: float):
    """n entries per tenant, costs 1..max_cost drawn per tenant from the same distribution."""
    rng = random.Random(3)
    costs = {t: [float(rng.randint(1, max_cost)) for _ in range(n)] for t in weights}
    q = impl.FairQueue(quantum)
    for i in range(n):
        for tenant, w in weights.items():
            q.push((tenant, costs[tenant][i]), 1, tenant, costs[tenant][i], w)
    return q


@pytest.mark.parametrize("quantum", [1000.0, 50.0])
@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 2.0, "c": 4.0}])
def test_service_is_shared_by_weight(impl: SimpleNamespace, quantum: float, weights: dict[str, float]) -> None:
    max_cost = 4000
    q = _backlog(impl, weights, 3000, max_cost, quantum)
    served = dict.fromkeys(weights, 0.0)
    # SFQ's bound for backlogged tenants: normalised service differs by less than one max cost
    # over each weight (every tenant started at the same tag).
    bound = 2 * max_cost / min(weights.values())
    for _ in range(3500):  # every tenant stays backlogged (c, with 4/7 of the service, too)
        tenant, cost = q.pop()
        served[tenant] += cost
        norm = [served[t] / w for t, w in weights.items()]
        assert max(norm) - min(norm) <= bound
    for t, w in weights.items():
        assert served[t] / w == pytest.approx(served["a"], rel=0.01)


@pytest.mark.parametrize(
    ("flood_cost", "refund", "quiet_cost"),
    [
        (1000.0, 0.0, 1000.0),  # costs near the quantum
        (24.0, 0.0, 24.0),  # costs far below the quantum
        (24.0, 21.0, 24.0),  # ... and most of each estimate refunded while the flood waits
        (24.0, 21.0, 5000.0),  # a quiet request much costlier than the flood's
        (4096.0, 4000.0, 300.0),  # large estimates, large refunds
    ],
)
def test_a_lone_request_goes_next_however_long_the_flood(
    impl: SimpleNamespace, flood_cost: float, refund: float, quiet_cost: float
) -> None:
    q = impl.FairQueue(1024.0)
    for i in range(10_000):
        q.push(("flood", i), 1, "flood", flood_cost)
    for _ in range(500):
        assert q.pop()[0] == "flood"
        q.refund("flood", 1, refund)  # the usage of an earlier flood request comes back
    q.push(("quiet", 0), 1, "quiet", quiet_cost)
    assert q.pop() == ("quiet", 0)
    # Its next request, sent once the flood has had as much service since, goes first again.
    for _ in range(int(quiet_cost // (flood_cost - refund)) + 1):
        assert q.pop()[0] == "flood"
        q.refund("flood", 1, refund)
    q.push(("quiet", 1), 1, "quiet", quiet_cost)
    assert q.pop() == ("quiet", 1)


def test_a_tenant_that_sends_one_request_at_a_time_pays_for_each(impl: SimpleNamespace) -> None:
    # Its tag persists while it is idle: coming back at once does not reset what it owes.
    q = impl.FairQueue(10.0)
    for i in range(100):
        q.push(("flood", i), 1, "flood", 10.0)
    served = []
    for i in range(60):
        q.push(("solo", i), 1, "solo", 10.0)
        item = q.pop()
        while item[0] == "flood":
            served.append("flood")
            item = q.pop()
        served.append("solo")
    assert abs(served.count("flood") - served.count("solo")) <= 2


def test_idle_credit_is_one_quantum(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(100.0)
    for i in range(100):
        q.push(("flood", i), 1, "flood", 10.0)
    for _ in range(50):
        q.pop()
    # A burst from a tenant that was idle: its first quantum of tokens goes first, then turns alternate.
    for i in range(20):
        q.push(("burst", i), 1, "burst", 10.0)
    served = "".join(t[0] for (t, _) in (q.pop() for _ in range(20)))
    assert served.startswith("b" * 10)
    assert served[10:] in ("fbfbfbfbfb", "bfbfbfbfbf")


def test_huge_costs_do_not_overflow_or_loop(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(1.0)
    q.push("big", 1, "a", 1e12)
    t0 = time.perf_counter()
    assert q.pop() == "big"
    q.push("a", 2, "a", 1e12)
    q.push("b", 2, "b", 3e11)
    q.push("c", 2, "c", 5e11)
    q.push("d", 2, "d", 1e15, 1000.0)
    assert drain(q) == ["a", "b", "c", "d"]  # each starts now: in the order they came
    q.push(("a", 0), 2, "a", 1.0)
    q.push(("b", 0), 2, "b", 1.0)
    assert q.pop() == ("b", 0)  # each has its earlier request still on its tag: b's was smaller
    assert q.pop() == ("a", 0)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(ValueError):
        q.push("x", 1, "t", 1e300, 1e-10)  # cost / weight overflows


def test_matches_the_model_on_a_long_run(impl: SimpleNamespace) -> None:
    rng = random.Random(4)
    q = impl.FairQueue(8.0)
    naive = NaiveFairQueue(8.0)
    for i in range(2000):
        tenant = f"t{rng.randrange(5)}"
        args = (
            (tenant, i),
            rng.randrange(2),
            tenant,
            float(rng.randint(0, 480)),
            rng.choice([0.5, 1.0, 2.0]),
        )
        q.push(*args)
        naive.push(*args)
        if rng.random() < 0.3:
            amount = float(rng.randint(-100, 100))
            q.refund(tenant, args[1], amount)
            naive.refund(tenant, args[1], amount)
        if rng.random() < 0.45:
            assert q.pop() == naive.pop()
    assert drain(q) == drain(naive)


# -- cancellation ------------------------------------------------------------------------------------


def test_remove(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(10.0)
    handles = {}
    for i in range(6):
        handles[("a", i)] = q.push(("a", i), 1, "a", 10.0)
        handles[("b", i)] = q.push(("b", i), 2, "b", 10.0)
    assert len(q) == 12
    assert q.remove(handles[("a", 2)]) is True
    assert q.remove(handles[("a", 2)]) is False
    assert q.remove(handles[("b", 0)]) is True  # the head of its FIFO
    assert q.remove(123456789) is False
    assert q.remove(-1) is False
    assert len(q) == 10
    assert (q.len_class(1), q.len_class(2)) == (5, 5)
    assert q.snapshot() == [(2, "b", 5), (1, "a", 5)]
    served = drain(q)
    assert ("a", 2) not in served
    assert ("b", 0) not in served
    assert served == [("b", i) for i in range(1, 6)] + [("a", i) for i in (0, 1, 3, 4, 5)]
    assert q.remove(handles[("a", 5)]) is False  # already popped


def test_remove_last_entry_leaves_the_ring(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(10.0)
    ha = [q.push(("a", i), 1, "a", 10.0) for i in range(3)]
    q.push(("b", 0), 1, "b", 10.0)
    q.push(("a", 9), 2, "a", 10.0)
    assert q.tenants_waiting(1) == 2
    for h in ha:
        assert q.remove(h)
    assert q.tenants_waiting(1) == 1
    assert q.tenants_waiting(2) == 1  # still waiting in the other class
    assert q.snapshot() == [(2, "a", 1), (1, "b", 1)]
    assert (len(q), q.len_class(1), q.len_class(2)) == (2, 1, 1)
    assert drain(q) == [("a", 9), ("b", 0)]
    assert [q.tenants_waiting(p) for p in range(4)] == [0, 0, 0, 0]


def test_remove_everything_then_reuse(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    handles = [q.push(i, i % 4, f"t{i % 7}", 100.0) for i in range(200)]
    random.Random(5).shuffle(handles)
    for k, h in enumerate(handles):
        assert q.remove(h)
        assert len(q) == 199 - k
    assert q.top_priority() == -1
    assert q.pop() is None
    assert q._stored_entries() == 0
    q.push("again", 1, "t0", 1.0)
    assert q.pop() == "again"


def test_removed_items_are_released(impl: SimpleNamespace) -> None:
    import gc
    import weakref

    class Item:
        pass

    q = impl.FairQueue()
    first = Item()
    item = Item()
    q.push(first, 1, "t", 1.0)
    handle = q.push(item, 1, "t", 1.0)
    ref = weakref.ref(item)
    del item
    assert q.remove(handle)
    gc.collect()
    assert ref() is None  # dropped at once, although it sits behind a live entry


def test_tombstones_are_purged(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    handles = [q.push(i, 1, "t", 1.0) for i in range(5)]
    for h in handles[1:4]:
        assert q.remove(h)
    assert q.pop() == 0  # popped past the three cancelled entries: they are gone
    assert q._stored_entries() == len(q) == 1
    assert q.pop() == 4
    assert q._stored_entries() == 0


def test_tombstones_stay_bounded_behind_a_waiting_head(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    q.push("head", 1, "t", 1.0)  # stays at the head the whole time
    for i in range(10_000):
        h = q.push(i, 1, "t", 1.0)
        assert q.remove(h)
        assert q._stored_entries() <= 2 * len(q) + 64
    keep = [q.push(("k", i), 1, "t", 1.0) for i in range(100)]
    for h in keep[::2]:
        q.remove(h)
    assert len(q) == 51
    assert q._stored_entries() <= 2 * len(q) + 64
    assert q.pop() == "head"
    assert drain(q) == [("k", i) for i in range(1, 100, 2)]
    assert q._stored_entries() == 0


def test_idle_tenant_records_are_dropped(impl: SimpleNamespace) -> None:
    q = impl.FairQueue()
    q.push("keep", 1, "stays", 1.0)
    for i in range(5000):  # 5000 tenants come and go
        h = q.push(i, 2, f"tenant-{i}", 1.0)
        if i % 2:
            assert q.pop() == i
        else:
            assert q.remove(h)
        assert q._tenant_records() <= 1100
    assert q.pop() == "keep"
    q2 = impl.FairQueue()
    for _ in range(1000):  # one tenant emptying and refilling keeps its one record
        q2.push("x", 1, "solo", 1.0)
        assert q2.pop() == "x"
    assert q2._tenant_records() == 1


# -- refund ------------------------------------------------------------------------------------------


def _ab(impl: SimpleNamespace):
    """a and b with 6 entries of 100 each, after two turns each (both tags above the idle floor)."""
    q = impl.FairQueue(100.0)
    for i in range(6):
        q.push(("a", i), 1, "a", 100.0)
        q.push(("b", i), 1, "b", 100.0)
    assert [t for (t, _) in (q.pop() for _ in range(4))] == ["a", "b", "a", "b"]
    return q


def test_refund_positive_gives_more_turns(impl: SimpleNamespace) -> None:
    q = _ab(impl)
    q.refund("a", 1, 100.0)  # a over-estimated: it gets an extra entry's worth
    assert "".join(t for (t, _) in (q.pop() for _ in range(5))) == "aabab"


def test_refund_negative_takes_turns_away(impl: SimpleNamespace) -> None:
    q = _ab(impl)
    q.refund("a", 1, -100.0)  # a under-estimated: it pays the difference
    assert "".join(t for (t, _) in (q.pop() for _ in range(5))) == "babab"


def test_refund_credit_stops_at_the_idle_floor(impl: SimpleNamespace) -> None:
    q = _ab(impl)
    # a's tag is one entry past the virtual time; credit takes it one quantum (one entry) before
    # it, no further: a head start of two entries, not of 1e9 tokens.
    q.refund("a", 1, 1e9)
    assert "".join(t for (t, _) in (q.pop() for _ in range(6))) == "aaabab"


def test_refund_of_an_idle_tenant_is_kept_for_its_return(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(100.0)
    for i in range(30):
        q.push(("flood", i), 1, "flood", 100.0)
    for _ in range(5):
        q.pop()
    q.push(("solo", 0), 1, "solo", 100.0)
    assert q.pop() == ("solo", 0)
    q.refund("solo", 1, -1000.0)  # it used ten times its estimate: its next request waits its turn
    q.push(("solo", 1), 1, "solo", 100.0)
    served = [t for (t, _) in (q.pop() for _ in range(12))]
    assert served.index("solo") >= 9


def test_refund_ignored_for_unknown_tenant_or_class(impl: SimpleNamespace) -> None:
    q = _ab(impl)
    q.refund("nobody", 1, 1e9)
    q.refund("a", 2, 1e9)  # a never had anything in class 2
    q.refund("a", 0, -1e9)
    assert "".join(t for (t, _) in (q.pop() for _ in range(4))) == "abab"
    q.push(("a", 9), 2, "a", 100.0)
    q.push(("b", 9), 2, "b", 100.0)
    q.push(("a", 10), 2, "a", 100.0)
    assert [q.pop() for _ in range(3)] == [("a", 9), ("b", 9), ("a", 10)]


def test_len_and_queries_track_everything(impl: SimpleNamespace) -> None:
    q = impl.FairQueue(50.0)
    rng = random.Random(6)
    live: dict[int, tuple[int, str, int]] = {}
    for step in range(3000):
        r = rng.random()
        if r < 0.5:
            p, t = rng.randrange(4), f"t{rng.randrange(6)}"
            live[q.push((p, t, step), p, t, float(rng.randint(1, 300)), rng.choice([1.0, 2.0]))] = (
                p,
                t,
                step,
            )
        elif r < 0.75 and live:
            h = rng.choice(list(live))
            assert q.remove(h)
            del live[h]
        else:
            item = q.pop()
            if item is None:
                assert not live
            else:
                h = next(h for h, v in live.items() if v == item)
                assert item[0] == max(v[0] for v in live.values())
                del live[h]
        assert len(q) == len(live)
        for p in range(4):
            assert q.len_class(p) == sum(1 for v in live.values() if v[0] == p)
            assert q.tenants_waiting(p) == len({v[1] for v in live.values() if v[0] == p})
        assert q.top_priority() == max((v[0] for v in live.values()), default=-1)
        snap = q.snapshot()
        assert sorted((p, t) for p, t, _ in snap) == sorted({v[:2] for v in live.values()})
        assert [p for p, _, _ in snap] == sorted((p for p, _, _ in snap), reverse=True)
        assert sum(n for _, _, n in snap) == len(live)
