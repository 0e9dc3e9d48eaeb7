"""The request log's in-memory row queue: the reference implementation.

The event loop appends one finished request's record per call; the request log's writer thread
takes the packed rows out in batches and writes each batch as one backlog frame (see
`shardon.store`). `RowQueue.append` is the only part of the request log on the request path.

- ``append(record)`` queues the record; it is packed (with the msgpack ``encoder`` given) later, at
  the latest when ``defer`` records are waiting to be or when the writer takes rows. A record must
  therefore not change once appended: the row is the record as it is when packed. Packing a run of
  rows at once is what makes it cheap (see ``_rowqueue_c.pyx``). It returns False, queueing
  nothing, when the queue is closed; the caller says why (it holds the logger and the counters). A
  record that cannot be packed is dropped from the queue and handed to ``refuse(record)``, which
  says why and counts it. With a ``limit``, it also returns False, queueing nothing, while that many
  rows are waiting (a reader that cannot keep up loses rows, not memory). When ``batch_max`` rows
  are waiting it calls ``wake()`` once (the writer's event), so a burst does not wait for the
  flush interval; `take` re-arms that.
- ``take(max_rows)`` packs what is deferred, then removes the oldest ``max_rows`` rows at most and
  returns them as one frame's makings, ``(payload, lengths, count)``: the packed rows back to back,
  their lengths as little-endian u32s (bytes), and how many; None when empty.
- ``len()`` counts the rows waiting, packed or not.
- ``append`` and ``take`` may run in different threads at once: neither loses nor reorders a row.

``shardon/_fast/_rowqueue_c.pyx`` is the compiled twin (same API, same results): it packs straight
into one reused buffer, so a row costs no allocation and the writer no per-row work.
``shardon._fast.rowqueue`` selects.
"""

from __future__ import annotations

import sys
import threading
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["RowQueue"]

_SWAP = sys.byteorder != "little"


class RowQueue:
    """Packed request rows waiting for the writer thread (see the module docstring)."""

    __slots__ = (
        "_armed",
        "_defer",
        "_deferred",
        "_encode",
        "_pack_lock",
        "_refuse",
        "_rows",
        "_wake",
        "batch_max",
        "closed",
        "limit",
    )

    def __init__(
        self,
        encoder: Any,
        wake: Callable[[], object],
        batch_max: int,
        refuse: Callable[[Any], object],
        defer: int = 64,
        limit: int = 0,
    ) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if defer < 1:
            raise ValueError("defer must be >= 1")
        self._encode = encoder.encode
        self._wake = wake
        self._refuse = refuse
        self._defer = defer
        # appends and poplefts of a deque are atomic: the two threads need no lock to hand over
        self._deferred: deque[Any] = deque()  # records not packed yet
        self._rows: deque[bytes] = deque()  # packed rows
        # Both threads may pack: one at a time, so the rows keep the records' order.
        self._pack_lock = threading.Lock()
        self._armed = True  # the next batch_max-th row wakes the writer
        self.batch_max = batch_max
        self.limit = limit
        self.closed = False

    def append(self, record: Any) -> bool:
        if self.closed:
            return False
        if self.limit and len(self._rows) + len(self._deferred) >= self.limit:
            return False
        deferred = self._deferred
        deferred.append(record)
        if len(deferred) >= self._defer:
            self._pack_deferred()
        if self._armed and len(self._rows) + len(deferred) >= self.batch_max:
            self._armed = False
            self._wake()
        return True

    def _pack_deferred(self) -> None:
        refused = []
        with self._pack_lock:
            deferred, rows, encode = self._deferred, self._rows, self._encode
            while deferred:
                record = deferred.popleft()
                try:
                    rows.append(encode(record))
                except (OverflowError, TypeError, ValueError):
                    refused.append(record)
        for record in refused:
            self._refuse(record)

    def take(self, max_rows: int) -> tuple[bytes, bytes, int] | None:
        if max_rows <= 0:
            return None
        self._pack_deferred()
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
        for queue in (self._deferred, self._rows):
            while queue:
                queue.popleft()
                n += 1
        return n

    def close(self) -> None:
        """Refuse rows from now on (`append` returns False); those queued can still be taken."""
        self.closed = True

    def __len__(self) -> int:
        return len(self._rows) + len(self._deferred)
