"""The request log: one SQLite row per request that reached the gateway, and the admin audit trail.

Threading model
---------------
The log has two tiers, like an LSM tree's log and its compaction: an append-only *backlog* of framed
batches on disk, and the SQLite database the reads query. The request path never waits on either.

- The request path (the event loop) only calls `RequestLog.append(record)` and `RequestLog.audit(...)`:
  O(1), no I/O, no lock, safe from any thread. `append` queues the record on
  `RequestLog.row_queue` (`shardon._fast.rowqueue`: compiled; the callback path calls the queue's
  ``append`` directly), which packs it (msgpack) with the next records, 64 at a time or when the
  writer takes rows, into one reused buffer of rows back to back: packed in runs, the encoder's code
  and tables stay in the CPU caches that the network stack evicts between two requests (see
  ``bench/README.md``, request log and metrics cost). `audit` packs
  ``(id, at, actor, action, target, detail)`` onto a deque, its id taken from `RequestLog.audit_ids`
  when queued (a `RequestIds` of its own, seeded at start with the audit table's largest id), so
  that writing an entry twice replaces it.
- The writer thread (``shardon-store-writer``; OS thread name ``shardon-store``) never touches
  SQLite. Every ``flush_interval_ms`` (sooner when ``batch_max`` rows are waiting, or on `flush()`),
  it takes the queued rows, ``batch_max`` at a time, each batch already a frame's payload and
  length table, and appends them to the backlog, one frame per ``os.writev``; then the audit
  entries. It does no per-row work (the crc32 aside).
- The compactor thread (``shardon-store-compact``; OS name ``shardon-store-c``, on
  ``store.writer_cpus`` when set) reads the frames in order and writes them into SQLite: each frame
  of request rows whole, in one transaction, with `shardon._fast.RowWriter.insert_frame` (rows
  located, parsed and written through SQLite's C API without the GIL); audit entries with
  ``INSERT OR REPLACE`` by their id. After each transaction it records its position in the state
  file; it deletes each segment it has compacted completely (never the one the writer appends to),
  and every ``cleanup_interval_s`` (and at start) it deletes requests older than ``retention_days``
  (audit entries are kept). It sleeps until the writer signals new frames, or ``flush_interval_ms``
  (while the gateway is busy the writer does not signal: it sleeps the interval).
  It compacts only while the gateway is not busy: rows arriving slower than ``busy_rows_per_s``
  (then compacting as they come costs under 1% of a core). While the gateway is busy it waits for
  a lull, so SQLite takes no CPU from requests and the backlog grows on disk, not in memory, up to
  ``max_backlog_mb``, past which it compacts anyway. It runs at the normal priority: it shares the
  GIL with the event loop, and a low-priority thread holding the GIL while the OS keeps it off the
  CPU stalls the loop (measured: hundreds of ms of stream latency with nice 19 / SCHED_IDLE).
- One compaction lock is shared by the compactor, `flush()` callers and readers: one thread writes
  SQLite at a time (the `RowWriter` is single-threaded). The compactor takes it for one transaction at
  a time, so a flush waits at most for the transaction in progress.
- `flush(timeout)` wakes the writer, waits until its batch is in the backlog, then compacts up to
  there in the calling thread, at that thread's (normal) priority.
- Admin reads (`query`, `get`, `stats`, ...) are coroutines: they run on read-only connections in a
  small private thread pool, so the event loop never blocks on them. Each first does that flush in its
  pool thread, so the answer includes every request that finished before the call. WAL mode lets them
  read while the compactor writes.

Appending the same ``id`` again replaces the row (last write wins), so the gateway may log a request
early and again when it ends (as a new record: a record appended is the log's, and is packed as it
is when its run is packed; the gateway's records are final when appended).

The backlog
-----------
``<database file name>-backlog/`` next to the database (``shardon.db-backlog/``) holds segment files
``000000000001.seg``, ``000000000002.seg``, ... and a state file ``state``. The writer appends frames
to the newest segment; once one is past ``_SEGMENT_BYTES`` (16 MiB) it is fsynced and closed and the
next frame starts a new segment (numbers only increase while the directory has files). A frame::

    offset     size       field (integers little-endian)
    0          4          magic b"SHBL"
    4          1          kind: 1 request rows (packed RequestRecord arrays),
                                2 audit entries (packed (id, at, actor, action, target, detail) arrays)
    5          3          zero
    8          4          count: entries in the frame
    12         4          body length: 4 * count + payload bytes
    16         4          crc32 of the body (lengths and payload)
    20         4          crc32 of bytes 0-19
    24         4 * count  body: each entry's length (u32) ...
    ...                   ... then the entries back to back (the payload)

The state file is JSON, ``{"segment": n, "offset": bytes}``: every frame before that position is in
SQLite. It is written (a temporary file, then ``os.replace``) after each committed transaction, not
fsynced. A missing or unreadable one means "replay every segment there is". Replaying is harmless:
rows are ``INSERT OR REPLACE`` by id, audit entries too, so a crash between a commit and the state
write only writes some rows twice. `close()` removes the backlog (its files, then the directory).

Recovery: `start()` opens the database (schema, migration), then compacts whatever backlog a
previous process left (``recovered`` counts it), synchronously, then seeds `request_ids` (so new ids
exceed the recovered ones too), then starts both threads. A frame whose header is unreadable or that
runs past the end of its file (torn by a crash mid-write) ends its segment: it and the rest of that
segment are ignored. A frame whose body fails its checksum is skipped alone, its entries counted in
``dropped``. The rows before either are recovered.

Durability and crash-loss bound
-------------------------------
If the process crashes (or is killed), the rows lost are those still in memory: at most the rows
appended during the last flush window (``flush_interval_ms``, 200 ms by default), provided the writer
keeps up (see ``pending``). Rows in the backlog survive in the OS page cache and are written into
SQLite at the next start. On an OS crash or power loss, the backlog rows not yet fsynced may be lost
too (a segment is fsynced when it is rotated and at close: at most the current segment, 16 MiB), and
the database is in WAL mode with ``synchronous=NORMAL``, which may roll back the transactions
committed since the last WAL checkpoint, whose segments may already be deleted. `close()` (also run
at interpreter exit) writes everything into SQLite.

If the database cannot be written (locked beyond the busy timeout, disk full), the compactor retries
with back-off and the rows wait in the backlog (``pending`` and ``backlog_bytes`` grow); a `close()`
that cannot write them in time fsyncs the backlog and leaves it for the next start. If the backlog
cannot be written (disk full, an unwritable directory), the writer keeps the rows in memory and
retries with back-off; beyond ``_MAX_PENDING`` waiting rows it drops the oldest ones and counts them
in ``dropped``. A row SQLite refuses (e.g. an integer too large) is dropped alone.

Cost model
----------
- Request path: packing into the row queue's buffer, ~0.2 µs per row (no allocation).
- Writer: per batch of up to ``batch_max`` rows one copy of the buffer, one crc32 and one
  ``os.writev``: the crc32 (~0.1 µs per 200-byte row) and the kernel's copy into the page cache,
  a small fraction of what the SQLite write costs. (Under callgrind, request log on vs off in
  ``bench/gateway_path.py``: about 3,000 instructions per request, writer included.)
- SQLite: about 3 µs of CPU per row, on the compactor: spare CPU only, deferred while the gateway
  is saturated. An admin read (or `flush()`) forces it, in the caller's thread at normal priority, up
  to the rows appended before it: a read after a long saturated stretch pays for the whole backlog.

Request ids
-----------
A request id is a 63-bit integer, ``(milliseconds since the epoch << 20) + n``, from `request_ids`
(`RequestIds`): ids only increase, so they sort by arrival, and the time in an id is never earlier
than the row's ``received_at``: the gateway takes both from one clock reading
(``RequestRecord(id=request_ids.next(now), received_at=now)``). A record built otherwise must keep
``id >= request_id_floor(received_at)`` for the time filters to see it exactly (`RequestRecord`'s
defaults read the clock twice, id first, so give both where ``since`` matters). At start the log
reads its newest id (`RequestLog.newest_id`) and seeds `request_ids` with it, so new ids exceed every
stored one even if the clock went back. Clients see an id as 16 hex digits
(`format_request_id`, the ``x-request-id`` header); `parse_request_id` reads it back, and every row
dict the reads return carries ``"id"`` in that form.

Schema (``PRAGMA user_version`` = 3)::

    requests(id INTEGER PRIMARY KEY, received_at REAL, queued_at REAL, dispatched_at REAL,
             first_token_at REAL, finished_at REAL, endpoint TEXT, tenant TEXT, key_id TEXT,
             model TEXT, node_id TEXT, backend TEXT, model_file_sha256 TEXT, priority TEXT,
             stream INTEGER, status INTEGER, error_type TEXT, prompt_tokens INTEGER,
             completion_tokens INTEGER, bytes_in INTEGER, bytes_out INTEGER, retries INTEGER,
             overflow INTEGER, client_addr TEXT, output_sha256 TEXT, max_tokens INTEGER)
      id is the rowid itself (no separate key B-tree)
      index: status WHERE status <> 200 (partial: errors only)
    audit(id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, actor TEXT, action TEXT, target TEXT,
          detail TEXT -- JSON object)
      id: given by the log (`RequestLog.audit_ids`, like a request id); entries written before
          the backlog have small AUTOINCREMENT ids, which sort before them
      index: at

Columns that a newer `RequestRecord` adds (``max_tokens``) are added to an older database with ALTER
TABLE at start, and the rows of a backlog an older Shardon left, shorter by those columns, are
widened with the new fields' defaults when they are written (`_widen_row`).

Why so few indexes: each index costs every row a B-tree insert on the compactor's core (about 0.5 µs
each here, see bench/README.md), and the log's whole budget is a few percent of the proxy's time per
request. The id is the rowid, so a row is one B-tree insert (a text key was a second B-tree, and a
``received_at`` index a third: a row write went from about 4.3 to 2.8 µs without them).
Because ids are in arrival order, the table is its own time index: listing is ``ORDER BY id DESC``
(newest first, no sort), ``since`` adds the bound ``id >= request_id_floor(since)`` (it never excludes
a matching row; the exact ``received_at`` filter is kept), and retention deletes by id. Status filters
that exclude 200 use the partial index (errors are rare rows); filters on model, node, tenant and key
scan the requested time range, so on a large log give ``since``.

Migration: version 1 and 2 databases (``id TEXT PRIMARY KEY``; told apart by the type of ``id`` in
``PRAGMA table_info``, not only by ``user_version``) are rebuilt at start, in one transaction: the old
table is renamed, the new one created, every row copied in ``received_at`` order with the id
``(milliseconds of received_at << 20) + n`` (n numbers the rows of one millisecond), and the old table
and its indexes (``received_at``; version 1's four composite ones) dropped. The old text ids are not
kept: before 1.0 they were only ever echoed in ``x-request-id`` headers, nothing stored or looked
them up. A database of a newer version than this Shardon's is refused.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import functools
import itertools
import logging
import os
import sqlite3
import struct
import sys
import threading
import time
import weakref
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import msgspec
import orjson

from shardon._fast import RowWriter
from shardon._fast.rowqueue import RowQueue
from shardon._threads import name_this_thread
from shardon.receipts import receipt_for

__all__ = [
    "AUDIT_COLUMNS",
    "REQUEST_COLUMNS",
    "SCHEMA_VERSION",
    "RequestIds",
    "RequestLog",
    "RequestRecord",
    "StoreConfig",
    "format_request_id",
    "parse_request_id",
    "parse_status_filter",
    "request_id_floor",
    "request_ids",
]

log = logging.getLogger("shardon.store")

T = TypeVar("T")

SCHEMA_VERSION = 3
_MAX_PENDING = 500_000  # rows kept in memory while the database cannot be written
_DELETE_CHUNK = 5_000  # rows deleted per retention statement (keeps write locks short)
_PERCENTILES = (50, 90, 99)


class StoreConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``store:`` section of the configuration."""

    path: str = ""
    """SQLite file. Empty: ``$XDG_DATA_HOME/shardon/shardon.db`` (``~/.local/share/shardon/shardon.db``)."""
    retention_days: float = 7
    """Requests older than this are deleted; 0 or less keeps them forever."""
    flush_interval_ms: int = 200
    """How often the writer thread moves what was appended to the on-disk backlog (the process-crash
    loss window); also how long the compactor sleeps when the writer does not wake it."""
    batch_max: int = 1000
    """Most rows per backlog frame and per SQLite transaction; this many waiting rows also wake the
    writer early."""
    cleanup_interval_s: float = 3600
    """How often the retention clean-up runs (it also runs at start)."""
    writer_cpus: list[int] = msgspec.field(default_factory=list)
    """CPUs the compactor thread (the one doing the SQLite work) may run on (Linux). Empty: the
    process's own. On a machine with a core to spare, giving it cores other than the event loop's
    keeps its cache traffic off the request path's core (see bench/README.md). The writer thread,
    which only appends to the backlog, stays put."""
    busy_rows_per_s: float = 2000
    """Above this many rows a second appended, the gateway counts as busy and compaction into
    SQLite waits for a lull (below it, compacting as rows come costs under 1% of a core). A read,
    a flush, shutdown, or a backlog over ``max_backlog_mb`` compacts at once whatever the rate."""
    max_backlog_mb: float = 256
    """The backlog (on disk) past which compaction runs even while the gateway is busy."""

    def __post_init__(self) -> None:
        if self.flush_interval_ms <= 0:
            raise ValueError("store.flush_interval_ms must be > 0")
        if self.batch_max <= 0:
            raise ValueError("store.batch_max must be > 0")
        if self.cleanup_interval_s <= 0:
            raise ValueError("store.cleanup_interval_s must be > 0")
        if any(cpu < 0 for cpu in self.writer_cpus):
            raise ValueError("store.writer_cpus must be CPU numbers (>= 0)")
        if self.busy_rows_per_s < 0:
            raise ValueError("store.busy_rows_per_s must be >= 0")
        if self.max_backlog_mb <= 0:
            raise ValueError("store.max_backlog_mb must be > 0")

    def resolved_path(self) -> Path:
        """The database file this config names (``~`` and environment variables expanded)."""
        if self.path:
            return Path(os.path.expandvars(self.path)).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or ""
        root = Path(base).expanduser() if base else Path.home() / ".local" / "share"
        return root / "shardon" / "shardon.db"


