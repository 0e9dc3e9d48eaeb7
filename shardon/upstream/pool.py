"""Keep-alive HTTP/1.1 connections to the nodes, parsed with httptools.

One `NodePool` per node holds idle connections (LIFO, so the warmest is reused first); an
`UpstreamConnection` carries one request at a time. Both live in ``shardon._fast`` (compiled, with a
pure-Python twin; ``_wire_py.py`` documents them): bytes from the node are fed to httptools as they
arrive and the de-chunked body is handed to the caller, who awaits ``wait()`` (or sets a listener,
the callback path) and drains it with ``take()``. When the caller falls behind, reading from the
node pauses at a high-water mark and resumes once drained (the flow control of uvicorn's
``flow_control.py``), so a slow client cannot make Shardon buffer a whole generation.

Timeouts cost nothing per request: the `Sweeper` wakes once per ``_SWEEP_S`` and fails any
connection that has waited on its node longer than the read timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from .._fast.wire import NodePool, UpstreamConnection, client_headers

__all__ = ["NodePool", "Sweeper", "UpstreamConnection", "client_headers"]

_SWEEP_S = 0.5


class Sweeper:
    """Fails connections that waited on their node longer than the read timeout."""

    def __init__(self, pools: list[NodePool], read_timeout: float) -> None:
        self.pools = pools
        self.read_timeout = read_timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for pool in self.pools:
                pool.sweep(now, self.read_timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
