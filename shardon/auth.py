"""API keys and tenants: who is asking, and what they may do.

- Keys come from the config (``tenants[].keys``, the secret or only its SHA-256) and from the admin
  API at run time. Only SHA-256 digests are kept; run-time keys are persisted (digest only) in
  Shardon's SQLite database (`shardon.store.keys`, whether the request log is on or not) and
  survive a restart. A secret is shown once, when it is created.
- ``/v1/*`` is open while no key was ever configured or created; then every request is the
  ``default`` tenant (or, when ``auth.trust_tenant_header`` is set, the tenant named by that
  header). Once a key exists the gateway stays closed: revoking the last key does not open it.
- ``/admin/*`` takes only ``auth.admin_keys``; with none configured, only loopback clients.
- Digests are compared with :func:`hmac.compare_digest`; a lookup never short-circuits on a prefix
  of the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from . import errors
from ._fast import TokenBucket
from .config import AuthConfig, TenantConfig
from .proxies import peer_host
from .schemas import PRIORITY_BY_NAME
from .store.keys import KeyRow, KeyTable

DEFAULT_TENANT = "default"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tenant:
    """A tenant's weight for fair sharing and its own (tenant-wide) rate limits."""

    __slots__ = ("name", "rpm", "tpm", "weight")

    def __init__(self, name: str, weight: float = 1.0, rpm: float | None = None, tpm: float | None = None) -> None:
        self.name = name
        self.weight = weight
        self.rpm = rpm
        self.tpm = tpm


class ApiKey(msgspec.Struct, kw_only=True):
    id: str
    tenant: str
    key_sha256: str
    rpm: float | None = None
    tpm: float | None = None
    max_priority: str | None = None
    models: list[str] | None = None
    overflow: bool = True  # False: never sent to a model's overflow endpoint
    source: str = "config"
    created_at: float = 0.0

    def public(self) -> dict[str, object]:
        """Everything but the digest: what the admin API lists."""
        out = msgspec.structs.asdict(self)
        del out["key_sha256"]
        return out


class Principal:
    """The authenticated caller of a request (one per key or open-mode tenant, reused)."""

    __slots__ = ("allowed_models", "key", "limited", "max_priority", "overflow", "tenant")

    def __init__(self, tenant: Tenant, key: ApiKey | None) -> None:
        self.tenant = tenant
        self.key = key
        self.max_priority = 3 if key is None or key.max_priority is None else PRIORITY_BY_NAME[key.max_priority]
        self.allowed_models = None if key is None or key.models is None else frozenset(key.models)
        # Whether any rate limit applies: the request path skips the limiter entirely when not.
        self.limited = bool(tenant.rpm or tenant.tpm or (key is not None and (key.rpm or key.tpm)))
        # Whether its requests may go to a model's overflow endpoint (shardon.routing.overflow).
        self.overflow = key is None or key.overflow


