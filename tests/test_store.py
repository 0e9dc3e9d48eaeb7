"""Request log (shardon.store) and admin query parsing (shardon.admin_queries), on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shardon import store as store_mod
from shardon.admin_queries import (
    MAX_LIMIT,
    parse_audit_query,
    parse_request_id,
    parse_requests_query,
    parse_stats_query,
    parse_usage_query,
)
from shardon.store import (
    REQUEST_COLUMNS,
    RequestLog,
    RequestRecord,
    StoreConfig,
    _audit_entries_sync,
    _get_sync,
    _query_sync,
    _stats_by_model_sync,
    _stats_by_tenant_sync,
    _stats_sync,
    format_request_id,
    parse_status_filter,
    request_id_floor,
)
from tests.conftest import wait_until

BASE = 1_700_000_000.0


def cfg(tmp_path: Path, **kw: Any) -> StoreConfig:
    kw.setdefault("flush_interval_ms", 20)
    kw.setdefault("retention_days", 0)  # the fixed timestamps below are years old
    return StoreConfig(path=str(tmp_path / "log.db"), **kw)


@pytest.fixture
def rlog(tmp_path: Path) -> Iterator[RequestLog]:
    rl = RequestLog(cfg(tmp_path))
    rl.start()
    try:
        yield rl
    finally:
        rl.close()


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


# -- config -----------------------------------------------------------------------------------------


def test_config_resolved_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert StoreConfig().resolved_path() == tmp_path / "xdg" / "shardon" / "shardon.db"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert StoreConfig().resolved_path() == tmp_path / "home" / ".local" / "share" / "shardon" / "shardon.db"
    assert StoreConfig(path="~/x.db").resolved_path() == tmp_path / "home" / "x.db"
    assert StoreConfig(path="/a/b.db").resolved_path() == Path("/a/b.db")


def test_config_validation() -> None:
    c = msgspec.convert({"retention_days": 1.5, "batch_max": 10}, StoreConfig)
    assert c.retention_days == 1.5 and c.batch_max == 10 and c.flush_interval_ms == 200
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"retention": 3}, StoreConfig)
    with pytest.raises(msgspec.ValidationError, match="flush_interval_ms"):
        msgspec.convert({"flush_interval_ms": 0}, StoreConfig)


def test_record_defaults() -> None:
    a, b = RequestRecord(), RequestRecord()
    assert type(a.id) is int and b.id > a.id  # ids only increase
    assert len(format_request_id(a.id)) == 16
    assert request_id_floor(a.received_at - 1) <= a.id <= request_id_floor(a.received_at + 1)
    assert abs(a.received_at - time.time()) < 5
    assert a.status == 0 and a.stream is False and a.finished_at is None


# -- writing --------------------------------------------------------------------------------------


def test_burst_from_event_loop_loses_nothing(rlog: RequestLog) -> None:
    async def main() -> float:
        async def burst(k: int) -> None:
            for i in range(1000):
                rlog.append(rec(k * 1000 + i))
                if i % 100 == 0:
                    await asyncio.sleep(0)

        t0 = time.perf_counter()
        await asyncio.gather(*(burst(k) for k in range(5)))
        elapsed = time.perf_counter() - t0
        assert await rlog.aflush(10)
        return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 2.0  # 5,000 appends: no I/O on the loop
    assert count(rlog.path) == 5000
    assert rlog.written == 5000 and rlog.dropped == 0 and rlog.pending == 0
    with ro(rlog) as conn:
        assert _query_sync(conn, limit=0)["total"] == 5000


def test_restart_keeps_rows(tmp_path: Path) -> None:
    c = cfg(tmp_path)
    with RequestLog(c) as rl:
        for i in range(10):
            rl.append(rec(i))
        rl.audit("admin", "key.create", "k1", {"tenant": "t"})
    with RequestLog(c) as rl2:
        rl2.append(rec(10))
        assert rl2.flush()
        with ro(rl2) as conn:
            assert _query_sync(conn)["total"] == 11
            assert _audit_entries_sync(conn)["total"] == 1
            assert _get_sync(conn, rid(3)) is not None
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


def test_append_before_start_is_written_at_start(tmp_path: Path) -> None:
    rl = RequestLog(cfg(tmp_path))
    try:
        rl.append(rec(1))
        assert rl.flush(0.1) is False  # not running yet
        rl.start()
        assert rl.flush()
        assert count(rl.path) == 1
    finally:
        rl.close()


def test_close_is_idempotent_and_flushes(tmp_path: Path) -> None:
    rl = RequestLog(cfg(tmp_path, flush_interval_ms=60_000))  # only close() can write these
    rl.start()
    for i in range(50):
        rl.append(rec(i))
    rl.close()
    rl.close()
    assert not rl.running
    assert count(rl.path) == 50
    rl.append(rec(99))  # after close: dropped and counted, no exception
    assert rl.dropped == 1
    with pytest.raises(RuntimeError):
        rl.start()


def test_a_row_no_column_can_hold_is_dropped_alone(rlog: RequestLog, caplog: pytest.LogCaptureFixture) -> None:
    """Through `append`, and through the row queue (what the callback path calls): the row is
    refused when packed, and the queue hands it to the log, which says so and counts it."""
    rlog.append(rec(1))
    rlog.append(rec(2, prompt_tokens=1 << 70))  # no msgpack integer holds it
    assert rlog.row_queue.append(rec(3, completion_tokens=1 << 70)) is True  # refused when packed
    assert rlog.row_queue.append(rec(4)) is True
    assert rlog.flush()
    with ro(rlog) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")] == [rid(1), rid(4)]
    assert rlog.dropped == 2
    assert sum("dropping row" in r.getMessage() for r in caplog.records) == 2


def test_same_id_replaces_row(rlog: RequestLog) -> None:
    rlog.append(rec(1, status=0))
    assert rlog.flush()
    r = rec(1, status=200, finished_at=BASE + 2)
    with ro(rlog) as conn:
        row = _get_sync(conn, rid(1))
        assert row is not None and row["status"] == 0 and row["receipt"] is None
        rlog.append(r)  # the final version replaces the early one
        assert rlog.flush()
        row = _get_sync(conn, rid(1))
        assert row is not None and row["status"] == 200 and row["finished_at"] == BASE + 2
        assert _query_sync(conn)["total"] == 1


def test_append_never_blocks_while_database_is_locked(rlog: RequestLog) -> None:
    blocker = sqlite3.connect(rlog.path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        worst = 0.0
        for i in range(2000):
            t0 = time.perf_counter()
            rlog.append(rec(i))
            worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.2)  # several flush windows: the compactor is stuck on the lock
        assert rlog.pending == 2000  # not in SQLite yet ...
        # ... but out of memory, in the backlog:
        wait_until(lambda: not rlog._q and not rlog._queued_rows() and rlog.backlog_bytes > 0)
        assert rlog.flush(0.05) is False
        assert worst < 0.5, worst  # far below the 5 s busy timeout a blocking append would wait
        assert rlog._thread is not None and rlog._thread is not threading.current_thread()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert rlog.flush(10)
    assert count(rlog.path) == 2000


def test_write_failure_is_retried(rlog: RequestLog, monkeypatch: pytest.MonkeyPatch) -> None:
    real = RequestLog._transaction
    failures = [2]

    def flaky(self: RequestLog, *args: Any) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        real(self, *args)

    monkeypatch.setattr(RequestLog, "_transaction", flaky)
    for i in range(20):
        rlog.append(rec(i))
    assert rlog.flush(10)
    assert count(rlog.path) == 20
    assert rlog.write_errors == 2 and rlog.dropped == 0
    assert rlog.last_error == "OperationalError: disk I/O error"


def test_bad_row_is_dropped_alone(rlog: RequestLog) -> None:
    rlog.append(rec(1))
    rlog.append(rec(2, prompt_tokens=2**70))  # SQLite integers are 64-bit
    rlog.append(rec(3))
    assert rlog.flush()
    assert count(rlog.path) == 2
    assert rlog.dropped == 1


def test_retention_deletes_old_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "_DELETE_CHUNK", 7)  # several DELETE statements
    rl = RequestLog(cfg(tmp_path, retention_days=1, cleanup_interval_s=0.05))
    rl.start()
    try:
        now = time.time()
        for i in range(30):
            rl.append(rec(i, received_at=now - 3 * 86400 - i))  # three days old
        rl.append(rec(30, received_at=now - 86400 - 5))  # just past the retention
        kept = [rec(i, received_at=now - 3600 + i) for i in range(40, 50)]  # one hour old
        kept.append(rec(50, received_at=now - 86400 + 60))  # a minute inside the retention
        for r in kept:
            rl.append(r)
        rl.audit("admin", "key.create", "k1", {})  # audit entries are kept
        assert rl.flush()
        deadline = time.monotonic() + 10
        while count(rl.path, f"WHERE received_at < {now - 86400}") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count(rl.path) == 11
        assert rl.deleted == 31
        with ro(rl) as conn:
            left = [r["id"] for r in _query_sync(conn)["data"]]
            assert sorted(left) == sorted(format_request_id(r.id) for r in kept)
            assert _audit_entries_sync(conn)["total"] == 1
    finally:
        rl.close()


def test_start_fails_loudly_on_a_bad_path(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    rl = RequestLog(StoreConfig(path=str(tmp_path / "adir")))
    with pytest.raises(RuntimeError, match="cannot open database"):
        rl.start()
    rl.close()


def test_old_schema_gets_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE requests (id TEXT PRIMARY KEY, received_at REAL, status INTEGER)")
        conn.execute("INSERT INTO requests VALUES ('old', 1.0, 200)")
        conn.commit()
    with RequestLog(StoreConfig(path=str(path), retention_days=0)) as rl:
        rl.append(rec(1))
        assert rl.flush()
        with ro(rl) as conn:
            cols = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
            assert set(cols) == set(REQUEST_COLUMNS)
            assert conn.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            old = _get_sync(conn, request_id_floor(1.0))  # rebuilt with an integer id (tests/test_store_migration.py)
            assert old is not None and old["endpoint"] == "" and old["stream"] is False and old["status"] == 200


# -- reading --------------------------------------------------------------------------------------


def _dataset(rl: RequestLog) -> None:
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


def test_filters_and_pagination(rlog: RequestLog) -> None:
    _dataset(rlog)
    with ro(rlog) as conn:

        def ids(**kw: Any) -> tuple[int, list[int]]:
            page = _query_sync(conn, **kw)
            got = [round(r["received_at"] - BASE) for r in page["data"]]
            assert [r["id"] for r in page["data"]] == [hexid(i) for i in got]
            return page["total"], got

        total, got = ids()
        assert total == 20 and got == list(range(19, -1, -1))  # newest first
        assert ids(status=404) == (4, [17, 12, 7, 2])
        assert ids(status="404") == ids(status=404)
        assert ids(status="4xx") == (8, [18, 17, 13, 12, 8, 7, 3, 2])
        assert ids(status="2xx")[0] == 8
        assert ids(status="5xx")[0] == 4
        assert ids(model="m1")[0] == 10
        assert ids(node="n2") == (10, list(range(19, 9, -1)))
        assert ids(tenant="a")[1] == [17, 16, 13, 12, 9, 8, 5, 4, 1, 0]
        assert ids(since=BASE + 5, until=BASE + 8) == (3, [7, 6, 5])  # since <= t < until
        assert ids(model="m1", node="n1", status="2xx") == (2, [6, 0])
        assert ids(model="nope") == (0, [])
        # pagination: total ignores limit/offset
        assert ids(limit=5, offset=0) == (20, [19, 18, 17, 16, 15])
        assert ids(limit=5, offset=15) == (20, [4, 3, 2, 1, 0])
        assert ids(limit=5, offset=20) == (20, [])
        assert ids(status="4xx", limit=3, offset=3) == (8, [12, 8, 7])
        with pytest.raises(ValueError):
            _query_sync(conn, status="6xx")


def test_since_bound_keeps_rows_at_or_after_since(rlog: RequestLog) -> None:
    """``since`` seeks the primary key (``id >= request_id_floor(since)``) and keeps the exact test."""
    since = BASE + 100.2505  # the middle of a millisecond
    floor = request_id_floor(since)
    rows = {
        "a second before": (BASE + 99.2505, None),
        "earlier, same millisecond": (since - 0.0003, floor),  # id >= floor: only received_at excludes it
        "a millisecond before": (since - 0.001, None),
        "at since": (since, None),
        "later, same millisecond": (since + 0.0003, floor + 5),
        "next millisecond": (since + 0.001, None),
        "an hour after": (since + 3600, None),
        "counter carried on": (since + 0.0002, floor + 7 * (1 << 20)),  # id ahead of its time
    }
    for n, (t, request_id) in enumerate(rows.values()):
        rlog.append(rec(n, received_at=t, id=request_id if request_id is not None else rid(n, t)))
    assert rlog.flush()
    expect = {"at since", "later, same millisecond", "next millisecond", "an hour after", "counter carried on"}
    names = {t: name for name, (t, _) in rows.items()}
    with ro(rlog) as conn:
        page = _query_sync(conn, since=since)
        assert {names[r["received_at"]] for r in page["data"]} == expect and page["total"] == len(expect)
        ids = [r["id"] for r in page["data"]]
        assert ids == sorted(ids, reverse=True)  # newest (largest id) first
        assert _stats_sync(conn, since=since)["total"] == len(expect)
        assert sum(d["requests"] for d in _stats_by_tenant_sync(conn, since=since)["data"]) == len(expect)
        until = _query_sync(conn, since=since - 0.001, until=since)  # [since - 1 ms, since)
        assert {names[r["received_at"]] for r in until["data"]} == {"earlier, same millisecond", "a millisecond before"}
        assert _query_sync(conn)["total"] == len(rows)


def _plans(conn: sqlite3.Connection, call: Any) -> list[tuple[str, str]]:
    """``(sql, query plan)`` of every statement ``call()`` runs on ``conn``."""
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    out = []
    for sql in statements:
        plan = " | ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
        out.append((sql, plan))
    return out


def test_listing_walks_the_primary_key(rlog: RequestLog) -> None:
    """The admin listing is newest first by id: no sort (no temp B-tree), no index; ``since`` seeks."""
    _dataset(rlog)
    with ro(rlog) as conn:
        default = [(sql, plan) for sql, plan in _plans(conn, lambda: _query_sync(conn)) if "ORDER BY" in sql]
        assert len(default) == 1 and "ORDER BY id DESC" in default[0][0]
        plan = default[0][1]
        assert "TEMP B-TREE" not in plan and "INDEX" not in plan and plan.startswith("SCAN requests"), plan
        for sql, plan in _plans(conn, lambda: _query_sync(conn, since=BASE + 5, model="m1")):
            assert "USING INTEGER PRIMARY KEY (rowid>?)" in plan and "TEMP B-TREE" not in plan, (sql, plan)
        for _, plan in _plans(conn, lambda: _stats_sync(conn, since=BASE + 5)):
            assert "USING INTEGER PRIMARY KEY" in plan, plan
        # errors (status <> 200) still use the partial index
        errors = _plans(conn, lambda: _query_sync(conn, status=404))
        assert all("idx_requests_errors" in plan for _, plan in errors), errors


def test_row_shape_and_receipt(rlog: RequestLog) -> None:
    rlog.append(
        rec(
            1,
            model="m",
            node_id="n1",
            backend="llama.cpp",
            model_file_sha256="ab" * 32,
            output_sha256="cd" * 32,
            stream=True,
            dispatched_at=BASE + 1.25,
            first_token_at=BASE + 1.5,
            finished_at=BASE + 3,
            prompt_tokens=10,
            completion_tokens=5,
            key_id="k1",
            tenant="t",
            priority="high",
        )
    )
    rlog.append(rec(2))  # not finished
    assert rlog.flush()
    with ro(rlog) as conn:
        row = _get_sync(conn, rid(1))
        assert row is not None
        assert set(REQUEST_COLUMNS) <= set(row) and "receipt" in row and "node_id" in row
        assert row["id"] == hexid(1) and row["receipt"]["request_id"] == hexid(1)  # as x-request-id shows it
        assert row["stream"] is True and row["overflow"] is False
        receipt = row["receipt"]
        assert receipt["node"] == "n1" and receipt["backend"] == "llama.cpp"
        assert receipt["model_file_sha256"] == "ab" * 32 and receipt["output_sha256"] == "cd" * 32
        assert receipt["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        assert receipt["timings"]["queue_ms"] == 250.0
        assert receipt["timings"]["ttft_ms"] == 500.0
        assert receipt["timings"]["duration_ms"] == 2000.0
        unfinished = _get_sync(conn, rid(2))
        assert unfinished is not None and unfinished["receipt"] is None
        assert _get_sync(conn, rid(3)) is None
        assert _get_sync(conn, parse_request_id("f" * 16)) is None  # beyond int64: no such row, no error


def test_stats_percentiles_on_known_data(rlog: RequestLog) -> None:
    for i in range(100):  # latencies 1..100 ms, ttft 0.5..50 ms, queue 0.1..10 ms
        t = BASE + i
        rlog.append(
            rec(
                i,
                model="m1" if i < 50 else "m2",
                received_at=t,
                dispatched_at=t + (i + 1) / 10000,
                first_token_at=t + (i + 1) / 2000,
                finished_at=t + (i + 1) / 1000,
                prompt_tokens=10,
                completion_tokens=2,
            )
        )
    for i in range(100, 110):  # failures: counted, excluded from the latency percentiles
        rlog.append(rec(i, model="m1", status=503, finished_at=BASE + i + 99, prompt_tokens=1))
    rlog.append(rec(200, model="m1", status=499, prompt_tokens=None, completion_tokens=None))
    assert rlog.flush()
    approx = pytest.approx
    with ro(rlog) as conn:
        s = _stats_sync(conn)
        assert s["total"] == 111 and s["completed"] == 100 and s["failed"] == 11
        assert s["by_status"] == {"200": 100, "503": 10, "499": 1}
        assert s["tokens"] == {"prompt": 1010, "completion": 200}
        assert s["latency_ms"] == approx({"p50": 50, "p90": 90, "p99": 99}, abs=0.01)
        assert s["ttft_ms"] == approx({"p50": 25, "p90": 45, "p99": 49.5}, abs=0.01)
        assert s["queue_ms"] == approx({"p50": 5, "p90": 9, "p99": 9.9}, abs=0.01)

        part = _stats_sync(conn, since=BASE + 90, until=BASE + 100)  # latencies 91..100
        assert part["total"] == 10
        assert part["latency_ms"] == approx({"p50": 95, "p90": 99, "p99": 100}, abs=0.01)
        empty = _stats_sync(conn, since=BASE + 10_000)
        assert empty["total"] == 0 and empty["latency_ms"] == {"p50": None, "p90": None, "p99": None}
        assert _stats_sync(conn, model="m2")["total"] == 50

        by_model = {d["model"]: d for d in _stats_by_model_sync(conn)["data"]}
        assert by_model["m1"]["total"] == 61 and by_model["m2"]["total"] == 50
        assert by_model["m1"]["latency_ms"] == approx({"p50": 25, "p90": 45, "p99": 50}, abs=0.01)
        assert by_model["m2"]["latency_ms"] == approx({"p50": 75, "p90": 95, "p99": 100}, abs=0.01)
        assert by_model["m1"]["by_status"] == {"200": 50, "503": 10, "499": 1}


def test_usage_report_per_tenant_and_key(rlog: RequestLog) -> None:
    rows = [
        ("a", "ka1", 200, 10, 5),
        ("a", "ka1", 200, 20, 7),
        ("a", "ka2", 429, None, None),
        ("b", "kb1", 200, 1, 1),
        (None, None, 401, None, None),
    ]
    for i, (tenant, key, status, p, c) in enumerate(rows):
        rlog.append(rec(i, tenant=tenant, key_id=key, status=status, prompt_tokens=p, completion_tokens=c))
    rlog.append(rec(99, tenant="a", key_id="ka1", received_at=BASE - 1000, prompt_tokens=1000))
    assert rlog.flush()
    with ro(rlog) as conn:
        report = _stats_by_tenant_sync(conn, since=BASE)
        by_tenant = {d["tenant"]: d for d in report["data"]}
        assert report["data"][0]["tenant"] == "a"  # busiest first
        a = by_tenant["a"]
        assert (a["requests"], a["completed"], a["failed"]) == (3, 2, 1)
        assert (a["prompt_tokens"], a["completion_tokens"], a["total_tokens"]) == (30, 12, 42)
        keys = {k["key_id"]: k for k in a["keys"]}
        assert keys["ka1"]["requests"] == 2 and keys["ka1"]["prompt_tokens"] == 30
        assert keys["ka2"] == {
            "key_id": "ka2",
            "requests": 1,
            "completed": 0,
            "failed": 1,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
        }
        assert by_tenant["b"]["total_tokens"] == 2
        assert by_tenant[None]["requests"] == 1
        only_a = _stats_by_tenant_sync(conn, tenant="a")["data"]
        assert len(only_a) == 1 and only_a[0]["prompt_tokens"] == 1030  # no time bound: includes the old row


def test_audit_entries(rlog: RequestLog) -> None:
    rlog.audit("admin", "key.create", "k1", {"tenant": "a", "max_priority": "high"})
    rlog.audit("admin", "model.unload", "m1", None)
    rlog.audit(None, "config.reload", None, {"when": time})  # not JSON-able: stored as str
    assert rlog.flush()
    with ro(rlog) as conn:
        page = _audit_entries_sync(conn, limit=2)
        assert page["total"] == 3
        assert [e["action"] for e in page["data"]] == ["config.reload", "model.unload"]
        assert page["data"][1]["detail"] == {}
        assert isinstance(page["data"][0]["detail"]["when"], str)
        last = _audit_entries_sync(conn, limit=2, offset=2)["data"]
        assert last[0]["actor"] == "admin" and last[0]["target"] == "k1"
        assert last[0]["detail"] == {"tenant": "a", "max_priority": "high"}
        assert set(last[0]) == {"id", "at", "actor", "action", "target", "detail"}


def test_async_reads_run_off_the_loop(rlog: RequestLog) -> None:
    _dataset(rlog)
    rlog.audit("admin", "x", "y", {})
    assert rlog.flush()

    async def main() -> None:
        loop_thread = threading.get_ident()
        seen: list[int] = []
        real = store_mod._query_sync

        def spy(conn: sqlite3.Connection, **kw: Any) -> dict[str, Any]:
            seen.append(threading.get_ident())
            return real(conn, **kw)

        store_mod._query_sync = spy  # type: ignore[assignment]
        try:
            page = await rlog.query(status="4xx", limit=2)
        finally:
            store_mod._query_sync = real
        assert page["total"] == 8 and len(page["data"]) == 2
        assert seen and loop_thread not in seen
        results = await asyncio.gather(
            rlog.get(rid(3)),
            rlog.stats(),
            rlog.stats_by_model(),
            rlog.stats_by_tenant(),
            rlog.audit_entries(),
            rlog.query(model="m1", node="n1"),
        )
        one, stats, by_model, usage, audit, q = results
        assert one is not None and one["id"] == hexid(3)
        assert stats["total"] == 20 and len(by_model["data"]) == 2 and len(usage["data"]) == 2
        assert audit["total"] == 1 and q["total"] == 5

    asyncio.run(main())


def test_reads_after_close_raise(tmp_path: Path) -> None:
    rl = RequestLog(cfg(tmp_path))
    rl.start()
    rl.close()
    with pytest.raises(RuntimeError):
        asyncio.run(rl.query())


# -- filters and admin query strings --------------------------------------------------------------


def test_parse_status_filter() -> None:
    assert parse_status_filter(404) == (404, 405)
    assert parse_status_filter("404") == (404, 405)
    assert parse_status_filter("4xx") == (400, 500)
    assert parse_status_filter("2XX") == (200, 300)
    for bad in ("6xx", "abc", "99", "600", "", "4x", True):
        with pytest.raises(ValueError):
            parse_status_filter(bad)


def test_parse_requests_query() -> None:
    got = parse_requests_query("status=4xx&model=m&limit=10&offset=20&since=1700000000")
    assert got == {"status": "4xx", "model": "m", "limit": 10, "offset": 20, "since": 1_700_000_000.0}
    assert parse_requests_query(b"?status=404&node=n1&tenant=t&key_id=k") == {
        "status": 404,
        "node": "n1",
        "tenant": "t",
        "key_id": "k",
        "limit": 100,
        "offset": 0,
    }
    assert parse_requests_query("") == {"limit": 100, "offset": 0}
    assert parse_requests_query(None) == {"limit": 100, "offset": 0}
    assert parse_requests_query("model=&status=") == {"limit": 100, "offset": 0}  # empty = not given
    assert parse_requests_query("model=a%2Fb+c")["model"] == "a/b c"
    iso = parse_requests_query("since=2023-11-14T22:13:20Z&until=2023-11-14T23:13:20%2B01:00")
    assert iso["since"] == 1_700_000_000.0 and iso["until"] == 1_700_000_000.0
    assert parse_requests_query("since=2023-11-14T22:13:20")["since"] == 1_700_000_000.0  # naive = UTC
    # every kwarg is accepted by the query function
    assert set(parse_requests_query("since=1&until=2&status=200&model=m&node=n&tenant=t&key_id=k")) <= set(
        _query_sync.__code__.co_varnames
    )


@pytest.mark.parametrize(
    ("qs", "param"),
    [
        ("status=6xx", "status"),
        ("status=20", "status"),
        ("limit=-1", "limit"),
        (f"limit={MAX_LIMIT + 1}", "limit"),
        ("limit=ten", "limit"),
        ("offset=1.5", "offset"),
        ("since=yesterday", "since"),
        ("since=nan", "since"),
        ("until=-5", "until"),
        ("since=20&until=10", "since"),
        ("modle=m", "modle"),
        ("model=a&model=b", "model"),
        ("model=" + "x" * 300, "model"),
        ("tenant=a%00b", "tenant"),
        ("&".join(f"p{i}=1" for i in range(40)), "query"),
        (b"model=\xff", "query"),
        ("model=%ff", "query"),
    ],
)
def test_parse_requests_query_rejects(qs: str | bytes, param: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_requests_query(qs)
    assert str(info.value).startswith(f"{param}: ")


def test_other_admin_queries() -> None:
    assert parse_stats_query("since=1&until=2&model=m&tenant=t") == {
        "since": 1.0,
        "until": 2.0,
        "model": "m",
        "tenant": "t",
    }
    assert parse_usage_query("tenant=t") == {"tenant": "t"}
    with pytest.raises(ValueError, match=r"^status: unknown parameter"):
        parse_usage_query("status=200")
    assert parse_audit_query("limit=5") == {"limit": 5, "offset": 0}
    with pytest.raises(ValueError, match=r"^model: "):
        parse_audit_query("model=m")
    assert parse_request_id("0123abcd" * 2) == 0x0123ABCD0123ABCD
    assert parse_request_id("18BCFE569F400001") == 0x18BCFE569F400001  # either case
    assert parse_request_id(format_request_id(rid(7))) == rid(7)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a/b",
        "0123abcd",  # too short
        "0123abcd" * 2 + "0",  # too long
        "x" * 16,
        "0x23abcd0123abcd",  # int(..., 16) would take these four
        "0123_abcd0123abc",
        " 123abcd0123abcd",
        "+123abcd0123abcd",
        "\u0660" * 16,  # a non-ASCII digit
        "r00001",  # an old text id
        "0123abcd0123abcd0123abcd0123abcd",  # a uuid4 hex
    ],
)
def test_parse_request_id_rejects_malformed_ids(bad: str) -> None:
    with pytest.raises(ValueError, match=r"^id: "):
        parse_request_id(bad)
