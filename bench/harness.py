"""What the benchmarks share: placement on the cores, ports, the proxies' CPU and memory from /proc,
wrk, Shardon started as every benchmark runs it, and the streaming client.

Run as a script it is that client (``harness.py PORT COUNT STEADY_S``), which `run_streams` starts on
the load core: one JSON line of time-to-first-token, gap and connect times.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TICK = os.sysconf("SC_CLK_TCK")
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


def thread_cpu(pid: int, name_prefix: str) -> float:
    """CPU seconds (user+system) of the threads of ``pid`` whose name starts with ``name_prefix``."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            if not comm.startswith(name_prefix):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


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


def start_shardon(
    config_path: Path, stderr: Path | None = None, tree: Path = ROOT, pin: bool = True
) -> subprocess.Popen[bytes]:
    """Shardon pinned to the proxy core (unless not ``pin``); its stderr (where the access log goes by
    default) to a file when ``stderr`` is given, as a service manager would take it, else discarded.
    ``tree``: the checkout to run it from (another commit's, with its extensions built in place: a
    baseline)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    placement = ["taskset", "-c", PROXY_CORE] if pin else []
    with open(stderr or os.devnull, "wb") as out:
        return subprocess.Popen(
            [*placement, sys.executable, "-m", "shardon", "serve", "--config", str(config_path)],
            cwd=tree,
            stderr=out,
            env=env,
        )


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


async def steady_streams(port: int, count: int, seconds: float) -> dict[str, Any]:
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


# -- the simulated nodes' HTTP (bench/fairness.py, bench/routing.py) --------------------------------
async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """One HTTP/1.1 request from a keep-alive connection: (its path, its body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return lines[0].split(" ")[1], body


async def json_response(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()


async def get_json(port: int, path: str) -> dict[str, Any]:
    """``GET path`` of a simulated node, its JSON answer (one request, one connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    body = await reader.readexactly(length)
    writer.close()
    return dict(json.loads(body))


def stream_client_main(port: int, count: int, steady_s: float = 0.0) -> None:
    job = steady_streams(port, count, steady_s) if steady_s else _streams(port, count)
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
        ["taskset", "-c", LOAD_CORE, sys.executable, __file__, str(port), str(count), str(steady_s)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    stream_client_main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
