"""The error tree: each error knows its HTTP status and its OpenAI error type and code.

Every error a client can see is raised as a subclass of :class:`ShardonError` and rendered once, at
the exchange's error edge (`shardon.exchange`), into OpenAI's shape::

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import logging

import orjson

log = logging.getLogger("shardon.exchange")


class ShardonError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> list[tuple[str, str]]:
        headers = [("content-type", "application/json")]
        if self.retry_after is not None:
            headers.append(("retry-after", str(max(1, int(self.retry_after + 0.999)))))
        return headers


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class ProtocolClosed(ConnectionError):
    """The client's connection is gone: nothing more can be sent on this request (native engine).

    Not a `ShardonError`: nobody is left to answer. The gateway logs the request as 499.
    """


# What a write to a client that has gone raises: the native engine's `ProtocolClosed`, plus
# granian's once that engine is in use (it registers its own, so it is not imported otherwise).
closed_errors: tuple[type[BaseException], ...] = (ProtocolClosed,)


def register_closed_error(error: type[BaseException]) -> None:
    """Add an engine's "client connection closed" exception to `closed_errors`."""
    global closed_errors
    if error not in closed_errors:
        closed_errors = (*closed_errors, error)


class BadRequest(ShardonError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(ShardonError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(ShardonError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(ShardonError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ShardonError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ShardonError):
    """The thing exists already, or its state forbids the change (a duplicate node id)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ShardonError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ShardonError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    kind = "requests"  # the limit hit: "requests" or "tokens" (per minute)


class QueueFull(ShardonError):
    status = 503
    type = "server_error"
    code = "queue_full"


class NoCapacity(ShardonError):
    """No healthy node can serve the model (or a model could not be loaded)."""

    status = 503
    type = "server_error"
    code = "no_capacity"


class Draining(ShardonError):
    status = 503
    type = "server_error"
    code = "shutting_down"

    def __init__(self, message: str = "the gateway is shutting down", *, retry_after: float | None = 5) -> None:
        super().__init__(message, retry_after=retry_after)


class UpstreamFailed(ShardonError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class QueueTimeout(ShardonError):
    status = 504
    type = "server_error"
    code = "queue_timeout"


class ClientGone(Exception):
    """The client disconnected; nothing can be sent to it any more (logged as 499)."""


Answer = tuple[int, list[tuple[str, str]], bytes]


def answer(exc: BaseException, request_id: str, started: bool, gone: bool) -> tuple[int, str | None, Answer | None]:
    """The error edge of a request: what ``exc`` means for it — (status, error type, the answer to
    send: status, headers, OpenAI-shaped body; None once the response has started or the client is
    gone). A client that left is a 499; an exception no `ShardonError` is a bug, logged, a 500."""
    if isinstance(exc, ShardonError):
        if started or gone:
            return exc.status, exc.code, None
        headers = exc.headers()
        headers.append(("x-request-id", request_id))
        return exc.status, exc.code, (exc.status, headers, exc.body())
    if isinstance(exc, (ClientGone, *closed_errors)) or gone:
        return 499, "client_disconnected", None
    log.error("request %s failed", request_id, exc_info=exc)
    if started:
        return 500, "internal_error", None
    internal = ShardonError(f"internal error: {type(exc).__name__}")
    headers = internal.headers()
    headers.append(("x-request-id", request_id))
    return 500, "internal_error", (500, headers, internal.body())


class ConfigError(Exception):
    """A configuration problem; the message names the offending field."""
