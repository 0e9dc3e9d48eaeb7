"""The access log (shardon.store.access): lines written off the event loop, by the request log's
writer or on their own; one per /v1 request end to end, whatever its outcome."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shardon.store import AccessLog, RequestRecord
from shardon.store import access as access_mod
from tests.store.store_helpers import open_log, rec
from tests.support import call, node_entry, post, wait_until

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'


def written(path: Path, n: int) -> list[str]:
    """The first ``n`` lines of ``path``, once they are there (exactly ``n``)."""

    def read() -> list[str] | None:
        got = path.read_text().splitlines() if path.exists() else []
        return got if len(got) >= n else None

    got = wait_until(read, timeout=10)
    time.sleep(0.1)  # and no more come
    assert path.read_text().splitlines() == got and len(got) == n, got
    return got


def fields(line: str) -> dict[str, str]:
    """A console line's ``key=value`` fields, and its leading ones by name."""
    head, quoted, rest = line.split('"', 2)
    when, client = head.split()
    status, duration, *pairs = rest.split()
    out = dict(pair.split("=", 1) for pair in pairs)
    out.update(time=when, client=client, request=quoted, status=status, duration=duration)
    return out


# -- the access log on its own --------------------------------------------------------------------


def test_lines_are_written_by_the_access_logs_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writers: list[str] = []
    real = AccessLog._write

    def spy(self: AccessLog, data: bytes, lines: int) -> None:
        writers.append(threading.current_thread().name)
        real(self, data, lines)

    monkeypatch.setattr(AccessLog, "_write", spy)
    path = tmp_path / "logs" / "access.log"  # the directory is created
    access = AccessLog(path, interval_s=0.02)
    access.start()
    try:
        for i in range(5):
            access.append(rec(i, finished_at=rec(i).received_at + 0.5, model="m1"))
        assert access.flush()
        got = written(path, 5)
        assert all(fields(line)["model"] == "m1" and fields(line)["duration"] == "500.0ms" for line in got)
        assert set(writers) == {"shardon-access"} and access.written == 5 and access.dropped == 0
    finally:
        access.close()
    access.append(rec(9))  # after close: dropped and counted, no exception
    assert access.dropped == 1


def test_the_request_logs_writer_hands_its_rows_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    putters: list[str] = []
    real = AccessLog.put

    def spy(self: AccessLog, payload: bytes, lengths: bytes, count: int) -> None:
        putters.append(threading.current_thread().name)
        real(self, payload, lengths, count)

    monkeypatch.setattr(AccessLog, "put", spy)
    access = AccessLog(tmp_path / "access.log", json=True, interval_s=0.02)
    access.start()
    rl = open_log(tmp_path)
    rl.access = access
    rl.start()
    try:
        for i in range(30):
            rl.append(rec(i, tenant="t"))
        assert rl.flush() and access.flush()
        got = [json.loads(line) for line in written(tmp_path / "access.log", 30)]
        assert [g["request_id"] for g in got] == [f"{rec(i).id:016x}" for i in range(30)]
        assert {g["tenant"] for g in got} == {"t"} and set(putters) == {"shardon-store-writer"}
    finally:
        rl.close()
        access.close()


def test_stderr_is_the_default_destination(capfd: pytest.CaptureFixture[str]) -> None:
    access = AccessLog(interval_s=0.02)
    access.start()
    try:
        access.append(rec(1, model="on-stderr"))
        assert access.flush()
    finally:
        access.close()
    err = capfd.readouterr().err
    assert "model=on-stderr" in err and err.endswith("\n")


def test_a_destination_that_cannot_keep_up_drops_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access_mod, "MAX_PENDING_ROWS", 50)
    stuck = threading.Event()
    release = threading.Event()
    real = AccessLog._write

    def slow(self: AccessLog, data: bytes, lines: int) -> None:
        stuck.set()
        release.wait(10)
        real(self, data, lines)

    monkeypatch.setattr(AccessLog, "_write", slow)
    access = AccessLog(tmp_path / "access.log", interval_s=0.01, batch_max=10)
    access.start()
    try:
        access.append(rec(0))
        assert stuck.wait(5)  # the thread is blocked in a write
        started = time.monotonic()
        for i in range(1, 200):
            access.append(rec(i))  # the queue holds 50 at most: the rest are refused at once
        packed = msgspec.msgpack.encode(rec(0))
        access.put(packed * 60, struct.pack("<60I", *[len(packed)] * 60), 60)  # a batch over the limit
        assert time.monotonic() - started < 2.0  # nothing waited for the destination
        assert access.dropped == 199 - 50 + 60
        assert access.pending == 50
        release.set()
        assert access.flush()
        assert access.written == 51 and len(written(tmp_path / "access.log", 51)) == 51
    finally:
        release.set()
        access.close()


