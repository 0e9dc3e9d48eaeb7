"""The command line: ``python -m shardon.upstream.mock --port 9001 --models a,b --delay-ms 20 --name
node-a`` serves a mock node in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from .config import MockConfig
from .node import MockNode
from .thread import new_event_loop

__all__ = ["main"]

_DESCRIPTION = "Mock OpenAI-compatible inference node"


def _parse_args(argv: list[str] | None) -> tuple[MockConfig, str, int]:
    p = argparse.ArgumentParser(prog="python -m shardon.upstream.mock", description=_DESCRIPTION)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--models", default="mock-model", help="comma-separated model names")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--name", default="mock")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer <key>'")
    a = p.parse_args(argv)
    cfg = MockConfig(
        models=[m.strip() for m in a.models.split(",") if m.strip()],
        chunks=a.chunks,
        delay_ms=a.delay_ms,
        ttft_ms=a.ttft_ms,
        max_concurrent=a.max_concurrent,
        embedding_dim=a.embedding_dim,
        name=a.name,
        require_api_key=a.api_key,
    )
    return cfg, a.host, a.port


async def _serve(cfg: MockConfig, host: str, port: int) -> None:
    node = MockNode(cfg)
    await node.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    print(f"mock node {cfg.name!r} serving {','.join(cfg.models)} on {node.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await node.stop()


def main(argv: list[str] | None = None) -> int:
    cfg, host, port = _parse_args(argv)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(cfg, host, port))
    finally:
        loop.close()
    return 0
