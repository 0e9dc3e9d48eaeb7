"""What a mock node generates: chat and completion text, streamed or whole, and embeddings.

Token i is ``"tok{i} "``; a stream's events are pre-split around the token number, so each event
is one formatted write (`_Gen.event`). A generation waits on timers (``ttft_ms``, ``delay_ms``) and
on the node's gate (`shardon.upstream.mock.control.Gate`: ``"hold"`` before the answer,
``"hold_after"`` tokens or bytes into it).
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import orjson

from .config import FailMode
from .protocol import BAD_JSON, Conn, chunk

if TYPE_CHECKING:
    from .node import MockNode

__all__ = ["CHAT", "COMPLETION", "EMBEDDING", "KINDS", "embeddings", "generate"]

CHAT = 1
COMPLETION = 2
EMBEDDING = 3
KINDS = {b"/v1/chat/completions": CHAT, b"/v1/completions": COMPLETION, b"/v1/embeddings": EMBEDDING}


class _Overrides(msgspec.Struct, kw_only=True):
    chunks: int | None = None
    delay_ms: float | None = None
    ttft_ms: float | None = None
    fail: FailMode | None = None
    fail_after: int | None = None
    hold: bool | None = None
    hold_after: int | None = None


class _StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None


class _Part(msgspec.Struct, kw_only=True):
    text: str | None = None


class _Message(msgspec.Struct, kw_only=True):
    content: str | list[_Part] | None = None


class _GenerationReq(msgspec.Struct, kw_only=True):
    """What a chat and a completion request share."""

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    mock: _Overrides | None = None


class _ChatReq(_GenerationReq, kw_only=True):
    messages: list[_Message]


class _CompletionReq(_GenerationReq, kw_only=True):
    prompt: str | list[Any]


class _EmbeddingReq(msgspec.Struct, kw_only=True):
    input: str | list[Any]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    mock: _Overrides | None = None


_chat_decoder = msgspec.json.Decoder(_ChatReq)
_completion_decoder = msgspec.json.Decoder(_CompletionReq)
_embedding_decoder = msgspec.json.Decoder(_EmbeddingReq)


def _text_bytes(value: Any) -> int:
    """Byte length of the text in a prompt / content value (token-id lists count one per id)."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, int):
                total += 4
            else:
                total += _text_bytes(item)
        return total
    if isinstance(value, _Part):
        return len(value.text.encode()) if value.text else 0
    return 0


