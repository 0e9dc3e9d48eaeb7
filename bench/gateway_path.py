"""The gateway's own Python cost per request, without sockets or an HTTP server.

What it measures: µs of CPU per non-streamed chat completion spent in Shardon's Python: the native
HTTP engine's protocol (``--engine``; ``none`` calls ``Gateway.__call__`` directly with an in-memory
RSGI ``proto``), the gateway (auth, decode, admission, the upstream connection's httptools parsing,
the receipt hash, the request-log append, metrics), on one uvloop in this process. Clients are
``--concurrency`` keep-alive connections whose transports hand the response back and send the next
request on the next loop iteration; the node is a real `UpstreamConnection` whose transport answers
every request with a canned 16-token response on the next iteration. Reported: wall µs per request
(all of it this process's CPU: nothing else runs, no syscall is made), best of ``--repeat`` runs.

It isolates what Shardon adds on top of the HTTP engine and the kernel, so a change to the data
path can be judged in seconds and without the noise of a loaded machine; ``bench/proxy.py`` is the
end-to-end figure. ``--profile`` prints the top functions (cProfile, which itself slows the run);
``--count`` prints the Python and C function calls made per request, a figure that does not move
with the machine's noise (a shared 2-core VM varies by 30% from minute to minute).

    python bench/gateway_path.py [--requests 40000] [--concurrency 64] [--engine native|none]
                                 [--log] [--access-log] [--no-metrics] [--profile] [--count] [--no-compact]

``--access-log`` adds the access log (to a file in the temporary directory): fed by the request log's
writer with ``--log``, else by its own queue; its thread's CPU counts with the request log's.

Instruction counts (deterministic, unlike the µs): run it under ``valgrind --tool=callgrind`` with
``--repeat 1 --no-compact`` for ``--requests`` N and 2N; the difference of the two totals divided by
2N (each run also makes a warm-up pass) is instructions per request, the process's threads included.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import uvloop

from shardon.app import Gateway
from shardon.config import Config
from shardon.httpd import NativeServer
from shardon.httpd.connection import Headers, HTTPConnection, Request
from shardon.metrics import Metrics
from shardon.store import AccessLog, RequestLog
from shardon.upstream.connection import NodePool, UpstreamConnection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import thread_cpu

REQUEST = b'{"model": "m1", "messages": [{"role": "user", "content": "Hello there, how are you?"}], "max_tokens": 16}'
ANSWER = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m1","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 tok8 tok9 tok10 '
    b'tok11 tok12 tok13 tok14 tok15 "},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,'
    b'"completion_tokens":16,"total_tokens":23}}'
)
RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
HEADERS = [(b"Host", b"127.0.0.1:8080"), (b"Content-Type", b"application/json"), (b"Content-Length", b"107")]


class AnsweringTransport:
    """Stands in for the node's socket: every request written is answered on the next iteration."""

    def __init__(self, conn: UpstreamConnection, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.loop = loop
        self.closing = False

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.conn.data_received, RESPONSE)

    def writelines(self, parts: Any) -> None:
        self.write(b"")

    def abort(self) -> None:
        self.closing = True
        self.conn.connection_lost(None)

    close = abort

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def log_threads_cpu() -> float:
    """CPU seconds of this process's request-log threads (writer ``shardon-store``, compactor
    ``shardon-store-c``) and access-log thread (``shardon-access``)."""
    return thread_cpu(os.getpid(), "shardon-store") + thread_cpu(os.getpid(), "shardon-access")


def fill_pool(pool: NodePool, count: int) -> None:
    """Give the node's pool ``count`` idle connections to the answering fake node."""
    for _ in range(count):
        conn = UpstreamConnection(pool)
        conn.connection_made(AnsweringTransport(conn, pool.loop))  # type: ignore[arg-type]
        pool._busy.add(conn)
        pool._put_idle(conn)


CLIENT_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(REQUEST) + REQUEST
)


class ClientTransport:
    """One keep-alive client connection: each response received is followed by the next request."""

    def __init__(
        self, conn: HTTPConnection, loop: asyncio.AbstractEventLoop, requests: int, done: asyncio.Future[None]
    ) -> None:
        self.conn = conn
        self.loop = loop
        self.left = requests
        self.done = done

    def start(self) -> None:
        self.conn.connection_made(self)  # type: ignore[arg-type]
        self.loop.call_soon(self.conn.data_received, CLIENT_REQUEST)

    def write(self, data: bytes) -> None:
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        self.left -= 1
        if self.left > 0:
            self.loop.call_soon(self.conn.data_received, CLIENT_REQUEST)
        elif not self.done.done():
            self.done.set_result(None)

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if name in ("peername", "sockname") else default


