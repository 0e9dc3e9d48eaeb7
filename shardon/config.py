"""Configuration: msgspec Structs declared once, loaded once.

A config is built from, in order of precedence:

1. ``SHARDON_<SECTION>_<KEY>`` environment variables (``SHARDON_SERVER_PORT=9090``), values parsed
   as YAML scalars;
2. the YAML file given with ``--config``;
3. the defaults declared below.

Any problem raises :class:`~shardon.errors.ConfigError` whose message names the field
(``server.port: Expected `int`, got `str```); the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

import msgspec
import yaml
from msgspec import Meta, Struct

from .errors import ConfigError
from .lifecycle.config import GpusConfig, LifecycleConfig, ModelConfig
from .proxies import parse_trusted

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]

PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "critical")
PriorityName = Literal["low", "normal", "high", "critical"]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class StoreConfig(_Section):
    """``store:``: the request log (and the database the API keys created at run time live in)."""

    path: str = ""
    """SQLite file. Empty: ``$XDG_DATA_HOME/shardon/shardon.db`` (``~/.local/share/shardon/shardon.db``)."""
    retention_days: float = 7
    """Requests older than this are deleted; 0 or less keeps them forever."""
    flush_interval_ms: int = 200
    """How often the writer thread moves what was appended to the on-disk backlog (the process-crash
    loss window); also how long the compactor sleeps when the writer does not wake it."""
    batch_max: int = 1000
    """Most rows per backlog frame and per SQLite transaction; this many waiting rows also wake the
    writer early."""
    cleanup_interval_s: float = 3600
    """How often the retention clean-up runs (it also runs at start)."""
    writer_cpus: list[int] = msgspec.field(default_factory=list)
    """CPUs the compactor thread (the one doing the SQLite work) may run on (Linux). Empty: the
    process's own. On a machine with a core to spare, cores other than the event loop's keep its
    cache traffic off the request path's core. The writer thread stays put."""
    busy_rows_per_s: float = 2000
    """Above this many rows a second appended, the gateway counts as busy and compaction into
    SQLite waits for a lull. A read, a flush, shutdown, or a backlog over ``max_backlog_mb``
    compacts at once whatever the rate."""
    max_backlog_mb: float = 256
    """The backlog (on disk) past which compaction runs even while the gateway is busy."""

    def __post_init__(self) -> None:
        if self.flush_interval_ms <= 0:
            raise ValueError("store.flush_interval_ms must be > 0")
        if self.batch_max <= 0:
            raise ValueError("store.batch_max must be > 0")
        if self.cleanup_interval_s <= 0:
            raise ValueError("store.cleanup_interval_s must be > 0")
        if any(cpu < 0 for cpu in self.writer_cpus):
            raise ValueError("store.writer_cpus must be CPU numbers (>= 0)")
        if self.busy_rows_per_s < 0:
            raise ValueError("store.busy_rows_per_s must be >= 0")
        if self.max_backlog_mb <= 0:
            raise ValueError("store.max_backlog_mb must be > 0")


class DataPaths(NamedTuple):
    """Where Shardon keeps its state on disk, resolved once at start (`Config.data_paths`) and passed
    down: the request log gets ``database`` and ``backlog``, the key store ``database``, the model
    lifecycle ``lifecycle``."""

    database: Path
    """The SQLite file: the request log, the audit trail, the API keys created at run time."""
    backlog: Path
    """The request log's on-disk backlog (``<database file name>-backlog``)."""
    lifecycle: Path
    """The model lifecycle's state (``lifecycle/`` next to the database)."""

    @classmethod
    def for_database(cls, database: str | os.PathLike[str]) -> DataPaths:
        """The paths that go with a database file."""
        db = Path(database)
        return cls(db, db.with_name(db.name + "-backlog"), db.parent / "lifecycle")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: PositiveInt = 1048576
    drain_timeout_s: NonNegFloat = 30.0
    backlog: PositiveInt = 1024
    # The HTTP engine hosting the gateway (shardon/server.py says why native is the default).
    engine: Literal["native", "granian"] = "native"
    # Native engine: an idle keep-alive connection closes after this long (longer than clients'
    # own pool expiry, e.g. httpx's 5 s, so a client never reuses a connection as it closes)...
    keepalive_timeout_s: PositiveFloat = 75.0
    # ... and a request head must arrive within this (slow clients cannot hold connections).
    header_timeout_s: PositiveFloat = 30.0
    # Native engine: serve each whole request from the exchange's socket callbacks (no task, no
    # coroutine). Off: every request runs as an RSGI coroutine, as on granian (same behaviour, more
    # CPU per request).
    callbacks: bool = True
    # Granian engine: requests it hands to Shardon at once (queued ones included). Shardon's own
    # queue limits (scheduler.max_queue_size per model) are what bound admission, so this is
    # large: were it reached, new requests — a quiet tenant's too — would wait unseen in the socket.
    max_concurrent_requests: PositiveInt = 65536
    # Addresses or networks of the reverse proxies in front of Shardon (nginx): only a request from
    # one of them is attributed to the client in its X-Forwarded-For / X-Real-IP (shardon/proxies.py).
    trusted_proxies: list[str] = msgspec.field(default_factory=list)


class SchedulerConfig(_Section):
    # "fair": priority classes, then fair queueing across tenants with headroom kept for tenants
    # under their share; "fifo": one line in arrival order (priority classes still apply), for
    # comparison.
    max_queue_size: NonNegInt = 1000
    queue_timeout_s: PositiveFloat = 30.0
    default_priority: PriorityName = "normal"
    # Estimated tokens (times the tenant's weight) a tenant back from idle may be served ahead of
    # the tenants already waiting; refunds of over-estimates never put a tenant further ahead.
    quantum_tokens: PositiveFloat = 1024.0
    # Estimated completion tokens when a request gives no max_tokens.
    default_max_tokens: PositiveInt = 256
    policy: Literal["fair", "fifo"] = "fair"
    # Free slots a tenant at or over its fair share must leave to the others while more than one
    # tenant is active: a number, or "auto" to size them from the quiet tenants' recent demand so
    # that one of their requests finds no free slot at most headroom_wait_target of the time
    # (docs/scheduling.md).
    headroom_slots: NonNegInt | Literal["auto"] = "auto"
    headroom_wait_target: Annotated[float, Meta(gt=0, lt=1)] = 0.01
    # A tenant counts as active (and so has a share) this long after its last request.
    active_window_s: PositiveFloat = 5.0


class UpstreamConfig(_Section):
    connect_timeout_s: PositiveFloat = 5.0
    # Longest silence allowed while waiting for the node (first byte, or between chunks).
    read_timeout_s: PositiveFloat = 600.0
    max_retries: NonNegInt = 2
    # Idle keep-alive connections kept per node, at most; a node never holds more than its
    # max_concurrent requests, so its pool keeps min(max_concurrent, this). Fewer idle than a burst
    # needs means connecting to a node that is already busy, and a busy uvloop/uvicorn node
    # accepts one connection per event-loop pass (bench/README.md: seconds for a burst of 500).
    max_idle_per_node: PositiveInt = 1024
    health_interval_s: PositiveFloat = 5.0
    health_timeout_s: PositiveFloat = 2.0
    # Consecutive failures (requests or health checks) before a node is taken out of rotation.
    failure_threshold: PositiveInt = 3


class NodeConfig(_Section):
    id: str
    url: str
    models: list[str] | dict[str, str]
    max_concurrent: PositiveInt = 4
    weight: PositiveFloat = 1.0
    api_key: str | None = None
    health_path: str = "/v1/models"

    def model_map(self) -> dict[str, str]:
        """Public model name → the name the node knows it by."""
        if isinstance(self.models, dict):
            return dict(self.models)
        return {name: name for name in self.models}


class KeyConfig(_Section):
    """An API key of a tenant: the secret itself, or only its SHA-256 so no secret sits in the file."""

    key: str | None = None
    key_sha256: str | None = None
    id: str | None = None
    rpm: PositiveFloat | None = None
    tpm: PositiveFloat | None = None
    max_priority: PriorityName | None = None
    models: list[str] | None = None


class TenantConfig(_Section):
    name: str
    weight: PositiveFloat = 1.0
    rpm: PositiveFloat | None = None
    tpm: PositiveFloat | None = None
    keys: list[KeyConfig] = msgspec.field(default_factory=list)


class AuthConfig(_Section):
    admin_keys: list[str] = msgspec.field(default_factory=list)
    trust_tenant_header: bool = False
    tenant_header: str = "x-tenant-id"


class MetricsConfig(_Section):
    enabled: bool = True


class UiConfig(_Section):
    """The dashboard at ``/ui`` (shardon/web): signed in with an admin key, for a session this long."""

    enabled: bool = True
    session_ttl_s: PositiveFloat = 43200.0


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["console", "json"] = "console"
    # One line per /v1 request, formatted and written off the event loop (shardon/store/access.py).
    access_log: bool = True
    # Where access lines go: empty for stderr, else a file (appended to, created if missing).
    access_log_path: str = ""


class Config(_Section):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    upstream: UpstreamConfig = msgspec.field(default_factory=UpstreamConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    # Set false to run without the SQLite request log (no admin request queries or stats, no audit
    # trail). API keys created at run time are still kept in store.path's database.
    request_log: bool = True
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    ui: UiConfig = msgspec.field(default_factory=UiConfig)
    tenants: list[TenantConfig] = msgspec.field(default_factory=list)
    nodes: list[NodeConfig] = msgspec.field(default_factory=list)
    # Models Shardon starts on demand (llama-cpp-python, llama-server, vllm): from this list and
    # from the *.gguf files in models_dir; the demo model joins when its package is installed.
    models_dir: str = "~/.local/share/shardon/models"
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    gpus: GpusConfig = msgspec.field(default_factory=GpusConfig)
    demo: bool = True
    backend_stop_grace_s: NonNegFloat = 10.0
    # The built-in mock node, used when neither nodes nor models are configured (see README).
    embedded_mock: bool | None = None

    def data_paths(self, environ: Mapping[str, str] | None = None) -> DataPaths:
        """The paths of Shardon's state, from ``store.path`` (``~`` and ``$VARS`` expanded) or the
        default under ``$XDG_DATA_HOME`` (``~/.local/share``). `shardon.server.run` calls it once."""
        environ = os.environ if environ is None else environ
        if self.store.path:
            return DataPaths.for_database(Path(os.path.expandvars(self.store.path)).expanduser())
        base = environ.get("XDG_DATA_HOME") or ""
        root = Path(base).expanduser() if base else Path.home() / ".local" / "share"
        return DataPaths.for_database(root / "shardon" / "shardon.db")

    def lifecycle(self) -> LifecycleConfig:
        return LifecycleConfig(
            models_dir=self.models_dir,
            models=self.models,
            gpus=self.gpus,
            demo=self.demo,
            stop_grace_s=self.backend_stop_grace_s,
        )


_SECTIONS = ("server", "scheduler", "upstream", "auth", "store", "metrics", "log", "ui")
_VALIDATION_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def _field_path(raw: str) -> str:
    # msgspec paths look like `$.nodes[0].url`; users think in `nodes[0].url`.
    return raw.replace("$.", "").replace("$", "")


def _validate(cfg: Config) -> None:
    try:
        parse_trusted(cfg.server.trusted_proxies)
    except ValueError as exc:
        raise ConfigError(f"server.trusted_proxies{exc}") from None
    seen: set[str] = set()
    for i, node in enumerate(cfg.nodes):
        where = f"nodes[{i}]"
        if node.id in seen:
            raise ConfigError(f"{where}.id: duplicate node id {node.id!r}")
        seen.add(node.id)
        parts = urlsplit(node.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"{where}.url: expected http://host:port, got {node.url!r}")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ConfigError(f"{where}.url: bad port in {node.url!r}") from None
        if not node.models:
            raise ConfigError(f"{where}.models: a node must serve at least one model")


def _validate_tenants(cfg: Config) -> None:
    names: set[str] = set()
    for i, tenant in enumerate(cfg.tenants):
        if tenant.name in names:
            raise ConfigError(f"tenants[{i}].name: duplicate tenant {tenant.name!r}")
        names.add(tenant.name)
        for j, key in enumerate(tenant.keys):
            where = f"tenants[{i}].keys[{j}]"
            if (key.key is None) == (key.key_sha256 is None):
                raise ConfigError(f"{where}: give exactly one of key or key_sha256")
            if key.key_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", key.key_sha256):
                raise ConfigError(f"{where}.key_sha256: expected 64 hex digits")


_TOP_LEVEL = ("models_dir", "demo", "request_log", "embedded_mock", "backend_stop_grace_s")


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("SHARDON_"):
            continue
        rest = name[len("SHARDON_") :].lower()
        if rest in _TOP_LEVEL:
            raw[rest] = yaml.safe_load(value) if value != "" else ""
            continue
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                target = raw.setdefault(section, {})
                if not isinstance(target, dict):
                    raise ConfigError(f"{section}: expected a mapping")
                try:
                    target[key] = yaml.safe_load(value) if value != "" else ""
                except yaml.YAMLError as exc:
                    raise ConfigError(f"{section}.{key} (from {name}): {exc}") from None
                break


def load_config(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (if any), apply environment overrides, validate, return the Config."""
    environ = os.environ if environ is None else environ
    raw: Any = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
    _env_overrides(raw, environ)
    try:
        cfg = msgspec.convert(raw, Config, str_keys=True)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        match = _VALIDATION_PATH.search(msg)
        if match:
            raise ConfigError(f"{_field_path(match.group(1)) or '(top level)'}: {msg[: match.start()]}") from None
        raise ConfigError(msg) from None
    _validate(cfg)
    _validate_tenants(cfg)
    return cfg
