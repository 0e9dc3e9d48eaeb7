"""A small HTTP client of a running gateway, for the command line: JSON calls and streamed chat.

Standard library only (``http.client``), so the CLI needs no extra package. Errors in OpenAI's shape
become :class:`GatewayError` with the gateway's message.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit


class GatewayError(Exception):
    """The gateway could not be reached, or answered with an error (``status`` 0: not reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _error_message(status: int, raw: bytes) -> str:
    try:
        error = json.loads(raw)["error"]
        return f"{status} {error.get('code') or error.get('type')}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{status}: {raw.decode(errors='replace').strip()[:300]}"


class Client:
    """Calls to one gateway (``url`` as in ``http://127.0.0.1:8080``), with an optional bearer key."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise GatewayError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.api_key = api_key
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.timeout)

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str, body: Any) -> http.client.HTTPResponse:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            raise GatewayError(f"cannot reach {self.url}: {exc}") from None
        if resp.status >= 400:
            raise GatewayError(_error_message(resp.status, resp.read()), resp.status)
        return resp

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One JSON request; the decoded JSON answer."""
        conn = self._connect()
        try:
            raw = self._send(conn, method, path, body).read()
        except OSError as exc:
            raise GatewayError(f"{self.url}: {exc}") from None
        finally:
            conn.close()
        try:
            return json.loads(raw)
        except ValueError:
            raise GatewayError(f"{self.url}{path} did not answer JSON: {raw[:200]!r}") from None

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: each model's entry."""
        return list(self.call("GET", "/v1/models")["data"])

    def stream_chat(self, model: str, messages: list[dict[str, str]], **options: Any) -> Iterator[str]:
        """``POST /v1/chat/completions`` streamed: the answer's text, piece by piece as it arrives.

        Closing the iterator early (or an exception in the caller, such as Ctrl-C) closes the
        connection, which stops the generation.
        """
        conn = self._connect()
        try:
            resp = self._send(
                conn, "POST", "/v1/chat/completions", {"model": model, "messages": messages, "stream": True, **options}
            )
            for line in _sse_data(resp):
                if line == b"[DONE]":
                    return
                try:
                    event = json.loads(line)
                except ValueError:
                    raise GatewayError(f"unreadable stream event: {line[:200]!r}") from None
                if "error" in event:
                    error = event["error"]
                    raise GatewayError(str(error.get("message", error)) if isinstance(error, dict) else str(error))
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text
        except OSError as exc:
            raise GatewayError(f"{self.url}: the stream broke: {exc}") from None
        finally:
            conn.close()


def _sse_data(resp: http.client.HTTPResponse) -> Iterator[bytes]:
    """The ``data:`` fields of a server-sent event stream, one per event."""
    data: list[bytes] = []
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    if data:
        yield b"\n".join(data)
