"""Catalog: config entries, folder scan, GGUF memory estimate, measurements (demo models: test_demo.py)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import msgspec
import pytest
import yaml

from shardon.errors import ConfigError
from shardon.lifecycle.catalog import (
    MARGIN_MB,
    Catalog,
    Measurements,
    estimate_file_memory_mb,
    estimate_memory_mb,
    kv_cache_bytes,
    precision_tag,
    read_gguf_info,
    scan_models_dir,
)
from shardon.lifecycle.config import LifecycleConfig, ModelConfig
from shardon.lifecycle.tiny_gguf import write_tiny_gguf

MB = 1024 * 1024


def test_gguf_header_is_read(tiny_gguf: str) -> None:
    info = read_gguf_info(tiny_gguf)
    assert (info.architecture, info.n_layer, info.n_embd, info.n_head, info.n_head_kv) == (
        "llama",
        2,
        64,
        4,
        2,
    )
    assert info.n_embd_k_gqa == info.n_embd_v_gqa == 32  # 2 kv heads of 16
    assert info.context_length == 256
    n_vocab, n_embd, n_ff, kv = 259, 64, 128, 32
    per_layer = 2 * n_embd + n_embd * n_embd * 2 + 2 * kv * n_embd + 3 * n_ff * n_embd
    assert info.weights_bytes == 4 * (2 * n_vocab * n_embd + n_embd + 2 * per_layer)
    assert info.weights_bytes <= os.path.getsize(tiny_gguf)


def test_memory_estimate_formula(tiny_gguf: str) -> None:
    info = read_gguf_info(tiny_gguf)
    assert kv_cache_bytes(info, 256, 1) == 2 * 2 * 256 * 32 * 2
    assert kv_cache_bytes(info, 256, 4) == 4 * kv_cache_bytes(info, 256, 1)
    expected = math.ceil((info.weights_bytes + kv_cache_bytes(info, 4096, 2)) * 1.1 / MB) + MARGIN_MB
    assert estimate_memory_mb(info, 4096, 2) == expected
    need, weights = estimate_file_memory_mb(tiny_gguf, 4096, 2)
    assert need == expected and weights == math.ceil(info.weights_bytes / MB)


def test_estimate_scales_with_context(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "wide.gguf", n_embd=256, n_head=4, n_head_kv=4, n_layer=4, n_ff=256)
    small, _ = estimate_file_memory_mb(path, 1024, 1)
    big, _ = estimate_file_memory_mb(path, 65536, 1)
    # KV: 4 layers * 64k positions * (256 + 256) * 2 bytes = 256 MiB, plus 10%.
    assert big - small == pytest.approx(256 * 1.1 - 1024 / 65536 * 256 * 1.1, abs=2)


def test_estimate_falls_back_on_file_size(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * (10 * MB))
    need, weights = estimate_file_memory_mb(str(junk), 4096, 1)
    assert weights == 10 and need == math.ceil(10 * 1.25) + MARGIN_MB


def test_precision_tags() -> None:
    assert precision_tag("/m/llama-3-8b-Q4_K_M.gguf") == "Q4_K_M"
    assert precision_tag("llama.q8_0.gguf") == "Q8_0"
    assert precision_tag("x-F16.gguf") == "F16"
    assert precision_tag("x-IQ2_XXS-00001-of-00002.gguf") == "IQ2_XXS"
    assert precision_tag("plain.gguf") is None


def test_scan_groups_variants_and_skips_shards_and_projectors(tmp_path: Path) -> None:
    for name in [
        "llama-3-8b-Q4_K_M.gguf",
        "llama-3-8b-Q8_0.gguf",
        "big-Q4_K_M-00001-of-00002.gguf",
        "big-Q4_K_M-00002-of-00002.gguf",
        "mmproj-vision-f16.gguf",
        "plain.gguf",
        "notes.txt",
    ]:
        (tmp_path / name).write_bytes(b"x")
    found = scan_models_dir(str(tmp_path))
    assert set(found) == {"llama-3-8b", "big", "plain"}
    assert set(found["llama-3-8b"]) == {"Q4_K_M", "Q8_0"}
    assert found["big"] == {"Q4_K_M": str(tmp_path / "big-Q4_K_M-00001-of-00002.gguf")}
    assert found["plain"] == {"DEFAULT": str(tmp_path / "plain.gguf")}
    assert scan_models_dir(str(tmp_path / "missing")) == {}


def test_catalog_from_config_and_scan(tmp_path: Path) -> None:
    (tmp_path / "scanned-Q4_K_M.gguf").write_bytes(b"x")
    (tmp_path / "shadowed.gguf").write_bytes(b"x")
    cfg = LifecycleConfig(
        models_dir=str(tmp_path),
        demo=False,
        models=[
            ModelConfig(name="chat", files={"q4_k_m": "/m/a-Q4.gguf", "F16": "/m/a-F16.gguf"}, aliases=["c"]),
            ModelConfig(name="other", path=str(tmp_path / "shadowed.gguf"), pinned=True, slots=4),
        ],
    )
    cat = Catalog.build(cfg)
    assert set(cat.entries) == {"chat", "other", "scanned"}
    assert cat.entries["chat"].files == {"Q4_K_M": "/m/a-Q4.gguf", "F16": "/m/a-F16.gguf"}
    assert cat.resolve("c") == "chat" and cat.resolve("chat") == "chat" and cat.resolve("x") is None
    assert cat.entries["other"].pinned and cat.entries["other"].slots == 4
    assert cat.entries["scanned"].source == "scan" and set(cat.entries["scanned"].files) == {"Q4_K_M"}


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([ModelConfig(name="a", path="/x"), ModelConfig(name="a", path="/y")], "used twice"),
        (
            [ModelConfig(name="a", path="/x"), ModelConfig(name="b", path="/y", aliases=["a"])],
            "already names",
        ),
        ([ModelConfig(name="a", path="/x", backend="ollama")], "backend"),
        ([ModelConfig(name="a")], "give a path or files"),
        ([ModelConfig(name="a", files={"Q4_K_M": "/x"}, precision="Q8_0")], "precision"),
        (
            [ModelConfig(name="a", path="/x", default_max_tokens=600, max_tokens_cap=500)],
            r"models\[a\]\.default_max_tokens: 600 is above max_tokens_cap \(500\)",
        ),
        (
            [ModelConfig(name="a", path="/x", request_defaults={"temperature": 0.1, "max_tokens": 9, "model": "b"})],
            r"models\[a\]\.request_defaults: max_tokens, model cannot be set here",
        ),
    ],
)
def test_catalog_config_errors(models: list[ModelConfig], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        Catalog.build(LifecycleConfig(models_dir=str(tmp_path), demo=False, models=models))


def test_yaml_shape_decodes() -> None:
    doc = yaml.safe_load(
        """
