"""`shardon serve` as a user runs it: embedded defaults, and SIGTERM draining (the demo model:
tests/lifecycle/test_demo_model.py)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Start, serving, wait_until


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Start]:
    with serving(tmp_path) as start:
        yield start


def test_embedded_default_answers_chat(serve: Any) -> None:
    import openai

    _, port = serve()
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as client:
        models = [m.id for m in client.models.list()]
        assert "mock-model" in models
        reply = client.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content


def test_sigterm_drains_streams_and_refuses_new_requests(serve: Any, tmp_path: Path) -> None:
    proc, port = serve(env={"SHARDON_SERVER_DRAIN_TIMEOUT_S": "10"})
    body = json.dumps({"model": "mock-model", "prompt": "x", "stream": True, "mock": {"chunks": 30, "delay_ms": 30}})
    result: dict[str, Any] = {}

    def stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        result["status"] = resp.status
        result["body"] = resp.read()
        conn.close()

    thread = threading.Thread(target=stream)
    thread.start()
    time.sleep(0.2)  # the stream is under way (30 chunks x 30 ms)
    proc.send_signal(signal.SIGTERM)

    # While draining: new requests are refused with 503, health says so.
    def refused() -> bool:
        try:
            status, raw = _get(port, "/health")
            return status == 503 and json.loads(raw)["status"] == "draining"
        except OSError:
            return False

    wait_until(refused, timeout=3)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", "/v1/completions", body=b'{"model":"mock-model","prompt":"y"}')
    resp = conn.getresponse()
    assert resp.status == 503
    assert json.loads(resp.read())["error"]["code"] == "shutting_down"
    conn.close()
    thread.join(15)
    assert result["status"] == 200
    assert result["body"].rstrip().endswith(b"data: [DONE]")  # the running stream finished whole
    assert proc.wait(15) == 0


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "shardon", "serve", "--port", str(port)],
            env={**os.environ, "XDG_DATA_HOME": str(tmp_path), "SHARDON_DEMO": "false"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr


@pytest.mark.slow
def test_backends_die_with_a_killed_gateway(serve: Any, tmp_path: Path) -> None:
    """A gateway killed with SIGKILL cannot stop its backends: the kernel does (PR_SET_PDEATHSIG)."""
    pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server] (the demo or llama extra)")
    from shardon.lifecycle.tiny_gguf import write_tiny_gguf

    models = tmp_path / "models"
    models.mkdir()
    write_tiny_gguf(models / "tiny.gguf")
    proc, port = serve(env={"SHARDON_MODELS_DIR": str(models), "SHARDON_SCHEDULER_QUEUE_TIMEOUT_S": "60"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    conn.request("GET", "/admin/models")
    (row,) = json.loads(conn.getresponse().read())["data"]
    conn.close()
    backend = row["pid"]
    assert row["state"] == "ready" and Path(f"/proc/{backend}").exists()
    proc.kill()
    proc.wait(10)

    def gone() -> bool:
        try:
            return Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_until(gone, timeout=15)
