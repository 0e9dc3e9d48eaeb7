# cython: language_level=3, binding=False, embedsignature=True, embedsignature.format=clinic
#
# Token bucket, compiled. Pure-Python twin and reference: _bucket_py.py (same API, same results).
#
# State: four doubles, no Python objects.
#
#     rate      tokens per second (>= 0, may be inf)
#     capacity  the most tokens the bucket holds (>= 0, may be inf)
#     tokens    the fill; starts at capacity; below zero after force_take means debt
#     last      the caller's clock at the last refill
#
# The caller passes `now` (monotonic seconds) to every call; the bucket never reads a clock. Each call
# first refills lazily:
#
#     if now > last:
#         if tokens < capacity: tokens = min(capacity, tokens + (now - last) * rate)
#         last = now
#
# (a clock going backwards refills nothing and does not move `last`). Then:
#
#     try_take(a)    tokens >= a ? (tokens -= a, True) : False
#     time_until(a)  0.0 if tokens >= a; inf if a > capacity or rate <= 0; else (a - tokens) / rate
#     force_take(a)  tokens = min(capacity, tokens - a)      (debt allowed; a < 0 gives tokens back)
#     configure      refill at the old rate up to now, then new rate/capacity, fill capped
#
# The arithmetic is the twin's, operation for operation, so both return bit-identical floats.

cimport cython

from libc.math cimport INFINITY

__all__ = ["TokenBucket"]


cdef inline int _check(double rate, double capacity) except -1:
    if not (0.0 <= rate <= INFINITY):
        raise ValueError(f"rate must be >= 0, got {rate!r}")
    if not (0.0 <= capacity <= INFINITY):
        raise ValueError(f"capacity must be >= 0, got {capacity!r}")
    return 0


@cython.final
cdef class TokenBucket:
    cdef:
        double _rate
        double _capacity
        double _tokens
        double _last

    def __cinit__(self, double rate, double capacity, double now):
        _check(rate, capacity)
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._last = now

    @property
    def rate(self):
        return self._rate

    @property
    def capacity(self):
        return self._capacity

    cdef inline double _refill(self, double now) noexcept:
        cdef double tokens = self._tokens
        if now > self._last:
            if tokens < self._capacity:
                tokens += (now - self._last) * self._rate
                if tokens > self._capacity:
                    tokens = self._capacity
                self._tokens = tokens
            self._last = now
        return tokens

    def try_take(self, double amount, double now):
        """Take ``amount`` tokens if the bucket holds that many now; report whether it did."""
        cdef double tokens = self._refill(now)
        if tokens >= amount:
            self._tokens = tokens - amount
            return True
        return False

    def time_until(self, double amount, double now):
        """Seconds from ``now`` until ``amount`` tokens are there (0.0: now; inf: never)."""
        cdef double tokens = self._refill(now)
        if tokens >= amount:
            return 0.0
        if amount > self._capacity or self._rate <= 0.0:
            return INFINITY
        return (amount - tokens) / self._rate

    def force_take(self, double amount, double now):
        """Take ``amount`` even into debt; a negative amount returns tokens, up to capacity."""
        cdef double tokens = self._refill(now) - amount
        if tokens > self._capacity:
            tokens = self._capacity
        self._tokens = tokens

    def tokens(self, double now):
        return self._refill(now)

    def configure(self, double rate, double capacity, double now):
        """Change the limits from ``now`` on, keeping the current fill (capped at the new capacity)."""
        _check(rate, capacity)
        cdef double tokens = self._refill(now)
        self._rate = rate
        self._capacity = capacity
        if tokens > capacity:
            self._tokens = capacity

    def __repr__(self):
        return f"TokenBucket(rate={self._rate!r}, capacity={self._capacity!r}, tokens={self._tokens!r})"
