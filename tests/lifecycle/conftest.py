"""Lifecycle fixtures: a tiny real GGUF model and managers that are always torn down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardon.lifecycle.config import GpusConfig, LifecycleConfig, ModelConfig
from shardon.lifecycle.manager import LifecycleManager
from shardon.lifecycle.tiny_gguf import write_tiny_gguf
from tests.lifecycle.helpers import Events, ManagerFactory, alive, make_fake_nvml


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny llama-architecture GGUF (byte-level vocabulary, 2 layers, n_embd 64, context 256)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-F32.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_b(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny model (other weights), for swapping."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models-b") / "tiny-b.gguf", seed=1)


@pytest.fixture
def make_manager(tmp_path: Path) -> Iterator[ManagerFactory]:
    """``make(models, budget_mb=..., nvml=..., **config)`` -> (started manager, events), on the running
    loop. Every manager is closed at teardown and its backends must be gone."""
    managers: list[LifecycleManager] = []

    def make(
        models: list[ModelConfig],
        *,
        budget_mb: int = 8192,
        nvml: Any = None,
        groups: dict[str, list[int]] | None = None,
        reserve_mb: int = 0,
        state_dir: str | None = None,
        start: bool = True,
        **config: Any,
    ) -> tuple[LifecycleManager, Events]:
        config.setdefault("models_dir", str(tmp_path / "no-models"))
        config.setdefault("demo", False)
        config.setdefault("stop_grace_s", 3.0)
        cfg = LifecycleConfig(
            models=models,
            gpus=GpusConfig(groups=groups or {}, reserve_mb=reserve_mb, cpu_memory_budget_mb=budget_mb),
            **config,
        )
        events = Events()
        mgr = LifecycleManager(
            cfg,
            state_dir=state_dir or str(tmp_path / f"state{len(managers)}"),
            loop=asyncio.get_running_loop(),
            on_ready=events.on_ready,
            on_stopped=events.on_stopped,
            nvml=nvml if nvml is not None else make_fake_nvml([], fail_init=True),
        )
        managers.append(mgr)
        if start:
            mgr.start()
        return mgr, events

    yield make
    for mgr in managers:
        pids = [row["pid"] for row in mgr.models_status() if row["pid"]]
        mgr.close()
        for pid in pids:
            assert not alive(pid), f"backend {pid} survived close()"
