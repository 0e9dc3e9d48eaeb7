"""Proxy overhead: the same mock node reached directly, through nginx, and through Shardon.

What it measures, in one run so the ratios share the machine's noise:

1. Non-streaming: ``wrk -t1 -c64`` POSTs a small chat completion for ``--duration`` seconds, in
   ``--rounds`` interleaved rounds (medians reported), to
   (a) the mock node directly, (b) nginx in front of it (upstream keep-alive, buffering off), and
   (c) Shardon in front of it (its default native engine; with ``--granian`` also (d) Shardon on
   the granian engine, for comparison; with ``--haproxy`` also (e) HAProxy, a second reference
   proxy in C; with ``--access-log`` also (f) Shardon with its default log settings, the access
   log on, written to a file (the other Shardon targets run with ``access_log: false``); with
   ``--nginx-access-log`` also (g) nginx with its access log on, written to a file). Reported:
   requests/s, latency p50/p99 (wrk), the proxy's
   CPU use (from /proc, user+system, all its processes and threads, the request log's writer
   included) and requests per proxy-CPU-second.
2. Streaming: ``--streams`` concurrent streams of 64 chunks, 20 ms apart, started at once, through
   each target, ``--stream-rounds`` times (targets interleaved, after one uncounted warm-up burst
   each, whose TTFT p99 is printed as the cold figure); reported: medians over rounds of
   time-to-first-token p50/p99 and inter-chunk gap p50/p99 (client side), the difference each
   proxy adds to straight-to-node (the difference of the medians, and the median of the rounds'
   paired differences, each proxy's round against the direct round next to it), and Shardon's
   peak RSS under that load alone.

Placement: the proxy under test is pinned to core 0 (``taskset``); the node and the load
generators share core 1, so the proxy has one core to itself.

Needs ``wrk`` and ``nginx`` (``apt-get install wrk nginx``; ``haproxy`` for ``--haproxy``). Usage::

    python bench/proxy.py [--duration 6] [--rounds 3] [--streams 500] [--stream-rounds 3]
                          [--no-log] [--no-metrics] [--only stream|nonstream] [--granian] [--haproxy]
                          [--access-log] [--nginx-access-log]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROXY_CORE = "0"
LOAD_CORE = "1"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "Hello there, how are you?"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def steal_ticks() -> tuple[int, int]:
    """(steal, all) CPU ticks of the whole machine from ``/proc/stat`` ((0, 0) where there is none).

    Steal is time the hypervisor gave this VM's vCPUs to someone else: the figure that says a round
    ran in one of the shared machine's slow phases.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0, 0
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_since(start: tuple[int, int]) -> str:
    steal, total = steal_ticks()
    elapsed = total - start[1]
    return f"steal {100.0 * (steal - start[0]) / elapsed:.1f}%" if elapsed > 0 else "steal n/a"


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate ``procs``, killing any still running 10 s later."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def children(pid: int) -> list[int]:
    out = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int) -> None:
    """Restart the kernel's peak-RSS count (VmHWM) of ``pid`` at its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        print(f"(cannot reset the peak RSS of {pid}: {exc}; the figure below is the lifetime peak)")


def run_wrk(url: str, duration: int, connections: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


NGINX_CONF = """
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {access_log};
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream node {{ server 127.0.0.1:{node_port}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""

# HAProxy as nginx is set up above: one thread, kept-alive node connections shared by all clients,
# no buffering delay (``http-no-delay``: without it, HAProxy held each streamed chunk for ~200 ms).
HAPROXY_CONF = """
global
    maxconn 8192
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option http-no-delay
    http-reuse always
frontend bench
    bind 127.0.0.1:{port}
    default_backend node
backend node
    server node 127.0.0.1:{node_port}
"""


# -- streaming client (runs in its own process on the load core) ------------------------------
STREAM_BODY = json.dumps(
    {"model": "m1", "prompt": "x", "stream": True, "max_tokens": 64, "mock": {"chunks": 64, "delay_ms": 20}}
).encode()


STREAM_REQUEST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(STREAM_BODY)}\r\n\r\n".encode()
    + STREAM_BODY
)


