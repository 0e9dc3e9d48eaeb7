"""Mock OpenAI-compatible inference node (stands in for llama.cpp's server / vLLM in tests and benchmarks).

A raw asyncio ``Protocol`` on uvloop with an ``httptools`` request parser: HTTP/1.1 keep-alive,
``Connection: close`` honoured, no framework. Constant responses are encoded once.

Endpoints
    GET  /health                 200 {"status": "ok"}
    GET  /v1/models              OpenAI model list of ``MockConfig.models``
    POST /v1/chat/completions    deterministic "tok0 tok1 ..." text, streaming (SSE, chunked) or not
    POST /v1/completions         same, ``text_completion`` objects
    POST /v1/embeddings          deterministic vectors (``encoding_format`` float or base64)
    ...                          the rest of the OpenAI API, /metrics and /slots: endpoints.py
    GET  /mock/stats             the node's ``MockStats`` as JSON (control endpoints are never counted)
    POST /mock/reset             zero the counters
    POST /mock/fail              body {"mode": "before" | "mid" | "status500" | "status503" | "hang" | null}
    POST /mock/gate              body {"action": "close" | "open" | "release", "n": null | N} (control.py)

Generation: N = min(max_completion_tokens or max_tokens, chunks) tokens, token i is ``"tok{i} "``;
finish_reason is "length" when the request's limit cut the text, else "stop". A stream sends its headers
at once, the first token ``ttft_ms`` later and each next one ``delay_ms`` after the previous, each token
as its own SSE event in its own HTTP chunk; then a final chunk with finish_reason, a usage chunk
(``"choices": []``) when ``stream_options.include_usage`` is true, and ``data: [DONE]``. The first chat
token's delta carries ``"role": "assistant"``. A non-streaming answer is sent when the last token would
have been (``ttft_ms + (N - 1) * delay_ms``).

Per request, the body's ``"mock"`` object (the gateway forwards unknown fields untouched) overrides
``{"chunks", "delay_ms", "ttft_ms"}``, asks to be held at the gate (``"hold"``, ``"hold_after"``:
control.py), or injects a failure (``"fail"``, ``"fail_after"``); ``MockNode.set_fail(mode)`` /
``POST /mock/fail`` injects one into every request:
    before     close the connection without a response
    mid        send the headers and ``fail_after`` (default 2) tokens, then abort the connection
               (non-streaming: the headers and half of the body)
    status500  an OpenAI error body with status 500 (status503: 503)
    hang       accept and never answer, until the client goes away (counted as cancelled)

Run it: ``python -m shardon.upstream.mock --port 9001 --models a,b --delay-ms 20 --name node-a``.

The package: `config` (what a node is told, what it counts), `protocol` (HTTP/1.1), `generate`
(text, streams, embeddings), `control` (the gate, ``/mock/...``), `node` (`MockNode`), `thread`
(`MockNodeThread`), `endpoints` (the rest of the OpenAI API, the load a node reports), `tls` (an
``https://`` node), `cli` (the command line).
"""

from .cli import main
from .config import FAIL_MODES, MockConfig, MockStats
from .control import Gate
from .node import MockNode
from .thread import GateHandle, MockNodeThread, new_event_loop

__all__ = [
    "FAIL_MODES",
    "Gate",
    "GateHandle",
    "MockConfig",
    "MockNode",
    "MockNodeThread",
    "MockStats",
    "main",
    "new_event_loop",
]
