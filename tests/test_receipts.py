"""OutputHasher and receipt_for (shardon.receipts)."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from typing import Any

import msgspec
import pytest

from shardon.receipts import OutputHasher, receipt_for
from shardon.store import RequestRecord, format_request_id, request_id_floor
from tests.support import twin

TEXT_PARTS = ["Hé", "llo", ", 世界", " 🎉", "", " done.\nnew line", ' "quoted" \\ ']
TEXT = "".join(TEXT_PARTS)
USAGE = {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19}


@pytest.fixture(autouse=True)
def hasher_impl(implementation: str, monkeypatch: pytest.MonkeyPatch) -> type:
    """Every test here runs on the compiled OutputHasher and on its pure-Python twin."""
    cls = twin("sse", implementation).OutputHasher
    monkeypatch.setattr(sys.modules[__name__], "OutputHasher", cls)
    return cls


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sse(obj: Any, eol: str = "\n") -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}{eol}{eol}"


def chat_stream(eol: str = "\n") -> bytes:
    events: list[Any] = [{"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    for i, part in enumerate(TEXT_PARTS):
        events.append({"choices": [{"index": 0, "delta": {"content": part}, "finish_reason": None}]})
        # a second choice (n=2) is not part of the digest
        events.append({"choices": [{"index": 1, "delta": {"content": f"other{i}"}}]})
    events.append({"choices": [{"index": 0, "delta": {"content": None, "tool_calls": []}}]})
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": USAGE})
    body = ": keep-alive" + eol + "event: message" + eol
    body += "".join(sse(e, eol) for e in events) + sse("[DONE]", eol)
    return body.encode()


def completion_stream() -> bytes:
    events: list[dict[str, Any]] = [{"choices": [{"index": 0, "text": part, "logprobs": None}]} for part in TEXT_PARTS]
    events.append({"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": USAGE})
    return ("".join(sse(e) for e in events) + sse("[DONE]")).encode()


def hash_chunks(chunks: list[bytes]) -> OutputHasher:
    h = OutputHasher()
    for c in chunks:
        h.feed_sse(c)
    return h


@pytest.mark.parametrize("stream", [chat_stream(), chat_stream("\r\n"), completion_stream()])
def test_stream_split_at_every_byte_boundary(stream: bytes) -> None:
    expected = sha(TEXT)
    whole = hash_chunks([stream])
    assert whole.hexdigest() == expected
    assert whole.usage == USAGE and whole.done and whole.bad_events == 0
    for i in range(len(stream) + 1):
        h = hash_chunks([stream[:i], stream[i:]])
        assert h.hexdigest() == expected, i
        assert h.usage == USAGE and h.events == whole.events


def test_stream_byte_by_byte_and_random_chunks() -> None:
    stream = chat_stream()
    expected = sha(TEXT)
    assert hash_chunks([stream[i : i + 1] for i in range(len(stream))]).hexdigest() == expected
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 30)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert hash_chunks(chunks).hexdigest() == expected
    # memoryview / bytearray chunks, as a server may hand them over
    assert hash_chunks([memoryview(stream[:50]), bytearray(stream[50:])]).hexdigest() == expected  # type: ignore[list-item]


def test_a_long_stream_hashes_its_whole_text() -> None:
    # Tens of kilobytes of text, multi-byte characters included: more than the compiled hasher
    # keeps before it hashes (it hashes in batches), and hexdigest() twice gives the same digest.
    parts = [f"tok{i} é世🎉 " * (1 + i % 7) for i in range(3000)]
    events = [sse({"choices": [{"index": 0, "delta": {"content": part}}]}).encode() for part in parts]
    h = hash_chunks(events)
    expected = sha("".join(parts))
    assert h.hexdigest() == expected
    assert h.hexdigest() == expected
    assert h.text_events == len(parts)


def test_event_count_and_usage() -> None:
    h = hash_chunks([chat_stream()])
    h.hexdigest()
    assert h.events == 1 + 2 * len(TEXT_PARTS) + 3  # [DONE] and comments are not events
    h2 = hash_chunks([sse({"choices": [{"index": 0, "delta": {"content": "x"}}]}).encode()])
    assert h2.usage is None and not h2.done


def test_non_stream_equals_stream() -> None:
    chat = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": "other"}},
        ],
        "usage": USAGE,
    }
    h = OutputHasher()
    h.feed_json(json.dumps(chat).encode())
    assert h.hexdigest() == sha(TEXT) == hash_chunks([chat_stream()]).hexdigest()
    assert h.usage == USAGE

    completion = {"choices": [{"index": 0, "text": TEXT, "logprobs": None}], "usage": USAGE}
    h = OutputHasher()
    h.feed_json(json.dumps(completion).encode())
    assert h.hexdigest() == sha(TEXT) == hash_chunks([completion_stream()]).hexdigest()


@pytest.mark.parametrize(
    "body",
    [
        b"{}",
        b'{"choices": null}',
        b'{"choices": []}',
        b'{"choices": [{"index": 0, "message": {"content": null, "tool_calls": [{"id": "t"}]}}]}',
        b'{"choices": [{"index": 0, "message": null}]}',
        b'{"choices": [{"index": 0}]}',
        b'{"error": {"message": "boom", "type": "server_error"}}',
    ],
)
def test_non_stream_tolerates_missing_content(body: bytes) -> None:
    h = OutputHasher()
    h.feed_json(body)
    assert h.hexdigest() == sha("")
    assert h.bad_events == 0


def test_unexpected_shapes_are_tolerated() -> None:
    h = OutputHasher()
    h.feed_json(b'{"choices": [{"index": 0, "message": {"content": [{"type": "text", "text": "x"}]}}]}')
    h.feed_json(b'{"choices": [{"message": {"content": "ab"}}], "usage": [1]}')  # no index: choice 0
    h.feed_json(b"[1, 2]")
    h.feed_json(b"not json")
    assert h.hexdigest() == sha("ab") and h.bad_events == 1 and h.usage is None

    s = OutputHasher()
    s.feed_sse(b"data: {broken\n\n")
    s.feed_sse(b'data: {"choices": [{"index": 0, "delta": {"content": 5}}]}\n\n')  # lenient path
    s.feed_sse(b'data: {"choices": [{"index": 0, "delta": {"content": "ok"}}]}\n\n')
    s.feed_sse(b'event: error\ndata: {"error": {"message": "upstream failed"}}\n\n')
    assert s.hexdigest() == sha("ok") and s.bad_events == 1 and s.events == 3


def test_sse_framing_edge_cases() -> None:
    # a JSON payload spread over two data lines (legal SSE), "data:" without a space
    h = hash_chunks([b'data:{"choices": [{"index": 0,\ndata: "delta": {"content": "a"}}]}\n\n'])
    assert h.hexdigest() == sha("a")
    # a server that omits blank lines between events
    h = hash_chunks(
        [
            b'data: {"choices": [{"index": 0, "delta": {"content": "a"}}]}\n'
            b'data: {"choices": [{"index": 0, "delta": {"content": "b"}}]}\n'
            b"data: [DONE]\n"
        ]
    )
    assert h.hexdigest() == sha("ab") and h.done
    # the last event has no terminating blank line (or no newline at all): taken at the end
    h = hash_chunks([b'data: {"choices": [{"index": 0, "delta": {"content": "z"}}]}'])
    assert h.hexdigest() == sha("z")
    assert h.hexdigest() == sha("z")  # idempotent
    h = OutputHasher()
    h.feed_sse(b"")
    assert h.hexdigest() == sha("") and h.events == 0


def test_receipt_for_record_and_row() -> None:
    request_id = request_id_floor(100.0) + 3
    r = RequestRecord(
        id=request_id,
        received_at=100.0,
        queued_at=100.001,
        dispatched_at=100.5,
        first_token_at=101.0,
        finished_at=103.25,
        model="m",
        node_id="n1",
        backend="vllm",
        model_file_sha256="f" * 64,
        output_sha256=sha(TEXT),
        prompt_tokens=12,
        completion_tokens=7,
        status=200,
    )
    receipt = receipt_for(r)
    assert receipt == {
        "request_id": "000000186a000003",  # the x-request-id form of the integer id
        "status": 200,
        "model": "m",
        "node": "n1",
        "backend": "vllm",
        "model_file_sha256": "f" * 64,
        "output_sha256": sha(TEXT),
        "timings": {
            "received_at": 100.0,
            "queued_at": 100.001,
            "dispatched_at": 100.5,
            "first_token_at": 101.0,
            "finished_at": 103.25,
            "queue_ms": 500.0,
            "ttft_ms": 1000.0,
            "duration_ms": 3250.0,
        },
        "usage": {"prompt_tokens": 12, "completion_tokens": 7, "total_tokens": 19},
    }
    assert format_request_id(request_id) == "000000186a000003"
    row = msgspec.structs.asdict(r)
    assert receipt_for(row) == receipt  # a dict holding the integer id
    row["id"] = format_request_id(request_id)  # a request-log row: the id already in hex
    assert receipt_for(row) == receipt
    bare = receipt_for(RequestRecord(id=request_id_floor(1.0), received_at=1.0))
    assert bare["timings"]["ttft_ms"] is None and bare["usage"]["total_tokens"] is None
    assert bare["request_id"] == "000000003e800000"
