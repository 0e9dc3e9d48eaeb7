"""The model catalog: what can be loaded, from which files, with which backend and how much memory.

Entries come from the configuration (``models:``), from a scan of ``models_dir`` for ``*.gguf``
files, and from the demo packages that are installed (``demo.py``). Scanned files whose names end in
a precision tag (``llama-3-8b-Q4_K_M.gguf``, ``llama-3-8b.Q8_0.gguf``) are grouped into one model with
one file per precision variant; only the first shard of a split model (``-00001-of-0000N.gguf``) is
listed; ``mmproj`` files are skipped. A configured model hides a scanned or demo one with the same
name or the same file.

The memory a model needs is estimated from its GGUF header (see :func:`estimate_memory_mb`) and
corrected by the footprint measured after it has been loaded once (:class:`Measurements`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardon.errors import ConfigError
from shardon.lifecycle.config import BACKENDS, LifecycleConfig, ModelConfig
from shardon.lifecycle.demo import installed_demo_models

log = logging.getLogger("shardon.lifecycle")

KV_BYTES_PER_ELEMENT = 2  # f16 KV cache, llama.cpp's default
MARGIN_FRACTION = 0.10
MARGIN_MB = 64
MB = 1024 * 1024

_PRECISION_RE = re.compile(
    r"[-_.](?P<tag>(?:I?Q[1-8](?:_[A-Z0-9]+)*)|F16|BF16|F32|FP16|FP32)$",
    re.IGNORECASE,
)
_SHARD_RE = re.compile(r"-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def precision_tag(path: str) -> str | None:
    """The precision tag at the end of a GGUF file name (``Q4_K_M``, ``F16``...), upper-cased."""
    stem = Path(path).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    stem = _SHARD_RE.sub("", stem)
    m = _PRECISION_RE.search(stem)
    return m.group("tag").upper() if m else None


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    aliases: tuple[str, ...]
    backend: str
    files: dict[str, str]  # precision variant -> path
    context: int = 4096
    slots: int = 1
    idle_ttl_s: float = 300
    pinned: bool = False
    gpu_group: str | None = None
    memory_mb: int | None = None
    precision: str = "auto"
    args: tuple[str, ...] = ()
    ready_timeout_s: float = 120
    stall_timeout_s: float = 30
    command: tuple[str, ...] | None = None
    default_max_tokens: int | None = 512
    max_tokens_cap: int | None = None
    chat: bool = True
    request_defaults: tuple[tuple[str, Any], ...] = ()  # (field, value) pairs
    source: str = "config"  # config | scan | demo
    # For a demo model: gives the file's path (may write it the first time: see demo.py).
    resolver: Callable[[], str] | None = field(default=None, compare=False, repr=False)

    def resolve_files(self) -> dict[str, str]:
        """Variant -> existing path; may be slow the first time for a demo model (blocking)."""
        if self.resolver is not None:
            path = self.resolver()
            return dict.fromkeys(self.files, path)
        return dict(self.files)


@dataclass(frozen=True)
class GgufInfo:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_embd_k_gqa: int
    n_embd_v_gqa: int
    context_length: int | None
    weights_bytes: int
    file_type: int | None


def _shard_paths(path: str) -> list[str]:
    p = Path(path)
    stem = p.name[: -len(".gguf")] if p.name.lower().endswith(".gguf") else p.name
    m = _SHARD_RE.search(stem)
    if not m:
        return [path]
    count = int(m.group("count"))
    base = stem[: m.start()]
    return [str(p.with_name(f"{base}-{i:05d}-of-{count:05d}.gguf")) for i in range(1, count + 1)]


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_SMALL_ARRAY = 4096  # per-layer values are kept; vocabularies (100k+ entries) are skipped, not read


def _read_gguf_header(path: str) -> tuple[dict[str, Any], int]:
    """(metadata, offset of the tensor data) from a GGUF file, reading only its header.

    A streaming parse: arrays longer than ``_SMALL_ARRAY`` (the tokenizer's vocabulary, scores and
    merges) are skipped by length rather than decoded, so a 262k-token vocabulary costs neither
    time nor memory (``gguf.GGUFReader`` builds a numpy view per token).
    """
    with open(path, "rb") as raw:
        f = io.BufferedReader(raw, 1 << 16)

        def unpack(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError("truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            return f.read(unpack("<Q")).decode("utf-8", errors="replace")

        def skip_string() -> None:
            f.seek(unpack("<Q"), os.SEEK_CUR)

        def value(kind: int) -> Any:
            if kind in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return string()
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown GGUF value type {kind}")
            item, count = unpack("<I"), unpack("<Q")
            if item in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[item]
                size = struct.calcsize(fmt)
                if count > _SMALL_ARRAY:
                    f.seek(size * count, os.SEEK_CUR)
                    return None
                return list(struct.unpack(f"<{count}{fmt[1]}", f.read(size * count)))
            if item == _GGUF_STRING:
                for _ in range(count):
                    skip_string()
                return None
            for _ in range(count):  # nested arrays: rare; decoded and dropped
                value(item)
            return None

        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        version = unpack("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(unpack("<I"))
        for _ in range(n_tensors):  # name, dims, type, offset
            skip_string()
            f.seek(8 * unpack("<I") + 4 + 8, os.SEEK_CUR)
        align = int(meta.get("general.alignment") or 32)
        return meta, -(-f.tell() // align) * align


def read_gguf_info(path: str) -> GgufInfo:
    """Read the parts of a GGUF header the memory estimate needs (all shards' tensors are summed).

    The weights are the tensor data: each shard's size past its header.
    """
    meta, data_start = _read_gguf_header(path)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(key)
        if value is None:
            return default
        if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv): take the largest
            value = max(value) if value else default
        return value

    arch = str(get("general.architecture", "llama"))
    n_layer = int(get(f"{arch}.block_count", 0) or 0)
    n_embd = int(get(f"{arch}.embedding_length", 0) or 0)
    n_head = int(get(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(get(f"{arch}.attention.head_count_kv", n_head) or n_head)
    head_dim = n_embd // n_head if n_head else 0
    key_length = int(get(f"{arch}.attention.key_length", head_dim) or head_dim)
    value_length = int(get(f"{arch}.attention.value_length", head_dim) or head_dim)
    ctx = get(f"{arch}.context_length")
    file_type = get("general.file_type")
    weights = os.path.getsize(path) - data_start
    for shard in _shard_paths(path)[1:]:
        weights += os.path.getsize(shard) - _read_gguf_header(shard)[1]
    return GgufInfo(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_embd_k_gqa=key_length * n_head_kv,
        n_embd_v_gqa=value_length * n_head_kv,
        context_length=int(ctx) if ctx is not None else None,
        weights_bytes=weights,
        file_type=int(file_type) if file_type is not None else None,
    )


def kv_cache_bytes(info: GgufInfo, n_ctx: int, slots: int) -> int:
    """f16 K and V for every layer, every position of every slot."""
    return info.n_layer * n_ctx * slots * (info.n_embd_k_gqa + info.n_embd_v_gqa) * KV_BYTES_PER_ELEMENT


def estimate_memory_mb(info: GgufInfo, n_ctx: int, slots: int) -> int:
    """weights + KV cache, plus a margin (10% + 64 MB) for compute buffers and the runtime."""
    total = info.weights_bytes + kv_cache_bytes(info, n_ctx, slots)
    return math.ceil(total * (1 + MARGIN_FRACTION) / MB) + MARGIN_MB


def _size_estimate(path: str) -> tuple[int, int]:
    if os.path.isdir(path):  # e.g. a Hugging Face folder for vLLM
        weights = (".safetensors", ".bin", ".pt", ".gguf")
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.suffix in weights)
    else:
        size = sum(os.path.getsize(p) for p in _shard_paths(path) if os.path.exists(p))
    return math.ceil(size * 1.25 / MB) + MARGIN_MB, math.ceil(size / MB)


def estimate_file_memory_mb(path: str, n_ctx: int, slots: int) -> tuple[int, int]:
    """(estimated need, weights only) in MB for one model file. Without a readable GGUF header (the
    ``gguf`` package missing, another format) the estimate is the files' size plus 25% and the margin."""
    if os.path.isdir(path):
        return _size_estimate(path)
    try:
        info = read_gguf_info(path)
    except ImportError:
        log.debug("gguf package missing; estimating %s from its size", path)
        return _size_estimate(path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as exc:
        log.warning("cannot read the GGUF header of %s (%s); estimating from its size", path, exc)
        return _size_estimate(path)
    return estimate_memory_mb(info, n_ctx, slots), math.ceil(info.weights_bytes / MB)


# ---------------------------------------------------------------------------------------- catalog


# Fields a model's request_defaults may not set: the request itself, and what Shardon sets otherwise.
_NOT_DEFAULTABLE = frozenset(
    {"model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens", "max_completion_tokens"}
)


def _entry_from_config(m: ModelConfig) -> CatalogEntry:
    if m.backend not in BACKENDS:
        raise ConfigError(f"models[{m.name}].backend: {m.backend!r} is not one of {', '.join(BACKENDS)}")
    if m.slots < 1 or m.context < 1:
        raise ConfigError(f"models[{m.name}]: context and slots must be at least 1")
    if m.files:
        files = {k.upper(): os.path.expanduser(v) for k, v in m.files.items()}
        if m.path:
            files.setdefault(precision_tag(m.path) or "DEFAULT", os.path.expanduser(m.path))
    elif m.path:
        path = os.path.expanduser(m.path)
        files = {precision_tag(path) or "DEFAULT": path}
    else:
        raise ConfigError(f"models[{m.name}]: give a path or files")
    if m.default_max_tokens is not None and m.max_tokens_cap is not None and m.default_max_tokens > m.max_tokens_cap:
        raise ConfigError(
            f"models[{m.name}].default_max_tokens: {m.default_max_tokens} is above max_tokens_cap ({m.max_tokens_cap})"
        )
    reserved = sorted(set(m.request_defaults) & _NOT_DEFAULTABLE)
    if reserved:
        raise ConfigError(
            f"models[{m.name}].request_defaults: {', '.join(reserved)} cannot be set here"
            " (max_tokens: use default_max_tokens)"
        )
    precision = m.precision if m.precision.lower() == "auto" else m.precision.upper()
    if precision != "auto" and precision not in files:
        raise ConfigError(
            f"models[{m.name}].precision: {m.precision!r} is not one of its variants ({', '.join(files)})"
        )
    return CatalogEntry(
        name=m.name,
        aliases=tuple(m.aliases),
        backend=m.backend,
        files=files,
        context=m.context,
        slots=m.slots,
        idle_ttl_s=m.idle_ttl_s,
        pinned=m.pinned,
        gpu_group=m.gpu_group,
        memory_mb=m.memory_mb,
        precision="auto" if precision.lower() == "auto" else precision,
        args=tuple(m.args),
        ready_timeout_s=m.ready_timeout_s,
        stall_timeout_s=m.stall_timeout_s,
        command=tuple(m.command) if m.command else None,
        default_max_tokens=m.default_max_tokens,
        max_tokens_cap=m.max_tokens_cap,
        chat=m.chat,
        request_defaults=tuple(m.request_defaults.items()),
        source="config",
    )


def scan_models_dir(models_dir: str) -> dict[str, dict[str, str]]:
    """model name -> {variant: path} for the ``*.gguf`` files directly inside ``models_dir``."""
    root = Path(os.path.expanduser(models_dir))
    found: dict[str, dict[str, str]] = {}
    if not root.is_dir():
        return found
    for p in sorted(root.glob("*.gguf")):
        if not p.is_file() or "mmproj" in p.name.lower():
            continue
        stem = p.name[: -len(".gguf")]
        shard = _SHARD_RE.search(stem)
        if shard:
            if int(shard.group("index")) != 1:
                continue
            stem = stem[: shard.start()]
        m = _PRECISION_RE.search(stem)
        if m:
            name, variant = stem[: m.start()], m.group("tag").upper()
        else:
            name, variant = stem, "DEFAULT"
        name = name or stem
        found.setdefault(name, {})[variant] = str(p)
    return found


class Catalog:
    """Immutable set of entries plus the name/alias index (safe to read from any thread)."""

    def __init__(self, entries: list[CatalogEntry]) -> None:
        self.entries: dict[str, CatalogEntry] = {}
        self.names: dict[str, str] = {}
        for e in entries:
            if e.name in self.names:
                raise ConfigError(f"models: the name {e.name!r} is used twice")
            self.entries[e.name] = e
            self.names[e.name] = e.name
        for e in entries:
            for alias in e.aliases:
                owner = self.names.get(alias)
                if owner is not None and owner != e.name:
                    raise ConfigError(f"models[{e.name}].aliases: {alias!r} already names {owner!r}")
                self.names[alias] = e.name

    @classmethod
    def build(cls, config: LifecycleConfig) -> Catalog:
        entries = [_entry_from_config(m) for m in config.models]
        used_names = {e.name for e in entries} | {a for e in entries for a in e.aliases}
        used_files = {os.path.realpath(p) for e in entries for p in e.files.values()}
        for name, files in scan_models_dir(config.models_dir).items():
            if name in used_names or any(os.path.realpath(p) in used_files for p in files.values()):
                continue
            entries.append(CatalogEntry(name=name, aliases=(), backend="llama-cpp-python", files=files, source="scan"))
            used_names.add(name)
        if config.demo:
            for demo, resolver in installed_demo_models():
                if demo.name in used_names:
                    continue
                entries.append(
                    CatalogEntry(
                        name=demo.name,
                        aliases=(),
                        backend="llama-cpp-python",
                        files={demo.variant: f"<{demo.distribution}>"},
                        context=demo.context,
                        default_max_tokens=demo.default_max_tokens,
                        max_tokens_cap=demo.max_tokens_cap,
                        chat=demo.chat,
                        request_defaults=demo.request_defaults,
                        source="demo",
                        resolver=resolver,
                    )
                )
        return cls(entries)

    def resolve(self, model: str) -> str | None:
        return self.names.get(model)


# ----------------------------------------------------------------------------------- measurements


class Measurements:
    """Footprints and load times measured on earlier loads, kept in ``<state_dir>/measurements.json``.

    Keys name the model, its variant, context, slots and where it ran (cpu/gpu), so a change of any of
    them starts from the GGUF estimate again. Only the lifecycle thread writes; reads are plain dict
    look-ups.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, dict[str, float]] = {}
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            if isinstance(loaded, dict):
                self.data = {k: v for k, v in loaded.items() if isinstance(v, dict)}
        except (OSError, ValueError):
            pass

    @staticmethod
    def key(entry: CatalogEntry, variant: str, where: str) -> str:
        return f"{entry.name}|{variant}|{entry.context}|{entry.slots}|{entry.backend}|{where}"

    def get(self, key: str) -> dict[str, float]:
        return self.data.get(key, {})

    def update(self, key: str, **values: float) -> None:
        rec = self.data.setdefault(key, {})
        changed = False
        for k, v in values.items():
            if rec.get(k) != v:
                rec[k] = v
                changed = True
        if changed:
            self.save()

    def save(self) -> None:
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)
