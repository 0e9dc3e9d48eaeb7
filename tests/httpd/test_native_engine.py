"""Conformance of the native engine's client-side wire objects: HTTPConnection, Request, ResponseStream.

Every test runs against both implementations (the ``wire`` fixture, tests/httpd/conftest.py): a
`NativeServer` on 127.0.0.1 in the test's own uvloop, given the implementation's ``HTTPConnection``
as its connection class, and clients on raw non-blocking sockets, so the test writes and reads every
byte itself (nothing is read from a socket unless the test asks). Each test is bounded by
``SCENARIO_TIMEOUT`` and each read by ``READ_TIMEOUT``. The expected behaviour is the one
``shardon/httpd/_connection_py.py`` specifies in its module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from shardon.errors import PayloadTooLarge, ProtocolClosed
from shardon.httpd import NativeServer
from tests import support
from tests.support import until

SCENARIO_TIMEOUT = 15.0
READ_TIMEOUT = 5.0
FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")

App = Callable[[Any, Any], Coroutine[Any, Any, None]]


# ---------------------------------------------------------------------------------------------- harness


on_uvloop = support.on_uvloop(SCENARIO_TIMEOUT)


@dataclass
class Response:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]  # names lower-cased, in the order sent
    body: bytes = b""
    chunks: list[bytes] | None = None  # a chunked body, chunk by chunk

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times: {self.headers}"
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One raw client connection: the test sends bytes and reads them; nothing is read on its own."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.eof = False

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _recv(self, timeout: float = READ_TIMEOUT) -> bool:
        if self.eof:
            return False
        async with asyncio.timeout(timeout):
            data = await self.loop.sock_recv(self.sock, 1 << 16)
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def read_until(self, separator: bytes) -> bytes:
        while (end := self.buffer.find(separator)) < 0:
            if not await self._recv():
                raise AssertionError(f"closed before {separator!r}; got {bytes(self.buffer)[:200]!r}")
        end += len(separator)
        data = bytes(self.buffer[:end])
        del self.buffer[:end]
        return data

    async def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._recv():
                raise AssertionError(f"closed after {len(self.buffer)} of {size} bytes")
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_to_eof(self) -> bytes:
        while await self._recv():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def assert_closed(self) -> None:
        """The server closes the connection, with nothing more sent."""
        rest = await self.read_to_eof()
        assert rest == b"", f"unexpected bytes before close: {rest[:200]!r}"

    async def assert_quiet(self, seconds: float = 0.1) -> None:
        """Nothing arrives for ``seconds`` and the connection stays open."""
        assert not self.buffer, f"unexpected bytes: {bytes(self.buffer)[:200]!r}"
        with contextlib.suppress(TimeoutError):
            await self._recv(timeout=seconds)
        assert not self.eof, "the server closed the connection"
        assert not self.buffer, f"unexpected bytes: {bytes(self.buffer)[:200]!r}"

    async def read_response(self, method: str = "GET") -> Response:
        head = await self.read_until(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, reason = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        response = Response(version, int(status), reason, headers)
        if method == "HEAD" or response.status < 200 or response.status in (204, 304):
            return response
        encoding = response.header("transfer-encoding")
        length = response.header("content-length")
        if encoding is not None:
            assert encoding == "chunked", encoding
            assert length is None, "both content-length and transfer-encoding"
            chunks = []
            while True:
                size = int((await self.read_until(b"\r\n"))[:-2], 16)
                if size == 0:
                    assert await self.read_exact(2) == b"\r\n"  # no trailers
                    break
                chunks.append(await self.read_exact(size))
                assert await self.read_exact(2) == b"\r\n"
            response.chunks = chunks
            response.body = b"".join(chunks)
        elif length is not None:
            response.body = await self.read_exact(int(length))
        else:  # close-delimited
            response.body = await self.read_to_eof()
        return response

    async def request(self, data: bytes, method: str = "GET") -> Response:
        await self.send(data)
        return await self.read_response(method)

    def close(self) -> None:
        self.sock.close()


class Served:
    """A running `NativeServer` and the clients a test opened to it."""

    def __init__(self, server: NativeServer) -> None:
        self.server = server
        self.clients: list[Client] = []

    @property
    def port(self) -> int:
        return self.server.port

    async def connect(self, *, rcvbuf: int | None = None) -> Client:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        client = Client(sock)
        self.clients.append(client)
        return client

    async def accepted(self, count: int) -> None:
        """Wait until the server holds ``count`` connections."""
        await until(lambda: len(self.server.connections) == count)


@contextlib.asynccontextmanager
async def serving(wire: ModuleType, app: App, **options: Any) -> AsyncIterator[Served]:
    server = NativeServer(app, "127.0.0.1", 0, connection_class=wire.HTTPConnection, **options)
    await server.start()
    served = Served(server)
    try:
        yield served
    finally:
        for client in served.clients:
            client.close()
        server.stop()
        await until(lambda: not server.connections)


def http(
    method: str = "GET",
    path: str = "/",
    *,
    headers: list[tuple[str, str]] | tuple[()] = (),
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """A request's bytes (a Host header, and Content-Length when there is a body and no framing given)."""
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def describe(scope: Any, body: bytes) -> dict[str, Any]:
    return {
        "method": scope.method,
        "path": scope.path,
        "query_string": scope.query_string,
        "http_version": scope.http_version,
        "client": scope.client,
        "server": scope.server,
        "scheme": scope.scheme,
        "proto": scope.proto,
        "authority": scope.authority,
        "headers": dict(scope.headers),
        "repeated": scope.headers.get_all("x-repeat"),
        "body": body.decode("latin-1"),
    }


