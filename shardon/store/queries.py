"""The request log's reads: SQL over the requests and audit tables, and the admin query strings.

Each read is a function of a connection (``requests``, ``request``, ``stats``, ``stats_by_model``,
``stats_by_tenant``, ``audit_entries``); `shardon.store.log.RequestLog` runs them in its reader
threads. Each ``parse_*`` function turns an admin API query string into the keyword arguments of
one of them, e.g.::

    kwargs = parse_requests_query(b"status=4xx&model=m&limit=10&offset=20&since=1700000000")
    page = await request_log.query(**kwargs)

Bad input raises ``ValueError("<param>: <why>")``; the gateway answers it with a 400 error whose
``param`` is the part before the colon. Rules:

- An unknown parameter, or one given twice, is an error. An empty value (``model=``) means "not given".
- ``status``: an HTTP status (``404``) or a class (``4xx``).
- ``since`` / ``until``: unix seconds, or an ISO 8601 date-time (``2024-05-01T12:00:00Z``; without an
  offset it is UTC); ``since <= received_at < until``; ``since`` must not be after ``until``.
- ``limit``: 0..`MAX_LIMIT` (default 100); ``offset``: 0..`MAX_OFFSET` (default 0).
- ``model``, ``node``, ``tenant``, ``key_id``: at most `MAX_NAME` characters, no control characters.
- A request id (`parse_request_id`, from the path): the 16 hex digits of ``x-request-id``.

Why the filters are written as they are (the id bound of ``since``, the partial index of errors):
``docs/request-log.md`` (schema).
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson

from . import records
from .records import REQUEST_COLUMNS, format_request_id, receipt_for, request_id_floor
from .schema import AUDIT_COLUMNS, BOOL_COLUMNS, NOT_OK

__all__ = [
    "MAX_LIMIT",
    "MAX_NAME",
    "MAX_OFFSET",
    "audit_entries",
    "parse_audit_query",
    "parse_request_id",
    "parse_requests_query",
    "parse_stats_by_model_query",
    "parse_stats_query",
    "parse_status_filter",
    "parse_usage_query",
    "percentiles",
    "request",
    "requests",
    "stats",
    "stats_by_model",
    "stats_by_tenant",
]

MAX_LIMIT = 1000
MAX_OFFSET = 10_000_000
MAX_NAME = 256
_MAX_FIELDS = 32
_MAX_QUERY = 8192
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_PERCENTILES = (50, 90, 99)


def _pairs(qs: str | bytes | None, allowed: Iterable[str]) -> dict[str, str]:
    if qs is None:
        return {}
    if isinstance(qs, bytes | bytearray):
        try:
            qs = bytes(qs).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("query: not valid UTF-8") from None
    if qs.startswith("?"):
        qs = qs[1:]
    if len(qs) > _MAX_QUERY:
        raise ValueError(f"query: longer than {_MAX_QUERY} characters")
    try:
        pairs = parse_qsl(qs, keep_blank_values=True, max_num_fields=_MAX_FIELDS, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("query: percent-encoding is not valid UTF-8") from None
    except ValueError:
        raise ValueError(f"query: more than {_MAX_FIELDS} parameters") from None
    allowed = set(allowed)
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise ValueError(f"{name}: unknown parameter (expected one of {', '.join(sorted(allowed))})")
        if name in out:
            raise ValueError(f"{name}: given more than once")
        out[name] = value
    return {k: v for k, v in out.items() if v != ""}


def _int(name: str, value: str, lo: int, hi: int) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name}: must be an integer between {lo} and {hi}")
    n = int(text)
    if not lo <= n <= hi:
        raise ValueError(f"{name}: must be between {lo} and {hi}")
    return n


def parse_time(name: str, value: str) -> float:
    """Unix seconds or ISO 8601 date-time (UTC when it has no offset) → unix seconds."""
    text = value.strip()
    try:
        t = float(text)
    except ValueError:
        iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
        try:
            dt = datetime.fromisoformat(iso)
        except ValueError:
            raise ValueError(f"{name}: must be unix seconds or an ISO 8601 date-time") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{name}: must be a non-negative finite number of unix seconds")
    return t


def _name(name: str, value: str) -> str:
    if len(value) > MAX_NAME:
        raise ValueError(f"{name}: longer than {MAX_NAME} characters")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{name}: contains control characters")
    return value


def _status(name: str, value: str) -> int | str:
    try:
        lo, hi = parse_status_filter(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return lo if hi - lo == 1 else value.strip().lower()


_FIELDS: dict[str, Callable[[str, str], Any]] = {
    "status": _status,
    "model": _name,
    "node": _name,
    "tenant": _name,
    "key_id": _name,
    "since": parse_time,
    "until": parse_time,
    "limit": lambda n, v: _int(n, v, 0, MAX_LIMIT),
    "offset": lambda n, v: _int(n, v, 0, MAX_OFFSET),
}


def _parse(qs: str | bytes | None, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    raw = _pairs(qs, names)
    out = dict(defaults)
    for name in names:
        if name in raw:
            out[name] = _FIELDS[name](name, raw[name])
    since, until = out.get("since"), out.get("until")
    if since is not None and until is not None and since > until:
        raise ValueError("since: must not be after until")
    return out


def parse_requests_query(qs: str | bytes | None) -> dict[str, Any]:
    """Kwargs for `RequestLog.query`: status, model, node, tenant, key_id, since, until, limit, offset."""
    return _parse(
        qs,
        ("status", "model", "node", "tenant", "key_id", "since", "until", "limit", "offset"),
        {"limit": 100, "offset": 0},
    )


def parse_stats_query(qs: str | bytes | None) -> dict[str, Any]:
    """Kwargs for `RequestLog.stats`: since, until, model, tenant."""
    return _parse(qs, ("since", "until", "model", "tenant"), {})


def parse_stats_by_model_query(qs: str | bytes | None) -> dict[str, Any]:
    """Kwargs for `RequestLog.stats_by_model`: since, until, tenant."""
    return _parse(qs, ("since", "until", "tenant"), {})


def parse_usage_query(qs: str | bytes | None) -> dict[str, Any]:
    """Kwargs for `RequestLog.stats_by_tenant` (the usage report): since, until, tenant."""
    return _parse(qs, ("since", "until", "tenant"), {})


def parse_audit_query(qs: str | bytes | None) -> dict[str, Any]:
    """Kwargs for `RequestLog.audit_entries`: limit, offset."""
    return _parse(qs, ("limit", "offset"), {"limit": 100, "offset": 0})


def parse_request_id(value: str) -> int:
    """The integer id of a request id taken from a path (``/admin/requests/{id}``).

    The id is the 16 hex digits a client got in ``x-request-id`` (`records.parse_request_id`).
    """
    try:
        return records.parse_request_id(value)
    except ValueError:
        raise ValueError("id: must be 16 hex digits (the x-request-id of a response)") from None


# -- filters --------------------------------------------------------------------------------------


def parse_status_filter(status: int | str) -> tuple[int, int]:
    """``404`` / ``"404"`` → (404, 405); ``"4xx"`` → (400, 500). Raises ValueError when invalid."""
    if isinstance(status, bool):
        raise ValueError("must be an HTTP status like 404 or a class like 4xx")
    if isinstance(status, int):
        code = status
    else:
        text = status.strip().lower()
        if len(text) == 3 and text.endswith("xx") and text[0] in "12345":
            base = int(text[0]) * 100
            return base, base + 100
        if not (text.isascii() and text.isdigit()):
            raise ValueError("must be an HTTP status like 404 or a class like 4xx")
        code = int(text)
    if not 100 <= code <= 599:
        raise ValueError("must be between 100 and 599")
    return code, code + 1


def _where(
    *,
    status: int | str | None = None,
    model: str | None = None,
    node: str | None = None,
    tenant: str | None = None,
    key_id: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if status is not None:
        lo, hi = parse_status_filter(status)
        if hi - lo == 1:
            clauses.append("status = ?")
            args.append(lo)
        else:
            clauses.append("status >= ? AND status < ?")
            args += [lo, hi]
        if not lo <= 200 < hi:
            clauses.append(NOT_OK)  # lets SQLite use the partial index of non-200 rows
    for column, value in (("model", model), ("node_id", node), ("tenant", tenant), ("key_id", key_id)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        # The id bound lets SQLite seek the primary key to the first row that can match (an id's
        # time is never earlier than its received_at); the exact received_at test stays.
        clauses.append("id >= ?")
        args.append(request_id_floor(float(since)))
        clauses.append("received_at >= ?")
        args.append(float(since))
    if until is not None:
        clauses.append("received_at < ?")
        args.append(float(until))
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def _row_dict(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    """A request row as callers see it: ``"id"`` as 16 hex digits, booleans as bool, the receipt."""
    d = dict(zip(columns, row, strict=True))
    if "id" in d:
        d["id"] = format_request_id(d["id"])
    for col in BOOL_COLUMNS:
        if col in d and d[col] is not None:
            d[col] = bool(d[col])
    d["receipt"] = receipt_for(d) if d.get("finished_at") is not None else None
    return d


# -- reads (RequestLog runs them in its reader threads) -------------------------------------------

_SELECT_REQUESTS = "SELECT {} FROM requests".format(", ".join(REQUEST_COLUMNS))


def requests(
    conn: sqlite3.Connection,
    status: int | str | None = None,
    model: str | None = None,
    node: str | None = None,
    tenant: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 100,
    offset: int = 0,
    key_id: str | None = None,
) -> dict[str, Any]:
    """Requests matching every given filter, newest first: ``{"data": [row, ...], "total": n}``.

    ``status`` is an exact status (404) or a class ("4xx"); ``since``/``until`` bound ``received_at``
    (``since <= received_at < until``); ``total`` counts every match, ignoring limit/offset. Newest
    first is by id (arrival order): a walk down the primary key, no sort. Each row's ``"id"`` is
    the 16-hex-digit form (`format_request_id`).
    """
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")
    where, args = _where(status=status, model=model, node=node, tenant=tenant, key_id=key_id, since=since, until=until)
    total = conn.execute(f"SELECT COUNT(*) FROM requests{where}", args).fetchone()[0]
    rows = conn.execute(
        f"{_SELECT_REQUESTS}{where} ORDER BY id DESC LIMIT ? OFFSET ?",
        [*args, int(limit), int(offset)],
    ).fetchall()
    return {"data": [_row_dict(REQUEST_COLUMNS, r) for r in rows], "total": total}


def request(conn: sqlite3.Connection, request_id: int) -> dict[str, Any] | None:
    """One request by its integer id (`parse_request_id` reads the hex form), or None."""
    if not 0 <= request_id < 1 << 63:  # 16 hex digits can name more than SQLite's integers hold
        return None
    row = conn.execute(f"{_SELECT_REQUESTS} WHERE id = ?", (request_id,)).fetchone()
    return None if row is None else _row_dict(REQUEST_COLUMNS, row)


def percentiles(
    conn: sqlite3.Connection,
    expr: str,
    present: str,
    where: str,
    args: list[Any],
    group: str | None,
    ranks_of: tuple[int, ...] = _PERCENTILES,
) -> dict[Any, dict[str, float | None]]:
    """Nearest-rank percentiles ``ranks_of`` (ms: ``{"p50": ..}``) of ``expr`` over the successful
    (2xx) requests of ``where`` whose ``present`` column is set, per ``group`` (None: one group).

    Computed inside SQLite with window functions: no value list is materialised in Python.
    """
    cond = f"{present} IS NOT NULL AND status >= 200 AND status < 300"
    where = f"{where} AND {cond}" if where else f" WHERE {cond}"
    g = group or "NULL"
    ranks = " OR ".join(f"rn = ({p} * n + 99) / 100" for p in ranks_of)
    sql = (
        f"WITH v AS (SELECT {g} AS g, ({expr}) AS x FROM requests{where}), "
        "r AS (SELECT g, x, ROW_NUMBER() OVER (PARTITION BY g ORDER BY x) AS rn, "
        "COUNT(*) OVER (PARTITION BY g) AS n FROM v) "
        f"SELECT g, rn, n, x FROM r WHERE {ranks}"
    )
    out: dict[Any, dict[str, float | None]] = {}
    for g_val, rn, n, x in conn.execute(sql, args):
        slot = out.setdefault(g_val, {f"p{p}": None for p in ranks_of})
        for p in ranks_of:
            if rn == (p * n + 99) // 100:
                slot[f"p{p}"] = round(x * 1000.0, 3)
    return out


_EMPTY_PCT: dict[str, float | None] = {f"p{p}": None for p in _PERCENTILES}

_TIMINGS = (
    ("latency_ms", "finished_at - received_at", "finished_at"),
    ("ttft_ms", "first_token_at - received_at", "first_token_at"),
    ("queue_ms", "dispatched_at - received_at", "dispatched_at"),
)


def _stats_grouped(
    conn: sqlite3.Connection, group: str | None, since: float | None, until: float | None, **filters: Any
) -> dict[Any, dict[str, Any]]:
    where, args = _where(since=since, until=until, **filters)
    g = group or "NULL"
    out: dict[Any, dict[str, Any]] = {}
    sql = (
        f"SELECT {g}, status, COUNT(*), COALESCE(SUM(prompt_tokens), 0), "
        f"COALESCE(SUM(completion_tokens), 0) FROM requests{where} GROUP BY {g}, status"
    )
    for g_val, status, n, p_tok, c_tok in conn.execute(sql, args):
        s = out.setdefault(
            g_val,
            {
                "total": 0,
                "completed": 0,
                "failed": 0,
                "by_status": {},
                "tokens": {"prompt": 0, "completion": 0},
            },
        )
        s["total"] += n
        if 200 <= (status or 0) < 300:
            s["completed"] += n
        else:
            s["failed"] += n
        s["by_status"][str(status)] = n
        s["tokens"]["prompt"] += p_tok
        s["tokens"]["completion"] += c_tok
    for key, expr, present in _TIMINGS:
        pct = percentiles(conn, expr, present, where, args, group)
        for g_val, s in out.items():
            s[key] = pct.get(g_val, dict(_EMPTY_PCT))
    return out


def _empty_stats() -> dict[str, Any]:
    s: dict[str, Any] = {
        "total": 0,
        "completed": 0,
        "failed": 0,
        "by_status": {},
        "tokens": {"prompt": 0, "completion": 0},
    }
    for key, _, _ in _TIMINGS:
        s[key] = dict(_EMPTY_PCT)
    return s


def stats(
    conn: sqlite3.Connection,
    since: float | None = None,
    until: float | None = None,
    model: str | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Totals over ``since <= received_at < until``.

    ``{"total", "completed" (2xx), "failed" (not 2xx), "by_status": {"200": n, ...},
    "tokens": {"prompt", "completion"}, "latency_ms" / "ttft_ms" / "queue_ms": {"p50", "p90", "p99"},
    "since", "until"}``. Percentiles are nearest-rank over successful requests, measured from
    ``received_at`` (so ttft includes queueing); None when there is no data. Token sums include the
    partial usage of failed requests.
    """
    grouped = _stats_grouped(conn, None, since, until, model=model, tenant=tenant)
    s = grouped.get(None) or _empty_stats()
    s["since"] = since
    s["until"] = until
    return s


