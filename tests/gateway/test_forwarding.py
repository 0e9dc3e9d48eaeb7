"""Bytes in, bytes out: what reaches the node and what comes back."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from tests.support import dechunk, node_entry, post, raw_request, read_until, rows


@pytest.fixture
def single(make_mock: Any, make_gateway: Any) -> Any:
    node = make_mock(models=["m1"], chunks=4, name="n1")
    gw = make_gateway(nodes=[node_entry(node, "n1", ["m1"], max_concurrent=2, api_key="node-secret")])
    return node, gw


def test_request_body_reaches_node_byte_for_byte(single: Any) -> None:
    node, gw = single
    # Unknown fields (llama.cpp's cache_prompt, vLLM's guided_json), odd spacing and key order included.
    body = (
        b'{"model":"m1",  "messages":[{"role":"user","content":"h\\u00e9"}],"cache_prompt":true,"guided_json":{"a":1}}'
    )
    status, headers, _ = post(gw.url, "/v1/chat/completions", body)
    assert status == 200
    assert node.stats.last_body == body
    assert headers["x-shardon-node"] == "n1"
    request_id = headers["x-request-id"]
    assert len(request_id) == 16 and int(request_id, 16) > 0  # the request log's key, in hex


def test_response_bytes_are_the_nodes(single: Any, make_mock: Any) -> None:
    node, gw = single
    body = b'{"model":"m1","prompt":"x","max_tokens":3}'
    _, _, via_gateway = post(gw.url, "/v1/completions", body)
    _, _, direct = post(node.url, "/v1/completions", body)
    strip = lambda raw: {k: v for k, v in json.loads(raw).items() if k not in ("id", "created")}  # noqa: E731
    assert strip(via_gateway) == strip(direct)


def test_stream_is_passed_through_unchanged(single: Any) -> None:
    node, gw = single
    body = b'{"model":"m1","prompt":"x","stream":true}'
    status, headers, via_gateway = post(gw.url, "/v1/completions", body)
    _, _, direct = post(node.url, "/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in via_gateway.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == len([e for e in direct.split(b"\n\n") if e])


def test_client_authorization_never_forwarded_node_key_sent(single: Any) -> None:
    node, gw = single
    post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"x"}', {"Authorization": "Bearer client-secret"})
    assert node.stats.last_headers["authorization"] == "Bearer node-secret"


def test_alias_is_rewritten_for_the_node(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["real-name"])
    gw = make_gateway(nodes=[node_entry(node, "n", {"public": "real-name"})])
    status, _, _body = post(gw.url, "/v1/completions", b'{"model":"public","prompt":"x","extra":[1,2]}')
    assert status == 200
    sent = json.loads(node.stats.last_body)
    assert sent == {"model": "real-name", "prompt": "x", "extra": [1, 2]}


def test_node_5xx_is_retried_then_passed_through(single: Any) -> None:
    node, gw = single
    status, _, body = post(gw.url, "/v1/completions", b'{"model":"m1","prompt":"x","mock":{"fail":"status500"}}')
    # One attempt plus max_retries (2) on the only node, then the node's own answer reaches the client.
    assert status == 500
    assert json.loads(body)["error"]["message"]
    assert node.stats.per_path["/v1/completions"] == 3


def test_an_answer_that_arrives_in_several_reads_is_answered_whole(make_mock: Any, make_gateway: Any) -> None:
    """~170 KB: more than one read from the node, less than the size relayed as it arrives
    (regression: the coroutine driver spun on the first part, and the gateway's loop with it)."""
    node = make_mock(models=["m1"], chunks=20_000, name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    body = b'{"model":"m1","prompt":"x","max_tokens":20000}'
    status, _, via_gateway = post(gw.url, "/v1/completions", body)
    _, _, direct = post(node.url, "/v1/completions", body)
    assert status == 200 and len(via_gateway) > 128 * 1024
    strip = lambda raw: {k: v for k, v in json.loads(raw).items() if k not in ("id", "created")}  # noqa: E731
    assert strip(via_gateway) == strip(direct)


def test_a_long_answer_is_relayed_as_it_arrives(make_mock: Any, make_gateway: Any) -> None:
    """A non-streamed answer over 256 KiB is not held whole by Shardon: the client has the first
    part while the node still holds the rest; the whole arrives byte for byte, its receipt hashed."""
    node = make_mock(models=["m1"], chunks=50_000, name="n")
    gw = make_gateway(nodes=[node_entry(node, "n", ["m1"])])
    body = {"model": "m1", "prompt": "x", "max_tokens": 50_000}
    first = 300 * 1024  # the node sends the head and this much of its body, then waits for the test
    with raw_request(gw.port, json.dumps({**body, "mock": {"hold_after": first}}).encode()) as sock:
        got = read_until(sock, lambda raw: len(raw_body(raw)) >= first)
        assert got.startswith(b"HTTP/1.1 200") and len(raw_body(got)) == first
        assert node.gate.waiting == 1  # the rest is still at the node
        node.gate.open()
        got += read_until(sock, lambda raw: raw_body(got + raw, complete=True) is not None)
    whole = raw_body(got, complete=True)
    _, _, direct = post(node.url, "/v1/completions", body)
    assert whole is not None and len(whole) > 256 * 1024
    strip = lambda raw: {k: v for k, v in json.loads(raw).items() if k not in ("id", "created")}  # noqa: E731
    assert strip(whole) == strip(direct)
    text = json.loads(whole)["choices"][0]["text"]
    (row,) = rows(gw.url)["data"]
    assert row["status"] == 200 and row["bytes_out"] == len(whole)
    assert row["receipt"]["output_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def raw_body(raw: bytes, complete: bool = False) -> Any:
    """The body of a response read raw so far (chunked or not); with ``complete``, None until it
    is all there."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None if complete else b""
    if b"transfer-encoding: chunked" in head.lower():
        body, ended = dechunk(rest)
        return body if ended or not complete else None
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return rest if len(rest) >= length or not complete else None