class RequestIds:
    """Request ids: ``(milliseconds since the epoch << 20) + n``, 63-bit integers that only increase.

    A clock stepping back cannot repeat an id (the counter carries on past the last one); ids from
    one process sort by arrival, and `seed` (the request log calls it with its newest row's id at
    start) keeps them increasing across restarts. Shown to clients as 16 hex digits
    (`format_request_id`).
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def next(self, now: float) -> int:
        value = int(now * 1000) << 20
        if value <= self.last:
            value = self.last + 1
        self.last = value
        return value

    def seed(self, newest: int) -> None:
        """Ids handed out from now on exceed ``newest``."""
        if newest > self.last:
            self.last = newest


request_ids = RequestIds()
"""The process's request ids (the gateway's and `RequestRecord`'s default)."""


def format_request_id(request_id: int) -> str:
    """A request id as clients see it: 16 lower-case hex digits."""
    return f"{request_id:016x}"


def parse_request_id(text: str) -> int:
    """The id `format_request_id` wrote; ValueError for anything else."""
    if len(text) != 16 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError("a request id is 16 hex digits")
    return int(text, 16)


def request_id_floor(t: float) -> int:
    """The smallest id a request received at unix time ``t`` or later can have."""
    return int(t * 1000) << 20


def _new_id() -> int:
    return request_ids.next(time.time())