class _StreamProbe(asyncio.Protocol):
    """One stream, measured from its ``data_received`` callbacks.

    A bare protocol, not ``asyncio`` streams: 500 streams of 64 chunks are 25,000 reads a second on
    the core the node also runs on, and a ``StreamReader`` with a ``wait_for`` per read cost several
    times what this does, so the load generator, not the proxy, set the tails (gap p50 0 ms:
    events piled up unread). Times are ``perf_counter`` (uvloop's clock has ms resolution).
    """

    def __init__(self, ttfts: list[float], gaps: list[float], errors: list[str], done: asyncio.Future[None]) -> None:
        self.ttfts, self.gaps, self.errors, self.done = ttfts, gaps, errors, done
        self.transport: asyncio.Transport | None = None
        self.start = 0.0
        self.last = 0.0
        self.events = 0
        self.tail = b""  # the end of the last read, for a "data: " or "[DONE]" split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(STREAM_REQUEST)  # type: ignore[attr-defined]
        self.start = time.perf_counter()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        seen = self.tail + data
        n = seen.count(b"data: ")
        if n:
            if self.events == 0:
                self.ttfts.append(now - self.start)
            else:
                self.gaps.append(now - self.last)
                self.gaps.extend([0.0] * (n - 1))  # events that came in the same read
            self.last = now
            self.events += n
        if b"[DONE]" in seen:
            self._end()
            return
        self.tail = seen[-6:].replace(b"data: ", b"")  # never count one event twice

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.errors.append(repr(exc))
        self._end()

    def _end(self) -> None:
        if self.done.done():
            return
        if self.events < 64:
            self.errors.append(f"short stream: {self.events} events")
        self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def _one_stream(
    port: int, ttfts: list[float], gaps: list[float], errors: list[str], connects: list[float] | None = None
) -> None:
    """One stream on a new connection, measured into the lists given; a failure is an error.

    ``connects``: how long the TCP connect took (not part of the TTFT, which starts once connected).
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        began = time.perf_counter()
        await loop.create_connection(lambda: _StreamProbe(ttfts, gaps, errors, done), "127.0.0.1", port)
        if connects is not None:
            connects.append(time.perf_counter() - began)
        await asyncio.wait_for(done, 60)
    except Exception as exc:
        errors.append(repr(exc))


async def _streams(port: int, count: int) -> dict[str, Any]:
    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    connects: list[float] = []
    await asyncio.gather(*(_one_stream(port, ttfts, gaps, errors, connects) for _ in range(count)))
    return {"ttft": ttfts, "gaps": gaps, "errors": errors, "connects": connects}


STREAM_LIFETIME_S = 64 * 0.020


async def _steady_streams(port: int, count: int, seconds: float) -> dict[str, Any]:
    """``count`` streams in flight at all times for ``seconds``, their starts spread evenly.

    ``count`` lanes; lane i starts its first stream i/count of a stream's lifetime (1.28 s) in,
    and each lane opens its next stream (a new connection, as a burst's clients do) the moment
    the last one ends, until 1.5 lifetimes before ``seconds`` (so that none runs past it).
    Streams started in the first lifetime (the ramp) are not counted; what is counted is stream
    starts and chunks under a standing load of ``count`` streams, with chunks spread over each
    20 ms instead of sent together as a burst's are.
    """
    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    connects: list[float] = []
    began = time.perf_counter()
    count_from = began + STREAM_LIFETIME_S
    last_start = began + seconds - STREAM_LIFETIME_S * 1.5  # with room to end within ``seconds``

    async def lane(i: int) -> None:
        await asyncio.sleep(i * STREAM_LIFETIME_S / count)
        while True:
            now = time.perf_counter()
            if now > last_start:
                return
            if now >= count_from:
                await _one_stream(port, ttfts, gaps, errors, connects)
            else:  # the ramp or the end: load, not counted (errors are)
                await _one_stream(port, [], [], errors)

    await asyncio.gather(*(lane(i) for i in range(count)))
    return {"ttft": ttfts, "gaps": gaps, "errors": errors, "connects": connects}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def stream_client_main(port: int, count: int, steady_s: float = 0.0) -> None:
    job = _steady_streams(port, count, steady_s) if steady_s else _streams(port, count)
    try:
        import uvloop

        result = uvloop.run(job)
    except ImportError:
        result = asyncio.run(job)
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    print(
        json.dumps(
            {
                "ttft_p50": pct(ms(result["ttft"]), 50),
                "ttft_p99": pct(ms(result["ttft"]), 99),
                "gap_p50": pct(ms(result["gaps"]), 50),
                "gap_p99": pct(ms(result["gaps"]), 99),
                "connect_p50": pct(ms(result["connects"]), 50),
                "connect_p99": pct(ms(result["connects"]), 99),
                "streams": len(result["ttft"]),
                "errors": result["errors"][:5],
                "n_errors": len(result["errors"]),
            }
        )
    )


def run_streams(port: int, count: int, steady_s: float = 0.0) -> dict[str, Any]:
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, sys.executable, __file__, "--stream-client", str(port), str(count), str(steady_s)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3, help="non-streaming rounds per target (medians reported)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--stream-rounds", type=int, default=3, help="bursts per target (medians reported)")
    parser.add_argument("--no-log", action="store_true", help="run Shardon without its request log")
    parser.add_argument("--no-metrics", action="store_true", help="run Shardon without metrics")
    parser.add_argument("--only", choices=("nonstream", "stream"), help="run one half only")
    parser.add_argument("--granian", action="store_true", help="also run Shardon on the granian engine")
    parser.add_argument("--haproxy", action="store_true", help="also run HAProxy, a second reference proxy")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="also run Shardon with its default access log on (to a file), against the same with it off",
    )
    parser.add_argument(
        "--nginx-access-log", action="store_true", help="also run nginx with its access log on (to a file)"
    )
    parser.add_argument(
        "--steady",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="length of each steady-state stream round (0: bursts only)",
    )
    parser.add_argument("--stream-client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_client:
        port, count, steady_s = args.stream_client
        stream_client_main(int(port), int(count), float(steady_s))
        return
    for tool in ("wrk", "nginx", "taskset", *(["haproxy"] if args.haproxy else [])):
        if shutil.which(tool) is None:
            sys.exit(f"bench/proxy.py needs {tool} (apt-get install wrk nginx util-linux haproxy)")

    tmp = Path(tempfile.mkdtemp(prefix="shardon-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node_port, nginx_port, shardon_port = free_port(), free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    LOAD_CORE,
                    sys.executable,
                    "-m",
                    "shardon.upstream.mock",
                    "--port",
                    str(node_port),
                    "--models",
                    "m1",
                    "--chunks",
                    "16",
                ],
                stdout=subprocess.DEVNULL,
                cwd=ROOT,
            )
        )
        wait_port(node_port)
        nginx = start_nginx(tmp, "nginx", nginx_port, node_port, "off")
        procs.append(nginx)
        nginx_log = None
        if args.nginx_access_log:
            nginx_log_port = free_port()
            nginx_log = start_nginx(tmp, "nginx-log", nginx_log_port, node_port, f"{tmp}/nginx-access.log")
            procs.append(nginx_log)
            wait_port(nginx_log_port)
        config = shardon_config(shardon_port, node_port, tmp / "shardon.db", not args.no_log, not args.no_metrics)
        (tmp / "shardon.yaml").write_text(json.dumps(config))
        shardon = start_shardon(tmp / "shardon.yaml")
        procs.append(shardon)
        shardon_log = None
        if args.access_log:
            shardon_log_port = free_port()
            logged = shardon_config(
                shardon_log_port, node_port, tmp / "shardon-log.db", not args.no_log, not args.no_metrics, True
            )
            (tmp / "shardon-log.yaml").write_text(json.dumps(logged))
            shardon_log = start_shardon(tmp / "shardon-log.yaml", stderr=tmp / "shardon-log.stderr")
            procs.append(shardon_log)
            wait_port(shardon_log_port)
        granian = None
        if args.granian:
            granian_port = free_port()
            config["server"] = {"host": "127.0.0.1", "port": granian_port, "engine": "granian"}
            config["store"] = {"path": str(tmp / "shardon-granian.db")}
            (tmp / "shardon-granian.yaml").write_text(json.dumps(config))
            granian = start_shardon(tmp / "shardon-granian.yaml")
            procs.append(granian)
            wait_port(granian_port)
        haproxy = None
        if args.haproxy:
            haproxy_port = free_port()
            (tmp / "haproxy.cfg").write_text(HAPROXY_CONF.format(node_port=node_port, port=haproxy_port))
            haproxy = subprocess.Popen(["taskset", "-c", PROXY_CORE, "haproxy", "-f", str(tmp / "haproxy.cfg")])
            procs.append(haproxy)
            wait_port(haproxy_port)
        wait_port(nginx_port)
        wait_port(shardon_port)
        time.sleep(1.0)

        script = tmp / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.body = \''
            + json.dumps(CHAT)
            + '\'\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        targets = {
            "direct": (node_port, []),
            "nginx": (nginx_port, children(nginx.pid)),
            "shardon": (shardon_port, [shardon.pid]),
        }
        if granian is not None:
            targets["granian"] = (granian_port, [granian.pid])
        if haproxy is not None:
            targets["haproxy"] = (haproxy_port, children(haproxy.pid))
        if nginx_log is not None:
            targets["nginx+log"] = (nginx_log_port, children(nginx_log.pid))
        if shardon_log is not None:
            targets["shardon+log"] = (shardon_log_port, [shardon_log.pid])
        if args.only != "stream":
            nonstreaming(args, targets, script)
        print(f"shardon peak RSS so far {peak_rss_mb(shardon.pid):.1f} MB")
        if args.only != "nonstream":
            reset_peak_rss(shardon.pid)  # the target is about the streaming load: measure its peak alone
            streaming(args, targets)
            print(f"shardon peak RSS under the streaming load {peak_rss_mb(shardon.pid):.1f} MB (target <= 60)")
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def start_nginx(tmp: Path, name: str, port: int, node_port: int, access_log: str) -> subprocess.Popen[bytes]:
    """nginx pinned to the proxy core; ``access_log``: ``off`` or a file (nginx's default format)."""
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, name=name, node_port=node_port, port=port, access_log=access_log))
    return subprocess.Popen(["taskset", "-c", PROXY_CORE, "nginx", "-c", str(conf), "-g", "daemon off;"])


