"""Output receipts: the SHA-256 of the text a model generated, and the receipt dict.

The digest (``output_sha256``) is of the UTF-8 text generated for choice 0 of a completion, whether
the response was streamed or not, so the same text gives the same digest either way:

- `hash_response(body)` for a non-streamed response: ``choices[0].message.content`` (chat) or
  ``choices[0].text`` (completions); missing or null fields hash as empty text. It also returns the
  response's ``usage``.
- `OutputHasher` for a stream, fed each network chunk as it is forwarded to the client
  (``feed_sse``), then ``hexdigest()``.

Both run on every request, so they live in ``shardon._fast`` (compiled, with their pure-Python
twins; ``_sse_py.py`` documents how SSE is read: chunk boundaries, data lines, usage events, what
is hashed).

Only ``content``/``text`` is hashed: tool calls, reasoning content and logprobs are not part of the
digest.

`receipt_for(record)` builds the receipt of a finished request (node, backend, model file hash,
timings, token counts, output hash) from a `RequestRecord` or a request-log row dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._fast.sse import OutputHasher, hash_response

if TYPE_CHECKING:
    from shardon.store import RequestRecord

__all__ = ["OutputHasher", "hash_response", "receipt_for"]


def _ms(later: Any, earlier: Any) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000.0, 3)


def receipt_for(record: RequestRecord | Mapping[str, Any]) -> dict[str, Any]:
    """The receipt of a request: where it ran, on which model file, how long it took, what it produced.

    Accepts a `RequestRecord` or a row dict from the request log. ``request_id`` is the id as
    clients see it (16 hex digits, `shardon.store.format_request_id`): a record's integer id is
    formatted, a row dict's (already formatted by the log) is taken as it is. Times are unix
    seconds; the derived durations (``queue_ms``, ``ttft_ms``, ``duration_ms``) are measured from
    ``received_at`` and are None when a timestamp is missing.
    """
    if isinstance(record, Mapping):
        get = record.get
    else:

        def get(name: str, default: Any = None) -> Any:
            return getattr(record, name, default)

    request_id = get("id")
    if type(request_id) is int:
        from shardon.store import format_request_id  # here: shardon.store imports this module

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
