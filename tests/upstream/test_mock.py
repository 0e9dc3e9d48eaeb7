"""The mock inference node: OpenAI wire compatibility, HTTP/1.1 behaviour, failure injection, stats."""

from __future__ import annotations

import asyncio
import base64
import json
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httptools
import openai
import pytest

from shardon.upstream.mock import MockConfig, MockNode, MockNodeThread, new_event_loop
from tests.support import until, wait_until

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def mock_node(make_mock: Callable[..., MockNodeThread]) -> Callable[..., MockNodeThread]:
    """``mock_node(**MockConfig fields)``: tests/conftest.py's ``make_mock``."""
    return make_mock


def client(node: MockNodeThread, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=node.url + "/v1", api_key=api_key, max_retries=0, timeout=10.0)


class Message:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.pieces: list[tuple[float, bytes]] = []
        self.complete = False

    @property
    def body(self) -> bytes:
        return b"".join(p for _, p in self.pieces)

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[bytes]:
        return [e[len(b"data: ") :] for e in self.body.split(b"\n\n") if e]


class Reader:
    """Reads HTTP/1.1 responses from a raw socket with httptools, timestamping each body piece."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[Message] = []
        self.parser = httptools.HttpResponseParser(self)
        self.eof = False
        self.raw = b""

    def on_message_begin(self) -> None:
        self.messages.append(Message())

    def on_header(self, name: bytes, value: bytes) -> None:
        self.messages[-1].headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.messages[-1].status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.messages[-1].pieces.append((time.monotonic(), bytes(body)))

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True

    def _recv(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no response in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.raw += data
        self.parser.feed_data(data)
        return True

    def read(self, count: int = 1, timeout: float = 5.0) -> list[Message]:
        """Read until ``count`` responses are complete (or the server closes the connection)."""
        deadline = time.monotonic() + timeout
        while sum(m.complete for m in self.messages) < count and self._recv(deadline):
            pass
        return self.messages

    def read_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate() and self._recv(deadline):
            pass

    def wait_eof(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self._recv(deadline):
            pass
        return self.eof


def http(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    raw = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(raw)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


def connect(node: MockNodeThread) -> socket.socket:
    return socket.create_connection(("127.0.0.1", node.port), timeout=5.0)


def request(node: MockNodeThread, method: str, path: str, body: Any = None, **kw: Any) -> Message:
    with connect(node) as sock:
        sock.sendall(http(method, path, body, kw.get("headers")))
        return Reader(sock).read()[0]


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": content}], **extra}


def assert_openai_error(msg: Message, status: int) -> dict[str, Any]:
    assert msg.status == status
    assert msg.headers["content-type"] == "application/json"
    err = msg.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return dict(err)


# ---------------------------------------------------------------------------------------------- openai client


def test_chat_completion_non_stream(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(name="node-a", models=["m1", "m2"], chunks=16)
    with client(node) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="m2", messages=[{"role": "user", "content": "x" * 40}], max_tokens=5
        )
        resp = raw.parse()
        assert raw.headers["x-mock-node"] == "node-a"
        assert resp.object == "chat.completion"
        assert resp.model == "m2"
        assert resp.system_fingerprint == "node-a"
        assert resp.choices[0].message.role == "assistant"
        assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage is not None
        usage = resp.usage
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 5, 15)

        # no limit, or a limit above the configured chunks: all chunks, finish "stop"
        full = c.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
        assert full.choices[0].message.content == "".join(f"tok{i} " for i in range(16))
        assert full.choices[0].finish_reason == "stop"
        assert full.usage is not None and full.usage.prompt_tokens == 1
        more = c.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=100
        )
        assert more.usage is not None and more.usage.completion_tokens == 16
        assert more.choices[0].finish_reason == "stop"
    assert node.stats.completed == 3
    assert node.stats.per_path == {"/v1/chat/completions": 3}


def test_chat_completion_stream_with_usage(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=4, name="s1")
    with client(node) as c:
        stream = c.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "abcdefgh"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        with stream:
            chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" and ch.model == "mock-model" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    tokens, final, usage = chunks[:4], chunks[4], chunks[5]
    assert len(chunks) == 6
    assert tokens[0].choices[0].delta.role == "assistant"
    assert [t.choices[0].delta.content for t in tokens] == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert all(t.choices[0].finish_reason is None and t.usage is None for t in tokens)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].delta.content is None
    assert usage.choices == []
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens, usage.usage.total_tokens) == (2, 4, 6)
    assert node.stats.completed == 1 and node.stats.in_flight == 0


def test_chat_stream_without_usage_and_max_tokens(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=8)
    with client(node) as c:
        stream = c.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=3
        )
        with stream:
            chunks = list(stream)
    assert len(chunks) == 4
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "tok0 tok1 tok2 "
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(ch.usage is None for ch in chunks)


def test_completions_stream_and_not(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=3, name="c1")
    with client(node) as c:
        resp = c.completions.create(model="mock-model", prompt="hello world!")
        assert resp.object == "text_completion"
        assert resp.choices[0].text == "tok0 tok1 tok2 "
        assert resp.choices[0].finish_reason == "stop"
        assert resp.usage is not None and resp.usage.prompt_tokens == 3 and resp.usage.total_tokens == 6
        assert resp.system_fingerprint == "c1"

        stream = c.completions.create(
            model="mock-model", prompt="hi", stream=True, max_tokens=2, stream_options={"include_usage": True}
        )
        with stream:
            chunks = list(stream)
    assert [ch.choices[0].text for ch in chunks[:2]] == ["tok0 ", "tok1 "]
    assert chunks[2].choices[0].text == "" and chunks[2].choices[0].finish_reason == "length"
    assert chunks[3].choices == [] and chunks[3].usage is not None
    assert chunks[3].usage.completion_tokens == 2
    assert len(chunks) == 4


def test_embeddings(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(models=["emb"])
    with client(node) as c:
        b64 = c.embeddings.create(model="emb", input=["hello", "world"])  # the client asks for base64
        floats = c.embeddings.create(model="emb", input=["hello", "world"], encoding_format="float")
        single = c.embeddings.create(model="emb", input="hello", encoding_format="float")
        wide = c.embeddings.create(model="emb", input="hello", dimensions=20, encoding_format="float")
    assert json.loads(node.stats.last_body)["dimensions"] == 20
    assert [d.index for d in floats.data] == [0, 1]
    assert [d.embedding for d in b64.data] == [d.embedding for d in floats.data]
    assert all(len(d.embedding) == 8 for d in floats.data)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert single.data[0].embedding == floats.data[0].embedding
    assert len(wide.data[0].embedding) == 20 and wide.data[0].embedding[:8] == single.data[0].embedding
    assert floats.model == "emb" and floats.usage.prompt_tokens == 2 and floats.usage.total_tokens == 2


def test_embeddings_raw_base64_and_dim(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(embedding_dim=4)
    msg = request(node, "POST", "/v1/embeddings", {"model": "mock-model", "input": "a", "encoding_format": "base64"})
    emb = msg.json()["data"][0]["embedding"]
    assert isinstance(emb, str) and len(struct.unpack("<4f", base64.b64decode(emb))) == 4
    tokens = request(node, "POST", "/v1/embeddings", {"input": [[1, 2, 3], [4]]}).json()
    assert len(tokens["data"]) == 2 and tokens["model"] == "mock-model"
    assert_openai_error(request(node, "POST", "/v1/embeddings", {"input": []}), 400)


def test_models(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(models=["a", "b"])
    with client(node) as c:
        models = c.models.list()
    assert [m.id for m in models.data] == ["a", "b"]
    assert all(m.object == "model" and m.owned_by == "shardon-mock" for m in models.data)
    assert request(node, "GET", "/health").json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------- HTTP/1.1


def test_keep_alive_reuses_connection(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=2)
    with connect(node) as sock:
        reader = Reader(sock)
        sock.sendall(http("POST", "/v1/chat/completions", chat()))
        reader.read(1)
        sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True)))
        reader.read(2)
        sock.sendall(http("GET", "/health"))
        msgs = reader.read(3)
        assert [m.status for m in msgs] == [200, 200, 200]
        assert all(m.headers["connection"] == "keep-alive" for m in msgs)
        assert msgs[1].headers["transfer-encoding"] == "chunked"
        assert msgs[1].events()[-1] == b"[DONE]"
        assert not reader.eof
        assert node.stats.connections_open == 1
    wait_until(lambda: node.stats.connections_open == 0)
    assert node.stats.total_requests == 3 and node.stats.completed == 3


def test_connection_close_honoured(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=2)
    for body in (chat(), chat(stream=True)):
        with connect(node) as sock:
            sock.sendall(http("POST", "/v1/chat/completions", body, {"Connection": "close"}))
            reader = Reader(sock)
            msg = reader.read()[0]
            assert msg.complete and msg.status == 200
            assert msg.headers["connection"] == "close"
            assert reader.wait_eof()
    with connect(node) as sock:  # HTTP/1.0 without keep-alive closes too
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        reader = Reader(sock)
        assert reader.read()[0].status == 200
        assert reader.wait_eof()


def test_pipelined_requests_answered_in_order(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=8, delay_ms=5)
    with connect(node) as sock:
        sock.sendall(
            http("POST", "/v1/chat/completions", chat(stream=True, max_tokens=3))
            + http("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
            + http("GET", "/health")
        )
        msgs = Reader(sock).read(3)
    assert [m.status for m in msgs] == [200, 200, 200]
    assert len(msgs[0].events()) == 5  # 3 tokens, final, [DONE]
    assert msgs[1].json()["choices"][0]["text"] == "tok0 tok1 "
    assert msgs[2].json() == {"status": "ok"}


def test_expect_100_continue(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=1)
    body = json.dumps(chat()).encode()
    with connect(node) as sock:
        head = http("POST", "/v1/chat/completions", None, {"Content-Length": str(len(body)), "Expect": "100-continue"})
        sock.sendall(head)
        sock.settimeout(5)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        msg = Reader(sock).read()[0]
    assert msg.status == 200 and msg.json()["choices"][0]["message"]["content"] == "tok0 "


def test_stream_chunk_timing(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=5, delay_ms=40, ttft_ms=100)
    with connect(node) as sock:
        start = time.monotonic()
        sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True)))
        reader = Reader(sock)
        msg = reader.read(timeout=5.0)[0]
    assert msg.complete
    token_times = [t - start for t, piece in msg.pieces if b'"tok' in piece]
    assert len(token_times) == 5  # every token arrived in its own HTTP chunk
    # Timers never fire early: the first token after ttft_ms, each next one delay_ms after the one
    # before. Bounded from the request's start, not gap by gap: a read this thread makes late
    # brings two tokens' arrival times together without either being early.
    assert all(t >= 0.1 + 0.035 * k for k, t in enumerate(token_times)), token_times


def test_stream_headers_are_sent_before_the_first_token(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=3)
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True, mock={"hold_after": 0})))
        reader = Reader(sock)
        reader.read_until(lambda: bool(reader.messages) and reader.messages[0].status == 200)
        wait_until(lambda: node.gate.waiting == 1)
        assert reader.messages[0].body == b""  # the head, and no token until the gate lets it go
        node.gate.release()
        msg = reader.read()[0]
    assert msg.complete and len(msg.events()) == 3 + 2


def test_per_request_overrides(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=16)
    msg = request(node, "POST", "/v1/chat/completions", chat(mock={"chunks": 2}))
    assert msg.json()["choices"][0]["message"]["content"] == "tok0 tok1 "
    start = time.monotonic()
    msg = request(node, "POST", "/v1/completions", {"prompt": "p", "mock": {"chunks": 3, "delay_ms": 30}})
    elapsed = time.monotonic() - start
    assert msg.json()["choices"][0]["text"] == "tok0 tok1 tok2 "
    assert elapsed >= 0.06  # a non-streaming answer waits for the last token (2 x 30 ms)
    zero = request(node, "POST", "/v1/chat/completions", chat(stream=True, mock={"chunks": 0}))
    events = zero.events()
    assert len(events) == 2 and events[1] == b"[DONE]"
    assert json.loads(events[0])["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- errors


def test_error_shapes(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(models=["only"])
    err = assert_openai_error(request(node, "GET", "/v2/nothing"), 404)
    assert err["type"] == "invalid_request_error"
    err = assert_openai_error(request(node, "POST", "/v1/chat/completions", chat() | {"model": "nope"}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert_openai_error(request(node, "POST", "/v1/chat/completions", b'{"model": "only", "messages": ['), 400)
    assert_openai_error(request(node, "POST", "/v1/chat/completions", b"[1, 2]"), 400)
    assert_openai_error(request(node, "POST", "/v1/chat/completions", {"model": "only"}), 400)
    assert_openai_error(
        request(node, "POST", "/v1/completions", {"model": "only", "prompt": "x", "max_tokens": 0}), 400
    )
    assert_openai_error(request(node, "POST", "/v1/chat/completions", chat(model="only", mock={"fail": "x"})), 400)
    assert_openai_error(request(node, "GET", "/v1/chat/completions"), 405)
    assert_openai_error(request(node, "POST", "/v1/embeddings", {"model": "zzz", "input": "a"}), 404)
    with connect(node) as sock:  # malformed HTTP: 400 then close
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reader = Reader(sock)
        assert_openai_error(reader.read()[0], 400)
        assert reader.wait_eof()
    assert node.stats.errors == 9 and node.stats.completed == 0
    with client(node) as c, pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_api_key(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(require_api_key="sekrit")
    with client(node, api_key="wrong") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with client(node, api_key="sekrit") as c:
        assert c.chat.completions.create(model="mock-model", messages=[{"role": "user", "content": "x"}]).choices
    err = assert_openai_error(request(node, "POST", "/v1/chat/completions", chat()), 401)
    assert err["code"] == "invalid_api_key"
    assert request(node, "GET", "/health").status == 200  # health needs no key
    assert node.stats.last_headers.get("authorization") is None


def test_max_concurrent_rejects_with_503(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(max_concurrent=2)
    socks = [connect(node) for _ in range(2)]
    try:
        for sock in socks:
            sock.sendall(http("POST", "/v1/chat/completions", chat(mock={"fail": "hang"})))
        wait_until(lambda: node.stats.in_flight == 2)
        err = assert_openai_error(request(node, "POST", "/v1/chat/completions", chat()), 503)
        assert err["code"] == "overloaded"
        with client(node) as c, pytest.raises(openai.InternalServerError) as info:
            c.completions.create(model="mock-model", prompt="x")
        assert info.value.status_code == 503
        assert request(node, "GET", "/health").status == 200  # not a generation: never capped
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: node.stats.in_flight == 0 and node.stats.cancelled == 2)
    assert request(node, "POST", "/v1/chat/completions", chat()).status == 200
    assert node.stats.rejected == 2 and node.stats.max_in_flight == 2


# ---------------------------------------------------------------------------------------------- failures


def test_fail_before(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node()
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/chat/completions", chat(mock={"fail": "before"})))
        reader = Reader(sock)
        assert reader.wait_eof() and reader.raw == b""
    with client(node) as c, pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(
            model="mock-model",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"mock": {"fail": "before"}},
        )
    wait_until(lambda: node.stats.in_flight == 0)
    assert node.stats.aborted == 2 and node.stats.cancelled == 0


def test_fail_mid_stream(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=10, delay_ms=5)
    for fail_after, expected in ((None, 2), (0, 0), (4, 4), (50, 10)):
        mock: dict[str, Any] = {"fail": "mid"}
        if fail_after is not None:
            mock["fail_after"] = fail_after
        with connect(node) as sock:
            sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True, mock=mock)))
            reader = Reader(sock)
            assert reader.wait_eof()
        msg = reader.messages[0]
        assert msg.status == 200 and not msg.complete
        events = msg.events()
        assert len(events) == expected
        assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events] == [
            f"tok{i} " for i in range(expected)
        ]
    wait_until(lambda: node.stats.in_flight == 0)
    assert node.stats.aborted == 4 and node.stats.completed == 0


def test_fail_mid_non_stream(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node()
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/completions", {"prompt": "x", "mock": {"fail": "mid"}}))
        reader = Reader(sock)
        assert reader.wait_eof()
    msg = reader.messages[0]
    assert msg.status == 200 and not msg.complete
    assert 0 < len(msg.body) < int(msg.headers["content-length"])
    with client(node) as c, pytest.raises(openai.APIConnectionError):
        c.completions.create(model="mock-model", prompt="x", extra_body={"mock": {"fail": "mid"}})


@pytest.mark.parametrize("status", [500, 503])
def test_fail_status(mock_node: Callable[..., MockNodeThread], status: int) -> None:
    node = mock_node()
    for stream in (False, True):
        msg = request(node, "POST", "/v1/chat/completions", chat(stream=stream, mock={"fail": f"status{status}"}))
        assert assert_openai_error(msg, status)["type"] == "server_error"
    with client(node) as c, pytest.raises(openai.InternalServerError) as info:
        c.embeddings.create(model="mock-model", input="x", extra_body={"mock": {"fail": f"status{status}"}})
    assert info.value.status_code == status
    assert node.stats.errors == 3 and node.stats.in_flight == 0


def test_fail_hang_until_client_leaves(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node()
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True, mock={"fail": "hang"})))
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(100)
        assert node.stats.in_flight == 1
    wait_until(lambda: node.stats.cancelled == 1 and node.stats.in_flight == 0)
    assert node.stats.completed == 0 and node.stats.connections_open == 0


def test_set_fail_applies_to_every_request(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=4)
    with pytest.raises(ValueError):
        node.set_fail("explode")
    node.set_fail("status503")
    assert_openai_error(request(node, "GET", "/health"), 503)
    assert_openai_error(request(node, "POST", "/v1/chat/completions", chat()), 503)
    node.set_fail("before")
    with connect(node) as sock:
        sock.sendall(http("GET", "/health"))
        reader = Reader(sock)
        assert reader.wait_eof() and reader.raw == b""
    node.set_fail("mid")
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True)))
        reader = Reader(sock)
        assert reader.wait_eof()
        assert len(reader.messages[0].events()) == 2 and not reader.messages[0].complete
    assert request(node, "GET", "/mock/stats").json()["fail"] == "mid"  # control endpoints still work
    node.set_fail(None)
    assert request(node, "GET", "/health").status == 200
    assert request(node, "POST", "/v1/chat/completions", chat()).status == 200


def test_cancellation_mid_stream_is_counted(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=1000, delay_ms=20)
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/chat/completions", chat(stream=True)))
        reader = Reader(sock)
        reader.read_until(lambda: b'"tok2 "' in reader.raw)
        assert node.stats.in_flight == 1
    wait_until(lambda: node.stats.cancelled == 1 and node.stats.in_flight == 0, timeout=2.0)
    assert node.stats.completed == 0 and node.stats.connections_open == 0
    assert not node.node._conns  # timers stopped with the connection

    # a non-streaming request waiting for its generation is cancelled the same way
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/chat/completions", chat(mock={"ttft_ms": 5000})))
        wait_until(lambda: node.stats.in_flight == 1)
    wait_until(lambda: node.stats.cancelled == 2 and node.stats.in_flight == 0, timeout=2.0)


# ---------------------------------------------------------------------------------------------- observability


def test_stats_capture_headers_and_body(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node()
    body = json.dumps(chat("observe me")).encode()
    msg = request(node, "POST", "/v1/chat/completions?x=1", body, headers={"X-Trace-Id": "abc-123"})
    assert msg.status == 200
    assert node.stats.last_body == body
    assert node.stats.last_headers["x-trace-id"] == "abc-123"
    assert node.stats.per_path == {"/v1/chat/completions": 1}


def test_mock_stats_reset_and_fail_endpoints(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(name="remote")
    request(node, "POST", "/v1/chat/completions", chat())
    request(node, "GET", "/missing")
    stats = request(node, "GET", "/mock/stats").json()
    assert stats["total_requests"] == 2 and stats["completed"] == 1 and stats["errors"] == 1
    assert stats["per_path"] == {"/v1/chat/completions": 1, "/missing": 1}
    assert stats["name"] == "remote" and stats["fail"] is None
    assert stats["last_body"] == "" and "host" in stats["last_headers"]
    reset = request(node, "POST", "/mock/reset")
    assert reset.status == 200 and reset.json()["total_requests"] == 0
    assert node.stats.total_requests == 0 and node.stats.per_path == {} and node.stats.completed == 0

    assert request(node, "POST", "/mock/fail", {"mode": "status500"}).json() == {"fail": "status500"}
    assert request(node, "GET", "/health").status == 500
    assert request(node, "POST", "/mock/fail", {"mode": None}).json() == {"fail": None}
    assert request(node, "GET", "/health").status == 200
    assert request(node, "POST", "/mock/fail", {"mode": "nope"}).status == 400
    assert request(node, "GET", "/mock/stats").json()["total_requests"] == 2  # control calls not counted


# ---------------------------------------------------------------------------------------------- the gate


def test_a_closed_gate_holds_every_generation_until_released(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=2)
    node.gate.close()
    socks = [connect(node) for _ in range(3)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(http("POST", "/v1/completions", {"prompt": f"p{i}"}))
            wait_until(lambda n=i + 1: node.gate.waiting == n)
        # Held: in flight on the node, nothing answered; control calls and health checks still are.
        assert node.stats.in_flight == 3 and node.stats.completed == 0
        assert request(node, "GET", "/health").status == 200
        assert [json.loads(b)["prompt"] for b in node.gate.bodies] == ["p0", "p1", "p2"]
        assert node.gate.release(1) == 1  # the oldest goes on
        assert json.loads(Reader(socks[0]).read()[0].body)["choices"][0]["text"] == "tok0 tok1 "
        assert node.gate.waiting == 2 and node.gate.state == "closed"
        assert node.gate.open() == 2  # the rest go on, and nothing more is held
        assert all(Reader(sock).read()[0].status == 200 for sock in socks[1:])
        assert request(node, "POST", "/v1/completions", {"prompt": "later", "mock": {"hold": True}}).status == 200
    finally:
        for sock in socks:
            sock.close()


def test_a_request_can_ask_to_be_held(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=2)
    with connect(node) as held, connect(node) as other:
        held.sendall(http("POST", "/v1/chat/completions", chat(mock={"hold": True})))
        wait_until(lambda: node.gate.waiting == 1)
        other.sendall(http("POST", "/v1/chat/completions", chat()))  # an open gate: not held
        assert Reader(other).read()[0].status == 200
        assert node.gate.waiting == 1 and node.stats.in_flight == 1
        node.gate.release()
        assert Reader(held).read()[0].json()["choices"][0]["message"]["content"] == "tok0 tok1 "


def test_hold_after_holds_a_stream_after_its_first_tokens(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=5)
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/completions", {"prompt": "x", "stream": True, "mock": {"hold_after": 2}}))
        reader = Reader(sock)
        reader.read_until(lambda: len(reader.messages) == 1 and reader.messages[0].body.count(b"data: ") == 2)
        wait_until(lambda: node.gate.waiting == 1)
        assert not reader.messages[0].complete
        node.gate.release()
        msg = reader.read()[0]
    assert msg.complete
    assert len(msg.events()) == 5 + 2


def test_hold_after_holds_a_whole_answer_after_its_first_bytes(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=100)
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/completions", {"prompt": "x", "mock": {"hold_after": 100}}))
        reader = Reader(sock)
        reader.read_until(lambda: len(reader.messages) == 1 and len(reader.messages[0].body) == 100)
        wait_until(lambda: node.gate.waiting == 1)
        assert not reader.messages[0].complete
        node.gate.release()
        msg = reader.read()[0]
    assert msg.complete and msg.json()["choices"][0]["text"] == "".join(f"tok{i} " for i in range(100))


def test_a_held_request_whose_client_leaves_is_cancelled(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node()
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/completions", {"prompt": "x", "mock": {"hold": True}}))
        wait_until(lambda: node.gate.waiting == 1)
    wait_until(lambda: node.stats.cancelled == 1)
    assert node.gate.waiting == 0 and node.stats.in_flight == 0
    assert node.gate.release() == 0


def test_the_gate_over_http(mock_node: Callable[..., MockNodeThread]) -> None:
    node = mock_node(chunks=1)
    assert request(node, "POST", "/mock/gate", {"action": "close"}).json() == {"state": "closed", "waiting": 0}
    with connect(node) as sock:
        sock.sendall(http("POST", "/v1/completions", {"prompt": "x"}))
        wait_until(lambda: request(node, "GET", "/mock/stats").json()["gate"] == {"state": "closed", "waiting": 1})
        assert request(node, "POST", "/mock/gate", {"action": "release", "n": 1}).json()["waiting"] == 0
        assert Reader(sock).read()[0].status == 200
    assert request(node, "POST", "/mock/gate", {"action": "open"}).json() == {"state": "open", "waiting": 0}
    assert request(node, "POST", "/mock/gate", {"action": "ajar"}).status == 400


# ------------------------------------------------------------------------------------- in-process API, CLI


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_async_api(loop_kind: str) -> None:
    async def main() -> None:
        async with MockNode(MockConfig(chunks=2, name="inproc")) as node:
            assert node.port > 0 and node.url == f"http://127.0.0.1:{node.port}"
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            try:
                writer.write(http("POST", "/v1/chat/completions", chat()))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 OK") and b"X-Mock-Node: inproc" in head
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                data = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
                assert data["choices"][0]["message"]["content"] == "tok0 tok1 "
                writer.write(http("POST", "/v1/chat/completions", chat(mock={"fail": "hang"})))
                await until(lambda: node.stats.in_flight == 1)
                await node.stop()  # closes the hanging connection too
                assert await asyncio.wait_for(reader.read(), 5) == b""
                assert node.stats.connections_open == 0
            finally:
                writer.close()
                await writer.wait_closed()

    loop = new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_client_accepted_as_the_node_stops_is_closed_too() -> None:
    """A client taken from the kernel's queue in the pass that stops the node: its
    ``connection_made`` is still queued when the stop closes what it knows, and it must not outlive
    the node (left open, uvloop's close of the loop waits on it)."""

    async def main() -> None:
        node = MockNode(MockConfig(name="stopping"))
        await node.start()
        loop = asyncio.get_running_loop()
        listener = node._listeners[0]
        loop.remove_reader(listener._fd)  # the client waits in the kernel's queue until taken below
        client = socket.create_connection(("127.0.0.1", node.port))
        client.setblocking(False)
        try:
            await asyncio.sleep(0.05)
            listener._accept()  # taken now; the stop below begins in this same pass
            assert not node._conns
            await node.stop()
            assert await asyncio.wait_for(loop.sock_recv(client, 1), 5) == b""
            assert not node._conns and node.stats.connections_open == 0
        finally:
            client.close()

    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_thread_helper_context_manager() -> None:
    with MockNodeThread(MockConfig(models=["t"])) as node:
        assert request(node, "GET", "/v1/models").json()["data"][0]["id"] == "t"
        node.reset_stats()
        assert node.stats.total_requests == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", node.port), timeout=1):
        pass


def test_cli_runs_until_sigterm() -> None:
    cmd = [
        sys.executable,
        "-m",
        "shardon.upstream.mock",
        "--port",
        "0",
        "--models",
        "a,b",
        "--chunks",
        "2",
        "--name",
        "cli-node",
        "--max-concurrent",
        "4",
    ]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                assert sel.select(timeout=15), "CLI printed nothing"
            line = proc.stdout.readline()
            assert "cli-node" in line
            port = int(line.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(http("POST", "/v1/completions", {"model": "b", "prompt": "x"}))
                msg = Reader(sock).read()[0]
            assert msg.headers["x-mock-node"] == "cli-node"
            assert msg.json()["choices"][0]["text"] == "tok0 tok1 "
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
