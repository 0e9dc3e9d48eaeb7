"""What the tests share across folders: waits, free ports, HTTP calls, the gateway in a thread,
``shardon serve`` in a process, a command in a pseudo-terminal, the twins.

The fixtures built on these are in tests/conftest.py. Helpers of one folder stay in it
(tests/store/store_helpers.py, tests/lifecycle/helpers.py, tests/web/helpers.py, tests/_fast/fast_impls.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import http.client
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

# == the twins =======================================================================================

# Whether this whole run is on the pure-Python twins.
FORCED = os.environ.get("SHARDON_NO_EXTENSIONS", "").strip().lower() in ("1", "true", "yes")
# The implementations of a twin pair: compiled and Python (the `implementation` fixture's values).
TWINS = ("c", "py")


def twin(stem: str, name: str) -> ModuleType:
    """``<module>_py`` for ``name == "py"``, else the compiled ``<module>_c``; ``stem`` is the module
    without its suffix (``shardon.httpd._connection``), or a ``shardon._fast`` primitive's (``sse``).
    A compiled module that is not built skips the test, saying why; the "compiled ... loaded" tests
    (tests/test_twins.py, tests/_fast/test_fast_selector.py) are where a missing build fails."""
    module = stem if "." in stem else f"shardon._fast._{stem}"
    if name == "py":
        return importlib.import_module(f"{module}_py")
    try:
        return importlib.import_module(f"{module}_c")
    except ImportError as exc:
        pytest.skip(f"compiled {module}_c not built (pip install --no-deps -e .): {exc}")


# == waiting =========================================================================================


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """`wait_until` on the running event loop."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return value