class Client:
    """The RSGI ``proto`` of one request: the body given, the response kept."""

    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = 0

    async def __call__(self) -> bytes:
        return REQUEST

    def client_disconnect(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status

    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> Any:
        raise AssertionError("not streamed here")


async def run(args: argparse.Namespace) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="shardon-path-"))
    raw = {
        # As under a saturating load, the compactor waits (for a lull that this run does not have):
        # otherwise a slow run (a profiler, callgrind) would count SQLite writes that a loaded
        # gateway defers.
        "store": {"path": str(tmp / "log.db"), "busy_rows_per_s": 1},
        "request_log": args.log,
        "demo": False,
        "models_dir": str(tmp / "none"),
        "scheduler": {"max_queue_size": 100000},
        "nodes": [{"id": "n", "url": "http://127.0.0.1:9", "models": ["m1"], "max_concurrent": 4096}],
    }
    config = msgspec.convert(raw, Config)
    paths = config.data_paths()
    access_log = None
    if args.access_log:
        access_log = AccessLog(tmp / "access.log")
        access_log.start()
    request_log = None
    if args.log:
        request_log = RequestLog(paths.database, config.store, backlog=paths.backlog, access=access_log)
        request_log.start()
        if args.no_compact:  # stop the compactor: its SQLite work is deferred under load, and not counted
            request_log._cstop = True
            request_log._cwake.set()
            assert request_log._compactor_thread is not None
            request_log._compactor_thread.join(10)
    gateway = Gateway(
        config,
        request_log=request_log,
        metrics=Metrics(enabled=not args.no_metrics),
        access_log=access_log,
        paths=paths,
    )
    await gateway.startup()
    await gateway.registry.stop()  # no health checks against the fake node
    gc.collect()
    gc.freeze()  # as shardon.server.run does once started
    node = gateway.registry.nodes["n"]
    fill_pool(node.pool, args.concurrency * 2)
    loop = asyncio.get_running_loop()
    server = NativeServer(gateway, "127.0.0.1", 0)
    server.loop = loop
    scope = Request(HTTPConnection(server), "POST", "/v1/chat/completions", "", "1.1", Headers(HEADERS), True)

    per_client = args.requests // args.concurrency

    async def direct_client() -> None:
        for _ in range(per_client):
            proto = Client()
            await gateway(scope, proto)  # type: ignore[arg-type]
            assert proto.status == 200, proto.status

    async def http_client() -> None:
        done = loop.create_future()
        ClientTransport(HTTPConnection(server), loop, per_client, done).start()
        await done

    client = http_client if args.engine == "native" else direct_client

    async def one_run() -> None:
        await asyncio.gather(*(client() for _ in range(args.concurrency)))

    await one_run()  # warm-up
    best = float("inf")
    n = per_client * args.concurrency
    for _ in range(args.repeat):
        gc.collect()
        started, loop_cpu, threads_cpu = time.perf_counter(), time.thread_time(), log_threads_cpu()
        await one_run()
        wall = (time.perf_counter() - started) / n
        if wall < best:
            best = wall
            split = ((time.thread_time() - loop_cpu) / n, (log_threads_cpu() - threads_cpu) / n)
    print(
        f"of the best run, CPU per request: {split[0] * 1e6:.2f} µs in the event loop's thread, "
        f"{split[1] * 1e6:.2f} µs in the request log's writer and compactor and the access log's thread"
    )
    if args.count:
        counts = {"call": 0, "c_call": 0}

        def count(frame: Any, event: str, arg: Any) -> None:
            if event in counts:
                counts[event] += 1

        blocks = sys.getallocatedblocks()
        sys.setprofile(count)
        await one_run()
        sys.setprofile(None)
        n = per_client * args.concurrency
        print(
            f"per request: {counts['call'] / n:.1f} Python calls, {counts['c_call'] / n:.1f} C calls "
            f"(deterministic: what the code does, not how fast this machine is today); "
            f"heap blocks after the run {sys.getallocatedblocks() - blocks:+d}"
        )
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        await one_run()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    if args.no_compact:
        if request_log is not None:
            request_log._flush_to_backlog(10)  # the writer's part, not the compactor's
        if access_log is not None:
            access_log.flush(10)
        sys.stdout.flush()
        os._exit(0)
    await gateway.shutdown()
    if request_log is not None:
        await request_log.aclose()
    if access_log is not None:
        access_log.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--engine", choices=("native", "none"), default="native")
    parser.add_argument("--log", action="store_true", help="with the request log (its writer thread runs too)")
    parser.add_argument("--access-log", action="store_true", help="with the access log (its thread runs too)")
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--count", action="store_true", help="count Python and C function calls per request")
    parser.add_argument(
        "--no-compact",
        action="store_true",
        help="exit once the rows are in the backlog, skipping the SQLite compaction a loaded gateway defers "
        "(for instruction counts under callgrind; prints no figure)",
    )
    args = parser.parse_args()
    best = uvloop.run(run(args))
    print(
        f"gateway path: {best * 1e6:.2f} µs/request (best of {args.repeat}; {args.requests} requests, "
        f"{args.concurrency} concurrent; engine {args.engine}; log {'on' if args.log else 'off'}, "
        f"access log {'on' if args.access_log else 'off'}, "
        f"metrics {'off' if args.no_metrics else 'on'})"
    )


if __name__ == "__main__":
    main()
