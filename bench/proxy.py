"""Proxy overhead: the same mock node reached directly, through nginx, and through Shardon.

What it measures, in one run so the ratios share the machine's noise:

1. Non-streaming: ``wrk -t1 -c64`` POSTs a small chat completion for ``--duration`` seconds, in
   ``--rounds`` interleaved rounds (medians reported), to
   (a) the mock node directly, (b) nginx in front of it (upstream keep-alive, buffering off), and
   (c) Shardon in front of it (its default native engine; with ``--granian`` also (d) Shardon on
   the granian engine, for comparison; with ``--haproxy`` also (e) HAProxy, a second reference
   proxy in C; with ``--access-log`` also (f) Shardon with its default log settings, the access
   log on, written to a file (the other Shardon targets run with ``access_log: false``); with
   ``--nginx-access-log`` also (g) nginx with its access log on, written to a file; with
   ``--baseline TREE`` also (h) Shardon run from another checkout, e.g. an older commit's with its
   extensions built in place, as ``baseline``: a change's cost measured in the same run). Reported:
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
                          [--access-log] [--nginx-access-log] [--baseline TREE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    CHAT,
    LOAD_CORE,
    PROXY_CORE,
    ROOT,
    children,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    reset_peak_rss,
    run_streams,
    run_wrk,
    shardon_config,
    start_shardon,
    steal_since,
    steal_ticks,
    stop,
    wait_port,
)

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
        "--baseline",
        type=Path,
        metavar="TREE",
        help="also run Shardon from this checkout (its extensions built in place) as 'baseline'",
    )
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
    args = parser.parse_args()
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
        baseline = None
        if args.baseline is not None:
            baseline_port = free_port()
            (tmp / "baseline.yaml").write_text(
                json.dumps(
                    shardon_config(baseline_port, node_port, tmp / "baseline.db", not args.no_log, not args.no_metrics)
                )
            )
            baseline = start_shardon(tmp / "baseline.yaml", tree=args.baseline.resolve())
            procs.append(baseline)
            wait_port(baseline_port)
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
        if baseline is not None:
            targets["baseline"] = (baseline_port, [baseline.pid])
        if haproxy is not None:
            targets["haproxy"] = (haproxy_port, children(haproxy.pid))
        if nginx_log is not None:
            targets["nginx+log"] = (nginx_log_port, children(nginx_log.pid))
        if shardon_log is not None:
            targets["shardon+log"] = (shardon_log_port, [shardon_log.pid])
        if args.only != "stream":
            nonstreaming(args, targets, script)
        print(f"shardon peak RSS so far {peak_rss_mb(shardon.pid):.1f} MB")
        shardons = [("shardon", shardon), *([("baseline", baseline)] if baseline is not None else [])]
        if args.only != "nonstream":
            for _, proc in shardons:  # the target is about the streaming load: measure its peak alone
                reset_peak_rss(proc.pid)
            streaming(args, targets)
            for name, proc in shardons:
                print(f"{name} peak RSS under the streaming load {peak_rss_mb(proc.pid):.1f} MB (target <= 60)")
    finally:
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def start_nginx(tmp: Path, name: str, port: int, node_port: int, access_log: str) -> subprocess.Popen[bytes]:
    """nginx pinned to the proxy core; ``access_log``: ``off`` or a file (nginx's default format)."""
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, name=name, node_port=node_port, port=port, access_log=access_log))
    return subprocess.Popen(["taskset", "-c", PROXY_CORE, "nginx", "-c", str(conf), "-g", "daemon off;"])


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
    if "baseline" in samples:
        print(
            f"baseline/nginx: throughput {ratio('rps', 'baseline'):.2f}x, p99 {ratio('p99_ms', 'baseline'):.2f}x, "
            f"req per CPU-s {ratio('rps_per_cpu_s', 'baseline'):.2f}x; shardon/baseline: throughput "
            f"{ratio('rps', 'shardon', 'baseline'):.2f}x, "
            f"req per CPU-s {ratio('rps_per_cpu_s', 'shardon', 'baseline'):.2f}x"
        )


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
    proxies = ("nginx", "nginx+log", "haproxy", "shardon", "shardon+log", "granian", "baseline")
    for name in [n for n in proxies if n in streams]:
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
