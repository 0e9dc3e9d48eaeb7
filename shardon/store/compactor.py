"""The request log's SQLite side: backlog frames into SQLite, one transaction at a time; retention.

`Compactor` holds the database connections and the compaction position (everything before it is
in SQLite, and the state file says so). The request log's compactor thread drives it, and so do
`RequestLog.flush` and reads, in their own threads; its lock lets one thread write SQLite at a
time, for one transaction at a time. A frame of rows goes in whole through
`shardon._fast.RowWriter` (parsed and written without the GIL); a bad row is retried alone and
dropped alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from shardon._fast import RowWriter
from shardon.config import StoreConfig

from . import backlog
from .backlog import KIND_ROWS
from .records import REQUEST_COLUMNS, RequestRecord, format_request_id, request_id_floor
from .schema import AUDIT_COLUMNS, INSERT_AUDIT, WRITER_PRAGMAS, open_writer

__all__ = ["Compactor", "left", "show_id"]

log = logging.getLogger("shardon.store")

_DELETE_CHUNK = 5_000  # rows deleted per retention statement (keeps write locks short)


def left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``), at least 0; None for no deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def show_id(value: object) -> str:
    """A request id for error messages: the client's hex form when it is one, else its repr."""
    return format_request_id(value) if type(value) is int and value >= 0 else repr(value)


def _row_id(packed: bytes) -> str:
    """The id of a packed row, for error messages."""
    try:
        value = msgspec.msgpack.decode(packed)[0]
    except (msgspec.DecodeError, IndexError, TypeError, KeyError):
        value = None
    return show_id(value)


class _RowFrame(NamedTuple):
    """A backlog frame of request rows, whole (for ``RowWriter.insert_frame``)."""

    body: bytes
    rows: int


