"""Event-loop lag under the standing streaming load: when Shardon's loop is late, and why.

What it measures: Shardon (request log and metrics on, as in ``bench/proxy.py``) pinned to core 0
in front of the mock node, with ``bench/proxy.py``'s standing load (``--streams`` streams in flight,
starts spread evenly, each replaced as it ends) from core 1. Inside Shardon a 1 ms heartbeat timer
runs on the event loop; each beat records how late it is, and how much CPU the loop's thread and
the whole process used since the previous beat. A beat late by more than ``--stall-ms`` is a
stall, which the three figures sort into:

- *busy*: the loop's thread used most of the stall's wall time (work queued up on the loop: a
  start then waits behind it);
- *off-CPU*: the loop's thread used little of it, and the process little more (the thread was not
  running: descheduled by the kernel or the hypervisor, or waiting for the GIL held by no Python
  thread of this process);
- *other threads*: the loop's thread used little, the process much more (another thread held the
  GIL or the core).

A watchdog thread also samples the loop thread's Python stack once per stall (compiled code has
no Python frames, so a stack that ends in ``run`` means the loop was in uvloop or the ``_fast``
extensions). The client prints the TTFT and gap percentiles of the same round, so the stall
share can be set against the tail: a start that lands in a stall waits for its end.

``--sched`` also records the scheduler's switches on Shardon's core (``perf record -e
sched:sched_switch``; needs ``perf`` and root or ``perf_event_paranoid`` <= 1) over the counted
part of the round, and lists the longest times the loop's thread was off the CPU: how it left (R:
preempted while runnable; S: waiting, for I/O or the GIL; D: uninterruptible) and what ran on the
core meanwhile (``swapper`` is the idle task: the core was free, so a late wake-up there is the
hypervisor's or the timer's). An off-CPU stall is someone else's time; this says whose.

    python bench/lagprobe.py [--seconds 10] [--streams 500] [--stall-ms 5] [--no-log] [--sched]

The heartbeat itself costs one timer callback a millisecond (with epoll woken for it when idle).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # what the benchmarks share: the placement, the node, the client

BEAT_S = 0.001


class LoopProbe:
    """The heartbeat (on the loop) and the watchdog (a thread) inside the measured process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall_s: float) -> None:
        self.loop = loop
        self.stall_s = stall_s
        self.loop_thread = threading.get_ident()
        self.lags_ms: list[tuple[float, float]] = []  # (perf_counter, lag): clock shared with the client
        self.stalls: list[dict[str, Any]] = []
        self.stacks: list[tuple[float, str]] = []
        self.last_wall = time.perf_counter()
        self.last_thread_cpu = time.thread_time()
        self.last_process_cpu = time.process_time()
        self.sampled_for = 0.0  # the beat whose stall the watchdog has already sampled
        self.stopped = False
        self.timer = loop.call_later(BEAT_S, self.beat)
        self.watchdog = threading.Thread(target=self.watch, name="lagprobe", daemon=True)
        self.watchdog.start()

    def beat(self) -> None:
        wall, thread_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        dt = wall - self.last_wall
        lag = dt - BEAT_S
        self.lags_ms.append((wall, lag * 1000))
        if lag > self.stall_s:
            self.stalls.append(
                {
                    "at": wall,
                    "wall_ms": dt * 1000,
                    "loop_cpu_ms": (thread_cpu - self.last_thread_cpu) * 1000,
                    "process_cpu_ms": (process_cpu - self.last_process_cpu) * 1000,
                }
            )
        self.last_wall, self.last_thread_cpu, self.last_process_cpu = wall, thread_cpu, process_cpu
        if not self.stopped:
            self.timer = self.loop.call_later(BEAT_S, self.beat)

    def watch(self) -> None:
        while not self.stopped:
            time.sleep(BEAT_S)
            since = self.last_wall
            if time.perf_counter() - since > self.stall_s and self.sampled_for != since:
                self.sampled_for = since
                frame = sys._current_frames().get(self.loop_thread)
                if frame is not None:
                    summary = reversed(traceback.extract_stack(frame)[-4:])
                    stack = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in summary)
                    self.stacks.append((since, stack))

    def report(self) -> dict[str, Any]:
        self.stopped = True
        self.timer.cancel()
        return {"lags_ms": self.lags_ms, "stalls": self.stalls, "stacks": self.stacks}


