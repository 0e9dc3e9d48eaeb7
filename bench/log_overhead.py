"""What the request log and metrics cost: Shardon with them on vs off, interleaved, in one run.

What it measures: pairs of Shardon processes whose configs differ only in ``request_log`` and
``metrics.enabled`` (``--on`` picks both, or one of them), in front of the same mock node. Both
are pinned to core 0; the node and wrk share core 1, as in ``bench/proxy.py``. One is under load
at a time: ``wrk -t1 -c64`` POSTs a small chat completion for ``--duration`` seconds to each, for
``--rounds`` rounds, alternating which goes first. Interleaving puts both through the same drift
of this shared machine. The figure is the median over all rounds of ``1 - on/off`` (throughput
cost).

Why ``--pairs`` fresh pairs, one after the other: two processes of the same config differ by a
steady few percent here for as long as they live (measured: two "off" processes 3.9% apart in every
round of a run, the faster one 2.8-10% ahead), an effect of where each one's memory landed, not of
its code. One pair's on/off ratio carries that bias whole; over several pairs it averages out,
and the per-pair figures show its size.

Also reported: CPU-µs per request of each process (all its threads), and for "on" the CPU of
the request log's two threads per row (from ``/proc/<pid>/task``): the writer (``shardon-store``,
appends rows to the on-disk backlog) and the compactor (``shardon-store-c``, moves the backlog
into SQLite), and the backlog left on disk after each of its rounds.

The compactor waits while the gateway is busy (``store.busy_rows_per_s``): during an "on" round
the rows pile up in the backlog, and they are compacted in the lull after it. The benchmark waits
for that compaction to finish before it measures "off" (both processes share core 0: compaction
running during "off" would slow "off" and pass for a lower cost), and reports the CPU it took per
row. ``--sustained S`` then loads the last "on" alone for S seconds: how much reaches SQLite during a
sustained load, and how long after the load the compactor has everything in.

``--writer-cpu 1`` sets ``store.writer_cpus: [1]`` for "on": the compactor leaves the proxy's
pinned core for the other one (the deployment the docs recommend when a core is spare).

    python bench/log_overhead.py [--pairs 5] [--rounds 2] [--duration 5] [--on both|log|metrics]
                                 [--writer-cpu 1] [--sustained 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import CHAT, LOAD_CORE, PROXY_CORE, ROOT, cpu_seconds, free_port, run_wrk, stop, thread_cpu, wait_port

TICK = os.sysconf("SC_CLK_TCK")


def start_shardon(
    tmp: Path, name: str, node_port: int, log_on: bool, metrics_on: bool, writer_cpus: list[int]
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    db = tmp / f"{name}.db"
    config = {
        "server": {"host": "127.0.0.1", "port": port},
        "log": {"level": "warning", "access_log": False},
        "store": {"path": str(db), "writer_cpus": writer_cpus},
        "request_log": log_on,
        "metrics": {"enabled": metrics_on},
        "demo": False,
        "scheduler": {"max_queue_size": 100000},
        "nodes": [{"id": "mock", "url": f"http://127.0.0.1:{node_port}", "models": ["m1"], "max_concurrent": 4096}],
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        ["taskset", "-c", PROXY_CORE, sys.executable, "-m", "shardon", "serve", "--config", str(path)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    return proc, port, db


def backlog_bytes(db: Path) -> int:
    """Bytes of backlog segments on disk (compacted ones are deleted as the compactor goes)."""
    folder = db.parent / f"{db.name}-backlog"
    return sum(p.stat().st_size for p in folder.glob("*.seg")) if folder.exists() else 0


def rows_in(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def sustained(
    args: argparse.Namespace, on: subprocess.Popen[bytes], port: int, db: Path, url: str, script: Path
) -> None:
    """Load "on" alone: what reaches SQLite under sustained saturation, and the drain once load stops."""
    time.sleep(3.0)
    rows0 = rows_in(db)
    r = run_wrk(url.format(port), args.sustained, args.connections, script)
    served = int(r["rps"] * args.sustained)
    during = rows_in(db) - rows0
    stopped = time.monotonic()
    while rows_in(db) - rows0 < served * 0.999 and time.monotonic() - stopped < 120:
        time.sleep(0.1)
    print(
        f"sustained {args.sustained}s on 'on' alone: {r['rps']:.0f} req/s; {during} of ~{served} rows reached"
        f" SQLite during the load (the rest waited in the backlog: {backlog_bytes(db) / 1e6:.1f} MB on disk),"
        f" all of them {time.monotonic() - stopped:.1f}s after the load stopped"
    )


class Tally:
    """What the rounds of all pairs measured."""

    def __init__(self) -> None:
        self.costs: list[float] = []
        self.pair_costs: list[float] = []
        self.us_on: list[float] = []
        self.us_off: list[float] = []
        self.writer_cpu = 0.0
        self.compactor_cpu = 0.0
        self.deferred_cpu = 0.0
        self.rows = 0


def run_pair(
    args: argparse.Namespace, pair: int, tmp: Path, node_port: int, script: Path, url: str, tally: Tally
) -> None:
    """Start a fresh "on" and "off", measure ``args.rounds`` rounds on them, stop them."""
    logging = args.on != "metrics"
    on, on_port, on_db = start_shardon(tmp, f"on{pair}", node_port, logging, args.on != "log", args.writer_cpu)
    off, off_port, _ = start_shardon(tmp, f"off{pair}", node_port, False, False, [])
    try:
        wait_port(on_port)
        wait_port(off_port)
        for port in (on_port, off_port):
            run_wrk(url.format(port), 2, args.connections, script)  # warm-up: pools, caches
        time.sleep(1.0)
        served_on = 0
        rows_before = rows_in(on_db) if logging else 0
        costs: list[float] = []
        for i in range(args.rounds):
            result = {}
            order = [("on", on, on_port), ("off", off, off_port)]
            for name, proc, port in order if (pair + i) % 2 == 0 else order[::-1]:  # alternate who goes first
                cpu0 = cpu_seconds([proc.pid])
                w0 = thread_cpu(proc.pid, "shardon-store") if name == "on" else 0.0
                c0 = thread_cpu(proc.pid, "shardon-store-c") if name == "on" else 0.0
                r = run_wrk(url.format(port), args.duration, args.connections, script)
                cpu = cpu_seconds([proc.pid]) - cpu0
                if name == "on":
                    compacting = thread_cpu(proc.pid, "shardon-store-c") - c0
                    tally.compactor_cpu += compacting
                    tally.writer_cpu += thread_cpu(proc.pid, "shardon-store") - w0 - compacting
                    served_on += int(r["rps"] * args.duration)
                    r["backlog"] = backlog_bytes(on_db) if logging else 0
                    if logging:
                        # The compaction "on" put off runs now, in the lull, before "off" is measured
                        # (on the same core: it must not run during "off" and pass for its cost).
                        c1 = thread_cpu(proc.pid, "shardon-store-c")
                        drained = time.monotonic()
                        while rows_in(on_db) - rows_before < served_on * 0.999 and time.monotonic() - drained < 60:
                            time.sleep(0.05)
                        r["drain_s"] = time.monotonic() - drained
                        tally.deferred_cpu += thread_cpu(proc.pid, "shardon-store-c") - c1
                r["us_per_req"] = cpu / (r["rps"] * args.duration) * 1e6
                result[name] = r
            cost = 1 - result["on"]["rps"] / result["off"]["rps"]
            costs.append(cost)
            tally.us_on.append(result["on"]["us_per_req"])
            tally.us_off.append(result["off"]["us_per_req"])
            print(
                f"pair {pair + 1} round {i + 1}: on {result['on']['rps']:8.0f} req/s"
                f" ({result['on']['us_per_req']:5.1f} CPU-us/req)"
                f"  off {result['off']['rps']:8.0f} req/s ({result['off']['us_per_req']:5.1f} CPU-us/req)"
                f"  cost {cost * 100:+5.1f}%  backlog after 'on': {result['on']['backlog'] / 1e6:.1f} MB,"
                f" compacted {result['on'].get('drain_s', 0.0):.1f}s later",
                flush=True,
            )
        time.sleep(1.5)  # one flush interval and then some
        tally.rows += rows_in(on_db) - rows_before if logging else 0
        tally.costs += costs
        tally.pair_costs.append(statistics.median(costs))
        if args.sustained and logging and pair == args.pairs - 1:
            sustained(args, on, on_port, on_db, url, script)
    finally:
        stop([on, off])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5, help="fresh on/off process pairs, one after the other")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per pair")
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--sustained", type=int, default=0, help="then load the last 'on' alone for this many seconds")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--on", choices=("both", "log", "metrics"), default="both", help="what 'on' turns on")
    parser.add_argument(
        "--writer-cpu",
        type=int,
        action="append",
        default=[],
        help="store.writer_cpus for 'on' (default: none, the writer shares the proxy's pinned core)",
    )
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shardon-logbench-"))
    node: subprocess.Popen[bytes] | None = None
    try:
        node_port = free_port()
        node = subprocess.Popen(
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
        wait_port(node_port)
        script = tmp / "post.lua"
        script.write_text(
            'wrk.method = "POST"\nwrk.body = \''
            + json.dumps(CHAT)
            + '\'\nwrk.headers["Content-Type"] = "application/json"\n'
        )
        url = "http://127.0.0.1:{}/v1/chat/completions"
        where = f"writer thread on core(s) {args.writer_cpu}" if args.writer_cpu else "writer on the proxy's core"
        print(
            f"# {args.on} on vs off, {args.pairs} process pairs x {args.rounds} rounds x {args.duration}s each,"
            f" proxy on core {PROXY_CORE}, {where}"
        )
        tally = Tally()
        for pair in range(args.pairs):
            run_pair(args, pair, tmp, node_port, script, url, tally)
        rows = tally.rows
        print(
            f"request log: writer {tally.writer_cpu / max(rows, 1) * 1e6:.2f} CPU-us/row (the backlog append, on"
            f" the request path's core), compactor {tally.compactor_cpu / max(rows, 1) * 1e6:.2f} CPU-us/row"
            f" during the load and {tally.deferred_cpu / max(rows, 1) * 1e6:.2f} CPU-us/row in the lulls after"
            f" it (SQLite), {rows} rows"
        )
        print(
            f"CPU per request: on {statistics.median(tally.us_on):.1f} us, off {statistics.median(tally.us_off):.1f}"
            f" us (+{statistics.median(tally.us_on) - statistics.median(tally.us_off):.1f} us)"
        )
        print("per pair (median of its rounds): " + " ".join(f"{c * 100:+.1f}%" for c in tally.pair_costs))
        print(
            f"throughput cost of {args.on}: median {statistics.median(tally.costs) * 100:.1f}% over"
            f" {len(tally.costs)} rounds of {args.pairs} pairs (target < 5%)"
        )
    finally:
        if node is not None:
            stop([node])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