class RequestRecord(msgspec.Struct, kw_only=True, gc=False, array_like=True):
    """One request as the gateway saw it; filled in progressively, appended to the log when it ends.

    ``id`` is the integer request id (`request_ids`; the request log's primary key, shown to clients
    by `format_request_id`); keep ``id >= request_id_floor(received_at)`` (see the module docstring).
    Timestamps are unix seconds (``time.time()``). ``status`` is the HTTP status sent to the client
    (499 when the client went away; 0 while unknown). ``key_id`` identifies an API key, never the
    secret itself. Fields are in the request log's column order; the log packs a record as a
    msgpack array of them (``array_like``).
    """

    id: int = msgspec.field(default_factory=_new_id)
    received_at: float = msgspec.field(default_factory=time.time)
    queued_at: float | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    endpoint: str = ""
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    node_id: str | None = None
    backend: str | None = None
    model_file_sha256: str | None = None
    priority: str | None = None
    stream: bool = False
    status: int = 0
    error_type: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    overflow: bool = False
    client_addr: str | None = None
    output_sha256: str | None = None
    # The max_tokens Shardon applied to a model it started itself (shardon/lifecycle/requests.py).
    max_tokens: int | None = None


REQUEST_COLUMNS: tuple[str, ...] = RequestRecord.__struct_fields__
AUDIT_COLUMNS: tuple[str, ...] = ("id", "at", "actor", "action", "target", "detail")

_SQL_TYPES = {
    "id": "INTEGER PRIMARY KEY NOT NULL",  # the rowid itself: one B-tree per row, no separate key
    "received_at": "REAL",
    "queued_at": "REAL",
    "dispatched_at": "REAL",
    "first_token_at": "REAL",
    "finished_at": "REAL",
    "endpoint": "TEXT NOT NULL DEFAULT ''",
    "stream": "INTEGER NOT NULL DEFAULT 0",
    "status": "INTEGER NOT NULL DEFAULT 0",
    "prompt_tokens": "INTEGER",
    "completion_tokens": "INTEGER",
    "bytes_in": "INTEGER NOT NULL DEFAULT 0",
    "bytes_out": "INTEGER NOT NULL DEFAULT 0",
    "retries": "INTEGER NOT NULL DEFAULT 0",
    "overflow": "INTEGER NOT NULL DEFAULT 0",
    "max_tokens": "INTEGER",
}
_BOOL_COLUMNS = frozenset({"stream", "overflow"})

_NOT_OK = "status <> 200"  # the partial index's condition; a query must repeat it word for word to use it
_INDEXES = (
    ("idx_requests_errors", f"requests(status) WHERE {_NOT_OK}"),
    ("idx_audit_at", "audit(at)"),
)
_DROPPED_INDEXES = (
    "idx_requests_status",  # v1
    "idx_requests_model",  # v1
    "idx_requests_tenant",  # v1
    "idx_requests_node",  # v1
    "idx_requests_received_at",  # v1, v2: ids are in arrival order
)
# 2 MiB of page cache: rows are appended at the right edge of the id B-tree (and of the small
# errors index), so the pages a write touches are few; a bigger cache only grew the gateway's RSS
# (by the whole 32 MiB it used to allow) without speeding up the compactor.
_WRITER_PRAGMAS = ("cache_size = -2048",)

_INSERT_AUDIT = "INSERT OR REPLACE INTO audit (id, at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)"
_OLD_REQUESTS = "requests_before_v3"  # the old table's name while a v1/v2 database is rebuilt


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``), at least 0; None for no deadline."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _show_id(value: object) -> str:
    """A request id for error messages: the client's hex form when it is one, else its repr."""
    return format_request_id(value) if type(value) is int and value >= 0 else repr(value)


def _row_id(packed: bytes) -> str:
    """The id of a packed row, for error messages."""
    try:
        value = msgspec.msgpack.decode(packed)[0]
    except (msgspec.DecodeError, IndexError, TypeError, KeyError):
        value = None
    return _show_id(value)


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


def _column_sql(name: str) -> str:
    return f"{name} {_SQL_TYPES.get(name, 'TEXT')}"


def _create_requests_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS requests ({})".format(", ".join(_column_sql(c) for c in REQUEST_COLUMNS)))


def _has_integer_id(table_info: list[Any]) -> bool:
    """Whether ``PRAGMA table_info(requests)`` shows ``id INTEGER PRIMARY KEY`` (the rowid alias)."""
    pk = [row for row in table_info if row[5]]
    return len(pk) == 1 and pk[0][1] == "id" and str(pk[0][2]).upper() == "INTEGER"


def _rebuild_with_integer_ids(conn: sqlite3.Connection, old_columns: Sequence[str]) -> int:
    """Rebuild a v1/v2 ``requests`` table (``id TEXT PRIMARY KEY``) with integer ids. Returns the rows copied.

    Runs inside the caller's transaction. A row's new id is ``(milliseconds of received_at << 20) + n``,
    n numbering the rows of one millisecond in ``received_at`` order (then old rowid order): unique,
    in arrival order, and never earlier than the row's ``received_at``, as `RequestIds` makes them.
    The old text ids are dropped (see the module docstring). ``INSERT OR REPLACE`` turns a NULL
    (from a hand-made table) in a ``NOT NULL DEFAULT`` column into the default.
    """
    conn.execute(f"ALTER TABLE requests RENAME TO {_OLD_REQUESTS}")
    _create_requests_table(conn)
    copied = [c for c in REQUEST_COLUMNS if c != "id" and c in old_columns]
    ms = "CAST(COALESCE(received_at, 0) * 1000 AS INTEGER)" if "received_at" in old_columns else "0"
    order = "received_at, old_rowid" if "received_at" in old_columns else "old_rowid"
    more = "".join(f", {c}" for c in copied)
    conn.execute(
        f"INSERT OR REPLACE INTO requests (id{more}) "
        f"SELECT (ms << 20) + ROW_NUMBER() OVER (PARTITION BY ms ORDER BY {order}) - 1{more} "
        f"FROM (SELECT {ms} AS ms, rowid AS old_rowid{more} FROM {_OLD_REQUESTS}) ORDER BY ms, {order}"
    )
    n = int(conn.execute("SELECT changes()").fetchone()[0])
    conn.execute(f"DROP TABLE {_OLD_REQUESTS}")  # and its indexes
    return n


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema (idempotent). ``conn`` is in autocommit mode.

    One transaction: a v1/v2 database is rebuilt with integer ids (`_rebuild_with_integer_ids`),
    missing columns are added, dropped indexes dropped, ``user_version`` raised to `SCHEMA_VERSION`.
    """
    rebuilt = -1
    conn.execute("BEGIN IMMEDIATE")
    try:
        info = conn.execute("PRAGMA table_info(requests)").fetchall()
        if info and not _has_integer_id(info):
            rebuilt = _rebuild_with_integer_ids(conn, [row[1] for row in info])
        else:
            _create_requests_table(conn)
        have = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        for col in REQUEST_COLUMNS:
            if col not in have:
                conn.execute(f"ALTER TABLE requests ADD COLUMN {_column_sql(col)}")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
            "actor TEXT, action TEXT NOT NULL, target TEXT, detail TEXT)"
        )
        for name in _DROPPED_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        for name, target in _INDEXES:
            conn.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {target}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if rebuilt >= 0:
        log.info("request log: rebuilt %d rows with integer request ids (schema version %d)", rebuilt, SCHEMA_VERSION)
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA incremental_vacuum").fetchall()  # give the old table's pages back


# -- the backlog ----------------------------------------------------------------------------------

_SEGMENT_BYTES = 16 << 20  # a segment past this size is fsynced and closed; the writer starts the next
_SEGMENT_SUFFIX = ".seg"
_STATE_FILE = "state"
_MAGIC = b"SHBL"
_KIND_ROWS = 1  # entries: packed RequestRecord arrays (what `RequestLog.append` queued)
_KIND_AUDIT = 2  # entries: packed (id, at, actor, action, target, detail) arrays
_HEAD = struct.Struct("<4sB3xIII")  # magic, kind, (pad), count, body length, crc32 of the body
_U32 = struct.Struct("<I")
_HEAD_SIZE = _HEAD.size + _U32.size  # and the crc32 of the fields before it
_LENGTHS = "I"  # array typecode of the entry lengths (u32, little-endian in the file)
if array(_LENGTHS).itemsize != 4:  # pragma: no cover - no supported platform
    raise ImportError("shardon.store needs a 4-byte C unsigned int")
_SWAP = sys.byteorder != "little"
_READ_FLUSH_S = 5.0  # how long a read waits for rows appended before it to reach SQLite

# _read_frame statuses
_OK = 0  # a whole frame, checksums good
_CORRUPT = 1  # the header is good but the body fails its checksum: skip this frame (its size is known)
_TORN = 2  # no readable frame here (cut short, or the header is garbage): nothing after it can be trusted


class _Frame(NamedTuple):
    status: int
    kind: int
    n: int  # entries (known from the header even when the body is corrupt)
    entries: list[bytes]
    size: int  # bytes the frame takes in its segment (0 when torn)
    body: bytes = b""  # the checked body, when read with split=False (entries then stays empty)


_NO_FRAME = _Frame(_TORN, 0, 0, [], 0)


class _RowFrame(NamedTuple):
    """A backlog frame of request rows, whole (for ``RowWriter.insert_frame``)."""

    body: bytes
    rows: int


def _lengths_of(raw: bytes) -> array[int]:
    """Entry lengths from their stored form (u32, little-endian)."""
    lengths = array(_LENGTHS)
    lengths.frombytes(raw)
    if _SWAP:  # pragma: no cover - big-endian hosts
        lengths.byteswap()
    return lengths


def _frame_from(kind: int, count: int, lengths: array[int] | bytes, payload: bytes) -> tuple[list[Any], int]:
    """The pieces of one frame (for a single ``os.writev``) and its size in bytes.

    ``lengths`` are the entry lengths, already in file (little-endian) byte order; ``payload`` the
    entries back to back.
    """
    body_len = 4 * count + len(payload)
    head = _HEAD.pack(_MAGIC, kind, count, body_len, zlib.crc32(payload, zlib.crc32(lengths)))
    return [head + _U32.pack(zlib.crc32(head)), lengths, payload], _HEAD_SIZE + body_len


def _frame_parts(kind: int, entries: list[bytes]) -> tuple[list[Any], int]:
    """`_frame_from` for a list of entries."""
    lengths = array(_LENGTHS, map(len, entries))
    if _SWAP:  # pragma: no cover - big-endian hosts
        lengths.byteswap()
    return _frame_from(kind, len(entries), lengths, b"".join(entries))


def encode_frame(kind: int, entries: list[bytes]) -> bytes:
    """One backlog frame holding ``entries`` (see the module docstring), as bytes."""
    pieces, _ = _frame_parts(kind, entries)
    return b"".join(pieces)


def _parse_head(head: bytes) -> tuple[int, int, int, int] | None:
    """``(kind, count, body length, body crc32)`` of a frame header; None when it is not one."""
    if len(head) != _HEAD_SIZE or head[:4] != _MAGIC:
        return None
    if zlib.crc32(head[: _HEAD.size]) != _U32.unpack_from(head, _HEAD.size)[0]:
        return None
    _, kind, count, body_len, body_crc = _HEAD.unpack_from(head)
    if kind not in (_KIND_ROWS, _KIND_AUDIT) or body_len < 4 * count:
        return None
    return kind, count, body_len, body_crc


def _split_body(body: bytes, count: int, body_crc: int) -> list[bytes] | None:
    """A frame body's entries; None when it fails its checksum or its lengths do not add up."""
    if zlib.crc32(body) != body_crc:
        return None
    start = 4 * count
    lengths = _lengths_of(body[:start])
    if start + sum(lengths) != len(body):
        return None
    return [body[a:b] for a, b in itertools.pairwise(itertools.accumulate(lengths, initial=start))]


