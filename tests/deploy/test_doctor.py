"""``shardon doctor``: a good setup passes (exit 0); each failure it checks exits 1 and names the fix.

Most cases run the command in-process (``shardon.cli.main``) with the fact under test changed:
a config, PATH, a socket holding the port, a fake NVML. The compiled-core cases run the real
command in a subprocess on a copy of the package without its compiled modules.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardon import cli, doctor
from tests.support import free_port, node_entry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """A config that passes every check but the ones a test breaks (``sections`` replace defaults)."""

    def write(**sections: Any) -> Path:
        raw: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": free_port()},
            "store": {"path": str(tmp_path / "data" / "shardon.db")},
            "models_dir": str(tmp_path / "models"),
            "demo": False,
        }
        raw.update(sections)
        path = tmp_path / "shardon.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


def run(capsys: pytest.CaptureFixture[str], config: Path | None) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run ``shardon doctor --json``; (exit status, the checks by name)."""
    argv = ["doctor", "--json"] + (["--config", str(config)] if config is not None else [])
    code = cli.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == (code == 0)
    return code, {c["name"]: c for c in report["checks"]}


def failed(checks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: c for name, c in checks.items() if c["status"] == "fail"}


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer on machines with and without a GPU: NVML is not installed (a test may override)."""

    class Missing:
        def nvmlInit(self) -> None:
            raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(doctor, "nvml_module", Missing)


def test_good_setup(make_mock: Any, write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    node = make_mock(models=["m1"], name="n")
    config = write_config(nodes=[node_entry(node, "n", ["m1"])])
    code, checks = run(capsys, config)
    assert code == 0, checks
    assert not failed(checks)
    for name in ("python", "uvloop", "compiled core", "config", "gpus", "listen", "data dir", "node n"):
        assert checks[name]["status"] == "ok", checks[name]
    # The human report says the same.
    assert cli.main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("ready") and "FAIL" not in out


def test_old_python(monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path], capsys: Any) -> None:
    monkeypatch.setattr(doctor, "python_version", lambda: (3, 10, 12))
    code, checks = run(capsys, write_config())
    assert code == 1
    assert failed(checks).keys() == {"python"}
    assert "Python 3.11 or newer" in checks["python"]["fix"]


def test_no_uvloop(monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path], capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop → ImportError
    code, checks = run(capsys, write_config())
    assert code == 1
    assert failed(checks).keys() == {"uvloop"}
    assert checks["uvloop"]["fix"] == "pip install uvloop"


def run_on_copy(tmp_path: Path, config: Path, **env: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """``python -m shardon doctor --json`` on a copy of the package without its compiled modules."""
    copy = tmp_path / "pkg"
    shutil.copytree(ROOT / "shardon", copy / "shardon", ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    environ = {k: v for k, v in os.environ.items() if k != "SHARDON_NO_EXTENSIONS"}
    environ.update(env, PYTHONPATH=str(copy))
    result = subprocess.run(
        [sys.executable, "-W", "ignore::RuntimeWarning", "-m", "shardon", "doctor", "--json", "--config", str(config)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    return result.returncode, {c["name"]: c for c in report["checks"]}


def test_compiled_core_missing(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    code, checks = run_on_copy(tmp_path, write_config())
    assert code == 1
    assert failed(checks).keys() == {"compiled core"}
    assert "shardon.exchange" in checks["compiled core"]["detail"]
    assert "C compiler" in checks["compiled core"]["fix"]


def test_compiled_core_turned_off_is_a_warning(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    code, checks = run_on_copy(tmp_path, write_config(), SHARDON_NO_EXTENSIONS="1")
    assert code == 0
    assert checks["compiled core"]["status"] == "warn"
    assert checks["compiled core"]["fix"] == "unset SHARDON_NO_EXTENSIONS"


def test_bad_config(write_config: Callable[..., Path], capsys: Any) -> None:
    code, checks = run(capsys, write_config(server={"port": "eighty"}))
    assert code == 1
    assert failed(checks).keys() == {"config"}
    assert "server.port" in checks["config"]["detail"]
    assert "shardon check-config" in checks["config"]["fix"]
    # Nothing that needs the config is checked on a bad one.
    assert "listen" not in checks


class FakeNvml:
    """One GPU, index 0."""

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "Test GPU"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return type("Memory", (), {"total": 16 << 30, "free": 15 << 30})()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return type("Rates", (), {"gpu": 3})()


def test_gpu_groups_without_nvml(write_config: Callable[..., Path], capsys: Any) -> None:
    code, checks = run(capsys, write_config(gpus={"groups": {"fast": [0]}}))
    assert code == 1
    assert failed(checks).keys() == {"gpus"}
    assert "NVML unavailable" in checks["gpus"]["detail"]
    assert "NVIDIA driver" in checks["gpus"]["fix"] and "remove gpus.groups" in checks["gpus"]["fix"]


def test_gpu_groups_naming_an_absent_gpu(
    monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path], capsys: Any
) -> None:
    monkeypatch.setattr(doctor, "nvml_module", FakeNvml)
    code, checks = run(capsys, write_config(gpus={"groups": {"fast": [0]}}))
    assert code == 0
    assert "0: Test GPU" in checks["gpus"]["detail"]
    code, checks = run(capsys, write_config(gpus={"groups": {"fast": [0, 1]}}))
    assert code == 1
    assert failed(checks).keys() == {"gpus"}
    assert "gpus.groups.fast: GPU [1] not present" in checks["gpus"]["detail"]
    assert checks["gpus"]["fix"] == "correct gpus.groups"


def test_backend_missing_and_model_file_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_config: Callable[..., Path], capsys: Any
) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, checks = run(capsys, write_config(models=[{"name": "tiny", "path": str(model), "backend": "llama-server"}]))
    assert code == 1
    assert failed(checks).keys() == {"backend llama-server"}
    assert "needed by tiny" in checks["backend llama-server"]["detail"]
    assert "llama-server binary on PATH" in checks["backend llama-server"]["fix"]

    # Present on PATH: fine.
    (empty / "llama-server").write_text("#!/bin/sh\n")
    (empty / "llama-server").chmod(0o755)
    code, checks = run(capsys, write_config(models=[{"name": "tiny", "path": str(model), "backend": "llama-server"}]))
    assert code == 0, failed(checks)

    missing = str(tmp_path / "absent.gguf")
    code, checks = run(capsys, write_config(models=[{"name": "tiny", "path": missing, "backend": "llama-server"}]))
    assert code == 1
    assert failed(checks).keys() == {"model tiny"}
    assert missing in checks["model tiny"]["detail"]
    assert "correct the model's path" in checks["model tiny"]["fix"]


def test_port_taken(write_config: Callable[..., Path], capsys: Any) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, checks = run(capsys, write_config(server={"host": "127.0.0.1", "port": port}))
    assert code == 1
    assert failed(checks).keys() == {"listen"}
    assert f"127.0.0.1:{port}" in checks["listen"]["detail"]
    assert "server.port" in checks["listen"]["fix"]


@pytest.mark.parametrize("engine", ["native"])
def test_port_of_a_running_shardon_is_fine(make_gateway: Any, write_config: Callable[..., Path], capsys: Any) -> None:
    gw = make_gateway()
    code, checks = run(capsys, write_config(server={"host": "127.0.0.1", "port": gw.port}))
    assert code == 0, failed(checks)
    assert "served by a running Shardon" in checks["listen"]["detail"]


def test_data_dir_not_writable(tmp_path: Path, write_config: Callable[..., Path], capsys: Any) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, checks = run(capsys, write_config(store={"path": str(blocker / "sub" / "shardon.db")}))
    assert code == 1
    assert failed(checks).keys() == {"data dir"}
    assert "is not a directory" in checks["data dir"]["detail"]
    assert "store.path" in checks["data dir"]["fix"]


def test_node_unreachable_or_refusing(make_mock: Any, write_config: Callable[..., Path], capsys: Any) -> None:
    dead = {"id": "dead", "url": f"http://127.0.0.1:{free_port()}", "models": ["m1"]}
    code, checks = run(capsys, write_config(nodes=[dead]))
    assert code == 1
    assert failed(checks).keys() == {"node dead"}
    assert "cannot reach" in checks["node dead"]["detail"]
    assert checks["node dead"]["fix"] == "start the node, or correct nodes[0].url"

    locked = make_mock(models=["m1"], name="locked", require_api_key="node-secret")
    code, checks = run(capsys, write_config(nodes=[node_entry(locked, "locked", ["m1"])]))
    assert code == 1
    assert "answered 401" in checks["node locked"]["detail"]
    assert checks["node locked"]["fix"] == "check nodes[0].api_key"
    code, checks = run(capsys, write_config(nodes=[node_entry(locked, "locked", ["m1"], api_key="node-secret")]))
    assert code == 0, failed(checks)
