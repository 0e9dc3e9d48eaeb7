"""``shardon doctor``: is this machine, with this config, ready to serve? What to fix if not.

Each check reports ``ok``, ``warn`` (works, but not as intended) or ``fail`` (will not work), with
what it found and, when something is wrong, how to fix it. The command exits non-zero when any
check fails; ``--json`` prints the same report for scripts. Checks, in order: Python, uvloop, the
compiled core, the config, NVML and the GPUs, the model backends the config needs, the listen
address, the data directory, and every configured node (one request to its health path).
Nothing is started and nothing is written but a probe file in the data directory, removed at once.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .config import Config, NodeConfig, load_config
from .errors import ConfigError
from .lifecycle.catalog import Catalog
from .lifecycle.config import BACKENDS
from .lifecycle.gpus import GpuInventory
from .upstream.base import node_tls

Status = Literal["ok", "warn", "fail"]

MIN_PYTHON = (3, 11)
# The compiled modules: selector module → the flag it sets when its compiled twin loaded.
COMPILED = {
    "shardon._fast": "USING_EXTENSIONS",
    "shardon._fast.sse": "SSE_COMPILED",
    "shardon._fast.tally": "TALLY_COMPILED",
    "shardon._fast.rowqueue": "ROWQUEUE_COMPILED",
    "shardon._fast.accesslog": "ACCESSLOG_COMPILED",
    "shardon.exchange": "COMPILED",
    "shardon.scheduler": "COMPILED",
    "shardon.nodes": "COMPILED",
    "shardon.httpd.connection": "COMPILED",
    "shardon.upstream.connection": "COMPILED",
}
# Backend → what makes it available, and how to install it.
LLAMA_CPP_PYTHON_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")
BACKEND_FIX = {
    "llama-cpp-python": "pip install 'shardon[llama]' (llama-cpp-python and its server) in Shardon's environment",
    "llama-server": "install llama.cpp and put its llama-server binary on PATH",
    "vllm": "pip install vllm (its 'vllm' command must be on PATH)",
}


# Shardon connects to its nodes directly: so do the checks, whatever *_proxy variables say.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def python_version() -> tuple[int, int, int]:
    return (sys.version_info.major, sys.version_info.minor, sys.version_info.micro)


def check_python() -> Check:
    version = python_version()
    text = ".".join(map(str, version))
    if version[:2] < MIN_PYTHON:
        wanted = ".".join(map(str, MIN_PYTHON))
        return Check("python", "fail", f"Python {text} ({sys.executable})", f"install Python {wanted} or newer")
    return Check("python", "ok", f"Python {text} ({sys.executable})")


def check_uvloop() -> Check:
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        return Check("uvloop", "fail", f"not importable ({exc})", "pip install uvloop")
    return Check("uvloop", "ok", f"uvloop {getattr(uvloop, '__version__', '?')}")


def compiled_modules() -> dict[str, bool]:
    """Selector module → whether its compiled twin is the one in use."""
    loaded: dict[str, bool] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reported below instead
        for module_name, flag in COMPILED.items():
            loaded[module_name] = bool(getattr(importlib.import_module(module_name), flag))
    loaded["shardon._fast (request-log writer)"] = bool(importlib.import_module("shardon._fast").ROWWRITER_COMPILED)
    return loaded


def check_compiled() -> Check:
    loaded = compiled_modules()
    missing = [name for name, ok in loaded.items() if not ok]
    if not missing:
        return Check("compiled core", "ok", f"{len(loaded)} compiled modules loaded")
    if os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes"):
        return Check(
            "compiled core",
            "warn",
            "SHARDON_NO_EXTENSIONS is set: running on the pure-Python twins (same behaviour, more CPU)",
            "unset SHARDON_NO_EXTENSIONS",
        )
    return Check(
        "compiled core",
        "fail",
        f"not loaded: {', '.join(missing)} (running on the pure-Python twins: more CPU per request)",
        "install a C compiler and the Python headers (Debian: apt-get install gcc python3-dev), then "
        "pip install --force-reinstall --no-deps shardon (from a checkout: pip install --no-deps -e .)",
    )


def check_config(path: str | None) -> tuple[Check, Config | None, Catalog | None]:
    where = path or "(no file: built-in defaults)"
    try:
        config = load_config(path)
        catalog = Catalog.build(config.lifecycle())
    except ConfigError as exc:
        fix = f"correct it (then: shardon check-config --config {path})" if path else "correct it"
        return Check("config", "fail", f"{where}: {exc}", fix), None, None
    detail = f"{where}: {len(config.nodes)} node(s), {len(catalog.entries)} model(s) started on demand"
    return Check("config", "ok", detail), config, catalog


def nvml_module() -> Any:
    """The NVML module for the GPU check: None lets `GpuInventory` load pynvml (tests give a fake)."""
    return None


def check_gpus(config: Config) -> Check:
    quiet = logging.getLogger("shardon.lifecycle")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # what it would log is in the report
    try:
        inventory = GpuInventory(config.gpus, nvml=nvml_module())
    finally:
        quiet.setLevel(level)
    try:
        groups = config.gpus.groups
        if inventory.mode == "cpu":
            if groups:
                return Check(
                    "gpus",
                    "fail",
                    f"gpus.groups names GPUs {sorted({i for g in groups.values() for i in g})}, but {inventory.reason}",
                    "install the NVIDIA driver and nvidia-ml-py (a container needs the GPU passed in), "
                    "or remove gpus.groups to run models on the CPU",
                )
            budget = config.gpus.cpu_memory_budget_mb
            return Check("gpus", "ok", f"no GPU ({inventory.reason}): models run on the CPU within {budget} MB")
        devices = inventory.refresh()
        present = set(devices)
        absent = {name: [i for i in indices if i not in present] for name, indices in groups.items()}
        absent = {name: indices for name, indices in absent.items() if indices}
        listed = ", ".join(f"{d.index}: {d.name} ({d.free_mb}/{d.total_mb} MB free)" for d in devices.values())
        if absent:
            named = "; ".join(f"gpus.groups.{name}: GPU {indices}" for name, indices in absent.items())
            return Check("gpus", "fail", f"{named} not present (NVML sees {listed})", "correct gpus.groups")
        return Check("gpus", "ok", f"NVML: {listed}")
    finally:
        inventory.close()


def backend_available(backend: str) -> str | None:
    """Why ``backend`` cannot be started here, or None."""
    if backend == "llama-cpp-python":
        missing = [m for m in LLAMA_CPP_PYTHON_MODULES if importlib.util.find_spec(m) is None]
        return f"modules {', '.join(missing)} not installed" if missing else None
    if shutil.which(backend) is None:
        return f"no {backend} on PATH"
    return None


def check_backends(catalog: Catalog) -> list[Check]:
    entries = list(catalog.entries.values())
    checks: list[Check] = []
    needed: dict[str, list[str]] = {}
    for entry in entries:
        if entry.command:
            exe = entry.command[0].format(python=sys.executable)
            if shutil.which(exe) is None:
                checks.append(
                    Check(
                        f"model {entry.name}", "fail", f"its command {exe!r} is not found", "install it or fix command"
                    )
                )
        else:
            needed.setdefault(entry.backend, []).append(entry.name)
        absent = [p for p in entry.files.values() if entry.source != "demo" and not os.path.isfile(p)]
        if absent:
            checks.append(
                Check(
                    f"model {entry.name}",
                    "fail",
                    f"file {', '.join(absent)} does not exist",
                    "put the file there (a container: mount it) or correct the model's path",
                )
            )
    for backend in BACKENDS:
        why = backend_available(backend)
        users = needed.get(backend)
        if users and why:
            checks.append(
                Check(f"backend {backend}", "fail", f"{why}; needed by {', '.join(users)}", BACKEND_FIX[backend])
            )
        elif users:
            checks.append(Check(f"backend {backend}", "ok", f"available; used by {', '.join(users)}"))
        else:
            checks.append(Check(f"backend {backend}", "ok", "not needed" + (f" ({why})" if why else ", available")))
    return checks


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def running_shardon(host: str, port: int) -> str | None:
    """The version of a Shardon already answering on host:port, or None."""
    import json

    probe = _probe_host(host)
    url = f"http://{'[' + probe + ']' if ':' in probe else probe}:{port}/health"
    try:
        with _DIRECT.open(url, timeout=2) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # a draining Shardon answers 503
        try:
            body = json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None
    if isinstance(body, dict) and "version" in body and "in_flight" in body:
        return str(body["version"])
    return None


def check_port(config: Config) -> Check:
    from .server import _cannot_listen

    host, port = config.server.host, config.server.port
    problem = _cannot_listen(host, port)
    if problem is None:
        return Check("listen", "ok", f"{host}:{port} is free")
    version = running_shardon(host, port)
    if version is not None:
        return Check("listen", "ok", f"{host}:{port} is served by a running Shardon {version}")
    return Check(
        "listen",
        "fail",
        f"cannot listen on {host}:{port}: {problem}",
        f"stop what holds the port (ss -ltnp 'sport = :{port}') or set server.port (SHARDON_SERVER_PORT)",
    )


def check_data_dir(config: Config) -> Check:
    # (written with request_log off too: API keys created at run time, the lifecycle's state)
    directory = config.data_paths().database.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = f"create {directory} writable by the user Shardon runs as, or set store.path (SHARDON_STORE_PATH)"
    if not existing.is_dir():
        return Check("data dir", "fail", f"{directory}: {existing} is not a directory", fix)
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".shardon-doctor-"):
            pass
    except OSError as exc:
        return Check("data dir", "fail", f"{existing} is not writable ({exc.strerror or exc})", fix)
    note = "" if existing == directory else f" (Shardon creates it under {existing})"
    return Check("data dir", "ok", f"{directory} writable{note}")


def check_node(index: int, node: NodeConfig, timeout: float) -> Check:
    """The node answers the health probe the gateway sends (``/health``, else ``/v1/models``), and
    takes its ``api_key`` (``/v1/models``, which needs it where ``/health`` does not)."""
    context = node_tls(node.url, node.ca_file)
    opener = _DIRECT
    if context is not None:
        handler = urllib.request.HTTPSHandler(context=context)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), handler)
    paths = [node.health_path] if node.health_path else ["/health", "/v1/models"]
    if paths[-1] != "/v1/models":
        paths.append("/v1/models")
    name = f"node {node.id}"
    answered = ""
    for path in paths:
        url = node.url.rstrip("/") + path
        request = urllib.request.Request(url)
        if node.api_key:
            request.add_header("Authorization", f"Bearer {node.api_key}")
        try:
            with opener.open(request, timeout=timeout) as resp:
                resp.read(65536)
                answered = answered or f"{url} answered {resp.status}"
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 405) and path != paths[-1]:
                continue  # no /health: the gateway probes its model list
            if exc.code in (404, 405) and answered:
                break  # it has no model list, and its health path answered
            fix = f"check nodes[{index}].api_key" if exc.code in (401, 403) else f"check nodes[{index}].health_path"
            return Check(name, "fail", f"{url} answered {exc.code}", fix)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return Check(
                name, "fail", f"cannot reach {url}: {reason}", f"start the node, or correct nodes[{index}].url"
            )
    return Check(name, "ok", answered)


def check_nodes(config: Config) -> list[Check]:
    if not config.nodes:
        return []
    timeout = config.upstream.health_timeout_s
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(config.nodes))) as pool:
        futures = [pool.submit(check_node, i, node, timeout) for i, node in enumerate(config.nodes)]
        return [f.result() for f in futures]


def run_checks(config_path: str | None) -> list[Check]:
    checks = [check_python(), check_uvloop(), check_compiled()]
    config_check, config, catalog = check_config(config_path)
    checks.append(config_check)
    if config is None or catalog is None:
        return checks
    checks.append(check_gpus(config))
    checks.extend(check_backends(catalog))
    checks.append(check_port(config))
    checks.append(check_data_dir(config))
    checks.extend(check_nodes(config))
    return checks


def report(checks: list[Check], as_json: bool) -> str:
    if as_json:
        import json

        ok = all(c.status != "fail" for c in checks)
        return json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2)
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():4}  {c.name.ljust(width)}  {c.detail}")
        if c.fix:
            lines.append(f"{'':4}  {'':{width}}  fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    lines.append(f"{failed} problem(s) found" if failed else "ready")
    return "\n".join(lines)


def main(config_path: str | None, as_json: bool) -> int:
    checks = run_checks(config_path)
    print(report(checks, as_json))
    return 1 if any(c.status == "fail" for c in checks) else 0