def _estimate(nbytes: int) -> int:
    return max(1, nbytes // 4)


_CONTENT: dict[int, str] = {}


def _content(n: int) -> str:
    text = _CONTENT.get(n)
    if text is None:
        text = "".join(f"tok{i} " for i in range(n))
        if len(_CONTENT) < 4096:
            _CONTENT[n] = text
    return text


def _vector(text: bytes, dim: int) -> list[float]:
    """Deterministic vector in [-1, 1) from the text; values are multiples of 1/128 so they are exact
    in float32 (the base64 encoding returns the same numbers)."""
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.blake2b(text, digest_size=64, person=counter.to_bytes(16, "little")).digest()
        out.extend((b - 128) / 128.0 for b in digest)
        counter += 1
    return out[:dim]


class _Gen:
    """A deferred generation: one timer at a time, stored on the connection so ``connection_lost``
    can cancel it; the gate's hold in the middle of it (``hold_after``)."""

    __slots__ = (
        "body",
        "conn",
        "fail",
        "fail_after",
        "final",
        "hold_after",
        "i",
        "keep",
        "n",
        "node",
        "payload",
        "post",
        "pre",
        "pre0",
        "sent",
        "start",
        "step",
    )

    def __init__(self, node: MockNode, conn: Conn, body: bytes, keep: bool) -> None:
        self.node = node
        self.conn = conn
        self.body = body  # the request's, for the gate's view of what it holds
        self.keep = keep
        self.n = 0
        self.i = 0
        self.start = 0.0
        self.step = 0.0
        self.fail: str | None = None
        self.fail_after = 2
        self.hold_after: int | None = None
        self.pre = b""
        self.pre0 = b""
        self.post = b""
        self.final = b""
        self.payload = b""
        self.sent = 0

    def schedule(self, when: float, callback: Callable[[], None]) -> None:
        self.conn.timer = self.node._loop_or_raise().call_at(when, callback)

    # non-streaming: the whole response at once (or half of it, then abort, for fail=mid)
    def send_payload(self) -> None:
        conn = self.conn
        conn.timer = None
        transport = conn.transport
        if transport is None:
            return
        payload = self.payload
        if self.fail == "mid":
            head_end = payload.find(b"\r\n\r\n") + 4
            transport.write(payload[: head_end + (len(payload) - head_end) // 2])
            self.node._abort(conn)
            return
        hold = self.hold_after
        if hold is not None and self.node.gate.stops(True):
            # The head and ``hold`` bytes of the body, then nothing until the gate lets it go.
            self.hold_after = None
            self.sent = min(len(payload), payload.find(b"\r\n\r\n") + 4 + hold)
            transport.write(payload[: self.sent])
            self.node.gate.hold(conn, self.body, self.send_payload)
            return
        transport.write(payload[self.sent :] if self.sent else payload)
        self.node._finish(conn, self.keep, True)

    # streaming
    def tick(self) -> None:
        conn = self.conn
        conn.timer = None
        transport = conn.transport
        if transport is None:
            return
        if self.fail == "mid" and self.i >= min(self.fail_after, self.n):
            self.node._abort(conn)
            return
        n = self.n
        hold = self.hold_after
        if hold is not None and self.i >= hold:
            self.hold_after = hold = None
            if self.node.gate.stops(True):
                self.node.gate.hold(conn, self.body, self.tick)
                return
        limit = n if self.fail != "mid" else min(n, self.fail_after)
        if hold is not None:
            limit = min(limit, hold)
        if self.step <= 0.0:
            # no inter-token delay: every remaining token now, each still its own HTTP chunk
            out = [self.event(i) for i in range(self.i, limit)]
            self.i = limit
        else:
            out = [self.event(self.i)] if self.i < limit else []
            self.i += len(out)
        if self.i >= n and self.fail != "mid":
            out.append(self.final)
            transport.write(b"".join(out))
            self.node._finish(conn, self.keep, True)
            return
        if out:
            transport.write(b"".join(out))
        when = self.start + self.step * self.i if self.i < n else self.node._loop_or_raise().time()
        self.schedule(when, self.tick)

    def event(self, i: int) -> bytes:
        ev = b"%s%d%s" % (self.pre0 if i == 0 else self.pre, i, self.post)
        return b"%x\r\n%s\r\n" % (len(ev), ev)


def generate(node: MockNode, conn: Conn, kind: int, body: bytes, keep: bool, forced: str | None = None) -> None:
    """A chat or completion request: checked, counted in flight, held at the gate if it says so,
    then answered (`_answer`)."""
    req: _ChatReq | _CompletionReq
    try:
        req = _chat_decoder.decode(body) if kind == CHAT else _completion_decoder.decode(body)
    except msgspec.DecodeError as exc:
        node._bad_request(conn, BAD_JSON.format(exc), keep)
        return
    model = node._check_model(conn, req.model, keep)
    if model is None:
        return
    mock = req.mock if req.mock is not None else _NO_OVERRIDES
    cfg = node.config
    chunks = cfg.chunks if mock.chunks is None else mock.chunks
    delay_ms = cfg.delay_ms if mock.delay_ms is None else mock.delay_ms
    ttft_ms = cfg.ttft_ms if mock.ttft_ms is None else mock.ttft_ms
    fail_after = 2 if mock.fail_after is None else mock.fail_after
    fail = forced if forced is not None else mock.fail
    if chunks < 0 or delay_ms < 0 or ttft_ms < 0 or fail_after < 0 or (mock.hold_after or 0) < 0:
        node._bad_request(conn, "mock overrides must not be negative", keep, "mock")
        return
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is not None and limit < 1:
        node._bad_request(conn, f"max_tokens must be at least 1, got {limit}.", keep, "max_tokens")
        return
    if node._at_capacity(conn, keep):
        return
    node._begin(conn)
    g = _Gen(node, conn, body, keep)
    g.fail = fail
    g.fail_after = fail_after
    g.hold_after = mock.hold_after
    g.step = delay_ms / 1000.0
    if limit is not None and limit <= chunks:
        g.n, finish = limit, "length"
    else:
        g.n, finish = chunks, "stop"

    def answer() -> None:
        if fail is not None and node._inject(conn, fail, keep, kind, fail_after, False):
            return
        _answer(g, kind, req, model, finish, ttft_ms / 1000.0)

    if node.gate.stops(mock.hold):
        node.gate.hold(conn, body, answer)
    else:
        answer()


_NO_OVERRIDES = _Overrides()


def _answer(g: _Gen, kind: int, req: _ChatReq | _CompletionReq, model: str, finish: str, ttft: float) -> None:
    node = g.node
    conn = g.conn
    keep = g.keep
    n = g.n
    if isinstance(req, _ChatReq):
        nbytes = 0
        for m in req.messages:
            c = m.content
            if c is not None:
                nbytes += len(c.encode()) if isinstance(c, str) else _text_bytes(c)
    else:
        p = req.prompt
        nbytes = len(p.encode()) if isinstance(p, str) else _text_bytes(p)
    prompt_tokens = _estimate(nbytes)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
    created = int(time.time())
    seq = node._next_id()
    if req.stream:
        include_usage = bool(req.stream_options is not None and req.stream_options.include_usage)
        _stream(g, kind, model, finish, usage, include_usage, created, seq, ttft)
        return
    if kind == CHAT:
        obj: dict[str, Any] = {
            "id": f"chatcmpl-mock-{seq}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": node._fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": _content(n)},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
    else:
        obj = {
            "id": f"cmpl-mock-{seq}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": node._fingerprint,
            "choices": [{"index": 0, "text": _content(n), "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        }
    payload = g.payload = node._encode(200, orjson.dumps(obj), keep)
    wait = ttft + g.step * (n - 1) if n > 0 else ttft
    if wait <= 0.0 and g.fail is None and g.hold_after is None:
        transport = conn.transport
        assert transport is not None
        transport.write(payload)
        node._finish(conn, keep, True)
        return
    conn.busy = True
    g.schedule(node._loop_or_raise().time() + wait, g.send_payload)


def _stream(
    g: _Gen,
    kind: int,
    model: str,
    finish: str,
    usage: dict[str, int],
    include_usage: bool,
    created: int,
    seq: int,
    ttft: float,
) -> None:
    node = g.node
    conn = g.conn
    n = g.n
    transport = conn.transport
    assert transport is not None
    if kind == CHAT:
        base: dict[str, Any] = {
            "id": f"chatcmpl-mock-{seq}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": node._fingerprint,
        }
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": "\x00"},
            "logprobs": None,
            "finish_reason": None,
        }
    else:
        base = {
            "id": f"cmpl-mock-{seq}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": node._fingerprint,
        }
        choice = {"index": 0, "text": "\x00", "logprobs": None, "finish_reason": None}
    extra = {"usage": None} if include_usage else {}
    ev = b"data: " + orjson.dumps(base | {"choices": [choice]} | extra) + b"\n\n"
    pre, post = ev.split(b'"\\u0000"', 1)
    pre += b'"tok'
    post = b' "' + post
    if kind == CHAT:
        first = dict(choice, delta={"role": "assistant", "content": "\x00"})
        ev0 = b"data: " + orjson.dumps(base | {"choices": [first]} | extra) + b"\n\n"
        pre0 = ev0.split(b'"\\u0000"', 1)[0] + b'"tok'
        last_delta: dict[str, Any] = {"role": "assistant"} if n == 0 else {}
        last = dict(choice, delta=last_delta, finish_reason=finish)
    else:
        pre0 = pre
        last = dict(choice, text="", finish_reason=finish)
    final = [chunk(b"data: " + orjson.dumps(base | {"choices": [last]} | extra) + b"\n\n")]
    if include_usage:
        final.append(chunk(b"data: " + orjson.dumps(base | {"choices": [], "usage": usage}) + b"\n\n"))
    final.append(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
    g.pre, g.pre0, g.post = pre, pre0, post
    g.final = b"".join(final)
    conn.busy = True
    transport.write(node._stream_heads[g.keep])
    g.start = node._loop_or_raise().time() + ttft
    if ttft <= 0.0 and g.fail is None:
        g.tick()
    else:
        g.schedule(g.start, g.tick)


def embeddings(node: MockNode, conn: Conn, body: bytes, keep: bool) -> None:
    """An embeddings request: deterministic vectors of each input (held at the gate if it says so)."""
    try:
        req = _embedding_decoder.decode(body)
    except msgspec.DecodeError as exc:
        node._bad_request(conn, BAD_JSON.format(exc), keep)
        return
    model = node._check_model(conn, req.model, keep)
    if model is None:
        return
    raw = req.input
    texts: list[bytes]
    if isinstance(raw, str):
        texts = [raw.encode()]
    elif raw and all(isinstance(x, int) for x in raw):
        texts = [orjson.dumps(raw)]
    elif raw and all(isinstance(x, str) for x in raw):
        texts = [x.encode() for x in raw]
    elif raw and all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw):
        texts = [orjson.dumps(x) for x in raw]
    else:
        msg = "'input' must be a non-empty string, list of strings, or list of token lists"
        node._bad_request(conn, msg, keep, "input")
        return
    dim = req.dimensions if req.dimensions is not None else node.config.embedding_dim
    if dim < 1:
        node._bad_request(conn, "dimensions must be at least 1", keep, "dimensions")
        return
    mock = req.mock if req.mock is not None else _NO_OVERRIDES
    ttft_ms = node.config.ttft_ms if mock.ttft_ms is None else mock.ttft_ms
    fail = mock.fail
    if node._at_capacity(conn, keep):
        return
    node._begin(conn)

    def answer() -> None:
        if fail is not None and node._inject(conn, fail, keep, EMBEDDING, 2, False):
            return
        b64 = req.encoding_format == "base64"
        data = []
        for i, text in enumerate(texts):
            vec = _vector(text, dim)
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = _estimate(sum(len(t) for t in texts))
        obj = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        payload = node._encode(200, orjson.dumps(obj), keep)
        if ttft_ms <= 0:
            transport = conn.transport
            assert transport is not None
            transport.write(payload)
            node._finish(conn, keep, True)
            return
        g = _Gen(node, conn, body, keep)
        g.payload = payload
        conn.busy = True
        g.schedule(node._loop_or_raise().time() + ttft_ms / 1000.0, g.send_payload)

    if node.gate.stops(mock.hold):
        node.gate.hold(conn, body, answer)
    else:
        answer()
