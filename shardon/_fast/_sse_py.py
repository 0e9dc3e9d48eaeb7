"""What Shardon reads in a streamed (SSE) answer as it passes through (pure-Python reference).

``_sse_c.pyx`` is the same in Cython; ``shardon._fast.sse`` picks one. Both run once per chunk of
every stream, so each keeps a fast path for the usual chunk: one whole ``data: {...}`` event.

`OutputHasher` hashes the UTF-8 text generated for choice 0 of a completion, whether the response
was streamed or not, so the same text gives the same digest either way:

- `feed_json(body)` for a non-streamed response: ``choices[0].message.content`` (chat) or
  ``choices[0].text`` (completions); missing or null fields hash as empty text.
- `feed_sse(chunk)` for a stream, one call per network chunk as it is forwarded to the client. Chunk
  boundaries are arbitrary: an SSE line can be split across calls and several events can arrive in
  one call. Only ``data:`` fields are read (comments, ``event:``, ``id:`` and ``retry:`` lines are
  ignored); ``data: [DONE]`` is skipped; for every event, ``choices[i].delta.content`` (chat) or
  ``choices[i].text`` (completions) of the choice whose ``index`` is 0 is hashed. A ``usage`` object
  carried by any event (the final usage chunk of ``stream_options.include_usage``, or llama.cpp's)
  is kept in `.usage`. ``.events`` counts the JSON events seen, ``.text_events`` those that carried
  text for choice 0 (about the tokens, when no usage is sent).

Only ``content``/``text`` is hashed: tool calls, reasoning content and logprobs are not part of the
digest. Events are decoded with msgspec Structs that name only those fields (decoders built once);
an event that does not match that shape is decoded leniently, and one that is not JSON is skipped and
counted in ``.bad_events``. Lines must end in LF or CRLF (what every OpenAI-compatible server sends).

`UsageStripper` removes the usage-only event Shardon asked the node for on the client's behalf:
Shardon adds ``stream_options.include_usage`` when it needs the real token count of a stream the
client did not ask usage for; that extra event (``"choices": []`` with ``usage``) and the
``"usage": null`` member that nodes then add to every chunk must not reach the client. Events pass
through as the node's bytes otherwise; only complete events are inspected, and an incomplete one is
held until its end arrives (which adds no delay to complete events).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

__all__ = ["OutputHasher", "UsageStripper", "hash_response"]


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    message: _Delta | None = None
    text: str | None = None


class _Event(msgspec.Struct, gc=False):  # one per event; it cannot be part of a cycle
    choices: list[_Choice] | None = None
    usage: dict[str, Any] | None = None


class _UsageProbe(msgspec.Struct):
    choices: list[Any] | None = None
    usage: dict[str, Any] | None = None


EVENT_DECODER = msgspec.json.Decoder(_Event)
_ANY_DECODER = msgspec.json.Decoder()
_PROBE_DECODER = msgspec.json.Decoder(_UsageProbe)
_DONE = b"[DONE]"


def lenient_event(payload: bytes) -> _Event | None:
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


def decode_event(payload: bytes | str) -> _Event | None:
    """An event, strictly then leniently; None if it is not JSON."""
    try:
        ev: _Event | None = EVENT_DECODER.decode(payload)
    except msgspec.ValidationError:
        ev = lenient_event(payload.encode() if isinstance(payload, str) else payload)
    except msgspec.DecodeError:
        ev = None
    return ev


def choice0_text(ev: _Event) -> str | None:
    """The text generated for choice 0 in one event (or a whole response)."""
    for ch in ev.choices or ():
        if ch.index != 0:
            continue
        text = ch.text
        if text is None:
            part = ch.delta if ch.delta is not None else ch.message
            text = part.content if part is not None else None
        return text
    return None


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def hash_response(body: bytes) -> tuple[str, dict[str, Any] | None]:
    """``(output_sha256, usage)`` of a complete non-streamed response body, in one decode: the
    digest `OutputHasher.feed_json` gives."""
    ev = decode_event(body)
    if ev is None:
        return _EMPTY_SHA256, None
    text = choice0_text(ev)
    return (hashlib.sha256(text.encode()).hexdigest() if text else _EMPTY_SHA256), ev.usage


class OutputHasher:
    """Incremental SHA-256 of the text generated for choice 0 (see the module docstring)."""

    __slots__ = ("_buf", "_data", "_hash", "bad_events", "done", "events", "text_events", "usage")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._buf = bytearray()  # an incomplete SSE line carried over to the next chunk
        self._data: list[bytes] = []  # data lines of the SSE event being read
        self.usage: dict[str, Any] | None = None
        self.events = 0
        self.text_events = 0
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
        if (
            not self._buf
            and not self._data
            and chunk.startswith(b"data: ")
            and chunk.endswith(b"\n\n")
            and chunk.count(b"\n") == 2
            and b"\r" not in chunk
        ):
            # The usual chunk: exactly one whole event on one data line.
            self._payload(chunk[6:-2])
            return
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
            self._payload(payload)

    def _payload(self, payload: bytes) -> None:
        if payload.strip() == _DONE:
            self.done = True
            return
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
        ev = decode_event(payload)
        if ev is None:
            self.bad_events += 1
        return ev

    def _take(self, ev: _Event) -> None:
        self.events += 1
        if ev.usage is not None:
            self.usage = ev.usage
        text = choice0_text(ev)
        if text:
            self.text_events += 1
            self._hash.update(text.encode())


class UsageStripper:
    """Removes the usage-only SSE event Shardon asked the node for (see the module docstring)."""

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
        if end + 2 == len(data):
            complete = data
            self._pending = b""
        else:
            complete, self._pending = data[: end + 2], data[end + 2 :]
        if b'"usage"' not in complete:
            return complete
        if b'"usage":null' in complete:
            # Nodes that honour include_usage add "usage": null to every chunk (as OpenAI does),
            # usually as the last member. Unescaped quotes only occur in JSON structure, never
            # inside a string value.
            complete = complete.replace(b',"usage":null', b"")
            if b'"usage"' not in complete:
                return complete  # the usual chunk: nothing else to look at
            complete = complete.replace(b'"usage":null,', b"")
            if b'"usage"' not in complete:
                return complete
        kept = [event for event in complete.split(b"\n\n") if event and not is_usage_only(event)]
        return b"".join(event + b"\n\n" for event in kept)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


def is_usage_only(event: bytes) -> bool:
    """Whether an SSE event is the usage-only one (``"choices": []`` with ``usage``)."""
    payload = event.partition(b"data:")[2].strip()
    if not payload.startswith(b"{"):
        return False
    try:
        probe = _PROBE_DECODER.decode(payload)
    except msgspec.DecodeError:
        return False
    return probe.usage is not None and not probe.choices
