"""The few OpenAI request fields Shardon reads; decoders built once.

Only what routing and accounting need is decoded (msgspec skips the rest without building it); the
request itself is forwarded as the client's bytes, so fields Shardon does not know — llama.cpp's
``cache_prompt``, vLLM's ``guided_json`` — reach the node untouched.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class RoutingFields(msgspec.Struct):
    model: str
    stream: bool | None = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None


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


class _UsageProbe(msgspec.Struct):
    choices: list[Any] | None = None
    usage: dict[str, Any] | None = None


_probe_decoder = msgspec.json.Decoder(_UsageProbe)


class UsageStripper:
    """Removes the usage-only SSE event Shardon asked the node for on the client's behalf.

    Shardon adds ``stream_options.include_usage`` when it needs the real token count of a stream
    the client did not ask usage for; the extra event (``"choices": []`` with ``usage``) must not
    reach the client. Events pass through as the node's bytes; only complete events are inspected,
    and an incomplete one is held until its end arrives (which adds no delay to complete events).
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        if self._pending:
            data = self._pending + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self._pending = data
            return b""
        complete, self._pending = data[: end + 2], data[end + 2 :]
        if b'"usage"' not in complete:
            return complete
        if b'"usage":null' in complete:
            # Nodes that honour include_usage add "usage": null to every chunk (as OpenAI does).
            # Unescaped quotes only occur in JSON structure, never inside a string value.
            complete = complete.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
            if b'"usage"' not in complete:
                return complete  # the usual chunk: nothing else to look at
        kept = [event for event in complete.split(b"\n\n") if event and not _is_usage_only(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def _is_usage_only(event: bytes) -> bool:
    payload = event.partition(b"data:")[2].strip()
    if not payload.startswith(b"{"):
        return False
    try:
        probe = _probe_decoder.decode(payload)
    except msgspec.DecodeError:
        return False
    return probe.usage is not None and not probe.choices


def models_list(names: list[str], created: int) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "shardon"} for n in names],
        }
    )
