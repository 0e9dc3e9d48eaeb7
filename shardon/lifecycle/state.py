"""The lifecycle's state: its errors, the endpoint of a ready backend, per-model runtime and usage,
the status tables the admin API shows, and the model files' hashes (computed once, kept on disk)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import msgspec

from shardon.errors import NoCapacity
from shardon.lifecycle import backends as bk
from shardon.lifecycle.catalog import CatalogEntry
from shardon.lifecycle.gpus import CPU_INDEX, Device, GpuInventory
from shardon.lifecycle.placement import Plan

__all__ = [
    "BackendEndpoint",
    "InsufficientMemoryError",
    "ModelLoadError",
    "Runtime",
    "ShaCache",
    "Usage",
    "gpu_table",
    "model_rows",
]


class ModelLoadError(NoCapacity):
    """A model could not be made ready (insufficient memory, backend crashed, not ready in time)."""

    code = "model_load_failed"


class InsufficientMemoryError(ModelLoadError):
    code = "insufficient_memory"


class BackendEndpoint(msgspec.Struct, frozen=True):
    node_id: str
    url: str  # base URL, e.g. http://127.0.0.1:41234 (append /v1/chat/completions)
    model: str  # public (canonical) name
    served_name: str  # what to put in the forwarded request's "model"
    slots: int
    backend: str
    model_file_sha256: str | None


class Usage:
    """Written on the gateway's loop only; read (racily, harmlessly) by the lifecycle thread."""

    __slots__ = ("count", "heat", "in_flight", "last_used")

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_used: float | None = None  # monotonic
        self.heat = 0.0  # decayed request count, as of last_used
        self.count = 0


@dataclass
class Runtime:
    """Per-model state, owned by the lifecycle thread."""

    entry: CatalogEntry
    state: str = "unloaded"
    gen: int = 0
    proc: bk.BackendProcess | None = None
    plan: Plan | None = None
    endpoint: BackendEndpoint | None = None
    error: str | None = None
    load_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    ready_at: float = 0.0
    load_time_s: float | None = None
    measured_mb: int = 0
    last_footprint: float = 0.0
    measure_key: str | None = None
    sha_task: asyncio.Future[str | None] | None = None
    failures: int = 0  # consecutive, for the pinned models' retry back-off
    abort: bool = False  # set with load_task.cancel(): checked at each step of the load


def where(plan: Plan | None) -> str | None:
    """Where a model runs, as the admin API shows it: ``cpu`` or ``<group>:<gpu>,...``."""
    if plan is None:
        return None
    if plan.devices == (CPU_INDEX,):
        return "cpu"
    return f"{plan.group}:{','.join(str(d) for d in plan.devices)}"


def model_rows(runtimes: dict[str, Runtime]) -> list[dict[str, Any]]:
    """One row per model (``GET /admin/models``); in-flight and last use are added on the loop."""
    rows = []
    for name, rt in runtimes.items():
        proc, plan = rt.proc, rt.plan
        rows.append(
            {
                "name": name,
                "aliases": list(rt.entry.aliases),
                "state": rt.state,
                "backend": rt.entry.backend,
                "where": where(plan),
                "memory_mb": (max(plan.memory_mb, rt.measured_mb) if plan is not None else None),
                "memory_estimate_mb": plan.memory_mb if plan is not None else None,
                "memory_measured_mb": rt.measured_mb or None,
                "in_flight": 0,
                "last_used": None,
                "pid": proc.pid if proc is not None else None,
                "url": rt.endpoint.url if rt.endpoint is not None else None,
                "precision": plan.variant if plan is not None else None,
                "pinned": rt.entry.pinned,
                "error": rt.error,
            }
        )
    return rows


def gpu_table(runtimes: dict[str, Runtime], devices: dict[int, Device], inventory: GpuInventory) -> dict[str, Any]:
    """The devices, what Shardon's models hold on each, and the groups (``GET /admin/gpus``)."""
    held: dict[int, int] = {}
    for rt in runtimes.values():
        if rt.plan is not None:
            for d in rt.plan.devices:
                held[d] = held.get(d, 0) + rt.plan.per_device_mb
    cpu = inventory.mode == "cpu"
    rows = []
    for i, dev in sorted(devices.items()):
        rows.append(
            {
                "index": "cpu" if dev.is_cpu else i,
                "name": dev.name,
                "total_mb": dev.total_mb,
                "free_mb": dev.total_mb - held.get(i, 0) if cpu else dev.free_mb,
                "used_mb": held.get(i, 0) if cpu else dev.total_mb - dev.free_mb,
                "reserved_by_models_mb": held.get(i, 0),
                "reserve_mb": 0 if cpu else inventory.reserve_mb,
                "util_pct": dev.util_pct,
            }
        )
    return {
        "mode": inventory.mode,
        "devices": rows,
        "groups": {k: ["cpu" if d == CPU_INDEX else d for d in v] for k, v in inventory.groups.items()},
    }


class ShaCache:
    """SHA-256 of model files, computed once per (path, size, mtime) and kept in the state dir."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, str] = {}
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            if isinstance(loaded, dict):
                self.data = {str(k): str(v) for k, v in loaded.items()}
        except (OSError, ValueError):
            pass

    def get(self, path: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
        with self.lock:
            if key in self.data:
                return self.data[key]
        digest = file_sha256(path)
        if digest is None:
            return None
        with self.lock:
            self.data[key] = digest
            tmp = f"{self.path}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(self.data, f, indent=1)
                os.replace(tmp, self.path)
            except OSError:
                pass
        return digest


def file_sha256(path: str) -> str | None:
    """The file's SHA-256: from a ``<file>.sha256`` sidecar when there is one, else computed."""
    sidecar = f"{path}.sha256"
    try:
        with open(sidecar, encoding="utf-8") as f:
            text = f.read().split()
        if text and len(text[0]) == 64:
            return text[0].lower()
    except OSError:
        pass
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()
