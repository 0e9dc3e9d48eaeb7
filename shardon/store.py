"""The request log: one SQLite row per request that reached the gateway, and the admin audit trail.

Threading model
---------------
- The request path (the event loop) only calls `RequestLog.append(record)` and `RequestLog.audit(...)`.
  Both append to an in-memory deque: O(1), no I/O, no lock, safe from any thread. They never wait
  on the database. `append` packs the record first (msgpack, ~0.2 µs): the row is a snapshot, and
  the record can be freed at once, as it would be without a log.
- One daemon thread (``shardon-store``, also its OS thread name) owns the write connections. Every
  ``flush_interval_ms`` (sooner when ``batch_max`` rows are waiting, or on `flush()`), it drains the
  deque in batches of at most ``batch_max`` rows, each batch one transaction, written by
  `shardon._fast.RowWriter.insert_packed`: rows parsed and written through SQLite's C API with the
  GIL released, so the writer barely competes with the event loop for the GIL (the pure-Python twin
  decodes with msgspec and uses ``executemany``). Every
  ``cleanup_interval_s`` it deletes requests older than ``retention_days`` (audit entries are kept).
- Admin reads (`query`, `get`, `stats`, ...) are coroutines: they run on read-only connections in a
  small private thread pool, so the event loop never blocks on them. WAL mode lets them read while
  the writer writes.

Appending the same ``id`` again replaces the row (last write wins), so the gateway may log a request
early and again when it ends. A record is snapshotted (packed) when appended: mutating it afterwards
does not change what is written.

Durability and crash-loss bound
-------------------------------
The database is in WAL mode with ``synchronous=NORMAL``. If the process crashes (or is killed), the
rows lost are those still in memory: at most the rows appended during the last flush window
(``flush_interval_ms``, 200 ms by default), provided the writer keeps up (see ``pending``). On an OS
crash or power loss, WAL with ``synchronous=NORMAL`` may additionally roll back the transactions
committed since the last WAL checkpoint. `close()` (also run at interpreter exit) flushes everything.

If the database cannot be written (locked beyond the busy timeout, disk full), the writer keeps the
rows and retries with back-off; beyond ``_MAX_PENDING`` waiting rows it drops the oldest ones and
counts them in ``dropped``. A row SQLite refuses (e.g. an integer too large) is dropped alone.

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
             overflow INTEGER, client_addr TEXT, output_sha256 TEXT)
      id is the rowid itself (no separate key B-tree)
      index: status WHERE status <> 200 (partial: errors only)
    audit(id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL, actor TEXT, action TEXT, target TEXT,
          detail TEXT -- JSON object)
      index: at

Columns that a newer `RequestRecord` adds are added to an older database with ALTER TABLE at start.

Why so few indexes: each index costs every row a B-tree insert on the writer's core (about 0.5 µs
each here, see bench/README.md), and the log's whole budget is a few percent of the proxy's time per
request. The id is the rowid, so a row is one B-tree insert (a text key was a second B-tree, and a
``received_at`` index a third: the writer went from about 4.3 to 2.8 µs per row without them).
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
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import msgspec
import orjson

from shardon._fast import RowWriter
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
    """How often the writer thread commits what was appended (the crash-loss window)."""
    batch_max: int = 1000
    """Most rows per transaction; this many waiting rows also wake the writer early."""
    cleanup_interval_s: float = 3600
    """How often the retention clean-up runs (it also runs at start)."""
    writer_cpus: list[int] = msgspec.field(default_factory=list)
    """CPUs the writer thread may run on (Linux). Empty: the process's own. On a machine with a core
    to spare, giving the writer cores other than the event loop's takes the log's cost off the
    request path (see bench/README.md)."""

    def __post_init__(self) -> None:
        if self.flush_interval_ms <= 0:
            raise ValueError("store.flush_interval_ms must be > 0")
        if self.batch_max <= 0:
            raise ValueError("store.batch_max must be > 0")
        if self.cleanup_interval_s <= 0:
            raise ValueError("store.cleanup_interval_s must be > 0")
        if any(cpu < 0 for cpu in self.writer_cpus):
            raise ValueError("store.writer_cpus must be CPU numbers (>= 0)")

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
_WRITER_PRAGMAS = ("cache_size = -32768",)  # 32 MiB: index pages stay in memory

_INSERT_AUDIT = "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"
_OLD_REQUESTS = "requests_before_v3"  # the old table's name while a v1/v2 database is rebuilt


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


class _Audit(tuple[Any, ...]):
    """An audit entry in the write queue (a tuple subclass, to tell it from request rows)."""

    __slots__ = ()


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
    """SQLite request log with a background writer thread. See the module docstring."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig()
        self.path = self.config.resolved_path()
        self._q: deque[Any] = deque()
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._late_logged = False
        self._batch_max = self.config.batch_max
        self._pack = msgspec.msgpack.Encoder().encode
        self._readers: ThreadPoolExecutor | None = None
        self._rows: RowWriter  # the request-row writer, opened by the writer thread
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        # Counters (read them from anywhere; written by the writer thread only).
        self.written = 0
        """Request rows committed since start."""
        self.audits_written = 0
        self.dropped = 0
        """Rows given up (refused by SQLite, over ``_MAX_PENDING`` while failing, or after close)."""
        self.write_errors = 0
        self.last_error: str | None = None
        self.deleted = 0
        """Rows removed by retention since start."""
        self.last_cleanup: float | None = None
        self.newest_id = 0
        """The largest request id stored when the log started (0 for an empty log). The writer seeds
        `request_ids` with it, so ids handed out afterwards are larger than every stored one."""
        self.writer_cpus: list[int] | None = None
        """The CPUs the writer thread was moved to, when ``writer_cpus`` is set and that worked."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Open the database (creating directory and schema) in the writer thread and start it.

        Waits until the database is open and raises what opening it raised, so a bad path fails
        at start-up rather than at the first request. Idempotent.
        """
        if self._closed:
            raise RuntimeError("RequestLog is closed")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="shardon-store-writer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"request log {self.path}: database did not open in {timeout}s")
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            err, self._start_error = self._start_error, None
            self._ready.clear()
            raise RuntimeError(f"request log {self.path}: cannot open database: {err}") from err
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shardon-store-read")
        _open_logs.add(self)

    @property
    def running(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    @property
    def pending(self) -> int:
        """Items appended but not yet written."""
        return len(self._q)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Block until everything appended before this call is committed. True if it was in time.

        Not for the event loop (use `aflush`). Returns False when the writer is not running and
        rows are waiting.
        """
        if not self.running:
            return not self._q
        done = threading.Event()
        self._q.append(done)
        self._wake.set()
        return done.wait(timeout)

    async def aflush(self, timeout: float | None = 10.0) -> bool:
        """`flush` from the event loop, without blocking it."""
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush, stop the writer thread, close every connection. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _open_logs.discard(self)
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.flush(timeout)
            self._stopping = True
            self._wake.set()
            thread.join(timeout)
            if thread.is_alive():
                log.error("request log writer did not stop in %ss; %d rows unwritten", timeout, len(self._q))
        left = sum(1 for item in self._q if isinstance(item, (bytes, _Audit)))
        if left:
            log.error("request log closed with %d rows unwritten", left)
            self.dropped += left
        self._q.clear()
        readers = self._readers
        self._readers = None
        if readers is not None:
            readers.shutdown(wait=True, cancel_futures=True)
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

    # -- the hot path ---------------------------------------------------------------------------

    def append(self, record: RequestRecord) -> None:
        """Queue a request row. O(1), no I/O, thread-safe; never waits on the database.

        The record is packed now: changing it afterwards does not change the row.
        """
        if self._closed:
            self._late()
            return
        try:
            packed = self._pack(record)
        except (OverflowError, TypeError, ValueError) as exc:  # a value no row can hold; never the caller's problem
            log.error("request log: dropping row %s: %s", _show_id(record.id), exc)
            self.dropped += 1
            return
        q = self._q
        q.append(packed)
        if len(q) >= self._batch_max and not self._wake.is_set():
            self._wake.set()

    def audit(
        self, actor: str | None, action: str, target: str | None = None, detail: dict[str, Any] | None = None
    ) -> None:
        """Queue an audit entry (who did what to which object). O(1) apart from encoding ``detail``."""
        if self._closed:
            self._late()
            return
        blob = orjson.dumps(detail or {}, default=str).decode()
        self._q.append(_Audit((time.time(), actor, action, target, blob)))
        self._wake.set()

    def _late(self) -> None:
        if not self._late_logged:
            self._late_logged = True
            log.error("request log is closed; dropping rows appended after close")
        self.dropped += 1

    # -- the writer thread ----------------------------------------------------------------------

    def _pin_writer(self) -> None:
        """Move this (the writer) thread to ``writer_cpus``; on failure, say so and stay put."""
        cpus = set(self.config.writer_cpus)
        if not cpus:
            return
        try:
            os.sched_setaffinity(0, cpus)  # 0: the calling thread, on Linux
        except (AttributeError, OSError, ValueError) as exc:
            log.warning("request log writer: cannot run on CPUs %s: %s", sorted(cpus), exc)
        else:
            self.writer_cpus = sorted(os.sched_getaffinity(0))

    def _open_writer(self) -> sqlite3.Connection:
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
            conn.execute("PRAGMA cache_size = -32768")  # 32 MiB: index pages stay in memory
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"database schema version {version} is newer than this Shardon ({SCHEMA_VERSION})")
            _create_schema(conn)
            self.newest_id = int(conn.execute("SELECT max(id) FROM requests").fetchone()[0] or 0)
            request_ids.seed(self.newest_id)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self) -> None:
        name_this_thread("shardon-store")
        self._pin_writer()
        try:
            conn = self._open_writer()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        try:
            self._rows = RowWriter(str(self.path), "requests", REQUEST_COLUMNS, pragmas=_WRITER_PRAGMAS)
        except BaseException as exc:
            conn.close()
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        interval = self.config.flush_interval_ms / 1000.0
        cleanup_every = self.config.cleanup_interval_s
        next_cleanup = time.monotonic()
        backoff = 0.0
        try:
            while True:
                if backoff:
                    time.sleep(backoff)  # the database refused writes: don't spin
                elif len(self._q) < self._batch_max:
                    self._wake.wait(interval)
                self._wake.clear()
                ok = self._drain(conn)
                backoff = 0.0 if ok else min(max(backoff * 2, interval), 2.0)
                if time.monotonic() >= next_cleanup:
                    self._cleanup(conn)
                    next_cleanup = time.monotonic() + cleanup_every
                if self._stopping and (not self._q or not ok):
                    break
        except BaseException:  # pragma: no cover - a bug; keep the process alive, say why
            log.exception("request log writer crashed")
        finally:
            self._rows.close()
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()

    def _drain(self, conn: sqlite3.Connection) -> bool:
        """Write everything queued now, batch by batch. False if the database refused to write."""
        q = self._q
        popleft = q.popleft
        n = len(q)  # items appended while draining wait for the next round (cleanup gets a turn)
        while n > 0:
            items: list[Any] = []
            for _ in range(min(n, self._batch_max)):
                try:
                    items.append(popleft())
                except IndexError:  # pragma: no cover - only this thread pops
                    break
            n -= len(items)
            if not items:
                break
            if not self._write_batch(conn, items):
                q.extendleft(reversed(items))
                self._shed()
                return False
        return True

    def _write_batch(self, conn: sqlite3.Connection, items: list[Any]) -> bool:
        rows: list[bytes] = []
        audits: list[tuple[Any, ...]] = []
        markers: list[threading.Event] = []
        for item in items:
            if type(item) is bytes:
                rows.append(item)
            elif isinstance(item, _Audit):
                audits.append(item)
            else:
                markers.append(item)
        if rows or audits:
            try:
                self._transaction(conn, rows, audits)
            except sqlite3.OperationalError as exc:  # locked, busy, disk full, I/O: retry later
                self._error(exc)
                return False
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:  # a bad row
                self._error(exc)
                self._one_by_one(conn, rows, audits)
        for m in markers:
            m.set()
        return True

    def _transaction(self, conn: sqlite3.Connection, rows: list[bytes], audits: Sequence[tuple[Any, ...]]) -> None:
        """Rows (one transaction, by the RowWriter), then audit entries (another, on ``conn``).

        If the audit part fails, the caller retries both: rewriting a row replaces it (same id).
        """
        if rows:
            self._rows.insert_packed(rows)
            self.written += len(rows)
        if audits:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT_AUDIT, audits)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.audits_written += len(audits)

    def _one_by_one(self, conn: sqlite3.Connection, rows: Iterable[bytes], audits: Iterable[tuple[Any, ...]]) -> None:
        for row in rows:
            try:
                self._transaction(conn, [row], ())
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                log.error("request log: dropping row %s: %s", _row_id(row), exc)
                self.dropped += 1
        for entry in audits:
            try:
                self._transaction(conn, [], [entry])
            except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                log.error("request log: dropping audit entry: %s", exc)
                self.dropped += 1

    def _error(self, exc: BaseException) -> None:
        self.write_errors += 1
        msg = f"{type(exc).__name__}: {exc}"
        if msg != self.last_error:
            log.error("request log write failed: %s", msg)
        self.last_error = msg

    def _shed(self) -> None:
        """While writes fail, keep at most _MAX_PENDING items: drop the oldest rows beyond that."""
        q = self._q
        while len(q) > _MAX_PENDING:
            item = q.popleft()
            if isinstance(item, threading.Event):
                item.set()
            else:
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

    async def _read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        pool = self._readers
        if pool is None:
            raise RuntimeError("request log is not running")
        call = functools.partial(self._call_reader, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def _call_reader(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
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
