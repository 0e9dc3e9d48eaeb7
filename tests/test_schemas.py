"""The usage event Shardon asks for on the client's behalf never reaches the client."""

from __future__ import annotations

import json
import sys

import pytest

from shardon.schemas import UsageStripper, with_fields
from tests.support import twin


@pytest.fixture
def stripper_impl(implementation: str, monkeypatch: pytest.MonkeyPatch) -> type:
    """The stripper tests run on the compiled UsageStripper and on its pure-Python twin."""
    cls = twin("sse", implementation).UsageStripper
    monkeypatch.setattr(sys.modules[__name__], "UsageStripper", cls)
    return cls


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


STREAM = (
    _event({"id": "x", "choices": [{"index": 0, "delta": {"content": 'say "usage":null'}}], "usage": None})
    + _event({"id": "x", "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}], "usage": None})
    + _event({"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    + b"data: [DONE]\n\n"
)
EXPECTED = (
    _event({"id": "x", "choices": [{"index": 0, "delta": {"content": 'say "usage":null'}}]})
    + _event({"id": "x", "choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]})
    + b"data: [DONE]\n\n"
)


def test_usage_event_and_null_fields_removed_at_any_chunk_boundary(stripper_impl: type) -> None:
    for cut in range(1, len(STREAM)):
        stripper = UsageStripper()
        out = stripper.feed(STREAM[:cut]) + stripper.feed(STREAM[cut:]) + stripper.flush()
        assert out == EXPECTED, cut


def test_streams_without_usage_pass_untouched(stripper_impl: type) -> None:
    plain = _event({"choices": [{"index": 0, "text": "a"}]}) + b"data: [DONE]\n\n"
    stripper = UsageStripper()
    assert stripper.feed(plain) == plain


def test_with_fields_merges_and_keeps_unknown_fields() -> None:
    body = b'{"model":"a","stream_options":{"other":1},"guided_json":{"x":[1]}}'
    out = json.loads(with_fields(body, model="b", stream_options={"include_usage": True}))
    assert out == {"model": "b", "stream_options": {"other": 1, "include_usage": True}, "guided_json": {"x": [1]}}
