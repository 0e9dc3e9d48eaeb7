"""The request log's two tiers: the on-disk backlog (writer thread) and its compaction into SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from shardon import store as store_mod
from shardon.store import RequestIds, RequestLog, encode_frame, read_segment
from tests.conftest import node_entry, wait_until
from tests.test_store import BASE, cfg, count, rec, rid

ROWS, AUDIT = store_mod._KIND_ROWS, store_mod._KIND_AUDIT
REPO = Path(__file__).resolve().parent.parent


def pack(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def packed_rows(start: int, n: int) -> list[bytes]:
    return [pack(rec(i)) for i in range(start, start + n)]


def packed_audit(audit_id: int, action: str = "key.create") -> bytes:
    return pack((audit_id, BASE, "admin", action, "k1", "{}"))


def backlog(db: Path) -> Path:
    return db.with_name(db.name + "-backlog")


def segments(db: Path) -> list[int]:
    return store_mod._segment_numbers(backlog(db))


def write_segment(db: Path, n: int, frames: list[bytes]) -> Path:
    d = backlog(db)
    d.mkdir(exist_ok=True)
    path = d / store_mod._segment_name(n)
    path.write_bytes(b"".join(frames))
    return path


def audit_count(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])


@pytest.fixture(autouse=True)
def _request_ids_restored() -> Iterator[None]:
    """Some tests seed the process-wide request ids into the future: put them back after each."""
    last = store_mod.request_ids.last
    yield
    store_mod.request_ids.last = last


def compactor_of(rl: RequestLog) -> threading.Thread:
    assert rl._compactor is not None and rl._compactor.name == "shardon-store-compact"
    return rl._compactor


@contextlib.contextmanager
def compactor_held(rl: RequestLog) -> Iterator[None]:
    """Hold the compaction lock: nothing reaches SQLite (the writer still fills the backlog)."""
    rl._compact_lock.acquire()
    try:
        yield
    finally:
        rl._compact_lock.release()


@pytest.fixture
def rlog(tmp_path: Path) -> Iterator[RequestLog]:
    rl = RequestLog(cfg(tmp_path))
    rl.start()
    try:
        yield rl
    finally:
        rl.close()


# -- the frame format -----------------------------------------------------------------------------


def test_frame_round_trip_rows_and_audits(tmp_path: Path) -> None:
    rows = [*packed_rows(0, 50), b"", pack(rec(99, model="m" * 3000))]  # an empty entry, a big one
    audits = [packed_audit(1), packed_audit(2, "model.unload")]
    frame = encode_frame(ROWS, rows)
    # the documented header: magic, kind, count, body length, body crc32, header crc32
    magic, kind, n, body_len, body_crc = struct.unpack_from("<4sB3xIII", frame)
    assert (magic, kind, n) == (b"SHBL", ROWS, len(rows))
    assert body_len == len(frame) - 24 == 4 * len(rows) + sum(map(len, rows))
    assert body_crc == zlib.crc32(frame[24:])
    assert struct.unpack_from("<I", frame, 20)[0] == zlib.crc32(frame[:20])
    assert list(struct.unpack_from(f"<{len(rows)}I", frame, 24)) == [len(r) for r in rows]
    path = tmp_path / "x.seg"
    path.write_bytes(frame + encode_frame(AUDIT, audits))
    got = read_segment(path)
    assert [(f.status, f.kind, f.n, f.entries) for f in got] == [
        (store_mod._OK, ROWS, len(rows), rows),
        (store_mod._OK, AUDIT, 2, audits),
    ]
    assert sum(f.size for f in got) == path.stat().st_size


@pytest.mark.parametrize("cut", [1, 10, 23, 24, 30, -1])
def test_torn_final_frame_is_detected(tmp_path: Path, cut: int) -> None:
    first, last = encode_frame(ROWS, packed_rows(0, 5)), encode_frame(ROWS, packed_rows(5, 5))
    path = tmp_path / "x.seg"
    path.write_bytes(first + last[: len(last) + cut if cut < 0 else cut])  # cut in the header or the body
    got = read_segment(path)
    assert [f.status for f in got] == [store_mod._OK, store_mod._TORN]
    assert got[0].entries == packed_rows(0, 5)


@pytest.mark.parametrize(("where", "status"), [("payload", "_CORRUPT"), ("lengths", "_CORRUPT"), ("header", "_TORN")])
def test_corrupt_final_frame_is_detected(tmp_path: Path, where: str, status: str) -> None:
    first, last = encode_frame(ROWS, packed_rows(0, 5)), bytearray(encode_frame(ROWS, packed_rows(5, 5)))
    last[{"payload": len(last) - 3, "lengths": 26, "header": 9}[where]] ^= 0x40
    path = tmp_path / "x.seg"
    path.write_bytes(first + bytes(last))
    got = read_segment(path)
    assert [f.status for f in got] == [store_mod._OK, getattr(store_mod, status)]
    assert got[0].entries == packed_rows(0, 5) and got[1].entries == []


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_recovery_ignores_a_torn_or_corrupt_last_frame(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "log.db"
    last = encode_frame(ROWS, packed_rows(20, 10))
    if damage == "truncated":
        last = last[:-7]
    else:
        flipped = bytearray(last)
        flipped[-5] ^= 0xFF
        last = bytes(flipped)
    write_segment(db, 1, [encode_frame(ROWS, packed_rows(0, 10)), encode_frame(AUDIT, [packed_audit(7)])])
    write_segment(db, 2, [encode_frame(ROWS, packed_rows(10, 10)), last])
    with RequestLog(cfg(tmp_path)) as rl:
        assert rl.recovered == 21  # 20 rows and the audit entry before the damaged frame
        assert count(db) == 20 and audit_count(db) == 1
        assert rl.dropped == (10 if damage == "flipped" else 0)  # a checksum failure counts its rows
        assert rl.newest_id == rid(19)
        assert rl.pending == 0 and rl.backlog_bytes == 0
        assert segments(db) == []  # compacted, then deleted
        rl.append(rec(30))
        assert rl.flush()
        assert count(db) == 21
    assert not backlog(db).exists()  # close removes the backlog


def test_recovery_starts_at_the_recorded_position(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    a, b, c = (encode_frame(ROWS, packed_rows(i, 5)) for i in (0, 5, 10))
    write_segment(db, 3, [a, b])
    write_segment(db, 4, [c])
    write_segment(db, 2, [encode_frame(ROWS, packed_rows(100, 5))])  # before the position: compacted already
    (backlog(db) / "state").write_bytes(orjson.dumps({"segment": 3, "offset": len(a)}))
    with RequestLog(cfg(tmp_path)) as rl:
        assert rl.recovered == 10
        with contextlib.closing(sqlite3.connect(db)) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")]
        assert ids == [rid(i) for i in range(5, 15)]
        assert segments(db) == []
        assert rl._wseg == 5  # the new segments come after every old one


@pytest.mark.parametrize("state", [b"garbage", b'{"segment": 1, "offset": 3}'])
def test_unusable_state_file_replays_everything(tmp_path: Path, state: bytes) -> None:
    db = tmp_path / "log.db"
    write_segment(db, 1, [encode_frame(ROWS, packed_rows(0, 5)), encode_frame(ROWS, packed_rows(5, 5))])
    (backlog(db) / "state").write_bytes(state)  # unreadable / not at a frame
    with RequestLog(cfg(tmp_path)) as rl:
        assert rl.recovered == 10 and count(db) == 10


# -- crashes --------------------------------------------------------------------------------------

# A process that logs rows and audit entries, then dies (os._exit: no close, no atexit). "backlog":
# the compactor is held back, so the rows are only in the backlog; "sqlite": flushed into SQLite too.
CHILD = r"""
import os, sys, time
from shardon.store import RequestLog, RequestRecord, StoreConfig, request_id_floor
path, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rl = RequestLog(StoreConfig(path=path, flush_interval_ms=20, retention_days=0))
rl.start()
if mode == "backlog":
    rl._compact_lock.acquire()
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
    assert sum(f.n for s in segments(db) for f in read_segment(backlog(db) / store_mod._segment_name(s))) == pending
    ids = RequestIds()
    monkeypatch.setattr(store_mod, "request_ids", ids)
    with RequestLog(cfg(tmp_path)) as rl:
        assert rl.recovered == pending
        assert count(db) == n and statuses(db) == [200] * n  # each row once, its last version
        assert audit_count(db) == 2
        assert rl.newest_id == newest and ids.last == newest  # ids handed out now exceed the recovered ones
        assert ids.next(time.time()) > newest
        assert rl.pending == 0 and rl.backlog_bytes == 0 and segments(db) == []
        rl.audit("admin", "key.revoke", "k1")
        assert rl.flush()
        assert audit_count(db) == 3  # a new entry's id does not replace a recovered one
    with RequestLog(cfg(tmp_path)) as rl:  # nothing left to replay
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
        with RequestLog(cfg(d)) as rl:
            assert rl.recovered == (0 if keep_state else n + n // 2 + 2)
            assert count(d / "log.db") == n and statuses(d / "log.db") == [200] * n
            assert audit_count(d / "log.db") == 2


def test_a_flush_returns_only_once_the_compaction_position_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The compactor thread's state write is slowed down; a flush that sees its position must not
    # return before that position is in the state file (a crash then would replay it again).
    real = store_mod._write_state
    entered = threading.Event()

    def slow_in_the_compactor(directory: Path, pos: tuple[int, int]) -> None:
        if threading.current_thread().name == "shardon-store-compact":
            entered.set()
            time.sleep(0.3)
        real(directory, pos)

    monkeypatch.setattr(store_mod, "_write_state", slow_in_the_compactor)
    rl = RequestLog(cfg(tmp_path))
    rl.start()
    try:
        for i in range(20):
            rl.append(rec(i))
        assert entered.wait(10)  # the compactor has committed rows and is recording where it got to
        assert rl.flush()
        assert store_mod._read_state(rl.backlog_dir) == rl._cpos
        assert count(tmp_path / "log.db") == 20
    finally:
        rl.close()


# -- the threads ----------------------------------------------------------------------------------


def test_writer_fills_the_backlog_and_only_the_compactor_writes_sqlite(tmp_path: Path) -> None:
    rl = RequestLog(cfg(tmp_path, flush_interval_ms=20))
    rl.start()
    try:
        seen: list[str] = []
        real = rl._rows

        class Spy:
            def insert_packed(self, rows: list[bytes]) -> int:
                seen.append(threading.current_thread().name)
                return real.insert_packed(rows)  # type: ignore[union-attr]

            def insert_frame(self, body: bytes, count: int) -> int:
                seen.append(threading.current_thread().name)
                return real.insert_frame(body, count)  # type: ignore[union-attr]

            def close(self) -> None:
                real.close()  # type: ignore[union-attr]

        rl._rows = Spy()  # type: ignore[assignment]
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
            assert sizes[2] == (backlog(rl.path) / store_mod._segment_name(1)).stat().st_size
        # released: the compactor catches up on its own, no flush needed
        wait_until(lambda: count(rl.path) == 120 and audit_count(rl.path) == 3)
        assert set(seen) == {"shardon-store-compact"}
        assert rl.pending == 0 and rl.backlog_bytes == 0
    finally:
        rl.close()


def test_compaction_waits_while_the_gateway_is_busy(tmp_path: Path) -> None:
    """Rows arriving faster than busy_rows_per_s stay in the backlog; a lull compacts them."""
    rl = RequestLog(cfg(tmp_path, flush_interval_ms=20, busy_rows_per_s=500))
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
        wait_until(lambda: count(rl.path) == i, 5)  # the lull: all of it, without a flush
        assert rl.pending == 0
    finally:
        rl.close()


def test_a_quiet_gateway_is_compacted_as_rows_come(tmp_path: Path) -> None:
    rl = RequestLog(cfg(tmp_path, flush_interval_ms=20, busy_rows_per_s=500))
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
    rl = RequestLog(cfg(tmp_path, flush_interval_ms=20, busy_rows_per_s=100, max_backlog_mb=0.05))
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


def test_busy_config_is_validated() -> None:
    with pytest.raises(msgspec.ValidationError, match="busy_rows_per_s"):
        msgspec.convert({"busy_rows_per_s": -1}, store_mod.StoreConfig)
    with pytest.raises(msgspec.ValidationError, match="max_backlog_mb"):
        msgspec.convert({"max_backlog_mb": 0}, store_mod.StoreConfig)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names: Linux")
def test_os_thread_names(rlog: RequestLog) -> None:
    def comm(thread: threading.Thread | None) -> str:
        assert thread is not None and thread.native_id is not None
        return Path(f"/proc/self/task/{thread.native_id}/comm").read_text().strip()

    # Each thread names itself when it starts running, so wait for both: the
    # writer may not have been scheduled yet when the compactor has.
    wait_until(lambda: comm(compactor_of(rlog)) == "shardon-store-c")  # both match "shardon-store"
    wait_until(lambda: comm(rlog._thread) == "shardon-store")


def test_writer_cpus_pin_the_compactor(tmp_path: Path) -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity here")
    cpu = min(os.sched_getaffinity(0))
    mine = os.sched_getaffinity(0)
    with RequestLog(cfg(tmp_path, writer_cpus=[cpu])) as rl:
        wait_until(lambda: rl.writer_cpus is not None)
        assert rl.writer_cpus == [cpu]
        compactor = compactor_of(rl)
        assert compactor.native_id is not None and rl._thread is not None and rl._thread.native_id is not None
        assert os.sched_getaffinity(compactor.native_id) == {cpu}
        assert os.sched_getaffinity(rl._thread.native_id) == mine  # the writer stays put


def test_segments_rotate_and_compacted_ones_are_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame_size = len(encode_frame(ROWS, packed_rows(0, 5)))
    monkeypatch.setattr(store_mod, "_SEGMENT_BYTES", frame_size + 1)  # sealed after its second frame
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    rl = RequestLog(cfg(tmp_path))
    rl.start()
    try:
        with compactor_held(rl):
            for k in range(10):
                for i in range(k * 5, k * 5 + 5):
                    rl.append(rec(i))
                assert rl._flush_to_backlog(10) is not None
            assert segments(rl.path) == [1, 2, 3, 4, 5]
            frames = [read_segment(backlog(rl.path) / store_mod._segment_name(s)) for s in range(1, 6)]
            assert [[f.n for f in fs] for fs in frames] == [[5, 5]] * 5
            assert len(synced) >= 5  # each sealed segment was fsynced
            assert rl._published == (6, 0)  # the next frame starts segment 6
            assert count(rl.path) == 0
        assert rl.flush()
        assert count(rl.path) == 50
        assert segments(rl.path) == []  # every sealed segment, once compacted, deleted
        state = orjson.loads((backlog(rl.path) / "state").read_bytes())
        assert (state["segment"], state["offset"]) == rl._cpos == (6, 0)
        rl.append(rec(50))
        assert rl.flush()
        assert segments(rl.path) == [6] and count(rl.path) == 51  # the segment being appended to stays
    finally:
        rl.close()
    assert not backlog(rl.path).exists()


def test_active_segment_is_kept_until_close(rlog: RequestLog) -> None:
    for i in range(30):
        rlog.append(rec(i))
    assert rlog.flush()
    assert segments(rlog.path) == [1]  # compacted, but still the writer's
    seg = backlog(rlog.path) / store_mod._segment_name(1)
    assert orjson.loads((backlog(rlog.path) / "state").read_bytes()) == {"segment": 1, "offset": seg.stat().st_size}


# -- flush, reads, counters -----------------------------------------------------------------------


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
    rl = RequestLog(cfg(tmp_path, flush_interval_ms=60_000))  # nothing moves on its own
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
        assert rlog.backlog_bytes == (backlog(rlog.path) / store_mod._segment_name(1)).stat().st_size > 0
    assert rlog.flush()
    assert rlog.pending == 0 and rlog.backlog_bytes == 0


def test_unwritable_backlog_keeps_rows_in_memory_until_it_is_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_SEGMENT_BYTES", 1)  # every frame seals its segment: each write opens a file
    rl = RequestLog(cfg(tmp_path))
    rl.start()
    d = backlog(rl.path)
    moved = tmp_path / "moved-backlog"
    try:
        for i in range(10):
            rl.append(rec(i))
        assert rl.flush()
        os.rename(d, moved)
        d.write_bytes(b"")  # a file where the directory was: no segment can be created
        for i in range(10, 30):
            rl.append(rec(i))
        rl.audit("admin", "key.create", "k1")
        wait_until(lambda: rl.write_errors > 0)
        assert rl.flush(0.2) is False
        assert rl._queued_rows() == 20 and rl.pending >= 21 and rl.backlog_bytes == 0  # in memory
        assert count(rl.path) == 10 and rl.dropped == 0
        assert rl.last_error is not None and "Error" in rl.last_error
        d.unlink()
        try:
            os.rename(moved, d)
        except OSError:  # the writer made a new directory first: fine too
            shutil.rmtree(moved)
        assert rl.flush(10)
        assert count(rl.path) == 30 and audit_count(rl.path) == 1
        assert rl.pending == 0 and rl.dropped == 0
    finally:
        rl.close()


def test_unwritable_backlog_sheds_beyond_max_pending(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "_MAX_PENDING", 5)
    db = tmp_path / "log.db"
    rl = RequestLog(cfg(tmp_path))
    backlog(db).write_bytes(b"")  # not a directory
    rl.start()
    try:
        for i in range(20):
            rl.append(rec(i))
        wait_until(lambda: rl.dropped == 15)
        backlog(db).unlink()
        assert rl.flush(10)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")]
        assert ids == [rid(i) for i in range(15, 20)]  # the oldest were dropped
    finally:
        rl.close()


def test_locked_database_leaves_rows_in_the_backlog_for_the_next_start(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    rl = RequestLog(cfg(tmp_path))
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
    with RequestLog(cfg(tmp_path)) as rl2:
        assert rl2.recovered == 51
        assert count(db) == 50 and audit_count(db) == 1


def test_status_reports_backlog_bytes(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    from tests.gateway.test_auth import call

    node = make_mock(models=["m1"], name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], store={"path": str(tmp_path / "s.db")})
    status, _, body = call(gw.url, "GET", "/admin/status")
    assert status == 200, body
    counters = body["request_log"]
    assert type(counters["backlog_bytes"]) is int and counters["backlog_bytes"] >= 0 and counters["dropped"] == 0
    assert set(counters) >= {"path", "pending", "backlog_bytes", "written", "dropped"}
