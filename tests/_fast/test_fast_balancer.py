"""LeastConnBalancer: least connections per weight, capacity, health, exclusion, round-robin ties."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest


def make(impl: SimpleNamespace, *nodes: tuple[int, int, float]):
    lb = impl.LeastConnBalancer()
    for node, capacity, weight in nodes:
        lb.add(node, capacity, weight)
    return lb


def load(lb, node: int, n: int) -> None:
    for _ in range(n):
        lb.acquire(node)


def test_empty(impl: SimpleNamespace) -> None:
    lb = impl.LeastConnBalancer()
    assert lb.pick([]) == -1
    assert lb.pick([0, 1, 2]) == -1
    assert lb.free_slots([0, 1]) == 0


def test_least_connections(impl: SimpleNamespace) -> None:
    lb = make(impl, (1, 10, 1.0), (2, 10, 1.0), (3, 10, 1.0))
    load(lb, 1, 3)
    load(lb, 2, 1)
    load(lb, 3, 2)
    for _ in range(5):
        assert lb.pick([1, 2, 3]) == 2
    assert lb.pick((1, 3)) == 3


def test_weights(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 1000, 1.0), (1, 1000, 3.0))
    counts: Counter[int] = Counter()
    for _ in range(400):
        node = lb.pick([0, 1])
        lb.acquire(node)
        counts[node] += 1
    assert counts == {0: 100, 1: 300}
    assert (lb.inflight(0), lb.inflight(1)) == (100, 300)


def test_capacity(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 2, 1.0), (1, 1, 1.0))
    picked = []
    for _ in range(4):
        node = lb.pick([0, 1])
        if node >= 0:
            lb.acquire(node)
        picked.append(node)
    assert sorted(picked[:3]) == [0, 0, 1]
    assert picked[3] == -1
    assert lb.capacity(0) == 2
    lb.set_capacity(0, 5)
    assert lb.capacity(0) == 5
    assert lb.pick([0, 1]) == 0
    lb.set_capacity(0, 1)  # below what is in flight: nothing is cancelled, nothing new is sent
    assert lb.inflight(0) == 2
    assert lb.pick([0, 1]) == -1
    assert lb.free_slots([0, 1]) == 0


def test_zero_capacity(impl: SimpleNamespace) -> None:
    lb = make(impl, (4, 0, 1.0))
    assert lb.pick([4]) == -1


def test_health(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 10, 1.0), (1, 10, 1.0))
    assert lb.healthy(0) is True
    load(lb, 1, 5)
    lb.set_healthy(0, False)
    assert lb.healthy(0) is False
    assert lb.pick([0, 1]) == 1
    assert lb.free_slots([0, 1]) == 5
    lb.set_healthy(1, False)
    assert lb.pick([0, 1]) == -1
    lb.set_healthy(0, True)
    assert lb.pick([0, 1]) == 0
    assert lb.healthy(99) is False


def test_exclude(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 10, 1.0), (1, 10, 1.0), (2, 10, 1.0))
    load(lb, 1, 1)
    load(lb, 2, 2)
    assert lb.pick([0, 1, 2], None) == 0
    assert lb.pick([0, 1, 2], {0}) == 1
    assert lb.pick([0, 1, 2], frozenset({0, 1})) == 2
    assert lb.pick([0, 1, 2], exclude={0, 1, 2}) == -1
    assert lb.pick([0, 1, 2], set()) == 0


def test_round_robin_ties(impl: SimpleNamespace) -> None:
    lb = make(impl, (5, 10, 1.0), (6, 10, 1.0), (7, 10, 1.0))
    picks = [lb.pick([5, 6, 7]) for _ in range(30)]  # nothing acquired: all stay equal
    assert Counter(picks) == {5: 10, 6: 10, 7: 10}
    assert all(picks[i] != picks[i + 1] for i in range(29))
    # short requests that finish before the next one starts still spread over the nodes
    counts: Counter[int] = Counter()
    for _ in range(300):
        node = lb.pick([5, 6, 7])
        lb.acquire(node)
        counts[node] += 1
        lb.release(node)
    assert counts == {5: 100, 6: 100, 7: 100}


def test_ties_only_among_the_best(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 10, 1.0), (1, 10, 1.0), (2, 10, 1.0), (3, 10, 1.0))
    load(lb, 0, 1)
    load(lb, 2, 1)
    picks = Counter(lb.pick([0, 1, 2, 3]) for _ in range(40))
    assert set(picks) == {1, 3}
    assert picks[1] == picks[3] == 20


def test_release_floor(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 10, 1.0))
    lb.release(0)
    assert lb.inflight(0) == 0
    lb.acquire(0)
    lb.release(0)
    lb.release(0)
    assert lb.inflight(0) == 0
    lb.release(42)  # unknown: ignored
    lb.release(-1)


def test_unknown_nodes(impl: SimpleNamespace) -> None:
    lb = make(impl, (3, 10, 1.0))
    assert lb.pick([0, 1, 2, 3, 4, 10_000, 10**20, -5]) == 3
    assert lb.pick([0, 1, 2]) == -1
    assert lb.free_slots([0, 3, 9, -1, 10**20]) == 10
    assert (lb.inflight(9), lb.capacity(9), lb.healthy(9)) == (0, 0, False)
    with pytest.raises(KeyError):
        lb.acquire(9)
    with pytest.raises(KeyError):
        lb.set_healthy(9, True)
    with pytest.raises(KeyError):
        lb.set_capacity(9, 3)


def test_acquire_beyond_capacity_is_allowed(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 1, 1.0))
    lb.acquire(0)
    lb.acquire(0)
    assert lb.inflight(0) == 2
    assert lb.free_slots([0]) == 0
    assert lb.pick([0]) == -1


def test_free_slots(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 4, 1.0), (1, 8, 2.0), (2, 3, 1.0))
    load(lb, 0, 1)
    load(lb, 1, 8)
    assert lb.free_slots([0, 1, 2]) == 3 + 0 + 3
    assert lb.free_slots((2,)) == 3
    lb.set_healthy(2, False)
    assert lb.free_slots([0, 1, 2]) == 3
    assert lb.free_slots([]) == 0


def test_readd_keeps_inflight_and_health(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 4, 1.0), (1, 4, 1.0))
    load(lb, 0, 3)
    lb.set_healthy(0, False)
    lb.add(0, 10, 5.0)
    assert (lb.inflight(0), lb.capacity(0), lb.healthy(0)) == (3, 10, False)
    lb.set_healthy(0, True)
    load(lb, 1, 1)
    assert lb.pick([0, 1]) == 0  # 3/5 < 1/1


def test_remove(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 4, 1.0), (1, 4, 1.0))
    load(lb, 0, 2)
    lb.remove(0)
    lb.remove(0)  # twice: no error
    lb.remove(77)
    assert lb.pick([0, 1]) == 1
    assert (lb.inflight(0), lb.capacity(0), lb.healthy(0)) == (0, 0, False)
    lb.release(0)  # a request that was running on it ends: ignored
    lb.add(0, 4)
    assert (lb.inflight(0), lb.healthy(0)) == (0, True)


def test_large_ids_grow_the_table(impl: SimpleNamespace) -> None:
    lb = impl.LeastConnBalancer()
    for node in (0, 9, 100, 5000, 65535):
        lb.add(node, 2, 1.0)
    assert lb.free_slots([0, 9, 100, 5000, 65535]) == 10
    lb.acquire(65535)
    assert lb.inflight(65535) == 1
    assert lb.pick([65535, 5000]) == 5000


@pytest.mark.parametrize(
    ("node", "capacity", "weight"),
    [
        (-1, 1, 1.0),
        (65536, 1, 1.0),
        (0, -1, 1.0),
        (0, 1, 0.0),
        (0, 1, -1.0),
        (0, 1, float("inf")),
        (0, 1, float("nan")),
    ],
)
def test_add_rejects_bad_values(impl: SimpleNamespace, node: int, capacity: int, weight: float) -> None:
    lb = impl.LeastConnBalancer()
    with pytest.raises(ValueError):
        lb.add(node, capacity, weight)
    assert lb.pick([0]) == -1


def test_set_capacity_rejects_negative(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 1, 1.0))
    with pytest.raises(ValueError):
        lb.set_capacity(0, -2)
    assert lb.capacity(0) == 1


def test_candidates_may_be_any_sequence(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 1, 1.0), (1, 1, 1.0))
    lb.acquire(0)
    assert lb.pick(range(2)) == 1
    assert lb.free_slots(range(2)) == 1


def test_trial_allows_exactly_one_acquire(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 10, 1.0), (1, 10, 1.0))
    load(lb, 1, 5)
    lb.set_healthy(0, False)
    assert lb.pick([0, 1]) == 1
    lb.set_trial(0)  # a half-open circuit: one request may go
    assert lb.trial(0) is True and lb.healthy(0) is True
    assert lb.pick([0, 1]) == 0
    assert lb.pick([0, 1]) == 0  # picking alone takes nothing
    lb.acquire(0)
    assert lb.trial(0) is False and lb.healthy(0) is False
    assert lb.pick([0, 1]) == 1  # the trial is out: no second request
    assert lb.free_slots([0]) == 0
    lb.release(0)
    assert lb.healthy(0) is False  # the trial's end decides, not its release
    lb.set_trial(0)
    lb.set_healthy(0, True)  # closed: the trial flag goes with it
    assert lb.trial(0) is False
    lb.acquire(0)
    lb.acquire(0)
    assert lb.healthy(0) is True
    assert lb.trial(99) is False
    with pytest.raises(KeyError):
        lb.set_trial(99)


def test_reported_load_counts_like_inflight(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 10, 1.0), (1, 10, 1.0))
    lb.set_load(1, 3.0)  # three requests of other clients on node 1
    assert lb.load(1) == 3.0 and lb.load(0) == 0.0 and lb.load(42) == 0.0
    counts: Counter[int] = Counter()
    for _ in range(7):
        node = lb.pick([0, 1])
        lb.acquire(node)
        counts[node] += 1
    assert counts == {0: 5, 1: 2}  # 5 + 0 against 2 + 3: equal busyness
    assert lb.free_slots([0, 1]) == 5 + 8  # capacity is Shardon's own count: the load does not use it
    lb.set_load(1, 0)
    assert lb.pick([0, 1]) == 1
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            lb.set_load(0, bad)
    with pytest.raises(KeyError):
        lb.set_load(99, 1.0)


def test_reported_load_per_weight(impl: SimpleNamespace) -> None:
    lb = make(impl, (0, 100, 1.0), (1, 100, 2.0))
    lb.set_load(1, 4.0)
    load(lb, 0, 1)
    assert lb.pick([0, 1]) == 0  # 1/1 < 4/2
    load(lb, 0, 2)
    assert lb.pick([0, 1]) == 1  # 3/1 > 4/2
