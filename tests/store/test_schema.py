"""The database schema (shardon.store.schema): version 4, old databases rebuilt with integer ids, the
rate-limit flag of version 3 and older (``overflow``) renamed ``limited``."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from shardon.store import (
    REQUEST_COLUMNS,
    RequestLog,
    RequestRecord,
    format_request_id,
    queries,
    request_id_floor,
    schema,
)
from shardon.store.schema import SCHEMA_VERSION
from tests.store.store_helpers import BASE, cfg, rec, ro

# The requests table as versions 1 and 2 created it (a copy, not derived from shardon.store).
V2_REQUESTS = (
    "CREATE TABLE requests (id TEXT PRIMARY KEY NOT NULL, received_at REAL, queued_at REAL, "
    "dispatched_at REAL, first_token_at REAL, finished_at REAL, endpoint TEXT NOT NULL DEFAULT '', "
    "tenant TEXT, key_id TEXT, model TEXT, node_id TEXT, backend TEXT, model_file_sha256 TEXT, "
    "priority TEXT, stream INTEGER NOT NULL DEFAULT 0, status INTEGER NOT NULL DEFAULT 0, "
    "error_type TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, bytes_in INTEGER NOT NULL DEFAULT 0, "
    "bytes_out INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0, "
    "overflow INTEGER NOT NULL DEFAULT 0, client_addr TEXT, output_sha256 TEXT)"
)

V2_INDEXES = (
    "CREATE INDEX idx_requests_received_at ON requests(received_at)",
    "CREATE INDEX idx_requests_errors ON requests(status) WHERE status <> 200",
)

# The request columns of versions 1 to 3 (max_tokens came later: an added column), by their old names:
# version 4 renamed the rate-limit flag ``overflow`` to ``limited`` (and added a new ``overflow``).
V3_COLUMNS = tuple(
    "overflow" if c == "limited" else c for c in REQUEST_COLUMNS[: REQUEST_COLUMNS.index("output_sha256") + 1]
)

V1_INDEXES = (
    "CREATE INDEX idx_requests_received_at ON requests(received_at)",
    "CREATE INDEX idx_requests_status ON requests(status, received_at)",
    "CREATE INDEX idx_requests_model ON requests(model, received_at)",
    "CREATE INDEX idx_requests_tenant ON requests(tenant, received_at)",
    "CREATE INDEX idx_requests_node ON requests(node_id, received_at)",
)

AUDIT = (
    "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
    "actor TEXT, action TEXT NOT NULL, target TEXT, detail TEXT)",
    "CREATE INDEX idx_audit_at ON audit(at)",
)


def old_row(text_id: str, t: float, **kw: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(V3_COLUMNS)
    row.update(
        id=text_id,
        received_at=t,
        endpoint="/v1/chat/completions",
        stream=0,
        status=200,
        bytes_in=100,
        bytes_out=200,
        retries=0,
        overflow=0,
    )
    row.update(kw)
    return row


# Inserted out of received_at order; two share a millisecond (1700000002.250 and .2504).
OLD_ROWS = [
    old_row("c" * 32, BASE + 2.25, model="m1", tenant="t", status=500, error_type="upstream_error", retries=1),
    old_row(
        "a" * 32,
        BASE,
        queued_at=BASE + 0.001,
        dispatched_at=BASE + 0.002,
        first_token_at=BASE + 0.08,
        finished_at=BASE + 1.5,
        tenant="t",
        key_id="k1",
        model="m1",
        node_id="n1",
        backend="llama.cpp",
        model_file_sha256="ab" * 32,
        priority="high",
        stream=1,
        prompt_tokens=12,
        completion_tokens=7,
        client_addr="10.0.0.1",
        output_sha256="cd" * 32,
    ),
    old_row("req-old", BASE + 2.2504, model="m2", status=429, overflow=1),
    old_row("b" * 32, BASE + 1.0, model="m2", status=404, prompt_tokens=None),
    old_row("early-log", BASE - 86400, status=0, endpoint="/v1/completions"),
]


def build_old_db(path: Path, version: int, indexes: tuple[str, ...] = V2_INDEXES) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(V2_REQUESTS)
        for sql in (*indexes, *AUDIT):
            conn.execute(sql)
        cols = ", ".join(V3_COLUMNS)
        marks = ", ".join("?" * len(V3_COLUMNS))
        conn.executemany(
            f"INSERT INTO requests ({cols}) VALUES ({marks})", [tuple(r[c] for c in V3_COLUMNS) for r in OLD_ROWS]
        )
        conn.execute(
            "INSERT INTO audit (at, actor, action, target, detail) VALUES (?, 'admin', 'key.create', 'k1', '{}')",
            (BASE,),
        )
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


def migrated(old: dict[str, Any]) -> dict[str, Any]:
    """An old row as version 4 has it: its rate-limit flag ``limited``, the columns added since empty."""
    row: dict[str, Any] = dict.fromkeys(REQUEST_COLUMNS)
    row.update((c, v) for c, v in old.items() if c != "overflow")
    row["limited"] = old["overflow"]
    row["overflow"] = 0
    return row


def table_rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    cols = ", ".join(REQUEST_COLUMNS)
    return conn.execute(f"SELECT {cols} FROM requests ORDER BY id").fetchall()


def index_names(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


@pytest.mark.parametrize(
    ("version", "indexes"),
    [(2, V2_INDEXES), (1, V1_INDEXES), (3, V2_INDEXES)],  # 3: a text id is rebuilt whatever user_version says
    ids=["v2", "v1", "text-id-labelled-v3"],
)
def test_old_database_is_rebuilt_with_integer_ids(tmp_path: Path, version: int, indexes: tuple[str, ...]) -> None:
    path = tmp_path / "old.db"
    build_old_db(path, version, indexes)
    with RequestLog(path, cfg()) as rl, contextlib.closing(rl.connect_readonly()) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 4 == SCHEMA_VERSION
        info = conn.execute("PRAGMA table_info(requests)").fetchall()
        assert [r[1] for r in info] == list(REQUEST_COLUMNS)  # same columns, same order
        assert (info[0][1], info[0][2], info[0][5]) == ("id", "INTEGER", 1)  # the rowid alias
        assert index_names(conn) == {"idx_requests_errors", "idx_audit_at"}  # no received_at index left
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"requests", "audit", "sqlite_sequence"}
        assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == 1

        rows = table_rows(conn)
        assert len(rows) == len(OLD_ROWS)
        ids = [r[0] for r in rows]
        assert all(type(i) is int for i in ids) and len(set(ids)) == len(ids)
        assert conn.execute("SELECT COUNT(*) FROM requests WHERE typeof(id) <> 'integer'").fetchone()[0] == 0
        # ids are in received_at order, and each carries its row's millisecond
        by_time = sorted(OLD_ROWS, key=lambda r: r["received_at"])
        assert [r[1] for r in rows] == [r["received_at"] for r in by_time]
        for i, r in zip(ids, rows, strict=True):
            assert i >> 20 == int(r[1] * 1000)
            assert request_id_floor(r[1]) <= i < request_id_floor(r[1]) + (1 << 20)
        same_ms = [i for i, r in zip(ids, rows, strict=True) if int(r[1] * 1000) == int((BASE + 2.25) * 1000)]
        assert same_ms == [request_id_floor(BASE + 2.25), request_id_floor(BASE + 2.25) + 1]
        # every other value is what the old row held
        for r, want in zip(rows, by_time, strict=True):
            assert r[1:] == tuple(migrated(want)[c] for c in REQUEST_COLUMNS[1:])

        # reads find the migrated rows by their new (hex) ids and by time
        first = queries.request(conn, ids[1])
        assert first is not None and first["id"] == format_request_id(ids[1]) and first["key_id"] == "k1"
        assert first["receipt"]["request_id"] == format_request_id(ids[1]) and first["stream"] is True
        assert queries.requests(conn, since=BASE + 1.0)["total"] == 3
        assert [d["id"] for d in queries.requests(conn)["data"]] == [format_request_id(i) for i in reversed(ids)]

        assert rl.newest_id == ids[-1]
        rl.append(RequestRecord(status=200))  # a new row: an id beyond every migrated one
        assert rl.flush()
        assert conn.execute("SELECT COUNT(*), max(id) > ? FROM requests", (ids[-1],)).fetchone() == (6, 1)

    # a second start changes nothing (the table is v4 now)
    with RequestLog(path, cfg()) as rl, contextlib.closing(rl.connect_readonly()) as conn:
        again = table_rows(conn)
        assert again[:5] == rows and len(again) == 6


def test_migration_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rebuild that fails half-way leaves the old database as it was (one transaction)."""
    path = tmp_path / "old.db"
    build_old_db(path, 2)

    def fail(conn: sqlite3.Connection, old_columns: Any) -> int:
        conn.execute(f"ALTER TABLE requests RENAME TO {schema._OLD_REQUESTS}")
        schema._create_requests_table(conn)
        raise sqlite3.OperationalError("disk full")

    monkeypatch.setattr(schema, "_rebuild_with_integer_ids", fail)
    rl = RequestLog(path, cfg())
    with pytest.raises(RuntimeError, match="disk full"):
        rl.start()
    rl.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT type FROM pragma_table_info('requests') WHERE name = 'id'").fetchone() == ("TEXT",)
        assert sorted(r[0] for r in conn.execute("SELECT id FROM requests")) == sorted(r["id"] for r in OLD_ROWS)
        assert "idx_requests_received_at" in index_names(conn)
    monkeypatch.undo()
    with RequestLog(path, cfg()) as rl, contextlib.closing(rl.connect_readonly()) as conn:  # and it migrates later
        assert len(table_rows(conn)) == len(OLD_ROWS)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    with RequestLog(path, cfg()):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    rl = RequestLog(path, cfg())
    with pytest.raises(RuntimeError, match="newer than this Shardon"):
        rl.start()
    rl.close()


