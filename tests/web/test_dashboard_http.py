"""The dashboard's sign-in, session cookie and admin access over plain HTTP, on both engines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from shardon.web.dashboard import STATIC
from shardon.web.sessions import COOKIE, MAX_FAILURES
from tests.support import node_entry
from tests.web.helpers import ADMIN, TEAM_KEY, Session, admin, chat, request, sign_in


@pytest.fixture
def keyed(make_mock: Any, make_gateway: Any) -> Any:
    node = make_mock(models=["m1"], chunks=4, name="n")
    return make_gateway(
        nodes=[node_entry(node, "node-a", ["m1"], max_concurrent=4)],
        auth={"admin_keys": [ADMIN]},
        tenants=[{"name": "team", "keys": [{"key": TEAM_KEY, "id": "team-1"}]}],
    )


def ui_paths() -> list[str]:
    assets = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert {"index.html", "app.js", "app.css"} <= set(assets)
    return ["/ui", "/ui/", "/ui/session", "/ui/nowhere", *(f"/ui/static/{name}" for name in assets)]


def test_nothing_under_ui_answers_without_the_session_cookie(keyed: Any) -> None:
    gw = keyed
    for path in ui_paths():
        resp = request(gw.url, "GET", path)
        if path in ("/ui", "/ui/"):
            assert (resp.status, resp.headers["location"]) == (303, "/ui/login"), path
            assert resp.body == b""
        else:
            assert resp.status == 401, path
            assert resp.json()["error"]["code"] == "invalid_api_key", path
        assert "content-security-policy" in resp.headers
    # A forged or stale cookie is no better, and the pages' admin calls refuse it too.
    forged = {"cookie": f"{COOKIE}=not-a-session"}
    assert request(gw.url, "GET", "/ui/static/app.js", headers=forged).status == 401
    for path in ("/admin/overview", "/admin/stats", "/admin/keys", "/admin/status", "/admin/requests", "/admin/audit"):
        assert request(gw.url, "GET", path).status == 401, path
        assert request(gw.url, "GET", path, headers=forged).status == 401, path
    assert request(gw.url, "POST", "/ui/logout").status == 401
    # The sign-in page itself answers, with no admin data and no script.
    page = request(gw.url, "GET", "/ui/login")
    assert page.status == 200 and b"<form" in page.body and b"<script" not in page.body
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_signing_in_sets_a_strict_http_only_cookie_with_an_expiry(keyed: Any) -> None:
    gw = keyed
    resp = sign_in(gw.url)
    assert resp.status == 303 and resp.headers["location"] == "/ui/"
    (cookie,) = resp.cookies
    flags = [part.strip() for part in cookie.split(";")]
    assert flags[0].startswith(f"{COOKIE}=") and len(flags[0]) > len(COOKIE) + 30
    assert {"HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"} <= set(flags)
    assert any(f.startswith("Expires=") for f in flags)
    assert "Secure" not in flags  # plain HTTP here; behind an HTTPS proxy it is set:
    proxied = request(
        gw.url,
        "POST",
        "/ui/login",
        f"key={ADMIN}".encode(),
        {"content-type": "application/x-www-form-urlencoded", "x-forwarded-proto": "https"},
    )
    assert "Secure" in [p.strip() for p in proxied.cookies[0].split(";")]
    session = Session(gw.url)
    index = session.get("/ui/")
    assert index.status == 200 and b'src="/ui/static/app.js"' in index.body
    assert index.headers["content-type"].startswith("text/html")
    script = session.get("/ui/static/app.js")
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")
    again = request(
        gw.url, "GET", "/ui/static/app.js", headers={"cookie": session.cookie, "if-none-match": script.headers["etag"]}
    )
    assert again.status == 304
    info = session.get("/ui/session").json()
    assert info["actor"] == "admin-0" and info["sign_out"] is True
    assert info["expires_at"] == pytest.approx(time.time() + 43200, abs=60)


def test_v1_keys_and_wrong_keys_never_sign_in(keyed: Any) -> None:
    gw = keyed
    for key in (TEAM_KEY, "sk-wrong", "", None):
        resp = sign_in(gw.url, key)
        assert resp.status == 401, key
        assert resp.cookies == []
        assert b"not an admin key" in resp.body
    # A form posted from another site is refused before the key is even looked at.
    cross = request(
        gw.url,
        "POST",
        "/ui/login",
        f"key={ADMIN}".encode(),
        {"content-type": "application/x-www-form-urlencoded", "origin": "http://evil.example"},
    )
    assert cross.status == 403 and cross.cookies == []


def test_repeated_failures_are_refused_for_a_while(keyed: Any) -> None:
    gw = keyed
    for _ in range(MAX_FAILURES):
        assert sign_in(gw.url, "sk-guess").status == 401
    blocked = sign_in(gw.url, ADMIN)  # even the right key, until the window has passed
    assert blocked.status == 429 and int(blocked.headers["retry-after"]) >= 1
    assert blocked.cookies == []


def test_the_cookie_opens_the_admin_api_but_never_v1(keyed: Any) -> None:
    gw = keyed
    session = Session(gw.url)
    assert chat(gw.url, TEAM_KEY).status == 200
    assert session.get("/admin/stats").status == 200
    assert session.get("/admin/overview").status == 200
    # /v1 knows nothing of the cookie: without a key it is refused.
    refused = request(
        gw.url, "POST", "/v1/chat/completions", {"model": "m1", "messages": []}, {"cookie": session.cookie}
    )
    assert refused.status == 401
    assert request(gw.url, "GET", "/v1/models", headers={"cookie": session.cookie}).status == 401
    # A call that changes something needs the session's CSRF token as well.
    no_token = session.call("POST", "/admin/keys", {"tenant": "t"}, csrf=False)
    assert no_token.status == 403 and "x-shardon-csrf" in no_token.json()["error"]["message"]
    wrong = request(
        gw.url, "POST", "/admin/keys", {"tenant": "t"}, {"cookie": session.cookie, "x-shardon-csrf": "nope"}
    )
    assert wrong.status == 403
    created = session.call("POST", "/admin/keys", {"tenant": "t"})
    assert created.status == 201
    entries = admin(gw.url, "/admin/audit").json()["data"]
    assert entries[0]["action"] == "key.create" and entries[0]["actor"] == "admin-0 (ui)"
    assert any(e["action"] == "ui.sign_in" and e["actor"] == "admin-0" for e in entries)
    # An Authorization header, when sent, is what counts: a wrong one is refused despite the cookie.
    both = request(gw.url, "GET", "/admin/stats", headers={"cookie": session.cookie, "authorization": "Bearer sk-no"})
    assert both.status == 401


def test_signing_out_ends_the_session(keyed: Any) -> None:
    gw = keyed
    session = Session(gw.url)
    other = Session(gw.url)
    assert session.call("POST", "/ui/logout", csrf=False).status == 403
    out = session.call("POST", "/ui/logout")
    assert out.status == 204
    assert "Max-Age=0" in out.cookies[0]
    assert session.get("/ui/session").status == 401
    assert session.get("/admin/stats").status == 401
    assert other.get("/admin/stats").status == 200  # one browser signing out ends only its session
    # Signing in again from a signed-in browser replaces its session.
    again = request(
        gw.url,
        "POST",
        "/ui/login",
        f"key={ADMIN}".encode(),
        {"content-type": "application/x-www-form-urlencoded", "cookie": other.cookie},
    )
    assert again.status == 303 and again.cookies[0].split(";")[0] != other.cookie
    assert other.get("/admin/stats").status == 401


def test_sessions_expire(make_mock: Any, make_gateway: Any) -> None:
    gw = make_gateway(auth={"admin_keys": [ADMIN]}, ui={"session_ttl_s": 1})
    session = Session(gw.url)
    assert "Max-Age=1" in sign_in(gw.url).cookies[0]
    time.sleep(1.2)
    assert session.get("/ui/session").status == 401
    assert session.get("/admin/stats").status == 401


def test_without_an_admin_key_only_loopback_signs_in(make_gateway: Any) -> None:
    gw = make_gateway()
    page = request(gw.url, "GET", "/ui/login")
    assert page.status == 200 and b'name="key"' not in page.body
    session = Session(gw.url, key=None)
    info = session.get("/ui/session").json()
    assert info["actor"] == "loopback" and info["sign_out"] is False
    # The same request from another address is refused, sign-in page included.
    gateway = gw.gateway

    class Scope:
        proto = "http"
        method = "GET"
        path = "/ui/login"
        query_string = ""
        client = "192.0.2.7"
        headers: dict[str, str] = {}

    class Proto:
        status = 0

        def response_bytes(self, status: int, headers: Any, body: bytes) -> None:
            self.status = status

    for path in ("/ui/login", "/ui/", "/ui/static/app.js"):
        scope, proto = Scope(), Proto()
        scope.path = path
        asyncio.run_coroutine_threadsafe(gateway.ui.handle(scope, proto), gw.loop).result(5)
        assert proto.status == 403, path


def test_the_dashboard_can_be_turned_off(make_gateway: Any) -> None:
    gw = make_gateway(auth={"admin_keys": [ADMIN]}, ui={"enabled": False})
    assert request(gw.url, "GET", "/ui/login").status == 404
    assert sign_in(gw.url).status == 404
    assert admin(gw.url, "/admin/stats").status == 200


def test_without_an_admin_key_a_page_from_elsewhere_changes_nothing(make_gateway: Any) -> None:
    """Loopback's admin API without a key: a local browser showing another site's page must not be
    made to change anything (cross-site request forgery); reads and this origin's calls go on."""
    gw = make_gateway()
    host = gw.url.removeprefix("http://")
    body = {"tenant": "team-x"}
    forged = request(gw.url, "POST", "/admin/keys", body, {"origin": "http://evil.example"})
    assert forged.status == 403 and b"another origin" in forged.body
    assert request(gw.url, "GET", "/admin/keys", headers={"origin": "http://evil.example"}).status == 200
    assert request(gw.url, "GET", "/admin/keys").json()["data"] == []  # nothing was created
    assert request(gw.url, "POST", "/admin/keys", body, {"origin": f"http://{host}"}).status == 201
    assert request(gw.url, "POST", "/admin/keys", body).status == 201  # a tool (curl) sends no Origin