def serve_probed(out: str, stall_s: float, argv: list[str]) -> int:
    """Run ``shardon`` with the probe on its loop; the probe's figures go to ``out`` at exit."""
    import uvloop

    from shardon.cli import main

    run = uvloop.run

    def probed_run(main_coro: Any, **kwargs: Any) -> Any:
        async def wrapped() -> Any:
            probe = LoopProbe(asyncio.get_running_loop(), stall_s)
            try:
                return await main_coro
            finally:
                Path(out).write_text(json.dumps(probe.report()))

        return run(wrapped(), **kwargs)

    uvloop.run = probed_run
    return main(argv)


def client_probed(out: str, stall_s: float, port: int, count: int, seconds: float) -> None:
    """``bench/proxy.py``'s standing-load client with the probe on its own loop."""
    import uvloop

    async def job() -> dict[str, Any]:
        probe = LoopProbe(asyncio.get_running_loop(), stall_s)
        try:
            return await harness.steady_streams(port, count, seconds)
        finally:
            Path(out).write_text(json.dumps(probe.report()))

    result = uvloop.run(job())
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    keys = {"ttft": "ttft", "gap": "gaps", "connect": "connects"}
    figures = {f"{k}_p{p}": pct(ms(result[v]), p) for k, v in keys.items() for p in (50, 99)}
    print(json.dumps(figures | {"streams": len(result["ttft"]), "n_errors": len(result["errors"])}))


def pct(values: list[float], p: float) -> float:
    return harness.pct(values, p)


def summarise(report: dict[str, Any], window: tuple[float, float], client: dict[str, Any]) -> None:
    """The probe's records inside ``window`` (the counted part of the client's round)."""
    start, end = window
    lags = [lag for at, lag in report["lags_ms"] if start <= at <= end]
    stalls = [s for s in report["stalls"] if start <= s["at"] <= end]
    stacks = collections.Counter(stack for at, stack in report["stacks"] if start <= at <= end)
    print(f"heartbeats {len(lags)}; lag p50 {pct(lags, 50):.2f} ms p99 {pct(lags, 99):.2f} ms max {max(lags):.1f} ms")
    busy = [s for s in stalls if s["loop_cpu_ms"] > 0.7 * s["wall_ms"]]
    others = [s for s in stalls if s not in busy and s["process_cpu_ms"] - s["loop_cpu_ms"] > 0.3 * s["wall_ms"]]
    off = [s for s in stalls if s not in busy and s not in others]
    total = sum(lags) / 1000
    print(
        f"stalls over the threshold: {len(stalls)}, {sum(s['wall_ms'] for s in stalls):.0f} ms of the run "
        f"(all lag together {total * 1000:.0f} ms)"
    )
    for name, group in (("busy", busy), ("other threads", others), ("off-CPU", off)):
        if group:
            walls = [s["wall_ms"] for s in group]
            print(
                f"  {name:13s} {len(group):5d} stalls, {sum(walls):7.0f} ms, longest {max(walls):6.1f} ms, "
                f"loop CPU {sum(s['loop_cpu_ms'] for s in group) / sum(walls):.2f} of their wall time"
            )
    print("loop stacks sampled during stalls (innermost first):")
    for stack, n in stacks.most_common(12):
        print(f"  {n:5d}  {stack}")
    print(
        f"client: connect p50 {client['connect_p50']:.2f} ms p99 {client['connect_p99']:.2f} ms; "
        f"ttft p50 {client['ttft_p50']:.2f} ms p99 {client['ttft_p99']:.2f} ms, gap p50 {client['gap_p50']:.2f}"
        f" ms p99 {client['gap_p99']:.2f} ms, {client['streams']} streams, {client['n_errors']} errors"
    )