def stats_by_model(
    conn: sqlite3.Connection,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """`stats` per model: ``{"data": [{"model": m, ...stats, "variants", "overflow"}, ...]}``,
    busiest first. ``variants``: for a traffic split, per variant ``{"total", "completed", "failed",
    "share"}`` (share of the model's requests); ``overflow``: the requests the overflow endpoint
    served and their tokens, ``{"requests", "prompt_tokens", "completion_tokens"}``."""
    grouped = _stats_grouped(conn, "model", since, until, tenant=tenant)
    where, args = _where(since=since, until=until, tenant=tenant)
    variants: dict[Any, dict[str, Any]] = {}
    more = " AND variant IS NOT NULL" if where else " WHERE variant IS NOT NULL"
    sql = (
        "SELECT model, variant, COUNT(*), SUM(CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END) "
        f"FROM requests{where}{more} GROUP BY model, variant"
    )
    for model, variant, n, ok in conn.execute(sql, args):
        variants.setdefault(model, {})[variant] = {"total": n, "completed": ok, "failed": n - ok}
    overflow: dict[Any, dict[str, int]] = {}
    more = " AND overflow = 1" if where else " WHERE overflow = 1"
    sql = (
        "SELECT model, COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) "
        f"FROM requests{where}{more} GROUP BY model"
    )
    for model, n, p_tok, c_tok in conn.execute(sql, args):
        overflow[model] = {"requests": n, "prompt_tokens": p_tok, "completion_tokens": c_tok}
    data = []
    for m, s in grouped.items():
        split = variants.get(m, {})
        for counts in split.values():
            counts["share"] = round(counts["total"] / s["total"], 4) if s["total"] else 0.0
        data.append({"model": m, **s, "variants": split, "overflow": overflow.get(m, _no_overflow())})
    data.sort(key=lambda d: (-d["total"], d["model"] or ""))
    return {"data": data, "since": since, "until": until}


def _no_overflow() -> dict[str, int]:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def stats_by_tenant(
    conn: sqlite3.Connection,
    since: float | None = None,
    until: float | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Usage report: requests and tokens per tenant, and per API key inside each tenant.

    ``{"data": [{"tenant", "requests", "completed", "failed", "prompt_tokens", "completion_tokens",
    "total_tokens", "overflow", "keys": [{"key_id", ...same counters}]}], "since", "until"}``,
    busiest first. ``overflow``: what the requests served by overflow endpoints cost,
    ``{"requests", "prompt_tokens", "completion_tokens", "total_tokens"}``.
    """
    where, args = _where(since=since, until=until, tenant=tenant)
    sql = (
        "SELECT tenant, key_id, COUNT(*), "
        "SUM(CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END), "
        "COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
        "SUM(overflow), COALESCE(SUM(CASE WHEN overflow THEN prompt_tokens END), 0), "
        "COALESCE(SUM(CASE WHEN overflow THEN completion_tokens END), 0) "
        f"FROM requests{where} GROUP BY tenant, key_id"
    )
    tenants: dict[Any, dict[str, Any]] = {}

    def counters(n: int, ok: int, p: int, c: int, on: int, op: int, oc: int) -> dict[str, Any]:
        return {
            "requests": n,
            "completed": ok,
            "failed": n - ok,
            "prompt_tokens": p,
            "completion_tokens": c,
            "total_tokens": p + c,
            "overflow": {"requests": on, "prompt_tokens": op, "completion_tokens": oc, "total_tokens": op + oc},
        }

    for t, key_id, n, ok, p, c, on, op, oc in conn.execute(sql, args):
        entry = tenants.get(t)
        if entry is None:
            entry = tenants[t] = {"tenant": t, **counters(0, 0, 0, 0, 0, 0, 0), "keys": []}
        add = counters(n, ok, p, c, on or 0, op, oc)
        for k, v in add.items():
            if k == "overflow":
                for name, amount in v.items():
                    entry["overflow"][name] += amount
            else:
                entry[k] += v
        entry["keys"].append({"key_id": key_id, **add})
    data = list(tenants.values())
    for entry in data:
        entry["keys"].sort(key=lambda d: (-d["requests"], d["key_id"] or ""))
    data.sort(key=lambda d: (-d["requests"], d["tenant"] or ""))
    return {"data": data, "since": since, "until": until}


def audit_entries(conn: sqlite3.Connection, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """Audit entries, newest first.

    ``{"data": [{"id", "at", "actor", "action", "target", "detail" (dict)}, ...], "total": n}``.
    """
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must be >= 0")
    total = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    rows = conn.execute(
        "SELECT id, at, actor, action, target, detail FROM audit ORDER BY at DESC, id DESC LIMIT ? OFFSET ?",
        (int(limit), int(offset)),
    ).fetchall()
    data = []
    for row in rows:
        d = dict(zip(AUDIT_COLUMNS, row, strict=True))
        d["detail"] = orjson.loads(d["detail"]) if d["detail"] else {}
        data.append(d)
    return {"data": data, "total": total}