async def echo(scope: Any, proto: Any) -> None:
    """Answers with what it saw of the request, as JSON."""
    body = await proto()
    payload = json.dumps(describe(scope, body)).encode()
    proto.response_bytes(200, [("content-type", "application/json"), ("x-echo", "yes")], payload)


def assert_openai_error(response: Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert response.status == status, response
    assert response.header("content-type") == "application/json"
    assert int(response.header("content-length") or -1) == len(response.body)
    payload = response.json()
    assert set(payload) == {"error"}
    error: dict[str, Any] = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type_, None, code)
    return error


def assert_date(response: Response) -> None:
    value = response.header("date")
    assert value is not None, "no date header"
    assert value.endswith(" GMT")
    assert abs(email.utils.parsedate_to_datetime(value).timestamp() - time.time()) < 5


# ---------------------------------------------------------------------------------------------- basics


@on_uvloop
async def test_get_status_line_headers_and_scope(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        response = await client.request(
            b"GET /v1/a%20b?x=1&y=%20 HTTP/1.1\r\nHost: example.test\r\nX-Mixed-Case: Value\r\n"
            b"X-Repeat: one\r\nx-repeat: two\r\n\r\n"
        )
        assert (response.version, response.status, response.reason) == ("HTTP/1.1", 200, "OK")
        assert response.header("content-length") == str(len(response.body))
        assert response.header("content-type") == "application/json"
        assert response.header("x-echo") == "yes"
        assert response.header("connection") is None  # HTTP/1.1: kept alive
        assert_date(response)
        seen = response.json()
        assert seen["method"] == "GET"
        assert seen["path"] == "/v1/a b"  # percent-decoded
        assert seen["query_string"] == "x=1&y=%20"  # raw
        assert seen["http_version"] == "1.1"
        assert seen["client"] == client.address
        assert seen["server"] == f"127.0.0.1:{served.port}"
        assert (seen["scheme"], seen["proto"], seen["authority"]) == ("http", "http", "example.test")
        assert seen["headers"] == {"host": "example.test", "x-mixed-case": "Value", "x-repeat": "two"}
        assert seen["repeated"] == ["one", "two"]
        assert seen["body"] == ""


@on_uvloop
async def test_post_with_content_length_body(wire: ModuleType) -> None:
    body = bytes(range(256)) * 40  # every byte value, 10 KiB
    async with serving(wire, echo) as served:
        client = await served.connect()
        response = await client.request(http("POST", "/v1/things", headers=[("Content-Type", "x/y")], body=body))
        assert response.status == 200
        seen = response.json()
        assert seen["method"] == "POST"
        assert seen["path"] == "/v1/things"
        assert seen["body"].encode("latin-1") == body
        assert seen["headers"]["content-length"] == str(len(body))
        assert seen["headers"]["content-type"] == "x/y"


@on_uvloop
async def test_response_helpers_and_head(wire: ModuleType) -> None:
    async def app(scope: Any, proto: Any) -> None:
        await proto()
        if scope.path == "/str":
            proto.response_str(201, [("content-type", "text/plain")], "héllo")
        elif scope.path == "/empty":
            proto.response_empty(204, [("x-empty", "1")])
        else:
            proto.response_bytes(200, [("content-type", "text/plain")], b"0123456789")

    async with serving(wire, app) as served:
        client = await served.connect()
        response = await client.request(http("GET", "/str"))
        assert (response.status, response.reason, response.body) == (201, "Created", "héllo".encode())
        response = await client.request(http("GET", "/empty"))
        assert (response.status, response.header("x-empty")) == (204, "1")
        assert response.header("content-length") == "0"
        # HEAD: the headers of the GET (its content-length), no body; the connection stays in step.
        response = await client.request(http("HEAD", "/bytes"), method="HEAD")
        assert (response.status, response.header("content-length")) == (200, "10")
        await client.assert_quiet()
        response = await client.request(http("GET", "/bytes"))
        assert response.body == b"0123456789"


# ---------------------------------------------------------------------------------------------- keep-alive


@on_uvloop
async def test_keep_alive_serves_several_requests_on_one_connection(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        for i in range(4):
            method = "POST" if i % 2 else "GET"
            body = f"body {i}".encode() if method == "POST" else b""
            response = await client.request(http(method, f"/r{i}", body=body))
            assert response.status == 200
            assert response.header("connection") is None
            seen = response.json()
            assert (seen["method"], seen["path"], seen["body"]) == (method, f"/r{i}", body.decode())
            assert seen["client"] == client.address
        assert len(served.server.connections) == 1


@on_uvloop
async def test_connection_close_from_client_closes_after_response(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        response = await client.request(http("GET", "/bye", headers=[("Connection", "close")]))
        assert response.status == 200
        assert response.json()["path"] == "/bye"
        assert response.header("connection") == "close"
        await client.assert_closed()


@on_uvloop
async def test_body_after_a_connection_close_head_is_still_read(wire: ModuleType) -> None:
    """A request that ends the connection is read to its end: only what follows it is ignored."""

    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(200, [], await proto())

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("POST", "/last", headers=[("Connection", "close"), ("Content-Length", "5")]))
        await asyncio.sleep(0.05)  # the body comes in a read of its own, as many clients send it
        await client.send(b"hello")
        response = await client.read_response()
        assert response.status == 200 and response.body == b"hello"
        assert response.header("connection") == "close"
        await client.assert_closed()


@on_uvloop
async def test_http10_closes_unless_keep_alive(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        response = await client.request(http("GET", "/old", version="1.0"))
        assert response.status == 200
        assert response.json()["http_version"] == "1.0"
        assert response.header("connection") == "close"
        await client.assert_closed()
        # HTTP/1.0 asking for keep-alive is kept open.
        client = await served.connect()
        for path in ("/a", "/b"):
            response = await client.request(http("GET", path, headers=[("Connection", "keep-alive")], version="1.0"))
            assert response.json()["path"] == path
            assert response.header("connection") == "keep-alive"  # said, so the 1.0 client keeps it


@on_uvloop
async def test_http10_stream_is_close_delimited(wire: ModuleType) -> None:
    async def app(scope: Any, proto: Any) -> None:
        stream = proto.response_stream(200, [("content-type", "text/plain")])
        await stream.send_bytes(b"one ")
        await stream.send_bytes(b"two ")
        await stream.send_str("three")

    async with serving(wire, app) as served:
        client = await served.connect()
        # Keep-alive asked for, but a stream to an HTTP/1.0 client can only end with the connection.
        await client.send(http("GET", "/", headers=[("Connection", "keep-alive")], version="1.0"))
        response = await client.read_response()
        assert response.status == 200
        assert response.header("transfer-encoding") is None
        assert response.header("content-length") is None
        assert response.header("connection") == "close"
        assert response.body == b"one two three"  # read to EOF, no chunk framing
        assert client.eof


# ---------------------------------------------------------------------------------------------- pipelining


@on_uvloop
async def test_pipelined_requests_answered_in_order_once(wire: ModuleType) -> None:
    calls: list[tuple[str, bytes]] = []
    paused: list[tuple[int, bool, bool]] = []
    running = 0
    most = 0

    async def app(scope: Any, proto: Any) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        body = await proto()
        calls.append((scope.path, body))
        await asyncio.sleep(0.02)  # still busy when the next requests have been read
        if scope.path == "/1":
            # Requests wait in the pipeline, and the connection stops reading meanwhile.
            paused.append((len(proto.conn.pipeline), proto.conn.reading_paused, proto.conn.transport.is_reading()))
        running -= 1
        proto.response_bytes(200, [], f"{scope.path}:{len(body)}".encode())

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", "/1") + http("POST", "/2", body=b"x" * 100) + http("GET", "/3"))
        bodies = [(await client.read_response()).body for _ in range(3)]
        assert bodies == [b"/1:0", b"/2:100", b"/3:0"]
        assert calls == [("/1", b""), ("/2", b"x" * 100), ("/3", b"")]
        assert most == 1  # one request of a connection at a time
        assert paused == [(2, True, False)]
        (conn,) = served.server.connections
        assert not conn.reading_paused and conn.transport.is_reading()  # resumed once the pipeline emptied
        await client.assert_quiet()  # each answered exactly once
        response = await client.request(http("GET", "/4"))
        assert response.body == b"/4:0"


@on_uvloop
async def test_pipeline_ends_at_connection_close(wire: ModuleType) -> None:
    paths: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        paths.append(scope.path)
        proto.response_bytes(200, [], scope.path.encode())

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", "/1") + http("GET", "/2", headers=[("Connection", "close")]))
        first = await client.read_response()
        second = await client.read_response()
        assert (first.body, second.body, second.header("connection")) == (b"/1", b"/2", "close")
        await client.assert_closed()
        assert paths == ["/1", "/2"]


@on_uvloop
async def test_bytes_after_connection_close_are_ignored(wire: ModuleType) -> None:
    paths: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        paths.append(scope.path)
        proto.response_bytes(200, [], scope.path.encode())

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", "/1") + http("GET", "/2", headers=[("Connection", "close")]) + http("GET", "/3"))
        first = await client.read_response()
        assert (first.status, first.body) == (200, b"/1")
        second = await client.read_response()
        assert (second.body, second.header("connection")) == (b"/2", "close")
        await client.assert_closed()
        assert paths == ["/1", "/2"]


# ---------------------------------------------------------------------------------------------- request bodies


@on_uvloop
async def test_chunked_request_body(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        head = http("POST", "/c", headers=[("Transfer-Encoding", "chunked")])
        response = await client.request(head + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        assert response.json()["body"] == "hello world"
        # The same, one chunk per write.
        await client.send(head)
        for piece in (b"3\r\nabc\r\n", b"4\r\ndefg\r\n", b"0\r\n\r\n"):
            await asyncio.sleep(0.02)
            await client.send(piece)
        response = await client.read_response()
        assert response.json()["body"] == "abcdefg"


@on_uvloop
async def test_body_split_over_several_writes(wire: ModuleType) -> None:
    started: list[str] = []
    body = os.urandom(30_000)

    async def app(scope: Any, proto: Any) -> None:
        started.append(scope.path)
        data = await proto()
        proto.response_bytes(200, [], data)

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("POST", "/split", headers=[("Content-Length", str(len(body)))]))
        # The body is still coming: the request is held for the callback path (which needs the whole
        # body) for at most about a second, then the application runs and reads it as it arrives.
        await until(lambda: started)
        for i in range(0, len(body), 10_000):
            await asyncio.sleep(0.03)
            await client.send(body[i : i + 10_000])
        response = await client.read_response()
        assert response.status == 200
        assert response.body == body
        assert started == ["/split"]


@on_uvloop
async def test_expect_100_continue(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        await client.send(http("POST", "/e", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
        assert await client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(b"hello")
        response = await client.read_response()
        assert response.status == 200
        assert response.json()["body"] == "hello"
        # A body sent along with the head needs no 100 Continue.
        await client.send(http("POST", "/e", headers=[("Expect", "100-continue")], body=b"again"))
        response = await client.read_response()
        assert response.status == 200
        assert response.json()["body"] == "again"


async def _too_large(proto: Any, seen: list[str]) -> None:
    try:
        await proto()
    except PayloadTooLarge as exc:
        seen.append(type(exc).__name__)
        proto.response_bytes(exc.status, exc.headers(), exc.body())
        return
    proto.response_bytes(200, [], b"not too large?")


@pytest.mark.parametrize("arrival", ["with-head", "after-head"])
@on_uvloop
async def test_body_over_max_body(wire: ModuleType, arrival: str) -> None:
    seen: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        await _too_large(proto, seen)

    async with serving(wire, app, max_body=1024) as served:
        client = await served.connect()
        if arrival == "with-head":
            await client.send(http("POST", "/big", body=b"x" * 4096))
        else:
            # The application is already waiting for the body when it grows too large. The client
            # stops sending at that point (bytes still arriving after the close would reset it).
            await client.send(http("POST", "/big", headers=[("Content-Length", "4096")]))
            for _ in range(3):
                await asyncio.sleep(0.02)
                await client.send(b"y" * 500)
        response = await client.read_response()
        assert_openai_error(response, 413, "invalid_request_error", "request_too_large")
        assert response.header("connection") == "close"
        await client.assert_closed()
        assert seen == ["PayloadTooLarge"]
        # A body of exactly max_body is fine.
        client = await served.connect()
        response = await client.request(http("POST", "/ok", body=b"z" * 1024))
        assert response.body == b"not too large?"


@on_uvloop
async def test_answer_before_the_body_closes_the_connection(wire: ModuleType) -> None:
    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(401, [], b"no")  # refused before reading the body

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("POST", "/", headers=[("Expect", "100-continue"), ("Content-Length", "30")]))
        response = await client.read_response()
        assert response.status == 401
        assert response.header("connection") == "close"
        await client.assert_closed()


@on_uvloop
async def test_upgrade_request_is_answered_then_closed(wire: ModuleType) -> None:
    async with serving(wire, echo) as served:
        client = await served.connect()
        upgrade = http("GET", "/ws", headers=[("Connection", "Upgrade"), ("Upgrade", "websocket")])
        response = await client.request(upgrade + http("GET", "/next"))
        assert response.json()["path"] == "/ws"  # answered, no protocol switch
        assert response.header("connection") == "close"
        await client.assert_closed()


# ---------------------------------------------------------------------------------------------- protocol errors


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: test\r\nBad Header Line\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, say
        b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: nope\r\n\r\n",
    ],
    ids=["bad-header", "not-http", "bad-length"],
)
@on_uvloop
async def test_malformed_request_gets_400_and_close(wire: ModuleType, data: bytes) -> None:
    calls: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        calls.append(scope.path)
        proto.response_bytes(200, [], b"")

    async with serving(wire, app) as served:
        client = await served.connect()
        response = await client.request(data)
        error = assert_openai_error(response, 400, "invalid_request_error", "invalid_request")
        assert error["message"].startswith("malformed HTTP request")
        assert response.header("connection") == "close"
        assert_date(response)
        await client.assert_closed()
        assert calls == []


@on_uvloop
async def test_head_over_max_head_bytes_gets_431(wire: ModuleType) -> None:
    calls: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        calls.append(scope.path)
        proto.response_bytes(200, [], b"")

    async with serving(wire, app) as served:
        client = await served.connect()
        big = b"a" * (wire.MAX_HEAD_BYTES + 10)
        response = await client.request(b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + big + b"\r\n\r\n")
        assert_openai_error(response, 431, "invalid_request_error", "invalid_request")
        assert response.reason == "Request Header Fields Too Large"
        assert response.header("connection") == "close"
        await client.assert_closed()
        # Just under the limit is served.
        client = await served.connect()
        response = await client.request(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (wire.MAX_HEAD_BYTES - 100) + b"\r\n\r\n")
        assert response.status == 200
        assert calls == ["/"]


@on_uvloop
async def test_unterminated_header_over_max_head_bytes_gets_431(wire: ModuleType) -> None:
    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(200, [], b"")

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (2 * wire.MAX_HEAD_BYTES))
        response = await asyncio.wait_for(client.read_response(), 0.5)
        assert response.status == 431


@on_uvloop
async def test_slow_head_gets_408_and_close(wire: ModuleType) -> None:
    calls: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        calls.append(scope.path)
        proto.response_bytes(200, [], b"")

    async with serving(wire, app, header_timeout_s=0.3) as served:
        slow = await served.connect()
        started = time.monotonic()
        await slow.send(b"GET /slow HTTP/1.1\r\nHost: test\r\n")  # the head never ends
        response = await slow.read_response()
        assert time.monotonic() - started >= 0.3
        error = assert_openai_error(response, 408, "invalid_request_error", "invalid_request")
        assert "0.3s" in error["message"]
        assert response.header("connection") == "close"
        await slow.assert_closed()
        assert calls == []


@on_uvloop
async def test_idle_keep_alive_connection_closed_after_timeout(wire: ModuleType) -> None:
    release = asyncio.Event()
    held: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        if scope.path == "/hold":
            held.append(scope.path)
            await release.wait()
        proto.response_bytes(200, [], scope.path.encode())

    async with serving(wire, app, keepalive_timeout_s=0.3) as served:
        idle = await served.connect()
        assert (await idle.request(http("GET", "/once"))).body == b"/once"
        silent = await served.connect()  # connected, never sends a byte
        busy = await served.connect()
        await busy.send(http("GET", "/hold"))
        await until(lambda: held)
        await served.accepted(3)
        started = time.monotonic()
        await idle.assert_closed()
        await silent.assert_closed()
        assert time.monotonic() - started < 10  # a sweep after the timeout, not never
        # A connection with a request in flight is not idle, however long the request takes.
        await served.accepted(1)
        release.set()
        assert (await busy.read_response()).body == b"/hold"


# ---------------------------------------------------------------------------------------------- streaming


@on_uvloop
async def test_stream_is_chunked_one_chunk_per_send(wire: ModuleType) -> None:
    release = asyncio.Event()
    big = os.urandom(40_000)  # over the engine's 16 KiB large-write threshold

    async def app(scope: Any, proto: Any) -> None:
        if scope.path != "/stream":
            proto.response_bytes(200, [], b"after")
            return
        stream = proto.response_stream(200, [("content-type", "text/event-stream")])
        await stream.send_bytes(b"first")
        await stream.send_bytes(b"")  # nothing written: an empty chunk would end the stream
        await stream.send_str("second")
        await stream.send_bytes(big)
        await release.wait()

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", "/stream"))
        head = await client.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\ntransfer-encoding: chunked\r\n" in head
        assert b"content-length" not in head.lower()
        assert b"content-type: text/event-stream\r\n" in head
        assert b"\r\ndate: " in head
        expected = b"5\r\nfirst\r\n6\r\nsecond\r\n" + b"%x\r\n" % len(big) + big + b"\r\n"
        assert await client.read_exact(len(expected)) == expected
        await client.assert_quiet()  # no terminating chunk while the application runs
        release.set()
        assert await client.read_exact(5) == b"0\r\n\r\n"
        # The connection is kept alive after the stream.
        response = await client.request(http("GET", "/next"))
        assert response.body == b"after"


@on_uvloop
async def test_chunk_sizes_are_framed_in_hex(wire: ModuleType) -> None:
    # One to five hex digits, up to the 16 KiB large-write threshold (framed in one buffer) and over it.
    sizes = [1, 9, 10, 15, 16, 255, 256, 4095, 4096, 16 * 1024, 16 * 1024 + 1, 70_000]
    payloads = [bytes([65 + i % 26]) * size for i, size in enumerate(sizes)]

    async def app(scope: Any, proto: Any) -> None:
        stream = proto.response_stream(200, [])
        for payload in payloads:
            await stream.send_bytes(payload)

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", "/"))
        await client.read_until(b"\r\n\r\n")
        expected = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"
        assert await client.read_exact(len(expected)) == expected


@on_uvloop
async def test_head_request_to_a_stream_sends_no_body(wire: ModuleType) -> None:
    async def app(scope: Any, proto: Any) -> None:
        stream = proto.response_stream(200, [("content-type", "text/plain")])
        await stream.send_bytes(b"not for HEAD")

    async with serving(wire, app) as served:
        client = await served.connect()
        response = await client.request(http("HEAD", "/"), method="HEAD")
        assert response.header("transfer-encoding") == "chunked"
        await client.assert_quiet()


@on_uvloop
async def test_app_returning_without_response_gets_500(wire: ModuleType) -> None:
    async def app(scope: Any, proto: Any) -> None:
        await proto()

    async with serving(wire, app) as served:
        client = await served.connect()
        for _ in range(2):  # the connection stays usable
            response = await client.request(http("POST", "/", body=b"{}"))
            error = assert_openai_error(response, 500, "server_error", "internal_error")
            assert error["message"] == "the application sent no response"
            assert response.header("connection") is None


@on_uvloop
async def test_app_raising_gets_500_and_server_keeps_serving(wire: ModuleType, caplog: Any) -> None:
    async def app(scope: Any, proto: Any) -> None:
        if scope.path == "/boom":
            raise RuntimeError("kaboom")
        proto.response_bytes(200, [], b"fine")

    async with serving(wire, app) as served:
        client = await served.connect()
        response = await client.request(http("GET", "/boom"))
        assert_openai_error(response, 500, "server_error", "internal_error")
        assert (await client.request(http("GET", "/ok"))).body == b"fine"  # same connection
        other = await served.connect()
        assert (await other.request(http("GET", "/ok"))).body == b"fine"
    errors = [r for r in caplog.records if r.name == "shardon.httpd" and "application error" in r.getMessage()]
    assert len(errors) == 1
    assert "GET /boom" in errors[0].getMessage()
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], RuntimeError)


async def _bad_header_app(scope: Any, proto: Any, refused: list[str]) -> None:
    bad = [("x-bad", "a\r\nx-injected: 1")]
    try:
        if scope.path == "/bytes":
            proto.response_bytes(200, bad, b"body")
        else:
            proto.response_stream(200, bad)
    except ValueError:
        refused.append(scope.path)


@pytest.mark.parametrize("path", ["/bytes", "/stream"])
@on_uvloop
async def test_line_break_in_a_response_header_is_refused(wire: ModuleType, path: str) -> None:
    refused: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        await _bad_header_app(scope, proto, refused)

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", path))
        await until(lambda: refused)
        with contextlib.suppress(TimeoutError):
            while await client._recv(timeout=0.1):
                pass
        assert b"x-injected" not in client.buffer  # no response splitting
        assert refused == [path]


@pytest.mark.parametrize("path", ["/bytes", "/stream"])
@on_uvloop
async def test_line_break_in_a_response_header_gets_500(wire: ModuleType, path: str) -> None:
    refused: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        await _bad_header_app(scope, proto, refused)

    async with serving(wire, app) as served:
        client = await served.connect()
        response = await asyncio.wait_for(client.request(http("GET", path)), 0.5)
        assert_openai_error(response, 500, "server_error", "internal_error")


# ---------------------------------------------------------------------------------------------- the client leaving


@on_uvloop
async def test_client_disconnect_and_send_after_it(wire: ModuleType) -> None:
    events: list[str] = []
    done = asyncio.Event()

    async def app(scope: Any, proto: Any) -> None:
        stream = proto.response_stream(200, [])
        await stream.send_bytes(b"hello")
        waiter = proto.client_disconnect()
        assert not waiter.done()
        await waiter
        events.append("disconnected")
        if proto.client_disconnect().done():  # asked again after the fact: already done
            events.append("done again")
        try:
            await stream.send_bytes(b"more")
        except ProtocolClosed:
            events.append("ProtocolClosed")
        done.set()

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("GET", "/"))
        await client.read_until(b"\r\n\r\n")
        assert await client.read_exact(10) == b"5\r\nhello\r\n"
        await served.accepted(1)
        client.close()
        await asyncio.wait_for(done.wait(), READ_TIMEOUT)
        assert events == ["disconnected", "done again", "ProtocolClosed"]
        await served.accepted(0)


