"""The dashboard at ``/ui``: its pages, its sign-in, and the admin API's second way in.

The dashboard is static files (``shardon/web/static``, no build step, nothing fetched from
elsewhere) that call the admin API (``/admin/*``) from the browser. The browser proves itself with
the session cookie of `shardon.web.sessions` instead of the admin key:

- ``GET /ui/login`` shows the sign-in form; ``POST /ui/login`` takes an admin key (``auth.admin_keys``;
  a ``/v1`` key is not one) and sets the cookie. With no admin key configured, loopback clients
  sign in without one and others are refused, as for ``/admin``.
- Without a live session nothing else under ``/ui`` answers: a page redirects to the sign-in
  form, anything else is 401.
- `Dashboard.admin_caller` authenticates an admin call: the ``Authorization`` header when one is
  sent, else the cookie; a cookie call that changes something must carry the session's CSRF token.
  The cookie never authenticates ``/v1``.

Every answer under ``/ui`` carries a Content-Security-Policy that allows only this origin's files.
"""

from __future__ import annotations

import base64
import hashlib
import html
import string
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import orjson

from shardon import __version__, errors

from .overview import Overview
from .sessions import CSRF_HEADER, Session, SessionStore, clear_cookie, cookie_token, set_cookie

if TYPE_CHECKING:
    from shardon.app import Gateway
    from shardon.rsgi import HTTPProtocol, Scope

__all__ = ["Dashboard"]

STATIC = Path(__file__).parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
_APP_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_COMMON = [
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("x-frame-options", "DENY"),
]
_MAX_FORM = 4096
_SAFE_METHODS = ("GET", "HEAD")


class _Asset:
    __slots__ = ("body", "content_type", "etag")

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _load_assets() -> dict[str, _Asset]:
    return {
        path.name: _Asset(path.read_bytes(), _TYPES[path.suffix])
        for path in sorted(STATIC.iterdir())
        if path.is_file() and path.suffix in _TYPES
    }


class _SignInPage:
    """The sign-in form: a page of its own (no script), its style inline and allowed by hash."""

    def __init__(self) -> None:
        self.template = string.Template((STATIC / "login.html").read_text())
        self.style = (STATIC / "login.css").read_text()
        digest = base64.b64encode(hashlib.sha256(self.style.encode()).digest()).decode()
        self.csp = (
            f"default-src 'none'; style-src 'sha256-{digest}'; img-src data:; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
        )

    def render(self, *, needs_key: bool, error: str | None = None) -> bytes:
        if needs_key:
            lead = "Sign in with an admin key (<code>auth.admin_keys</code>)."
            field = (
                '<label for="key">Admin key</label>'
                '<input id="key" name="key" type="password" autocomplete="current-password" '
                'required autofocus spellcheck="false">'
            )
        else:
            lead = "No admin key is configured: this loopback client may sign in without one."
            field = ""
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        return self.template.substitute(style=self.style, lead=lead, error=message, field=field).encode()


