"""The few OpenAI request fields Shardon reads; decoders built once.

Only what routing and accounting need is decoded (msgspec skips the rest without building it); the
request itself is forwarded as the client's bytes, so fields Shardon does not know — llama.cpp's
``cache_prompt``, vLLM's ``guided_json`` — reach the node untouched.
"""

from __future__ import annotations

import msgspec
import orjson

# The usage stripper runs once per stream chunk: compiled, with its pure-Python twin (shardon/_fast).
from ._fast.sse import UsageStripper

__all__ = [
    "PRIORITY_BY_NAME",
    "PRIORITY_NAMES",
    "RoutingFields",
    "StreamOptions",
    "UsageStripper",
    "models_list",
    "routing_decoder",
    "with_fields",
]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class RoutingFields(msgspec.Struct):
    model: str
    stream: bool | None = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # a session, for routing rules that keep one on a node or a variant


routing_decoder = msgspec.json.Decoder(RoutingFields)

PRIORITY_BY_NAME: dict[str, int] = {"low": 0, "normal": 1, "high": 2, "critical": 3}
PRIORITY_NAMES: tuple[str, ...] = ("low", "normal", "high", "critical")


def with_fields(body: bytes, **fields: object) -> bytes:
    """The same request with some fields set (a model alias, injected stream options).

    The only case where a body is re-encoded; everything else in it is kept.
    """
    obj = orjson.loads(body)
    for name, value in fields.items():
        if isinstance(value, dict) and isinstance(obj.get(name), dict):
            obj[name] = {**obj[name], **value}
        else:
            obj[name] = value
    return orjson.dumps(obj)


def models_list(names: list[str], created: int, extra: dict[str, dict[str, object]] | None = None) -> bytes:
    """The ``/v1/models`` body; ``extra``: more fields for some models (clients ignore unknown ones)."""
    extra = extra or {}
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "shardon", **extra.get(n, {})}
                for n in names
            ],
        }
    )
