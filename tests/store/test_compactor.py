"""The request log's SQLite side (shardon.store.compactor): compaction, crashes, retention, bad rows."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shardon.store import RequestIds, RequestLog, format_request_id, queries, read_segment, records
from shardon.store import backlog as backlog_mod
from shardon.store import compactor as compactor_mod
from shardon.store.compactor import Compactor
from tests.store.store_helpers import (
    BASE,
    audit_count,
    backlog,
    compactor_held,
    compactor_of,
    count,
    open_log,
    rec,
    rid,
    ro,
    segments,
)
from tests.support import wait_until

REPO = Path(__file__).resolve().parent.parent.parent


# A process that logs rows and audit entries, then dies (os._exit: no close, no atexit). "backlog":
# the compactor is held back, so the rows are only in the backlog; "sqlite": flushed into SQLite too.
CHILD = r"""
import os, sys, time
from shardon.config import StoreConfig
from shardon.store import RequestLog, RequestRecord, request_id_floor
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rl = RequestLog(path, StoreConfig(flush_interval_ms=20, retention_days=0))
rl.start()
if mode == "backlog":
    rl.compactor.lock.acquire()
t0 = time.time() + 3600  # ids ahead of the clock: only seeding from the recovered rows keeps new ids above them
def row(i, status):
    return RequestRecord(id=request_id_floor(t0 + i) + i, received_at=t0 + i, endpoint="/v1/x", status=status)
for i in range(n):
    rl.append(row(i, 0 if i % 2 else 200))  # odd rows: an early version, replaced below
rl.audit("admin", "key.create", "k1", {"tenant": "t"})
for i in range(1, n, 2):
    rl.append(row(i, 200))
rl.audit(None, "config.reload")
ok = rl._flush_to_backlog(10) is not None if mode == "backlog" else rl.flush(10)
print(request_id_floor(t0 + n - 1) + n - 1, rl.pending, rl.backlog_bytes, flush=True)
os._exit(0 if ok else 3)
"""


def crash(db: Path, n: int, mode: str) -> tuple[int, int, int]:
    """Run CHILD; (its largest id, its pending, its backlog_bytes) when it died."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(db), str(n), mode],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    newest, pending, nbytes = map(int, proc.stdout.split())
    return newest, pending, nbytes


