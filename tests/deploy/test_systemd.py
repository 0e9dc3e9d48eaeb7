"""deploy/systemd/shardon.service: systemd accepts it, and its command line serves and drains.

``systemd-analyze verify`` runs against a root holding systemd's own units, this unit and the
paths it names (its ExecStart binary), and must print nothing. Its hardening is scored with
``systemd-analyze security``. Then the unit's ExecStart runs for real with the example config and
the unit's environment (the paths under /var/lib/shardon moved to a temporary directory, the
listen address to a free loopback port through SHARDON_* variables, as /etc/shardon/shardon.env
would): it answers /health, and the unit's KillSignal makes it exit 0 within TimeoutStopSec.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from shardon.config import load_config
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "shardon.service"
EXAMPLE = ROOT / "deploy" / "shardon.example.yaml"
STATE = "/var/lib/shardon"


def analyzer() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is not installed: run .ci/system-packages (README 'Test it')"
    return found


def service_settings() -> list[tuple[str, str]]:
    """The [Service] section's key=value lines, in order (keys may repeat)."""
    settings: list[tuple[str, str]] = []
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.append((key, value))
    return settings


def setting(key: str) -> str:
    values = [v for k, v in service_settings() if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def make_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    binary = root / shlex.split(setting("ExecStart"))[0].lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    result = subprocess.run(
        [analyzer(), "verify", f"--root={root}", UNIT.name], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys, bad values: warnings here


def test_hardening_exposure(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    result = subprocess.run(
        [analyzer(), "security", "--offline=true", f"--root={root}", "--no-pager", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for shardon\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(1)) <= 4.0, result.stdout  # systemd rates up to 4.9 "OK"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert setting(key) == "yes"
    assert setting("ProtectSystem") == "strict"
    assert setting("StateDirectory") == "shardon"  # the one writable path under ProtectSystem=strict
    assert setting("KillMode") == "mixed"  # SIGTERM to Shardon alone: backends serve until it drained
    example = load_config(EXAMPLE, environ={})
    assert seconds(setting("TimeoutStopSec")) > example.server.drain_timeout_s + example.backend_stop_grace_s


def test_exec_start_serves_the_example_config_and_drains_on_kill_signal(tmp_path: Path) -> None:
    state = tmp_path / "state"  # stands for StateDirectory=shardon
    state.mkdir()
    config = tmp_path / "etc" / "shardon.yaml"
    config.parent.mkdir()
    shutil.copy(EXAMPLE, config)
    argv = shlex.split(setting("ExecStart"))
    assert argv[1:] == ["serve", "--config", "/etc/shardon/shardon.yaml"]
    argv = [str(Path(sys.executable).with_name("shardon")), *argv[1:-1], str(config)]

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDON_")}
    for key, value in service_settings():
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val.replace(STATE, str(state))
    port = free_port()
    env.update(SHARDON_SERVER_HOST="127.0.0.1", SHARDON_SERVER_PORT=str(port))
    assert env["SHARDON_STORE_PATH"] == str(state / "shardon.db")

    log = tmp_path / "shardon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=state, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:

            def healthy() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                        return bool(json.loads(resp.read())["status"] == "ok")
                except OSError:
                    return False

            wait_until(healthy, timeout=30, interval=0.1)
            proc.send_signal(getattr(signal, setting("KillSignal")))
            code = proc.wait(seconds(setting("TimeoutStopSec")))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert code == 0, text
    assert "draining" in text, text
    assert (state / "shardon.db").exists()  # the request log went where the unit says
