"""Request ids (shardon._fast.ids), on both implementations: increasing, clock-derived, seeded."""

from __future__ import annotations

from types import ModuleType

import pytest

from tests.support import twin

BASE = 1_796_000_000.0


@pytest.fixture
def ids(implementation: str) -> ModuleType:
    return twin("ids", implementation)


def test_an_id_is_the_milliseconds_shifted(ids: ModuleType) -> None:
    seq = ids.RequestIds()
    assert seq.next(BASE + 0.0015) == int((BASE + 0.0015) * 1000) << 20
    assert seq.last == int((BASE + 0.0015) * 1000) << 20


def test_ids_only_increase_even_when_the_clock_goes_back(ids: ModuleType) -> None:
    seq = ids.RequestIds()
    first = seq.next(BASE + 1)
    assert seq.next(BASE + 1) == first + 1  # the same millisecond
    assert seq.next(BASE) == first + 2  # the clock stepped back
    assert seq.next(BASE + 2) == int((BASE + 2) * 1000) << 20  # it caught up


def test_seed_puts_new_ids_past_a_stored_one(ids: ModuleType) -> None:
    seq = ids.RequestIds()
    newest = (int((BASE + 3600) * 1000) << 20) + 7
    seq.seed(newest)
    seq.seed(5)  # never backwards
    assert seq.next(BASE) == newest + 1


def test_both_implementations_agree() -> None:
    c, py = twin("ids", "c").RequestIds(), twin("ids", "py").RequestIds()
    for now in (BASE, BASE, BASE - 1, BASE + 0.0001, BASE + 10, BASE + 10):
        assert c.next(now) == py.next(now)
