"""What Shardon changes in a request to a model it starts itself, before forwarding it.

- ``max_tokens``: a request that gives none gets the model's ``default_max_tokens``, so a small model
  cannot run into its whole context by accident (llama-cpp-python's chat endpoint generates until the
  context is full when none is given); one above ``max_tokens_cap`` is lowered to the cap, without
  an error (the answer then ends with ``finish_reason: "length"``). The value applied is written
  into the forwarded body as ``max_tokens`` (and as ``max_completion_tokens`` when the client used
  that name) and recorded in the request log. A body that already says it is forwarded unchanged.
- ``request_defaults``: top-level fields (sampling settings such as ``temperature``) that a request
  gets when it does not give them; a field the client gives is never changed.
- A base model (``chat: false``) refuses ``/v1/chat/completions`` with a 400.

Embeddings requests are left alone.
"""

from __future__ import annotations

import orjson

from shardon.errors import BadRequest
from shardon.lifecycle.catalog import CatalogEntry
from shardon.schemas import RoutingFields, with_fields

CHAT_PATH = "/v1/chat/completions"
EMBEDDINGS_PATH = "/v1/embeddings"


def applied_max_tokens(requested: int | None, default: int | None, cap: int | None) -> int | None:
    """The max_tokens a request runs with: the requested one (or ``default``), at most ``cap``;
    None when neither the request nor the model sets one."""
    value = default if requested is None else requested
    if cap is not None and (value is None or value > cap):
        return cap
    return value


def shape_request(entry: CatalogEntry, path: str, req: RoutingFields, body: bytes) -> tuple[int | None, bytes]:
    """(max_tokens applied, body to forward) for a request to ``entry``'s model on ``path``."""
    if path == EMBEDDINGS_PATH:
        return None, body
    if path == CHAT_PATH and not entry.chat:
        raise BadRequest(
            f"the model '{entry.name}' is a base model without a chat format: use /v1/completions", param="model"
        )
    # OpenAI's newer name wins when both are given, as in vLLM.
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if requested is not None and requested < 1:
        raise BadRequest(f"{name} must be at least 1, got {requested}", param=name)
    applied = applied_max_tokens(requested, entry.default_max_tokens, entry.max_tokens_cap)
    fields: dict[str, object] = {}
    if applied is not None and req.max_tokens != applied:
        fields["max_tokens"] = applied
    if applied is not None and req.max_completion_tokens is not None and req.max_completion_tokens != applied:
        fields["max_completion_tokens"] = applied
    if entry.request_defaults:
        given = orjson.loads(body)  # which fields the client gave (a local model: this parse is cheap)
        fields.update((name, value) for name, value in entry.request_defaults if name not in given)
    return applied, with_fields(body, **fields) if fields else body
