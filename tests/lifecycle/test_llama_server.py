"""The lifecycle with the real llama-cpp-python server on the tiny GGUF model (slow: real processes)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shardon.lifecycle.config import ModelConfig
from shardon.lifecycle.manager import InsufficientMemoryError, ModelLoadError
from tests.lifecycle.helpers import ManagerFactory, alive, fake_command, run_async, status_of, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

if importlib.util.find_spec("llama_cpp") is None:  # not imported here: the backend runs apart
    pytest.skip("llama-cpp-python[server] is not installed", allow_module_level=True)


def llama(name: str, path: str, **kw: object) -> ModelConfig:
    kw.setdefault("context", 256)
    return ModelConfig(name=name, path=path, **kw)  # type: ignore[arg-type]


def chat(url: str, model: str, content: str = "hello", max_tokens: int = 8) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


async def achat(url: str, model: str, max_tokens: int = 8) -> dict:
    return await asyncio.to_thread(chat, url, model, "hello", max_tokens)


@run_async
async def test_first_request_loads_and_is_answered(make_manager: ManagerFactory, tiny_gguf: str) -> None:
    mgr, ev = make_manager([llama("tiny", tiny_gguf, aliases=["t"])])
    t0 = time.monotonic()
    ep = await asyncio.wait_for(mgr.ensure_ready("t"), 60)
    load_s = time.monotonic() - t0
    assert ev.ready == [ep] and ep.model == "tiny" and ep.backend == "llama-cpp-python" and ep.slots == 1
    out = await achat(ep.url, ep.served_name)
    assert out["object"] == "chat.completion" and out["usage"]["completion_tokens"] >= 1
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    row = status_of(mgr, "tiny")
    assert row["state"] == "ready" and row["where"] == "cpu" and row["precision"] == "F32"
    assert row["memory_mb"] >= 64
    print(f"cold load through the manager: {load_s:.3f} s")


@run_async
async def test_twenty_concurrent_callers_one_load(make_manager: ManagerFactory, tiny_gguf: str) -> None:
    mgr, ev = make_manager([llama("tiny", tiny_gguf)])
    futs = [mgr.ensure_ready("tiny") for _ in range(20)]
    eps = await asyncio.wait_for(asyncio.gather(*futs), 60)
    assert len(set(eps)) == 1 and mgr.launch_count == 1 and len(ev.ready) == 1
    outs = await asyncio.gather(*(achat(eps[0].url, "tiny", 4) for _ in range(3)))
    assert all(o["choices"] for o in outs)


@run_async
async def test_idle_ttl_stops_the_process(make_manager: ManagerFactory, tiny_gguf: str) -> None:
    mgr, ev = make_manager([llama("tiny", tiny_gguf, idle_ttl_s=1.0)])
    ep = await asyncio.wait_for(mgr.ensure_ready("tiny"), 60)
    pid = status_of(mgr, "tiny")["pid"]
    mgr.request_started("tiny")
    await achat(ep.url, "tiny")
    mgr.request_finished("tiny")
    await wait_for(lambda: status_of(mgr, "tiny")["state"] == "unloaded", 10)
    assert not alive(pid) and ev.stopped == [("tiny", ep.node_id)]


@run_async
async def test_budget_for_one_model_swaps(make_manager: ManagerFactory, tiny_gguf: str, tiny_gguf_b: str) -> None:
    models = [llama("a", tiny_gguf, memory_mb=300), llama("b", tiny_gguf_b, memory_mb=300)]
    mgr, ev = make_manager(models, budget_mb=500)
    ep_a = await asyncio.wait_for(mgr.ensure_ready("a"), 60)
    pid_a = status_of(mgr, "a")["pid"]
    ep_b = await asyncio.wait_for(mgr.ensure_ready("b"), 60)
    assert not alive(pid_a)
    assert ev.log == [("ready", ep_a), ("stopped", ("a", ep_a.node_id)), ("ready", ep_b)]
    assert (await achat(ep_b.url, "b"))["choices"]
    assert mgr.gpus_status()["devices"][0]["free_mb"] == 200


@run_async
async def test_pinned_and_in_flight_are_never_evicted(make_manager: ManagerFactory, tiny_gguf: str) -> None:
    models = [
        llama("pinned", tiny_gguf, memory_mb=300, pinned=True),
        llama("busy", tiny_gguf, memory_mb=300),
        llama("third", tiny_gguf, memory_mb=300),
    ]
    mgr, _ = make_manager(models, budget_mb=700)
    await wait_for(lambda: status_of(mgr, "pinned")["state"] == "ready", 60)
    ep = await asyncio.wait_for(mgr.ensure_ready("busy"), 60)
    mgr.request_started("busy")
    with pytest.raises(InsufficientMemoryError, match=r"(?s)insufficient memory.*pinned: pinned.*in flight: busy"):
        await asyncio.wait_for(mgr.ensure_ready("third"), 60)
    assert (await achat(ep.url, "busy"))["choices"], "the busy backend kept serving"
    mgr.request_finished("busy")
    assert status_of(mgr, "pinned")["state"] == "ready" and status_of(mgr, "busy")["state"] == "ready"


@run_async
async def test_killed_backend_is_detected_and_reloaded(make_manager: ManagerFactory, tiny_gguf: str) -> None:
    mgr, ev = make_manager([llama("tiny", tiny_gguf)])
    ep1 = await asyncio.wait_for(mgr.ensure_ready("tiny"), 60)
    os.kill(status_of(mgr, "tiny")["pid"], signal.SIGKILL)
    await wait_for(lambda: ev.stopped == [("tiny", ep1.node_id)], 10)
    assert status_of(mgr, "tiny")["state"] == "failed"
    ep2 = await asyncio.wait_for(mgr.ensure_ready("tiny"), 60)
    assert ep2.node_id != ep1.node_id and mgr.launch_count == 2
    assert (await achat(ep2.url, "tiny"))["choices"]


@run_async
async def test_backend_that_never_gets_ready_fails(make_manager: ManagerFactory, tiny_gguf: str) -> None:
    stalled = ModelConfig(name="stuck", path=tiny_gguf, command=fake_command("stall"), stall_timeout_s=1.5)
    mgr, _ = make_manager([stalled])
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="stalled"):
        await asyncio.wait_for(mgr.ensure_ready("stuck"), 30)
    assert time.monotonic() - t0 < 4


@run_async
async def test_stale_llama_server_is_stopped_at_start(
    make_manager: ManagerFactory, tiny_gguf: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first, _ = make_manager([llama("tiny", tiny_gguf)], state_dir=str(state))
    await asyncio.wait_for(first.ensure_ready("tiny"), 60)
    pid = status_of(first, "tiny")["pid"]
    # Simulate a crash of the gateway: its backend survives, its pid file stays.
    record = json.loads((state / "backends" / "tiny.json").read_text())
    orphan = first._rt["tiny"].proc
    assert orphan is not None
    first._rt["tiny"].proc = None  # forget it without stopping it (as a crash would)
    first.close()
    assert alive(pid)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record["owner_pid"] = dead.pid  # the owner is gone
    (state / "backends" / "tiny.json").write_text(json.dumps(record))
    try:
        second, _ = make_manager([llama("tiny", tiny_gguf)], state_dir=str(state))
        await wait_for(lambda: not alive(pid), 15)
        ep = await asyncio.wait_for(second.ensure_ready("tiny"), 60)
        assert (await achat(ep.url, "tiny"))["choices"]
    finally:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
        orphan.popen.wait(10)  # reap it (in a real crash, init would)
    assert orphan.popen.returncode == -signal.SIGTERM


@run_async
async def test_measured_footprint_corrects_the_estimate(
    make_manager: ManagerFactory, tiny_gguf: str, tmp_path: Path
) -> None:
    state = str(tmp_path / "state")
    mgr, _ = make_manager([llama("tiny", tiny_gguf)], state_dir=state)
    await asyncio.wait_for(mgr.ensure_ready("tiny"), 60)
    estimate = 65  # 0.4 MB of weights + 0.5 MB of KV cache, +10%, +64 MB
    measurements = Path(state) / "measurements.json"

    def measured() -> int:
        if not measurements.exists():
            return 0
        return int(next(iter(json.loads(measurements.read_text()).values())).get("memory_mb", 0))

    await wait_for(measured, 10)
    rss = measured()
    assert rss > 10  # the python server process, llama.cpp and the model
    await wait_for(lambda: status_of(mgr, "tiny")["memory_mb"] == max(estimate, rss), 5)
    await asyncio.wait_for(mgr.unload("tiny"), 30)
    # Next load (even by another manager on the same state dir): the measurement, +10%.
    again, _ = make_manager([llama("tiny", tiny_gguf)], state_dir=state)
    await asyncio.wait_for(again.ensure_ready("tiny"), 60)
    assert status_of(again, "tiny")["memory_mb"] >= int(rss * 1.1)
