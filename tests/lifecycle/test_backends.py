"""Backend profiles, process start/readiness/stop, stale clean-up (with the fake backend)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardon.lifecycle import backends as bk
from shardon.lifecycle.catalog import CatalogEntry
from tests.lifecycle.helpers import FAKE_BACKEND, alive, fake_command, kill_group

pytestmark = pytest.mark.timeout(60)


def entry(backend: str = "llama-cpp-python", **kw: object) -> CatalogEntry:
    return CatalogEntry(name="m", aliases=(), backend=backend, files={"Q4": "/m.gguf"}, **kw)  # type: ignore[arg-type]


def test_llama_cpp_python_profile() -> None:
    e = entry(context=2048, slots=4, args=("--n_threads", "2"))
    spec = bk.build_launch(e, "/m.gguf", port=9, devices=(), python="/py")
    assert spec.argv[:3] == ("/py", "-m", "llama_cpp.server")
    a = list(spec.argv)
    for flag, value in [("--model", "/m.gguf"), ("--port", "9"), ("--host", "127.0.0.1"),
                        ("--interrupt_requests", "false"), ("--n_ctx", "2048"), ("--n_gpu_layers", "0"),
                        ("--model_alias", "m"), ("--n_threads", "2")]:  # fmt: skip
        assert a[a.index(flag) + 1] == value
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "" and spec.ready_path == "/v1/models"
    assert spec.slots == 1 and spec.url == "http://127.0.0.1:9" and spec.served_name == "m"
    gpu = bk.build_launch(entry(), "/m.gguf", port=9, devices=(0, 2), python="/py")
    assert gpu.env["CUDA_VISIBLE_DEVICES"] == "0,2" and gpu.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert gpu.argv[gpu.argv.index("--n_gpu_layers") + 1] == "-1"


def _fake_exe(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    exe = tmp_path / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return str(exe)


def test_llama_server_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(bk.BackendFailed, match="llama-server is not installed"):
        bk.build_launch(entry("llama-server"), "/m.gguf", port=9, devices=(), python="/py")
    exe = _fake_exe(tmp_path, "llama-server", monkeypatch)
    spec = bk.build_launch(entry("llama-server", context=4096, slots=4), "/m.gguf", port=9, devices=(1,), python="/p")
    a = list(spec.argv)
    assert a[0] == exe and a[a.index("-c") + 1] == "16384" and a[a.index("-np") + 1] == "4"
    assert a[a.index("-ngl") + 1] == "999" and spec.ready_path == "/health" and spec.slots == 4


def test_vllm_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(bk.BackendFailed, match="vllm is not installed"):
        bk.build_launch(entry("vllm"), "/m", port=9, devices=(0,), python="/py")
    _fake_exe(tmp_path, "vllm", monkeypatch)
    spec = bk.build_launch(entry("vllm", slots=8), "/m", port=9, devices=(0, 1), python="/p", gpu_memory_fraction=0.5)
    a = list(spec.argv)
    assert a[1:3] == ["serve", "/m"] and a[a.index("--tensor-parallel-size") + 1] == "2"
    assert a[a.index("--gpu-memory-utilization") + 1] == "0.500" and a[a.index("--max-num-seqs") + 1] == "8"
    assert a[a.index("--served-model-name") + 1] == "m" and spec.ready_path == "/health"


def test_custom_command_template() -> None:
    e = entry(command=("{python}", "srv.py", "--port", "{port}", "--m", "{model_path}", "--ctx", "{context}"))
    spec = bk.build_launch(e, "/m.gguf", port=77, devices=(), python="/py")
    assert spec.argv == ("/py", "srv.py", "--port", "77", "--m", "/m.gguf", "--ctx", "4096")


def test_free_port_is_bindable() -> None:
    import socket

    port = bk.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _spawn(tmp_path: Path, mode: str, *extra: str) -> bk.BackendProcess:
    port = bk.free_port()
    argv = tuple(a.format(port=port) for a in fake_command(mode, *extra))
    spec = bk.LaunchSpec(argv, {"CUDA_VISIBLE_DEVICES": ""}, "127.0.0.1", port, "/v1/models", "m", 1)
    log_path, pid_file = str(tmp_path / "logs" / "m.log"), str(tmp_path / "pids" / "m.json")
    return bk.spawn(spec, log_path=log_path, pid_file=pid_file, model="m")


def test_spawn_ready_and_stop(tmp_path: Path) -> None:
    proc = _spawn(tmp_path, "ok", "--ready-after", "0.2")
    try:
        record = json.loads(Path(proc.pid_file).read_text())
        assert record["pid"] == proc.pid and record["cmdline"] == list(proc.spec.argv)
        assert record["start_time"] == bk.proc_start_time(proc.pid)
        assert os.getpgid(proc.pid) == proc.pid  # its own process group
        took = asyncio.run(bk.wait_ready(proc, stall_timeout_s=5, ready_timeout_s=10))
        assert 0.15 < took < 5
        assert bk.group_pids(proc.pgid) == {proc.pid} and proc.rss_mb() > 1
        rc = asyncio.run(bk.stop(proc, grace_s=3))
        assert rc == -signal.SIGTERM and not os.path.exists(proc.pid_file)
    finally:
        kill_group(proc.pid)
        proc.popen.wait()


def test_readiness_is_noticed_quickly(tmp_path: Path) -> None:
    proc = _spawn(tmp_path, "ok")
    try:
        t0 = time.monotonic()
        asyncio.run(bk.wait_ready(proc, stall_timeout_s=5, ready_timeout_s=10))
        # Python start-up of the fake (~50-150 ms) plus at most one 20 ms poll.
        assert time.monotonic() - t0 < 1.5
    finally:
        bk.stop_blocking(proc, 2)


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("crash", {"stall_timeout_s": 5, "ready_timeout_s": 10}, "crashed during start-up"),
        ("stall", {"stall_timeout_s": 0.5, "ready_timeout_s": 10}, "stalled"),
    ],
)
def test_readiness_failures(tmp_path: Path, mode: str, kwargs: dict[str, float], message: str) -> None:
    proc = _spawn(tmp_path, mode)
    try:
        t0 = time.monotonic()
        with pytest.raises(bk.BackendFailed, match=message):
            asyncio.run(bk.wait_ready(proc, **kwargs))
        assert time.monotonic() - t0 < 3
        assert "fake backend starting" in proc.log_tail()
    finally:
        bk.stop_blocking(proc, 1)


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    proc = _spawn(tmp_path, "ok", "--ignore-term")
    try:
        asyncio.run(bk.wait_ready(proc, stall_timeout_s=5, ready_timeout_s=10))
        t0 = time.monotonic()
        assert asyncio.run(bk.stop(proc, grace_s=0.3)) == -signal.SIGKILL
        assert 0.25 < time.monotonic() - t0 < 3
    finally:
        bk.stop_blocking(proc, 0)


def test_stop_kills_the_whole_group(tmp_path: Path) -> None:
    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); print('up', flush=True); time.sleep(60)"
    spec = bk.LaunchSpec((sys.executable, "-c", script), {}, "127.0.0.1", 1, "/", "m", 1)
    proc = bk.spawn(spec, log_path=str(tmp_path / "l.log"), pid_file=str(tmp_path / "p.json"), model="m")
    try:
        deadline = time.monotonic() + 5
        while len(bk.group_pids(proc.pgid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        members = bk.group_pids(proc.pgid)
        assert len(members) == 2
        bk.stop_blocking(proc, 2)
        time.sleep(0.1)
        assert not any(alive(p) for p in members)
    finally:
        kill_group(proc.pgid)
        proc.popen.wait()


def _write_pid_file(path: Path, popen: subprocess.Popen[bytes], argv: list[str], **extra: object) -> None:
    record = {"model": "m", "pid": popen.pid, "pgid": popen.pid, "cmdline": argv}
    record.update(extra)
    path.write_text(json.dumps(record))


def test_cleanup_stale(tmp_path: Path) -> None:
    argv = [sys.executable, FAKE_BACKEND, "--port", "1", "--mode", "stall"]
    stale = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    kept = subprocess.Popen(["sleep", "30"], start_new_session=True)
    owned = subprocess.Popen(["sleep", "30"], start_new_session=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        time.sleep(0.2)
        d = tmp_path / "backends"
        d.mkdir()
        _write_pid_file(d / "stale.json", stale, argv, owner_pid=gone.pid)
        # pid reused by an unrelated process: neither command line nor start time match.
        _write_pid_file(d / "reused.json", kept, ["python", "other"], start_time=1)
        # started by a Shardon that is still running (this test process, seen from another pid).
        _write_pid_file(d / "owned.json", owned, ["sleep", "30"], owner_pid=os.getppid(),
                        owner_start_time=bk.proc_start_time(os.getppid()))  # fmt: skip
        _write_pid_file(d / "dead.json", gone, ["true"])
        (d / "garbage.json").write_text("{")
        stopped = bk.cleanup_stale(str(d), grace_s=3)
        assert [r["pid"] for r in stopped] == [stale.pid]
        assert stale.wait(5) == -signal.SIGTERM
        assert kept.poll() is None and owned.poll() is None
        assert sorted(p.name for p in d.iterdir()) == ["owned.json"]
    finally:
        for p in (stale, kept, owned):
            p.kill()
            p.wait()


def test_proc_helpers() -> None:
    me = os.getpid()
    assert bk.proc_alive(me) and bk.proc_cmdline(me) and bk.proc_start_time(me)
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not bk.proc_alive(gone.pid) and bk.proc_cmdline(gone.pid) is None