def log_phases(db: Path, window: tuple[float, float]) -> None:
    """A stream start's phases inside Shardon, from its request log (wall clock, like the log)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT received_at, dispatched_at, first_token_at FROM requests"
            " WHERE received_at BETWEEN ? AND ? AND first_token_at IS NOT NULL",
            window,
        ).fetchall()
    if not rows:
        print("request log: no rows in the window")
        return
    phases = {
        "receipt to dispatch": [(d - r) * 1000 for r, d, _ in rows],
        "dispatch to the node's first chunk": [(f - d) * 1000 for _, d, f in rows],
        "receipt to first chunk": [(f - r) * 1000 for r, _, f in rows],
    }
    print(f"request log, {len(rows)} streams:")
    for name, values in phases.items():
        print(f"  {name:36s} p50 {pct(values, 50):6.2f} ms  p99 {pct(values, 99):6.2f} ms  max {max(values):6.1f} ms")


SWITCH = re.compile(
    r"\s*([\d.]+):\s+sched:sched_switch:\s+prev_comm=(.*?) prev_pid=(\d+) prev_prio=-?\d+"
    r" prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)


def off_cpu_intervals(trace: str, tid: int) -> list[tuple[float, str, dict[str, float]]]:
    """From ``perf script`` lines of ``sched_switch`` on one core: each time thread ``tid`` was off
    the core, as (seconds, how it left, seconds each other task ran meanwhile)."""
    out: list[tuple[float, str, dict[str, float]]] = []
    left_at: float | None = None
    how = ""
    ran: dict[str, float] = {}
    running, since = "", 0.0
    for line in trace.splitlines():
        m = SWITCH.match(line)
        if m is None:
            continue
        at, prev_pid, prev_state, next_comm, next_pid = float(m[1]), int(m[3]), m[4], m[5], int(m[6])
        if left_at is not None and running:
            ran[running] = ran.get(running, 0.0) + at - since
        if prev_pid == tid:
            left_at, how, ran = at, prev_state, {}
        running, since = f"{next_comm}/{next_pid}", at
        if next_pid == tid and left_at is not None:
            out.append((at - left_at, how, ran))
            left_at = None
    return out


def sched_report(trace: str, tid: int, stall_s: float) -> None:
    intervals = off_cpu_intervals(trace, tid)
    if not intervals:
        print("sched: no switches of the loop's thread recorded (perf missing or not permitted?)")
        return
    long = [i for i in intervals if i[0] > stall_s]
    print(
        f"## the loop's thread off its core (perf sched_switch): {len(intervals)} times, {len(long)} over the threshold"
    )
    whose: dict[str, float] = collections.defaultdict(float)  # by command name, the thread ids summed
    for _, _, ran in long:
        for task, seconds in ran.items():
            whose[task.rsplit("/", 1)[0]] += seconds
    ranked = sorted(whose.items(), key=lambda kv: -kv[1])[:8]
    print("  who ran on the core during those: " + ", ".join(f"{name} {s * 1000:.1f} ms" for name, s in ranked))
    for seconds, how, ran in sorted(long, key=lambda i: -i[0])[:10]:
        tasks = ", ".join(f"{t} {v * 1000:.1f} ms" for t, v in sorted(ran.items(), key=lambda kv: -kv[1])[:3])
        print(f"  {seconds * 1000:6.2f} ms, left {how}: {tasks}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probed-serve":
        sys.exit(serve_probed(sys.argv[2], float(sys.argv[3]), sys.argv[4:]))
    if len(sys.argv) > 1 and sys.argv[1] == "--probed-client":
        out, stall_s, port, count, seconds = sys.argv[2:7]
        client_probed(out, float(stall_s), int(port), int(count), float(seconds))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="standing-load round length")
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--stall-ms", type=float, default=5.0)
    parser.add_argument("--no-log", action="store_true", help="run Shardon without its request log")
    parser.add_argument("--sched", action="store_true", help="record who ran on Shardon's core (perf)")
    args = parser.parse_args()
    if args.sched and shutil.which("perf") is None:
        sys.exit("--sched needs perf (apt-get install linux-perf)")

    tmp = Path(tempfile.mkdtemp(prefix="shardon-lagprobe-"))
    out = tmp / "probe.json"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        node_port, shardon_port = harness.free_port(), harness.free_port()
        mock = [sys.executable, "-m", "shardon.upstream.mock", "--port", str(node_port), "--models", "m1"]
        node = subprocess.Popen(
            ["taskset", "-c", harness.LOAD_CORE, *mock], stdout=subprocess.DEVNULL, cwd=harness.ROOT
        )
        procs.append(node)
        harness.wait_port(node_port)
        config = harness.shardon_config(shardon_port, node_port, tmp / "shardon.db", not args.no_log, True)
        (tmp / "shardon.yaml").write_text(json.dumps(config))
        serve = [sys.executable, __file__, "--probed-serve", str(out), str(args.stall_ms / 1000)]
        shardon = subprocess.Popen(
            ["taskset", "-c", harness.PROXY_CORE, *serve, "serve", "--config", str(tmp / "shardon.yaml")],
            cwd=harness.ROOT,
            stderr=subprocess.DEVNULL,
        )
        procs.append(shardon)
        harness.wait_port(shardon_port)
        harness.run_streams(shardon_port, args.streams)  # warm the upstream pool, not counted
        print(f"# standing load: {args.streams} streams x 64 chunks @ 20 ms for {args.seconds:g} s through Shardon")
        began = time.perf_counter()
        client_out = tmp / "client-probe.json"
        stall = str(args.stall_ms / 1000)
        sched = None
        if args.sched:  # the counted part of the round: after the client's ramp, before its end
            record = ["perf", "record", "-q", "-e", "sched:sched_switch", "-C", harness.PROXY_CORE]
            span = f"{max(1.0, args.seconds - 2 * harness.STREAM_LIFETIME_S):.1f}"
            sched = subprocess.Popen(
                [
                    "sh",
                    "-c",
                    f"sleep {harness.STREAM_LIFETIME_S}; exec {' '.join(record)} -o {tmp}/sched.data sleep {span}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        command = [sys.executable, __file__, "--probed-client", str(client_out), stall, str(shardon_port)]
        run = subprocess.run(
            ["taskset", "-c", harness.LOAD_CORE, *command, str(args.streams), str(args.seconds)],
            capture_output=True,
            text=True,
            check=True,
            timeout=args.seconds + 60,
        )
        client = json.loads(run.stdout.strip().splitlines()[-1])
        ended = time.perf_counter()
        shardon.terminate()
        shardon.wait(30)
        # The client counts streams started after one stream lifetime (its ramp) and before the end.
        window = (began + harness.STREAM_LIFETIME_S, ended)
        print("## Shardon's loop")
        summarise(json.loads(out.read_text()), window, client)
        print("## the load generator's loop (core 1, with the node)")
        summarise(json.loads(client_out.read_text()), window, client)
        if sched is not None:
            sched.wait(30)
            trace = subprocess.run(
                ["perf", "script", "-i", str(tmp / "sched.data"), "-F", "time,event,trace"],
                capture_output=True,
                text=True,
            ).stdout
            sched_report(trace, shardon.pid, args.stall_ms / 1000)
        if not args.no_log:
            to_wall = time.time() - time.perf_counter()
            log_phases(tmp / "shardon.db", (window[0] + to_wall, window[1] + to_wall))
    finally:
        harness.stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
