"""TokenBucket: refill, debt, waiting time, reconfiguration (both implementations)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest


def test_starts_full(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 5.0)
    assert b.rate == 10.0
    assert b.capacity == 100.0
    assert b.tokens(5.0) == 100.0
    assert b.try_take(100.0, 5.0) is True
    assert b.try_take(1.0, 5.0) is False
    assert b.tokens(5.0) == 0.0


def test_refill_at_rate_up_to_capacity(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 0.0)
    assert b.try_take(100.0, 0.0)
    assert b.tokens(2.5) == 25.0
    assert b.try_take(30.0, 2.5) is False  # a failed take takes nothing
    assert b.tokens(2.5) == 25.0
    assert b.try_take(25.0, 2.5) is True
    assert b.tokens(4.0) == 15.0
    assert b.tokens(1000.0) == 100.0  # capped


def test_refill_never_exceeds_capacity_after_long_idle(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(1e6, 5.0, 0.0)
    assert b.try_take(5.0, 0.0)
    assert b.tokens(1e9) == 5.0


def test_clock_going_backwards_refills_nothing(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 10.0)
    assert b.try_take(100.0, 10.0)
    assert b.tokens(5.0) == 0.0  # earlier than the last call: no refill
    assert b.tokens(11.0) == 10.0  # and the bucket's clock stayed at 10.0


def test_try_take_returns_bools(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(1.0, 1.0, 0.0)
    assert b.try_take(1.0, 0.0) is True
    assert b.try_take(1.0, 0.0) is False


def test_force_take_goes_into_debt(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 0.0)
    b.force_take(150.0, 0.0)
    assert b.tokens(0.0) == -50.0
    assert b.try_take(1.0, 0.0) is False
    assert b.try_take(1.0, 4.0) is False  # -10 after 4 s
    assert b.tokens(5.0) == 0.0
    assert b.try_take(10.0, 6.0) is True


def test_force_take_negative_returns_tokens_capped(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 0.0)
    b.force_take(80.0, 0.0)
    b.force_take(-30.0, 0.0)  # the estimate was 30 too high
    assert b.tokens(0.0) == 50.0
    b.force_take(-1000.0, 0.0)
    assert b.tokens(0.0) == 100.0


def test_time_until(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 0.0)
    assert b.time_until(50.0, 0.0) == 0.0
    assert b.try_take(100.0, 0.0)
    assert b.time_until(50.0, 0.0) == 5.0
    assert b.time_until(50.0, 2.0) == 3.0
    assert b.time_until(100.0, 2.0) == 8.0
    assert b.time_until(100.5, 2.0) == math.inf  # more than the bucket can ever hold
    b.force_take(40.0, 2.0)  # 20 - 40 = -20
    assert b.time_until(10.0, 2.0) == 3.0
    assert b.try_take(10.0, 2.0 + 3.0) is True  # available exactly when announced


def test_time_until_with_zero_rate(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(0.0, 10.0, 0.0)
    assert b.time_until(10.0, 0.0) == 0.0
    assert b.try_take(6.0, 0.0)
    assert b.time_until(4.0, 100.0) == 0.0
    assert b.time_until(5.0, 100.0) == math.inf
    assert b.tokens(1e9) == 4.0


def test_configure_keeps_fill(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 0.0)
    assert b.try_take(70.0, 0.0)
    b.configure(20.0, 200.0, 1.0)  # refilled at the old rate up to now: 40
    assert (b.rate, b.capacity) == (20.0, 200.0)
    assert b.tokens(1.0) == 40.0
    assert b.tokens(2.0) == 60.0  # new rate from now on
    assert b.tokens(100.0) == 200.0  # new capacity


def test_configure_caps_fill(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(10.0, 100.0, 0.0)
    b.configure(1.0, 30.0, 0.0)
    assert b.tokens(0.0) == 30.0
    b.force_take(50.0, 0.0)
    b.configure(1.0, 10.0, 0.0)  # debt is kept
    assert b.tokens(0.0) == -20.0


def test_properties_are_read_only(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(1.0, 2.0, 0.0)
    with pytest.raises(AttributeError):
        b.rate = 5.0
    with pytest.raises(AttributeError):
        b.capacity = 5.0


@pytest.mark.parametrize(("rate", "capacity"), [(-1.0, 1.0), (1.0, -1.0), (float("nan"), 1.0), (1.0, float("nan"))])
def test_invalid_limits(impl: SimpleNamespace, rate: float, capacity: float) -> None:
    with pytest.raises(ValueError):
        impl.TokenBucket(rate, capacity, 0.0)
    b = impl.TokenBucket(1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        b.configure(rate, capacity, 0.0)
    assert (b.rate, b.capacity) == (1.0, 1.0)


def test_unlimited_bucket(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(math.inf, math.inf, 0.0)
    for t in range(100):
        assert b.try_take(1e12, float(t))
    assert b.time_until(1e300, 100.0) == 0.0


def test_many_small_takes_follow_the_rate(impl: SimpleNamespace) -> None:
    b = impl.TokenBucket(100.0, 10.0, 0.0)
    taken = sum(b.try_take(1.0, i * 0.001) for i in range(10_000))  # 10 s, a call per ms
    assert 1005 <= taken <= 1011  # 10 initial + 100/s over 10 s
