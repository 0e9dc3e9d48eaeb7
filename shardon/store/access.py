"""The access log: one line per ``/v1`` request, formatted and written off the event loop.

The request path never formats or writes a line. Its finish step hands the finished record to the
request log (`RequestLog.append`), whose writer thread passes every batch of packed rows it takes
on to `AccessLog.put`; with the request log off, the access log takes the records itself
(`AccessLog.append`: the same call, the same row queue). The access log's own thread formats each
batch (`shardon._fast.accesslog`: in C, without the GIL, when compiled) and writes the lines with
one write per wake-up, to stderr or to a file (appended to, created if missing).

A destination that cannot keep up never stalls the event loop or the request log: at most
`MAX_PENDING_ROWS` rows wait for it, and beyond that lines are dropped and counted (``dropped``,
also in ``/admin/status``), with a warning at most every `_REPORT_EVERY_S`. The line format (console
or JSON): `shardon._fast._accesslog_py`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from shardon._fast.accesslog import AccessFormatter
from shardon._fast.rowqueue import RowQueue
from shardon._threads import name_this_thread, open_writers

from .records import REQUEST_COLUMNS, RequestRecord

if TYPE_CHECKING:
    from shardon.config import Config

__all__ = ["MAX_PENDING_ROWS", "AccessLog", "access_log_for"]

log = logging.getLogger("shardon.access")

MAX_PENDING_ROWS = 100_000
"""Rows waiting for the destination, at most; more are dropped (and counted)."""
_REPORT_EVERY_S = 10.0


class AccessLog:
    """Access lines for ``path`` (None or empty: stderr), console or ``json``, written by a thread of
    their own that wakes every ``interval_s`` (sooner when ``batch_max`` rows wait or a batch is put)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        json: bool = False,
        interval_s: float = 0.2,
        batch_max: int = 1000,
    ) -> None:
        self.path = Path(path) if path else None
        self.json = json
        self._formatter = AccessFormatter(REQUEST_COLUMNS, json)
        self._interval = interval_s
        self._batch_max = batch_max
        self._wake = threading.Event()
        self.row_queue = RowQueue(
            msgspec.msgpack.Encoder(), self._wake.set, batch_max, self._unpackable, limit=MAX_PENDING_ROWS
        )
        """The records `append` queues (when the request log is off); the callback path may call its
        ``append`` itself, as it does the request log's."""
        self._items: deque[Any] = deque()  # batches from the request log's writer, and flush markers
        self._pending = 0  # rows in _items
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._reported = 0  # dropped, as last reported
        self._reported_at = 0.0
        self.written = 0
        """Lines written."""
        self.dropped = 0
        """Lines lost: more than `MAX_PENDING_ROWS` waiting, a failed write, or a record that could not
        be read back."""
        self.write_errors = 0
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the destination (raising RuntimeError when it cannot be) and start the thread. Idempotent."""
        if self._closed:
            raise RuntimeError("AccessLog is closed")
        if self._thread is not None:
            return
        if self.path is None:
            self._fd = 2
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise RuntimeError(f"access log {self.path}: cannot open: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._run, name="shardon-access", daemon=True)
        self._thread.start()
        open_writers.add(self)

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def pending(self) -> int:
        """Rows waiting to be written."""
        return self._pending + len(self.row_queue)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until every row put or appended before this call is written (or dropped). True if in time."""
        if not self.running:
            return not self.pending
        done = threading.Event()
        with self._lock:
            self._items.append(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Write what is waiting, stop the thread, close the file. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.row_queue.close()
        open_writers.discard(self)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                log.error("access log writer did not stop in %ss", timeout)
                return  # it still writes to the file: leave it open
        lost = self.row_queue.clear() + self._pending
        if lost:
            self.dropped += lost
        fd, self._fd = self._fd, None
        if fd is not None and self.path is not None:
            os.close(fd)

    # -- from other threads ---------------------------------------------------------------------

    def append(self, record: RequestRecord) -> None:
        """Queue a finished request's record (when the request log is off). O(1), no I/O, thread-safe."""
        if not self.row_queue.append(record):
            self.refused(record)

    def refused(self, record: RequestRecord) -> None:
        """Account for a record `row_queue.append` refused: closed, or `MAX_PENDING_ROWS` waiting."""
        with self._lock:
            self.dropped += 1

    def _unpackable(self, record: RequestRecord) -> None:
        log.error("access log: dropping the line of request %r: a value no row can hold", record.id)
        with self._lock:
            self.dropped += 1

    def put(self, payload: bytes, lengths: bytes, count: int) -> None:
        """A batch of packed rows, as `RowQueue.take` returns it (the request log's writer calls this).

        O(1): the batch is queued for the access log's thread; dropped (and counted) when the log is
        closed or `MAX_PENDING_ROWS` rows already wait.
        """
        with self._lock:
            if self._closed or self._pending + count > MAX_PENDING_ROWS:
                self.dropped += count
                return
            self._items.append((payload, lengths, count))
            self._pending += count
        self._wake.set()

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        name_this_thread("shardon-access")
        try:
            while True:
                self._wake.wait(self._interval)
                self._wake.clear()
                stopping = self._stopping
                self._round()
                if stopping and not self._items and not len(self.row_queue):
                    break
        except BaseException:  # pragma: no cover - a bug; keep the process alive, say why
            log.exception("access log writer crashed")

    def _round(self) -> None:
        """Format and write everything waiting now, in one write; then release the flushes waiting."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        batches = [item for item in items if type(item) is tuple]
        left = len(self.row_queue)  # rows appended while formatting wait for the next round
        while left > 0:
            batch = self.row_queue.take(min(left, self._batch_max))
            if batch is None:  # pragma: no cover - only this thread takes
                break
            left -= batch[2]
            batches.append(batch)
        chunks = []
        lines = skipped = 0
        for payload, lengths, count in batches:
            text, bad = self._formatter.format(payload, lengths, count)
            chunks.append(text)
            lines += count - bad
            skipped += bad
        put = sum(item[2] for item in items if type(item) is tuple)
        with self._lock:
            self._pending -= put
            self.dropped += skipped
        if chunks:
            self._write(b"".join(chunks), lines)
        for item in items:
            if type(item) is threading.Event:
                item.set()
        self._report()

    def _write(self, data: bytes, lines: int) -> None:
        fd = self._fd
        view = memoryview(data)
        while view:
            try:
                if fd is None:
                    raise OSError("the access log is closed")
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                lost = view.tobytes().count(b"\n")
                msg = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.write_errors += 1
                    self.dropped += lost
                    self.written += lines - lost
                if msg != self.last_error:
                    log.error("access log: cannot write to %s: %s", self.path or "stderr", msg)
                self.last_error = msg
                return
            view = view[n:]
        self.written += lines

    def _report(self) -> None:
        dropped = self.dropped
        if dropped == self._reported:
            return
        now = time.monotonic()
        if now - self._reported_at < _REPORT_EVERY_S:
            return
        log.warning(
            "access log: %d lines dropped (the destination cannot keep up, or failed)", dropped - self._reported
        )
        self._reported, self._reported_at = dropped, now


def access_log_for(config: Config) -> AccessLog | None:
    """The access log ``config`` asks for (``log.access_log``, ``log.access_log_path``,
    ``log.format``), not started; None when it is off. With the request log off, its own queue is
    drained every ``store.flush_interval_ms``, ``store.batch_max`` rows at most per batch."""
    if not config.log.access_log:
        return None
    return AccessLog(
        config.log.access_log_path or None,
        json=config.log.format == "json",
        interval_s=config.store.flush_interval_ms / 1000.0,
        batch_max=config.store.batch_max,
    )
