"""The request log's threads and lifecycle (shardon.store.log): append, flush, close, reads."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shardon.store import RequestIds, RequestLog, RequestRecord, queries, records, request_id_floor
from shardon.store import backlog as backlog_mod
from tests.store.store_helpers import (
    BASE,
    backlog,
    cfg,
    compactor_held,
    compactor_of,
    count,
    dataset,
    hexid,
    open_log,
    rec,
    rid,
    ro,
)
from tests.support import call, node_entry, post, wait_until


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
        assert queries.requests(conn, limit=0)["total"] == 5000


def test_restart_keeps_rows(tmp_path: Path) -> None:
    with open_log(tmp_path) as rl:
        for i in range(10):
            rl.append(rec(i))
        rl.audit("admin", "key.create", "k1", {"tenant": "t"})
    with open_log(tmp_path) as rl2:
        rl2.append(rec(10))
        assert rl2.flush()
        with ro(rl2) as conn:
            assert queries.requests(conn)["total"] == 11
            assert queries.audit_entries(conn)["total"] == 1
            assert queries.request(conn, rid(3)) is not None
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


def test_append_before_start_is_written_at_start(tmp_path: Path) -> None:
    rl = open_log(tmp_path)
    try:
        rl.append(rec(1))
        assert rl.flush(0.1) is False  # not running yet
        rl.start()
        assert rl.flush()
        assert count(rl.path) == 1
    finally:
        rl.close()


def test_close_is_idempotent_and_flushes(tmp_path: Path) -> None:
    rl = open_log(tmp_path, flush_interval_ms=60_000)  # only close() can write these
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


def test_start_fails_loudly_on_a_bad_path(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    rl = RequestLog(tmp_path / "adir")
    with pytest.raises(RuntimeError, match="cannot open database"):
        rl.start()
    rl.close()


def test_restart_seeds_ids_past_the_newest_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A log whose newest id is ahead of the clock (it went back, or another host wrote it): new ids exceed it."""
    path = tmp_path / "log.db"
    future = request_id_floor(time.time() + 3600)
    ids = RequestIds()
    monkeypatch.setattr(records, "request_ids", ids)
    with RequestLog(path, cfg()) as rl:
        rl.append(RequestRecord(id=future, received_at=time.time(), status=200))
        rl.append(RequestRecord(id=request_id_floor(BASE), received_at=BASE, status=200))
        assert rl.flush()
    ids = RequestIds()  # as in a new process
    monkeypatch.setattr(records, "request_ids", ids)
    assert ids.next(time.time()) < future  # unseeded, the clock alone would repeat old ids
    ids = RequestIds()
    monkeypatch.setattr(records, "request_ids", ids)
    with RequestLog(path, cfg()) as rl:
        assert rl.newest_id == future
        assert ids.last == future
        nxt = ids.next(time.time())
        assert nxt > future
        rl.append(RequestRecord(status=201))  # the default id comes from the seeded counter
        assert rl.flush()
        with contextlib.closing(rl.connect_readonly()) as conn:
            got = conn.execute("SELECT id, status FROM requests ORDER BY id").fetchall()
    assert got[:2] == [(request_id_floor(BASE), 200), (future, 200)]  # nothing replaced
    assert len(got) == 3 and got[2][0] > nxt and got[2][1] == 201


def test_async_reads_run_off_the_loop(rlog: RequestLog) -> None:
    dataset(rlog)
    rlog.audit("admin", "x", "y", {})
    assert rlog.flush()

    async def main() -> None:
        loop_thread = threading.get_ident()
        seen: list[int] = []
        real = queries.requests

        def spy(conn: sqlite3.Connection, **kw: Any) -> dict[str, Any]:
            seen.append(threading.get_ident())
            return real(conn, **kw)

        queries.requests = spy  # type: ignore[assignment]
        try:
            page = await rlog.query(status="4xx", limit=2)
        finally:
            queries.requests = real
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
    rl = open_log(tmp_path)
    rl.start()
    rl.close()
    with pytest.raises(RuntimeError):
        asyncio.run(rl.query())


