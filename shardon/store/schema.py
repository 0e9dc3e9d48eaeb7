"""The database's schema: tables, indexes, migrations, and how its connections are opened.

One place for every table in Shardon's SQLite file (requests, audit, api_keys, nodes) and for the
connection settings (WAL, busy timeout), so the request log, its readers and the key table open
the same database the same way. The schema and why it has so few indexes:
``docs/request-log.md`` (schema).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .records import REQUEST_COLUMNS

__all__ = [
    "AUDIT_COLUMNS",
    "BOOL_COLUMNS",
    "INSERT_AUDIT",
    "NOT_OK",
    "SCHEMA_VERSION",
    "WRITER_PRAGMAS",
    "connect_readonly",
    "create_keys_table",
    "create_nodes_table",
    "create_schema",
    "open_database",
    "open_writer",
]

log = logging.getLogger("shardon.store")

SCHEMA_VERSION = 4
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
    "limited": "INTEGER NOT NULL DEFAULT 0",
    "max_tokens": "INTEGER",
    "overflow": "INTEGER NOT NULL DEFAULT 0",
}
BOOL_COLUMNS = frozenset({"stream", "limited", "overflow"})
# Columns renamed by a version (the old name, the new one, the version that renamed it): before
# version 4, ``overflow`` meant "waited for a rate limit", now ``limited``.
_RENAMED = (("overflow", "limited", 4),)

NOT_OK = "status <> 200"
"""The partial index's condition: a query must repeat it word for word for SQLite to use the index."""
_INDEXES = (
    ("idx_requests_errors", f"requests(status) WHERE {NOT_OK}"),
    ("idx_audit_at", "audit(at)"),
)
_DROPPED_INDEXES = (
    "idx_requests_status",  # v1
    "idx_requests_model",  # v1
    "idx_requests_tenant",  # v1
    "idx_requests_node",  # v1
    "idx_requests_received_at",  # v1, v2: ids are in arrival order
)
# Rows are appended at the right edge of the id B-tree (and of the small errors index), so the
# pages a write touches are few: a small page cache is enough, and a larger one only grows the RSS.
WRITER_PRAGMAS = ("cache_size = -2048",)

INSERT_AUDIT = "INSERT OR REPLACE INTO audit (id, at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)"
_OLD_REQUESTS = "requests_before_v3"  # the old table's name while a v1/v2 database is rebuilt

_KEYS_TABLE = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    rpm REAL, tpm REAL, max_priority TEXT, models TEXT,
    created_at REAL NOT NULL,
    revoked_at REAL,
    overflow INTEGER NOT NULL DEFAULT 1
)
"""


# The nodes registered through the admin API: the node's config (its api_key included: Shardon sends
# it to the node) as JSON, and whether it was draining.
_NODES_TABLE = """
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)
"""


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
    in arrival order, never earlier than the row's ``received_at``, as `RequestIds` makes them. The
    old text ids are dropped. ``INSERT OR REPLACE`` turns a NULL (from a hand-made table) in a
    ``NOT NULL DEFAULT`` column into the default.
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


def _rename_columns(conn: sqlite3.Connection, have: set[str], version: int) -> bool:
    """The columns an older version named otherwise, renamed (their values kept); True if any was."""
    renamed = False
    for old, new, since in _RENAMED:
        if version < since and old in have and new not in have:
            conn.execute(f"ALTER TABLE requests RENAME COLUMN {old} TO {new}")
            renamed = True
    return renamed


def create_schema(conn: sqlite3.Connection) -> None:
    """Create or upgrade the request log's schema (idempotent). ``conn`` is in autocommit mode.

    One transaction: columns an older version named otherwise are renamed (`_RENAMED`), a v1/v2
    database is rebuilt with integer ids (`_rebuild_with_integer_ids`), missing columns are added,
    dropped indexes dropped, ``user_version`` raised to `SCHEMA_VERSION`.
    """
    rebuilt = -1
    conn.execute("BEGIN IMMEDIATE")
    try:
        info = conn.execute("PRAGMA table_info(requests)").fetchall()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if info and _rename_columns(conn, {row[1] for row in info}, version):
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


def create_keys_table(conn: sqlite3.Connection) -> None:
    """The API keys created at run time (digests only), for `shardon.store.keys.KeyTable`; a table
    of an older version gets the columns it lacks (``overflow``: 1, keys may overflow)."""
    conn.execute(_KEYS_TABLE)
    have = {row[1] for row in conn.execute("PRAGMA table_info(api_keys)")}
    if "overflow" not in have:
        conn.execute("ALTER TABLE api_keys ADD COLUMN overflow INTEGER NOT NULL DEFAULT 1")


def create_nodes_table(conn: sqlite3.Connection) -> None:
    """The nodes registered at run time, for `shardon.store.nodes.NodeTable`."""
    conn.execute(_NODES_TABLE)


_TABLE_WRITES = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shardon-tables")


class SmallTable:
    """A table of the database at ``path`` that changes rarely (the keys, the nodes): one short
    connection per call, under a lock (thread-safe); ``create`` makes or upgrades the table first.

    From the event loop, ``await table.write(table.save, ...)``: the write runs in the tables' own
    thread, in the order the writes were asked for, so a slow disk never stalls requests."""

    def __init__(self, path: Path, create: Callable[[sqlite3.Connection], None]) -> None:
        self.path = path
        self._create = create
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = open_database(self.path)
            try:
                self._create(conn)
                yield conn
            finally:
                conn.close()

    async def write(self, method: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(_TABLE_WRITES, method, *args)


def open_database(path: Path) -> sqlite3.Connection:
    """A read-write autocommit connection to Shardon's database, creating the file and its directory.

    WAL mode (readers never wait for the writer), ``synchronous=NORMAL``, a 5 s busy timeout; a new
    database gets ``auto_vacuum = INCREMENTAL`` first, so the retention clean-up can give pages back
    to the file system.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table and the switch to WAL
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot enable WAL (journal_mode={mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def open_writer(path: Path) -> sqlite3.Connection:
    """`open_database` for the request log's writer side: the schema created or migrated, a database
    of a newer schema version refused."""
    conn = open_database(path)
    try:
        for pragma in WRITER_PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema version {version} is newer than this Shardon ({SCHEMA_VERSION})")
        create_schema(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A new read-only connection to the database (the caller closes it)."""
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.execute("PRAGMA query_only = ON")
    return conn