class CreateKey(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of ``POST /admin/keys``."""

    tenant: str
    rpm: float | None = msgspec.field(default=None)
    tpm: float | None = None
    max_priority: str | None = None
    models: list[str] | None = None
    overflow: bool = True

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("tenant: must not be empty")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.max_priority is not None and self.max_priority not in PRIORITY_BY_NAME:
            raise ValueError(f"max_priority: must be one of {', '.join(PRIORITY_BY_NAME)}")


create_key_decoder = msgspec.json.Decoder(CreateKey)


class KeyStore:
    """Every key, by digest; run-time keys also in the database at ``db_path`` (None: not persisted)."""

    def __init__(self, auth: AuthConfig, tenants: list[TenantConfig], db_path: Path | None) -> None:
        self.auth = auth
        self.table = KeyTable(db_path) if db_path is not None else None
        self.tenants: dict[str, Tenant] = {t.name: Tenant(t.name, t.weight, t.rpm, t.tpm) for t in tenants}
        self.tenants.setdefault(DEFAULT_TENANT, Tenant(DEFAULT_TENANT))
        self._by_digest: dict[str, ApiKey] = {}
        # Principals built once per key digest (and per tenant in open mode), not per request.
        self._principals: dict[str, Principal] = {}
        self._open_principals: dict[str, Principal] = {}
        self._ever_keyed = False
        self._admin_digests = [digest(k) for k in auth.admin_keys]
        for t in tenants:
            for i, k in enumerate(t.keys):
                sha = k.key_sha256.lower() if k.key_sha256 else digest(k.key or "")
                key_id = k.id or f"{t.name}-{i}"
                self._by_digest[sha] = ApiKey(
                    id=key_id,
                    tenant=t.name,
                    key_sha256=sha,
                    rpm=k.rpm,
                    tpm=k.tpm,
                    max_priority=k.max_priority,
                    models=k.models,
                    overflow=k.overflow,
                )
        self._ever_keyed = bool(self._by_digest)
        self._load()

    # -- persistence (run-time keys) ---------------------------------------------------------
    def _load(self) -> None:
        if self.table is None:
            return
        rows, ever = self.table.load()
        self._ever_keyed = self._ever_keyed or ever
        for row in rows:
            self._by_digest[row.key_sha256] = ApiKey(
                id=row.id,
                tenant=row.tenant,
                key_sha256=row.key_sha256,
                rpm=row.rpm,
                tpm=row.tpm,
                max_priority=row.max_priority,
                models=row.models,
                overflow=row.overflow,
                source="runtime",
                created_at=row.created_at,
            )
            self.tenants.setdefault(row.tenant, Tenant(row.tenant))

    async def create(self, spec: CreateKey) -> tuple[ApiKey, str]:
        """A new key for ``spec.tenant``; returns it and its secret (never stored, shown once). Its row
        is written off the event loop (`SmallTable.write`)."""
        secret = "sk-shardon-" + secrets.token_urlsafe(32)
        key = ApiKey(
            id="key_" + os.urandom(8).hex(),
            tenant=spec.tenant,
            key_sha256=digest(secret),
            rpm=spec.rpm,
            tpm=spec.tpm,
            max_priority=spec.max_priority,
            models=spec.models,
            overflow=spec.overflow,
            source="runtime",
            created_at=time.time(),
        )
        self._by_digest[key.key_sha256] = key
        self._ever_keyed = True
        self.tenants.setdefault(key.tenant, Tenant(key.tenant))
        if self.table is not None:
            await self.table.write(self.table.insert, _row(key))
        return key, secret

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke the key ``key_id`` (None if there is none); a runtime key's row is marked off the
        event loop."""
        for sha, key in list(self._by_digest.items()):
            if key.id == key_id:
                del self._by_digest[sha]  # effective for the very next request
                self._principals.pop(sha, None)
                if key.source == "runtime" and self.table is not None:
                    await self.table.write(self.table.revoke, key_id)
                return key
        return None

    def list(self) -> list[dict[str, object]]:
        return [key.public() for key in sorted(self._by_digest.values(), key=lambda k: (k.tenant, k.id))]

    # -- per request ----------------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return not self._by_digest and not self._ever_keyed

    def tenant(self, name: str) -> Tenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            tenant = self.tenants[name] = Tenant(name)
        return tenant

    def authenticate(self, authorization: str | None, tenant_header: str | None) -> Principal:
        """The caller of a ``/v1`` request, or :class:`~shardon.errors.Unauthorized`."""
        if not self._ever_keyed:  # open: no key was ever configured or created
            name = tenant_header if (tenant_header and self.auth.trust_tenant_header) else DEFAULT_TENANT
            principal = self._open_principals.get(name)
            if principal is None:
                principal = self._open_principals[name] = Principal(self.tenant(name), None)
            return principal
        secret = _bearer(authorization)
        if secret is None:
            raise errors.Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        presented = digest(secret)
        key = self._by_digest.get(presented)
        if key is None or not hmac.compare_digest(key.key_sha256, presented):
            raise errors.Unauthorized("invalid API key")
        principal = self._principals.get(presented)
        if principal is None or principal.key is not key:
            principal = self._principals[presented] = Principal(self.tenant(key.tenant), key)
        return principal

    def authenticate_admin(self, authorization: str | None, client: str | None) -> str:
        """The admin caller's identity for the audit log, or Unauthorized/Forbidden."""
        if not self._admin_digests:
            address = peer_host(client) if client else None
            if address is not None and address.is_loopback:
                return "loopback"
            raise errors.Forbidden(
                "the admin API is reachable only from loopback while no admin key is configured",
            )
        secret = _bearer(authorization)
        if secret is None:
            raise errors.Unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
        presented = digest(secret)
        ok = False
        for i, candidate in enumerate(self._admin_digests):
            if hmac.compare_digest(candidate, presented):
                ok = True
                actor = f"admin-{i}"
        if not ok:
            raise errors.Unauthorized("invalid admin key")
        return actor


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class RateLimiter:
    """Token buckets per key and per tenant, for requests/min and tokens/min.

    A request takes one request-token and its estimated tokens from every bucket that applies. When
    a bucket is short, the request may *reserve*: the tokens are taken into debt and the request
    waits until the debt would have refilled — if that is before its deadline. Otherwise it gets 429
    with ``Retry-After``. When it ends, the estimate is corrected by the real usage.
    """

    def __init__(self, on_limited: Callable[[str, str], object] | None = None) -> None:
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self.on_limited = on_limited  # (tenant, "requests" | "tokens"): a request refused (429)

    def _bucket(self, owner: str, kind: str, per_minute: float, now: float) -> TokenBucket:
        key = (owner, kind)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(per_minute / 60.0, per_minute, now)
        elif bucket.capacity != per_minute:
            bucket.configure(per_minute / 60.0, per_minute, now)
        return bucket

    def buckets(self, principal: Principal, now: float) -> tuple[list[TokenBucket], list[TokenBucket]]:
        """(request buckets, token buckets) that apply to this caller."""
        req: list[TokenBucket] = []
        tok: list[TokenBucket] = []
        key = principal.key
        if key is not None:
            if key.rpm:
                req.append(self._bucket("key:" + key.id, "rpm", key.rpm, now))
            if key.tpm:
                tok.append(self._bucket("key:" + key.id, "tpm", key.tpm, now))
        tenant = principal.tenant
        if tenant.rpm:
            req.append(self._bucket("tenant:" + tenant.name, "rpm", tenant.rpm, now))
        if tenant.tpm:
            tok.append(self._bucket("tenant:" + tenant.name, "tpm", tenant.tpm, now))
        return req, tok

    def charge(self, principal: Principal, tokens: float, budget: float, now: float) -> tuple[list[TokenBucket], float]:
        """A request of ``tokens`` (estimated) charged to every bucket of its caller: (its token
        buckets, to correct when it ends; the seconds to wait before dispatch). RateLimited (told
        to ``on_limited``) when the wait would pass ``budget``."""
        req, tok = self.buckets(principal, now)
        try:
            return tok, self.admit(req, tok, tokens, now, budget)
        except errors.RateLimited as exc:
            if self.on_limited is not None:
                self.on_limited(principal.tenant.name, exc.kind)
            raise

    @staticmethod
    def admit(req: list[TokenBucket], tok: list[TokenBucket], tokens: float, now: float, budget: float) -> float:
        """Seconds to wait before dispatch (0: go now); raises RateLimited if over ``budget``."""
        wait = 0.0
        for bucket in req:
            wait = max(wait, bucket.time_until(1.0, now))
        for bucket in tok:
            wait = max(wait, bucket.time_until(min(tokens, bucket.capacity), now))
        if wait >= budget:
            kind = "requests" if any(b.time_until(1.0, now) >= budget for b in req) else "tokens"
            limited = errors.RateLimited(
                f"rate limit exceeded ({kind} per minute); retry later",
                retry_after=wait if wait != float("inf") else 60.0,
            )
            limited.kind = kind
            raise limited
        for bucket in req:
            bucket.force_take(1.0, now)
        for bucket in tok:
            bucket.force_take(tokens, now)
        return wait

    @staticmethod
    def correct(tok: list[TokenBucket], delta: float, now: float) -> None:
        """Charge (or refund, when negative) the difference between real and estimated tokens."""
        for bucket in tok:
            bucket.force_take(delta, now)


def _row(key: ApiKey) -> KeyRow:
    """What the key table keeps of a key: every field but its source (and never the secret)."""
    return KeyRow(*(getattr(key, name) for name in KeyRow._fields))
