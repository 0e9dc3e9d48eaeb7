"""The RSGI contract the gateway is written against, whichever engine hosts it.

These are structural types (what `app.py` and `admin.py` call), met by granian's ``rsgi`` objects
and by the native engine's (`shardon.httpd.rsgi`). `closed_errors` is what a stream write raises
once the client has gone: the native engine's `ProtocolClosed`, plus granian's once that engine is
in use (registered by it, so granian is not imported when it is not used).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from .errors import ProtocolClosed

__all__ = ["HTTPProtocol", "Headers", "Scope", "StreamTransport", "closed_errors", "register_closed_error"]


class Headers(Protocol):
    def get(self, key: str, default: str | None = None) -> str | None: ...


class Scope(Protocol):
    @property
    def proto(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query_string(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def headers(self) -> Headers: ...


class StreamTransport(Protocol):
    async def send_bytes(self, data: bytes) -> None: ...
    async def send_str(self, data: str) -> None: ...


class HTTPProtocol(Protocol):
    def __call__(self) -> Awaitable[bytes]: ...
    def client_disconnect(self) -> Awaitable[None]: ...
    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None: ...
    def response_str(self, status: int, headers: list[tuple[str, str]], body: str) -> None: ...
    def response_empty(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    def response_stream(self, status: int, headers: list[tuple[str, str]]) -> StreamTransport: ...


closed_errors: tuple[type[Exception], ...] = (ProtocolClosed,)


def register_closed_error(error: type[Exception]) -> None:
    """Add an engine's "client connection closed" exception to `closed_errors`."""
    global closed_errors
    if error not in closed_errors:
        closed_errors = (*closed_errors, error)
