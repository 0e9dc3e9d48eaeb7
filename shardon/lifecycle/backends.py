"""Backend processes: launch profiles, start, readiness, stop, pid files, stale clean-up.

Profiles (``build_launch``):

- ``llama-cpp-python`` (default): ``python -m llama_cpp.server`` (one model, requests serialised:
  one slot; ``--interrupt_requests false`` so a new request never cuts a running stream). Ready when
  ``GET /v1/models`` answers 200.
- ``llama-server`` (llama.cpp's binary, when on PATH): ``-c context*slots -np slots``. Ready when
  ``GET /health`` answers 200 (it answers 503 while loading).
- ``vllm``: ``vllm serve``, tensor parallel over the placed GPUs, ``--gpu-memory-utilization`` from the
  placement. Ready when ``GET /health`` answers 200.

A model's ``command`` replaces the profile's command line (placeholders ``{python} {model_path} {host}
{port} {context} {slots} {name} {n_gpu_layers}``); readiness still follows its ``backend``.

Processes run in their own session/process group, stdout+stderr to ``<state>/logs/<model>.log``,
``CUDA_VISIBLE_DEVICES`` set from the placement (empty on CPU), and a pid file
``<state>/backends/<model>.json`` recording pid, process group, command line and start time, and the
owning Shardon process. :func:`cleanup_stale` stops backends left by a Shardon that died.

Readiness (:func:`wait_ready`) polls the health URL every 20 ms; it fails at once if the process
exits, when its log and its disk reads stop growing for ``stall_timeout_s``, or after
``ready_timeout_s`` in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shardon.lifecycle.catalog import CatalogEntry

log = logging.getLogger("shardon.lifecycle")

HOST = "127.0.0.1"
POLL_S = 0.02
PROBE_TIMEOUT_S = 2.0

READY_PATHS = {"llama-cpp-python": "/v1/models", "llama-server": "/health", "vllm": "/health"}


class BackendFailed(Exception):
    """A backend could not be started or did not become ready; the message says why."""


@dataclass(frozen=True)
class LaunchSpec:
    argv: tuple[str, ...]
    env: dict[str, str]
    host: str
    port: int
    ready_path: str
    served_name: str
    slots: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def build_launch(
    entry: CatalogEntry,
    model_path: str,
    *,
    port: int,
    devices: Sequence[int],
    python: str,
    gpu_memory_fraction: float | None = None,
    host: str = HOST,
) -> LaunchSpec:
    """The command line, environment and readiness probe of ``entry``'s backend. ``devices`` are NVML
    GPU indices; empty means CPU only."""
    gpu = [d for d in devices if d >= 0]
    env = {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # so CUDA's numbering is NVML's
        "CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in gpu),
    }
    kind = entry.backend
    slots = 1 if kind == "llama-cpp-python" else entry.slots
    n_gpu_layers = "-1" if gpu else "0"
    if entry.command:
        values = {
            "python": python,
            "model_path": model_path,
            "host": host,
            "port": str(port),
            "context": str(entry.context),
            "slots": str(entry.slots),
            "name": entry.name,
            "n_gpu_layers": n_gpu_layers,
        }
        argv = [arg.format(**values) for arg in entry.command]
    elif kind == "llama-cpp-python":
        argv = [
            python, "-m", "llama_cpp.server",
            "--model", model_path,
            "--model_alias", entry.name,
            "--host", host,
            "--port", str(port),
            "--interrupt_requests", "false",
            "--n_ctx", str(entry.context),
            "--n_gpu_layers", n_gpu_layers,
        ]  # fmt: skip
    elif kind == "llama-server":
        exe = shutil.which("llama-server")
        if exe is None:
            raise BackendFailed("backend llama-server is not installed (no llama-server on PATH)")
        argv = [
            exe,
            "-m", model_path,
            "--alias", entry.name,
            "--host", host,
            "--port", str(port),
            "-c", str(entry.context * entry.slots),
            "-np", str(entry.slots),
            "-ngl", "999" if gpu else "0",
        ]  # fmt: skip
    elif kind == "vllm":
        exe = shutil.which("vllm")
        if exe is None:
            raise BackendFailed("backend vllm is not installed (no vllm on PATH)")
        argv = [
            exe, "serve", model_path,
            "--served-model-name", entry.name,
            "--host", host,
            "--port", str(port),
            "--max-model-len", str(entry.context),
            "--max-num-seqs", str(entry.slots),
            "--tensor-parallel-size", str(max(1, len(gpu))),
        ]  # fmt: skip
        if gpu_memory_fraction is not None:
            argv += ["--gpu-memory-utilization", f"{min(max(gpu_memory_fraction, 0.05), 0.95):.3f}"]
    else:
        raise BackendFailed(f"unknown backend {kind!r}")
    argv += list(entry.args)
    return LaunchSpec(
        argv=tuple(argv),
        env=env,
        host=host,
        port=port,
        ready_path=READY_PATHS.get(kind, "/v1/models"),
        served_name=entry.name,
        slots=slots,
    )


# ------------------------------------------------------------------------------------- /proc helpers


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, the state, first)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[-1].split()


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the pid, a unique identity)."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def proc_state(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[0].decode() if fields else None


def proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [p.decode("utf-8", "surrogateescape") for p in raw.split(b"\0")[:-1]]


def proc_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _proc_read_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            for line in f:
                if line.startswith(b"read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def group_pids(pgid: int) -> set[int]:
    """Live processes of process group ``pgid``."""
    pids: set[int] = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return pids
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
            if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                pids.add(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def group_rss_mb(pgid: int) -> int:
    total_kb = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total_kb += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total_kb // 1024


# ---------------------------------------------------------------------------------------- processes


class BackendProcess:
    """One running backend: its Popen, process group, log and pid file."""

    def __init__(self, popen: subprocess.Popen[bytes], spec: LaunchSpec, log_path: str, pid_file: str) -> None:
        self.popen = popen
        self.spec = spec
        self.pid = popen.pid
        self.pgid = popen.pid  # start_new_session: the child leads its own group
        self.log_path = log_path
        self.pid_file = pid_file
        self.started = time.monotonic()

    def poll(self) -> int | None:
        return self.popen.poll()

    def log_size(self) -> int:
        try:
            return os.stat(self.log_path).st_size
        except OSError:
            return 0

    def progress_marker(self) -> tuple[int, int]:
        return self.log_size(), _proc_read_bytes(self.pid)

    def log_tail(self, limit: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, self.log_size() - limit))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def rss_mb(self) -> int:
        return group_rss_mb(self.pgid)


def _rotate(path: str) -> None:
    if os.path.exists(path):
        with contextlib.suppress(OSError):
            os.replace(path, f"{path}.1")


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a pre-exec hook asking the kernel to SIGTERM the backend when Shardon dies.

    Backends run in their own process group (so a stop reaches all their children), which also
    means a Shardon killed with SIGKILL would leave them running; the pid files let the next start
    clean up, and this makes the kernel do it at once. The libc function is looked up here, before
    any fork: the hook itself only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return hook


_PDEATHSIG = _parent_death_signal()


def spawn(spec: LaunchSpec, *, log_path: str, pid_file: str, model: str) -> BackendProcess:
    """Start the backend in its own session with output to ``log_path``; write its pid file."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    os.makedirs(os.path.dirname(pid_file), exist_ok=True)
    _rotate(log_path)
    env = dict(os.environ)
    env.update(spec.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "wb") as logf:
        try:
            popen = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
                preexec_fn=_PDEATHSIG,
            )
        except OSError as exc:
            raise BackendFailed(f"cannot start backend {spec.argv[0]!r}: {exc}") from exc
    proc = BackendProcess(popen, spec, log_path, pid_file)
    record = {
        "model": model,
        "pid": popen.pid,
        "pgid": popen.pid,
        "cmdline": list(spec.argv),
        "start_time": proc_start_time(popen.pid),
        "port": spec.port,
        "owner_pid": os.getpid(),
        "owner_start_time": proc_start_time(os.getpid()),
        "started_at": time.time(),
    }
    tmp = f"{pid_file}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, pid_file)
    return proc


