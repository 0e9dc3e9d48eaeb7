"""Helpers of the lifecycle tests: fake backend command, fake NVML, event recorder, waits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import types
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from shardon.lifecycle.config import ModelConfig
from shardon.lifecycle.manager import BackendEndpoint, LifecycleManager
from tests.support import until

FAKE_BACKEND = str(Path(__file__).with_name("fake_backend.py"))
MB = 1024 * 1024


def fake_command(mode: str = "ok", *extra: str) -> list[str]:
    return [sys.executable, FAKE_BACKEND, "--port", "{port}", "--mode", mode, *extra]


def fake_model(name: str, path: str, mode: str = "ok", *extra: str, **kw: Any) -> ModelConfig:
    kw.setdefault("memory_mb", 100)
    return ModelConfig(name=name, path=path, command=fake_command(mode, *extra), **kw)


class FakeNVMLError(Exception):
    pass


class FakeMemory:
    def __init__(self, total: int, free: int) -> None:
        self.total, self.free, self.used = total, free, total - free


class FakeUtil:
    def __init__(self, gpu: int) -> None:
        self.gpu, self.memory = gpu, 0


def make_fake_nvml(gpus: list[tuple[str, int, int]], *, fail_init: bool = False) -> Any:
    """A module-like fake of pynvml: ``gpus`` = [(name, total_mb, free_mb)]; ``.free`` is mutable."""
    m = types.SimpleNamespace()
    m.NVMLError = FakeNVMLError
    m.gpus = [list(g) for g in gpus]
    m.util = [10 * (i + 1) for i in range(len(gpus))]
    m.calls = []
    m.initialised = False

    def nvmlInit() -> None:
        m.calls.append("init")
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")
        m.initialised = True

    def nvmlShutdown() -> None:
        m.calls.append("shutdown")
        m.initialised = False

    def nvmlDeviceGetCount() -> int:
        return len(m.gpus)

    def nvmlDeviceGetHandleByIndex(i: int) -> int:
        if not 0 <= i < len(m.gpus):
            raise FakeNVMLError("Invalid Argument")
        return i

    def nvmlDeviceGetName(h: int) -> bytes:
        return str(m.gpus[h][0]).encode()

    def nvmlDeviceGetMemoryInfo(h: int) -> FakeMemory:
        _name, total, free = m.gpus[h]
        return FakeMemory(int(total) * MB, int(free) * MB)

    def nvmlDeviceGetUtilizationRates(h: int) -> FakeUtil:
        return FakeUtil(m.util[h])

    for fn in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetName,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetUtilizationRates,
    ):
        setattr(m, fn.__name__, fn)
    return m


class Events:
    """What the callbacks saw, in order (they run on the test's loop)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.ready: list[BackendEndpoint] = []
        self.stopped: list[tuple[str, str]] = []

    def on_ready(self, endpoint: BackendEndpoint) -> None:
        self.log.append(("ready", endpoint))
        self.ready.append(endpoint)

    def on_stopped(self, model: str, node_id: str) -> None:
        self.log.append(("stopped", (model, node_id)))
        self.stopped.append((model, node_id))


ManagerFactory = Callable[..., tuple[LifecycleManager, Events]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """`tests.support.until`, with the longer default a backend's start needs."""
    return await until(predicate, timeout)


def status_of(mgr: LifecycleManager, name: str) -> dict[str, Any]:
    return next(row for row in mgr.models_status() if row["name"] == name)


def alive(pid: int) -> bool:
    return _alive(pid)


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an ``async def`` test on a fresh asyncio loop (no plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper
