"""Config: the documented shape loads, overrides apply, and every error names its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from shardon.config import Config, DataPaths, StoreConfig, load_config
from shardon.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

DOCUMENTED = """
server:    {host: 127.0.0.1, port: 8080, max_body_bytes: 1048576}
scheduler: {max_queue_size: 1000, queue_timeout_s: 30}
nodes:
  - id: node-a
    url: http://127.0.0.1:9001
    models: [llama-3-8b]
    max_concurrent: 4
    weight: 1
    api_key: null
  - id: node-b
    url: http://127.0.0.1:9002
    models: {public-name: name-on-the-node}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shardon.yaml"
    path.write_text(text)
    return path


def test_documented_shape_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, DOCUMENTED), environ={})
    assert cfg.server.port == 8080 and cfg.server.max_body_bytes == 1048576
    assert cfg.scheduler.max_queue_size == 1000 and cfg.scheduler.queue_timeout_s == 30
    assert cfg.nodes[0].model_map() == {"llama-3-8b": "llama-3-8b"}
    assert cfg.nodes[1].model_map() == {"public-name": "name-on-the-node"}
    assert cfg.nodes[0].api_key is None


def test_defaults_without_a_file() -> None:
    cfg = load_config(None, environ={})
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8080)
    assert cfg.nodes == []


def test_environment_overrides_file(tmp_path: Path) -> None:
    env = {
        "SHARDON_SERVER_PORT": "9090",
        "SHARDON_SCHEDULER_QUEUE_TIMEOUT_S": "2.5",
        "SHARDON_SERVER_MAX_BODY_BYTES": "10",
    }
    cfg = load_config(write(tmp_path, DOCUMENTED), environ=env)
    assert cfg.server.port == 9090
    assert cfg.scheduler.queue_timeout_s == 2.5
    assert cfg.server.max_body_bytes == 10


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        ("server: {port: eighty}", {}, "server.port"),
        ("server: {port: 70000}", {}, "server.port"),
        ("server: {prot: 1}", {}, "server"),
        ("scheduler: {queue_timeout_s: -1}", {}, "scheduler.queue_timeout_s"),
        ("scheduler: {headroom_slots: lots}", {}, "scheduler.headroom_slots"),
        ("scheduler: {headroom_slots: -1}", {}, "scheduler.headroom_slots"),
        ("scheduler: {headroom_wait_target: 1.5}", {}, "scheduler.headroom_wait_target"),
        ("nodes: [{id: a, url: 'http://x:1'}]", {}, "nodes[0]"),
        ("nodes: [{id: a, url: 'http://x:1', models: [m], max_concurrent: 0}]", {}, "nodes[0].max_concurrent"),
        ("nodes: [{id: a, url: 'ftp://x', models: [m]}]", {}, "nodes[0].url"),
        (
            "nodes: [{id: a, url: 'http://x:1', models: [m]}, {id: a, url: 'http://x:2', models: [m]}]",
            {},
            "nodes[1].id",
        ),
        ("nodes: [{id: a, url: 'http://x:1', models: []}]", {}, "nodes[0].models"),
        ("", {"SHARDON_SERVER_PORT": "nope"}, "server.port"),
    ],
)
def test_errors_name_the_field(tmp_path: Path, text: str, env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ=env)
    assert str(info.value).startswith(field), str(info.value)


def test_headroom_is_adaptive_unless_a_number_is_given(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), environ={}).scheduler.headroom_slots == "auto"
    assert load_config(write(tmp_path, "scheduler: {headroom_slots: 2}"), environ={}).scheduler.headroom_slots == 2
    env = {"SHARDON_SCHEDULER_HEADROOM_SLOTS": "0"}
    assert load_config(write(tmp_path, "scheduler: {headroom_slots: 2}"), environ=env).scheduler.headroom_slots == 0


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_config(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "server: [unclosed"), environ={})
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), environ={})


def test_cli_exits_non_zero_naming_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: eighty}")
    proc = subprocess.run(
        [sys.executable, "-m", "shardon", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "server.port" in proc.stderr and "Expected `int`" in proc.stderr


def test_shipped_example_configs_are_valid() -> None:
    deploy = Path(__file__).resolve().parent.parent / "deploy"
    examples = sorted(p for p in deploy.glob("*.yaml") if p.name != "compose.yaml")  # compose: tests/deploy
    assert examples
    for path in examples:
        cfg = load_config(path, environ={})
        assert cfg.nodes or cfg.models, path


def test_data_paths_resolved_from_store_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One data directory: the database, its backlog and the lifecycle state, from ``store.path``."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    db = tmp_path / "xdg" / "shardon" / "shardon.db"
    assert Config().data_paths() == DataPaths(db, db.parent / "shardon.db-backlog", db.parent / "lifecycle")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Config().data_paths().database == tmp_path / "home" / ".local" / "share" / "shardon" / "shardon.db"
    monkeypatch.setenv("LOGS", str(tmp_path / "logs"))
    paths = load_config(None, {"SHARDON_STORE_PATH": "$LOGS/x.db"}).data_paths()
    assert paths == DataPaths.for_database(tmp_path / "logs" / "x.db")
    assert paths.backlog == tmp_path / "logs" / "x.db-backlog" and paths.lifecycle == tmp_path / "logs" / "lifecycle"
    assert load_config(None, {"SHARDON_STORE_PATH": "~/y.db"}).data_paths().database == tmp_path / "home" / "y.db"
    assert Config().data_paths({"XDG_DATA_HOME": "/srv"}).database == Path("/srv/shardon/shardon.db")


def test_store_config_validation() -> None:
    c = msgspec.convert({"retention_days": 1.5, "batch_max": 10}, StoreConfig)
    assert c.retention_days == 1.5 and c.batch_max == 10 and c.flush_interval_ms == 200
    for raw, field in [
        ({"retention": 3}, "unknown field"),
        ({"flush_interval_ms": 0}, "flush_interval_ms"),
        ({"batch_max": 0}, "batch_max"),
        ({"cleanup_interval_s": 0}, "cleanup_interval_s"),
        ({"writer_cpus": [-1]}, "writer_cpus"),
        ({"busy_rows_per_s": -1}, "busy_rows_per_s"),
        ({"max_backlog_mb": 0}, "max_backlog_mb"),
    ]:
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.convert(raw, StoreConfig)
    with pytest.raises(ConfigError, match=r"store\.batch_max must be > 0"):
        load_config(None, {"SHARDON_STORE_BATCH_MAX": "0"})


def test_config_does_not_import_the_store() -> None:
    """The configuration is read before anything starts: it needs none of the request log."""
    code = "import sys, shardon.config; print(sorted(m for m in sys.modules if m.startswith('shardon.store')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