def shardon_config(
    port: int, node_port: int, db: Path, request_log: bool, metrics: bool, access_log: bool = False
) -> dict[str, Any]:
    """Shardon in front of the mock node as every benchmark here runs it (no demo model; the access
    log off unless ``access_log``, then on as by default, to stderr)."""
    return {
        "server": {"host": "127.0.0.1", "port": port},
        "log": {"level": "warning", "access_log": access_log},
        "store": {"path": str(db)},
        "request_log": request_log,
        "metrics": {"enabled": metrics},
        "demo": False,
        "scheduler": {"max_queue_size": 100000},
        "nodes": [{"id": "mock", "url": f"http://127.0.0.1:{node_port}", "models": ["m1"], "max_concurrent": 4096}],
    }


def start_shardon(config_path: Path, stderr: Path | None = None) -> subprocess.Popen[bytes]:
    """Shardon pinned to the proxy core; its stderr (where the access log goes by default) to a file
    when ``stderr`` is given, as a service manager would take it, else discarded."""
    with open(stderr or os.devnull, "wb") as out:
        return subprocess.Popen(
            ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "shardon", "serve", "--config", str(config_path)],
            cwd=ROOT,
            stderr=out,
        )


def nonstreaming(args: argparse.Namespace, targets: dict[str, tuple[int, list[int]]], script: Path) -> None:
    """``--rounds`` rounds of ``--duration`` seconds per target, the order rotated each round.

    Each round gives a Shardon/nginx ratio measured minutes apart at most; the figures reported are
    the medians over rounds (this shared machine's speed moves by 20-30% from minute to minute,
    so one run of each target says little).
    """
    print(
        f"# proxy overhead, {args.rounds} rounds x {args.duration}s per target, {args.connections} connections, "
        f"proxy on core {PROXY_CORE}, node+load on core {LOAD_CORE}"
    )
    names = list(targets)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    url = "http://127.0.0.1:{}/v1/chat/completions"
    for port, _ in targets.values():
        run_wrk(url.format(port), 2, args.connections, script)  # warm-up
    for round_no in range(args.rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        round_start = steal_ticks()
        for name in order:
            port, pids = targets[name]
            before = cpu_seconds(pids)
            result = run_wrk(url.format(port), args.duration, args.connections, script)
            cpu = cpu_seconds(pids) - before
            result["cpu_cores"] = cpu / args.duration if pids else float("nan")
            result["rps_per_cpu_s"] = result["rps"] * args.duration / cpu if pids and cpu else float("nan")
            samples[name].append(result)
        n, sh = samples["nginx"][-1], samples["shardon"][-1]
        extra = "".join(
            f", {name} {samples[name][-1]['rps']:.0f}" for name in ("shardon+log", "nginx+log") if name in samples
        )
        print(
            f"  round {round_no + 1}: nginx {n['rps']:.0f} req/s, shardon {sh['rps']:.0f} req/s "
            f"({sh['rps'] / n['rps']:.2f}x), p99 {sh['p99_ms'] / n['p99_ms']:.2f}x, "
            f"req/CPU-s {sh['rps_per_cpu_s'] / n['rps_per_cpu_s']:.2f}x{extra}, {steal_since(round_start)}"
        )
    rows = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in samples.items()}
    for name, result in rows.items():
        print(
            f"{name:12s} {result['rps']:>9.0f} req/s  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
            f"  proxy CPU {result['cpu_cores']:.2f} cores  {result['rps_per_cpu_s']:>8.0f} req/CPU-s"
            f"  non-2xx {result['non2xx']:.0f}   (medians)"
        )

    def ratio(key: str, a: str = "shardon", b: str = "nginx") -> float:
        return statistics.median(x[key] / y[key] for x, y in zip(samples[a], samples[b], strict=True))

    print(
        f"shardon/nginx, median of the rounds' ratios: throughput {ratio('rps'):.2f}x (target >= 0.85), "
        f"p99 {ratio('p99_ms'):.2f}x (target <= 1.2), req per CPU-s {ratio('rps_per_cpu_s'):.2f}x (target >= 0.5)"
    )
    for logged, plain, target in (("shardon+log", "shardon", " (target >= 0.9)"), ("nginx+log", "nginx", "")):
        if logged in samples:
            print(
                f"{logged}/{plain} (access log on / off), median of the rounds' ratios: "
                f"throughput {ratio('rps', logged, plain):.2f}x{target}, p99 {ratio('p99_ms', logged, plain):.2f}x, "
                f"req per CPU-s {ratio('rps_per_cpu_s', logged, plain):.2f}x"
            )
    if "shardon+log" in samples and "nginx+log" in samples:
        print(f"shardon+log/nginx+log: throughput {ratio('rps', 'shardon+log', 'nginx+log'):.2f}x")