def _read_frame(fd: int, off: int, end: int, body: bool = True, split: bool = True) -> _Frame:
    """The frame at byte ``off`` of the segment open as ``fd``, whose frames end at or before ``end``.

    ``body=False`` reads and checks only the header (``entries`` stays empty). ``split=False``
    checks the body but leaves it whole in ``body`` (the compactor hands row frames to
    ``RowWriter.insert_frame`` as they are).
    """
    if end - off < _HEAD_SIZE:
        return _NO_FRAME
    parsed = _parse_head(os.pread(fd, _HEAD_SIZE, off))
    if parsed is None:
        return _NO_FRAME
    kind, count, body_len, body_crc = parsed
    size = _HEAD_SIZE + body_len
    if off + size > end:
        return _NO_FRAME
    if not body:
        return _Frame(_OK, kind, count, [], size)
    data = os.pread(fd, body_len, off + _HEAD_SIZE)
    if len(data) != body_len:
        return _NO_FRAME
    if not split:
        if zlib.crc32(data) != body_crc:
            return _Frame(_CORRUPT, kind, count, [], size)
        return _Frame(_OK, kind, count, [], size, data)
    entries = _split_body(data, count, body_crc)
    if entries is None:
        return _Frame(_CORRUPT, kind, count, [], size)
    return _Frame(_OK, kind, count, entries, size)


def read_segment(path: str | os.PathLike[str]) -> list[_Frame]:
    """Every frame of a segment file, in order, up to and including the first torn one (for tools and tests)."""
    frames: list[_Frame] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        off = 0
        while off < end:
            frame = _read_frame(fd, off, end)
            frames.append(frame)
            if frame.status == _TORN:
                break
            off += frame.size
    finally:
        os.close(fd)
    return frames


def _segment_name(n: int) -> str:
    return f"{n:012d}{_SEGMENT_SUFFIX}"


