"""deploy/Containerfile, built and run for real with podman (root, Debian's podman and runc).

No registry is needed: the base image is made here from Debian packages (``debootstrap
--variant=minbase`` with python3, from the mirror this machine's apt uses), imported with ``podman
import`` and kept under a tag that names its recipe, so later runs on the same machine reuse it.
The wheels Shardon depends on are downloaded on this machine and handed to the build
(``PIP_ARGS=--no-index --find-links /wheels``); the builder stage compiles the Cython core itself.

One build, one container: it answers a chat completion and a stream from a mock node on this
machine (host network), runs as the non-root user without a compiler, passes its health check and
``shardon doctor``, and ``podman stop`` drains it: the stream in flight finishes, a new request
gets 503, Shardon (PID 1) exits 0 within the stop timeout, and the request log is on the volume.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import free_port, node_entry, wait_until

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
# crun fails on this kind of machine's mixed cgroup setup; higher limits than these are refused.
PODMAN = ["podman", "--runtime", "runc"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]
SUITE = "bookworm"
BASE_RECIPE = f"debootstrap --variant=minbase --include=python3 {SUITE}; apt caches emptied"
BASE_TAG = f"localhost/shardon-test-base:{SUITE}-{hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:12]}"
UID = 10001


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args[:3])}: {result.stderr[-3000:]}"
    return result


def tools_present() -> None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    assert not missing, f"{', '.join(missing)} not installed: run .ci/system-packages (README 'Test it')"
    assert os.geteuid() == 0, "the container test runs podman and debootstrap as root"


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    apt = Path("/etc/apt")
    sources = [
        *sorted(apt.glob("sources.list.d/*.sources")),
        apt / "sources.list",
        *sorted(apt.glob("sources.list.d/*.list")),
    ]
    for path in sources:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if line.startswith("URIs:"):
                uris = [u for u in words[1:] if "security" not in u]
                if uris:
                    return uris[0]
            elif words[:1] == ["deb"]:
                uri = next((w for w in words[1:] if "://" in w), None)
                if uri and "security" not in uri:
                    return uri
    return "http://deb.debian.org/debian"


def base_image() -> str:
    """The Debian base image with python3, built once per machine (reused while its tag exists)."""
    if podman("image", "exists", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    with tempfile.TemporaryDirectory(prefix="shardon-base-", dir="/var/tmp") as work:
        rootfs = Path(work) / "rootfs"
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(rootfs), apt_mirror()],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for entry in (rootfs / cache).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tarball = Path(work) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True, timeout=300)
        podman("import", str(tarball), BASE_TAG, timeout=300)
    return BASE_TAG


def download_wheels(base: str, dest: Path) -> None:
    """Wheels of Shardon's build and run dependencies, for the base image's Python."""
    version = podman(
        "run", "--rm", *ULIMITS, base, "python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [*project["build-system"]["requires"], "wheel", *project["project"]["dependencies"]]
    machine = platform.machine()
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in range(36, 4, -1)]
    platforms += [f"manylinux2014_{machine}", f"manylinux1_{machine}"]
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest), "--only-binary=:all:"]
    argv += ["--implementation", "cp", "--python-version", version.stdout.strip()]
    argv += [arg for p in platforms for arg in ("--platform", p)]
    result = subprocess.run(
        [*argv, *requirements],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tools_present()
    base = base_image()
    wheels = tmp_path_factory.mktemp("wheels")
    download_wheels(base, wheels)
    tag = f"localhost/shardon-test:{os.getpid()}"
    podman(
        "build", "--format", "docker", "--network", "host", "--layers=false", *ULIMITS,
        "-v", f"{wheels}:/wheels:ro",
        "--build-arg", f"BASE_IMAGE={base}",
        "--build-arg", "PIP_ARGS=--no-index --find-links /wheels",
        "-f", str(CONTAINERFILE), "-t", tag, str(ROOT),
        timeout=1200,
    )  # fmt: skip
    yield tag
    podman("rmi", "--force", tag, check=False)


def inspect(image: str) -> dict[str, Any]:
    """The image's config (podman reports the health check next to it, docker inside it)."""
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    return {"Healthcheck": info.get("Healthcheck"), **info["Config"]}


def ask(port: int, body: dict[str, Any], timeout: float = 15) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def health(port: int) -> str | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return str(json.loads(conn.getresponse().read())["status"])
    except (OSError, ValueError):
        return None
    finally:
        conn.close()


