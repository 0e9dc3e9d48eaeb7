"""LifecycleManager with fake backends (fast): loading, dedup, failures, TTL, eviction, crashes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shardon.errors import ModelNotFound
from shardon.lifecycle.manager import InsufficientMemoryError, ModelLoadError
from tests.lifecycle.helpers import (
    FAKE_BACKEND,
    ManagerFactory,
    alive,
    fake_model,
    make_fake_nvml,
    run_async,
    status_of,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF-not-really")
    return str(p)


@run_async
async def test_ensure_ready_loads_and_reports(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("a", model_file, aliases=["alpha"])])
    assert mgr.knows("a") and mgr.knows("alpha") and not mgr.knows("b")
    assert mgr.resolve("alpha") == "a" and mgr.resolve("zzz") is None
    assert mgr.public_models() == ["a"]
    assert status_of(mgr, "a")["state"] == "unloaded"

    fut = mgr.ensure_ready("alpha")
    seen_on_resolve: list[int] = []
    fut.add_done_callback(lambda f: seen_on_resolve.append(len(ev.ready)))
    ep = await asyncio.wait_for(fut, 10)
    assert seen_on_resolve == [1], "on_ready must run before the future resolves"
    assert ev.ready == [ep]
    assert ep.model == "a" and ep.served_name == "a" and ep.url.startswith("http://127.0.0.1:")
    assert ep.slots == 1 and ep.backend == "llama-cpp-python"
    assert ep.model_file_sha256 is not None and len(ep.model_file_sha256) == 64
    assert get_json(ep.url + "/v1/models")["object"] == "list"
    env = get_json(ep.url + "/env")
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    row = status_of(mgr, "a")
    assert row["state"] == "ready" and row["where"] == "cpu" and row["pid"] == env["pid"]
    assert row["url"] == ep.url and row["memory_mb"] == 100 and row["error"] is None
    assert set(row) >= {"name", "state", "backend", "where", "memory_mb", "in_flight", "last_used", "pid",
                        "url", "precision", "pinned", "error"}  # fmt: skip
    # Ready: answered at once, same endpoint, no new launch.
    again = mgr.ensure_ready("a")
    assert again.done() and again.result() == ep
    assert mgr.launch_count == 1
    g = mgr.gpus_status()
    assert g["mode"] == "cpu" and g["groups"] == {"cpu": ["cpu"]}
    assert g["devices"][0]["total_mb"] == 8192


@run_async
async def test_unknown_model(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file)])
    with pytest.raises(ModelNotFound):
        await mgr.ensure_ready("nope")


@run_async
async def test_concurrent_callers_cause_one_load(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("a", model_file, "ok", "--ready-after", "0.3")])
    futs = [mgr.ensure_ready("a") for _ in range(20)]
    eps = await asyncio.wait_for(asyncio.gather(*futs), 10)
    assert len({e.node_id for e in eps}) == 1
    assert mgr.launch_count == 1 and len(ev.ready) == 1


@run_async
async def test_cancelled_waiter_does_not_cancel_the_load(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file, "ok", "--ready-after", "0.3")])
    f1, f2 = mgr.ensure_ready("a"), mgr.ensure_ready("a")
    f1.cancel()
    ep = await asyncio.wait_for(f2, 10)
    assert ep.model == "a" and mgr.launch_count == 1


@run_async
async def test_crash_during_start_fails_then_retries(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("a", model_file, "crash")])
    with pytest.raises(ModelLoadError, match=r"(?s)crashed during start-up .*exit code 3.*cannot load model"):
        await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    row = status_of(mgr, "a")
    assert row["state"] == "failed" and "exit code 3" in row["error"] and row["pid"] is None
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    assert mgr.launch_count == 2 and ev.ready == []


@run_async
async def test_stalled_backend_fails_within_stall_timeout(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file, "stall", stall_timeout_s=1.0)])
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="stalled"):
        await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    assert time.monotonic() - t0 < 3.0
    assert status_of(mgr, "a")["state"] == "failed"


@run_async
async def test_slow_but_talking_backend_is_not_a_stall(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file, "ok", "--ready-after", "1.5", stall_timeout_s=0.5)])
    ep = await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    assert ep.model == "a"


@run_async
async def test_ready_timeout_is_a_hard_cap(make_manager: ManagerFactory, model_file: str) -> None:
    model = fake_model("a", model_file, "ok", "--ready-after", "30", stall_timeout_s=10, ready_timeout_s=1.0)
    mgr, _ = make_manager([model])
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="not ready in time"):
        await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    assert time.monotonic() - t0 < 3.0


@run_async
async def test_missing_file_is_a_clear_error(make_manager: ManagerFactory, tmp_path: Path) -> None:
    mgr, _ = make_manager([fake_model("a", str(tmp_path / "absent.gguf"))])
    with pytest.raises(ModelLoadError, match="model file not found"):
        await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    assert mgr.launch_count == 0


@run_async
async def test_idle_ttl_unloads(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("a", model_file, idle_ttl_s=0.5)])
    ep = await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    pid = status_of(mgr, "a")["pid"]
    mgr.request_started("a")
    await asyncio.sleep(1.0)
    assert status_of(mgr, "a")["state"] == "ready", "in flight: never idle"
    mgr.request_finished("a")
    await wait_for(lambda: status_of(mgr, "a")["state"] == "unloaded", 5)
    assert not alive(pid)
    assert ev.stopped == [("a", ep.node_id)]
    assert not mgr.ensure_ready("a").done(), "after an unload the next call loads again"


@run_async
async def test_eviction_under_budget(make_manager: ManagerFactory, model_file: str) -> None:
    models = [fake_model("a", model_file, memory_mb=600), fake_model("b", model_file, memory_mb=600)]
    mgr, ev = make_manager(models, budget_mb=1000)
    ep_a = await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    pid_a = status_of(mgr, "a")["pid"]
    ep_b = await asyncio.wait_for(mgr.ensure_ready("b"), 10)
    assert ev.log == [("ready", ep_a), ("stopped", ("a", ep_a.node_id)), ("ready", ep_b)]
    assert not alive(pid_a)
    assert status_of(mgr, "a")["state"] == "unloaded" and status_of(mgr, "b")["state"] == "ready"


@run_async
async def test_in_flight_and_pinned_are_never_evicted(make_manager: ManagerFactory, model_file: str) -> None:
    models = [
        fake_model("pinned", model_file, memory_mb=400, pinned=True),
        fake_model("busy", model_file, memory_mb=400),
        fake_model("big", model_file, memory_mb=500),
    ]
    mgr, _ = make_manager(models, budget_mb=1000)
    await wait_for(lambda: status_of(mgr, "pinned")["state"] == "ready", 10)
    await asyncio.wait_for(mgr.ensure_ready("busy"), 10)
    mgr.request_started("busy")
    with pytest.raises(InsufficientMemoryError, match=r"insufficient memory.*pinned: pinned.*in flight: busy"):
        await asyncio.wait_for(mgr.ensure_ready("big"), 10)
    assert status_of(mgr, "pinned")["state"] == "ready" and status_of(mgr, "busy")["state"] == "ready"
    assert status_of(mgr, "big")["state"] == "failed"
    mgr.request_finished("busy")
    ep = await asyncio.wait_for(mgr.ensure_ready("big"), 10)  # now "busy" may go
    assert ep.model == "big" and status_of(mgr, "busy")["state"] == "unloaded"
    assert status_of(mgr, "pinned")["state"] == "ready"


@run_async
async def test_eviction_prefers_the_least_used(make_manager: ManagerFactory, model_file: str) -> None:
    models = [fake_model(n, model_file, memory_mb=300) for n in ("hot", "cold", "new")]
    mgr, _ = make_manager(models, budget_mb=700)
    await asyncio.wait_for(mgr.ensure_ready("cold"), 10)
    await asyncio.wait_for(mgr.ensure_ready("hot"), 10)
    for _ in range(20):
        mgr.request_started("hot")
        mgr.request_finished("hot")
    await asyncio.wait_for(mgr.ensure_ready("new"), 10)
    assert status_of(mgr, "cold")["state"] == "unloaded"
    assert status_of(mgr, "hot")["state"] == "ready"


@run_async
async def test_killed_backend_is_detected_and_reloaded(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("a", model_file)])
    ep1 = await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    pid = status_of(mgr, "a")["pid"]
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: ev.stopped == [("a", ep1.node_id)], 5)
    row = status_of(mgr, "a")
    assert row["state"] == "failed" and "exit code -9" in row["error"]
    ep2 = await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    assert ep2.node_id != ep1.node_id and mgr.launch_count == 2
    assert get_json(ep2.url + "/v1/models")


@run_async
async def test_pinned_crash_reloads_by_itself(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("p", model_file, pinned=True)])
    await wait_for(lambda: len(ev.ready) == 1, 10)
    os.kill(status_of(mgr, "p")["pid"], signal.SIGKILL)
    await wait_for(lambda: len(ev.ready) == 2, 10)
    assert status_of(mgr, "p")["state"] == "ready"


@run_async
async def test_admin_load_and_unload(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("a", model_file)])
    ep = await asyncio.wait_for(mgr.load("a"), 10)
    pid = status_of(mgr, "a")["pid"]
    await asyncio.wait_for(mgr.unload("a"), 10)
    assert not alive(pid) and status_of(mgr, "a")["state"] == "unloaded"
    assert ev.stopped == [("a", ep.node_id)]
    await asyncio.wait_for(mgr.unload("a"), 10)  # already unloaded: fine
    with pytest.raises(ModelNotFound):
        await mgr.unload("nope")


@run_async
async def test_unload_while_loading_cancels(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file, "ok", "--ready-after", "5")])
    fut = mgr.ensure_ready("a")
    await wait_for(lambda: status_of(mgr, "a")["pid"], 5)
    pid = status_of(mgr, "a")["pid"]
    await asyncio.wait_for(mgr.unload("a"), 10)
    with pytest.raises(ModelLoadError, match="cancelled"):
        await fut
    assert not alive(pid)


@run_async
async def test_sigterm_ignored_gets_sigkill(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file, "ok", "--ignore-term")], stop_grace_s=0.5)
    await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    pid = status_of(mgr, "a")["pid"]
    t0 = time.monotonic()
    await asyncio.wait_for(mgr.unload("a"), 10)
    assert not alive(pid) and 0.4 < time.monotonic() - t0 < 3


@run_async
async def test_close_stops_everything_and_is_idempotent(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file), fake_model("b", model_file, "ok", "--ready-after", "5")])
    await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    loading = mgr.ensure_ready("b")
    await wait_for(lambda: status_of(mgr, "b")["pid"], 5)
    pids = [status_of(mgr, n)["pid"] for n in ("a", "b")]
    t0 = time.monotonic()
    mgr.close()
    mgr.close()
    assert time.monotonic() - t0 < 5
    assert not any(alive(p) for p in pids)
    with pytest.raises(ModelLoadError):
        await asyncio.wait_for(loading, 5)
    with pytest.raises(ModelLoadError):
        await mgr.ensure_ready("a")


@run_async
async def test_stale_backend_from_a_crashed_gateway_is_stopped(
    make_manager: ManagerFactory, model_file: str, tmp_path: Path
) -> None:
    state = tmp_path / "state-stale"
    (state / "backends").mkdir(parents=True)
    argv = [sys.executable, FAKE_BACKEND, "--port", "1", "--mode", "stall"]
    stale = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    dead_owner = subprocess.Popen(["true"])
    dead_owner.wait()
    try:
        await asyncio.sleep(0.2)
        record = {
            "model": "a",
            "pid": stale.pid,
            "pgid": stale.pid,
            "cmdline": argv,
            "owner_pid": dead_owner.pid,
        }
        (state / "backends" / "a.json").write_text(json.dumps(record))
        # A pid file whose pid now belongs to an unrelated process (pid reuse) must not kill it.
        bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
        other = {"model": "b", "pid": bystander.pid, "cmdline": ["something", "else"], "start_time": 1}
        (state / "backends" / "b.json").write_text(json.dumps(other))
        mgr, _ = make_manager([fake_model("a", model_file)], state_dir=str(state))
        await wait_for(lambda: stale.poll() is not None, 10)
        assert stale.returncode == -signal.SIGTERM
        assert bystander.poll() is None
        await wait_for(lambda: not (state / "backends" / "b.json").exists(), 5)
        assert not (state / "backends" / "a.json").exists()
        await asyncio.wait_for(mgr.ensure_ready("a"), 10)  # works normally afterwards
        bystander.kill()
        bystander.wait()
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()


@run_async
async def test_pid_file_written_and_removed(make_manager: ManagerFactory, model_file: str, tmp_path: Path) -> None:
    state = tmp_path / "st"
    mgr, _ = make_manager([fake_model("a", model_file)], state_dir=str(state))
    await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    record = json.loads((state / "backends" / "a.json").read_text())
    assert record["pid"] == status_of(mgr, "a")["pid"] and record["owner_pid"] == os.getpid()
    assert record["cmdline"][1] == FAKE_BACKEND
    assert (state / "logs" / "a.log").read_text().startswith("fake backend starting")
    await asyncio.wait_for(mgr.unload("a"), 10)
    assert not (state / "backends" / "a.json").exists()


@run_async
async def test_gpu_placement_with_fake_nvml(make_manager: ManagerFactory, model_file: str) -> None:
    nvml = make_fake_nvml([("H100", 80000, 80000), ("H100", 80000, 80000), ("L4", 24000, 10000)])
    models = [
        fake_model("big", model_file, memory_mb=100000, gpu_group="fast"),
        fake_model("small", model_file, memory_mb=5000, gpu_group="small"),
        fake_model("any", model_file, memory_mb=60000),
    ]
    mgr, ev = make_manager(models, nvml=nvml, groups={"fast": [0, 1], "small": [2]}, reserve_mb=1000)
    g = mgr.gpus_status()
    assert g["mode"] == "nvml" and g["groups"] == {"fast": [0, 1], "small": [2]}
    assert [d["name"] for d in g["devices"]] == ["H100", "H100", "L4"]
    assert g["devices"][2]["free_mb"] == 10000 and g["devices"][0]["util_pct"] == 10
    ep_big = await asyncio.wait_for(mgr.ensure_ready("big"), 10)
    assert get_json(ep_big.url + "/env")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert status_of(mgr, "big")["where"] == "fast:0,1"
    ep_small = await asyncio.wait_for(mgr.ensure_ready("small"), 10)
    assert get_json(ep_small.url + "/env")["CUDA_VISIBLE_DEVICES"] == "2"
    # "any" (60 GB) fits nowhere next to "big" (50 GB on each H100) and both are busy.
    with pytest.raises(InsufficientMemoryError):
        # NVML still says 80 GB free on the H100s, but the accounting knows 50 GB each are promised.
        mgr.request_started("small")
        mgr.request_started("big")
        await asyncio.wait_for(mgr.ensure_ready("any"), 10)
    mgr.request_finished("small")
    mgr.request_finished("big")
    assert len(ev.ready) == 2


@run_async
async def test_gpu_memory_freed_is_awaited(make_manager: ManagerFactory, model_file: str) -> None:
    nvml = make_fake_nvml([("T4", 16000, 16000)])
    models = [fake_model("a", model_file, memory_mb=10000), fake_model("b", model_file, memory_mb=10000)]
    mgr, _ = make_manager(models, nvml=nvml, reserve_mb=500)
    await asyncio.wait_for(mgr.ensure_ready("a"), 10)
    nvml.gpus[0][2] = 6000  # the backend really took its memory
    loop = asyncio.get_running_loop()
    # The memory comes back 0.5 s after the stop only: "b" must not start before.
    t0 = time.monotonic()
    loop.call_later(0.5, lambda: nvml.gpus[0].__setitem__(2, 16000))
    await asyncio.wait_for(mgr.ensure_ready("b"), 10)
    assert time.monotonic() - t0 >= 0.45
    assert status_of(mgr, "a")["state"] == "unloaded"


@run_async
async def test_pinned_model_announced_once(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, ev = make_manager([fake_model("p", model_file, pinned=True, idle_ttl_s=0.2)])
    futs = [mgr.ensure_ready("p")]
    await wait_for(lambda: status_of(mgr, "p")["state"] == "ready", 10)
    futs.append(mgr.ensure_ready("p"))
    eps = await asyncio.wait_for(asyncio.gather(*futs), 10)
    await asyncio.sleep(0.5)  # pinned: the idle TTL does not apply
    assert len(set(eps)) == 1 and len(ev.ready) == 1 and mgr.launch_count == 1
    assert status_of(mgr, "p")["state"] == "ready" and status_of(mgr, "p")["pinned"] is True


@run_async
async def test_loop_side_calls_never_block(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file, "ok", "--ready-after", "1")])
    fut = mgr.ensure_ready("a")
    await wait_for(lambda: status_of(mgr, "a")["state"] == "loading", 5)
    t0 = time.perf_counter()
    for _ in range(1000):
        mgr.ensure_ready("a")
        mgr.models_status()
        mgr.gpus_status()
        mgr.knows("a")
    assert time.perf_counter() - t0 < 0.5  # ~0.1 ms per round, while the load is under way
    await asyncio.wait_for(fut, 10)
    t0 = time.perf_counter()
    for _ in range(10000):
        mgr.ensure_ready("a")  # ready: an already-resolved future
        mgr.request_started("a")
        mgr.request_finished("a")
    assert time.perf_counter() - t0 < 0.5


@run_async
async def test_ensure_ready_before_start_fails_clearly(make_manager: ManagerFactory, model_file: str) -> None:
    mgr, _ = make_manager([fake_model("a", model_file)], start=False)
    with pytest.raises(ModelLoadError, match="not running"):
        await mgr.ensure_ready("a")
