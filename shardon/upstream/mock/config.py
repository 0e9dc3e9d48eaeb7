"""What a mock node is told (`MockConfig`) and what it counts (`MockStats`)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["FAIL_MODES", "FailMode", "MockConfig", "MockStats"]

FailMode = Literal["before", "mid", "status500", "status503", "hang"]
FAIL_MODES: tuple[str, ...] = ("before", "mid", "status500", "status503", "hang")


class MockConfig(msgspec.Struct, kw_only=True):
    """How a mock node behaves. ``chunks``/``delay_ms``/``ttft_ms``/``max_concurrent``/
    ``require_api_key`` are read per request (they may be changed on a running node);
    ``models``, ``name`` and ``embedding_dim`` are encoded when the node is built."""

    models: list[str] = msgspec.field(default_factory=lambda: ["mock-model"])
    chunks: int = 16
    delay_ms: float = 0.0
    ttft_ms: float = 0.0
    max_concurrent: int | None = None
    embedding_dim: int = 8
    name: str = "mock"
    require_api_key: str | None = None


class MockStats:
    """What reached the node. Control requests (``/mock/...``) are not counted.

    - ``total_requests``: every other request parsed.
    - ``completed``: 2xx responses sent in full.  ``errors``: error responses sent (4xx/5xx, incl.
      injected status500/503 and ``rejected``).  ``rejected``: 503s because of ``max_concurrent``.
    - ``aborted``: connections the node dropped on purpose (fail ``before``/``mid``).
    - ``cancelled``: the client closed the connection before its response was finished.
    - ``in_flight``/``max_in_flight``: generations (chat, completions, embeddings) running / high-water.
    """

    __slots__ = (
        "_last_headers_raw",
        "aborted",
        "cancelled",
        "completed",
        "connections_open",
        "errors",
        "in_flight",
        "last_body",
        "max_in_flight",
        "per_path_raw",
        "rejected",
        "total_requests",
    )

    def __init__(self) -> None:
        self.in_flight = 0
        self.connections_open = 0
        self.reset()

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` and ``connections_open`` describe live state and stay."""
        self.max_in_flight = self.in_flight
        self.total_requests = 0
        self.completed = 0
        self.cancelled = 0
        self.errors = 0
        self.rejected = 0
        self.aborted = 0
        self.per_path_raw: dict[bytes, int] = {}
        self._last_headers_raw: list[tuple[bytes, bytes]] = []
        self.last_body = b""

    @property
    def per_path(self) -> dict[str, int]:
        return {k.decode("latin-1"): v for k, v in list(self.per_path_raw.items())}

    @property
    def last_headers(self) -> dict[str, str]:
        """Headers of the last counted request (a probe of /health, /metrics or /slots aside), names
        lower-cased (a repeated name keeps the last)."""
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self._last_headers_raw}

    def as_dict(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "total_requests": self.total_requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "errors": self.errors,
            "rejected": self.rejected,
            "aborted": self.aborted,
            "connections_open": self.connections_open,
            "per_path": self.per_path,
            "last_headers": self.last_headers,
            "last_body": self.last_body.decode("utf-8", "replace"),
        }

    def __repr__(self) -> str:
        return f"MockStats({self.as_dict()!r})"