def streaming(args: argparse.Namespace, targets: dict[str, tuple[int, list[int]]]) -> None:
    """Bursts, then (unless ``--steady 0``) a standing load; targets interleaved, medians over rounds.

    Bursts: ``--stream-rounds`` rounds of ``--streams`` streams started at once. One burst is one
    sample of a noisy figure (its TTFT p99 is the 5th slowest of 500 starts, and the chunks of
    streams started together arrive together, 500 every 20 ms): on this shared machine the
    straight-to-node p99 alone moves by 2x between bursts, so each target gets several, and the
    median of each figure is reported.

    Standing load: ``--stream-rounds`` rounds of ``--steady`` seconds with ``--streams`` streams in
    flight throughout, starts spread evenly (see `_steady_streams`): the same concurrency, with
    thousands of stream starts per round instead of one herd of 500.
    """
    print(
        f"\n# streaming: {args.streams} concurrent streams x 64 chunks, 20 ms apart; "
        f"{args.stream_rounds} rounds, medians"
    )
    names = list(targets)
    # One burst per target first, not counted: a proxy's first burst opens its upstream
    # connections to a node that is already streaming, which a uvloop node accepts one per loop
    # pass (seconds for hundreds); the rounds measure the steady state, and this says what cold costs.
    cold = {name: run_streams(targets[name][0], args.streams) for name in names}
    cold_p99s = ", ".join(f"{name} ttft p99 {r['ttft_p99']:.1f} ms" for name, r in cold.items())
    print(f"cold first burst, not counted: {cold_p99s}")
    stream_rounds(args, targets, "bursts, all started at once", 0.0)
    if args.steady:
        stream_rounds(args, targets, f"standing load, {args.steady:g} s rounds, starts spread", args.steady)


