"""The usage event Shardon asks for on the client's behalf never reaches the client."""

from __future__ import annotations

import json
import sys

import pytest

from shardon import errors
from shardon.schemas import UsageStripper, node_body, priority_named, routing_fields, with_fields
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


@pytest.mark.parametrize(
    ("body", "served", "ask", "expect"),
    [
        (b'{"model":"m","stream":true}', "m", False, None),  # the client's bytes
        (b' {"model":"m","stream":true}', "m", True, {"stream_options": {"include_usage": True}}),
        (
            b'{"model":"m","stream":true,"stream_options":{"x":1}}',
            "m",
            True,
            {"stream_options": {"x": 1, "include_usage": True}},  # merged,
        ),
        (b'{"model":"m","x":[1]}', "served-m", False, {"model": "served-m"}),
        (
            b'{"model":"m","stream":true}',
            "served-m",
            True,
            {"model": "served-m", "stream_options": {"include_usage": True}},
        ),
    ],
)
def test_the_body_a_node_gets(body: bytes, served: str, ask: bool, expect: dict[str, object] | None) -> None:
    out = node_body(body, routing_fields(body), served, ask)
    if expect is None:
        assert out is body
    else:
        assert json.loads(out) == {**json.loads(body), **expect}  # unknown fields kept


def test_a_body_without_routing_fields_is_a_400_naming_the_field() -> None:
    with pytest.raises(errors.BadRequest) as info:
        routing_fields(b'{"messages":[]}')
    assert info.value.param == "model"
    with pytest.raises(errors.BadRequest) as info:
        routing_fields(b'{"model":"m","stream":"yes"}')
    assert info.value.param == "stream"
    with pytest.raises(errors.BadRequest, match="not valid JSON"):
        routing_fields(b"{nope")


def test_the_priority_a_header_names() -> None:
    assert priority_named(" High ") == 2 and priority_named("critical") == 3 and priority_named("low") == 0
    with pytest.raises(errors.BadRequest) as info:
        priority_named("urgent")
    assert info.value.param == "X-Priority"