def statuses(db: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [r[0] for r in conn.execute("SELECT status FROM requests ORDER BY id")]


def test_rows_in_the_backlog_of_a_killed_process_are_recovered_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "log.db"
    n = 300
    newest, pending, nbytes = crash(db, n, "backlog")
    assert pending == n + n // 2 + 2 and nbytes > 0  # every row, version and audit entry was in the backlog
    assert count(db) == 0 and audit_count(db) == 0  # and none in SQLite
    assert sum(f.n for s in segments(db) for f in read_segment(backlog(db) / backlog_mod.segment_name(s))) == pending
    ids = RequestIds()
    monkeypatch.setattr(records, "request_ids", ids)
    with open_log(tmp_path) as rl:
        assert rl.recovered == pending
        assert count(db) == n and statuses(db) == [200] * n  # each row once, its last version
        assert audit_count(db) == 2
        assert rl.newest_id == newest and ids.last == newest  # ids handed out now exceed the recovered ones
        assert ids.next(time.time()) > newest
        assert rl.pending == 0 and rl.backlog_bytes == 0 and segments(db) == []
        rl.audit("admin", "key.revoke", "k1")
        assert rl.flush()
        assert audit_count(db) == 3  # a new entry's id does not replace a recovered one
    with open_log(tmp_path) as rl:  # nothing left to replay
        assert rl.recovered == 0 and count(db) == n and audit_count(db) == 3


def test_replaying_a_compacted_backlog_adds_no_duplicates(tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    n = 200
    _, pending, nbytes = crash(crashed / "log.db", n, "sqlite")
    assert pending == 0 and nbytes == 0  # flushed: in SQLite; the active segment and the state file remain
    assert count(crashed / "log.db") == n and segments(crashed / "log.db") == [1]
    for keep_state in (True, False):
        d = tmp_path / f"keep-state-{keep_state}"
        shutil.copytree(crashed, d)
        if not keep_state:  # as after a crash between a commit and the state write
            (backlog(d / "log.db") / "state").unlink()
        with open_log(d) as rl:
            assert rl.recovered == (0 if keep_state else n + n // 2 + 2)
            assert count(d / "log.db") == n and statuses(d / "log.db") == [200] * n
            assert audit_count(d / "log.db") == 2


def test_a_flush_returns_only_once_the_compaction_position_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compactor thread's state write is slowed down; a flush that sees its position must not
    # return before that position is in the state file (a crash then would replay it again).
    real = backlog_mod.write_state
    entered = threading.Event()

    def slow_in_the_compactor(directory: Path, pos: tuple[int, int]) -> None:
        if threading.current_thread().name == "shardon-store-compact":
            entered.set()
            time.sleep(0.3)
        real(directory, pos)

    monkeypatch.setattr(backlog_mod, "write_state", slow_in_the_compactor)
    rl = open_log(tmp_path)
    rl.start()
    try:
        for i in range(20):
            rl.append(rec(i))
        assert entered.wait(10)  # the compactor has committed rows and is recording where it got to
        assert rl.flush()
        assert backlog_mod.read_state(rl.backlog_dir) == rl.compactor.position
        assert count(tmp_path / "log.db") == 20
    finally:
        rl.close()


def test_writer_fills_the_backlog_and_only_the_compactor_writes_sqlite(tmp_path: Path) -> None:
    rl = open_log(tmp_path, flush_interval_ms=20)
    rl.start()
    try:
        seen: list[str] = []
        real = rl.compactor.rows

        class Spy:
            def insert_packed(self, rows: list[bytes]) -> int:
                seen.append(threading.current_thread().name)
                return real.insert_packed(rows)  # type: ignore[union-attr]

            def insert_frame(self, body: bytes, count: int) -> int:
                seen.append(threading.current_thread().name)
                return real.insert_frame(body, count)  # type: ignore[union-attr]

            def close(self) -> None:
                real.close()  # type: ignore[union-attr]

        rl.compactor.rows = Spy()  # type: ignore[assignment]
        with compactor_held(rl):
            sizes = []
            for k in range(3):
                for i in range(k * 40, k * 40 + 40):
                    rl.append(rec(i))
                rl.audit("admin", "x", str(k))
                assert rl._flush_to_backlog(10) is not None
                sizes.append(rl.backlog_bytes)
                assert count(rl.path) == 0 and audit_count(rl.path) == 0  # the writer did no SQLite work
                assert rl.pending == (k + 1) * 41
            assert sizes[0] < sizes[1] < sizes[2]
            assert sizes[2] == (backlog(rl.path) / backlog_mod.segment_name(1)).stat().st_size
        # released: the compactor catches up on its own, no flush needed
        wait_until(lambda: count(rl.path) == 120 and audit_count(rl.path) == 3)
        assert set(seen) == {"shardon-store-compact"}
        assert rl.pending == 0 and rl.backlog_bytes == 0
    finally:
        rl.close()


def test_compaction_waits_while_the_gateway_is_busy(tmp_path: Path) -> None:
    """Rows arriving faster than busy_rows_per_s stay in the backlog; a lull compacts them."""
    rl = open_log(tmp_path, flush_interval_ms=20, busy_rows_per_s=500)
    rl.start()
    try:
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:  # ~4,000 rows/s for 1.5 s: busy
            for _ in range(40):
                rl.append(rec(i))
                i += 1
            time.sleep(0.01)
        in_sqlite = count(rl.path)
        assert in_sqlite < i / 4, (in_sqlite, i)  # it waited (what went in came before the rate was known)
        assert rl.backlog_bytes > 0
        # the lull: all of it, without a flush (the counters advance just after the commit)
        wait_until(lambda: count(rl.path) == i and rl.pending == 0, 5)
        assert rl.backlog_bytes == 0
    finally:
        rl.close()


def test_a_quiet_gateway_is_compacted_as_rows_come(tmp_path: Path) -> None:
    rl = open_log(tmp_path, flush_interval_ms=20, busy_rows_per_s=500)
    rl.start()
    try:
        for i in range(20):  # ~100 rows/s
            rl.append(rec(i))
            time.sleep(0.01)
            if i > 5:
                assert count(rl.path) >= i - 5  # close behind, not held back
        wait_until(lambda: count(rl.path) == 20, 5)
    finally:
        rl.close()


def test_the_backlog_limit_compacts_even_while_busy(tmp_path: Path) -> None:
    rl = open_log(tmp_path, flush_interval_ms=20, busy_rows_per_s=100, max_backlog_mb=0.05)
    rl.start()
    try:
        deadline = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < deadline:  # busy, and 50 KB of backlog is soon reached
            for _ in range(40):
                rl.append(rec(i))
                i += 1
            time.sleep(0.01)
        assert count(rl.path) > i / 2  # compacting went on despite the rate
        assert rl.backlog_bytes < 200_000
    finally:
        rl.close()


def test_writer_cpus_pin_the_compactor(tmp_path: Path) -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity here")
    cpu = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    with open_log(tmp_path, writer_cpus=[cpu]) as rl:
        wait_until(lambda: rl.writer_cpus is not None)
        assert rl.writer_cpus == [cpu]
        compactor = compactor_of(rl)
        assert compactor.native_id is not None and rl._thread is not None and rl._thread.native_id is not None
        assert os.sched_getaffinity(compactor.native_id) == {cpu}
        assert os.sched_getaffinity(rl._thread.native_id) == mine  # the writer stays put


def test_same_id_replaces_row(rlog: RequestLog) -> None:
    rlog.append(rec(1, status=0))
    assert rlog.flush()
    r = rec(1, status=200, finished_at=BASE + 2)
    with ro(rlog) as conn:
        row = queries.request(conn, rid(1))
        assert row is not None and row["status"] == 0 and row["receipt"] is None
        rlog.append(r)  # the final version replaces the early one
        assert rlog.flush()
        row = queries.request(conn, rid(1))
        assert row is not None and row["status"] == 200 and row["finished_at"] == BASE + 2
        assert queries.requests(conn)["total"] == 1


def test_write_failure_is_retried(rlog: RequestLog, monkeypatch: pytest.MonkeyPatch) -> None:
    real = Compactor._transaction
    failures = [2]

    def flaky(self: Compactor, *args: Any) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        real(self, *args)

    monkeypatch.setattr(Compactor, "_transaction", flaky)
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
    monkeypatch.setattr(compactor_mod, "_DELETE_CHUNK", 7)  # several DELETE statements
    rl = open_log(tmp_path, retention_days=1, cleanup_interval_s=0.05)
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
            left = [r["id"] for r in queries.requests(conn)["data"]]
            assert sorted(left) == sorted(format_request_id(r.id) for r in kept)
            assert queries.audit_entries(conn)["total"] == 1
    finally:
        rl.close()


def test_locked_database_leaves_rows_in_the_backlog_for_the_next_start(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    rl = open_log(tmp_path)
    rl.start()
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        for i in range(50):
            rl.append(rec(i))
        rl.audit("admin", "key.create", "k1")
        # out of memory, waiting on disk:
        wait_until(lambda: rl.backlog_bytes > 0 and not rl._q and not rl._queued_rows())
        rl.close(timeout=0.5)  # SQLite is locked: the rows stay in the backlog
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert segments(db) and count(db) == 0
    with open_log(tmp_path) as rl2:
        assert rl2.recovered == 51
        assert count(db) == 50 and audit_count(db) == 1
