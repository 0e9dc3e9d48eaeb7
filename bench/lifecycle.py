"""Model lifecycle benchmark: what loading a model on demand costs through Shardon's manager.

Measures, with the real llama-cpp-python server on a tiny generated GGUF model (CPU):

1. Cold start: ``LifecycleManager.ensure_ready()`` call -> first streamed token from the returned
   endpoint, against the same backend started by hand (``subprocess.Popen`` + polling ``/v1/models``
   every 20 ms + the same streamed request).
2. Swap: with a memory budget for one model, model A loaded, ``ensure_ready(B)`` -> first token from B
   (A evicted: stopped, B started), against stopping A and starting B by hand.

Each figure is the median (and min) over ``--rounds`` rounds, by-hand and manager runs alternating,
after one warm-up round. The target: through the manager, the first token comes within 0.1 s of
starting by hand. Bounded in time (``--budget-s``, default 180 s).

    python bench/lifecycle.py [--rounds 5] [--budget-s 180]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardon.lifecycle.backends import free_port
from shardon.lifecycle.config import GpusConfig, LifecycleConfig, ModelConfig
from shardon.lifecycle.manager import LifecycleManager
from shardon.lifecycle.tiny_gguf import write_tiny_gguf

CONTEXT = 256


def first_token(url: str, model: str) -> None:
    """Stream a chat completion and return once the first chunk carrying content arrives."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    )
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        while True:
            line = resp.readline()
            if not line:
                raise RuntimeError("stream ended without a token")
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0].get("delta", {})
                if "content" in delta:
                    return
    finally:
        conn.close()


def start_by_hand(path: str, name: str, log_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", path, "--model_alias", name,
        "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "false",
        "--n_ctx", str(CONTEXT), "--n_gpu_layers", "0",
    ]  # fmt: skip
    with open(os.path.join(log_dir, f"{name}-by-hand.log"), "wb") as log:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("backend exited")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.02)
    raise RuntimeError("backend not ready")


def stop_by_hand(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def by_hand_cold(path: str, log_dir: str) -> float:
    t0 = time.perf_counter()
    proc, url = start_by_hand(path, "a", log_dir)
    try:
        first_token(url, "a")
        return time.perf_counter() - t0
    finally:
        stop_by_hand(proc)


def by_hand_swap(path_a: str, path_b: str, log_dir: str) -> float:
    proc_a, url_a = start_by_hand(path_a, "a", log_dir)
    first_token(url_a, "a")
    t0 = time.perf_counter()
    stop_by_hand(proc_a)
    proc_b, url_b = start_by_hand(path_b, "b", log_dir)
    try:
        first_token(url_b, "b")
        return time.perf_counter() - t0
    finally:
        stop_by_hand(proc_b)


async def manager_round(path_a: str, path_b: str, state_dir: str) -> tuple[float, float]:
    """(cold start, swap) through one fresh manager with a budget for one model."""
    models = [
        ModelConfig(name="a", path=path_a, context=CONTEXT, memory_mb=300),
        ModelConfig(name="b", path=path_b, context=CONTEXT, memory_mb=300),
    ]
    config = LifecycleConfig(
        models_dir=os.path.join(state_dir, "none"),
        models=models,
        gpus=GpusConfig(cpu_memory_budget_mb=500),
        demo=False,
    )
    loop = asyncio.get_running_loop()
    mgr = LifecycleManager(
        config, state_dir=state_dir, loop=loop, on_ready=lambda e: None, on_stopped=lambda m, n: None
    )
    mgr.start()
    await asyncio.sleep(
        0.2
    )  # let start-up work (stale clean-up, header reads) finish, as in a running gateway
    try:
        t0 = time.perf_counter()
        ep = await mgr.ensure_ready("a")
        await asyncio.to_thread(first_token, ep.url, ep.served_name)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ep = await mgr.ensure_ready("b")
        await asyncio.to_thread(first_token, ep.url, ep.served_name)
        swap = time.perf_counter() - t0
        return cold, swap
    finally:
        mgr.close()


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms   min {min(xs) * 1000:7.1f} ms   (n={len(xs)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=180.0)
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget_s
    with tempfile.TemporaryDirectory(prefix="shardon-bench-") as tmp:
        path_a = write_tiny_gguf(os.path.join(tmp, "tiny-a.gguf"), seed=0)
        path_b = write_tiny_gguf(os.path.join(tmp, "tiny-b.gguf"), seed=1)
        results: dict[str, list[float]] = {"hand_cold": [], "hand_swap": [], "mgr_cold": [], "mgr_swap": []}
        for rnd in range(args.rounds + 1):  # round 0 warms caches and is not counted
            if time.monotonic() > deadline:
                print(f"time budget spent after {rnd - 1} rounds")
                break
            hand_cold = by_hand_cold(path_a, tmp)
            hand_swap = by_hand_swap(path_a, path_b, tmp)
            mgr_cold, mgr_swap = asyncio.run(manager_round(path_a, path_b, os.path.join(tmp, f"state{rnd}")))
            if rnd:
                results["hand_cold"].append(hand_cold)
                results["hand_swap"].append(hand_swap)
                results["mgr_cold"].append(mgr_cold)
                results["mgr_swap"].append(mgr_swap)
        if not results["mgr_cold"]:
            print("no complete round")
            return 1
        print("Lifecycle (llama-cpp-python server, tiny GGUF, CPU); time to the first streamed token")
        print(f"  cold start  by hand     {fmt(results['hand_cold'])}")
        print(f"  cold start  manager     {fmt(results['mgr_cold'])}")
        print(f"  swap A->B   by hand     {fmt(results['hand_swap'])}")
        print(f"  swap A->B   manager     {fmt(results['mgr_swap'])}")
        d_cold = statistics.median(results["mgr_cold"]) - statistics.median(results["hand_cold"])
        d_swap = statistics.median(results["mgr_swap"]) - statistics.median(results["hand_swap"])
        overhead = f"cold {d_cold * 1000:+.1f} ms, swap {d_swap * 1000:+.1f} ms"
        print(f"  manager overhead: {overhead} (target < +100 ms)")
        return 0 if max(d_cold, d_swap) < 0.1 else 2


if __name__ == "__main__":
    raise SystemExit(main())
