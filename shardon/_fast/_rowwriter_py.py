"""Pure-Python twin of ``_rowwriter_c``: the same `RowWriter`, on the ``sqlite3`` module.

Same contract, same errors; slower per row because ``sqlite3`` binds each parameter through Python
objects with the GIL held.
"""

from __future__ import annotations

import operator
import sqlite3
import struct
from collections.abc import Iterable
from typing import Any

import msgspec

__all__ = ["RowWriter"]


class RowWriter:
    """Inserts records into one table of a SQLite database, one transaction per `insert` call.

    ``columns`` name both the table's columns and the records' attributes. ``verb`` is the start
    of the statement (``INSERT`` or ``INSERT OR REPLACE``). The connection is opened read-write
    (the database and table must exist), with ``busy_timeout_ms``, ``synchronous=NORMAL`` and then
    each of ``pragmas`` (e.g. ``"cache_size = -32768"``). Use it from one thread at a time.
    """

    def __init__(
        self,
        path: str,
        table: str,
        columns: Iterable[str],
        *,
        verb: str = "INSERT OR REPLACE",
        busy_timeout_ms: int = 5000,
        pragmas: Iterable[str] = (),
    ) -> None:
        names = tuple(columns)
        if not names:
            raise ValueError("no columns")
        self.path = path
        self.written = 0
        self._sql = "{} INTO {} ({}) VALUES ({})".format(verb, table, ", ".join(names), ", ".join("?" * len(names)))
        getter = operator.attrgetter(*names)
        self._row = getter if len(names) > 1 else (lambda record: (getter(record),))
        self._ncols = len(names)
        self._decode = msgspec.msgpack.Decoder().decode
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                f"file:{path}?mode=rw", uri=True, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise sqlite3.OperationalError(f"cannot open {path}: {exc}") from exc
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            for pragma in pragmas:
                self._conn.execute(f"PRAGMA {pragma}")
            self._conn.execute(f"EXPLAIN {self._sql}", (None,) * len(names))  # fail now on a bad table or column
        except BaseException:
            # Nobody gets the writer to close: close the connection now (3.13 warns on one left to the GC).
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the connection. Idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def insert(self, records: list[Any]) -> int:
        """Write ``records`` in one transaction; return how many. All or nothing.

        Raises ValueError/TypeError/OverflowError for a value it cannot store (nothing written),
        ``sqlite3.OperationalError`` when the database cannot be written now (nothing written),
        ``sqlite3.DatabaseError`` when SQLite refused a row (nothing written).
        """
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("RowWriter is closed")
        if not records:
            return 0
        rows = [self._row(record) for record in records]
        for row in rows:
            for value in row:
                if value is not None and not isinstance(value, (str, int, float)):
                    raise TypeError(f"cannot store a {type(value).__name__} in the request log")
        return self._write(conn, rows)

    def insert_frame(self, body: bytes, count: int) -> int:
        """`insert_packed` for ``count`` rows laid out as the request log's backlog frames them:
        ``count`` little-endian u32 lengths, then the rows back to back (one transaction).

        The compiled writer reads the rows straight out of ``body`` without the GIL, so the
        low-priority thread calling it never holds the GIL for a per-row loop. Raises ValueError
        when the lengths do not add up to ``body``.
        """
        start = 4 * count
        if count < 0 or len(body) < start:
            raise ValueError("frame too short for its row count")
        lengths = struct.unpack_from(f"<{count}I", body)
        if start + sum(lengths) != len(body):
            raise ValueError("frame lengths do not add up to its size")
        rows = []
        pos = start
        for n in lengths:
            rows.append(body[pos : pos + n])
            pos += n
        return self.insert_packed(rows)

    def insert_packed(self, rows: list[bytes]) -> int:
        """Like `insert`, for rows packed as msgpack arrays (``bytes``), one per row, in column order.

        This is what ``msgspec.msgpack`` writes for an ``array_like`` Struct or a tuple. Raises
        ValueError for a row that is not such an array of ``len(columns)`` None/bool/int/float/str
        values, OverflowError for an integer beyond int64 (nothing written in either case), and
        what `insert` raises.
        """
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("RowWriter is closed")
        if not rows:
            return 0
        values: list[Any] = []
        for r, item in enumerate(rows):
            if type(item) is not bytes:
                raise TypeError(f"row {r}: expected bytes, got {type(item).__name__}")
            try:
                row = self._decode(item)
            except msgspec.DecodeError:
                raise ValueError(f"row {r}: not a msgpack array of None/bool/int/float/str") from None
            if type(row) is not list:
                raise ValueError(f"row {r}: not a msgpack array of None/bool/int/float/str")
            if len(row) != self._ncols:
                raise ValueError(f"row {r}: not an array of {self._ncols} values")
            for value in row:
                if value is not None and type(value) not in (str, int, float, bool):
                    raise ValueError(f"row {r}: not a msgpack array of None/bool/int/float/str")
                if type(value) is int and not -(2**63) <= value < 2**63:
                    raise OverflowError(f"row {r}: integer out of SQLite's range")
            values.append(row)
        return self._write(conn, values)

    def _write(self, conn: sqlite3.Connection, rows: list[Any]) -> int:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(self._sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.written += len(rows)
        return len(rows)