class Stream(threading.Thread):
    """A streamed completion read in the background: its events, and when the first arrived."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.first = threading.Event()
        self.events: list[bytes] = []
        self.status = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
            resp = conn.getresponse()
            self.status = resp.status
            while line := resp.readline():
                if line.startswith(b"data: "):
                    self.events.append(line.strip())
                    self.first.set()
        except BaseException as exc:
            self.error = exc
        finally:
            conn.close()
            self.first.set()


@pytest.mark.timeout(1800)
def test_image_is_multi_stage_non_root_with_health_check_and_volumes(image: str) -> None:
    config = inspect(image)
    assert config["User"] == f"{UID}:{UID}"
    assert set(config["Volumes"]) == {"/etc/shardon", "/var/lib/shardon"}
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert config["Entrypoint"] == ["shardon"]
    assert config["Cmd"] == ["serve", "--config", "/etc/shardon/shardon.yaml"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["SHARDON_STORE_PATH"] == "/var/lib/shardon/shardon.db"
    # The runtime stage has no compiler (the builder stage had one); the compiled core loads.
    tools = podman("run", "--rm", *ULIMITS, "--entrypoint", "sh", image, "-c", "command -v gcc cc cython || true")
    assert tools.stdout.strip() == ""
    doctor = podman("run", "--rm", *ULIMITS, "--network", "none", image, "doctor", "--json", check=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["compiled core"]["status"] == "ok", checks["compiled core"]
    assert checks["data dir"]["status"] == "ok", checks["data dir"]  # /var/lib/shardon, as user 10001


@pytest.mark.timeout(1800)
def test_container_serves_and_drains_on_stop(image: str, make_mock: Any, tmp_path: Path) -> None:
    node = make_mock(models=["m1"], chunks=30, delay_ms=100, name="n")
    port = free_port()
    etc, data = tmp_path / "etc", tmp_path / "data"
    etc.mkdir(mode=0o755)
    data.mkdir()
    os.chown(data, UID, UID)
    (etc / "shardon.yaml").write_text(
        yaml.safe_dump(
            {"server": {"host": "127.0.0.1", "drain_timeout_s": 20}, "nodes": [node_entry(node, "n", ["m1"])]}
        )
    )
    name = f"shardon-test-{os.getpid()}"
    podman(
        "run", "--detach", "--name", name, *ULIMITS, "--network", "host",
        "--env", f"SHARDON_SERVER_PORT={port}",  # the port the health check asks, too
        "-v", f"{etc}:/etc/shardon:ro", "-v", f"{data}:/var/lib/shardon",
        image,
    )  # fmt: skip
    try:
        wait_until(lambda: health(port) == "ok", timeout=60, interval=0.2)
        # Who runs: Shardon itself is PID 1, as the unprivileged user.
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        assert "shardon serve" in podman("exec", name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ")
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        doctor = podman("exec", name, "shardon", "doctor", "--config", "/etc/shardon/shardon.yaml", check=False)
        assert doctor.returncode == 0, doctor.stdout

        node.config.chunks = 3
        status, body = ask(port, {"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"]
        node.config.chunks = 30

        stream = Stream(port)
        stream.start()
        assert stream.first.wait(15) and stream.error is None
        stopped: dict[str, Any] = {}

        def stop() -> None:
            started = time.monotonic()
            stopped["result"] = podman("stop", "--time", "40", name, check=False, timeout=90)
            stopped["seconds"] = time.monotonic() - started

        stopper = threading.Thread(target=stop, daemon=True)
        stopper.start()
        wait_until(lambda: health(port) == "draining", timeout=10, interval=0.05)
        status, body = ask(port, {"model": "m1", "messages": [{"role": "user", "content": "late"}]})
        assert status == 503, body
        assert stream.is_alive()  # the stream is still running while the gateway drains
        stopper.join(90)
        stream.join(30)
        assert stopped["result"].returncode == 0, stopped["result"].stderr
        assert stopped["seconds"] < 40  # drained and exited, not killed at the timeout
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0, podman("logs", name).stderr[-3000:]
        assert stream.status == 200 and stream.error is None
        assert stream.events[-1] == b"data: [DONE]" and len(stream.events) >= 30, stream.events[-3:]
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "--force", name, check=False)
    assert "draining: 1 request(s) in flight" in logs.stdout + logs.stderr

    with sqlite3.connect(data / "shardon.db") as db:
        statuses = sorted(row[0] for row in db.execute("SELECT status FROM requests"))
    assert statuses == [200, 200, 503]  # the request log is on the volume, every request in it
