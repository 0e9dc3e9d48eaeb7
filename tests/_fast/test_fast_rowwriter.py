"""The request log's `RowWriter`, compiled and pure-Python: what ends up in the database.

Every test builds a fresh WAL database in ``tmp_path`` with the ``sqlite3`` module, writes through
one implementation (``row_writer``: c and py) or both (``row_writers``), and reads the rows back
with ``sqlite3`` on another connection.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from tests._fast.fast_impls import RowWriterClass, RowWriterLike

OpenWriter = Callable[..., RowWriterLike]

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
KV = "CREATE TABLE t (k INTEGER PRIMARY KEY, v)"  # v has no type: SQLite keeps each value's own type


class Text(str):
    pass


class Count(int):
    pass


class Ratio(float):
    pass


def make_db(tmp_path: Path, *schema: str, name: str = "log.db") -> str:
    """A new WAL database at ``tmp_path/name`` holding ``schema``; returns its path as a str."""
    path = str(tmp_path / name)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
        for statement in schema:
            conn.execute(statement)
        conn.commit()
    return path


@contextmanager
def connect(path: str) -> Iterator[sqlite3.Connection]:
    """A separate autocommit connection to ``path`` (read-write, must exist), closed afterwards."""
    with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None)) as conn:
        yield conn


def query(path: str, sql: str) -> list[tuple[Any, ...]]:
    with connect(path) as conn:
        return conn.execute(sql).fetchall()


def kv(*pairs: tuple[int, Any]) -> list[SimpleNamespace]:
    return [SimpleNamespace(k=k, v=v) for k, v in pairs]


def test_values_round_trip_with_their_sqlite_type(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """None/int/bool/float/str (and str/int/float subclasses) are stored as null/integer/real/text."""
    path = make_db(tmp_path, KV)
    cases: list[tuple[Any, Any, str]] = [  # (value written, value read back, typeof)
        (None, None, "null"),
        (0, 0, "integer"),
        (42, 42, "integer"),
        (-7, -7, "integer"),
        (INT64_MAX, INT64_MAX, "integer"),
        (INT64_MIN, INT64_MIN, "integer"),
        (True, 1, "integer"),
        (False, 0, "integer"),
        (1.5, 1.5, "real"),
        (-0.25, -0.25, "real"),
        (2.0, 2.0, "real"),
        (1e300, 1e300, "real"),
        (float("inf"), float("inf"), "real"),
        ("plain", "plain", "text"),
        ("é✓🚀", "é✓🚀", "text"),
        ("", "", "text"),
        ("a\x00b", "a\x00b", "text"),
        (Text("sub-str"), "sub-str", "text"),
        (Count(12), 12, "integer"),
        (Ratio(0.5), 0.5, "real"),
    ]
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    assert writer.insert(kv(*((k, value) for k, (value, _, _) in enumerate(cases)))) == len(cases)
    rows = query(path, "SELECT k, v, typeof(v) FROM t ORDER BY k")
    assert rows == [(k, back, kind) for k, (_, back, kind) in enumerate(cases)]
    assert [type(v) for _, v, _ in rows] == [type(back) for _, back, _ in cases]


def test_insert_counts_and_written_accumulates(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """`insert` returns how many rows it wrote, `written` sums them, an empty list writes nothing."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    assert writer.path == path
    assert writer.written == 0
    assert writer.insert([]) == 0
    assert writer.written == 0
    assert query(path, "SELECT count(*) FROM t") == [(0,)]
    assert writer.insert(kv((1, "a"), (2, "b"), (3, "c"))) == 3
    assert writer.written == 3
    assert writer.insert(kv((4, "d"))) == 1
    assert writer.insert([]) == 0
    assert writer.written == 4
    assert query(path, "SELECT k, v FROM t ORDER BY k") == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]


