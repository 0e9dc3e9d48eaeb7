"""Micro-benchmark of the ``shardon._fast`` primitives: compiled (Cython) against pure-Python twin.

What it measures, for each implementation, as operations per second of wall time on one core:

- ``queue push+pop``: a FairQueue kept at a steady backlog of 1,024 waiting entries (8 tenants with
  weights 1..4, all four priority classes, costs 64..4,096 tokens, quantum 1,024), then one push
  followed by one pop, repeated. One op = one push plus one pop.
- ``bucket try_take``: TokenBucket.try_take(1 token) with the clock advancing 1 ms per call on a
  bucket that refills at 500 tokens/s, so about half the calls succeed. One op = one call.
- ``balancer pick+acq+rel``: LeastConnBalancer.pick over 4 candidate nodes (unequal weights and
  capacities, some load already in flight) then acquire and release of the node picked.
  One op = the three calls.

Method: each case runs a fixed number of operations (so the whole run takes well under a minute),
timed with ``time.perf_counter``; every case is repeated (``--repeat``, default 5) on a fresh object and
the best run is kept. The same driver loop (bound methods in locals, arguments precomputed) is used
for both implementations, so the ratio compares the primitives, not the loop. The compiled classes
come from the ``_c`` modules directly: the benchmark needs them built
(``pip install --no-deps -e .``). Run: ``python bench/bench_fast.py``.

For scale, it also times the bucket's driver loop calling ``math.copysign(1.0, now)``, a C builtin with
two float arguments and no work: the least a call from Python can cost. The compiled ``try_take`` sits
close to it, so that ratio is bounded by the interpreter's call overhead, not by the bucket's code.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from types import ModuleType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardon._fast import _balancer_py, _bucket_py, _queue_py

QUEUE_OPS = 200_000
BUCKET_OPS = 1_000_000
BALANCER_OPS = 300_000
TARGET_RATIO = 5.0


def bench_queue(mod: ModuleType, n: int) -> float:
    tenants = [f"tenant-{i}" for i in range(8)]
    weights = [1.0 + (i % 4) for i in range(8)]
    pattern = 4099  # prime, so the three cycles below don't line up
    prios = [(i * 7 // 3) % 4 for i in range(pattern)]
    tix = [(i * 5) % 8 for i in range(pattern)]
    costs = [float(64 + (i * 977) % 4033) for i in range(pattern)]
    q = mod.FairQueue(1024.0)
    push = q.push
    pop = q.pop
    for i in range(1024):
        k = i % pattern
        push(i, prios[k], tenants[tix[k]], costs[k], weights[tix[k]])
    args = [
        (prios[i % pattern], tenants[tix[i % pattern]], costs[i % pattern], weights[tix[i % pattern]]) for i in range(n)
    ]
    t0 = time.perf_counter()
    for p, t, c, w in args:
        push(None, p, t, c, w)
        pop()
    return time.perf_counter() - t0


def bench_bucket(mod: ModuleType, n: int) -> float:
    b = mod.TokenBucket(500.0, 100.0, 0.0)
    take = b.try_take
    nows = [i * 0.001 for i in range(n)]
    t0 = time.perf_counter()
    for now in nows:
        take(1.0, now)
    return time.perf_counter() - t0


def bench_call_floor(n: int) -> float:
    """The bucket loop calling math.copysign (a C builtin taking two floats) instead of try_take."""
    call = math.copysign
    nows = [i * 0.001 for i in range(n)]
    t0 = time.perf_counter()
    for now in nows:
        call(1.0, now)
    return time.perf_counter() - t0


def bench_balancer(mod: ModuleType, n: int) -> float:
    lb = mod.LeastConnBalancer()
    for node, cap, w in ((3, 64, 1.0), (7, 64, 2.0), (11, 32, 1.0), (12, 128, 4.0)):
        lb.add(node, cap, w)
    for node, load in ((3, 5), (7, 9), (11, 2), (12, 20)):
        for _ in range(load):
            lb.acquire(node)
    candidates = [3, 7, 11, 12]
    pick = lb.pick
    acquire = lb.acquire
    release = lb.release
    t0 = time.perf_counter()
    for _ in range(n):
        node = pick(candidates)
        acquire(node)
        release(node)
    return time.perf_counter() - t0


CASES: list[tuple[str, Callable[[ModuleType, int], float], int, str, str]] = [
    ("queue push+pop", bench_queue, QUEUE_OPS, "_queue_py", "_queue_c"),
    ("bucket try_take", bench_bucket, BUCKET_OPS, "_bucket_py", "_bucket_c"),
    ("balancer pick+acq+rel", bench_balancer, BALANCER_OPS, "_balancer_py", "_balancer_c"),
]


def best_of(fn: Callable[[ModuleType, int], float], mod: ModuleType, n: int, repeat: int) -> float:
    return min(fn(mod, n) for _ in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case; the best is kept")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every op count")
    args = parser.parse_args()
    mods: dict[str, ModuleType] = {
        "_queue_py": _queue_py,
        "_bucket_py": _bucket_py,
        "_balancer_py": _balancer_py,
    }
    try:
        for name in ("_queue_c", "_bucket_c", "_balancer_c"):
            mods[name] = importlib.import_module(f"shardon._fast.{name}")
    except ImportError as exc:
        print(f"compiled modules not built ({exc}); run: pip install --no-deps -e .")
        return 2
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus; best of {args.repeat}")
    print(f"{'case':<24}{'ops':>10}{'python ops/s':>16}{'compiled ops/s':>16}{'ratio':>9}")
    ok = True
    for name, fn, n, py_name, c_name in CASES:
        n = max(1, int(n * args.scale))
        fn(mods[py_name], min(n, 10_000))  # warm-up
        fn(mods[c_name], min(n, 10_000))
        t_py = best_of(fn, mods[py_name], n, args.repeat)
        t_c = best_of(fn, mods[c_name], n, args.repeat)
        ratio = t_py / t_c
        ok = ok and ratio >= TARGET_RATIO
        print(f"{name:<24}{n:>10,}{n / t_py:>16,.0f}{n / t_c:>16,.0f}{ratio:>8.1f}x")
    n = max(1, int(BUCKET_OPS * args.scale))
    floor = min(bench_call_floor(n) for _ in range(args.repeat))
    print(
        f"call floor: the bucket loop calling math.copysign(1.0, now) instead: {n / floor:,.0f} calls/s "
        f"({floor / n * 1e9:.1f} ns/call)"
    )
    print(f"target: compiled >= {TARGET_RATIO:.0f}x python on every case: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