def test_new_database_has_integer_ids_and_two_indexes(tmp_path: Path) -> None:
    with RequestLog(tmp_path / "new.db", cfg()) as rl, contextlib.closing(rl.connect_readonly()) as conn:
        assert rl.newest_id == 0  # an empty log
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        pk = [(r[1], r[2]) for r in conn.execute("PRAGMA table_info(requests)") if r[5]]
        assert pk == [("id", "INTEGER")]
        assert index_names(conn) == {"idx_requests_errors", "idx_audit_at"}


def test_old_schema_gets_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE requests (id TEXT PRIMARY KEY, received_at REAL, status INTEGER)")
        conn.execute("INSERT INTO requests VALUES ('old', 1.0, 200)")
        conn.commit()
    with RequestLog(path, cfg()) as rl:
        rl.append(rec(1))
        assert rl.flush()
        with ro(rl) as conn:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
            assert set(cols) == set(REQUEST_COLUMNS)
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            old = queries.request(
                conn, request_id_floor(1.0)
            )  # rebuilt with an integer id (tests/test_store_migration.py)
            assert old is not None and old["endpoint"] == "" and old["stream"] is False and old["status"] == 200


def test_a_column_added_since_reaches_an_older_database_and_backlog(tmp_path: Path) -> None:
    """``max_tokens`` (added after version 3): the column is added at start, and the rows of a backlog
    an older Shardon left (packed without it) are written with it NULL."""
    import msgspec

    from shardon.store import backlog

    path = tmp_path / "log.db"
    with RequestLog(path, cfg()) as rl:
        rl.append(RequestRecord(id=request_id_floor(BASE), received_at=BASE, status=200))
        assert rl.flush()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # as the older Shardon left it
        conn.execute("ALTER TABLE requests DROP COLUMN max_tokens")
        conn.commit()
    older = [
        msgspec.msgpack.encode(list(msgspec.msgpack.decode(msgspec.msgpack.encode(r)))[: len(V3_COLUMNS)])
        for r in (
            RequestRecord(id=request_id_floor(BASE + 1), received_at=BASE + 1, status=200, model="m"),
            RequestRecord(id=request_id_floor(BASE + 2), received_at=BASE + 2, status=429),
        )
    ]
    directory = path.with_name(path.name + "-backlog")
    directory.mkdir()
    (directory / backlog.segment_name(1)).write_bytes(backlog.encode_frame(backlog.KIND_ROWS, older))
    with RequestLog(path, cfg()) as rl:
        assert rl.recovered == 2 and rl.dropped == 0
        rl.append(RequestRecord(id=request_id_floor(BASE + 3), received_at=BASE + 3, status=200, max_tokens=512))
        assert rl.flush()
        with contextlib.closing(rl.connect_readonly()) as conn:
            got = conn.execute("SELECT received_at, status, model, max_tokens FROM requests ORDER BY id").fetchall()
    assert got == [
        (BASE, 200, None, None),
        (BASE + 1, 200, "m", None),
        (BASE + 2, 429, None, None),
        (BASE + 3, 200, None, 512),
    ]