@on_uvloop
async def test_client_leaving_while_the_body_is_read(wire: ModuleType) -> None:
    outcome: list[str] = []
    reading: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        reading.append(scope.path)
        try:
            await proto()
        except ProtocolClosed:
            outcome.append("ProtocolClosed")
        else:
            outcome.append("body")

    async with serving(wire, app) as served:
        client = await served.connect()
        await client.send(http("POST", "/", headers=[("Content-Length", "100")]) + b"0123456789")
        await served.accepted(1)
        await until(lambda: reading)  # the application waits for the rest of the body
        client.close()
        await until(lambda: outcome)
        assert outcome == ["ProtocolClosed"]


@on_uvloop
async def test_slow_reader_makes_the_stream_wait(wire: ModuleType) -> None:
    chunk = os.urandom(64 * 1024)
    count = 256  # 16 MiB: far more than the sockets' buffers hold
    progress = {"sent": 0, "most_buffered": 0}
    finished = asyncio.Event()

    async def app(scope: Any, proto: Any) -> None:
        transport = proto.conn.transport
        stream = proto.response_stream(200, [("content-type", "application/octet-stream")])
        for _ in range(count):
            await stream.send_bytes(chunk)
            progress["sent"] += 1
            progress["most_buffered"] = max(progress["most_buffered"], transport.get_write_buffer_size())
        finished.set()

    async with serving(wire, app) as served:
        client = await served.connect(rcvbuf=32 * 1024)
        await client.send(http("GET", "/download"))
        # The client reads nothing: the writes pause and the application stops making progress.
        await served.accepted(1)
        (conn,) = served.server.connections
        last, still_since = -1, time.monotonic()
        deadline = still_since + READ_TIMEOUT
        while not conn.write_paused or time.monotonic() - still_since < 0.2:
            assert time.monotonic() < deadline, f"writes never paused and stalled: {progress}"
            await asyncio.sleep(0.02)
            if progress["sent"] != last:
                last, still_since = progress["sent"], time.monotonic()
        assert progress["sent"] < count // 2, progress
        assert conn.transport.get_write_buffer_size() <= 4 * len(chunk)
        assert not finished.is_set()
        # Once the client reads, the stream completes.
        response = await client.read_response()
        assert response.chunks is not None
        assert len(response.chunks) == count
        assert all(c == chunk for c in response.chunks)
        assert finished.is_set()
        assert progress["most_buffered"] <= 4 * len(chunk), progress