async def probe(host: str, port: int, path: str, timeout: float = PROBE_TIMEOUT_S) -> int | None:
    """HTTP status of ``GET path``, or None when nothing answers."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (TimeoutError, OSError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), timeout)
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith(b"HTTP/"):
            return int(parts[1])
        return None
    except (TimeoutError, OSError, ValueError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def wait_ready(
    proc: BackendProcess,
    *,
    stall_timeout_s: float,
    ready_timeout_s: float,
    poll_s: float = POLL_S,
    abort: Callable[[], bool] | None = None,
) -> float:
    """Poll until the backend answers its readiness probe with 200; returns the seconds it took.
    Raises :class:`BackendFailed` when it exits, stalls or runs out of time, and CancelledError as soon
    as ``abort()`` is true (a belt to task cancellation, which ``asyncio.wait_for`` can swallow)."""
    spec = proc.spec
    start = time.monotonic()
    last_marker = proc.progress_marker()
    last_progress = start
    while True:
        if abort is not None and abort():
            raise asyncio.CancelledError
        rc = proc.poll()
        if rc is not None:
            raise BackendFailed(f"backend crashed during start-up (exit code {rc}): {proc.log_tail()}")
        status = await probe(spec.host, spec.port, spec.ready_path)
        if status == 200:
            return time.monotonic() - start
        now = time.monotonic()
        marker = proc.progress_marker()
        if marker != last_marker:
            last_marker, last_progress = marker, now
        elif now - last_progress > stall_timeout_s:
            raise BackendFailed(
                f"backend stalled: not ready and no output for {stall_timeout_s:g} s: {proc.log_tail(600)}"
            )
        if now - start > ready_timeout_s:
            raise BackendFailed(f"backend not ready in time ({ready_timeout_s:g} s): {proc.log_tail(600)}")
        await asyncio.sleep(poll_s)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


async def stop(proc: BackendProcess, grace_s: float) -> int | None:
    """SIGTERM to the group, SIGKILL after ``grace_s``, reap; remove the pid file."""
    try:
        if proc.poll() is None:
            proc.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
        # SIGKILL whatever is left of the group (workers may outlive their parent).
        proc.signal_group(signal.SIGKILL)
        if proc.poll() is None:
            deadline = time.monotonic() + 5.0
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
        return proc.poll()
    finally:
        _remove(proc.pid_file)


def stop_blocking(proc: BackendProcess, grace_s: float) -> int | None:
    """The same as :func:`stop`, for a caller without an event loop."""
    try:
        if proc.poll() is None:
            proc.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(grace_s)
        proc.signal_group(signal.SIGKILL)
        try:
            return proc.popen.wait(5.0)
        except subprocess.TimeoutExpired:
            return None
    finally:
        _remove(proc.pid_file)


# ------------------------------------------------------------------------------------ stale clean-up


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc_alive(pid):
            return True
        time.sleep(POLL_S)
    return not proc_alive(pid)


def cleanup_stale(backends_dir: str, grace_s: float = 10.0) -> list[dict[str, object]]:
    """Stop the backends a crashed Shardon left running; returns the records of those stopped.

    A pid file names a stale backend when its process is alive and is the very process that was
    started (same start time, or same command line), and the Shardon that started it is gone (a
    Shardon still running with the same state dir keeps its backends). Pid files of dead processes
    are removed.
    """
    stopped: list[dict[str, object]] = []
    root = Path(backends_dir)
    if not root.is_dir():
        return stopped
    me = os.getpid()
    for pid_file in sorted(root.glob("*.json")):
        try:
            record = json.loads(pid_file.read_text(encoding="utf-8"))
            pid = int(record["pid"])
            pgid = int(record.get("pgid", pid))
        except (OSError, ValueError, KeyError, TypeError):
            _remove(str(pid_file))
            continue
        owner = record.get("owner_pid")
        if (
            isinstance(owner, int)
            and owner != me
            and proc_alive(owner)
            and record.get("owner_start_time") in (None, proc_start_time(owner))
        ):
            log.info("lifecycle: %s belongs to running Shardon pid %d; left alone", pid_file.name, owner)
            continue
        if proc_alive(pid):
            started = record.get("start_time")
            same_start = started is not None and started == proc_start_time(pid)
            same_cmd = record.get("cmdline") == proc_cmdline(pid)
            if same_start or same_cmd:
                log.warning("lifecycle: stopping stale backend pid %d (%s)", pid, record.get("model"))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGTERM)
                if not _wait_gone(pid, grace_s):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
                    _wait_gone(pid, 5.0)
                stopped.append(record)
        _remove(str(pid_file))
    return stopped