def test_a_failing_destination_counts_errors_and_drops(tmp_path: Path) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    access = AccessLog("/dev/full", interval_s=0.02)
    access.start()
    try:
        for i in range(3):
            access.append(rec(i))
        assert access.flush()
        assert access.write_errors >= 1 and access.dropped == 3 and access.written == 0
        assert access.last_error is not None and "No space" in access.last_error
    finally:
        access.close()


def test_an_unopenable_file_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    access = AccessLog(tmp_path / "file" / "access.log")
    with pytest.raises(RuntimeError, match="cannot open"):
        access.start()
    access.close()


def test_close_writes_what_waits(tmp_path: Path) -> None:
    access = AccessLog(tmp_path / "access.log", interval_s=60.0)  # nothing moves on its own
    access.start()
    for i in range(7):
        access.append(RequestRecord(id=i, received_at=1.0, status=200))
    access.close()
    assert len((tmp_path / "access.log").read_text().splitlines()) == 7 and access.written == 7


# -- end to end -----------------------------------------------------------------------------------


def _leave_mid_stream(port: int) -> None:
    """A streamed request whose client reads the head and hangs up (the gateway logs a 499)."""
    body = b'{"model":"m1","prompt":"x","stream":true,"mock":{"chunks":50,"hold_after":1}}'  # held after a token
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_one_line_per_request_whatever_its_outcome(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=1, name="n")
    path = tmp_path / "access.log"
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], log={"access_log_path": str(path)})
    status, ok_headers, body = post(gw.url, "/v1/chat/completions", CHAT)
    assert status == 200
    status, missing_headers, _ = post(gw.url, "/v1/chat/completions", CHAT.replace(b"m1", b"zz"))
    assert status == 404
    _leave_mid_stream(gw.port)
    got = [fields(line) for line in written(path, 3)]
    ok = next(f for f in got if f["status"] == "200")
    missing = next(f for f in got if f["status"] == "404")
    gone = next(f for f in got if f["status"] == "499")
    assert ok["request"] == "POST /v1/chat/completions" and ok["model"] == "m1" and ok["node"] == "n"
    assert ok["tenant"] == "default" and ok["error"] == "-" and ok["client"].startswith("127.0.0.1")
    assert ok["id"] == ok_headers["x-request-id"] and int(ok["in"]) == len(CHAT) and int(ok["out"]) == len(body)
    assert ok["duration"].endswith("ms") and float(ok["duration"][:-2]) >= 0
    assert ok["time"].endswith("Z") and abs(time.time() - _unix(ok["time"])) < 60
    assert missing["model"] == "zz" and missing["node"] == "-" and missing["error"] == "model_not_found"
    assert missing["id"] == missing_headers["x-request-id"]
    assert gone["request"] == "POST /v1/completions" and gone["error"] == "client_disconnected"
    assert gone["node"] == "n"


def _unix(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_json_format_and_the_status_counters(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=1, name="n")
    path = tmp_path / "access.jsonl"
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], log={"format": "json", "access_log_path": str(path)})
    _, headers, _ = post(gw.url, "/v1/chat/completions", CHAT)
    (line,) = written(path, 1)
    entry = json.loads(line)
    assert entry["request_id"] == headers["x-request-id"] and entry["status"] == 200 and entry["method"] == "POST"
    assert entry["path"] == "/v1/chat/completions" and entry["node"] == "n" and type(entry["duration_ms"]) is float
    status, _, body = call(gw.url, "GET", "/admin/status")
    assert status == 200
    assert body["access_log"]["path"] == str(path) and body["access_log"]["written"] == 1
    assert body["access_log"]["dropped"] == 0


def test_with_the_request_log_off_lines_still_come(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=1, name="n")
    path = tmp_path / "access.log"
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], request_log=False, log={"access_log_path": str(path)})
    ids = [post(gw.url, "/v1/chat/completions", CHAT)[1]["x-request-id"] for _ in range(3)]
    assert [fields(line)["id"] for line in written(path, 3)] == ids
    assert gw.call(lambda: gw.gateway.request_log) is None


def test_access_log_off_writes_no_line(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=1, name="n")
    path = tmp_path / "access.log"
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])], log={"access_log": False, "access_log_path": str(path)})
    for body in (CHAT, CHAT.replace(b"m1", b"zz")):
        post(gw.url, "/v1/chat/completions", body)
    status, _, page = call(gw.url, "GET", "/admin/requests")
    assert status == 200 and page["total"] == 2  # both ended (their rows are logged)
    assert "access_log" not in call(gw.url, "GET", "/admin/status")[2]
    gw.stop()
    assert not path.exists()
