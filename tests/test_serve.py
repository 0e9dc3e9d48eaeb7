"""`shardon serve` as a user runs it: embedded defaults, SIGTERM draining on both engines, a
``kill -9`` under load and the restart after it (the demo model: tests/lifecycle/test_demo_model.py;
the drain's every case, in-process: tests/gateway/test_drain.py)."""

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
import yaml

from tests.support import (
    Start,
    dechunk,
    get,
    node_entry,
    post,
    raw_request,
    read_until,
    rows,
    serving,
    wait_until,
)


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


def config_file(tmp_path: Path, node: Any, **sections: Any) -> str:
    """A config with the mock node ``node`` as its one node (model m1), and ``sections``."""
    path = tmp_path / f"shardon-{len(list(tmp_path.glob('shardon-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"nodes": [node_entry(node, "n", ["m1"], max_concurrent=64)], **sections}))
    return str(path)


@pytest.mark.parametrize("engine", ["native", "granian"])
def test_sigterm_drains_streams_and_refuses_new_requests(
    serve: Any, make_mock: Any, tmp_path: Path, engine: str
) -> None:
    node = make_mock(models=["m1"], chunks=8)
    proc, port = serve("--config", config_file(tmp_path, node, server={"engine": engine, "drain_timeout_s": 30}))
    url = f"http://127.0.0.1:{port}"
    # A stream under way: the client has 3 tokens, the node holds the rest until the test lets it go.
    with raw_request(port, b'{"model":"m1","prompt":"x","stream":true,"mock":{"hold_after":3}}') as stream:
        assert read_until(stream, lambda got: dechunk(got)[0].count(b"data: ") == 3).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        # While draining: new requests are refused with 503, health says so.
        wait_until(lambda: get(url, "/health")[0] == 503)
        assert json.loads(get(url, "/health")[2])["status"] == "draining"
        status, _, body = post(url, "/v1/completions", {"model": "m1", "prompt": "y"})
        assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
        assert proc.poll() is None  # still running: the stream is not done
        node.gate.open()
        rest, ended = dechunk(read_until(stream, lambda got: dechunk(got)[1]))
    assert ended and rest.endswith(b"data: [DONE]\n\n")  # the running stream finished whole
    assert proc.wait(15) == 0


def test_a_killed_gateway_loses_at_most_the_last_flush_window(serve: Any, make_mock: Any, tmp_path: Path) -> None:
    """``kill -9`` under load, then a restart on the same data: every request answered before the
    last flush window has its row (the backlog is replayed), none twice."""
    node = make_mock(models=["m1"], chunks=1)
    window = 0.2
    config = config_file(tmp_path, node, store={"flush_interval_ms": int(window * 1000)}, log={"access_log": False})
    proc, port = serve("--config", config)
    url = f"http://127.0.0.1:{port}"
    answered: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        body = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":1}'
        while not stop.is_set():
            try:
                status, headers, _ = post(url, "/v1/chat/completions", body)
            except OSError:
                return  # the gateway is gone
            assert status == 200
            answered.append((time.monotonic(), headers["x-request-id"]))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for thread in clients:
        thread.start()
    wait_until(lambda: len(answered) >= 600, timeout=60)
    proc.kill()
    killed = time.monotonic()
    stop.set()
    for thread in clients:
        thread.join(30)
    proc.wait(10)
    _, port = serve("--config", config)
    logged = all_ids(f"http://127.0.0.1:{port}")
    assert len(logged) == len(set(logged))  # replayed once
    lost = [(killed - at, rid) for at, rid in answered if rid not in set(logged)]
    # The rows lost are those of the requests answered last: within the flush window before the
    # kill (and a second's grace for a writer thread the two busy cores made late).
    assert all(age < window + 1.0 for age, _ in lost), sorted(lost)[-3:]
    assert len(logged) >= len(answered) - len(lost) > 0


def all_ids(url: str) -> list[str]:
    """Every request id in the request log, page by page."""
    ids: list[str] = []
    while True:
        page = rows(url, f"limit=1000&offset={len(ids)}")["data"]
        ids += [r["id"] for r in page]
        if len(page) < 1000:
            return ids


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
