"""Output receipts: an incremental SHA-256 of the text a model generated, and the receipt dict.

`OutputHasher` hashes the UTF-8 text generated for choice 0 of a completion, whether the response
was streamed or not, so the same text gives the same `output_sha256` either way:

- `feed_json(body)` for a non-streamed response: ``choices[0].message.content`` (chat) or
  ``choices[0].text`` (completions); missing or null fields hash as empty text.
- `feed_sse(chunk)` for a stream, one call per network chunk as it is forwarded to the client. Chunk
  boundaries are arbitrary: an SSE line can be split across calls and several events can arrive in
  one call. Only ``data:`` fields are read (comments, ``event:``, ``id:`` and ``retry:`` lines are
  ignored); ``data: [DONE]`` is skipped; for every event, ``choices[i].delta.content`` (chat) or
  ``choices[i].text`` (completions) of the choice whose ``index`` is 0 is hashed. A ``usage`` object
  carried by any event (the final usage chunk of ``stream_options.include_usage``, or llama.cpp's)
  is kept in `.usage`. ``.events`` counts the JSON events seen.

Only ``content``/``text`` is hashed: tool calls, reasoning content and logprobs are not part of the
digest. Events are decoded with msgspec Structs that name only those fields (decoders built once);
an event that does not match that shape is decoded leniently, and one that is not JSON is skipped and
counted in ``.bad_events``. Lines must end in LF or CRLF (what every OpenAI-compatible server sends).

`receipt_for(record)` builds the receipt of a finished request (node, backend, model file hash,
timings, token counts, output hash) from a `RequestRecord` or a request-log row dict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from shardon.store import RequestRecord

__all__ = ["OutputHasher", "hash_response", "receipt_for"]


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    message: _Delta | None = None
    text: str | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None


_EVENT_DECODER = msgspec.json.Decoder(_Event)
_ANY_DECODER = msgspec.json.Decoder()
_DONE = b"[DONE]"


def _lenient(payload: bytes) -> _Event | None:
    """Decode an event that did not match `_Event` (e.g. a content that is not a string)."""
    try:
        obj = _ANY_DECODER.decode(payload)
    except msgspec.DecodeError:
        return None
    if not isinstance(obj, dict):
        return _Event()
    usage = obj.get("usage")
    choices: list[_Choice] = []
    raw_choices = obj.get("choices")
    if isinstance(raw_choices, list):
        for ch in raw_choices:
            if not isinstance(ch, dict):
                continue
            index = ch.get("index", 0)
            text = ch.get("text")
            parts: list[_Delta | None] = []
            for name in ("delta", "message"):
                sub = ch.get(name)
                content = sub.get("content") if isinstance(sub, dict) else None
                parts.append(_Delta(content) if isinstance(content, str) else None)
            choices.append(
                _Choice(
                    index=index if isinstance(index, int) else -1,
                    delta=parts[0],
                    message=parts[1],
                    text=text if isinstance(text, str) else None,
                )
            )
    return _Event(choices=choices, usage=usage if isinstance(usage, dict) else None)


class OutputHasher:
    """Incremental SHA-256 of the text generated for choice 0 (see the module docstring)."""

    __slots__ = ("_buf", "_data", "_hash", "bad_events", "done", "events", "text_events", "usage")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._buf = bytearray()  # an incomplete SSE line carried over to the next chunk
        self._data: list[bytes] = []  # data lines of the SSE event being read
        self.usage: dict[str, Any] | None = None
        self.events = 0
        self.text_events = 0  # events that carried text for choice 0: ~ tokens when no usage is sent
        self.bad_events = 0
        self.done = False

    # -- non-streamed ---------------------------------------------------------------------------

    def feed_json(self, body: bytes | bytearray | memoryview | str) -> None:
        """Hash choice 0 of a complete (non-streamed) chat or completions response body."""
        ev = self._decode(body if isinstance(body, bytes | str) else bytes(body))
        if ev is not None:
            self._take(ev)

    # -- streamed -------------------------------------------------------------------------------

    def feed_sse(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed one network chunk of an SSE stream (any boundaries)."""
        if not chunk:
            return
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        if b"\n" not in chunk:
            self._buf += chunk  # no line ends here: O(len(chunk)), no re-scan later
            return
        if self._buf:
            self._buf += chunk
            data = bytes(self._buf)
            self._buf.clear()
        else:
            data = chunk
        lines = data.split(b"\n")
        tail = lines.pop()
        if tail:
            self._buf += tail
        pending = self._data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if pending:
                    self._dispatch()
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                pending.append(value)
            # comments (":...") and other fields are ignored

    def finish(self) -> None:
        """End of stream: process a last event that was not followed by a blank line. Idempotent."""
        if self._buf:
            line = bytes(self._buf).rstrip(b"\r")
            self._buf.clear()
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
        if self._data:
            self._dispatch()

    def hexdigest(self) -> str:
        """The hex SHA-256 of the text hashed so far (calls `finish()` first)."""
        self.finish()
        return self._hash.hexdigest()

    # -- internals ------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        pending = self._data
        if len(pending) == 1:
            payloads = [pending[0]]
        else:
            joined = b"\n".join(pending)
            # Per SSE, several data lines form one payload; a server that omits blank lines between
            # events yields several JSON documents instead: decode them one by one.
            payloads = [joined] if self._decodes(joined) else list(pending)
        pending.clear()
        for payload in payloads:
            if payload.strip() == _DONE:
                self.done = True
                continue
            ev = self._decode(payload)
            if ev is not None:
                self._take(ev)

    @staticmethod
    def _decodes(payload: bytes) -> bool:
        try:
            _ANY_DECODER.decode(payload)
        except msgspec.DecodeError:
            return False
        return True

    def _decode(self, payload: bytes | str) -> _Event | None:
        try:
            return _EVENT_DECODER.decode(payload)
        except msgspec.ValidationError:
            ev = _lenient(payload.encode() if isinstance(payload, str) else payload)
        except msgspec.DecodeError:
            ev = None
        if ev is None:
            self.bad_events += 1
        return ev

    def _take(self, ev: _Event) -> None:
        self.events += 1
        if ev.usage is not None:
            self.usage = ev.usage
        if not ev.choices:
            return
        for ch in ev.choices:
            if ch.index != 0:
                continue
            text = ch.text
            if text is None:
                part = ch.delta if ch.delta is not None else ch.message
                text = part.content if part is not None else None
            if text:
                self.text_events += 1
                self._hash.update(text.encode())
            return


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def hash_response(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """``(output_sha256, usage)`` of a complete non-streamed response body.

    The same digest `OutputHasher.feed_json` gives, in one call and one decode: the non-streamed
    request path needs no incremental state.
    """
    try:
        ev: _Event | None = _EVENT_DECODER.decode(body)
    except msgspec.ValidationError:
        ev = _lenient(body)
    except msgspec.DecodeError:
        ev = None
    if ev is None:
        return _EMPTY_SHA256, None
    for ch in ev.choices or ():
        if ch.index == 0:
            text = ch.text
            if text is None:
                part = ch.delta if ch.delta is not None else ch.message
                text = part.content if part is not None else None
            if text:
                return hashlib.sha256(text.encode()).hexdigest(), ev.usage
            break
    return _EMPTY_SHA256, ev.usage


def _ms(later: Any, earlier: Any) -> float | None:
    if later is None or earlier is None:
        return None
    return round((later - earlier) * 1000.0, 3)


def receipt_for(record: RequestRecord | Mapping[str, Any]) -> dict[str, Any]:
    """The receipt of a request: where it ran, on which model file, how long it took, what it produced.

    Accepts a `RequestRecord` or a row dict from the request log. Times are unix seconds; the
    derived durations (``queue_ms``, ``ttft_ms``, ``duration_ms``) are measured from ``received_at``
    and are None when a timestamp is missing.
    """
    if isinstance(record, Mapping):
        get = record.get
    else:

        def get(name: str, default: Any = None) -> Any:
            return getattr(record, name, default)

    received = get("received_at")
    prompt = get("prompt_tokens")
    completion = get("completion_tokens")
    total = None if prompt is None and completion is None else (prompt or 0) + (completion or 0)
    return {
        "request_id": get("id"),
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
