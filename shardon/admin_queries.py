"""Admin API query strings → validated keyword arguments for the request-log reads.

Each ``parse_*`` function takes the raw query string (``str`` or ``bytes``, without the ``?``) and
returns the kwargs of the matching `shardon.store.RequestLog` coroutine, e.g.::

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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from shardon.store import parse_request_id as _parse_request_id
from shardon.store import parse_status_filter

__all__ = [
    "MAX_LIMIT",
    "MAX_NAME",
    "MAX_OFFSET",
    "parse_audit_query",
    "parse_request_id",
    "parse_requests_query",
    "parse_stats_by_model_query",
    "parse_stats_query",
    "parse_usage_query",
]

MAX_LIMIT = 1000
MAX_OFFSET = 10_000_000
MAX_NAME = 256
_MAX_FIELDS = 32
_MAX_QUERY = 8192
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


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

    The id is the 16 hex digits a client got in ``x-request-id`` (`shardon.store.parse_request_id`).
    """
    try:
        return _parse_request_id(value)
    except ValueError:
        raise ValueError("id: must be 16 hex digits (the x-request-id of a response)") from None