def test_flush_then_read_sees_every_row(rlog: RequestLog) -> None:
    for i in range(2500):  # more than batch_max: several frames, several transactions
        rlog.append(rec(i))
    rlog.audit("admin", "key.create", "k1")
    assert rlog.flush()
    assert rlog.pending == 0 and rlog.backlog_bytes == 0
    assert count(rlog.path) == 2500 and rlog.written == 2500 and rlog.audits_written == 1

    async def read() -> tuple[int, int]:
        return (await rlog.query(limit=0))["total"], (await rlog.audit_entries())["total"]

    assert asyncio.run(read()) == (2500, 1)


def test_reads_without_a_flush_see_rows_appended_just_before(tmp_path: Path) -> None:
    rl = open_log(tmp_path, flush_interval_ms=60_000)  # nothing moves on its own
    rl.start()
    try:

        async def main() -> None:
            for i in range(40):
                rl.append(rec(i, model="m1", tenant="t", finished_at=BASE + i + 0.5))
            assert (await rl.query(limit=5))["total"] == 40
            rl.append(rec(40, model="m1"))
            one = await rl.get(rid(40))
            assert one is not None and one["model"] == "m1"
            rl.append(rec(41, model="m2"))
            assert (await rl.stats())["total"] == 42
            rl.append(rec(42, model="m3"))
            assert {d["model"] for d in (await rl.stats_by_model())["data"]} == {"m1", "m2", "m3"}
            rl.append(rec(43, tenant="u"))
            assert {d["tenant"] for d in (await rl.stats_by_tenant())["data"]} >= {"t", "u"}
            rl.audit("admin", "model.unload", "m1")
            assert (await rl.audit_entries())["total"] == 1

        asyncio.run(main())
        assert rl.pending == 0
    finally:
        rl.close()


def test_pending_and_backlog_bytes(rlog: RequestLog) -> None:
    assert rlog.pending == 0 and rlog.backlog_bytes == 0
    with compactor_held(rlog):
        for i in range(25):
            rlog.append(rec(i))
        rlog.audit("admin", "x", "y")
        assert rlog.pending >= 26  # in memory, or on its way to the backlog
        assert rlog._flush_to_backlog(10) is not None
        assert rlog.pending == 26
        assert rlog.backlog_bytes == (backlog(rlog.path) / backlog_mod.segment_name(1)).stat().st_size > 0
    assert rlog.flush()
    assert rlog.pending == 0 and rlog.backlog_bytes == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names: Linux")
def test_os_thread_names(rlog: RequestLog) -> None:
    def comm(thread: threading.Thread | None) -> str:
        assert thread is not None and thread.native_id is not None
        return Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()

    # Each thread names itself when it starts running, so wait for both: the
    # writer may not have been scheduled yet when the compactor has.
    wait_until(lambda: comm(compactor_of(rlog)) == "shardon-store-c")  # both match "shardon-store"
    wait_until(lambda: comm(rlog._thread) == "shardon-store")


def test_status_reports_backlog_bytes(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], store={"path": str(tmp_path / "s.db")})
    db = tmp_path / "s.db"

    def counters() -> dict[str, Any]:
        status, _, body = call(gw.url, "GET", "/admin/status")
        assert status == 200, body
        return dict(body["request_log"])

    assert set(counters()) >= {"path", "pending", "backlog_bytes", "written", "dropped"}
    with compactor_held(gw.gateway.request_log):  # rows stay in the backlog, none reach SQLite
        assert post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"x"}')[0] == 200
        on_disk = wait_until(lambda: backlog(db).is_dir() and sum(p.stat().st_size for p in backlog(db).iterdir()))
        assert counters()["backlog_bytes"] == on_disk > 0
    wait_until(lambda: counters()["backlog_bytes"] == 0)  # moved into SQLite
    assert counters()["dropped"] == 0
