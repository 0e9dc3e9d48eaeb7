"""The on-disk backlog (shardon.store.backlog): the frame format, segments, the state file, recovery."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import struct
import zlib
from pathlib import Path

import orjson
import pytest

from shardon.store import RequestLog, encode_frame, read_segment
from shardon.store import backlog as backlog_mod
from shardon.store import log as log_mod
from tests.store.store_helpers import (
    audit_count,
    backlog,
    compactor_held,
    count,
    open_log,
    pack,
    packed_audit,
    packed_rows,
    rec,
    rid,
    segments,
    write_segment,
)
from tests.support import wait_until


def test_frame_round_trip_rows_and_audits(tmp_path: Path) -> None:
    rows = [*packed_rows(0, 50), b"", pack(rec(99, model="m" * 3000))]  # an empty entry, a big one
    audits = [packed_audit(1), packed_audit(2, "model.unload")]
    frame = encode_frame(backlog_mod.KIND_ROWS, rows)
    # the documented header: magic, kind, count, body length, body crc32, header crc32
    magic, kind, n, body_len, body_crc = struct.unpack_from("<4sB3xIII", frame)
    assert (magic, kind, n) == (b"SHBL", backlog_mod.KIND_ROWS, len(rows))
    assert body_len == len(frame) - 24 == 4 * len(rows) + sum(map(len, rows))
    assert body_crc == zlib.crc32(frame[24:])
    assert struct.unpack_from("<I", frame, 20)[0] == zlib.crc32(frame[:20])
    assert list(struct.unpack_from(f"<{len(rows)}I", frame, 24)) == [len(r) for r in rows]
    path = tmp_path / "x.seg"
    path.write_bytes(frame + encode_frame(backlog_mod.KIND_AUDIT, audits))
    got = read_segment(path)
    assert [(f.status, f.kind, f.n, f.entries) for f in got] == [
        (backlog_mod.OK, backlog_mod.KIND_ROWS, len(rows), rows),
        (backlog_mod.OK, backlog_mod.KIND_AUDIT, 2, audits),
    ]
    assert sum(f.size for f in got) == path.stat().st_size


@pytest.mark.parametrize("cut", [1, 10, 23, 24, 30, -1])
def test_torn_final_frame_is_detected(tmp_path: Path, cut: int) -> None:
    first, last = (
        encode_frame(backlog_mod.KIND_ROWS, packed_rows(0, 5)),
        encode_frame(backlog_mod.KIND_ROWS, packed_rows(5, 5)),
    )
    path = tmp_path / "x.seg"
    path.write_bytes(first + last[: len(last) + cut if cut < 0 else cut])  # cut in the header or the body
    got = read_segment(path)
    assert [f.status for f in got] == [backlog_mod.OK, backlog_mod.TORN]
    assert got[0].entries == packed_rows(0, 5)


@pytest.mark.parametrize(("where", "status"), [("payload", "CORRUPT"), ("lengths", "CORRUPT"), ("header", "TORN")])
def test_corrupt_final_frame_is_detected(tmp_path: Path, where: str, status: str) -> None:
    first, last = (
        encode_frame(backlog_mod.KIND_ROWS, packed_rows(0, 5)),
        bytearray(encode_frame(backlog_mod.KIND_ROWS, packed_rows(5, 5))),
    )
    last[{"payload": len(last) - 3, "lengths": 26, "header": 9}[where]] ^= 0x40
    path = tmp_path / "x.seg"
    path.write_bytes(first + bytes(last))
    got = read_segment(path)
    assert [f.status for f in got] == [backlog_mod.OK, getattr(backlog_mod, status)]
    assert got[0].entries == packed_rows(0, 5) and got[1].entries == []


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_recovery_ignores_a_torn_or_corrupt_last_frame(tmp_path: Path, damage: str) -> None:
    db = tmp_path / "log.db"
    last = encode_frame(backlog_mod.KIND_ROWS, packed_rows(20, 10))
    if damage == "truncated":
        last = last[:-7]
    else:
        flipped = bytearray(last)
        flipped[-5] ^= 0xFF
        last = bytes(flipped)
    write_segment(
        db,
        1,
        [
            encode_frame(backlog_mod.KIND_ROWS, packed_rows(0, 10)),
            encode_frame(backlog_mod.KIND_AUDIT, [packed_audit(7)]),
        ],
    )
    write_segment(db, 2, [encode_frame(backlog_mod.KIND_ROWS, packed_rows(10, 10)), last])
    with open_log(tmp_path) as rl:
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
    a, b, c = (encode_frame(backlog_mod.KIND_ROWS, packed_rows(i, 5)) for i in (0, 5, 10))
    write_segment(db, 3, [a, b])
    write_segment(db, 4, [c])
    write_segment(
        db, 2, [encode_frame(backlog_mod.KIND_ROWS, packed_rows(100, 5))]
    )  # before the position: compacted already
    (backlog(db) / "state").write_bytes(orjson.dumps({"segment": 3, "offset": len(a)}))
    with open_log(tmp_path) as rl:
        assert rl.recovered == 10
        with contextlib.closing(sqlite3.connect(db)) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")]
        assert ids == [rid(i) for i in range(5, 15)]
        assert segments(db) == []
        assert rl.backlog_writer.segment == 5  # the new segments come after every old one


@pytest.mark.parametrize("state", [b"garbage", b'{"segment": 1, "offset": 3}'])
def test_unusable_state_file_replays_everything(tmp_path: Path, state: bytes) -> None:
    db = tmp_path / "log.db"
    write_segment(
        db,
        1,
        [
            encode_frame(backlog_mod.KIND_ROWS, packed_rows(0, 5)),
            encode_frame(backlog_mod.KIND_ROWS, packed_rows(5, 5)),
        ],
    )
    (backlog(db) / "state").write_bytes(state)  # unreadable / not at a frame
    with open_log(tmp_path) as rl:
        assert rl.recovered == 10 and count(db) == 10


def test_segments_rotate_and_compacted_ones_are_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame_size = len(encode_frame(backlog_mod.KIND_ROWS, packed_rows(0, 5)))
    monkeypatch.setattr(backlog_mod, "SEGMENT_BYTES", frame_size + 1)  # sealed after its second frame
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(backlog_mod.os, "fsync", fsync)
    rl = open_log(tmp_path)
    rl.start()
    try:
        with compactor_held(rl):
            for k in range(10):
                for i in range(k * 5, k * 5 + 5):
                    rl.append(rec(i))
                assert rl._flush_to_backlog(10) is not None
            assert segments(rl.path) == [1, 2, 3, 4, 5]
            frames = [read_segment(backlog(rl.path) / backlog_mod.segment_name(s)) for s in range(1, 6)]
            assert [[f.n for f in fs] for fs in frames] == [[5, 5]] * 5
            assert len(synced) >= 5  # each sealed segment was fsynced
            assert rl.backlog_writer.published == (6, 0)  # the next frame starts segment 6
            assert count(rl.path) == 0
        assert rl.flush()
        assert count(rl.path) == 50
        assert segments(rl.path) == []  # every sealed segment, once compacted, deleted
        state = orjson.loads((backlog(rl.path) / "state").read_bytes())
        assert (state["segment"], state["offset"]) == rl.compactor.position == (6, 0)
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
    seg = backlog(rlog.path) / backlog_mod.segment_name(1)
    assert orjson.loads((backlog(rlog.path) / "state").read_bytes()) == {"segment": 1, "offset": seg.stat().st_size}


def test_unwritable_backlog_keeps_rows_in_memory_until_it_is_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backlog_mod, "SEGMENT_BYTES", 1)  # every frame seals its segment: each write opens a file
    rl = open_log(tmp_path)
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
    monkeypatch.setattr(log_mod, "_MAX_PENDING", 5)
    db = tmp_path / "log.db"
    rl = open_log(tmp_path)
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
