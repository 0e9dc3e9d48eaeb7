"""Configuration Structs of the model lifecycle (embedded by ``shardon.config``).

User-facing YAML (``models_dir``, ``models`` and ``gpus`` are top-level keys of the gateway config)::

    models_dir: ~/.local/share/shardon/models
    models:
      - name: tiny-chat
        path: /models/tiny-q4.gguf     # or files: {Q4_K_M: ..., Q8_0: ..., F16: ...}
        backend: llama-cpp-python      # | llama-server | vllm
        context: 4096                  # tokens per slot
        slots: 1                       # parallel requests the backend serves
        idle_ttl_s: 300                # unload after this long unused (0: never)
        pinned: false                  # loaded at start, never evicted
        gpu_group: fast                # preferred group (others are tried when it is full)
        memory_mb: null                # override of the estimate from the GGUF header
        default_max_tokens: 512        # max_tokens of a request that gives none (null: the backend's)
        max_tokens_cap: null           # a larger max_tokens is lowered to this (null: no cap)
        chat: true                     # false: a base model, /v1/chat/completions is refused
        request_defaults: {temperature: 0.2}   # fields a request gets when it does not give them
    gpus:
      groups: {fast: [0, 1], small: [2]}
      reserve_mb: 1024
      cpu_memory_budget_mb: 8192
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

BACKENDS = ("llama-cpp-python", "llama-server", "vllm")


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    path: str | None = None
    files: dict[str, str] | None = None
    aliases: list[str] = []
    backend: str = "llama-cpp-python"
    context: int = 4096
    slots: int = 1
    idle_ttl_s: float = 300
    pinned: bool = False
    gpu_group: str | None = None
    memory_mb: int | None = None
    precision: str = "auto"
    args: list[str] = []
    ready_timeout_s: float = 120
    stall_timeout_s: float = 30
    # What Shardon sets in a request to this model (shardon/lifecycle/requests.py): a request without
    # max_tokens gets the default, one above the cap is lowered to the cap.
    default_max_tokens: PositiveInt | None = 512
    max_tokens_cap: PositiveInt | None = None
    # False for a base (completion-only) model: chat requests are refused with a 400.
    chat: bool = True
    # Top-level fields a chat or completion request gets when it does not give them (sampling
    # settings the model is meant to run with, e.g. {temperature: 0.2, top_p: 0.9}).
    request_defaults: dict[str, Any] = {}
    # Optional full command line replacing the backend's own; placeholders: {python} {model_path}
    # {host} {port} {context} {slots} {name} {n_gpu_layers}. Readiness still follows ``backend``.
    command: list[str] | None = None


class GpusConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    groups: dict[str, list[int]] = {}
    reserve_mb: int = 1024
    cpu_memory_budget_mb: int = 8192


class LifecycleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    models_dir: str = "~/.local/share/shardon/models"
    models: list[ModelConfig] = []
    gpus: GpusConfig = msgspec.field(default_factory=GpusConfig)
    demo: bool = True
    python: str = sys.executable
    # Seconds a stopping backend gets between SIGTERM and SIGKILL.
    stop_grace_s: float = 10.0
