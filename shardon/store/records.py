"""Request records and request ids: what the gateway hands the request log, and how requests are named.

A leaf: it imports nothing from ``shardon`` but a primitive (the id sequence, `shardon._fast.ids`), so
any module (the request path, the compiled code, the admin API) may import it without pulling in the
log's threads or SQLite. How ids are built and why is in ``docs/request-log.md`` (request ids).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from shardon._fast.ids import RequestIds

__all__ = [
    "REQUEST_COLUMNS",
    "RequestIds",
    "RequestRecord",
    "format_request_id",
    "parse_request_id",
    "receipt_for",
    "request_id_floor",
    "request_ids",
]


request_ids = RequestIds()
"""The process's request ids (the gateway's and `RequestRecord`'s default; `shardon._fast.ids`:
``(milliseconds since the epoch << 20) + n``, only increasing)."""


def format_request_id(request_id: int) -> str:
    """A request id as clients see it (``x-request-id``): 16 lower-case hex digits."""
    return f"{request_id:016x}"


def parse_request_id(text: str) -> int:
    """The id `format_request_id` wrote; ValueError for anything else."""
    if len(text) != 16 or not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError("a request id is 16 hex digits")
    return int(text, 16)


def request_id_floor(t: float) -> int:
    """The smallest id a request received at unix time ``t`` or later can have."""
    return int(t * 1000) << 20


def _new_id() -> int:
    return request_ids.next(time.time())


class RequestRecord(msgspec.Struct, kw_only=True, gc=False, array_like=True):
    """One request as the gateway saw it; filled in as it goes, handed to the log when it ends.

    Keep ``id >= request_id_floor(received_at)`` (the time filters rely on it): the gateway takes
    both from one clock reading, ``RequestRecord(id=request_ids.next(now), received_at=now)``.
    Timestamps are unix seconds. ``status`` is the HTTP status sent to the client (499 when the
    client went away; 0 while unknown). ``key_id`` names an API key, never the secret. Fields are in
    the request log's column order: the log packs a record as a msgpack array of them.
    """

    id: int = msgspec.field(default_factory=_new_id)
    received_at: float = msgspec.field(default_factory=time.time)
    queued_at: float | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    endpoint: str = ""
    tenant: str | None = None
    key_id: str | None = None
    model: str | None = None
    node_id: str | None = None
    backend: str | None = None
    model_file_sha256: str | None = None
    priority: str | None = None
    stream: bool = False
    status: int = 0
    error_type: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    overflow: bool = False
    client_addr: str | None = None
    output_sha256: str | None = None
    # The max_tokens Shardon applied to a model it started itself (shardon/lifecycle/requests.py).
    max_tokens: int | None = None


REQUEST_COLUMNS: tuple[str, ...] = RequestRecord.__struct_fields__
"""The request log's columns: a record's fields, in order."""


def _ms(later: Any, earlier: Any) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000.0, 3)


def receipt_for(record: RequestRecord | Mapping[str, Any]) -> dict[str, Any]:
    """The receipt of a request: where it ran, on which model file, how long it took, what it produced.

    Accepts a `RequestRecord` or a row dict from the request log. ``request_id`` is the id as
    clients see it: a record's integer id is formatted, a row dict's (formatted by the log) taken
    as it is. Durations (``queue_ms``, ``ttft_ms``, ``duration_ms``) are measured from
    ``received_at`` and are None when a timestamp is missing.
    """
    if isinstance(record, Mapping):
        get = record.get
    else:

        def get(name: str, default: Any = None) -> Any:
            return getattr(record, name, default)

    request_id = get("id")
    if type(request_id) is int:
        request_id = format_request_id(request_id)
    received = get("received_at")
    prompt = get("prompt_tokens")
    completion = get("completion_tokens")
    total = None if prompt is None and completion is None else (prompt or 0) + (completion or 0)
    return {
        "request_id": request_id,
        "status": get("status"),
        "model": get("model"),
        "node": get("node_id"),
        "backend": get("backend"),
        "model_file_sha256": get("model_file_sha256"),
        "output_sha256": get("output_sha256"),
        "timings": {
            "received_at": received,
            "queued_at": get("queued_at"),
            "dispatched_at": get("dispatched_at"),
            "first_token_at": get("first_token_at"),
            "finished_at": get("finished_at"),
            "queue_ms": _ms(get("dispatched_at"), received),
            "ttft_ms": _ms(get("first_token_at"), received),
            "duration_ms": _ms(get("finished_at"), received),
        },
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": total,
        },
    }