def test_version_3_rate_limit_flag_becomes_limited(tmp_path: Path) -> None:
    """Version 3 called the rate-limit flag ``overflow``: its values move to ``limited`` (the table's and
    an older backlog's), and the new ``overflow`` (served by an overflow endpoint) starts false."""
    import msgspec

    from shardon.store import backlog

    path = tmp_path / "log.db"
    with RequestLog(path, cfg()):
        pass
    with contextlib.closing(sqlite3.connect(path)) as conn:  # the table as version 3 had it
        conn.execute("ALTER TABLE requests DROP COLUMN overflow")
        conn.execute("ALTER TABLE requests DROP COLUMN variant")
        conn.execute("ALTER TABLE requests DROP COLUMN max_tokens")
        conn.execute("ALTER TABLE requests RENAME COLUMN limited TO overflow")
        conn.execute(
            "INSERT INTO requests (id, received_at, status, overflow) VALUES (?, ?, 200, 1)",
            (request_id_floor(BASE), BASE),
        )
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
    # A backlog version 3 left: rows of its 25 fields, the rate-limit flag where `limited` is now.
    older = [
        msgspec.msgpack.encode(list(msgspec.msgpack.decode(msgspec.msgpack.encode(r)))[: len(V3_COLUMNS)])
        for r in (RequestRecord(id=request_id_floor(BASE + 1), received_at=BASE + 1, status=200, limited=True),)
    ]
    directory = path.with_name(path.name + "-backlog")
    directory.mkdir()
    (directory / backlog.segment_name(1)).write_bytes(backlog.encode_frame(backlog.KIND_ROWS, older))
    with RequestLog(path, cfg()) as rl:
        assert rl.recovered == 1
        rl.append(RequestRecord(id=request_id_floor(BASE + 2), received_at=BASE + 2, variant="v2", overflow=True))
        assert rl.flush()
        with contextlib.closing(rl.connect_readonly()) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert [r[1] for r in conn.execute("PRAGMA table_info(requests)")] == list(REQUEST_COLUMNS)
            got = conn.execute("SELECT received_at, limited, variant, overflow FROM requests ORDER BY id").fetchall()
            rows = queries.requests(conn)["data"]
    assert got == [(BASE, 1, None, 0), (BASE + 1, 1, None, 0), (BASE + 2, 0, "v2", 1)]
    assert [(r["limited"], r["overflow"]) for r in rows] == [(False, True), (True, False), (True, False)]
