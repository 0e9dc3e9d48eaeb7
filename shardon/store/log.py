"""The request log's threads: the request path appends, a writer fills the backlog, a compactor fills SQLite.

`RequestLog` is the only object the rest of Shardon holds: `append` (the request path's whole
share, O(1), no I/O) and `audit` to write, `flush` to wait, coroutines to read. Its writer thread
moves queued rows to the on-disk backlog (`shardon.store.backlog`) and hands each batch to the
access log when there is one (`shardon.store.access`); its compactor thread moves the backlog into
SQLite (`shardon.store.compactor`) when the gateway is not busy. The threading model, durability and
cost model: ``docs/request-log.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import orjson

from shardon._fast.rowqueue import RowQueue
from shardon._threads import name_this_thread, open_writers
from shardon.config import DataPaths, StoreConfig

from . import backlog, queries, records
from .backlog import KIND_AUDIT, KIND_ROWS, BacklogWriter
from .compactor import Compactor, left, show_id
from .records import RequestIds, RequestRecord
from .schema import connect_readonly

if TYPE_CHECKING:
    from .access import AccessLog

__all__ = ["RequestLog"]

log = logging.getLogger("shardon.store")

T = TypeVar("T")

_MAX_PENDING = 500_000  # rows kept in memory while the backlog cannot be written
_READ_FLUSH_S = 5.0  # how long a read waits for rows appended before it to reach SQLite


class _Audit:
    """An audit entry in the write queue: its packed ``(id, at, actor, action, target, detail)``."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes) -> None:
        self.packed = packed


class _Flush:
    """A `RequestLog.flush` in the write queue: ``done`` is set once everything queued before it is
    in the backlog, ``pos`` then being the backlog position it ends at (None if it was shed)."""

    __slots__ = ("done", "pos")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.pos: tuple[int, int] | None = None


# -- the log --------------------------------------------------------------------------------------