def test_insert_or_replace_replaces_a_row_with_the_same_key(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """With the default verb, a row with an existing primary key replaces the old one."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"], verb="INSERT OR REPLACE")
    writer.insert(kv((1, "old"), (2, "kept")))
    assert writer.insert(kv((1, "new"), (3, "x"), (3, "y"))) == 3
    assert query(path, "SELECT k, v FROM t ORDER BY k") == [(1, "new"), (2, "kept"), (3, "y")]
    assert writer.written == 5


def test_insert_duplicate_key_rolls_back_the_whole_batch(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """With verb INSERT, a duplicate key raises DatabaseError (not retryable) and writes no row of that call."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"], verb="INSERT")
    writer.insert(kv((1, "first")))
    with pytest.raises(sqlite3.DatabaseError) as caught:
        writer.insert(kv((2, "before"), (3, "before"), (1, "duplicate"), (4, "after")))
    assert not isinstance(caught.value, sqlite3.OperationalError)
    assert query(path, "SELECT k, v FROM t ORDER BY k") == [(1, "first")]
    assert writer.written == 1
    # Within one call too: the second row clashes with the first.
    with pytest.raises(sqlite3.DatabaseError) as caught:
        writer.insert(kv((5, "a"), (5, "b")))
    assert not isinstance(caught.value, sqlite3.OperationalError)
    assert query(path, "SELECT k, v FROM t ORDER BY k") == [(1, "first")]
    # The writer still works, and its connection is not left inside a transaction.
    assert writer.insert(kv((2, "again"), (3, "again"))) == 2
    assert query(path, "SELECT k, v FROM t ORDER BY k") == [(1, "first"), (2, "again"), (3, "again")]
    assert writer.written == 3


@pytest.mark.parametrize("bad", [{"a": 1}, b"bytes", bytearray(b"x"), [1], (1,), object(), 1j], ids=repr)
def test_unstorable_value_raises_type_error_and_writes_nothing(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path, bad: object
) -> None:
    """A value other than None/str/int/float (bytes included) raises TypeError before anything is written."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    with pytest.raises(TypeError):
        writer.insert(kv((1, "ok"), (2, bad), (3, "ok")))
    assert query(path, "SELECT count(*) FROM t") == [(0,)]
    assert writer.written == 0
    assert writer.insert(kv((1, "ok"))) == 1
    assert query(path, "SELECT k, v FROM t") == [(1, "ok")]


@pytest.mark.parametrize("big", [INT64_MAX + 1, INT64_MIN - 1, 10**30, Count(2**64)], ids=repr)
def test_int_beyond_int64_raises_overflow_error_and_writes_nothing(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path, big: int
) -> None:
    """An int outside int64 raises OverflowError and writes no row of that call."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    with pytest.raises(OverflowError):
        writer.insert(kv((1, 1), (2, big), (3, 3)))
    assert query(path, "SELECT count(*) FROM t") == [(0,)]
    assert writer.written == 0
    assert writer.insert(kv((1, INT64_MAX))) == 1
    assert query(path, "SELECT k, v FROM t") == [(1, INT64_MAX)]


