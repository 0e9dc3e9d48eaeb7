"""The ``/v1`` endpoints that are exchanges: forwarded to a node that serves the request's model.

Each has a role, which says how its body is read and what Shardon does beyond forwarding it:

- ``generative`` (chat, completions): a JSON body; a stream's usage is asked for when the client did
  not, the generated text is hashed for the receipt, a model Shardon runs gets its max_tokens;
- ``embeddings``: a JSON body; the usage is read from the answer;
- ``json`` (responses, rerank, score, moderations, speech, image generation): a JSON body routed by
  its ``model``; the answer is relayed as the node sends it (streamed when it streams), its usage
  read when it is a whole JSON answer;
- ``form`` (transcriptions, translations, image edits and variations): a ``multipart/form-data``
  body routed by its ``model`` field, forwarded with the client's Content-Type (its boundary).

Every one is forwarded as the client's bytes and logged like the others. Bodies are limited per
endpoint: ``server.max_body_bytes`` (1 MiB) unless the endpoint takes uploads or images
(`LARGE_BODIES`), and ``server.endpoint_max_body_bytes`` overrides any of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ServerConfig

__all__ = ["EMBEDDINGS", "ENDPOINTS", "FORM", "GENERATIVE", "JSON_BODY", "LARGE_BODIES", "body_limits"]

GENERATIVE = "generative"
EMBEDDINGS = "embeddings"
JSON_BODY = "json"
FORM = "form"

ENDPOINTS: dict[str, str] = {
    "/v1/chat/completions": GENERATIVE,
    "/v1/completions": GENERATIVE,
    "/v1/embeddings": EMBEDDINGS,
    "/v1/responses": JSON_BODY,
    "/v1/rerank": JSON_BODY,
    "/v1/score": JSON_BODY,
    "/v1/moderations": JSON_BODY,
    "/v1/audio/speech": JSON_BODY,
    "/v1/audio/transcriptions": FORM,
    "/v1/audio/translations": FORM,
    "/v1/images/generations": JSON_BODY,
    "/v1/images/edits": FORM,
    "/v1/images/variations": FORM,
}

_MIB = 1 << 20
# An audio file (OpenAI takes up to 25 MB) or images in a form, base64 images in a response's input.
LARGE_BODIES: dict[str, int] = {
    "/v1/audio/transcriptions": 26 * _MIB,
    "/v1/audio/translations": 26 * _MIB,
    "/v1/images/edits": 26 * _MIB,
    "/v1/images/variations": 26 * _MIB,
    "/v1/responses": 20 * _MIB,
}


def body_limits(server: ServerConfig) -> dict[str, int]:
    """The largest body each endpoint takes, in bytes."""
    base = server.max_body_bytes
    limits = {path: max(base, LARGE_BODIES.get(path, 0)) for path in ENDPOINTS}
    limits.update(server.endpoint_max_body_bytes)
    return limits
