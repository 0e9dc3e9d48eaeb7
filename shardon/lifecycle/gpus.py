"""GPU inventory through NVML (``pynvml``), or one CPU pseudo-device when there is no GPU.

With NVML the devices are the GPUs, grouped as configured (``gpus.groups``; a GPU outside every
configured group is not used; no groups configured: one group ``all``), each keeping ``reserve_mb``
free for others. Without NVML (not installed, no driver, no GPU) the inventory has one pseudo-device,
index ``-1`` named ``cpu``, whose size is ``cpu_memory_budget_mb``, in a group ``cpu``: placement
and eviction run the same code either way.

The NVML module is injectable (``nvml=``): tests pass a fake with the same functions.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from shardon.lifecycle.config import GpusConfig

log = logging.getLogger("shardon.lifecycle")

CPU_INDEX = -1
MB = 1024 * 1024


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    total_mb: int
    free_mb: int
    util_pct: int | None = None

    @property
    def is_cpu(self) -> bool:
        return self.index == CPU_INDEX


def _load_pynvml() -> Any:
    import pynvml

    return pynvml


class GpuInventory:
    """Devices and groups. ``refresh()`` queries NVML (blocking, sub-millisecond per device): call it
    from the lifecycle thread, never from the event loop."""

    def __init__(self, config: GpusConfig, nvml: Any = None) -> None:
        self.config = config
        self.reserve_mb = config.reserve_mb
        self.mode = "cpu"
        self.reason = ""
        self._nvml: Any = None
        self._handles: dict[int, Any] = {}
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()
        try:
            module = nvml if nvml is not None else _load_pynvml()
            module.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError (no driver / library), anything else
            self.reason = f"NVML unavailable ({exc.__class__.__name__}: {exc})".strip()
            log.info("lifecycle: %s; CPU-only mode with a %d MB budget", self.reason, config.cpu_memory_budget_mb)
        else:
            try:
                count = int(module.nvmlDeviceGetCount())
                for i in range(count):
                    handle = module.nvmlDeviceGetHandleByIndex(i)
                    self._handles[i] = handle
                    name = module.nvmlDeviceGetName(handle)
                    self._names[i] = name.decode() if isinstance(name, bytes) else str(name)
            except Exception as exc:
                self.reason = f"NVML query failed ({exc})"
                self._handles.clear()
            if self._handles:
                self._nvml = module
                self.mode = "nvml"
            else:
                self.reason = self.reason or "NVML found no GPU"
                with contextlib.suppress(Exception):
                    module.nvmlShutdown()
                log.info("lifecycle: %s; CPU-only mode", self.reason)
        self.groups: dict[str, tuple[int, ...]] = self._build_groups()

    # -------------------------------------------------------------------------------------- groups

    def _build_groups(self) -> dict[str, tuple[int, ...]]:
        if self.mode == "cpu":
            return {"cpu": (CPU_INDEX,)}
        present = set(self._handles)
        if not self.config.groups:
            return {"all": tuple(sorted(present))}
        groups: dict[str, tuple[int, ...]] = {}
        for name, indices in self.config.groups.items():
            kept = tuple(i for i in indices if i in present)
            missing = [i for i in indices if i not in present]
            if missing:
                log.warning("gpus.groups.%s: GPU %s not present; ignored", name, missing)
            if kept:
                groups[name] = kept
        return groups or {"all": tuple(sorted(present))}

    @property
    def indices(self) -> list[int]:
        if self.mode == "cpu":
            return [CPU_INDEX]
        return sorted({i for g in self.groups.values() for i in g})

    # ------------------------------------------------------------------------------------- queries

    def refresh(self) -> dict[int, Device]:
        """Current devices by index (total/free memory in MB, utilisation in %)."""
        if self.mode == "cpu":
            budget = self.config.cpu_memory_budget_mb
            return {CPU_INDEX: Device(CPU_INDEX, "cpu", budget, budget, None)}
        out: dict[int, Device] = {}
        with self._lock:
            nvml = self._nvml
            if nvml is None:
                return out
            for i in self.indices:
                handle = self._handles[i]
                try:
                    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                    total, free = int(mem.total) // MB, int(mem.free) // MB
                except Exception as exc:
                    log.warning("NVML memory query for GPU %d failed: %s", i, exc)
                    continue
                try:
                    util: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except Exception:
                    util = None
                out[i] = Device(i, self._names.get(i, f"gpu{i}"), total, free, util)
        return out

    def process_memory_mb(self, pids: set[int]) -> dict[int, int]:
        """GPU memory (MB) used by ``pids`` on each device, from NVML's process lists (empty if the
        driver does not tell)."""
        if self.mode == "cpu" or not pids:
            return {}
        out: dict[int, int] = {}
        with self._lock:
            nvml = self._nvml
            getter = getattr(nvml, "nvmlDeviceGetComputeRunningProcesses", None)
            if getter is None:
                return {}
            for i in self.indices:
                try:
                    procs = getter(self._handles[i])
                except Exception:
                    continue
                used = sum(int(getattr(p, "usedGpuMemory", 0) or 0) for p in procs if p.pid in pids)
                if used:
                    out[i] = used // MB
        return out

    def close(self) -> None:
        with self._lock:
            nvml, self._nvml = self._nvml, None
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
