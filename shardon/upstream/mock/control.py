"""How a test steers a mock node: the gate that holds requests until released, and the control
endpoints (``/mock/...``), which are never counted in the node's stats.

The gate replaces fixed delays in tests: a request held at it stays in flight on the node (it
counts in ``stats.in_flight``, its connection is open) until the test releases it, so "while this
request runs" is a state the test reaches and leaves when it says, not a guess in milliseconds.
A generation is held when its body's ``"mock"`` object asks (``"hold": true`` before its answer;
``"hold_after": k`` after k tokens of a stream, or the head and k bytes of a whole answer), or, the
gate closed, every one before its answer; the gate opened, none.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import orjson

from .config import FailMode
from .protocol import BAD_JSON, Conn, error_body

if TYPE_CHECKING:
    from .node import MockNode

__all__ = ["Gate", "control"]


class Gate:
    """Requests held until released, oldest first. At first the gate holds the requests that ask;
    ``close()`` holds every generation from now on; ``open()`` holds none from now on (not even
    those that ask) and releases all; ``release(n)`` lets the ``n`` oldest held go on. A held
    request whose client left is dropped (and counted cancelled, as any)."""

    __slots__ = ("_held", "state")

    def __init__(self) -> None:
        self.state: Literal["asked", "closed", "open"] = "asked"
        self._held: deque[tuple[Conn, bytes, Callable[[], None]]] = deque()

    def stops(self, asked: bool | None) -> bool:
        """Whether a request that asked (or not) to be held is held."""
        state = self.state
        return state == "closed" or (bool(asked) and state == "asked")

    def hold(self, conn: Conn, body: bytes, resume: Callable[[], None]) -> None:
        """Hold the request on ``conn`` (its ``body``, for `bodies`); ``resume`` goes on with it."""
        conn.busy = True
        self._held.append((conn, body, resume))

    def _live(self) -> deque[tuple[Conn, bytes, Callable[[], None]]]:
        held = self._held
        if any(conn.transport is None for conn, _, _ in held):
            self._held = held = deque(entry for entry in held if entry[0].transport is not None)
        return held

    @property
    def waiting(self) -> int:
        """How many requests are held now."""
        return len(self._live())

    @property
    def bodies(self) -> list[bytes]:
        """The bodies of the requests held now, oldest first."""
        return [body for _, body, _ in self._live()]

    def release(self, n: int | None = None) -> int:
        """Let the ``n`` oldest held requests go on (all when None); how many went."""
        held = self._live()
        count = len(held) if n is None else min(n, len(held))
        for _ in range(count):
            _, _, resume = held.popleft()
            resume()  # (may hold again: a stream's "hold_after", appended behind the rest)
        return count

    def close(self) -> None:
        self.state = "closed"

    def open(self) -> int:
        """Hold nothing more; release everything held. How many went."""
        self.state = "open"
        return self.release()

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "waiting": self.waiting}


class _FailReq(msgspec.Struct, kw_only=True):
    mode: FailMode | None = None


class _GateReq(msgspec.Struct, kw_only=True):
    action: Literal["close", "open", "release"]
    n: int | None = None


_fail_decoder = msgspec.json.Decoder(_FailReq)
_gate_decoder = msgspec.json.Decoder(_GateReq)


def control(node: MockNode, conn: Conn, method: bytes, path: bytes, body: bytes, keep: bool) -> None:
    """``GET /mock/stats``, ``POST /mock/reset``, ``POST /mock/fail {"mode"}``,
    ``POST /mock/gate {"action": "close" | "open" | "release", "n"}``."""
    transport = conn.transport
    assert transport is not None
    status = 200
    out: Any
    try:
        if path == b"/mock/stats" and method == b"GET":
            out = node.stats.as_dict() | {"fail": node.fail_mode, "name": node.config.name, "gate": node.gate.as_dict()}
        elif path == b"/mock/reset" and method == b"POST":
            node.stats.reset()
            out = node.stats.as_dict()
        elif path == b"/mock/fail" and method == b"POST":
            node.set_fail(_fail_decoder.decode(body or b"{}").mode)
            out = {"fail": node.fail_mode}
        elif path == b"/mock/gate" and method == b"POST":
            req = _gate_decoder.decode(body)
            gate = node.gate
            if req.action == "close":
                gate.close()
            elif req.action == "open":
                gate.open()
            else:
                gate.release(req.n)
            out = gate.as_dict()
        else:
            status = 404
            out = None
    except msgspec.DecodeError as exc:
        status = 400
        data = error_body(BAD_JSON.format(exc), "invalid_request_error")
    else:
        if status == 404:
            msg = f"Invalid URL ({method.decode('latin-1')} {path.decode('latin-1')})"
            data = error_body(msg, "invalid_request_error")
        else:
            data = orjson.dumps(out)
    transport.write(node._encode(status, data, keep))
    if not keep:
        transport.close()
