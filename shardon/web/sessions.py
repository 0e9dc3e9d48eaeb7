"""Dashboard sessions: the admin key typed once buys an HttpOnly, ``SameSite=Strict`` cookie.

- A session is a random token, the cookie's value; only its SHA-256 is kept (in memory), with the
  admin identity that signed in, its expiry (``ui.session_ttl_s`` after sign-in) and a CSRF token
  that the page sends back in ``X-Shardon-CSRF`` with every call that changes something.
- A session ends at sign-out, at its expiry, or when the gateway stops. At most `MAX_SESSIONS` live
  at once; past that, signing in ends the oldest.
- Failed sign-ins are counted per client address: past `MAX_FAILURES` within `FAILURE_WINDOW_S`,
  that address is refused until the window has passed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque

__all__ = ["COOKIE", "CSRF_HEADER", "Session", "SessionStore", "clear_cookie", "cookie_token", "set_cookie"]

COOKIE = "shardon_session"
CSRF_HEADER = "x-shardon-csrf"
MAX_SESSIONS = 1000
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0


class Session:
    __slots__ = ("actor", "csrf", "expires_at")

    def __init__(self, actor: str, expires_at: float, csrf: str) -> None:
        self.actor = actor
        self.expires_at = expires_at
        self.csrf = csrf

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}  # token digest → session, oldest first
        self._failures: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, actor: str, now: float | None = None) -> tuple[str, Session]:
        """A new session for ``actor``: (the cookie's token, the session)."""
        now = time.time() if now is None else now
        self._expire(now)
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        token = secrets.token_urlsafe(32)
        session = Session(actor, now + self.ttl_s, secrets.token_urlsafe(24))
        self._sessions[_digest(token)] = session
        return token, session

    def get(self, token: str | None, now: float | None = None) -> Session | None:
        """The live session of ``token``, or None (unknown, ended or expired)."""
        if not token:
            return None
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires_at <= (time.time() if now is None else now):
            del self._sessions[key]
            return None
        return session

    def end(self, token: str | None) -> None:
        if token:
            self._sessions.pop(_digest(token), None)

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]

    # -- failed sign-ins --------------------------------------------------------------------
    def refused_for(self, client: str, now: float | None = None) -> float:
        """Seconds ``client`` must wait before trying to sign in again (0: it may try now)."""
        now = time.time() if now is None else now
        times = self._failures.get(client)
        if not times:
            return 0.0
        while times and times[0] <= now - FAILURE_WINDOW_S:
            times.popleft()
        if not times:
            del self._failures[client]
            return 0.0
        if len(times) < MAX_FAILURES:
            return 0.0
        return max(1.0, times[0] + FAILURE_WINDOW_S - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if len(self._failures) > 10_000:  # bound the table: forget addresses whose window is over
            for addr in [a for a, t in self._failures.items() if not t or t[-1] <= now - FAILURE_WINDOW_S]:
                del self._failures[addr]
        self._failures.setdefault(client, deque(maxlen=MAX_FAILURES)).append(now)


def cookie_token(header: str | None) -> str | None:
    """The session token in a ``Cookie`` header, or None."""
    if not header:
        return None
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == COOKIE:
            return value.strip().strip('"') or None
    return None


def set_cookie(token: str, max_age_s: float, *, secure: bool) -> str:
    """The ``Set-Cookie`` value of a new session: sent only to this host, never to scripts, never
    cross-site, for ``max_age_s`` seconds (``Secure`` when the dashboard is reached over HTTPS)."""
    age = int(max_age_s)
    expires = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + age))
    flags = "; Secure" if secure else ""
    return f"{COOKIE}={token}; Path=/; Max-Age={age}; Expires={expires}; HttpOnly; SameSite=Strict{flags}"


def clear_cookie(*, secure: bool) -> str:
    flags = "; Secure" if secure else ""
    return f"{COOKIE}=; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; HttpOnly; SameSite=Strict{flags}"