class RequestLog:
    """The SQLite request log at ``database``: a writer thread fills an on-disk backlog (``backlog``,
    by default `DataPaths.for_database`'s), a compactor thread moves it into SQLite.

    ``access``: the access log the writer hands every batch of rows to, if any.
    """

    def __init__(
        self,
        database: str | os.PathLike[str],
        config: StoreConfig | None = None,
        *,
        backlog: Path | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self.config = config or StoreConfig()
        self.path = Path(database)
        self.backlog_dir = backlog if backlog is not None else DataPaths.for_database(self.path).backlog
        """The backlog's segment files and state file."""
        self.access = access
        self._wake = threading.Event()  # wakes the writer
        self._batch_max = self.config.batch_max
        self.row_queue = RowQueue(msgspec.msgpack.Encoder(), self._wake.set, self._batch_max, self._unpackable)
        """Request rows waiting for the writer (`shardon._fast.rowqueue`; packed in runs, so a record
        must not change once appended). ``append`` is the request path's whole share of the log; the
        callback path calls ``row_queue.append`` itself."""
        self._q: deque[Any] = deque()  # audit entries and flush markers, for the writer
        self._held: deque[tuple[bytes, bytes, int]] = deque()  # row batches the backlog refused, for a retry
        self._held_rows = 0
        self._stop = threading.Event()  # ends the writer's back-off sleep at close
        self._thread: threading.Thread | None = None  # the writer
        self._compactor_thread: threading.Thread | None = None
        self._cwake = threading.Event()  # wakes the compactor
        self._cstop = False
        self._cbusy = False  # the compactor is waiting for a lull (the writer does not wake it)
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._late_logged = False
        self._pack = msgspec.msgpack.Encoder().encode
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._audit_lock = threading.Lock()
        self.audit_ids = RequestIds()
        """Audit entry ids (assigned when queued, so a replayed entry replaces itself); seeded at start
        with the audit table's largest id."""
        self.backlog_writer = BacklogWriter(self.backlog_dir)
        """The writer thread's end of the backlog (``published``: where it ends)."""
        # How fast rows arrive (the compactor's measure of "busy": see _busy).
        self._busy_rate = self.config.busy_rows_per_s
        self._max_backlog = int(self.config.max_backlog_mb * 1024 * 1024)
        self._rate = 0.0
        self._rate_at = time.monotonic()
        self._rate_entries = 0
        self.compactor = Compactor(self.path, self.backlog_dir, self.config, self._error, self._drop)
        """The SQLite side (its ``lock``: one thread writes SQLite at a time)."""
        # Counters (read them from anywhere; ``written``, ``deleted``, ... are the compactor's).
        self.recovered = 0
        """Request rows and audit entries a previous process left in the backlog, written at start."""
        self.dropped = 0
        """Rows given up (refused by SQLite, over ``_MAX_PENDING`` while failing, corrupt in the
        backlog, or appended after close)."""
        self.write_errors = 0
        """Failed writes, to the backlog or to SQLite (each retried)."""
        self.last_error: str | None = None
        self.newest_id = 0
        """The largest request id stored when the log started (0 for an empty log), backlog included.
        Start seeds `records.request_ids` with it, so ids handed out afterwards are larger than every stored one."""
        self.writer_cpus: list[int] | None = None
        """The CPUs the compactor thread (the one writing SQLite) was moved to, when ``writer_cpus`` is
        set and that worked."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Open the database, move a previous process's backlog into it, start the two threads.

        Opens (creating directory and schema, migrating an old schema) in the calling thread and
        raises what opening raised, so a bad path fails at start-up rather than at the first request.
        Then compacts, synchronously, whatever backlog a crashed or killed process left (``recovered``
        counts it); if SQLite refuses it for ``timeout`` seconds, the compactor thread carries on with
        the rest. Then seeds `records.request_ids` past every stored id, backlog included. Idempotent.
        """
        if self._closed:
            raise RuntimeError("RequestLog is closed")
        if self._thread is not None:
            return
        try:
            self.compactor.open()
        except Exception as err:
            raise RuntimeError(f"request log {self.path}: cannot open database: {err}") from err
        try:
            self._recover(time.monotonic() + timeout)
            newest, newest_audit = self.compactor.newest_ids(self.backlog_writer.published)
        except Exception as err:
            self.compactor.close()
            raise RuntimeError(
                f"request log {self.path}: cannot recover the backlog {self.backlog_dir}: {err}"
            ) from err
        self.newest_id = newest
        records.request_ids.seed(newest)
        self.audit_ids.seed(newest_audit)
        self._compactor_thread = threading.Thread(target=self._run_compactor, name="shardon-store-compact", daemon=True)
        self._thread = threading.Thread(target=self._run_writer, name="shardon-store-writer", daemon=True)
        self._compactor_thread.start()
        self._thread.start()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shardon-store-read")
        open_writers.add(self)

    @property
    def written(self) -> int:
        """Request rows committed to SQLite since start (a row replayed from the backlog counts again)."""
        return self.compactor.written

    @property
    def audits_written(self) -> int:
        return self.compactor.audits_written

    @property
    def deleted(self) -> int:
        """Rows removed by retention since start."""
        return self.compactor.deleted

    @property
    def last_cleanup(self) -> float | None:
        return self.compactor.last_cleanup

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def pending(self) -> int:
        """Request rows and audit entries appended but not yet in SQLite: in memory (a `flush` waiting
        there counts as one) and in the backlog."""
        return len(self._q) + self._queued_rows() + max(self.backlog_writer.entries - self.compactor.entries, 0)

    def _queued_rows(self) -> int:
        return len(self.row_queue) + self._held_rows

    @property
    def backlog_bytes(self) -> int:
        """Bytes of backlog frames not yet compacted into SQLite."""
        return max(self.backlog_writer.bytes - self.compactor.bytes, 0)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until everything appended before this call is in SQLite. True if it was in time.

        Wakes the writer, waits until its batch is in the backlog, then compacts up to there in the
        calling thread (at its priority, under the compaction lock). Not for the event loop (use
        `aflush`). Returns False when the writer is not running and rows are waiting.
        """
        if not self.running:
            return not self._q and not self._queued_rows() and self.compactor.position >= self.backlog_writer.published
        deadline = None if timeout is None else time.monotonic() + timeout
        pos = self._flush_to_backlog(timeout)
        return pos is not None and self.compactor.compact_to(pos, deadline)

    def _flush_to_backlog(self, timeout: float | None) -> tuple[int, int] | None:
        """The writer's half of `flush`: the backlog position that everything queued before this
        call ends at, once it is there; None if it was not in time (or was shed)."""
        marker = _Flush()
        self._q.append(marker)
        self._wake.set()
        if not marker.done.wait(timeout):
            return None
        return marker.pos

    async def aflush(self, timeout: float | None = 10.0) -> bool:
        """`flush` from the event loop, without blocking it."""
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush everything into SQLite, stop both threads, remove the backlog, close every connection.

        Idempotent. If SQLite cannot take the rows in time, the backlog is kept (and fsynced) for
        the next start.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self.row_queue.close()  # what follows flushes every row appended before this
        open_writers.discard(self)
        deadline = None if timeout is None else time.monotonic() + timeout
        readers = self._readers
        self._readers = None
        if readers is not None:  # reads in progress finish first (they flush: the writer must run)
            readers.shutdown(wait=True, cancel_futures=True)
        writer = self._thread
        if writer is not None and writer.is_alive():
            self.flush(timeout)
            self._stopping = True
            self._stop.set()
            self._wake.set()
            writer.join(left(deadline))
            if writer.is_alive():
                log.error("request log writer did not stop in %ss; %d rows unwritten", timeout, self._queued_rows())
        compactor = self._compactor_thread
        if compactor is not None and compactor.is_alive():
            self._cstop = True
            self._cwake.set()
            compactor.join(left(deadline))
            if compactor.is_alive():
                log.error("request log compactor did not stop in %ss", timeout)
        unwritten = self.row_queue.clear() + self._held_rows
        self._held.clear()
        self._held_rows = 0
        for item in self._q:
            if type(item) is _Flush:
                item.done.set()
            else:
                unwritten += 1
        if unwritten:
            log.error("request log closed with %d rows unwritten", unwritten)
            self.dropped += unwritten
        self._q.clear()
        if self.compactor.conn is not None and not (writer is not None and writer.is_alive()):
            # what the writer took after the flush:
            caught_up = self.compactor.compact_to(self.backlog_writer.published, deadline)
            self._close_backlog(caught_up)
        self.compactor.close()
        with self._reader_lock:
            conns, self._reader_conns = self._reader_conns, []
        for conn in conns:
            conn.close()

    async def aclose(self, timeout: float | None = 10.0) -> None:
        """`close` from the event loop, without blocking it."""
        await asyncio.to_thread(self.close, timeout)

    def __enter__(self) -> RequestLog:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_backlog(self, caught_up: bool) -> None:
        """At close: remove the backlog once SQLite holds all of it, else make it durable for the next start."""
        self.backlog_writer.close(sync=not caught_up)
        if caught_up:
            backlog.remove_backlog(self.backlog_dir)
            return
        log.error(
            "request log: %d entries (%d bytes) wait in the backlog %s for the next start",
            max(self.backlog_writer.entries - self.compactor.entries, 0),
            self.backlog_bytes,
            self.backlog_dir,
        )

    # -- the hot path ---------------------------------------------------------------------------

    def append(self, record: RequestRecord) -> None:
        """Queue a request row. O(1), no I/O, thread-safe; never waits on the database or the disk.

        The record is the log's from now on: it is packed later (with others, before the writer
        takes it), so changing it afterwards would change the row.
        """
        if not self.row_queue.append(record):
            self.refused(record)

    def refused(self, record: RequestRecord) -> None:
        """Account for a record `row_queue.append` refused: the log is closed."""
        if self._closed:  # (the queue is closed only once the log is)
            self._late()
            return
        # (else the queue was full while another thread's pack of it was interrupted: see _rowqueue_c)
        log.error("request log: dropping row %s: the row queue could not take it", show_id(record.id))
        self.dropped += 1

    def _unpackable(self, record: RequestRecord) -> None:
        """Account for a record the row queue could not pack: no row can hold one of its values."""
        try:
            self._pack(record)
        except (OverflowError, TypeError, ValueError) as exc:  # never the caller's problem
            reason = str(exc)
        else:  # pragma: no cover - the queue could not grow (out of memory)
            reason = "the queue is out of memory"
        log.error("request log: dropping row %s: %s", show_id(record.id), reason)
        self.dropped += 1

    def audit(
        self, actor: str | None, action: str, target: str | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        """Queue an audit entry (who did what to which object). O(1) apart from encoding ``detail``."""
        if self._closed:
            self._late()
            return
        blob = orjson.dumps(detail or {}, default=str).decode()
        now = time.time()
        with self._audit_lock:
            audit_id = self.audit_ids.next(now)
        self._q.append(_Audit(self._pack((audit_id, now, actor, action, target, blob))))
        self._wake.set()

    def _late(self) -> None:
        if not self._late_logged:
            self._late_logged = True
            log.error("request log is closed; dropping rows appended after close")
        self.dropped += 1

    # -- the writer thread: memory -> backlog ---------------------------------------------------

    def _run_writer(self) -> None:
        name_this_thread("shardon-store")
        interval = self.config.flush_interval_ms / 1000.0
        backoff = 0.0
        try:
            while True:
                if backoff:
                    self._stop.wait(backoff)  # the backlog refused writes: don't spin
                elif len(self.row_queue) < self._batch_max:
                    self._wake.wait(interval)
                self._wake.clear()
                ok = self._drain()
                backoff = 0.0 if ok else min(max(backoff * 2, interval), 2.0)
                if self._stopping and (not (self._q or self._queued_rows()) or not ok):
                    break
        except BaseException:  # pragma: no cover - a bug; keep the process alive, say why
            log.exception("request log writer crashed")

    def _drain(self) -> bool:
        """Append everything queued now to the backlog: rows one frame per ``batch_max``, then the
        audit entries; then tell the flushes waiting where the backlog ends.

        The markers and audit entries are taken first: every row appended before a flush marker is
        in the row queue by then, so the rows written next include them. False if the backlog
        refused a write (what was not written stays queued, in order).
        """
        q = self._q
        items = [q.popleft() for _ in range(len(q))]  # items queued while draining wait for the next round
        ok = self._write_rows()
        if ok:
            audits = [item.packed for item in items if type(item) is _Audit]
            if audits:
                pieces, size = backlog.frame_parts(KIND_AUDIT, audits)
                ok = self._append_frames(pieces, size, len(audits))
        if not ok:
            q.extendleft(reversed(items))
            self._shed()
            return False
        pos = self.backlog_writer.published
        for item in items:
            if type(item) is _Flush:
                item.pos = pos
                item.done.set()
        return True

    def _write_rows(self) -> bool:
        """The held batches, then the rows queued now, into the backlog, one frame per batch; False
        at the first refusal (that batch and the rest stay: the batch at the head of ``_held``).

        Each batch taken from the queue goes through ``_held`` on its way, so one loop writes both.
        """
        held = self._held
        left = len(self.row_queue)  # rows appended while draining wait for the next round
        while True:
            while held:
                payload, lengths, count = held[0]
                pieces, size = backlog.frame_from(KIND_ROWS, count, lengths, payload)
                if not self._append_frames(pieces, size, count):
                    return False
                held.popleft()
                self._held_rows -= count
            if left <= 0:
                return True
            batch = self.row_queue.take(min(left, self._batch_max))
            if batch is None:  # pragma: no cover - only this thread takes
                return True
            if self.access is not None:
                self.access.put(*batch)  # O(1): the access log's thread formats and writes it
            left -= batch[2]
            held.append(batch)
            self._held_rows += batch[2]

    def _append_frames(self, pieces: list[Any], size: int, count: int) -> bool:
        """Write whole frames to the end of the backlog with one ``os.writev``; False if it failed."""
        try:
            self.backlog_writer.append(pieces, size, count)
        except OSError as exc:
            self._error(exc)
            self._cwake.set()  # (the segment may have been sealed where it failed)
            return False
        if not self._cbusy:  # a busy compactor waits for a lull, not for frames: don't wake it
            self._cwake.set()
        return True

    def _shed(self) -> None:
        """While writes fail, keep at most _MAX_PENDING rows in memory: drop the oldest beyond that.

        (A flush waiting behind dropped rows still succeeds once the backlog takes writes again:
        its rows are written or counted in ``dropped``.)"""
        excess = self._queued_rows() - _MAX_PENDING
        if excess <= 0:
            return
        held = self._held
        while excess > 0 and held:
            payload, lengths, count = held[0]
            if count <= excess:  # the whole batch goes
                held.popleft()
                gone = count
            else:  # its oldest rows go
                gone = excess
                cut = sum(backlog.lengths_of(lengths[: 4 * gone]))
                held[0] = (payload[cut:], lengths[4 * gone :], count - gone)
            self._held_rows -= gone
            self.dropped += gone
            excess -= gone
        while excess > 0:
            batch = self.row_queue.take(min(excess, self._batch_max))
            if batch is None:  # pragma: no cover - only this thread takes
                break
            if self.access is not None:
                self.access.put(*batch)  # lost to the request log, not to the access log
            self.dropped += batch[2]
            excess -= batch[2]

    def _drop(self, n: int) -> None:
        self.dropped += n

    def _error(self, exc: BaseException) -> None:
        self.write_errors += 1
        msg = f"{type(exc).__name__}: {exc}"
        if msg != self.last_error:
            log.error("request log write failed: %s", msg)
        self.last_error = msg

    # -- the compactor: backlog -> SQLite -------------------------------------------------------

    def _pin_compactor(self) -> None:
        """Move this (the compactor) thread to ``writer_cpus``; on failure, say so and stay put."""
        cpus = set(self.config.writer_cpus)
        if not cpus:
            return
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread, on Linux
        except (AttributeError, OSError, ValueError) as exc:
            log.warning("request log compactor: cannot run on CPUs %s: %s", sorted(cpus), exc)
        else:
            self.writer_cpus = sorted(os.sched_getaffinity(0))

    def _busy(self) -> bool:
        """Whether the gateway is busy (rows arriving faster than ``busy_rows_per_s``, measured over
        the last tenth of a second or more) and the backlog is under its limit: compaction waits then
        (why waiting, not a low CPU priority: ``docs/request-log.md``, threading model).
        """
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed >= 0.1:  # short: at the start of a load, compaction stops within ~0.1 s
            self._rate = (self.backlog_writer.entries - self._rate_entries) / elapsed
            self._rate_at, self._rate_entries = now, self.backlog_writer.entries
        return self._rate > self._busy_rate and self.backlog_bytes < self._max_backlog

    def _run_compactor(self) -> None:
        name_this_thread("shardon-store-c")  # kernel names: 15 bytes; "shardon-store*" is the whole log
        self._pin_compactor()
        interval = self.config.flush_interval_ms / 1000.0
        cleanup_every = self.config.cleanup_interval_s
        next_cleanup = time.monotonic()  # the retention clean-up also runs at start
        backoff = 0.0
        try:
            while not self._cstop:
                ok = True if self._busy() else self._compact_available()
                if time.monotonic() >= next_cleanup and not self._cstop:
                    with self.compactor.lock:
                        self.compactor.cleanup()
                    next_cleanup = time.monotonic() + cleanup_every
                backoff = 0.0 if ok else min(max(backoff * 2, interval), 2.0)
                if self._cstop:
                    break
                self._cbusy = self._busy()
                self._cwake.wait(backoff or interval)
                self._cwake.clear()
        except BaseException:  # pragma: no cover - a bug; keep the process alive, say why
            log.exception("request log compactor crashed")

    def _compact_available(self) -> bool:
        """Compact everything the writer has put in the backlog, one transaction per lock hold.

        False if SQLite (or the backlog) refused; the rows wait in the backlog.
        """
        while not self._cstop:
            with self.compactor.lock:
                try:
                    if not self.compactor.compact_once(self.backlog_writer.published):
                        return True
                except (sqlite3.OperationalError, OSError) as exc:  # locked, busy, disk full, I/O
                    self._error(exc)
                    return False
            if self._busy():  # requests came back: the rest waits for the next lull
                return True
        return True

    # -- start: the schema, and a previous process's backlog ------------------------------------

    def _recover(self, deadline: float) -> None:
        """Set the backlog positions from what is on disk and compact a previous process's backlog."""
        d = self.backlog_dir
        segs = backlog.segment_numbers(d)
        state = backlog.read_state(d)
        first = max([*segs, state[0] if state else 0]) + 1  # the writer's first segment: after every old one
        self.backlog_writer.start_at(first)  # every old segment is sealed
        if state is None:
            self.compactor.position = (segs[0] if segs else first, 0)
        else:
            for n in segs:  # compacted before the crash, not yet deleted
                if n < state[0]:
                    with contextlib.suppress(OSError):
                        (d / backlog.segment_name(n)).unlink()
            self.compactor.position = backlog.checked_position(d, state)
        if not segs:
            self.compactor.position = self.backlog_writer.published
            return
        self.backlog_writer.entries, self.backlog_writer.bytes = self._scan_backlog()
        t0 = time.monotonic()
        before = self.written + self.audits_written
        caught_up = self.compactor.compact_to(self.backlog_writer.published, deadline)
        self.recovered = self.written + self.audits_written - before
        log.info(
            "request log: recovered %d rows and audit entries from the backlog %s in %.3fs",
            self.recovered,
            d,
            time.monotonic() - t0,
        )
        if not caught_up:
            log.error(
                "request log: %d backlog entries could not be written yet; the compactor will retry",
                self.backlog_writer.entries - self.compactor.entries,
            )

    def _scan_backlog(self) -> tuple[int, int]:
        """Entries and bytes of the old backlog still to compact (headers only)."""
        entries = size = 0
        for frame in self.compactor.old_frames(self.backlog_writer.published[0], body=False):
            entries += frame.n
            size += frame.size
        return entries, size

    # -- reads ----------------------------------------------------------------------------------

    def connect_readonly(self) -> sqlite3.Connection:
        """A new read-only connection to the database (caller closes it)."""
        return connect_readonly(self.path)

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self.connect_readonly()
            with self._reader_lock:
                self._reader_conns.append(conn)
            self._reader_local.conn = conn
        return conn

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(connection, *args, **kwargs)`` in the reader pool, once every finished request is in
        SQLite: how other modules (the dashboard's overview) run their own read-only queries."""
        return await self._read(fn, *args, **kwargs)

    async def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        pool = self._readers
        if pool is None:
            raise RuntimeError("request log is not running")
        call = functools.partial(self._call_reader, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def _call_reader(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # First bring SQLite up to date, so the answer includes every request that finished before
        # the call (this compacts the backlog here, at this thread's priority, if the compactor lags).
        if not self.flush(_READ_FLUSH_S):
            log.debug("request log: reading before every appended row reached the database")
        return fn(self._reader_conn(), *args, **kwargs)

    async def query(self, **filters: Any) -> dict[str, Any]:
        """See `queries.requests`: its keyword filters (status, model, node, tenant, since, until,
        limit, offset, key_id)."""
        return await self._read(queries.requests, **filters)

    async def get(self, request_id: int) -> dict[str, Any] | None:
        """See `queries.request`."""
        return await self._read(queries.request, request_id)

    async def stats(
        self,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """See `queries.stats`."""
        return await self._read(queries.stats, since=since, until=until, model=model, tenant=tenant)

    async def stats_by_model(
        self, since: float | None = None, until: float | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """See `queries.stats_by_model`."""
        return await self._read(queries.stats_by_model, since=since, until=until, tenant=tenant)

    async def stats_by_tenant(
        self, since: float | None = None, until: float | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """See `queries.stats_by_tenant` (the usage report)."""
        return await self._read(queries.stats_by_tenant, since=since, until=until, tenant=tenant)

    async def audit_entries(self, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """See `queries.audit_entries`."""
        return await self._read(queries.audit_entries, limit=limit, offset=offset)