# ---------------------------------------------------------------------------------------------- drain and stop


@on_uvloop
async def test_begin_drain_closes_idle_and_finishes_in_flight(wire: ModuleType) -> None:
    release = asyncio.Event()
    held: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        if scope.path == "/hold":
            held.append(scope.path)
            await release.wait()
        proto.response_bytes(200, [], scope.path.encode())

    async with serving(wire, app) as served:
        idle = await served.connect()
        assert (await idle.request(http("GET", "/first"))).header("connection") is None
        silent = await served.connect()
        busy = await served.connect()
        await busy.send(http("GET", "/hold"))
        await until(lambda: held)
        await served.accepted(3)
        served.server.begin_drain()
        await idle.assert_closed()
        await silent.assert_closed()
        await busy.assert_quiet(0.05)  # its request finishes normally...
        release.set()
        response = await busy.read_response()
        assert response.body == b"/hold"
        assert response.header("connection") == "close"  # ...and closes the connection
        await busy.assert_closed()
        # The listener stays open while draining: a newcomer is answered, then closed.
        late = await served.connect()
        response = await late.request(http("GET", "/late"))
        assert (response.body, response.header("connection")) == (b"/late", "close")
        await late.assert_closed()


@on_uvloop
async def test_a_closed_connection_is_freed_without_the_cycle_collector(wire: ModuleType) -> None:
    # Under a churn of short connections, objects left in reference cycles wait for the collector's
    # rare full passes, holding their transports: megabytes of RSS at 500 streams. Freed by
    # reference counting alone, none is left once the clients are gone.
    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(200, [], b"ok")

    def alive() -> int:
        return sum(1 for obj in gc.get_objects() if type(obj) is wire.HTTPConnection)

    gc.collect()
    gc.disable()
    try:
        async with serving(wire, app) as served:
            before = alive()
            for _ in range(20):
                client = await served.connect()
                assert (await client.request(http("GET", "/", headers=[("Connection", "close")]))).body == b"ok"
                await client.assert_closed()
                client.close()
            await served.accepted(0)
            await until(lambda: alive() == before)  # after the transports' close callbacks; a leak times out
    finally:
        gc.enable()