class Compactor:
    """Moves the backlog in ``directory`` into the database at ``path``.

    ``error(exc)`` is told of every failed write (each is retried), ``drop(n)`` of rows given up.
    """

    def __init__(
        self,
        path: Path,
        directory: Path,
        config: StoreConfig,
        error: Callable[[BaseException], None],
        drop: Callable[[int], None],
    ) -> None:
        self.path = path
        self.directory = directory
        self.config = config
        self._error = error
        self._drop = drop
        self.lock = threading.Lock()
        """One thread writes SQLite at a time, one transaction per hold."""
        self.conn: sqlite3.Connection | None = None  # schema, audit entries, retention
        self.rows: RowWriter | None = None  # request rows
        self.position: tuple[int, int] = (1, 0)
        """Everything before this backlog position is in SQLite."""
        self._fd: int | None = None  # the segment being read
        self._fd_seg = 0
        self._state_error: str | None = None
        self._decode = msgspec.msgpack.Decoder().decode
        self.entries = 0
        """Backlog entries compacted (or given up)."""
        self.bytes = 0
        self.written = 0
        """Request rows committed to SQLite since start (a row replayed from the backlog counts again)."""
        self.audits_written = 0
        self.deleted = 0
        """Rows removed by retention since start."""
        self.last_cleanup: float | None = None

    def open(self) -> None:
        """Open (creating the directory and schema, migrating an old schema); raises what opening raised."""
        conn = open_writer(self.path)
        try:
            rows = RowWriter(str(self.path), "requests", REQUEST_COLUMNS, pragmas=WRITER_PRAGMAS)
        except BaseException:
            conn.close()
            raise
        self.conn, self.rows = conn, rows

    def newest_ids(self, published: tuple[int, int]) -> tuple[int, int]:
        """The largest request id and audit id stored, including the backlog not yet compacted
        (up to ``published``, at start)."""
        assert self.conn is not None
        newest = int(self.conn.execute("SELECT max(id) FROM requests").fetchone()[0] or 0)
        if self.position < published:  # some of the old backlog is still to be compacted
            newest = max(newest, self._backlog_max_id(published[0]))
        newest_audit = int(self.conn.execute("SELECT max(id) FROM audit").fetchone()[0] or 0)
        return newest, newest_audit

    def old_frames(self, before: int, body: bool) -> Iterator[backlog.Frame]:
        """The readable frames of the segments before ``before``, from the compaction position (at start)."""
        return backlog.frames_from(self.directory, self.position, before, body)

    def _backlog_max_id(self, before: int) -> int:
        newest = 0
        for frame in self.old_frames(before, body=True):
            if frame.status != backlog.OK or frame.kind != KIND_ROWS:
                continue
            for row in frame.entries:
                with contextlib.suppress(msgspec.DecodeError, IndexError, TypeError):
                    value = self._decode(row)[0]
                    if type(value) is int and value > newest:
                        newest = value
        return newest

    def close(self) -> None:
        """Close both connections (``PRAGMA optimize`` first) and the segment being read."""
        if not self.lock.acquire(timeout=5.0):  # pragma: no cover - a compaction stuck in SQLite
            log.error("request log: a compaction is still running; leaving its connections open")
            return
        try:
            self.close_segment()
            rows, self.rows = self.rows, None
            if rows is not None:
                rows.close()
            conn, self.conn = self.conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA optimize")
                conn.close()
        finally:
            self.lock.release()

    def compact_to(self, target: tuple[int, int], deadline: float | None) -> bool:
        """Compact up to backlog position ``target`` in the calling thread, retrying failures with
        back-off until ``deadline`` (``time.monotonic()``; None: no limit). True once it is there."""
        backoff = 0.01
        while True:
            if self.position >= target:
                return True
            wait = left(deadline)
            if wait is not None and wait <= 0:
                return False
            if not self.lock.acquire(timeout=-1 if wait is None else wait):
                return False
            failed = False
            try:
                while self.position < target:
                    try:
                        if not self.compact_once(target):
                            break
                    except (sqlite3.OperationalError, OSError) as exc:
                        self._error(exc)
                        failed = True
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            finally:
                self.lock.release()
            if self.position >= target:
                return True
            if not failed:
                continue  # out of time (checked above), or another round
            wait = left(deadline)
            time.sleep(backoff if wait is None else max(min(backoff, wait), 0.0))
            backoff = min(backoff * 2, 0.5)

    def compact_once(self, limit: tuple[int, int]) -> bool:
        """Move the compaction position towards ``limit`` by at most one SQLite transaction.

        The caller holds the compaction lock. Segments before ``limit``'s are sealed (read to their
        end, then deleted); ``limit``'s is read up to its offset. False when there was nothing to
        do; raises ``sqlite3.OperationalError`` or ``OSError`` (the position did not move).
        """
        while True:
            seg, off = self.position
            if (seg, off) >= limit:
                return False
            sealed = seg < limit[0]
            fd = self._open_compacted(seg)
            if fd is None:  # not there
                if sealed:
                    later = [n for n in backlog.segment_numbers(self.directory) if seg < n < limit[0]]
                    self.position = (later[0] if later else limit[0], 0)
                else:  # pragma: no cover - the active segment was deleted by hand
                    log.error("request log backlog: segment %d is gone; its rows are lost", seg)
                    self.position = limit
                continue
            end = os.fstat(fd).st_size if sealed else limit[1]
            if off < end:
                return self._compact_range(fd, seg, off, end)
            if not sealed:  # pragma: no cover - (seg, off) < limit
                return False
            self._finish_segment(seg)

    def _compact_range(self, fd: int, seg: int, off: int, end: int) -> bool:
        """One transaction's worth of the frames in ``[off, end)`` of segment ``seg``."""
        audits: list[bytes] = []
        batch_max = self.config.batch_max
        pos = off
        entries = 0
        while pos < end:
            frame = backlog.read_frame(fd, pos, end, split=False)
            if frame.status == backlog.OK:
                if frame.kind == KIND_ROWS:
                    if audits:
                        break
                    # A row frame is one transaction, handed to the writer whole: located, parsed
                    # and written without the GIL (no per-row loop holds the GIL in this thread).
                    self._write_frame(frame.body, frame.n)
                    pos += frame.size
                    entries += frame.n
                    break
                split = backlog.split_body(frame.body, frame.n, zlib.crc32(frame.body))
                if split is None:
                    log.error("request log backlog: segment %d, byte %d: a bad audit frame; dropped", seg, pos)
                    self._drop(frame.n)
                else:
                    audits += split
            elif frame.status == backlog.CORRUPT:
                log.error(
                    "request log backlog: segment %d, byte %d: a frame fails its checksum; dropping its %d entries",
                    seg,
                    pos,
                    frame.n,
                )
                self._drop(frame.n)
            else:
                log.warning(
                    "request log backlog: segment %d, byte %d: no readable frame (torn by a crash?); "
                    "ignoring its last %d bytes",
                    seg,
                    pos,
                    end - pos,
                )
                pos = end
                break
            pos += frame.size
            entries += frame.n
            if len(audits) >= batch_max:
                break
        if audits:
            self._write_batch([], audits)
        self.bytes += pos - off
        self.entries += entries
        self._advance((seg, pos))
        return True

    def _open_compacted(self, seg: int) -> int | None:
        if self._fd is not None and self._fd_seg == seg:
            return self._fd
        self.close_segment()
        try:
            fd = os.open(self.directory / backlog.segment_name(seg), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        self._fd, self._fd_seg = fd, seg
        return fd

    def close_segment(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _finish_segment(self, seg: int) -> None:
        """Segment ``seg`` is sealed and in SQLite: record that, delete it."""
        self.close_segment()
        self._advance((seg + 1, 0))
        try:
            (self.directory / backlog.segment_name(seg)).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("request log backlog: cannot delete compacted segment %d: %s", seg, exc)

    def _advance(self, pos: tuple[int, int]) -> None:
        """Move the compaction position to ``pos``: the state file first, then ``_cpos``.

        `flush` reads ``_cpos`` without the compaction lock; in this order, a flush that sees the
        new position returns only once the position is also on disk (a crash right after it replays
        nothing that is already in SQLite).
        """
        try:
            backlog.write_state(self.directory, pos)
        except OSError as exc:  # only costs a longer (harmless) replay after a crash
            msg = str(exc)
            if msg != self._state_error:
                log.warning("request log backlog: cannot record the compaction position: %s", msg)
            self._state_error = msg
        else:
            self._state_error = None
        self.position = pos

    def _write_frame(self, body: bytes, count: int) -> None:
        """A backlog frame of request rows into SQLite, in one transaction; a bad row is dropped alone.

        Raises ``sqlite3.OperationalError`` when the database cannot be written now.
        """
        try:
            self._transaction(_RowFrame(body, count), ())
        except sqlite3.OperationalError:  # locked, busy, disk full, I/O: the caller retries
            raise
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:  # a bad row
            self._error(exc)
            self._one_by_one(backlog.split_body(body, count, zlib.crc32(body)) or [], ())

    def _write_batch(self, rows: list[bytes], packed_audits: list[bytes]) -> None:
        """Write rows or audit entries into SQLite; a bad one is dropped alone.

        Raises ``sqlite3.OperationalError`` when the database cannot be written now (retry later:
        rewriting a row or an audit entry replaces it, by id).
        """
        audits: list[tuple[Any, ...]] = []
        for packed in packed_audits:
            try:
                entry = self._decode(packed)
                if type(entry) is not list or len(entry) != len(AUDIT_COLUMNS):
                    raise ValueError("not an audit entry")
            except (msgspec.DecodeError, ValueError) as exc:
                log.error("request log: dropping audit entry: %s", exc)
                self._drop(1)
                continue
            audits.append(tuple(entry))
        try:
            self._transaction(rows, audits)
        except sqlite3.OperationalError:  # locked, busy, disk full, I/O: the caller retries
            raise
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:  # a bad row
            self._error(exc)
            self._one_by_one(rows, audits)

    def _transaction(self, rows: list[bytes] | _RowFrame, audits: Sequence[tuple[Any, ...]]) -> None:
        """Rows (one transaction, by the RowWriter), then audit entries (another, on ``_conn``).

        If the audit part fails, the caller retries both: rewriting a row replaces it (same id).
        """
        if isinstance(rows, _RowFrame):
            writer = self.rows
            if writer is None:
                raise sqlite3.OperationalError("request log is closed")
            writer.insert_frame(rows.body, rows.rows)
            self.written += rows.rows
        elif rows:
            writer = self.rows
            if writer is None:
                raise sqlite3.OperationalError("request log is closed")
            writer.insert_packed(rows)
            self.written += len(rows)
        if audits:
            conn = self.conn
            if conn is None:
                raise sqlite3.OperationalError("request log is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(INSERT_AUDIT, audits)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.audits_written += len(audits)

    def _one_by_one(self, rows: Iterable[bytes], audits: Iterable[tuple[Any, ...]]) -> None:
        for row in rows:
            try:
                self._transaction([_widen_row(row)], ())
            except sqlite3.OperationalError:
                raise
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                log.error("request log: dropping row %s: %s", _row_id(row), exc)
                self._drop(1)
        for entry in audits:
            try:
                self._transaction([], [entry])
            except sqlite3.OperationalError:
                raise
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                log.error("request log: dropping audit entry: %s", exc)
                self._drop(1)

    def cleanup(self) -> None:
        """Delete the requests older than ``retention_days``. The caller holds the lock."""
        conn = self.conn
        days = self.config.retention_days
        self.last_cleanup = time.time()
        if days <= 0 or conn is None:
            return
        # By id, the primary key: every id below the floor of the cutoff is a row received before it
        # (ids are in arrival order; there is no received_at index to search).
        floor = request_id_floor(self.last_cleanup - days * 86400.0)
        removed = 0
        try:
            while True:
                cur = conn.execute(
                    "DELETE FROM requests WHERE id IN (SELECT id FROM requests WHERE id < ? ORDER BY id LIMIT ?)",
                    (floor, _DELETE_CHUNK),
                )
                removed += max(cur.rowcount, 0)
                if cur.rowcount < _DELETE_CHUNK:
                    break
            if removed:
                conn.execute("PRAGMA incremental_vacuum").fetchall()
        except sqlite3.Error as exc:
            self._error(exc)
        self.deleted += removed
        if removed:
            log.info("request log retention: deleted %d rows older than %s days", removed, days)


_record_decoder = msgspec.msgpack.Decoder(RequestRecord)
_record_encoder = msgspec.msgpack.Encoder()


def _widen_row(packed: bytes) -> bytes:
    """A packed row of an older `RequestRecord` (fewer fields: a backlog an older Shardon left) with
    the newer fields' defaults added; any other row as it is."""
    try:
        if len(msgspec.msgpack.decode(packed)) < len(REQUEST_COLUMNS):
            return _record_encoder.encode(_record_decoder.decode(packed))
    except (msgspec.DecodeError, TypeError):
        pass
    return packed