def test_locked_database_raises_operational_error_then_retry_succeeds(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """Another connection's lock: OperationalError after ~busy_timeout_ms, nothing written; later the rows go in."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"], busy_timeout_ms=50)
    records = kv((1, "a"), (2, "b"))
    with connect(path) as locker:
        locker.execute("BEGIN EXCLUSIVE")
        started = time.perf_counter()
        with pytest.raises(sqlite3.OperationalError):
            writer.insert(records)
        waited = time.perf_counter() - started
        assert locker.execute("SELECT count(*) FROM t").fetchone() == (0,)
        locker.execute("ROLLBACK")
    assert waited < 2.0, f"busy_timeout_ms=50 not honoured: waited {waited:.2f}s"
    assert writer.written == 0
    assert query(path, "SELECT count(*) FROM t") == [(0,)]
    assert writer.insert(records) == 2
    assert writer.written == 2
    assert query(path, "SELECT k, v FROM t ORDER BY k") == [(1, "a"), (2, "b")]


@pytest.mark.parametrize(("table", "columns"), [("missing", ["k", "v"]), ("t", ["k", "missing"])])
def test_missing_table_or_column_fails_at_construction(
    row_writer: RowWriterClass, tmp_path: Path, table: str, columns: list[str]
) -> None:
    """A table or column that does not exist is refused by the constructor, not at the first insert."""
    path = make_db(tmp_path, KV)
    with pytest.raises(sqlite3.Error, match="missing"):
        row_writer(path, table, columns)


def test_no_columns_is_a_value_error(row_writer: RowWriterClass, tmp_path: Path) -> None:
    """An empty column list is refused with ValueError."""
    path = make_db(tmp_path, KV)
    with pytest.raises(ValueError):
        row_writer(path, "t", [])


@pytest.mark.parametrize("where", ["missing.db", os.path.join("no-such-dir", "log.db")])
def test_missing_database_raises_operational_error_and_creates_nothing(
    row_writer: RowWriterClass, tmp_path: Path, where: str
) -> None:
    """A database file that does not exist is not created: the constructor raises OperationalError."""
    path = tmp_path / where
    with pytest.raises(sqlite3.OperationalError):
        row_writer(str(path), "t", ["k", "v"])
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pragmas_are_applied_in_order(row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path) -> None:
    """``pragmas`` run on the writer's connection, in order (``user_version`` is visible in the file)."""
    path = make_db(tmp_path, KV)
    open_writer(
        row_writer, path, "t", ["k", "v"], pragmas=("cache_size = -1234", "user_version = 1", "user_version = 4242")
    )
    assert query(path, "PRAGMA user_version") == [(4242,)]


@pytest.mark.parametrize("pragma", ["cache_size = = 1", "user_version = 'x' 'y'", "; DROP TABLE t"])
def test_malformed_pragma_fails_at_construction(row_writer: RowWriterClass, tmp_path: Path, pragma: str) -> None:
    """A pragma SQLite cannot parse raises sqlite3.Error from the constructor (SQLite ignores unknown names)."""
    path = make_db(tmp_path, KV)
    with pytest.raises(sqlite3.Error):
        row_writer(path, "t", ["k", "v"], pragmas=(pragma,))
    assert query(path, "SELECT name FROM sqlite_master") == [("t",)]


def test_close_is_idempotent_and_insert_after_close_fails(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """After `close()`: `closed` is True, `close()` again is a no-op, `insert` raises ProgrammingError."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    assert writer.closed is False
    writer.insert(kv((1, "a")))
    writer.close()
    assert writer.closed is True
    writer.close()
    assert writer.closed is True
    with pytest.raises(sqlite3.ProgrammingError):
        writer.insert(kv((2, "b")))
    with pytest.raises(sqlite3.ProgrammingError):
        writer.insert([])
    assert writer.written == 1
    assert query(path, "SELECT k, v FROM t") == [(1, "a")]
    # The connection is really gone: another one can take the exclusive lock at once.
    with connect(path) as other:
        other.execute("PRAGMA busy_timeout = 0")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("ROLLBACK")


def test_readers_see_committed_rows_while_the_writer_is_open(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    """WAL: each insert is visible to other connections at once, and an open read transaction does not block it."""
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"], busy_timeout_ms=50)
    with connect(path) as reader:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        writer.insert(kv((1, "a"), (2, "b")))
        assert reader.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [(1, "a"), (2, "b")]
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (2,)  # snapshot taken
        assert writer.insert(kv((3, "c"))) == 1  # not blocked by the reader
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (2,)
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM t").fetchone() == (3,)
    assert writer.closed is False


def test_large_batch_in_insertion_order(row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path) -> None:
    """5,000 records in one call all land, in the order given (by rowid)."""
    path = make_db(tmp_path, "CREATE TABLE log (id TEXT, n INTEGER, x REAL)")
    order = list(range(5000))
    random.Random(5000).shuffle(order)
    records = [SimpleNamespace(id=f"req-{n:05d}-é", n=n, x=n / 7) for n in order]
    writer = open_writer(row_writer, path, "log", ["id", "n", "x"])
    assert writer.insert(records) == 5000
    assert writer.written == 5000
    rows = query(path, "SELECT rowid, id, n, x FROM log ORDER BY rowid")
    assert rows == [(i + 1, f"req-{n:05d}-é", n, n / 7) for i, n in enumerate(order)]


class Entry(msgspec.Struct):
    a: Any
    b: Any
    c: Any
    d: Any


def _random_value(rng: random.Random) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([0, 1, -1, INT64_MAX, INT64_MIN, rng.randrange(-(2**40), 2**40), Count(rng.randrange(1000))])
    if kind == 2:
        return rng.random() < 0.5
    if kind == 3:
        return rng.choice(
            [0.0, -0.0, 5e-324, 1.7976931348623157e308, float("-inf"), float("nan"), rng.uniform(-1e6, 1e6)]
        )
    if kind == 4:
        return Ratio(rng.random())
    if kind == 5:
        return ""
    if kind == 6:
        return "".join(rng.choice("aZ9 _-é✓🚀\u4e2d\t'\"") for _ in range(rng.randrange(1, 40)))
    if kind == 7:
        return Text("x" * rng.randrange(1, 3000))
    return rng.randrange(-1000, 1000)


def test_compiled_and_python_writers_store_identical_rows(
    row_writers: tuple[RowWriterClass, RowWriterClass], open_writer: OpenWriter, tmp_path: Path
) -> None:
    """The same mixed records (SimpleNamespace and msgspec.Struct) give the same rows, values and types from both."""
    rng = random.Random(20261122)
    records: list[Any] = []
    for i in range(600):
        values = [_random_value(rng) for _ in range(4)]
        records.append(Entry(*values) if i % 2 else SimpleNamespace(a=values[0], b=values[1], c=values[2], d=values[3]))
    schema = "CREATE TABLE t (a, b, c, d)"
    select = "SELECT rowid, a, typeof(a), b, typeof(b), c, typeof(c), d, typeof(d) FROM t ORDER BY rowid"
    results = []
    for cls, name in zip(row_writers, ("c.db", "py.db"), strict=True):
        path = make_db(tmp_path, schema, name=name)
        writer = open_writer(cls, path, "t", ["a", "b", "c", "d"])
        assert writer.insert(records[:100]) == 100
        assert writer.insert(records[100:]) == 500
        results.append(query(path, select))
    compiled, python = results
    assert len(compiled) == 600
    assert compiled == python


def _frame(rows: list[bytes]) -> bytes:
    """Rows laid out as the request log's backlog frames them: u32 lengths, then the rows."""
    import struct

    return struct.pack(f"<{len(rows)}I", *map(len, rows)) + b"".join(rows)


def test_insert_frame_writes_the_rows_of_a_backlog_frame(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path
) -> None:
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    rows = [msgspec.msgpack.encode([k, f"v{k}" * k]) for k in range(1, 40)]
    assert writer.insert_frame(_frame(rows), len(rows)) == 39  # type: ignore[attr-defined]
    assert writer.insert_frame(b"", 0) == 0  # type: ignore[attr-defined]
    assert writer.written == 39
    assert query(path, "SELECT k, v FROM t WHERE k IN (1, 39) ORDER BY k") == [(1, "v1"), (39, "v39" * 39)]


@pytest.mark.parametrize("cut", [1, 4, 7])
def test_insert_frame_refuses_lengths_that_do_not_add_up(
    row_writer: RowWriterClass, open_writer: OpenWriter, tmp_path: Path, cut: int
) -> None:
    path = make_db(tmp_path, KV)
    writer = open_writer(row_writer, path, "t", ["k", "v"])
    body = _frame([msgspec.msgpack.encode([1, "a"]), msgspec.msgpack.encode([2, "b"])])
    with pytest.raises(ValueError, match="frame"):
        writer.insert_frame(body[:-cut], 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="frame"):
        writer.insert_frame(body + b"x", 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        writer.insert_frame(body, 3)  # type: ignore[attr-defined]
    assert query(path, "SELECT count(*) FROM t") == [(0,)]  # nothing written
