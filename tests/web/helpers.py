"""HTTP helpers of the dashboard tests: plain requests with cookies, and signing in."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

ADMIN = "sk-admin-ui"
TEAM_KEY = "sk-team-ui"
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    cookies: list[str] = field(default_factory=list)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        cookies = [v for k, v in resp.getheaders() if k.lower() == "set-cookie"]
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, cookies, raw)
    finally:
        conn.close()


def sign_in(url: str, key: str | None = ADMIN) -> Response:
    form = urlencode({"key": key}).encode() if key is not None else b""
    return request(url, "POST", "/ui/login", form, {"content-type": "application/x-www-form-urlencoded"})


class Session:
    """A signed-in dashboard client: its cookie and CSRF token."""

    def __init__(self, url: str, key: str | None = ADMIN) -> None:
        self.url = url
        resp = sign_in(url, key)
        assert resp.status == 303, (resp.status, resp.body)
        self.cookie = resp.cookies[0].split(";", 1)[0]
        info = self.get("/ui/session")
        assert info.status == 200, info.body
        self.csrf: str = info.json()["csrf"]

    def get(self, path: str) -> Response:
        return request(self.url, "GET", path, headers={"cookie": self.cookie})

    def call(self, method: str, path: str, body: Any = None, *, csrf: bool = True) -> Response:
        headers = {"cookie": self.cookie}
        if csrf:
            headers["x-shardon-csrf"] = self.csrf
        return request(self.url, method, path, body, headers)


def chat(url: str, key: str | None = None, **fields: Any) -> Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return request(url, "POST", "/v1/chat/completions", {**CHAT, **fields}, headers)


def admin(url: str, path: str, method: str = "GET", body: Any = None) -> Response:
    return request(url, method, path, body, {"authorization": f"Bearer {ADMIN}"})
