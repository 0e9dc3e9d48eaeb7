"""Helpers for tests that drive sockets on a uvloop loop of their own (no pytest-asyncio).

``on_uvloop(timeout)`` turns an ``async def`` test into a plain one that runs it on a fresh uvloop
within ``timeout`` seconds (a hung scenario fails, it never stalls the suite); `until` polls a
condition on the loop, the async twin of ``tests.conftest.wait_until``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop


def on_uvloop(timeout: float) -> Callable[[Callable[..., Awaitable[None]]], Callable[..., None]]:
    def decorate(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
        @functools.wraps(fn)
        def test(*args: Any, **kwargs: Any) -> None:
            async def bounded() -> None:
                async with asyncio.timeout(timeout):
                    await fn(*args, **kwargs)

            uvloop.run(bounded())

        return test

    return decorate


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``predicate`` on the running loop until it is truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)
    return value