class Dashboard:
    """``/ui`` and everything under it (hooked into the gateway's routing by `Gateway.__call__`)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.enabled = gateway.config.ui.enabled
        self.sessions = SessionStore(gateway.config.ui.session_ttl_s)
        self.overview = Overview(gateway)
        gateway.admin.register("GET", "overview", 0, self.overview.handle)
        self._assets: dict[str, _Asset] | None = None
        self._sign_in: _SignInPage | None = None

    @property
    def assets(self) -> dict[str, _Asset]:
        if self._assets is None:
            self._assets = _load_assets()
        return self._assets

    @property
    def sign_in_page(self) -> _SignInPage:
        if self._sign_in is None:
            self._sign_in = _SignInPage()
        return self._sign_in

    # -- the admin API's callers -------------------------------------------------------------
    def session_of(self, scope: Scope) -> tuple[str | None, Session | None]:
        token = cookie_token(scope.headers.get("cookie"))
        return token, self.sessions.get(token)

    def admin_caller(self, scope: Scope) -> str:
        """Who makes an ``/admin`` call (for the audit log), or Unauthorized/Forbidden.

        The admin key when an ``Authorization`` header is sent; otherwise the dashboard's session
        cookie (``"<who signed in> (ui)"``); otherwise what `KeyStore.authenticate_admin` allows.
        While no admin key is configured the cookie adds nothing: ``/admin`` is loopback's alone, and
        a browser's call that changes something must come from this origin (no cross-site request
        forgery from a page the local browser opens).
        """
        keys = self.gw.keys
        authorization = scope.headers.get("authorization")
        if authorization is None and self.enabled and keys.auth.admin_keys:
            _, session = self.session_of(scope)
            if session is not None:
                if scope.method not in _SAFE_METHODS and not session.csrf_matches(scope.headers.get(CSRF_HEADER)):
                    raise errors.Forbidden(f"a dashboard call that changes something needs the {CSRF_HEADER} header")
                return f"{session.actor} (ui)"
        if not keys.auth.admin_keys and scope.method not in _SAFE_METHODS and not self._same_origin(scope):
            # Loopback without a key: a page from elsewhere that a local browser shows must not
            # change anything here (its Origin header gives it away).
            raise errors.Forbidden("an /admin call that changes something is refused from another origin")
        return keys.authenticate_admin(authorization, self.gw.client_address(scope))

    # -- /ui --------------------------------------------------------------------------------
    async def handle(self, scope: Scope, proto: HTTPProtocol) -> None:
        if not self.enabled:
            err = errors.NotFound(f"no route for {scope.method} {scope.path} (the dashboard is off: ui.enabled)")
            proto.response_bytes(err.status, err.headers(), err.body())
            return
        self.overview.start_sampling()
        path, method = scope.path, scope.method
        keys = self.gw.keys
        needs_key = bool(keys.auth.admin_keys)
        if not needs_key:
            try:
                keys.authenticate_admin(None, self.gw.client_address(scope))
            except errors.ShardonError as err:  # no admin key and not loopback
                self._error(proto, err)
                return
        if path == "/ui/login":
            if method == "GET":
                await self._login_form(scope, proto, needs_key)
            elif method == "POST":
                await self._login(scope, proto, needs_key)
            else:
                self._error(proto, errors.MethodNotAllowed(f"method {method} not allowed on {path}"))
            return
        token, session = self.session_of(scope)
        if session is None:
            if method in _SAFE_METHODS and path in ("/ui", "/ui/"):
                self._redirect(proto, "/ui/login")
            else:
                self._error(proto, errors.Unauthorized("sign in to the dashboard first (/ui/login)"))
            return
        if path == "/ui":
            self._redirect(proto, "/ui/")
        elif path == "/ui/" and method in _SAFE_METHODS:
            self._asset(scope, proto, "index.html")
        elif path == "/ui/session" and method in _SAFE_METHODS:
            body = {
                "actor": session.actor,
                "expires_at": session.expires_at,
                "csrf": session.csrf,
                "version": __version__,
                "sign_out": bool(needs_key),
            }
            self._send(proto, 200, [("content-type", "application/json"), *self._no_store()], orjson.dumps(body))
        elif path == "/ui/logout" and method == "POST":
            if not self._same_origin(scope) or not session.csrf_matches(scope.headers.get(CSRF_HEADER)):
                self._error(proto, errors.Forbidden(f"signing out needs the {CSRF_HEADER} header, from this origin"))
                return
            self.sessions.end(token)
            client = self.gw.client_address(scope)
            self._audit(session.actor, "ui.sign_out", client.rpartition(":")[0] or client or None)
            headers = [("set-cookie", clear_cookie(secure=self._secure(scope))), *self._no_store()]
            self._send(proto, 204, headers, b"")
        elif path.startswith("/ui/static/") and method in _SAFE_METHODS:
            self._asset(scope, proto, path[len("/ui/static/") :])
        else:
            self._error(proto, errors.NotFound(f"no route for {method} {path}"))

    async def _login_form(self, scope: Scope, proto: HTTPProtocol, needs_key: bool) -> None:
        _, session = self.session_of(scope)
        if session is not None:
            self._redirect(proto, "/ui/")
            return
        self._page(proto, 200, self.sign_in_page.render(needs_key=needs_key))

    async def _login(self, scope: Scope, proto: HTTPProtocol, needs_key: bool) -> None:
        client = self.gw.client_address(scope)
        address = client.rpartition(":")[0] or client  # the engines give "host:port"
        body = await proto()
        if not self._same_origin(scope):
            self._page(proto, 403, self.sign_in_page.render(needs_key=needs_key, error="Sign in from this page."))
            return
        wait = self.sessions.refused_for(address)
        if wait > 0:
            page = self.sign_in_page.render(needs_key=needs_key, error="Too many failed sign-ins: try again later.")
            self._page(proto, 429, page, [("retry-after", str(int(wait + 0.999)))])
            return
        if needs_key:
            key = _form_field(body, "key")
            try:
                actor = self.gw.keys.authenticate_admin(f"Bearer {key}" if key else None, client)
            except errors.ShardonError:
                self.sessions.failed(address)
                page = self.sign_in_page.render(needs_key=needs_key, error="That is not an admin key.")
                self._page(proto, 401, page)
                return
        else:
            actor = "loopback"
        self._audit(actor, "ui.sign_in", address)
        self.sessions.end(cookie_token(scope.headers.get("cookie")))  # signing in again replaces a session
        token, _ = self.sessions.create(actor)
        cookie = set_cookie(token, self.sessions.ttl_s, secure=self._secure(scope))
        self._redirect(proto, "/ui/", [("set-cookie", cookie)])

    # -- answers ----------------------------------------------------------------------------
    def _audit(self, actor: str, action: str, target: str | None) -> None:
        if self.gw.request_log is not None:
            self.gw.request_log.audit(actor, action, target, None)

    @staticmethod
    def _no_store() -> list[tuple[str, str]]:
        return [("cache-control", "no-store")]

    @staticmethod
    def _send(proto: HTTPProtocol, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        proto.response_bytes(status, [*headers, *_COMMON, ("content-security-policy", _APP_CSP)], body)

    def _error(self, proto: HTTPProtocol, err: errors.ShardonError) -> None:
        self._send(proto, err.status, [*err.headers(), *self._no_store()], err.body())

    def _redirect(self, proto: HTTPProtocol, location: str, extra: list[tuple[str, str]] | None = None) -> None:
        self._send(proto, 303, [("location", location), *self._no_store(), *(extra or [])], b"")

    def _page(self, proto: HTTPProtocol, status: int, body: bytes, extra: list[tuple[str, str]] | None = None) -> None:
        headers = [
            ("content-type", "text/html; charset=utf-8"),
            ("content-security-policy", self.sign_in_page.csp),
            *self._no_store(),
            *_COMMON,
            *(extra or []),
        ]
        proto.response_bytes(status, headers, body)

    def _asset(self, scope: Scope, proto: HTTPProtocol, name: str) -> None:
        asset = self.assets.get(name)
        if asset is None or name.startswith("login."):
            self._error(proto, errors.NotFound(f"no dashboard file named '{name}'"))
            return
        headers = [("etag", asset.etag), ("cache-control", "no-cache")]
        if scope.headers.get("if-none-match") == asset.etag:
            self._send(proto, 304, headers, b"")
            return
        self._send(proto, 200, [("content-type", asset.content_type), *headers], asset.body)

    @staticmethod
    def _secure(scope: Scope) -> bool:
        return (scope.headers.get("x-forwarded-proto") or "").lower() == "https"

    @staticmethod
    def _same_origin(scope: Scope) -> bool:
        """A browser's ``Origin`` (when it sends one) names this host: no form posted from elsewhere."""
        origin = scope.headers.get("origin")
        if origin is None:
            return True
        host = scope.headers.get("host") or ""
        return origin in (f"http://{host}", f"https://{host}")


def _form_field(body: bytes, name: str) -> str | None:
    if len(body) > _MAX_FORM:
        return None
    try:
        pairs = parse_qsl(body.decode("utf-8"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return None
    for key, value in pairs:
        if key == name:
            return value.strip() or None
    return None
