"""Fairness: a quiet tenant's time-to-first-token while a noisy tenant floods the same model.

The node is simulated, and behaves like llama.cpp's server with ``--parallel N`` (or vLLM):
``N`` slots (``--slots``, default 8); a request arriving when all are busy waits in the node's own
FIFO queue; the first token comes when its prefill ends, then one token per decode step; answers
stream as SSE, one event per token; the node records busy slot-seconds. Two node models
(``--node-model``), ``busy`` counting the slots in use including the request's own:

- ``contended`` (default): prefill ``(15 ms + 0.15 ms x prompt tokens) x (1 + 0.10 x (busy - 1))``,
  each further token ``6 ms x (1 + 0.05 x busy)``, every step stretched by a log-normal jitter
  (sigma 0.05): a real engine that slows as more requests share the GPU. With 7 other busy slots
  a 200-token prompt's prefill takes about 77 ms, against 45 ms alone.
- ``steady``: prefill ``(5 ms + 0.25 ms x prompt tokens) x (1 + 0.02 x (busy - 1))``, each token
  ``20 ms x (1 + 0.03 x (busy - 1))``, no jitter.

Load, for ``--duration`` seconds: a quiet tenant sends 1 request/s and a noisy tenant 32 requests/s,
Poisson arrivals (``--arrivals even``: evenly spaced), each a streamed completion of a 200-token
prompt and 64 output tokens, far more than the node serves (about 13 requests/s on the contended
model); clients give up after ``--client-timeout`` (30 s) and the gateway's queue deadline is the
same. Tenants are told apart by the trusted ``X-Tenant-ID`` header.

One run per entry of ``--runs``, each on a fresh node and gateway: ``alone`` (the quiet tenant only),
``fifo`` (``scheduler.policy: fifo``, a plain line), ``h0``..``hN`` (``headroom_slots: N``) and ``auto``
(the default, adaptive headroom). Reported per run: the quiet tenant's TTFT p50/p99 (client side,
first content event) and failures; its queue wait p99 from the request log (``dispatched_at -
received_at``, the whole wait for one never dispatched); the noisy tenant's completed streams; the
node's slot use (busy slot-seconds over slots x the load window). Targets (issue 17): quiet TTFT p99
at most 1.5x alone, slot use at least 85%, quiet queue wait p99 at most 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness import free_port, get_json, json_response, pct, read_request, start_shardon, wait_port  # noqa: E402

PROMPT_TOKENS = 200
OUTPUT_TOKENS = 64


@dataclass(frozen=True)
class NodeModel:
    prefill_base: float  # seconds
    prefill_per_token: float
    prefill_per_other_busy: float  # stretch per other busy slot
    tpot_base: float  # seconds per further token
    tpot_per_busy: float  # stretch per busy slot...
    tpot_counts_self: bool  # ...counting the request's own slot or not
    jitter_sigma: float  # log-normal, per step

    def prefill(self, prompt_tokens: int, busy: int) -> float:
        base = self.prefill_base + prompt_tokens * self.prefill_per_token
        return base * (1 + self.prefill_per_other_busy * (busy - 1)) * self._jitter()

    def tpot(self, busy: int) -> float:
        others = busy if self.tpot_counts_self else busy - 1
        return self.tpot_base * (1 + self.tpot_per_busy * others) * self._jitter()

    def _jitter(self) -> float:
        return random.lognormvariate(0.0, self.jitter_sigma) if self.jitter_sigma else 1.0


NODE_MODELS = {
    "contended": NodeModel(0.015, 0.00015, 0.10, 0.006, 0.05, True, 0.05),
    "steady": NodeModel(0.005, 0.00025, 0.02, 0.020, 0.03, False, 0.0),
}


# -- the simulated node ------------------------------------------------------------------------
class SimNode:
    def __init__(self, slots: int, model: NodeModel) -> None:
        self.slots = slots
        self.model = model
        self.busy = 0
        self.waiters: list[asyncio.Future[None]] = []
        self.busy_seconds = 0.0
        self._last = time.perf_counter()
        self.started = time.perf_counter()

    def _account(self) -> None:
        now = time.perf_counter()
        self.busy_seconds += self.busy * (now - self._last)
        self._last = now

    async def acquire(self) -> None:
        if self.busy >= self.slots:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            await fut  # the slot is handed over by release()
            return
        self._account()
        self.busy += 1

    def release(self) -> None:
        if self.waiters:
            self.waiters.pop(0).set_result(None)  # slot passes straight to the next in the node's queue
            return
        self._account()
        self.busy -= 1

    async def generate(self, writer: asyncio.StreamWriter, prompt_tokens: int, max_tokens: int) -> None:
        await self.acquire()
        try:
            await asyncio.sleep(self.model.prefill(prompt_tokens, self.busy))
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(self.model.tpot(self.busy))
                event = json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": f"t{i} "}]})
                data = f"data: {event}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
            tail = b"data: [DONE]\n\n"
            writer.write(f"{len(tail):x}\r\n".encode() + tail + b"\r\n0\r\n\r\n")
            await writer.drain()
        finally:
            self.release()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                path, body = await read_request(reader)
                if path == "/stats":
                    self._account()
                    out = json.dumps(
                        {
                            "busy_seconds": self.busy_seconds,
                            "elapsed": time.perf_counter() - self.started,
                            "slots": self.slots,
                        }
                    ).encode()
                    await json_response(writer, out)
                    continue
                if not path.startswith("/v1/completions"):
                    out = b'{"object":"list","data":[{"id":"m1","object":"model"}]}'
                    await json_response(writer, out)
                    continue
                req = json.loads(body)
                prompt_tokens = max(1, len(req.get("prompt", "")) // 4)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                await self.generate(writer, prompt_tokens, int(req.get("max_tokens") or OUTPUT_TOKENS))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def node_main(port: int, slots: int, model: str) -> None:
    async def serve() -> None:
        node = SimNode(slots, NODE_MODELS[model])
        server = await asyncio.start_server(node.handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# -- load ----------------------------------------------------------------------------------------
Result = tuple[str, float | None, int, float, bool]  # tenant, TTFT (s), status, sent at, stream complete


async def _request(port: int, tenant: str, timeout: float, results: list[Result]) -> None:
    body = json.dumps(
        {"model": "m1", "prompt": "x" * (PROMPT_TOKENS * 4), "stream": True, "max_tokens": OUTPUT_TOKENS}
    ).encode()
    start = time.perf_counter()
    ttft: float | None = None
    status = 0
    done = False

    async def exchange() -> None:
        nonlocal ttft, status, done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                + f"X-Tenant-ID: {tenant}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            tail = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if ttft is None and b'"text"' in data:
                    ttft = time.perf_counter() - start
                data = tail + data  # a marker may straddle two reads
                if b"[DONE]" in data or b"\r\n0\r\n\r\n" in data:
                    done = b"[DONE]" in data
                    break
                tail = data[-8:]
        finally:
            writer.close()

    with contextlib.suppress(TimeoutError, OSError, asyncio.IncompleteReadError):
        await asyncio.wait_for(exchange(), timeout)
    results.append((tenant, ttft if status == 200 else None, status, start, done))


async def _load(port: int, duration: float, noisy_rps: float, node_port: int, spec: dict[str, Any]) -> dict[str, Any]:
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    rng = random.Random(spec["seed"])
    start = time.perf_counter()
    first = await get_json(node_port, "/stats")

    async def sender(tenant: str, rps: float) -> None:
        due = start
        while True:
            due += rng.expovariate(rps) if spec["poisson"] else 1.0 / rps
            if due - start >= duration:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(_request(port, tenant, spec["timeout"], results)))

    senders = [sender("quiet", 1.0)]
    if noisy_rps > 0:
        senders.append(sender("noisy", noisy_rps))
    await asyncio.gather(*senders)
    # Slot use over the load window only (not the start-up nor the drain of the backlog).
    last = await get_json(node_port, "/stats")
    if tasks:
        await asyncio.wait(tasks, timeout=spec["timeout"] + 30)
    use = (last["busy_seconds"] - first["busy_seconds"]) / (last["slots"] * (last["elapsed"] - first["elapsed"]))
    return {"results": results, "slot_use": use}


def load_main(port: int, duration: float, noisy_rps: float, node_port: int, spec: str) -> None:
    print(json.dumps(asyncio.run(_load(port, duration, noisy_rps, node_port, json.loads(spec)))))


# -- orchestration -------------------------------------------------------------------------------
def quiet_waits(gw_port: int, sent: int) -> list[float]:
    """The quiet tenant's queue waits (ms) from the request log, once every request has its row."""
    url = f"http://127.0.0.1:{gw_port}/admin/requests?tenant=quiet&limit=1000"
    rows: list[dict[str, Any]] = []
    for _ in range(100):
        with urllib.request.urlopen(url, timeout=10) as resp:
            rows = json.loads(resp.read())["data"]
        if len(rows) >= sent:
            break
        time.sleep(0.1)
    return [((r["dispatched_at"] or r["finished_at"] or r["received_at"]) - r["received_at"]) * 1000 for r in rows]


def scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    scheduler: dict[str, Any] = {"queue_timeout_s": args.client_timeout, "max_queue_size": 100000}
    noisy_rps = args.noisy_rps
    if name == "alone":
        noisy_rps = 0.0
    elif name == "fifo":
        scheduler["policy"] = "fifo"
    elif name.startswith("h"):
        scheduler["headroom_slots"] = int(name[1:])
    elif name != "auto":
        raise SystemExit(f"unknown run {name!r}: alone, fifo, h<N> or auto")
    tmp = Path(tempfile.mkdtemp(prefix="shardon-fair-"))
    node_port, gw_port = free_port(), free_port()
    taskset = ["taskset", "-c", "1"] if args.pin else []
    node = subprocess.Popen(
        [*taskset, sys.executable, __file__, "--node", str(node_port), str(args.slots), args.node_model]
    )
    config = {
        "server": {"port": gw_port},
        "log": {"level": "warning", "access_log": False},
        "store": {"path": str(tmp / "db.sqlite")},
        "auth": {"trust_tenant_header": True},
        "scheduler": scheduler,
        "demo": False,
        "nodes": [
            {"id": "sim", "url": f"http://127.0.0.1:{node_port}", "models": ["m1"], "max_concurrent": args.slots}
        ],
    }
    (tmp / "cfg.yaml").write_text(json.dumps(config))
    gw = start_shardon(tmp / "cfg.yaml", pin=args.pin)
    spec = {"seed": args.seed, "poisson": args.arrivals == "poisson", "timeout": args.client_timeout}
    try:
        wait_port(node_port)
        wait_port(gw_port)
        time.sleep(0.5)
        out = subprocess.run(
            [
                *taskset,
                sys.executable,
                __file__,
                "--load",
                str(gw_port),
                str(args.duration),
                str(noisy_rps),
                str(node_port),
                json.dumps(spec),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=args.duration + args.client_timeout + 120,
        ).stdout
        load = json.loads(out.strip().splitlines()[-1])
        results = load["results"]
        quiet = [r for r in results if r[0] == "quiet"]
        waits = quiet_waits(gw_port, len(quiet))
    finally:
        for proc in (gw, node):
            proc.terminate()
            proc.wait(10)
    if os.environ.get("FAIRNESS_DEBUG"):
        t0 = min(r[3] for r in results)
        print(
            name,
            "slowest quiet (sent at s, ttft s):",
            sorted(((round(r[3] - t0, 2), r[1]) for r in quiet), key=lambda x: -(x[1] or 1e9))[:6],
        )
    ttfts = [r[1] * 1000 for r in quiet if r[1] is not None]
    return {
        "name": name,
        "quiet_p50": pct(ttfts, 50),
        "quiet_p99": pct(ttfts, 99),
        "quiet_sent": len(quiet),
        "quiet_failed": len(quiet) - len(ttfts),
        "wait_p99": pct(waits, 99),
        "noisy_done": sum(1 for r in results if r[0] == "noisy" and r[4]),
        "slot_use": load["slot_use"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--noisy-rps", type=float, default=32)
    parser.add_argument("--client-timeout", type=float, default=30)
    parser.add_argument("--node-model", choices=sorted(NODE_MODELS), default="contended")
    parser.add_argument("--arrivals", choices=["poisson", "even"], default="poisson")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", default="alone,fifo,h0,h1,h2,h3,auto")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--node", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        node_main(int(args.node[0]), int(args.node[1]), args.node[2])
        return
    if args.load:
        load_main(int(args.load[0]), float(args.load[1]), float(args.load[2]), int(args.load[3]), args.load[4])
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # about 1,000 clients wait at once
    print(
        f"# fairness: {args.slots} slots ({args.node_model}), quiet 1 req/s vs noisy {args.noisy_rps:g} req/s "
        f"({args.arrivals}), {args.duration:g} s per run",
        flush=True,
    )
    rows = []
    alone = None
    for name in args.runs.split(","):
        r = scenario(name, args)
        rows.append(r)
        if name == "alone":
            alone = r
        ratio = f"{r['quiet_p99'] / alone['quiet_p99']:6.2f}x" if alone else "      -"
        print(
            f"{r['name']:6s} quiet TTFT p50 {r['quiet_p50']:8.1f} ms  p99 {r['quiet_p99']:8.1f} ms ({ratio} alone)  "
            f"queue wait p99 {r['wait_p99']:8.1f} ms  quiet failed {r['quiet_failed']}/{r['quiet_sent']}  "
            f"noisy completed {r['noisy_done']}  slot use {r['slot_use'] * 100:5.1f}%",
            flush=True,
        )
    print("targets: quiet p99 <= 1.5x alone, slot use >= 85%, quiet queue wait p99 <= 10 ms")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