@on_uvloop
async def test_stop_closes_everything_and_serve_returns(wire: ModuleType) -> None:
    lost: list[str] = []
    holding: list[str] = []

    async def app(scope: Any, proto: Any) -> None:
        if scope.path == "/hold":
            holding.append(scope.path)
            await proto.client_disconnect()
            lost.append(scope.path)
            return
        proto.response_bytes(200, [], b"ok")

    server = NativeServer(app, "127.0.0.1", 0, connection_class=wire.HTTPConnection)
    serving_task = asyncio.create_task(server.serve())
    await until(lambda: server.port)
    served = Served(server)
    try:
        idle = await served.connect()
        assert (await idle.request(http("GET", "/"))).body == b"ok"
        busy = await served.connect()
        await busy.send(http("GET", "/hold"))
        await served.accepted(2)
        await until(lambda: holding)  # the request is in the application
        server.stop()
        await asyncio.wait_for(serving_task, READ_TIMEOUT)
        await idle.assert_closed()
        await busy.assert_closed()
        await until(lambda: lost == ["/hold"])
        await served.accepted(0)
        with pytest.raises(ConnectionRefusedError):
            await served.connect()
    finally:
        for client in served.clients:
            client.close()
        server.stop()
        if not serving_task.done():
            serving_task.cancel()


@on_uvloop
async def test_stop_closes_a_client_accepted_in_its_own_pass(wire: ModuleType) -> None:
    """The client is taken from the kernel's queue in the pass that stops the server: its
    connection_made is still queued when the stop closes what it holds; it is closed all the same."""

    async def app(scope: Any, proto: Any) -> None:
        proto.response_bytes(200, [], b"ok")

    server = NativeServer(app, "127.0.0.1", 0, connection_class=wire.HTTPConnection)
    await server.start()
    served = Served(server)
    loop = asyncio.get_running_loop()
    listener = server._listeners[0]
    loop.remove_reader(listener._fd)  # the client waits in the kernel's queue until taken below
    try:
        client = await served.connect()
        listener._accept()
        assert not server.connections
        server.stop()
        await client.assert_closed()
        await served.accepted(0)
    finally:
        for each in served.clients:
            each.close()
        server.stop()