def _segment_numbers(directory: Path) -> list[int]:
    """The numbers of the segment files in ``directory``, ascending (none if it is missing)."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    n = len(_SEGMENT_SUFFIX)
    return sorted(
        int(name[:-n])
        for name in names
        if name.endswith(_SEGMENT_SUFFIX) and len(name) == 12 + n and name[:-n].isdigit()
    )


def _read_state(directory: Path) -> tuple[int, int] | None:
    """The compaction position the state file records, or None (missing or unreadable)."""
    try:
        data = orjson.loads((directory / _STATE_FILE).read_bytes())
        pos = (int(data["segment"]), int(data["offset"]))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("request log backlog %s: ignoring an unreadable state file (%s); replaying it all", directory, exc)
        return None
    if pos[0] < 0 or pos[1] < 0:
        log.warning("request log backlog %s: ignoring a state file that records %s; replaying it all", directory, pos)
        return None
    return pos


def _write_state(directory: Path, pos: tuple[int, int]) -> None:
    """Record the compaction position: write a temporary file and rename it over the state file."""
    tmp = directory / (_STATE_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps({"segment": pos[0], "offset": pos[1]}))
    os.replace(tmp, directory / _STATE_FILE)


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


# -- filters --------------------------------------------------------------------------------------


def parse_status_filter(status: int | str) -> tuple[int, int]:
    """``404`` / ``"404"`` → (404, 405); ``"4xx"`` → (400, 500). Raises ValueError when invalid."""
    if isinstance(status, bool):
        raise ValueError("must be an HTTP status like 404 or a class like 4xx")
    if isinstance(status, int):
        code = status
    else:
        text = status.strip().lower()
        if len(text) == 3 and text.endswith("xx") and text[0] in "12345":
            base = int(text[0]) * 100
            return base, base + 100
        if not (text.isascii() and text.isdigit()):
            raise ValueError("must be an HTTP status like 404 or a class like 4xx")
        code = int(text)
    if not 100 <= code <= 599:
        raise ValueError("must be between 100 and 599")
    return code, code + 1


def _where(
    *,
    status: int | str | None = None,
    model: str | None = None,
    node: str | None = None,
    tenant: str | None = None,
    key_id: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if status is not None:
        lo, hi = parse_status_filter(status)
        if hi - lo == 1:
            clauses.append("status = ?")
            args.append(lo)
        else:
            clauses.append("status >= ? AND status < ?")
            args += [lo, hi]
        if not lo <= 200 < hi:
            clauses.append(_NOT_OK)  # lets SQLite use the partial index of non-200 rows
    for column, value in (("model", model), ("node_id", node), ("tenant", tenant), ("key_id", key_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        # The id bound lets SQLite seek the primary key to the first row that can match (an id's
        # time is never earlier than its received_at); the exact received_at test stays.
        clauses.append("id >= ?")
        args.append(request_id_floor(float(since)))
        clauses.append("received_at >= ?")
        args.append(float(since))
    if until is not None:
        clauses.append("received_at < ?")
        args.append(float(until))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _row_dict(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    """A request row as callers see it: ``"id"`` as 16 hex digits, booleans as bool, the receipt."""
    d = dict(zip(columns, row, strict=True))
    if "id" in d:
        d["id"] = format_request_id(d["id"])
    for col in _BOOL_COLUMNS:
        if col in d and d[col] is not None:
            d[col] = bool(d[col])
    d["receipt"] = receipt_for(d) if d.get("finished_at") is not None else None
    return d


# -- synchronous reads (run in the reader pool; tests call them on their own connection) ----------

_SELECT_REQUESTS = "SELECT {} FROM requests".format(", ".join(REQUEST_COLUMNS))


def _query_sync(
    conn: sqlite3.Connection,
    status: int | str | None = None,
    model: str | None = None,
    node: str | None = None,
    tenant: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    offset: int = 0,
    key_id: str | None = None,
) -> dict[str, Any]:
    """Requests matching every given filter, newest first: ``{"data": [row, ...], "total": n}``.

    ``status`` is an exact status (404) or a class ("4xx"); ``since``/``until`` bound ``received_at``
    (``since <= received_at < until``); ``total`` counts every match, ignoring limit/offset. Newest
    first is by id (arrival order): a walk down the primary key, no sort. Each row's ``"id"`` is
    the 16-hex-digit form (`format_request_id`).
    """
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")
    where, args = _where(status=status, model=model, node=node, tenant=tenant, key_id=key_id, since=since, until=until)
    total = conn.execute(f"SELECT COUNT(*) FROM requests{where}", args).fetchone()[0]
    rows = conn.execute(
        f"{_SELECT_REQUESTS}{where} ORDER BY id DESC LIMIT ? OFFSET ?",
        [*args, int(limit), int(offset)],
    ).fetchall()
    return {"data": [_row_dict(REQUEST_COLUMNS, r) for r in rows], "total": total}


def _get_sync(conn: sqlite3.Connection, request_id: int) -> dict[str, Any] | None:
    """One request by its integer id (`parse_request_id` reads the hex form), or None."""
    if not 0 <= request_id < 1 << 63:  # 16 hex digits can name more than SQLite's integers hold
        return None
    row = conn.execute(f"{_SELECT_REQUESTS} WHERE id = ?", (request_id,)).fetchone()
    return None if row is None else _row_dict(REQUEST_COLUMNS, row)


def _percentiles(
    conn: sqlite3.Connection, expr: str, present: str, where: str, args: list[Any], group: str | None
) -> dict[Any, dict[str, float | None]]:
    """Nearest-rank p50/p90/p99 (ms) of ``expr`` over successful (2xx) requests, per ``group``.

    Computed inside SQLite with window functions: no value list is materialised in Python.
    """
    cond = f"{present} IS NOT NULL AND status >= 200 AND status < 300"
    where = f"{where} AND {cond}" if where else f" WHERE {cond}"
    g = group or "NULL"
    ranks = " OR ".join(f"rn = ({p} * n + 99) / 100" for p in _PERCENTILES)
    sql = (
        f"WITH v AS (SELECT {g} AS g, ({expr}) AS x FROM requests{where}), "
        "r AS (SELECT g, x, ROW_NUMBER() OVER (PARTITION BY g ORDER BY x) AS rn, "
        "COUNT(*) OVER (PARTITION BY g) AS n FROM v) "
        f"SELECT g, rn, n, x FROM r WHERE {ranks}"
    )
    out: dict[Any, dict[str, float | None]] = {}
    for g_val, rn, n, x in conn.execute(sql, args):
        slot = out.setdefault(g_val, {f"p{p}": None for p in _PERCENTILES})
        for p in _PERCENTILES:
            if rn == (p * n + 99) // 100:
                slot[f"p{p}"] = round(x * 1000.0, 3)
    return out


_EMPTY_PCT: dict[str, float | None] = {f"p{p}": None for p in _PERCENTILES}

_TIMINGS = (
    ("latency_ms", "finished_at - received_at", "finished_at"),
    ("ttft_ms", "first_token_at - received_at", "first_token_at"),
    ("queue_ms", "dispatched_at - received_at", "dispatched_at"),
)


def _stats_grouped(
    conn: sqlite3.Connection, group: str | None, since: float | None, until: float | None, **filters: Any
) -> dict[Any, dict[str, Any]]:
    where, args = _where(since=since, until=until, **filters)
    g = group or "NULL"
    out: dict[Any, dict[str, Any]] = {}
    sql = (
        f"SELECT {g}, status, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
        f"COALESCE(SUM(completion_tokens), 0) FROM requests{where} GROUP BY {g}, status"
    )
    for g_val, status, n, p_tok, c_tok in conn.execute(sql, args):
        s = out.setdefault(
            g_val,
            {
                "total": 0,
                "completed": 0,
                "failed": 0,
                "by_status": {},
                "tokens": {"prompt": 0, "completion": 0},
            },
        )
        s["total"] += n
        if 200 <= (status or 0) < 300:
            s["completed"] += n
        else:
            s["failed"] += n
        s["by_status"][str(status)] = n
        s["tokens"]["prompt"] += p_tok
        s["tokens"]["completion"] += c_tok
    for key, expr, present in _TIMINGS:
        pct = _percentiles(conn, expr, present, where, args, group)
        for g_val, s in out.items():
            s[key] = pct.get(g_val, dict(_EMPTY_PCT))
    return out


def _empty_stats() -> dict[str, Any]:
    s: dict[str, Any] = {
        "total": 0,
        "completed": 0,
        "failed": 0,
        "by_status": {},
        "tokens": {"prompt": 0, "completion": 0},
    }
    for key, _, _ in _TIMINGS:
        s[key] = dict(_EMPTY_PCT)
    return s


def _stats_sync(
    conn: sqlite3.Connection,
    since: float | None = None,
    until: float | None = None,
    model: str | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Totals over ``since <= received_at < until``.

    ``{"total", "completed" (2xx), "failed" (not 2xx), "by_status": {"200": n, ...},
    "tokens": {"prompt", "completion"}, "latency_ms" / "ttft_ms" / "queue_ms": {"p50", "p90", "p99"},
    "since", "until"}``. Percentiles are nearest-rank over successful requests, measured from
    ``received_at`` (so ttft includes queueing); None when there is no data. Token sums include the
    partial usage of failed requests.
    """
    grouped = _stats_grouped(conn, None, since, until, model=model, tenant=tenant)
    s = grouped.get(None) or _empty_stats()
    s["since"] = since
    s["until"] = until
    return s


