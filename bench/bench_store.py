"""Cost of the request log and metrics on the request path, and what the writer thread sustains.

Measures, on a real SQLite file in a temporary directory, with the default StoreConfig (WAL,
synchronous=NORMAL, flush every 200 ms, batches of 1,000):

1. ``RequestLog.append`` — µs per call on the calling thread while the writer thread is active:
   a) a tight loop of 100,000 appends (mean), and b) paced at ~20,000 appends/s for 2 s, each call
   timed alone (p50 / p99 / max), the writer committing in the background all along.
2. ``Metrics.observe_request`` — µs per call (tight loop, 100,000 calls over 8 models, 8 tenants and
   3 statuses, with timings and tokens set so every counter and histogram is touched), and the same
   paced at ~20,000/s next to the writer thread.
3. Writer throughput — rows/s the writer commits: 100,000 rows appended at once, time from the
   first append until ``flush()`` returns (every row on disk).
4. ``OutputHasher.feed_sse`` — µs per typical streamed chunk (one chat delta event).

Records are pre-built (building a RequestRecord is the gateway's cost, shown separately). Bounded to
well under 30 s. Run: ``python bench/bench_store.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardon.config import StoreConfig
from shardon.metrics import Metrics
from shardon.receipts import OutputHasher
from shardon.store import RequestLog, RequestRecord

N = 100_000
PACED_RATE = 20_000
PACED_SECONDS = 2.0


def make_records(n: int, start: float) -> list[RequestRecord]:
    out = []
    for i in range(n):
        t = start + i * 1e-4
        out.append(
            RequestRecord(
                received_at=t,
                queued_at=t + 1e-4,
                dispatched_at=t + 2e-3,
                first_token_at=t + 0.08,
                finished_at=t + 1.5,
                endpoint="/v1/chat/completions",
                tenant=f"tenant-{i % 8}",
                key_id=f"key-{i % 32}",
                model=f"model-{i % 8}",
                node_id=f"node-{i % 4}",
                backend="llama.cpp",
                model_file_sha256="a" * 64,
                priority="normal",
                stream=True,
                status=(200, 200, 200, 429, 503)[i % 5],
                prompt_tokens=120,
                completion_tokens=256,
                bytes_in=900,
                bytes_out=40_000,
                client_addr="10.0.0.1",
                output_sha256="b" * 64,
            )
        )
    return out


def paced(fn: Callable[[RequestRecord], None], items: list[RequestRecord], rate: float, seconds: float) -> list[float]:
    """Call fn(item) at ~rate/s for `seconds`, timing each call alone (µs)."""
    period = 1.0 / rate
    per: list[float] = []
    t_next = time.perf_counter()
    end = t_next + seconds
    i = 0
    clock = time.perf_counter
    while clock() < end:
        item = items[i % len(items)]
        i += 1
        t0 = clock()
        fn(item)
        per.append((clock() - t0) * 1e6)
        t_next += period
        while clock() < t_next:  # busy-wait: sleep() is too coarse for 50 µs periods
            pass
    return per


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def main() -> None:
    t_start = time.perf_counter()
    now = time.time()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # -- record construction (for scale) --
        t0 = time.perf_counter()
        records = make_records(N, now)
        results["record_build_us"] = (time.perf_counter() - t0) / N * 1e6

        # -- 1. append, writer active --
        rl = RequestLog(os.path.join(tmp, "append.db"), StoreConfig())
        rl.start()
        try:
            t0 = time.perf_counter()
            for r in records:
                rl.append(r)
            results["append_tight_us"] = (time.perf_counter() - t0) / N * 1e6
            rl.flush(60)
            per = paced(rl.append, records, PACED_RATE, PACED_SECONDS)
            results["append_paced_p50_us"] = statistics.median(per)
            results["append_paced_p99_us"] = pct(per, 99)
            results["append_paced_max_us"] = max(per)
            results["append_paced_calls"] = len(per)
            rl.flush(60)
        finally:
            rl.close()

        # -- 2. observe_request --
        m = Metrics()
        for r in records[:1000]:  # create the label children first (steady state)
            m.observe_request(r)
        t0 = time.perf_counter()
        for r in records:
            m.observe_request(r)
        results["observe_tight_us"] = (time.perf_counter() - t0) / N * 1e6
        rl = RequestLog(os.path.join(tmp, "observe.db"), StoreConfig())
        rl.start()
        try:

            def both(r: RequestRecord) -> None:
                m.observe_request(r)
                rl.append(r)

            per = paced(both, records, PACED_RATE, PACED_SECONDS)
            results["observe_plus_append_paced_p50_us"] = statistics.median(per)
            results["observe_plus_append_paced_p99_us"] = pct(per, 99)
            rl.flush(60)
        finally:
            rl.close()
        body, _ = m.render()
        results["metrics_render_bytes"] = len(body)

        # -- 3. writer throughput --
        rl = RequestLog(os.path.join(tmp, "throughput.db"), StoreConfig())
        rl.start()
        try:
            t0 = time.perf_counter()
            for r in records:
                rl.append(r)
            assert rl.flush(60), "writer did not catch up in 60 s"
            elapsed = time.perf_counter() - t0
            assert rl.written == N, rl.written
            results["writer_rows_per_s"] = N / elapsed
        finally:
            rl.close()

    # -- 4. OutputHasher --
    chunk = (
        "data: "
        + json.dumps(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "model-0",
                "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
            }
        )
        + "\n\n"
    ).encode()
    h = OutputHasher()
    k = 100_000
    t0 = time.perf_counter()
    for _ in range(k):
        h.feed_sse(chunk)
    results["hasher_feed_sse_us_per_event"] = (time.perf_counter() - t0) / k * 1e6

    results["total_s"] = time.perf_counter() - t_start
    print(f"# bench_store  python {platform.python_version()}  {platform.machine()}  cpus={os.cpu_count()}")
    print(f"record build (RequestRecord(...))          {results['record_build_us']:8.2f} µs/op")
    print(f"append, tight loop, writer active          {results['append_tight_us']:8.2f} µs/op")
    print(
        f"append, paced {PACED_RATE}/s ({int(results['append_paced_calls'])} calls)  "
        f"p50 {results['append_paced_p50_us']:.2f}  p99 {results['append_paced_p99_us']:.2f}  "
        f"max {results['append_paced_max_us']:.1f} µs"
    )
    print(f"observe_request, tight loop                {results['observe_tight_us']:8.2f} µs/op")
    print(
        f"observe_request + append, paced {PACED_RATE}/s   "
        f"p50 {results['observe_plus_append_paced_p50_us']:.2f}  "
        f"p99 {results['observe_plus_append_paced_p99_us']:.2f} µs"
    )
    print(f"writer throughput (defaults)               {results['writer_rows_per_s']:8.0f} rows/s")
    print(f"OutputHasher.feed_sse, one delta event     {results['hasher_feed_sse_us_per_event']:8.2f} µs/op")
    print(f"metrics render size                        {int(results['metrics_render_bytes']):8d} bytes")
    print(f"total                                      {results['total_s']:8.1f} s")


if __name__ == "__main__":
    main()