models_dir: ~/.local/share/shardon/models
models:
  - name: tiny-chat
    path: /models/tiny-q4.gguf
    backend: llama-cpp-python
    context: 4096
    slots: 1
    idle_ttl_s: 300
    pinned: false
    gpu_group: fast
    memory_mb: null
    default_max_tokens: 256
    max_tokens_cap: 1024
    chat: false
    request_defaults: {temperature: 0.2, top_p: 0.9}
gpus:
  groups: {fast: [0, 1], small: [2]}
  reserve_mb: 1024
  cpu_memory_budget_mb: 8192
"""
    )
    cfg = msgspec.convert(doc, LifecycleConfig)
    assert cfg.models[0].gpu_group == "fast" and cfg.gpus.groups == {"fast": [0, 1], "small": [2]}
    assert (cfg.models[0].default_max_tokens, cfg.models[0].max_tokens_cap, cfg.models[0].chat) == (256, 1024, False)
    entry = Catalog.build(msgspec.structs.replace(cfg, demo=False, models_dir="/nonexistent")).entries["tiny-chat"]
    assert (entry.default_max_tokens, entry.max_tokens_cap, entry.chat) == (256, 1024, False)
    assert entry.request_defaults == (("temperature", 0.2), ("top_p", 0.9))
    assert cfg.python == sys.executable and cfg.demo is True
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"models": [{"name": "a", "path": "/x", "typo": 1}]}, LifecycleConfig)
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int` >= 1 - at `\$.models\[0\].default_max_tokens`"):
        msgspec.convert({"models": [{"name": "a", "path": "/x", "default_max_tokens": 0}]}, LifecycleConfig)


def test_measurements_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "m.json")
    m = Measurements(path)
    m.update("k", memory_mb=123, load_s=1.5)
    assert Measurements(path).get("k") == {"memory_mb": 123, "load_s": 1.5}
    (tmp_path / "bad.json").write_text("{not json")
    assert Measurements(str(tmp_path / "bad.json")).data == {}


def test_header_parser_agrees_with_gguf_reader(tiny_gguf: str) -> None:
    """Shardon's streaming header parse (which skips vocabularies) reads what gguf's reader reads."""
    from gguf import GGUFReader

    from shardon.lifecycle.catalog import _read_gguf_header, read_gguf_info

    reader = GGUFReader(tiny_gguf)
    info = read_gguf_info(tiny_gguf)
    assert info.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert info.n_layer == int(reader.fields["llama.block_count"].contents())
    assert info.n_embd == int(reader.fields["llama.embedding_length"].contents())
    meta, data_start = _read_gguf_header(tiny_gguf)
    assert data_start == reader.data_offset
    assert meta["tokenizer.ggml.tokens"] is None  # the vocabulary was skipped, not decoded
    assert meta["general.architecture"] == "llama"
