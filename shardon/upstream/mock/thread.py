"""`MockNodeThread`: a mock node on its own event loop in a daemon thread, for synchronous tests
and benchmarks; its `gate` is steered from the test's thread."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .config import MockConfig, MockStats
from .node import MockNode

try:
    import uvloop as _uvloop_mod

    _uvloop: Any = _uvloop_mod
except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
    _uvloop = None

__all__ = ["GateHandle", "MockNodeThread", "new_event_loop"]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default asyncio loop."""
    if _uvloop is not None:
        loop: asyncio.AbstractEventLoop = _uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


class MockNodeThread:
    """A mock node on its own event loop in a daemon thread, for synchronous tests.

    ``t = MockNodeThread(cfg); t.start()`` (returns once bound), ``t.url``, ``t.stats``,
    ``t.set_fail(mode)``, ``t.gate`` (`GateHandle`), ``t.stop()``; also a context manager.
    """

    def __init__(self, config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.node = MockNode(config)
        self._host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.gate = GateHandle(self)

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def stats(self) -> MockStats:
        return self.node.stats

    @property
    def config(self) -> MockConfig:
        return self.node.config

    def start(self, timeout: float = 10.0) -> MockNodeThread:
        if self._thread is not None:
            raise RuntimeError("already started")
        name = f"mock-node-{self.node.config.name}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("mock node did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError("mock node failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        await self.node.start(self._host, self._port)
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.node.stop()

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Run ``fn`` on the node's loop and return its result."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            return fn()

        async def runner() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(runner(), loop).result(timeout)

    def set_fail(self, mode: str | None) -> None:
        self.call(lambda: self.node.set_fail(mode))

    def reset_stats(self) -> None:
        self.call(self.node.reset_stats)

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, ev = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and ev is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(ev.set)
        thread.join(timeout)
        if thread.is_alive():
            frame = sys._current_frames().get(thread.ident or 0)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
            raise RuntimeError(f"mock node thread did not stop in {timeout:g} s; it is at:\n{where}")
        self._thread = None

    def __enter__(self) -> MockNodeThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GateHandle:
    """The node's `Gate`, from another thread: each call runs on the node's loop."""

    def __init__(self, node: MockNodeThread) -> None:
        self._node = node

    def close(self) -> None:
        self._node.call(self._node.node.gate.close)

    def open(self) -> int:
        return int(self._node.call(self._node.node.gate.open))

    def release(self, n: int | None = None) -> int:
        return int(self._node.call(lambda: self._node.node.gate.release(n)))

    @property
    def state(self) -> str:
        return str(self._node.call(lambda: self._node.node.gate.state))

    @property
    def waiting(self) -> int:
        return int(self._node.call(lambda: self._node.node.gate.waiting))

    @property
    def bodies(self) -> list[bytes]:
        return list(self._node.call(lambda: self._node.node.gate.bodies))
