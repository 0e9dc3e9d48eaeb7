"""``GET /admin/overview``: the dashboard's live picture of the gateway, in one call.

Over a window of the last minutes (``window`` seconds, default 900, cut into ``points`` buckets):

- totals, per model and per node: requests, failed (not 2xx), tokens, TTFT p50/p99 — read from the
  request log with ``/admin/stats``'s definitions (nearest-rank percentiles over 2xx requests,
  measured from ``received_at``), so for the same ``since`` the two agree;
- the same per bucket, as time series, and the last minute's rates;
- in-flight requests and queue depth now, per model and per node (with each node's capacity and
  health), and as series sampled every `SAMPLE_S` seconds (peak per bucket) from the moment the
  dashboard was first opened.

Nothing runs on the request path: the request log is read when the dashboard asks, so a call costs
in proportion to the requests of its window.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from shardon.store import request_id_floor
from shardon.store.queries import percentiles

if TYPE_CHECKING:
    from shardon.app import Gateway
    from shardon.rsgi import HTTPProtocol, Scope

__all__ = ["Overview", "parse_overview_query", "read_window"]

SAMPLE_S = 2.0
SAMPLES_KEPT = 43200  # a day of samples at SAMPLE_S
RECENT_S = 60.0
DEFAULT_WINDOW_S = 900
DEFAULT_POINTS = 60
WINDOW_RANGE = (60, 86400)
POINTS_RANGE = (2, 360)
_PERCENTILES = (50, 99)


def parse_overview_query(qs: str | bytes | None) -> tuple[int, int]:
    """``window=900&points=60`` → (window seconds, points); ValueError("param: why") when bad."""
    if isinstance(qs, bytes | bytearray):
        qs = bytes(qs).decode("utf-8", "replace")
    values = {"window": DEFAULT_WINDOW_S, "points": DEFAULT_POINTS}
    bounds = {"window": WINDOW_RANGE, "points": POINTS_RANGE}
    seen: set[str] = set()
    for name, value in parse_qsl(qs or "", keep_blank_values=True, max_num_fields=8):
        if name not in values:
            raise ValueError(f"{name}: unknown parameter (expected one of points, window)")
        if name in seen:
            raise ValueError(f"{name}: given more than once")
        seen.add(name)
        if value == "":
            continue
        lo, hi = bounds[name]
        if not (value.isascii() and value.isdigit()) or not lo <= int(value) <= hi:
            raise ValueError(f"{name}: must be an integer between {lo} and {hi}")
        values[name] = int(value)
    return values["window"], values["points"]


# -- the request log's side (runs in its reader pool) ---------------------------------------------


def _counters() -> dict[str, Any]:
    return {"requests": 0, "completed": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "tokens": 0}


def _add(into: dict[str, Any], n: int, ok: bool, prompt: int, completion: int) -> None:
    into["requests"] += n
    into["completed" if ok else "failed"] += n
    into["prompt_tokens"] += prompt
    into["completion_tokens"] += completion
    into["tokens"] += prompt + completion


def _ttft_percentiles(
    conn: sqlite3.Connection, group: str, where: str, args: list[Any]
) -> dict[Any, dict[str, float | None]]:
    """Nearest-rank TTFT p50/p99 (ms) per ``group`` over the 2xx requests of ``where``."""
    return percentiles(conn, "first_token_at - received_at", "first_token_at", where, args, group, _PERCENTILES)


def _no_ttft() -> dict[str, float | None]:
    return {f"p{p}": None for p in _PERCENTILES}


def read_window(conn: sqlite3.Connection, since: float, step: float, points: int, now: float) -> dict[str, Any]:
    """Totals, per model, per node and per bucket of the requests received since ``since``."""
    where = " WHERE id >= ? AND received_at >= ?"
    args: list[Any] = [request_id_floor(since), since]
    bucket = f"MIN(CAST((received_at - {float(since)!r}) / {float(step)!r} AS INTEGER), {points - 1})"
    totals = _counters()
    models: dict[Any, dict[str, Any]] = {}
    nodes: dict[Any, dict[str, Any]] = {}
    buckets = [_counters() for _ in range(points)]
    sql = (
        f"SELECT {bucket} AS b, model, node_id, status >= 200 AND status < 300 AS ok, COUNT(*), "
        "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
        f"FROM requests{where} GROUP BY b, model, node_id, ok"
    )
    for b, model, node, ok, n, prompt, completion in conn.execute(sql, args):
        ok = bool(ok)
        _add(totals, n, ok, prompt, completion)
        _add(models.setdefault(model, _counters()), n, ok, prompt, completion)
        _add(nodes.setdefault(node, _counters()), n, ok, prompt, completion)
        if 0 <= b < points:
            _add(buckets[b], n, ok, prompt, completion)
    recent = _counters()
    recent_since = max(since, now - RECENT_S)
    sql = (
        "SELECT status >= 200 AND status < 300 AS ok, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
        f"COALESCE(SUM(completion_tokens), 0) FROM requests{where} GROUP BY ok"
    )
    for ok, n, prompt, completion in conn.execute(sql, [request_id_floor(recent_since), recent_since]):
        _add(recent, n, bool(ok), prompt, completion)
    totals["ttft_ms"] = _ttft_percentiles(conn, "NULL", where, args).get(None, _no_ttft())
    for group, table in (("model", models), ("node_id", nodes)):
        pct = _ttft_percentiles(conn, group, where, args)
        for key, entry in table.items():
            entry["ttft_ms"] = pct.get(key, _no_ttft())
    pct = _ttft_percentiles(conn, bucket, where, args)
    for i, entry in enumerate(buckets):
        entry["ttft_ms"] = pct.get(i, _no_ttft())
    seconds = max(now - recent_since, 1e-9)
    recent["seconds"] = round(seconds, 3)
    recent["requests_per_s"] = recent["requests"] / seconds
    recent["tokens_per_s"] = recent["tokens"] / seconds
    return {"totals": totals, "recent": recent, "models": models, "nodes": nodes, "buckets": buckets}


# -- the loop's side ------------------------------------------------------------------------------


class Overview:
    """Serves ``GET /admin/overview`` and keeps the in-flight / queue-depth samples."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=SAMPLES_KEPT)
        self._timer: asyncio.TimerHandle | None = None

    def start_sampling(self) -> None:
        """Sample in-flight and queue depth every `SAMPLE_S` seconds from now on (idempotent)."""
        if self._timer is None:
            self._sample()

    def _sample(self) -> None:
        gw = self.gw
        self.samples.append((time.time(), gw.in_flight, sum(gw.scheduler.queue_depths().values())))
        self._timer = asyncio.get_running_loop().call_later(SAMPLE_S, self._sample)

    def stop_sampling(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def handle(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        window, points = parse_overview_query(scope.query_string)
        self.start_sampling()
        return 200, await self.build(window, points)

    async def build(self, window: int, points: int, now: float | None = None) -> dict[str, Any]:
        gw = self.gw
        now = time.time() if now is None else now
        step = window / points
        since = (math.floor(now / step) - (points - 1)) * step
        log = gw.request_log
        if log is not None:
            read = await log.read(read_window, since, step, points, now)
        else:
            read = {"totals": _counters(), "recent": _counters(), "models": {}, "nodes": {}, "buckets": []}
            read["totals"]["ttft_ms"] = _no_ttft()
        queues = gw.scheduler.queue_depths()
        balancer = gw.scheduler.balancer
        live_nodes = {n.id: n for n in gw.registry.nodes.values()}
        nodes = []
        for node_id in sorted(set(live_nodes) | {k for k in read["nodes"] if k is not None}):
            node = live_nodes.get(node_id)
            entry = {"node": node_id, **read["nodes"].get(node_id, {**_counters(), "ttft_ms": _no_ttft()})}
            entry["live"] = node is not None
            entry["healthy"] = node.healthy if node is not None else None
            entry["in_flight"] = balancer.inflight(node.index) if node is not None else 0
            entry["capacity"] = node.max_concurrent if node is not None else 0
            nodes.append(entry)
        models = []
        for name in sorted(set(queues) | {k for k in read["models"] if k is not None}):
            entry = {"model": name, **read["models"].get(name, {**_counters(), "ttft_ms": _no_ttft()})}
            entry["queued"] = queues.get(name, 0)
            models.append(entry)
        models.sort(key=lambda m: -m["requests"])
        queued = sum(queues.values())
        series = self._series(read["buckets"], since, step, points, now, gw.in_flight, queued)
        return {
            "now": now,
            "since": since,
            "window_s": window,
            "step_s": step,
            "request_log": log is not None,
            "in_flight": gw.in_flight,
            "queued": queued,
            "capacity": sum(n.max_concurrent for n in live_nodes.values() if n.healthy),
            "totals": read["totals"],
            "recent": read["recent"],
            "models": models,
            "nodes": nodes,
            "series": series,
        }

    def _series(
        self,
        buckets: list[dict[str, Any]],
        since: float,
        step: float,
        points: int,
        now: float,
        inflight: int,
        queued: int,
    ) -> dict[str, list[Any]]:
        peak_in: list[int | None] = [None] * points
        peak_q: list[int | None] = [None] * points
        for t, n_in, n_q in [*self._samples_since(since), (now, inflight, queued)]:
            b = min(int((t - since) // step), points - 1)
            if b >= 0:
                peak_in[b] = max(peak_in[b] or 0, n_in)
                peak_q[b] = max(peak_q[b] or 0, n_q)
        return {
            "t": [since + i * step for i in range(points)],
            "requests": [b["requests"] for b in buckets] or [0] * points,
            "failed": [b["failed"] for b in buckets] or [0] * points,
            "tokens": [b["tokens"] for b in buckets] or [0] * points,
            "ttft_p50": [b["ttft_ms"]["p50"] for b in buckets] or [None] * points,
            "ttft_p99": [b["ttft_ms"]["p99"] for b in buckets] or [None] * points,
            "in_flight": peak_in,
            "queued": peak_q,
        }

    def _samples_since(self, since: float) -> list[tuple[float, int, int]]:
        out = []
        for sample in reversed(self.samples):
            if sample[0] < since:
                break
            out.append(sample)
        return out