def stream_rounds(
    args: argparse.Namespace, targets: dict[str, tuple[int, list[int]]], title: str, steady_s: float
) -> None:
    print(f"## {title}")
    names = list(targets)
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    phase_start = steal_ticks()
    for round_no in range(args.stream_rounds):
        order = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in order:
            port, pids = targets[name]
            before, began = cpu_seconds(pids), time.monotonic()
            result = run_streams(port, args.streams, steady_s)
            result["cpu_cores"] = (cpu_seconds(pids) - before) / (time.monotonic() - began) if pids else 0.0
            samples[name].append(result)
    keys = ("ttft_p50", "ttft_p99", "gap_p50", "gap_p99", "connect_p99", "cpu_cores")
    streams = {
        name: {key: statistics.median(r[key] for r in rs) for key in keys}
        | {"errors": sum(r["n_errors"] for r in rs), "streams": sum(r["streams"] for r in rs)}
        for name, rs in samples.items()
    }
    for name, r in streams.items():
        p99s = ", ".join(f"{x['ttft_p99']:.1f}" for x in samples[name])
        print(
            f"{name:12s} ttft p50 {r['ttft_p50']:7.2f} ms p99 {r['ttft_p99']:7.2f} ms"
            f"   gap p50 {r['gap_p50']:6.2f} ms p99 {r['gap_p99']:6.2f} ms   connect p99 {r['connect_p99']:5.2f} ms"
            f"   proxy CPU {r['cpu_cores']:.2f} cores   streams {r['streams']} errors {r['errors']}"
            f"   (ttft p99 per round: {p99s})"
        )
    print(f"({steal_since(phase_start)} of the machine's CPU time over these rounds)")
    d = streams["direct"]
    for name in [n for n in ("nginx", "nginx+log", "haproxy", "shardon", "shardon+log", "granian") if n in streams]:
        r = streams[name]
        ttft, gap = (paired_median(samples[name], samples["direct"], key) for key in ("ttft_p99", "gap_p99"))
        print(
            f"{name} adds: ttft p99 {r['ttft_p99'] - d['ttft_p99']:+.2f} ms (target <= 1), "
            f"gap p99 {r['gap_p99'] - d['gap_p99']:+.2f} ms (target within 1); "
            f"paired by round: ttft p99 {ttft:+.2f} ms, gap p99 {gap:+.2f} ms"
        )


def paired_median(rounds: list[dict[str, Any]], direct: list[dict[str, Any]], key: str) -> float:
    """Median over rounds of a proxy's figure minus the direct figure of the same round."""
    return statistics.median(x[key] - y[key] for x, y in zip(rounds, direct, strict=True))


if __name__ == "__main__":
    main()
