"""The mock node over TLS: an ``https://`` node for the tests of Shardon's HTTPS upstreams.

`TLSMockNode` serves the mock node's protocol through asyncio's TLS server with the given
``ssl.SSLContext`` (its certificate and key); `TLSMockNodeThread` runs one in a thread.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from .config import MockConfig
from .node import MockNode
from .protocol import Conn
from .thread import MockNodeThread

__all__ = ["TLSMockNode", "TLSMockNodeThread"]


class TLSMockNode(MockNode):
    """A mock node whose connections are TLS; ``server_name`` is the host its ``url`` names."""

    def __init__(self, config: MockConfig | None, context: ssl.SSLContext, server_name: str = "localhost") -> None:
        super().__init__(config)
        self.context = context
        self.server_name = server_name

    @property
    def url(self) -> str:
        return f"https://{self.server_name}:{self.port}"

    async def _listen(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[list[Any], int]:
        server = await loop.create_server(lambda: Conn(self), host, port, ssl=self.context, backlog=256)
        return [server], server.sockets[0].getsockname()[1]


class TLSMockNodeThread(MockNodeThread):
    """`MockNodeThread` for a `TLSMockNode`."""

    def __init__(self, config: MockConfig | None, context: ssl.SSLContext, server_name: str = "localhost") -> None:
        super().__init__(config)
        self.node = TLSMockNode(config, context, server_name)
