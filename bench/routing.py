"""Routing: time to first token when the nodes keep a prefix cache, by routing policy.

The nodes are simulated, each like a llama.cpp server or vLLM with prefix caching:

- ``--slots`` requests at once (Shardon's ``max_concurrent`` for the node is the same);
- a prefix cache of ``--cache-kb`` thousand characters: the conversation's text (``<role>content``
  of each message), in blocks of 64 characters, each block known by the hash of everything up to
  its end; least recently used blocks are evicted. After a request, its prompt and its answer are
  cached (the next turn's prompt begins with both);
- prefill, one at a time per node (it is compute-bound): ``PREFILL_BASE + PREFILL_PER_CHAR x`` the
  characters not cached, so a cached prefix shortens the time to first token in proportion to the
  share of the prompt it covers (3 ms + 0.05 ms a character: 2,000 characters uncached take 103 ms);
- then ``OUTPUT_TOKENS`` tokens, streamed, ``TPOT x (1 + 3% x (busy slots - 1))`` apart.

Load: ``--users`` users at once, each in multi-turn chats (``TURNS`` turns, then a new chat), a
think time (exponential, mean ``--think`` s) between turns; each chat starts with one of
``SYSTEM_PROMPTS`` shared system prompts (about 2,000 characters), and every user message is new
text of about 250 characters. Each turn sends the whole conversation so far, as chat clients do.

For each policy (``least_conn``, ``round_robin``, ``prefix_affinity``) a fresh set of nodes and a
fresh Shardon, ``--warmup`` s of load not counted (the caches fill), then ``--duration`` s counted:
TTFT p50/p99 (client side: request sent → first content event), requests completed per second,
the prefix-cache hit share (cached characters over prompt characters, from the nodes) and the load
spread: each node's time-averaged requests in flight, the busiest node's over the mean of all.
Target: prefix affinity's TTFT p50 at least 30% under least connections', its max/mean in-flight at
most 1.25. Method and figures: bench/README.md.

    python bench/routing.py [--nodes 4] [--slots 8] [--users 48] [--duration 40] [--warmup 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from harness import free_port, get_json, json_response, pct, read_request, start_shardon, wait_port  # noqa: E402

PREFILL_BASE = 0.003
PREFILL_PER_CHAR = 0.00005
TPOT = 0.015
TPOT_CONTENTION = 0.03
OUTPUT_TOKENS = 32
CACHE_BLOCK = 64
SYSTEM_PROMPTS = 4
TURNS = 6
POLICIES = ("least_conn", "round_robin", "prefix_affinity")


# -- the simulated node ----------------------------------------------------------------------------
def blocks(text: str) -> list[int]:
    """The hashes of ``text``'s full blocks, each of everything up to the block's end."""
    out = []
    h = 0
    for i in range(0, len(text) - CACHE_BLOCK + 1, CACHE_BLOCK):
        h = hash((h, text[i : i + CACHE_BLOCK]))
        out.append(h)
    return out


class SimNode:
    def __init__(self, slots: int, cache_chars: int) -> None:
        self.slots = slots
        self.capacity = max(1, cache_chars // CACHE_BLOCK)
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.busy = 0
        self.waiters: list[asyncio.Future[None]] = []
        self.prefill_free_at = 0.0
        self.inflight_seconds = 0.0  # integral of requests in flight (held or waiting) over time
        self.inflight = 0
        self.prompt_chars = 0
        self.cached_chars = 0
        self.requests = 0
        self._last = time.perf_counter()

    def _account(self) -> None:
        now = time.perf_counter()
        self.inflight_seconds += self.inflight * (now - self._last)
        self._last = now

    def cached_prefix(self, hashes: list[int]) -> int:
        """Leading blocks in the cache (refreshed as used)."""
        n = 0
        cache = self.cache
        for h in hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            n += 1
        return n

    def remember(self, hashes: list[int]) -> None:
        cache = self.cache
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > self.capacity:
            cache.popitem(last=False)

    async def generate(self, writer: asyncio.StreamWriter, messages: list[dict[str, str]]) -> None:
        self._account()
        self.inflight += 1
        try:
            if self.busy >= self.slots:
                fut = asyncio.get_running_loop().create_future()
                self.waiters.append(fut)
                await fut
            else:
                self.busy += 1
            try:
                await self._run(writer, messages)
            finally:
                if self.waiters:
                    self.waiters.pop(0).set_result(None)
                else:
                    self.busy -= 1
        finally:
            self._account()
            self.inflight -= 1

    async def _run(self, writer: asyncio.StreamWriter, messages: list[dict[str, str]]) -> None:
        text = "".join(f"<{m.get('role')}>{m.get('content')}" for m in messages)
        hashes = blocks(text)
        cached = self.cached_prefix(hashes) * CACHE_BLOCK
        self.requests += 1
        self.prompt_chars += len(text)
        self.cached_chars += cached
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self.prefill_free_at)
        self.prefill_free_at = start + PREFILL_BASE + PREFILL_PER_CHAR * (len(text) - cached)
        await asyncio.sleep(self.prefill_free_at - now)
        answer = []
        for i in range(OUTPUT_TOKENS):
            word = f"answer{(len(text) + i) % 97:05d} "
            answer.append(word)
            delta = {"index": 0, "delta": {"content": word}}
            event = json.dumps({"object": "chat.completion.chunk", "choices": [delta]})
            data = f"data: {event}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            await asyncio.sleep(TPOT * (1 + TPOT_CONTENTION * (self.busy - 1)))
        tail = b"data: [DONE]\n\n"
        writer.write(f"{len(tail):x}\r\n".encode() + tail + b"\r\n0\r\n\r\n")
        await writer.drain()
        self.remember(blocks(text + "<assistant>" + "".join(answer)))

    def stats(self) -> dict[str, float]:
        self._account()
        return {
            "inflight_seconds": self.inflight_seconds,
            "at": time.perf_counter(),
            "prompt_chars": self.prompt_chars,
            "cached_chars": self.cached_chars,
            "requests": self.requests,
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                path, body = await read_request(reader)
                if path == "/stats":
                    await json_response(writer, json.dumps(self.stats()).encode())
                    continue
                if not path.startswith("/v1/chat/completions"):
                    await json_response(writer, b'{"object":"list","data":[{"id":"chat","object":"model"}]}')
                    continue
                messages = json.loads(body)["messages"]
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                await self.generate(writer, messages)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def nodes_main(ports: list[int], slots: int, cache_chars: int) -> None:
    async def serve() -> None:
        servers = []
        for port in ports:
            node = SimNode(slots, cache_chars)
            servers.append(await asyncio.start_server(node.handle, "127.0.0.1", port, backlog=4096))
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(serve())


# -- load ------------------------------------------------------------------------------------------
def system_prompt(i: int) -> str:
    rng = random.Random(1000 + i)
    words = ["policy", "order", "refund", "shipping", "account", "invoice", "warranty", "support", "store"]
    return f"You are assistant #{i} of a shop. " + " ".join(rng.choice(words) for _ in range(280))


def user_message(rng: random.Random, user: int, chat: int, turn: int) -> str:
    words = ["when", "does", "my", "parcel", "arrive", "can", "I", "return", "this", "item", "please", "help"]
    return f"[user {user} chat {chat} turn {turn}] " + " ".join(rng.choice(words) for _ in range(45))


async def _turn(port: int, messages: list[dict[str, str]]) -> tuple[float | None, str, str]:
    """One streamed request: its TTFT (None if it failed), the node that served it, the answer."""
    body = json.dumps({"model": "chat", "messages": messages, "stream": True, "max_tokens": OUTPUT_TOKENS}).encode()
    start = time.perf_counter()
    ttft = None
    node = ""
    answer = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        if head.split(" ", 2)[1] != "200":
            writer.close()
            return None, "", ""
        for line in head.split("\r\n"):
            if line.lower().startswith("x-shardon-node:"):
                node = line.split(":", 1)[1].strip()
        buffer = b""
        done = False
        while not done:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                at = event.find(b"data: ")
                if at < 0:
                    continue
                payload = event[at + 6 :]
                if payload.startswith(b"[DONE]"):
                    done = True
                    break
                choices = json.loads(payload).get("choices") or []
                content = choices[0].get("delta", {}).get("content") if choices else None
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    answer.append(content)
        writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return None, node, ""
    return ttft, node, "".join(answer)


async def _load(port: int, users: int, think: float, warmup: float, duration: float) -> dict[str, Any]:
    results: list[tuple[float, float | None, str]] = []
    began = time.perf_counter()
    count_from = began + warmup
    stop_at = count_from + duration
    prompts = [system_prompt(i) for i in range(SYSTEM_PROMPTS)]

    async def user(u: int) -> None:
        rng = random.Random(u)
        await asyncio.sleep(rng.uniform(0, think))
        chat = 0
        while time.perf_counter() < stop_at:
            messages = [{"role": "system", "content": prompts[(u + chat) % SYSTEM_PROMPTS]}]
            for turn in range(TURNS):
                if time.perf_counter() >= stop_at:
                    return
                messages.append({"role": "user", "content": user_message(rng, u, chat, turn)})
                sent = time.perf_counter()
                ttft, node, answer = await _turn(port, messages)
                results.append((sent, ttft, node))
                messages.append({"role": "assistant", "content": answer})
                await asyncio.sleep(rng.expovariate(1 / think))
            chat += 1

    await asyncio.gather(*(user(u) for u in range(users)))
    counted = [r for r in results if count_from <= r[0] < stop_at]
    return {"results": counted, "window": duration}


def load_main(port: int, users: int, think: float, warmup: float, duration: float) -> None:
    print(json.dumps(asyncio.run(_load(port, users, think, warmup, duration))))


# -- orchestration ---------------------------------------------------------------------------------
def node_stats(ports: list[int]) -> list[dict[str, float]]:
    async def all_stats() -> list[dict[str, float]]:
        return list(await asyncio.gather(*(get_json(p, "/stats") for p in ports)))

    return asyncio.run(all_stats())


def scenario(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="shardon-routing-"))
    node_ports = [free_port() for _ in range(args.nodes)]
    gw_port = free_port()
    load_cpu = ["taskset", "-c", "1"] if args.pin else []
    nodes = subprocess.Popen(
        [*load_cpu, sys.executable, __file__, "--serve-nodes", str(args.slots), str(args.cache_kb * 1000)]
        + [str(p) for p in node_ports]
    )
    config = {
        "server": {"port": gw_port},
        "log": {"level": "warning", "access_log": False},
        "store": {"path": str(tmp / "db.sqlite")},
        "demo": False,
        "scheduler": {"queue_timeout_s": 60, "max_queue_size": 100000},
        "nodes": [
            {"id": f"n{i}", "url": f"http://127.0.0.1:{p}", "models": ["chat"], "max_concurrent": 2 * args.slots}
            for i, p in enumerate(node_ports)
        ],
        "routing": {"chat": {"policy": policy}},
    }
    (tmp / "cfg.yaml").write_text(json.dumps(config))
    gateway = start_shardon(tmp / "cfg.yaml", pin=args.pin)
    try:
        for port in (*node_ports, gw_port):
            wait_port(port)
        time.sleep(0.5)
        load_args = [str(gw_port), str(args.users), str(args.think), str(args.warmup), str(args.duration)]
        load = subprocess.Popen(
            [*load_cpu, sys.executable, __file__, "--load", *load_args],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(args.warmup)
        first = node_stats(node_ports)
        time.sleep(args.duration)
        last = node_stats(node_ports)
        out, _ = load.communicate(timeout=args.duration + 120)
        results = json.loads(out.strip().splitlines()[-1])["results"]
    finally:
        for proc in (gateway, nodes):
            proc.terminate()
            proc.wait(10)
    ttfts = [r[1] * 1000 for r in results if r[1] is not None]
    averages = [
        (b["inflight_seconds"] - a["inflight_seconds"]) / (b["at"] - a["at"]) for a, b in zip(first, last, strict=True)
    ]
    prompt = sum(b["prompt_chars"] - a["prompt_chars"] for a, b in zip(first, last, strict=True))
    cached = sum(b["cached_chars"] - a["cached_chars"] for a, b in zip(first, last, strict=True))
    mean = sum(averages) / len(averages)
    return {
        "policy": policy,
        "p50": pct(ttfts, 50),
        "p99": pct(ttfts, 99),
        "throughput": len(ttfts) / args.duration,
        "failed": len(results) - len(ttfts),
        "hit": cached / prompt if prompt else 0.0,
        "spread": max(averages) / mean if mean else float("nan"),
        "inflight": averages,
    }


def hash_cost() -> str:
    """What prefix affinity's key costs on the request path: ``prefix_hashes`` of chat bodies of a few
    sizes, microseconds per call (best of 5 runs of 2,000)."""
    import timeit

    from shardon.routing.policies import prefix_hashes

    out = []
    for size in (2, 8, 32):
        text = "x" * (size * 1000)
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": text}]}).encode()
        best = min(timeit.repeat(lambda body=body: prefix_hashes(body), number=2000, repeat=5)) / 2000
        out.append(f"{size} KB {best * 1e6:.1f} us")
    return "prefix key: " + ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--think", type=float, default=1.0, help="mean think time between turns (s)")
    parser.add_argument("--cache-kb", type=int, default=96, help="prefix cache per node, thousands of characters")
    parser.add_argument("--duration", type=float, default=40)
    parser.add_argument("--warmup", type=float, default=8)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--serve-nodes", nargs="+", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_nodes:
        slots, cache_chars, *ports = args.serve_nodes
        nodes_main(ports, slots, cache_chars)
        return
    if args.load:
        port, users, think, warmup, duration = args.load
        load_main(int(port), int(users), float(think), float(warmup), float(duration))
        return
    print(
        f"# routing: {args.nodes} nodes x {args.slots} slots, prefix cache {args.cache_kb}k chars each, "
        f"{args.users} users, think {args.think:g}s, {TURNS} turns a chat, {SYSTEM_PROMPTS} system prompts; "
        f"{args.warmup:g}s warm-up, {args.duration:g}s counted"
    )
    print(hash_cost())
    rows = {policy: scenario(policy, args) for policy in args.policies.split(",")}
    for r in rows.values():
        print(
            f"{r['policy']:16s} TTFT p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms  "
            f"{r['throughput']:6.1f} req/s  failed {r['failed']}  cache hit {r['hit'] * 100:5.1f}%  "
            f"max/mean in-flight {r['spread']:.2f}  ({' '.join(f'{x:.2f}' for x in r['inflight'])})"
        )
    if "least_conn" in rows and "prefix_affinity" in rows:
        lc, pa = rows["least_conn"], rows["prefix_affinity"]
        print(
            f"prefix affinity vs least connections: TTFT p50 {(1 - pa['p50'] / lc['p50']) * 100:.0f}% lower "
            f"(target >= 30%), p99 {(1 - pa['p99'] / lc['p99']) * 100:.0f}% lower, throughput "
            f"{pa['throughput'] / lc['throughput']:.2f}x; max/mean in-flight {pa['spread']:.2f} (target <= 1.25)"
        )
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
