"""Fairness: a quiet tenant's time-to-first-token while a noisy tenant floods the same model.

The node is simulated, and behaves like llama.cpp's server with ``--parallel N`` (or vLLM):

- ``N`` slots (``--slots``, default 8); a request arriving when all are busy waits in the node's
  own FIFO queue;
- prefill takes ``PREFILL_BASE + prompt_tokens * PREFILL_PER_TOKEN`` seconds (5 ms + 0.25 ms/token:
  a 200-token prompt takes 55 ms), stretched by ``1 + PREFILL_CONTENTION * (busy - 1)`` because
  prefill shares each batch step with the slots that are decoding (2% per other busy slot);
- each output token then takes ``TPOT_BASE * (1 + TPOT_CONTENTION * (busy - 1))`` seconds (20 ms,
  +3% per other busy slot): per-token time grows mildly with the batch;
- answers stream as SSE, one event per token; the node records busy slot-seconds.

Load, for ``--duration`` seconds: a quiet tenant sends 1 request/s and a noisy tenant 32 requests/s
(each: a 200-token prompt, 64 output tokens), far more than the node serves (about 5 requests/s).
Tenants are told apart by the trusted ``X-Tenant-ID`` header.

Three runs on a fresh node each:

1. ``alone``: the quiet tenant only, through Shardon;
2. ``fifo``: both tenants through Shardon with ``scheduler.policy: fifo`` (a plain FIFO line);
3. ``shardon``: both tenants through Shardon's default policy (DRR + headroom).

Reported per run: the quiet tenant's TTFT p50/p99 (client side, first content event) and its
failures, the noisy tenant's completed requests, and the node's slot utilisation (busy slot-seconds
over slots x the load window). Targets: through Shardon, quiet p99 within 1.10x of alone, utilisation at
least 85%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFILL_BASE = 0.005
PREFILL_PER_TOKEN = 0.00025
PREFILL_CONTENTION = 0.02
TPOT_BASE = 0.020
TPOT_CONTENTION = 0.03
PROMPT_TOKENS = 200
OUTPUT_TOKENS = 64


# -- the simulated node ------------------------------------------------------------------------
class SimNode:
    def __init__(self, slots: int) -> None:
        self.slots = slots
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
            await asyncio.sleep(
                (PREFILL_BASE + prompt_tokens * PREFILL_PER_TOKEN) * (1 + PREFILL_CONTENTION * (self.busy - 1))
            )
            for i in range(max_tokens):
                event = json.dumps({"object": "text_completion", "choices": [{"index": 0, "text": f"t{i} "}]})
                data = f"data: {event}\n\n".encode()
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
                await asyncio.sleep(TPOT_BASE * (1 + TPOT_CONTENTION * (self.busy - 1)))
            tail = b"data: [DONE]\n\n"
            writer.write(f"{len(tail):x}\r\n".encode() + tail + b"\r\n0\r\n\r\n")
            await writer.drain()
        finally:
            self.release()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                path = lines[0].split(" ")[1]
                if path == "/stats":
                    self._account()
                    out = json.dumps(
                        {
                            "busy_seconds": self.busy_seconds,
                            "elapsed": time.perf_counter() - self.started,
                            "slots": self.slots,
                        }
                    ).encode()
                    await _json_response(writer, out)
                    continue
                if not path.startswith("/v1/completions"):
                    out = b'{"object":"list","data":[{"id":"m1","object":"model"}]}'
                    await _json_response(writer, out)
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


async def _json_response(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    await writer.drain()


def node_main(port: int, slots: int) -> None:
    async def serve() -> None:
        node = SimNode(slots)
        server = await asyncio.start_server(node.handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# -- load ----------------------------------------------------------------------------------------
async def _request(port: int, tenant: str, results: list[tuple[str, float | None, int]]) -> None:
    body = json.dumps(
        {"model": "m1", "prompt": "x" * (PROMPT_TOKENS * 4), "stream": True, "max_tokens": OUTPUT_TOKENS}
    ).encode()
    start = time.perf_counter()
    ttft = None
    status = 0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            + f"X-Tenant-ID: {tenant}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if ttft is None and b'"text"' in data:
                ttft = time.perf_counter() - start
            if b"[DONE]" in data or b"\r\n0\r\n\r\n" in data:
                break
        writer.close()
    except (OSError, asyncio.IncompleteReadError):
        pass
    results.append((tenant, ttft if status == 200 else None, status, start))


async def _node_stats(node_port: int) -> dict[str, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", node_port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    return dict(json.loads(body))


async def _load(port: int, duration: float, noisy_rps: float, node_port: int) -> dict[str, Any]:
    results: list[tuple[str, float | None, int]] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    first = await _node_stats(node_port)

    async def sender(tenant: str, rps: float) -> None:
        n = 0
        while True:
            due = start + n / rps
            if due - start >= duration:
                return
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.ensure_future(_request(port, tenant, results)))
            n += 1

    senders = [sender("quiet", 1.0)]
    if noisy_rps > 0:
        senders.append(sender("noisy", noisy_rps))
    await asyncio.gather(*senders)
    # Utilisation over the load window only (not the start-up nor the drain of the backlog).
    last = await _node_stats(node_port)
    await asyncio.wait(tasks, timeout=60)
    util = (last["busy_seconds"] - first["busy_seconds"]) / (last["slots"] * (last["elapsed"] - first["elapsed"]))
    return {"results": results, "utilisation": util}


def load_main(port: int, duration: float, noisy_rps: float, node_port: int) -> None:
    print(json.dumps(asyncio.run(_load(port, duration, noisy_rps, node_port))))


# -- orchestration -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int) -> None:
    for _ in range(400):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing on port {port}")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def scenario(name: str, policy: str, noisy_rps: float, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="shardon-fair-"))
    node_port, gw_port = free_port(), free_port()
    taskset = ["taskset", "-c", "1"] if args.pin else []
    node = subprocess.Popen([*taskset, sys.executable, __file__, "--node", str(node_port), str(args.slots)])
    config = {
        "server": {"port": gw_port},
        "log": {"level": "warning", "access_log": False},
        "store": {"path": str(tmp / "db.sqlite")},
        "auth": {"trust_tenant_header": True},
        "scheduler": {"policy": policy, "queue_timeout_s": args.deadline, "max_queue_size": 100000},
        "nodes": [
            {"id": "sim", "url": f"http://127.0.0.1:{node_port}", "models": ["m1"], "max_concurrent": args.slots}
        ],
    }
    (tmp / "cfg.yaml").write_text(json.dumps(config))
    gw = subprocess.Popen(
        [
            *(["taskset", "-c", "0"] if args.pin else []),
            sys.executable,
            "-m",
            "shardon",
            "serve",
            "--config",
            str(tmp / "cfg.yaml"),
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
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
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=args.duration + 120,
        ).stdout
        load = json.loads(out.strip().splitlines()[-1])
        results = load["results"]
    finally:
        for proc in (gw, node):
            proc.terminate()
            proc.wait(10)
    quiet = [r for r in results if r[0] == "quiet"]
    if os.environ.get("FAIRNESS_DEBUG"):
        t0 = min(r[3] for r in results)
        print(
            name,
            "slowest quiet (sent at s, ttft s):",
            sorted(((round(r[3] - t0, 2), r[1]) for r in quiet), key=lambda x: -(x[1] or 1e9))[:6],
        )
    ttfts = [r[1] * 1000 for r in quiet if r[1] is not None]
    noisy_ok = sum(1 for r in results if r[0] == "noisy" and r[2] == 200)
    util = load["utilisation"]
    return {
        "name": name,
        "quiet_p50": pct(ttfts, 50),
        "quiet_p99": pct(ttfts, 99),
        "quiet_sent": len(quiet),
        "quiet_failed": len(quiet) - len(ttfts),
        "noisy_ok": noisy_ok,
        "utilisation": util,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=40)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--noisy-rps", type=float, default=32)
    parser.add_argument("--deadline", type=float, default=30)
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--node", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        node_main(*args.node)
        return
    if args.load:
        load_main(int(args.load[0]), float(args.load[1]), float(args.load[2]), int(args.load[3]))
        return
    print(
        f"# fairness: {args.slots} slots, quiet 1 req/s vs noisy {args.noisy_rps:g} req/s, {args.duration:g}s per run"
    )
    rows = [
        scenario("alone", "fair", 0, args),
        scenario("fifo", "fifo", args.noisy_rps, args),
        scenario("shardon", "fair", args.noisy_rps, args),
    ]
    for r in rows:
        print(
            f"{r['name']:8s} quiet TTFT p50 {r['quiet_p50']:8.1f} ms  p99 {r['quiet_p99']:8.1f} ms  "
            f"quiet failed {r['quiet_failed']}/{r['quiet_sent']}  noisy served {r['noisy_ok']}  "
            f"slot utilisation {r['utilisation'] * 100:5.1f}%"
        )
    alone, fifo, fair = rows
    print(
        f"quiet p99 vs alone: fifo {fifo['quiet_p99'] / alone['quiet_p99']:.2f}x, "
        f"shardon {fair['quiet_p99'] / alone['quiet_p99']:.2f}x (target <= 1.10); "
        f"shardon utilisation {fair['utilisation'] * 100:.1f}% (target >= 85%)"
    )
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
