"""The request log's in-memory row queue: the reference implementation.

The event loop appends one finished request's record per call; the request log's writer thread
takes the packed rows out in batches and writes each batch as one backlog frame (see
`shardon.store`). `RowQueue.append` is the only part of the request log on the request path.

- ``append(record)`` packs the record at once (with the msgpack ``encoder`` given: the row is a
  snapshot, changing the record afterwards does not change it) and queues the bytes. It returns
  False, queueing nothing, when the queue is closed or the record cannot be packed; the caller says
  why (it holds the logger and the counters). When ``batch_max`` rows are waiting it calls ``wake()``
  once (the writer's event), so a burst does not wait for the flush interval; `take` re-arms that.
- ``take(max_rows)`` removes the oldest ``max_rows`` rows at most and returns them as one frame's
  makings, ``(payload, lengths, count)``: the packed rows back to back, their lengths as
  little-endian u32s (bytes), and how many; None when empty.
- ``append`` and ``take`` may run in different threads at once: neither loses nor reorders a row.

``shardon/_fast/_rowqueue_c.pyx`` is the compiled twin (same API, same results): it packs straight
into one reused buffer, so a row costs no allocation and the writer no per-row work.
``shardon._fast.rowqueue`` selects.
"""

from __future__ import annotations

import sys
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["RowQueue"]

_SWAP = sys.byteorder != "little"


class RowQueue:
    """Packed request rows waiting for the writer thread (see the module docstring)."""

    __slots__ = ("_armed", "_encode", "_rows", "_wake", "batch_max", "closed")

    def __init__(self, encoder: Any, wake: Callable[[], object], batch_max: int) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self._encode = encoder.encode
        self._wake = wake
        self._rows: deque[bytes] = deque()  # appends and poplefts are atomic: no lock between threads
        self._armed = True  # the next batch_max-th row wakes the writer
        self.batch_max = batch_max
        self.closed = False

    def append(self, record: Any) -> bool:
        if self.closed:
            return False
        try:
            packed = self._encode(record)
        except (OverflowError, TypeError, ValueError):
            return False
        rows = self._rows
        rows.append(packed)
        if self._armed and len(rows) >= self.batch_max:
            self._armed = False
            self._wake()
        return True

    def take(self, max_rows: int) -> tuple[bytes, bytes, int] | None:
        rows = self._rows
        count = min(len(rows), max_rows)
        if count <= 0:
            return None
        popleft = rows.popleft
        taken = [popleft() for _ in range(count)]
        self._armed = True
        lengths = array("I", map(len, taken))
        if _SWAP:  # pragma: no cover - big-endian hosts
            lengths.byteswap()
        return b"".join(taken), lengths.tobytes(), count

    def clear(self) -> int:
        """Drop every queued row; how many there were."""
        n = 0
        while self._rows:
            self._rows.popleft()
            n += 1
        return n

    def close(self) -> None:
        """Refuse rows from now on (`append` returns False); those queued can still be taken."""
        self.closed = True

    def __len__(self) -> int:
        return len(self._rows)