def on_uvloop(timeout: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    """Turn an ``async def`` test into a plain one that runs it on a fresh uvloop within ``timeout``
    seconds (a hung scenario fails, it never stalls the suite)."""

    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def test(*args: Any, **kwargs: Any) -> None:
            import uvloop

            async def bounded() -> None:
                async with asyncio.timeout(timeout):
                    await fn(*args, **kwargs)

            uvloop.run(bounded())

        return test

    return decorate


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# == HTTP ============================================================================================

Reply = tuple[int, dict[str, str], bytes]


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return host, int(port)


def send(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    """One request on a new connection: (status, lower-cased headers, body). A ``body`` that is not
    bytes is sent as JSON."""
    conn = http.client.HTTPConnection(*_address(url), timeout=30)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return send(url, "POST", path, body, headers)


def get(url: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    return send(url, "GET", path, None, headers)


def call(url: str, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    """An admin-style call: (status, headers, the JSON body or None); ``key`` as a bearer token."""
    status, headers, raw = send(url, method, path, body, {"Authorization": f"Bearer {key}"} if key else None)
    return status, headers, json.loads(raw) if raw else None


def rows(url: str, query: str = "", key: str | None = None) -> dict[str, Any]:
    """``GET /admin/requests?query``: {"total", "data"} (the request log, flushed first)."""
    status, _, body = call(url, "GET", "/admin/requests?" + query, key=key)
    assert status == 200, body
    return dict(body)


def one_row(url: str, request_id: str, key: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """The request log's row of ``request_id`` (waited for)."""

    def fetch() -> Any:
        status, _, body = call(url, "GET", f"/admin/requests/{request_id}", key=key)
        return body if status == 200 else None

    return dict(wait_until(fetch, timeout=timeout))


def raw_request(port: int, body: bytes, headers: bytes = b"", path: str = "/v1/completions") -> socket.socket:
    """A POST written whole on a raw socket, its answer left unread (for tests that hang up, or
    read it as it comes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" % path.encode()
        + headers
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return sock


def read_until(sock: socket.socket, done: Callable[[bytes], bool], timeout: float = 10.0) -> bytes:
    """Read ``sock`` until ``done(what was read)`` or it closes; what was read."""
    got = b""
    deadline = time.monotonic() + timeout
    while not done(got):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        got += data
    return got


class _Stream:
    """One buffered reader of a socket for several `http.client.HTTPResponse` in a row."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def read(self, *args: Any) -> bytes:
        return bytes(self.file.read(*args))

    def readline(self, *args: Any) -> bytes:
        return bytes(self.file.readline(*args))

    def readinto(self, buffer: Any) -> int:
        return int(self.file.readinto(buffer))

    def peek(self, *args: Any) -> bytes:
        return bytes(self.file.peek(*args))

    def read1(self, *args: Any) -> bytes:
        return bytes(self.file.read1(*args))

    def close(self) -> None:
        pass  # each response "closes" its reader when read; the next one goes on reading


def read_responses(sock: socket.socket, count: int) -> list[Reply]:
    """Read ``count`` responses off ``sock`` in turn (pipelined or kept alive), each read whole."""
    stream = _Stream(sock)
    replies = []
    for _ in range(count):
        resp = http.client.HTTPResponse(stream)  # type: ignore[arg-type]
        resp.begin()
        replies.append((resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
    stream.file.close()
    return replies


def dechunk(raw: bytes) -> tuple[bytes, bool]:
    """The body of a chunked HTTP/1.1 response read raw (its head, if there, skipped), and whether
    it ended with the terminating chunk."""
    head_end = raw.find(b"\r\n\r\n")
    data = raw[head_end + 4 :] if raw.startswith(b"HTTP/") else raw
    body = b""
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return body, False
        size = int(data[:line_end].split(b";")[0], 16)
        if size == 0:
            return body, data[line_end + 2 : line_end + 4] == b"\r\n"
        body += data[line_end + 2 : line_end + 2 + size]
        data = data[line_end + 4 + size :]


def events(stream: bytes) -> list[bytes]:
    """The ``data:`` events of an SSE body."""
    return [e for e in stream.split(b"\n\n") if e.startswith(b"data: ")]


# == the mock node's gate ============================================================================


_POOL = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="test-client")


def in_background(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """``fn(*args)`` in a thread of the tests' client pool: its future."""
    return _POOL.submit(fn, *args)


def hold(node: Any, url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """POST a completion that ``node`` holds (``"mock": {"hold": true}``) from a client thread, and
    wait until it is held there: its future, (status, headers, body) once the gate lets it go."""
    before = node.gate.waiting
    body = body if body is not None else {"model": "m1", "prompt": "hold", "max_tokens": 1, "mock": {"hold": True}}
    future = in_background(post, url, "/v1/completions", body, headers)
    wait_until(lambda: node.gate.waiting > before or future.done())
    assert not future.done(), future.result()
    return future


def release_in_order(node: Any, count: int, timeout: float = 10.0) -> list[bytes]:
    """With the node's gate closed, let ``count`` requests through one at a time, each once it is
    the only one held: their bodies in the order they reached the node (its dispatch order, on a
    node with one slot)."""
    order = []
    for _ in range(count):
        wait_until(lambda: node.gate.waiting == 1, timeout)
        order.append(node.gate.bodies[0])
        node.gate.release(1)
    return order


# == the gateway in a thread =========================================================================

# The request paths every end-to-end test runs on: the native engine serving whole requests from
# its callbacks, the same engine with `server.callbacks: false` (the RSGI coroutine, shardon/rsgi.py),
# and granian (the coroutine). SHARDON_TEST_ENGINES narrows them.
PATHS = ("native", "native-coroutine", "granian")


def path_server(path: str) -> dict[str, Any]:
    """The ``server`` settings that select a request path."""
    return {"engine": "granian" if path == "granian" else "native", "callbacks": path == "native"}


class GatewayThread:
    """``shardon.server.run`` on a uvloop in a daemon thread, bound to a free loopback port.

    Counts the exchanges it finished and those its callbacks served (`served`), so a test can
    tell which path served them."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.gateway: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.exit_code: int | None = None
        self.finished = 0  # exchanges finished (their records handed to the request log)
        self.coroutines_expected = 0  # on the callback path: requests a test sends to the coroutine

    @property
    def port(self) -> int:
        return int(self.config.server.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> GatewayThread:
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("gateway did not start")

        def accepting() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(accepting, timeout)
        return self

    def _run(self) -> None:
        import uvloop

        from shardon.server import run

        async def main() -> int:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def started(gateway: Any) -> None:
                self.gateway = gateway
                gateway.on_finish.append(self._finished)
                self._started.set()

            return await run(self.config, stop=self._stop, started=started)

        self.exit_code = uvloop.run(main())

    def _finished(self, _record: Any) -> None:
        self.finished += 1

    def served(self) -> tuple[int, int]:
        """(exchanges served by callbacks, by the RSGI coroutine) so far."""
        callbacks = int(self.gateway.core.served_by_callbacks) if self.gateway is not None else 0
        return callbacks, self.finished - callbacks

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the gateway's loop and return its result (reads state safely)."""
        assert self.loop is not None
        done = threading.Event()
        box: list[Any] = []

        def wrapper() -> None:
            box.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(wrapper)
        if not done.wait(timeout):
            raise TimeoutError
        return box[0]

    def begin_stop(self) -> None:
        """What SIGTERM does: the gateway drains (``server.drain_timeout_s``), then stops."""
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(self._stop.set)

    def join(self, timeout: float = 30.0) -> int | None:
        """Wait for the gateway to have stopped; its exit code. Fails if it is still running."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise AssertionError(f"the gateway on port {self.port} did not stop within {timeout}s")
        return self.exit_code

    def stop(self, timeout: float = 30.0) -> int | None:
        self.begin_stop()
        return self.join(timeout)


def queued(gw: GatewayThread, model: str = "m1") -> int:
    """How many requests wait in ``model``'s queue on the gateway."""
    return int(gw.call(lambda: gw.gateway.scheduler.routes[model].waiting))


def node_entry(node: Any, node_id: str, models: Any, **extra: Any) -> dict[str, Any]:
    """A ``nodes:`` entry of the config for a mock node."""
    entry = {"id": node_id, "url": node.url, "models": models}
    entry.update(extra)
    return entry


# == shardon serve in a process ======================================================================

Start = Callable[..., tuple[subprocess.Popen[bytes], int]]


def health(port: int) -> int:
    return get(f"http://127.0.0.1:{port}", "/health")[0]


def _up(port: int) -> bool:
    try:
        return health(port) == 200
    except OSError:
        return False


@contextlib.contextmanager
def serving(tmp_path: Path) -> Iterator[Start]:
    """``start(*args, env=..., data=...)`` → (process, port): ``shardon serve`` on a free port with
    its data (request log, lifecycle state) in ``data`` (default ``tmp_path``); by default without the
    demo models and with an empty ``models_dir``, so the built-in mock serves (``env`` overrides
    that). The gateway's log is ``tmp_path/serve-N.log``. Each is stopped at the end (SIGTERM: it
    drains and stops the backends it started)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        *args: str, env: dict[str, str] | None = None, data: Path | None = None
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        log_path = tmp_path / f"serve-{len(procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shardon", "serve", "--port", str(port), *args],
                env={
                    **os.environ,
                    "XDG_DATA_HOME": str(data or tmp_path),
                    "SHARDON_DEMO": "false",
                    "SHARDON_MODELS_DIR": str(tmp_path / "no-models"),
                    **(env or {}),
                },
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        procs.append(proc)
        wait_until(lambda: _up(port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, log_path.read_text()
        return proc, port

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # drains and stops the backends it started
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            proc.wait(10)


class Terminal:
    """A command whose stdin, stdout and stderr are a pseudo-terminal; what it printed is kept, with
    the time each piece was read."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.fd = master
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True
        )
        os.close(slave)
        self.reads: list[tuple[float, bytes]] = []

    @property
    def output(self) -> bytes:
        return b"".join(data for _, data in self.reads)

    def send(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def expect(self, text: bytes, timeout: float, start: int = 0) -> int:
        """Read until ``text`` appears in the output past offset ``start``; its offset."""
        deadline = time.monotonic() + timeout
        while (at := self.output.find(text, start)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{text!r} not printed within {timeout}s; output: {self.output!r}")
        return at

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the command exited and the terminal is closed
            return False
        if data:
            self.reads.append((time.monotonic(), data))
        return bool(data)

    def wait(self, timeout: float) -> int:
        """The exit status, once the command has ended (what it printed last is read)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.05)
        while self._read(0.05):
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        os.close(self.fd)
