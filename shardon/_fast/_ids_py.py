"""Request ids (pure-Python reference; ``_ids_c.pyx`` is the same in Cython, ``shardon._fast.ids`` picks
one): ``(milliseconds since the epoch << 20) + n``, 63-bit integers that only increase.

A clock stepping back cannot repeat an id (the counter carries on past the last one); `seed` (the
request log calls it with its newest row's id at start) keeps them increasing across restarts.
"""

from __future__ import annotations

__all__ = ["RequestIds"]


class RequestIds:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def next(self, now: float) -> int:
        """A new id for a request that arrived at ``now`` (unix seconds)."""
        value = int(now * 1000) << 20
        if value <= self.last:
            value = self.last + 1
        self.last = value
        return value

    def seed(self, newest: int) -> None:
        """Ids handed out from now on exceed ``newest``."""
        if newest > self.last:
            self.last = newest
