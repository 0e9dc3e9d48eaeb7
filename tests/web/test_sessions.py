"""Dashboard sessions: tokens, expiry, sign-in failures, the cookie's text."""

from __future__ import annotations

import pytest

from shardon.web.sessions import (
    COOKIE,
    FAILURE_WINDOW_S,
    MAX_FAILURES,
    MAX_SESSIONS,
    SessionStore,
    clear_cookie,
    cookie_token,
    set_cookie,
)


def test_a_session_lives_until_its_expiry_or_its_end() -> None:
    store = SessionStore(ttl_s=60)
    token, session = store.create("admin-0", now=1000.0)
    assert session.actor == "admin-0" and session.expires_at == 1060.0
    assert store.get(token, now=1059.9) is session
    assert store.get(token, now=1060.0) is None  # expired, and forgotten
    assert len(store) == 0
    token, _ = store.create("admin-0", now=2000.0)
    store.end(token)
    assert store.get(token, now=2000.0) is None
    assert store.get(None) is None and store.get("") is None and store.get("forged") is None


def test_only_a_digest_of_the_token_is_kept() -> None:
    store = SessionStore(ttl_s=60)
    token, _ = store.create("admin-0")
    assert token not in repr(store._sessions)
    assert all(len(key) == 64 for key in store._sessions)


def test_the_csrf_token_is_the_sessions_own() -> None:
    store = SessionStore(ttl_s=60)
    _, a = store.create("admin-0")
    _, b = store.create("admin-0")
    assert a.csrf != b.csrf
    assert a.csrf_matches(a.csrf)
    assert not a.csrf_matches(b.csrf) and not a.csrf_matches(None) and not a.csrf_matches("")


def test_the_oldest_session_makes_room() -> None:
    store = SessionStore(ttl_s=60)
    first, _ = store.create("admin-0", now=0.0)
    for _ in range(MAX_SESSIONS):
        store.create("admin-0", now=1.0)
    assert len(store) == MAX_SESSIONS
    assert store.get(first, now=2.0) is None


def test_failed_sign_ins_refuse_an_address_for_a_while() -> None:
    store = SessionStore(ttl_s=60)
    for i in range(MAX_FAILURES - 1):
        store.failed("10.0.0.1", now=100.0 + i)
    assert store.refused_for("10.0.0.1", now=110.0) == 0
    store.failed("10.0.0.1", now=110.0)
    wait = store.refused_for("10.0.0.1", now=110.0)
    assert wait == pytest.approx(100.0 + FAILURE_WINDOW_S - 110.0)
    assert store.refused_for("10.0.0.2", now=110.0) == 0  # another address is not
    assert store.refused_for("10.0.0.1", now=100.0 + FAILURE_WINDOW_S + 0.5) == 0  # the oldest aged out
    assert store.refused_for("10.0.0.1", now=200.0 + FAILURE_WINDOW_S) == 0


def test_the_cookie_text() -> None:
    value = set_cookie("tok", 3600, secure=False)
    parts = [p.strip() for p in value.split(";")]
    assert parts[0] == f"{COOKIE}=tok"
    assert {"Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Strict"} <= set(parts)
    assert any(p.startswith("Expires=") and p.endswith(" GMT") for p in parts)
    assert "Secure" in set_cookie("tok", 60, secure=True)
    cleared = clear_cookie(secure=False)
    assert cleared.startswith(f"{COOKIE}=;") and "Max-Age=0" in cleared and "HttpOnly" in cleared
    assert cookie_token(f"a=1; {COOKIE}=abc; b=2") == "abc"
    assert cookie_token(f'{COOKIE}="abc"') == "abc"
    assert cookie_token("a=1") is None and cookie_token(None) is None and cookie_token(f"{COOKIE}=") is None
    assert cookie_token(f"x{COOKIE}=abc") is None
