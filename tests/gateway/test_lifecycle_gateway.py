"""Models started on demand, end to end: the real llama-cpp-python server on a tiny GGUF model (a
load that fails: tests/lifecycle/test_load_failures.py, which needs no llama-cpp-python)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import call, post, wait_until

pytest.importorskip("llama_cpp.server", reason="needs llama-cpp-python[server] (the demo or llama extra)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from shardon.lifecycle.tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_tiny_gguf(path)
    return str(path)


def chat(model: str, max_tokens: int = 4) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    ).encode()


def models_by_name(gw: Any) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in call(gw.url, "GET", "/admin/models")[2]["data"]}


def test_first_request_loads_once_and_is_answered(make_gateway: Any, tiny_model: str, tmp_path: Path) -> None:
    gw = make_gateway(
        models=[{"name": "tiny", "path": tiny_model, "context": 256, "aliases": ["tiny-alias"], "idle_ttl_s": 300}],
        models_dir=str(tmp_path / "empty"),
        demo=False,
        scheduler={"queue_timeout_s": 60},
    )
    assert models_by_name(gw)["tiny"]["state"] == "unloaded"
    ids = [m["id"] for m in call(gw.url, "GET", "/v1/models")[2]["data"]]
    assert ids == ["tiny"]
    # Eight concurrent first requests (one via the alias): one load, all answered.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = [chat("tiny")] * 7 + [chat("tiny-alias")]
        results = list(pool.map(lambda b: post(gw.url, "/v1/chat/completions", b), bodies))
    assert [r[0] for r in results] == [200] * 8
    assert all(json.loads(r[2])["choices"][0]["message"] for r in results)
    assert gw.call(lambda: gw.gateway.lifecycle.launch_count) == 1
    row = models_by_name(gw)["tiny"]
    assert row["state"] == "ready" and row["pid"]
    # The request log knows which backend answered.
    rid = results[0][1]["x-request-id"]
    logged = wait_until(lambda: (r := call(gw.url, "GET", f"/admin/requests/{rid}"))[0] == 200 and r[2])
    assert logged["backend"] == "llama-cpp-python" and logged["node_id"].startswith("lifecycle:tiny")
    # The backend is a node of the one registry, from the lifecycle: drained, never deleted.
    (node,) = call(gw.url, "GET", "/admin/nodes")[2]["data"]
    assert node["id"] == logged["node_id"] and node["source"] == "lifecycle" and node["models"] == ["tiny"]
    assert call(gw.url, "DELETE", f"/admin/nodes/{node['id']}")[0] == 409
    # The CLI shows the same.
    out = subprocess.run(
        [sys.executable, "-m", "shardon", "ps", "--url", gw.url], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "tiny" in out.stdout and "ready" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "shardon", "models", "--url", gw.url, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and json.loads(out.stdout)[0]["name"] == "tiny"
    # Unload through the admin API: the process goes away; the next request loads it again.
    pid = row["pid"]
    assert call(gw.url, "POST", "/admin/models/tiny/unload")[0] == 200
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), timeout=15)
    assert post(gw.url, "/v1/chat/completions", chat("tiny"))[0] == 200
    assert gw.call(lambda: gw.gateway.lifecycle.launch_count) == 2


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_idle_ttl_unloads_and_budget_evicts(make_gateway: Any, tiny_model: str, tmp_path: Path) -> None:
    gw = make_gateway(
        models=[
            {"name": "a", "path": tiny_model, "context": 256, "idle_ttl_s": 300, "memory_mb": 600},
            {"name": "b", "path": tiny_model, "context": 256, "idle_ttl_s": 1, "memory_mb": 600},
        ],
        models_dir=str(tmp_path / "empty"),
        demo=False,
        gpus={"cpu_memory_budget_mb": 1000, "reserve_mb": 0},
        scheduler={"queue_timeout_s": 60},
    )
    assert post(gw.url, "/v1/chat/completions", chat("a"))[0] == 200
    assert models_by_name(gw)["a"]["state"] == "ready"
    # Room for one model: asking for b evicts idle a.
    assert post(gw.url, "/v1/chat/completions", chat("b"))[0] == 200
    states = models_by_name(gw)
    assert states["b"]["state"] == "ready" and states["a"]["state"] == "unloaded"
    # b's idle TTL is 1 s: it goes away by itself.
    wait_until(lambda: models_by_name(gw)["b"]["state"] == "unloaded", timeout=15)
