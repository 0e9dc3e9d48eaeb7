"""GPU inventory with a fake NVML, CPU mode, and a real-NVML smoke test (skipped without a GPU)."""

from __future__ import annotations

import pytest

from shardon.lifecycle.config import GpusConfig
from shardon.lifecycle.gpus import CPU_INDEX, GpuInventory
from tests.lifecycle.helpers import make_fake_nvml


def test_devices_and_groups_from_nvml() -> None:
    nvml = make_fake_nvml([("A100", 40000, 30000), ("A100", 40000, 39000), ("T4", 16000, 1000)])
    inv = GpuInventory(GpusConfig(groups={"fast": [0, 1], "small": [2], "ghost": [7]}, reserve_mb=512), nvml=nvml)
    assert inv.mode == "nvml" and inv.reserve_mb == 512
    assert inv.groups == {"fast": (0, 1), "small": (2,)}  # GPU 7 does not exist
    devs = inv.refresh()
    assert [(d.index, d.name, d.total_mb, d.free_mb, d.util_pct) for d in devs.values()] == [
        (0, "A100", 40000, 30000, 10),
        (1, "A100", 40000, 39000, 20),
        (2, "T4", 16000, 1000, 30),
    ]
    nvml.gpus[1][2] = 100
    assert inv.refresh()[1].free_mb == 100
    inv.close()
    assert nvml.calls == ["init", "shutdown"]


def test_no_groups_configured_means_one_group_of_all() -> None:
    inv = GpuInventory(GpusConfig(), nvml=make_fake_nvml([("X", 1000, 1000), ("X", 1000, 1000)]))
    assert inv.groups == {"all": (0, 1)} and inv.indices == [0, 1]


def test_gpus_outside_configured_groups_are_not_used() -> None:
    inv = GpuInventory(GpusConfig(groups={"one": [1]}), nvml=make_fake_nvml([("X", 1000, 1000)] * 3))
    assert inv.indices == [1] and list(inv.refresh()) == [1]


def test_nvml_init_failure_means_cpu_mode() -> None:
    inv = GpuInventory(GpusConfig(cpu_memory_budget_mb=3000), nvml=make_fake_nvml([], fail_init=True))
    assert inv.mode == "cpu" and "Driver Not Loaded" in inv.reason
    assert inv.groups == {"cpu": (CPU_INDEX,)}
    dev = inv.refresh()[CPU_INDEX]
    assert (dev.name, dev.total_mb, dev.free_mb, dev.is_cpu) == ("cpu", 3000, 3000, True)
    inv.close()


def test_nvml_without_gpus_means_cpu_mode() -> None:
    nvml = make_fake_nvml([])
    inv = GpuInventory(GpusConfig(), nvml=nvml)
    assert inv.mode == "cpu" and nvml.calls == ["init", "shutdown"]


def test_failing_memory_query_skips_the_device() -> None:
    nvml = make_fake_nvml([("X", 1000, 500), ("Y", 1000, 500)])

    def broken(handle: int) -> object:
        if handle == 1:
            raise nvml.NVMLError("GPU is lost")
        return type("M", (), {"total": 1000 << 20, "free": 500 << 20})()

    nvml.nvmlDeviceGetMemoryInfo = broken
    inv = GpuInventory(GpusConfig(), nvml=nvml)
    assert list(inv.refresh()) == [0]


def test_process_memory_from_nvml() -> None:
    nvml = make_fake_nvml([("X", 1000, 500)])
    proc = type("P", (), {"pid": 42, "usedGpuMemory": 300 << 20})()
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [proc]
    inv = GpuInventory(GpusConfig(), nvml=nvml)
    assert inv.process_memory_mb({42}) == {0: 300} and inv.process_memory_mb({7}) == {}


def test_real_nvml_default_falls_back_cleanly() -> None:
    inv = GpuInventory(GpusConfig(cpu_memory_budget_mb=1234))  # real pynvml; no GPU here means CPU mode
    try:
        if inv.mode == "cpu":
            assert inv.refresh()[CPU_INDEX].total_mb == 1234
        else:
            assert inv.refresh()
    finally:
        inv.close()


def test_real_nvml_smoke() -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVML/GPU here: {exc}")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("NVML sees no GPU")
    finally:
        pynvml.nvmlShutdown()
    inv = GpuInventory(GpusConfig())
    try:
        assert inv.mode == "nvml"
        devs = inv.refresh()
        assert devs and all(0 < d.free_mb <= d.total_mb for d in devs.values())
    finally:
        inv.close()
