"""Shared helpers of the request log tests (tests/store): records with known ids, logs on temporary files."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from shardon.config import DataPaths, StoreConfig
from shardon.store import RequestLog, RequestRecord, format_request_id, request_id_floor
from shardon.store import backlog as backlog_mod

BASE = 1_700_000_000.0


def cfg(**kw: Any) -> StoreConfig:
    """A store config for tests: a short flush interval, no retention (the fixed timestamps are old)."""
    kw.setdefault("flush_interval_ms", 20)
    kw.setdefault("retention_days", 0)
    return StoreConfig(**kw)


def open_log(directory: Path, name: str = "log.db", **kw: Any) -> RequestLog:
    """A request log (not started) on ``directory / name``, with `cfg`."""
    return RequestLog(directory / name, cfg(**kw))


@contextlib.contextmanager
def ro(rl: RequestLog) -> Iterator[sqlite3.Connection]:
    conn = rl.connect_readonly()
    try:
        yield conn
    finally:
        conn.close()


def count(path: Path, where: str = "") -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM requests {where}").fetchone()[0])


def audit_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


def rid(i: int, t: float | None = None) -> int:
    """The id `rec` gives request ``i`` (received at ``t``, default ``BASE + i``)."""
    return request_id_floor(BASE + i if t is None else t) + i


def hexid(i: int, t: float | None = None) -> str:
    """`rid` as the rows show it."""
    return format_request_id(rid(i, t))


def rec(i: int, **kw: Any) -> RequestRecord:
    kw.setdefault("received_at", BASE + i)
    kw.setdefault("id", rid(i, kw["received_at"]))
    kw.setdefault("endpoint", "/v1/chat/completions")
    kw.setdefault("status", 200)
    return RequestRecord(**kw)


def pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def packed_rows(start: int, n: int) -> list[bytes]:
    return [pack(rec(i)) for i in range(start, start + n)]


def packed_audit(audit_id: int, action: str = "key.create") -> bytes:
    return pack((audit_id, BASE, "admin", action, "k1", "{}"))


def backlog(db: Path) -> Path:
    return DataPaths.for_database(db).backlog


def segments(db: Path) -> list[int]:
    return backlog_mod.segment_numbers(backlog(db))


def write_segment(db: Path, n: int, frames: list[bytes]) -> Path:
    d = backlog(db)
    d.mkdir(exist_ok=True)
    path = d / backlog_mod.segment_name(n)
    path.write_bytes(b"".join(frames))
    return path


def dataset(rl: RequestLog) -> None:
    """20 requests: models m1/m2, nodes n1/n2, tenants a/b, statuses 200/200/404/429/500 cycling."""
    statuses = [200, 200, 404, 429, 500]
    for i in range(20):
        rl.append(
            rec(
                i,
                model="m1" if i % 2 == 0 else "m2",
                node_id="n1" if i < 10 else "n2",
                tenant="a" if i % 4 < 2 else "b",
                status=statuses[i % 5],
                finished_at=BASE + i + 0.5,
            )
        )
    assert rl.flush()


def compactor_of(rl: RequestLog) -> threading.Thread:
    assert rl._compactor_thread is not None and rl._compactor_thread.name == "shardon-store-compact"
    return rl._compactor_thread


@contextlib.contextmanager
def compactor_held(rl: RequestLog) -> Iterator[None]:
    """Hold the compaction lock: nothing reaches SQLite (the writer still fills the backlog)."""
    rl.compactor.lock.acquire()
    try:
        yield
    finally:
        rl.compactor.lock.release()
