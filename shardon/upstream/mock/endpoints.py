"""The mock node's other endpoints: the rest of the OpenAI API, and the load a node reports.

`MockNode` hands every request it has no route for to `handle`. Answers are
deterministic and derived from what was sent, so a test can tell that the bytes arrived intact:

    POST /v1/responses              a Response; ``"stream": true``: its SSE events, one delta per token
    POST /v1/rerank                 results by relevance (query words found in each document)
    POST /v1/score                  one score per text_2
    POST /v1/moderations            flagged when the input says "kill"
    POST /v1/audio/speech           "audio" bytes (the input, repeated), sent in chunks: streamed
    POST /v1/audio/transcriptions   multipart: the file's size and SHA-256 as the text (json, text,
    POST /v1/audio/translations       or ``stream=true``: transcript.text.delta events)
    POST /v1/images/generations     b64_json images from the prompt
    POST /v1/images/edits           multipart: b64_json images from the image(s) and prompt
    POST /v1/images/variations      multipart: b64_json images from the image
    GET  /metrics                   ``MockNode.reported.metrics`` (Prometheus text), 404 while None
    GET  /slots                     ``MockNode.reported.slots`` (llama.cpp's list), 501 while None
    GET  /health                    a 404 when ``MockNode.reported.health`` is False

Streams send one piece per ``MockConfig.delay_ms``; each answer names the model it was sent.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any

import orjson

from ...multipart import FormError, boundary_of, form_data

__all__ = ["Reported", "handle"]

Head = list[tuple[bytes, bytes]]


class Reported:
    """What the node's ``/metrics`` and ``/slots`` say (None: it has no such endpoint), and whether
    it has ``/health`` (False: a 404 there, like llama-cpp-python's server or a hosted API)."""

    __slots__ = ("health", "metrics", "slots")

    def __init__(self) -> None:
        self.health = True
        self.metrics: str | None = None
        self.slots: list[dict[str, Any]] | None = None


def _words(text: str) -> set[str]:
    return {w.strip(".,;:!?").lower() for w in text.split() if w.strip(".,;:!?")}


def _tokens(text: str) -> int:
    return max(1, len(text.encode()) // 4)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


class _Answer:
    """Writing one answer on the mock's connection, whole or in timed pieces (chunked)."""

    __slots__ = ("conn", "keep", "node", "pieces", "step")

    def __init__(self, node: Any, conn: Any, keep: bool) -> None:
        self.node = node
        self.conn = conn
        self.keep = keep
        self.pieces: list[bytes] = []
        self.step = node.config.delay_ms / 1000.0

    def head(self, status: int, content_type: str, extra: bytes) -> bytes:
        name = self.node.config.name.encode("latin-1", "replace")
        return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nX-Mock-Node: %s\r\nConnection: %s\r\n%s\r\n" % (
            status,
            b"OK" if status == 200 else b"Error",
            content_type.encode(),
            name,
            b"keep-alive" if self.keep else b"close",
            extra,
        )

    def whole(self, status: int, content_type: str, body: bytes) -> None:
        self.conn.transport.write(self.head(status, content_type, b"Content-Length: %d\r\n" % len(body)) + body)
        self.node._finish(self.conn, self.keep, status == 200)

    def json(self, obj: Any, status: int = 200) -> None:
        self.whole(status, "application/json", orjson.dumps(obj))

    def error(self, status: int, message: str, param: str | None = None) -> None:
        self.json(
            {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}, status
        )

    def stream(self, content_type: str, pieces: list[bytes]) -> None:
        """The head now, then one chunk per ``delay_ms``, then the end."""
        self.pieces = pieces
        self.conn.busy = True
        self.node._begin(self.conn)
        self.conn.transport.write(self.head(200, content_type, b"Transfer-Encoding: chunked\r\n"))
        self._next()

    def _next(self) -> None:
        conn = self.conn
        conn.timer = None
        if conn.transport is None:
            return
        if not self.pieces:
            conn.transport.write(b"0\r\n\r\n")
            self.node._finish(conn, self.keep, True)
            return
        piece = self.pieces.pop(0)
        conn.transport.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.timer = self.node._loop_or_raise().call_later(self.step, self._next)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps({"type": event, **data}) + b"\n\n"


# -- JSON endpoints ------------------------------------------------------------------------------


def _responses(node: Any, out: _Answer, req: dict[str, Any]) -> None:
    model = req["model"]
    prompt = req.get("input", "")
    prompt_text = prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
    n = node.config.chunks
    if isinstance(req.get("max_output_tokens"), int):
        n = min(n, req["max_output_tokens"])
    words = [f"tok{i} " for i in range(n)]
    text = "".join(words)
    rid = f"resp_mock{node._next_id()}"
    usage = {"input_tokens": _tokens(prompt_text), "output_tokens": n, "total_tokens": _tokens(prompt_text) + n}
    message = {
        "type": "message",
        "id": f"msg_{rid}",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    response = {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": model,
        "output": [message],
        "usage": usage,
    }
    if not req.get("stream"):
        out.json(response)
        return
    started = dict(response, status="in_progress", output=[], usage=None)
    pieces = [_sse("response.created", {"response": started, "sequence_number": 0})]
    for i, word in enumerate(words):
        delta = {"item_id": message["id"], "output_index": 0, "content_index": 0, "delta": word}
        pieces.append(_sse("response.output_text.delta", {**delta, "sequence_number": i + 1}))
    done = {"item_id": message["id"], "output_index": 0, "content_index": 0, "text": text}
    pieces.append(_sse("response.output_text.done", {**done, "sequence_number": n + 1}))
    pieces.append(_sse("response.completed", {"response": response, "sequence_number": n + 2}))
    out.stream("text/event-stream", pieces)


def _rerank(node: Any, out: _Answer, req: dict[str, Any]) -> None:
    query = _words(str(req.get("query", "")))
    documents = [d if isinstance(d, str) else str(d.get("text", "")) for d in req.get("documents", [])]
    scored = [(len(query & _words(doc)) / max(1, len(query)), i, doc) for i, doc in enumerate(documents)]
    scored.sort(key=lambda item: (-item[0], item[1]))
    top = req.get("top_n") or len(scored)
    results = [{"index": i, "relevance_score": s, "document": {"text": doc}} for s, i, doc in scored[:top]]
    used = _tokens(str(req.get("query", ""))) + sum(_tokens(d) for d in documents)
    out.json(
        {
            "id": f"rerank-mock{node._next_id()}",
            "model": req["model"],
            "results": results,
            "usage": {"total_tokens": used},
        }
    )


def _score(node: Any, out: _Answer, req: dict[str, Any]) -> None:
    first = _words(str(req.get("text_1", "")))
    seconds = req.get("text_2", [])
    seconds = [seconds] if isinstance(seconds, str) else seconds
    data = [
        {"index": i, "object": "score", "score": len(first & _words(t)) / max(1, len(first))}
        for i, t in enumerate(seconds)
    ]
    out.json(
        {
            "id": f"score-mock{node._next_id()}",
            "object": "list",
            "created": int(time.time()),
            "model": req["model"],
            "data": data,
            "usage": {
                "prompt_tokens": sum(_tokens(t) for t in seconds),
                "total_tokens": sum(_tokens(t) for t in seconds),
            },
        }
    )


def _moderations(node: Any, out: _Answer, req: dict[str, Any]) -> None:
    inputs = req.get("input", "")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    results = []
    for text in inputs:
        violent = "kill" in str(text).lower()
        results.append(
            {
                "flagged": violent,
                "categories": {"violence": violent, "hate": False},
                "category_scores": {"violence": 0.9 if violent else 0.01, "hate": 0.01},
            }
        )
    out.json({"id": f"modr-mock{node._next_id()}", "model": req["model"], "results": results})


_AUDIO_TYPES = {"mp3": "audio/mpeg", "wav": "audio/wav", "opus": "audio/ogg", "flac": "audio/flac", "pcm": "audio/pcm"}


def _speech(node: Any, out: _Answer, req: dict[str, Any]) -> None:
    audio = b"MOCKAUDIO:" + str(req.get("input", "")).encode() * 64
    size = max(1, len(audio) // 4)
    pieces = [audio[i : i + size] for i in range(0, len(audio), size)]
    out.stream(_AUDIO_TYPES.get(str(req.get("response_format", "mp3")), "audio/mpeg"), pieces)


def _image_data(seed: bytes, n: int) -> list[dict[str, Any]]:
    return [{"b64_json": base64.b64encode(_digest(seed, b"%d" % i).encode()).decode()} for i in range(n)]


def _generations(node: Any, out: _Answer, req: dict[str, Any]) -> None:
    n = req.get("n") or 1
    out.json({"created": int(time.time()), "data": _image_data(str(req.get("prompt", "")).encode(), n)})


_JSON: dict[bytes, Callable[[Any, _Answer, dict[str, Any]], None]] = {
    b"/v1/responses": _responses,
    b"/v1/rerank": _rerank,
    b"/v1/score": _score,
    b"/v1/moderations": _moderations,
    b"/v1/audio/speech": _speech,
    b"/v1/images/generations": _generations,
}

# -- form endpoints ------------------------------------------------------------------------------


def _transcribe(node: Any, out: _Answer, fields: dict[str, str], files: dict[str, list[bytes]], verb: str) -> None:
    audio = b"".join(files.get("file", []))
    text = f"{verb} {len(audio)} bytes sha256 {_digest(audio)[:16]} by {fields['model']}"
    fmt = fields.get("response_format", "json")
    if fields.get("stream", "false").lower() in ("true", "1"):
        words = text.split(" ")
        pieces = [
            b"data: " + orjson.dumps({"type": "transcript.text.delta", "delta": w + " "}) + b"\n\n" for w in words
        ]
        pieces.append(b"data: " + orjson.dumps({"type": "transcript.text.done", "text": text}) + b"\n\n")
        out.stream("text/event-stream", pieces)
    elif fmt == "text":
        out.whole(200, "text/plain; charset=utf-8", text.encode())
    else:
        out.json({"text": text, "usage": {"type": "tokens", "input_tokens": _tokens(text), "output_tokens": 0}})


def _edit(node: Any, out: _Answer, fields: dict[str, str], files: dict[str, list[bytes]], verb: str) -> None:
    images = files.get("image", []) + files.get("image[]", [])
    if not images:
        out.error(400, "an image is required", "image")
        return
    n = int(fields.get("n", "1"))
    seed = b"".join(images) + fields.get("prompt", "").encode()
    out.json({"created": int(time.time()), "data": _image_data(seed, n), "mock_images": [len(i) for i in images]})


_FORMS: dict[bytes, tuple[Callable[..., None], str]] = {
    b"/v1/audio/transcriptions": (_transcribe, "transcribed"),
    b"/v1/audio/translations": (_transcribe, "translated"),
    b"/v1/images/edits": (_edit, "edited"),
    b"/v1/images/variations": (_edit, "varied"),
}


def _form(node: Any, out: _Answer, path: bytes, headers: Head, body: bytes) -> None:
    content_type = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"), None)
    try:
        parts = form_data(body, boundary_of(content_type))
    except FormError as exc:
        out.error(400, f"bad form: {exc}")
        return
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    for name, is_file, value in parts:
        if name is None:
            continue
        if is_file:
            files.setdefault(name, []).append(value)
        else:
            fields.setdefault(name, value.decode("utf-8", "replace"))
    model = node._check_model(out.conn, fields.get("model"), out.keep)
    if model is None:
        return
    fields["model"] = model
    handler, verb = _FORMS[path]
    handler(node, out, fields, files, verb)


# -- the entry point -----------------------------------------------------------------------------


def handle(node: Any, conn: Any, method: bytes, path: bytes, headers: Head, body: bytes, keep: bool) -> bool:
    """Answer ``path`` if it is one of this module's endpoints (True), else leave it (False)."""
    out = _Answer(node, conn, keep)
    reported = node.reported
    if path == b"/metrics" and method == b"GET":
        if reported.metrics is None:
            return False
        out.whole(200, "text/plain; version=0.0.4; charset=utf-8", reported.metrics.encode())
        return True
    if path == b"/slots" and method == b"GET":
        if reported.slots is None:
            out.error(501, "This server does not support slots endpoint.")
        else:
            out.json(reported.slots)
        return True
    json_handler = _JSON.get(path)
    if json_handler is None and path not in _FORMS:
        return False
    if method != b"POST":
        out.error(405, "Method Not Allowed")
        return True
    if json_handler is None:
        _form(node, out, path, headers, body)
        return True
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        out.error(400, f"We could not parse the JSON body of your request: {exc}")
        return True
    if not isinstance(req, dict):
        out.error(400, "the body must be a JSON object")
        return True
    model = node._check_model(conn, req.get("model"), keep)
    if model is not None:
        req["model"] = model
        json_handler(node, out, req)
    return True