def _stats_by_model_sync(
    conn: sqlite3.Connection,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """`_stats_sync` per model: ``{"data": [{"model": m, ...stats}, ...]}``, busiest first."""
    grouped = _stats_grouped(conn, "model", since, until, tenant=tenant)
    data = [{"model": m, **s} for m, s in grouped.items()]
    data.sort(key=lambda d: (-d["total"], d["model"] or ""))
    return {"data": data, "since": since, "until": until}


def _stats_by_tenant_sync(
    conn: sqlite3.Connection,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Usage report: requests and tokens per tenant, and per API key inside each tenant.

    ``{"data": [{"tenant", "requests", "completed", "failed", "prompt_tokens", "completion_tokens",
    "total_tokens", "keys": [{"key_id", ...same counters}]}], "since", "until"}``, busiest first.
    """
    where, args = _where(since=since, until=until, tenant=tenant)
    sql = (
        "SELECT tenant, key_id, COUNT(*), "
        "SUM(CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END), "
        "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
        f"FROM requests{where} GROUP BY tenant, key_id"
    )
    tenants: dict[Any, dict[str, Any]] = {}

    def counters(n: int, ok: int, p: int, c: int) -> dict[str, int]:
        return {
            "requests": n,
            "completed": ok,
            "failed": n - ok,
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
        }

    for t, key_id, n, ok, p, c in conn.execute(sql, args):
        entry = tenants.get(t)
        if entry is None:
            entry = tenants[t] = {"tenant": t, **counters(0, 0, 0, 0), "keys": []}
        for k, v in counters(n, ok, p, c).items():
            entry[k] += v
        entry["keys"].append({"key_id": key_id, **counters(n, ok, p, c)})
    data = list(tenants.values())
    for entry in data:
        entry["keys"].sort(key=lambda d: (-d["requests"], d["key_id"] or ""))
    data.sort(key=lambda d: (-d["requests"], d["tenant"] or ""))
    return {"data": data, "since": since, "until": until}


def _audit_entries_sync(conn: sqlite3.Connection, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """Audit entries, newest first.

    ``{"data": [{"id", "at", "actor", "action", "target", "detail" (dict)}, ...], "total": n}``.
    """
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")
    total = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    rows = conn.execute(
        "SELECT id, at, actor, action, target, detail FROM audit ORDER BY at DESC, id DESC LIMIT ? OFFSET ?",
        (int(limit), int(offset)),
    ).fetchall()
    data = []
    for row in rows:
        d = dict(zip(AUDIT_COLUMNS, row, strict=True))
        d["detail"] = orjson.loads(d["detail"]) if d["detail"] else {}
        data.append(d)
    return {"data": data, "total": total}


# -- the log --------------------------------------------------------------------------------------

_open_logs: weakref.WeakSet[RequestLog] = weakref.WeakSet()


@atexit.register
def _close_open_logs() -> None:  # pragma: no cover - runs at interpreter exit
    for rl in list(_open_logs):
        with contextlib.suppress(Exception):
            rl.close(timeout=5.0)


class RequestLog:
    """SQLite request log: a writer thread fills an on-disk backlog, a compactor thread moves it into
    SQLite. See the module docstring."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self.path = self.config.resolved_path()
        self.backlog_dir = self.path.with_name(self.path.name + "-backlog")
        """The backlog's segment files and state file (``<database file name>-backlog``)."""
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
        self._compactor: threading.Thread | None = None
        self._cwake = threading.Event()  # wakes the compactor
        self._cstop = False
        self._cbusy = False  # the compactor is waiting for a lull (the writer does not wake it)
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._late_logged = False
        self._pack = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder().decode
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._audit_lock = threading.Lock()
        self.audit_ids = RequestIds()
        """Audit entry ids (assigned when queued, so a replayed entry replaces itself); seeded at start
        with the audit table's largest id."""
        # The writer's side of the backlog (the writer thread only, once started).
        self._wseg = 1  # the segment it appends to
        self._wfd: int | None = None
        self._woff = 0  # the segment's size: where the next frame goes
        self._published: tuple[int, int] = (1, 0)  # the backlog ends here: (segment, offset)
        self._in_entries = 0  # entries put in the backlog (this process's, and a previous one's found at start)
        self._in_bytes = 0
        # How fast rows arrive (the compactor's measure of "busy": see _busy).
        self._busy_rate = self.config.busy_rows_per_s
        self._max_backlog = int(self.config.max_backlog_mb * 1024 * 1024)
        self._rate = 0.0
        self._rate_at = time.monotonic()
        self._rate_entries = 0
        # The SQLite side, all under _compact_lock: one thread writes SQLite at a time.
        self._compact_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None  # schema, audit entries, retention
        self._rows: RowWriter | None = None  # request rows
        self._cpos: tuple[int, int] = (1, 0)  # everything before this backlog position is in SQLite
        self._cfd: int | None = None
        self._cfd_seg = 0
        self._out_entries = 0  # backlog entries compacted (or given up)
        self._out_bytes = 0
        self._state_error: str | None = None
        # Counters (read them from anywhere).
        self.written = 0
        """Request rows committed to SQLite since start (a row replayed from the backlog counts again)."""
        self.audits_written = 0
        self.recovered = 0
        """Request rows and audit entries a previous process left in the backlog, written at start."""
        self.dropped = 0
        """Rows given up (refused by SQLite, over ``_MAX_PENDING`` while failing, corrupt in the
        backlog, or appended after close)."""
        self.write_errors = 0
        """Failed writes, to the backlog or to SQLite (each retried)."""
        self.last_error: str | None = None
        self.deleted = 0
        """Rows removed by retention since start."""
        self.last_cleanup: float | None = None
        self.newest_id = 0
        """The largest request id stored when the log started (0 for an empty log), backlog included.
        Start seeds `request_ids` with it, so ids handed out afterwards are larger than every stored one."""
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
        the rest. Then seeds `request_ids` past every stored id, backlog included. Idempotent.
        """
        if self._closed:
            raise RuntimeError("RequestLog is closed")
        if self._thread is not None:
            return
        try:
            conn = self._open_writer()
            try:
                rows = RowWriter(str(self.path), "requests", REQUEST_COLUMNS, pragmas=_WRITER_PRAGMAS)
            except BaseException:
                conn.close()
                raise
        except Exception as err:
            raise RuntimeError(f"request log {self.path}: cannot open database: {err}") from err
        self._conn, self._rows = conn, rows
        try:
            self._recover(time.monotonic() + timeout)
            newest = int(conn.execute("SELECT max(id) FROM requests").fetchone()[0] or 0)
            if self._cpos < self._published:  # some of the old backlog is still to be compacted
                newest = max(newest, self._backlog_max_id())
            newest_audit = int(conn.execute("SELECT max(id) FROM audit").fetchone()[0] or 0)
        except Exception as err:
            self._close_cfd()
            self._close_database()
            raise RuntimeError(
                f"request log {self.path}: cannot recover the backlog {self.backlog_dir}: {err}"
            ) from err
        self.newest_id = newest
        request_ids.seed(newest)
        self.audit_ids.seed(newest_audit)
        self._compactor = threading.Thread(target=self._run_compactor, name="shardon-store-compact", daemon=True)
        self._thread = threading.Thread(target=self._run_writer, name="shardon-store-writer", daemon=True)
        self._compactor.start()
        self._thread.start()
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shardon-store-read")
        _open_logs.add(self)

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def pending(self) -> int:
        """Request rows and audit entries appended but not yet in SQLite: in memory (a `flush` waiting
        there counts as one) and in the backlog."""
        return len(self._q) + self._queued_rows() + max(self._in_entries - self._out_entries, 0)

    def _queued_rows(self) -> int:
        return len(self.row_queue) + self._held_rows

    @property
    def backlog_bytes(self) -> int:
        """Bytes of backlog frames not yet compacted into SQLite."""
        return max(self._in_bytes - self._out_bytes, 0)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until everything appended before this call is in SQLite. True if it was in time.

        Wakes the writer, waits until its batch is in the backlog, then compacts up to there in the
        calling thread (at its priority, under the compaction lock). Not for the event loop (use
        `aflush`). Returns False when the writer is not running and rows are waiting.
        """
        if not self.running:
            return not self._q and not self._queued_rows() and self._cpos >= self._published
        deadline = None if timeout is None else time.monotonic() + timeout
        pos = self._flush_to_backlog(timeout)
        return pos is not None and self._compact_to(pos, deadline)

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
        _open_logs.discard(self)
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
            writer.join(_left(deadline))
            if writer.is_alive():
                log.error("request log writer did not stop in %ss; %d rows unwritten", timeout, self._queued_rows())
        compactor = self._compactor
        if compactor is not None and compactor.is_alive():
            self._cstop = True
            self._cwake.set()
            compactor.join(_left(deadline))
            if compactor.is_alive():
                log.error("request log compactor did not stop in %ss", timeout)
        left = self.row_queue.clear() + self._held_rows
        self._held.clear()
        self._held_rows = 0
        for item in self._q:
            if type(item) is _Flush:
                item.done.set()
            else:
                left += 1
        if left:
            log.error("request log closed with %d rows unwritten", left)
            self.dropped += left
        self._q.clear()
        if self._conn is not None and not (writer is not None and writer.is_alive()):
            caught_up = self._compact_to(self._published, deadline)  # what the writer took after the flush
            self._close_backlog(caught_up)
        self._close_database()
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
        fd, self._wfd = self._wfd, None
        if fd is not None:
            if not caught_up:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
            os.close(fd)
        if not caught_up:
            log.error(
                "request log: %d entries (%d bytes) wait in the backlog %s for the next start",
                max(self._in_entries - self._out_entries, 0),
                self.backlog_bytes,
                self.backlog_dir,
            )
            return
        d = self.backlog_dir
        try:
            for n in _segment_numbers(d):
                (d / _segment_name(n)).unlink(missing_ok=True)
            for name in (_STATE_FILE + ".tmp", _STATE_FILE):
                (d / name).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("request log: cannot remove the backlog %s: %s", d, exc)
            return
        with contextlib.suppress(OSError):  # not there, or someone else's file in it
            d.rmdir()

    def _close_database(self) -> None:
        if not self._compact_lock.acquire(timeout=5.0):  # pragma: no cover - a compaction stuck in SQLite
            log.error("request log: a compaction is still running; leaving its connections open")
            return
        try:
            self._close_cfd()
            rows, self._rows = self._rows, None
            if rows is not None:
                rows.close()
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA optimize")
                conn.close()
        finally:
            self._compact_lock.release()

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
        log.error("request log: dropping row %s: the row queue could not take it", _show_id(record.id))
        self.dropped += 1

    def _unpackable(self, record: RequestRecord) -> None:
        """Account for a record the row queue could not pack: no row can hold one of its values."""
        try:
            self._pack(record)
        except (OverflowError, TypeError, ValueError) as exc:  # never the caller's problem
            reason = str(exc)
        else:  # pragma: no cover - the queue could not grow (out of memory)
            reason = "the queue is out of memory"
        log.error("request log: dropping row %s: %s", _show_id(record.id), reason)
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
                pieces, size = _frame_parts(_KIND_AUDIT, audits)
                ok = self._append_frames(pieces, size, len(audits))
        if not ok:
            q.extendleft(reversed(items))
            self._shed()
            return False
        pos = self._published
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
                pieces, size = _frame_from(_KIND_ROWS, count, lengths, payload)
                if not self._append_frames(pieces, size, count):
                    return False
                held.popleft()
                self._held_rows -= count
            if left <= 0:
                return True
            batch = self.row_queue.take(min(left, self._batch_max))
            if batch is None:  # pragma: no cover - only this thread takes
                return True
            left -= batch[2]
            held.append(batch)
            self._held_rows += batch[2]

    def _append_frames(self, pieces: list[Any], size: int, count: int) -> bool:
        """Write whole frames to the end of the backlog with one ``os.writev``; False if it failed."""
        try:
            fd = self._wfd
            if fd is None:
                fd = self._open_segment()
            n = os.writev(fd, pieces)
            if n != size:
                raise OSError(errno.EIO, f"short write to the backlog ({n} of {size} bytes)")
        except OSError as exc:
            self._error(exc)
            self._undo_partial_write()
            return False
        self._woff += size
        self._in_entries += count
        self._in_bytes += size
        self._published = (self._wseg, self._woff)
        if self._woff >= _SEGMENT_BYTES:
            self._rotate()
        if not self._cbusy:  # a busy compactor waits for a lull, not for frames: don't wake it
            self._cwake.set()
        return True

    def _open_segment(self) -> int:
        while True:
            os.makedirs(self.backlog_dir, exist_ok=True)
            path = self.backlog_dir / _segment_name(self._wseg)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_size == 0:
                self._wfd, self._woff = fd, 0
                return fd
            os.close(fd)  # pragma: no cover - someone else's file: leave it to the compactor, take the next
            log.warning("request log backlog: %s is not empty; starting the next segment", path)
            self._wseg += 1
            self._published = (self._wseg, 0)

    def _undo_partial_write(self) -> None:
        fd = self._wfd
        if fd is None:
            return
        try:
            os.ftruncate(fd, self._woff)  # drop the start of a frame a short write left
        except OSError:  # the segment may end in a torn frame: seal it there (recovery skips the tail)
            self._wfd = None
            with contextlib.suppress(OSError):
                os.close(fd)
            self._wseg += 1
            self._woff = 0
            self._published = (self._wseg, 0)
            self._cwake.set()

    def _rotate(self) -> None:
        """Seal the current segment (fsync, close); the next frame starts a new one."""
        fd, self._wfd = self._wfd, None
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as exc:
                log.warning("request log backlog: fsync of segment %d failed: %s", self._wseg, exc)
            os.close(fd)
        self._wseg += 1
        self._woff = 0
        self._published = (self._wseg, 0)

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
                cut = sum(_lengths_of(lengths[: 4 * gone]))
                held[0] = (payload[cut:], lengths[4 * gone :], count - gone)
            self._held_rows -= gone
            self.dropped += gone
            excess -= gone
        while excess > 0:
            batch = self.row_queue.take(min(excess, self._batch_max))
            if batch is None:  # pragma: no cover - only this thread takes
                break
            self.dropped += batch[2]
            excess -= batch[2]

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
        the last tenth of a second or more) and the backlog is under its limit: compaction waits then.

        Why wait rather than run at a low CPU priority: this thread shares the GIL with the event
        loop, and a low-priority thread holding the GIL while the OS keeps it off the CPU stalls the
        loop (a priority inversion, measured: hundreds of ms of stream latency). So it runs at the
        normal priority, and only when it costs requests nothing: in a lull, or on demand.
        """
        now = time.monotonic()
        elapsed = now - self._rate_at
        if elapsed >= 0.1:  # short: at the start of a load, compaction stops within ~0.1 s
            self._rate = (self._in_entries - self._rate_entries) / elapsed
            self._rate_at, self._rate_entries = now, self._in_entries
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
                    with self._compact_lock:
                        if self._conn is not None:
                            self._cleanup(self._conn)
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
            with self._compact_lock:
                try:
                    if not self._compact_once(self._published):
                        return True
                except (sqlite3.OperationalError, OSError) as exc:  # locked, busy, disk full, I/O
                    self._error(exc)
                    return False
            if self._busy():  # requests came back: the rest waits for the next lull
                return True
        return True

    def _compact_to(self, target: tuple[int, int], deadline: float | None) -> bool:
        """Compact up to backlog position ``target`` in the calling thread, retrying failures with
        back-off until ``deadline`` (``time.monotonic()``; None: no limit). True once it is there."""
        backoff = 0.01
        while True:
            if self._cpos >= target:
                return True
            wait = _left(deadline)
            if wait is not None and wait <= 0:
                return False
            if not self._compact_lock.acquire(timeout=-1 if wait is None else wait):
                return False
            failed = False
            try:
                while self._cpos < target:
                    try:
                        if not self._compact_once(target):
                            break
                    except (sqlite3.OperationalError, OSError) as exc:
                        self._error(exc)
                        failed = True
                        break
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            finally:
                self._compact_lock.release()
            if self._cpos >= target:
                return True
            if not failed:
                continue  # out of time (checked above), or another round
            wait = _left(deadline)
            time.sleep(backoff if wait is None else max(min(backoff, wait), 0.0))
            backoff = min(backoff * 2, 0.5)

    def _compact_once(self, limit: tuple[int, int]) -> bool:
        """Move the compaction position towards ``limit`` by at most one SQLite transaction.

        The caller holds the compaction lock. Segments before ``limit``'s are sealed (read to their
        end, then deleted); ``limit``'s is read up to its offset. False when there was nothing to
        do; raises ``sqlite3.OperationalError`` or ``OSError`` (the position did not move).
        """
        while True:
            seg, off = self._cpos
            if (seg, off) >= limit:
                return False
            sealed = seg < limit[0]
            fd = self._open_compacted(seg)
            if fd is None:  # not there
                if sealed:
                    later = [n for n in _segment_numbers(self.backlog_dir) if seg < n < limit[0]]
                    self._cpos = (later[0] if later else limit[0], 0)
                else:  # pragma: no cover - the active segment was deleted by hand
                    log.error("request log backlog: segment %d is gone; its rows are lost", seg)
                    self._cpos = limit
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
        batch_max = self._batch_max
        pos = off
        entries = 0
        while pos < end:
            frame = _read_frame(fd, pos, end, split=False)
            if frame.status == _OK:
                if frame.kind == _KIND_ROWS:
                    if audits:
                        break
                    # A row frame is one transaction, handed to the writer whole: located, parsed
                    # and written without the GIL (no per-row loop holds the GIL in this thread).
                    self._write_frame(frame.body, frame.n)
                    pos += frame.size
                    entries += frame.n
                    break
                split = _split_body(frame.body, frame.n, zlib.crc32(frame.body))
                if split is None:
                    log.error("request log backlog: segment %d, byte %d: a bad audit frame; dropped", seg, pos)
                    self.dropped += frame.n
                else:
                    audits += split
            elif frame.status == _CORRUPT:
                log.error(
                    "request log backlog: segment %d, byte %d: a frame fails its checksum; dropping its %d entries",
                    seg,
                    pos,
                    frame.n,
                )
                self.dropped += frame.n
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
        self._out_bytes += pos - off
        self._out_entries += entries
        self._advance((seg, pos))
        return True

    def _open_compacted(self, seg: int) -> int | None:
        if self._cfd is not None and self._cfd_seg == seg:
            return self._cfd
        self._close_cfd()
        try:
            fd = os.open(self.backlog_dir / _segment_name(seg), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        self._cfd, self._cfd_seg = fd, seg
        return fd

    def _close_cfd(self) -> None:
        fd, self._cfd = self._cfd, None
        if fd is not None:
            os.close(fd)

    def _finish_segment(self, seg: int) -> None:
        """Segment ``seg`` is sealed and in SQLite: record that, delete it."""
        self._close_cfd()
        self._advance((seg + 1, 0))
        try:
            (self.backlog_dir / _segment_name(seg)).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("request log backlog: cannot delete compacted segment %d: %s", seg, exc)

    def _advance(self, pos: tuple[int, int]) -> None:
        """Move the compaction position to ``pos``: the state file first, then ``_cpos``.

        `flush` reads ``_cpos`` without the compaction lock; in this order, a flush that sees the
        new position returns only once the position is also on disk (a crash right after it replays
        nothing that is already in SQLite).
        """
        try:
            _write_state(self.backlog_dir, pos)
        except OSError as exc:  # only costs a longer (harmless) replay after a crash
            msg = str(exc)
            if msg != self._state_error:
                log.warning("request log backlog: cannot record the compaction position: %s", msg)
            self._state_error = msg
        else:
            self._state_error = None
        self._cpos = pos

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
            self._one_by_one(_split_body(body, count, zlib.crc32(body)) or [], ())

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
                self.dropped += 1
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
            writer = self._rows
            if writer is None:
                raise sqlite3.OperationalError("request log is closed")
            writer.insert_frame(rows.body, rows.rows)
            self.written += rows.rows
        elif rows:
            writer = self._rows
            if writer is None:
                raise sqlite3.OperationalError("request log is closed")
            writer.insert_packed(rows)
            self.written += len(rows)
        if audits:
            conn = self._conn
            if conn is None:
                raise sqlite3.OperationalError("request log is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_AUDIT, audits)
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
                self.dropped += 1
        for entry in audits:
            try:
                self._transaction([], [entry])
            except sqlite3.OperationalError:
                raise
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                log.error("request log: dropping audit entry: %s", exc)
                self.dropped += 1

    def _cleanup(self, conn: sqlite3.Connection) -> None:
        days = self.config.retention_days
        self.last_cleanup = time.time()
        if days <= 0:
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

    # -- start: the schema, and a previous process's backlog ------------------------------------

    def _open_writer(self) -> sqlite3.Connection:
        """The read-write connection for the schema, audit entries and retention (creates the schema)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
                # A new database. Must precede the first table and the switch to WAL: lets the
                # retention clean-up give pages back to the file system (incremental_vacuum).
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"cannot enable WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA cache_size = -2048")  # see _WRITER_PRAGMAS
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"database schema version {version} is newer than this Shardon ({SCHEMA_VERSION})")
            _create_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _recover(self, deadline: float) -> None:
        """Set the backlog positions from what is on disk and compact a previous process's backlog."""
        d = self.backlog_dir
        segs = _segment_numbers(d)
        state = _read_state(d)
        first = max([*segs, state[0] if state else 0]) + 1  # the writer's first segment: after every old one
        self._wseg = first
        self._published = (first, 0)  # every old segment is sealed
        if state is None:
            self._cpos = (segs[0] if segs else first, 0)
        else:
            for n in segs:  # compacted before the crash, not yet deleted
                if n < state[0]:
                    with contextlib.suppress(OSError):
                        (d / _segment_name(n)).unlink()
            self._cpos = self._checked_position(state)
        if not segs:
            self._cpos = self._published
            return
        self._in_entries, self._in_bytes = self._scan_backlog()
        t0 = time.monotonic()
        before = self.written + self.audits_written
        caught_up = self._compact_to(self._published, deadline)
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
                self._in_entries - self._out_entries,
            )

    def _checked_position(self, state: tuple[int, int]) -> tuple[int, int]:
        """The state file's position, or the start of its segment if no frame starts there."""
        seg, off = state
        if off == 0:
            return state
        try:
            fd = os.open(self.backlog_dir / _segment_name(seg), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return state  # compaction moves on to the next segment there is
        try:
            size = os.fstat(fd).st_size
            if off == size or (off < size and os.pread(fd, 4, off) == _MAGIC):
                return state
        finally:
            os.close(fd)
        log.warning("request log backlog: no frame at the recorded position %s; replaying segment %d", state, seg)
        return (seg, 0)

    def _old_frames(self, body: bool) -> Iterator[_Frame]:
        """The readable frames of the old (sealed) backlog from the compaction position (at start)."""
        seg, off = self._cpos
        for n in _segment_numbers(self.backlog_dir):
            if n < seg or n >= self._published[0]:
                continue
            try:
                fd = os.open(self.backlog_dir / _segment_name(n), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                end = os.fstat(fd).st_size
                pos = off if n == seg else 0
                while pos < end:
                    frame = _read_frame(fd, pos, end, body)
                    if frame.status == _TORN:
                        break
                    yield frame
                    pos += frame.size
            finally:
                os.close(fd)

    def _scan_backlog(self) -> tuple[int, int]:
        """Entries and bytes of the old backlog still to compact (headers only)."""
        entries = size = 0
        for frame in self._old_frames(body=False):
            entries += frame.n
            size += frame.size
        return entries, size

    def _backlog_max_id(self) -> int:
        """The largest request id in the old backlog still to compact (only when start could not)."""
        newest = 0
        for frame in self._old_frames(body=True):
            if frame.status != _OK or frame.kind != _KIND_ROWS:
                continue
            for row in frame.entries:
                with contextlib.suppress(msgspec.DecodeError, IndexError, TypeError):
                    value = self._decode(row)[0]
                    if type(value) is int and value > newest:
                        newest = value
        return newest

    # -- reads ----------------------------------------------------------------------------------

    def connect_readonly(self) -> sqlite3.Connection:
        """A new read-only connection to the database (caller closes it)."""
        uri = f"file:{quote(str(self.path))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA query_only = ON")
        return conn

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

    async def query(
        self,
        status: int | str | None = None,
        model: str | None = None,
        node: str | None = None,
        tenant: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
        key_id: str | None = None,
    ) -> dict[str, Any]:
        """See `_query_sync`."""
        return await self._read(
            _query_sync,
            status=status,
            model=model,
            node=node,
            tenant=tenant,
            since=since,
            until=until,
            limit=limit,
            offset=offset,
            key_id=key_id,
        )

    async def get(self, request_id: int) -> dict[str, Any] | None:
        """See `_get_sync`."""
        return await self._read(_get_sync, request_id)

    async def stats(
        self,
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
        tenant: str | None = None,
    ) -> dict[str, Any]:
        """See `_stats_sync`."""
        return await self._read(_stats_sync, since=since, until=until, model=model, tenant=tenant)

    async def stats_by_model(
        self, since: float | None = None, until: float | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """See `_stats_by_model_sync`."""
        return await self._read(_stats_by_model_sync, since=since, until=until, tenant=tenant)

    async def stats_by_tenant(
        self, since: float | None = None, until: float | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """See `_stats_by_tenant_sync` (the usage report)."""
        return await self._read(_stats_by_tenant_sync, since=since, until=until, tenant=tenant)

    async def audit_entries(self, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        """See `_audit_entries_sync`."""
        return await self._read(_audit_entries_sync, limit=limit, offset=offset)
