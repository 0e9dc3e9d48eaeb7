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
from .errors import BadRequest
from .multipart import FormError, boundary_of, form_fields

__all__ = [
    "PRIORITY_BY_NAME",
    "PRIORITY_NAMES",
    "FormRouting",
    "RoutingFields",
    "StreamOptions",
    "UsageStripper",
    "answer_usage",
    "form_routing",
    "model_object",
    "models_list",
    "node_body",
    "priority_named",
    "routing_decoder",
    "routing_fields",
    "session_decoder",
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


routing_decoder = msgspec.json.Decoder(RoutingFields)


class SessionField(msgspec.Struct):
    """A request's ``user`` field: a session, read only for the routing rules that keep one on a
    node or a variant (not by every request's `RoutingFields`)."""

    user: str | None = None


session_decoder = msgspec.json.Decoder(SessionField)


class FormRouting(msgspec.Struct):
    """`RoutingFields` of a ``multipart/form-data`` request (an upload), and its boundary."""

    model: str
    boundary: bytes
    stream: bool | None = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None


_FORM_FIELDS = frozenset({"model", "stream", "user"})


def form_routing(body: bytes, content_type: str | None) -> FormRouting:
    """The routing fields of a form: its ``model`` and ``stream`` ("true"); BadRequest for a body
    that is not the form its Content-Type says, or has no model."""
    try:
        boundary = boundary_of(content_type)
        fields = form_fields(body, boundary, _FORM_FIELDS)
        stream = fields.get("stream", "false").strip().lower()
        if stream not in ("true", "false", "1", "0"):
            raise FormError(f"stream must be true or false, got {fields['stream']!r}")
    except FormError as exc:
        raise BadRequest(f"invalid form: {exc}") from None
    model = fields.get("model", "").strip()
    if not model:
        raise BadRequest("invalid form: missing required field `model`", param="model")
    user = fields.get("user") or None
    return FormRouting(model=model, boundary=boundary, stream=stream in ("true", "1"), user=user)


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None  # /v1/responses
    output_tokens: int | None = None
    total_tokens: int | None = None


class _Answer(msgspec.Struct):
    usage: _Usage | None = None


_answer_decoder = msgspec.json.Decoder(_Answer)


def answer_usage(body: bytes) -> dict[str, int | None] | None:
    """The token usage of a whole JSON answer of any endpoint (None for other answers: audio, text)."""
    if not body.startswith(b"{"):
        return None
    try:
        usage = _answer_decoder.decode(body).usage
    except msgspec.MsgspecError:
        return None
    if usage is None:
        return None
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens
    completion = usage.completion_tokens if usage.completion_tokens is not None else usage.output_tokens
    if prompt is None and completion is None and usage.total_tokens is not None:
        prompt = usage.total_tokens  # rerank, moderations: what was read
    return {"prompt_tokens": prompt, "completion_tokens": completion}


PRIORITY_BY_NAME: dict[str, int] = {"low": 0, "normal": 1, "high": 2, "critical": 3}
PRIORITY_NAMES: tuple[str, ...] = ("low", "normal", "high", "critical")


def priority_named(value: str) -> int:
    """The priority an ``X-Priority`` header names; BadRequest (400) for a name that is none."""
    named = PRIORITY_BY_NAME.get(value.strip().lower())
    if named is None:
        raise BadRequest(f"X-Priority must be one of {', '.join(PRIORITY_NAMES)}, got {value!r}", param="X-Priority")
    return named


_INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'


def node_body(body: bytes, req: RoutingFields, served: str, ask_usage: bool) -> bytes:
    """The JSON body a node gets: the client's, with the model renamed to the name the node serves
    it by (``served``), and a stream's usage asked for (``ask_usage``) when the client did not."""
    if served != req.model:
        fields: dict[str, object] = {"model": served}
        if ask_usage:
            fields["stream_options"] = {"include_usage": True}
        return with_fields(body, **fields)
    if not ask_usage:
        return body
    if req.stream_options is None:
        # The same JSON object with one member more, without decoding and re-encoding it (the
        # client sent no stream_options, so the key is not repeated).
        return _INCLUDE_USAGE + body.lstrip()[1:]
    return with_fields(body, stream_options={"include_usage": True})


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


def model_object(name: str, created: int, extra: dict[str, object] | None = None) -> dict[str, object]:
    """One model as ``/v1/models`` lists it and ``/v1/models/{id}`` answers it."""
    return {"id": name, "object": "model", "created": created, "owned_by": "shardon", **(extra or {})}


def models_list(names: list[str], created: int, extra: dict[str, dict[str, object]] | None = None) -> bytes:
    """The ``/v1/models`` body; ``extra``: more fields for some models (clients ignore unknown ones)."""
    extra = extra or {}
    return orjson.dumps({"object": "list", "data": [model_object(n, created, extra.get(n)) for n in names]})


def routing_fields(body: bytes) -> RoutingFields:
    """The routing fields of a JSON body; BadRequest (400, naming the field) when it has none."""
    try:
        return routing_decoder.decode(body)
    except msgspec.MsgspecError as exc:
        msg = str(exc)
        if isinstance(exc, msgspec.ValidationError):
            param = msg.rsplit("`$.", 1)[1].rstrip("`") if "`$." in msg else None
            if "missing required field" in msg:
                param = msg.split("`")[1]
            raise BadRequest(f"invalid request: {msg}", param=param) from None
        raise BadRequest(f"request body is not valid JSON: {msg}") from None
