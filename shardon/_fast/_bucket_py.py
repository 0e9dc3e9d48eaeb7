"""Pure-Python twin of :mod:`shardon._fast._bucket_c`: the readable reference.

A token bucket: ``capacity`` tokens at most, refilled continuously at ``rate`` tokens per second,
starting full. The caller passes the time (monotonic seconds) to every call; the bucket never reads a
clock, so it is deterministic and cheap to test. Every call first refills for the time elapsed since
the previous call; a time earlier than the previous one refills nothing and does not move the bucket's
clock back.

``force_take`` may drive the fill below zero (debt): the gateway takes an estimate up front and
corrects it by the real usage once known; a negative amount gives tokens back, never above capacity.
"""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]

_INF = math.inf


def _check(rate: float, capacity: float) -> None:
    if not 0.0 <= rate <= _INF:
        raise ValueError(f"rate must be >= 0, got {rate!r}")
    if not 0.0 <= capacity <= _INF:
        raise ValueError(f"capacity must be >= 0, got {capacity!r}")


class TokenBucket:
    __slots__ = ("_capacity", "_last", "_rate", "_tokens")

    def __reduce__(self) -> str | tuple[object, ...]:
        # Live scheduling state belongs to one process; like the compiled class, refuse to pickle.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        rate = float(rate)
        capacity = float(capacity)
        _check(rate, capacity)
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._last = float(now)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def capacity(self) -> float:
        return self._capacity

    def _refill(self, now: float) -> float:
        tokens = self._tokens
        if now > self._last:
            if tokens < self._capacity:
                tokens += (now - self._last) * self._rate
                if tokens > self._capacity:
                    tokens = self._capacity
                self._tokens = tokens
            self._last = now
        return tokens

    def try_take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if the bucket holds that many now; report whether it did."""
        tokens = self._refill(now)
        if tokens >= amount:
            self._tokens = tokens - amount
            return True
        return False

    def time_until(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until ``amount`` tokens are there (0.0: now; inf: never)."""
        tokens = self._refill(now)
        if tokens >= amount:
            return 0.0
        if amount > self._capacity or self._rate <= 0.0:
            return _INF
        return (amount - tokens) / self._rate

    def force_take(self, amount: float, now: float) -> None:
        """Take ``amount`` even into debt; a negative amount returns tokens, up to capacity."""
        tokens = self._refill(now) - amount
        if tokens > self._capacity:
            tokens = self._capacity
        self._tokens = tokens

    def tokens(self, now: float) -> float:
        return self._refill(now)

    def configure(self, rate: float, capacity: float, now: float) -> None:
        """Change the limits from ``now`` on, keeping the current fill (capped at the new capacity)."""
        rate = float(rate)
        capacity = float(capacity)
        _check(rate, capacity)
        tokens = self._refill(now)
        self._rate = rate
        self._capacity = capacity
        if tokens > capacity:
            self._tokens = capacity

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self._rate!r}, capacity={self._capacity!r}, tokens={self._tokens!r})"
