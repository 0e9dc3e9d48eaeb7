"""Keys, tenants and rate limits (shardon/auth.py) without a gateway: who is asking, what they may
do, and when they must wait. End to end: tests/gateway/test_auth.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from shardon import errors
from shardon.auth import CreateKey, KeyStore, RateLimiter, create_key_decoder
from shardon.config import AuthConfig, KeyConfig, TenantConfig

TENANTS = [
    TenantConfig(
        name="team-a",
        weight=2.0,
        rpm=120,
        keys=[
            KeyConfig(key="sk-a", id="a-main", max_priority="high", models=["m1"], tpm=1000),
            KeyConfig(key_sha256=hashlib.sha256(b"sk-hashed").hexdigest(), id="a-hashed"),
        ],
    ),
    TenantConfig(name="team-b", keys=[KeyConfig(key="sk-b")]),
]


def store(tmp_path: Path | None = None, tenants: list[TenantConfig] | None = None, **auth: Any) -> KeyStore:
    return KeyStore(
        AuthConfig(**auth), TENANTS if tenants is None else tenants, None if tmp_path is None else tmp_path / "k.db"
    )


def test_open_mode_is_the_default_tenant_and_the_header_only_when_trusted() -> None:
    assert store(tenants=[]).authenticate(None, "team-x").tenant.name == "default"
    trusting = store(tenants=[], trust_tenant_header=True)
    assert trusting.authenticate(None, "team-x").tenant.name == "team-x"
    assert trusting.authenticate("Bearer anything", None).tenant.name == "default"
    assert trusting.authenticate(None, "team-x") is trusting.authenticate(None, "team-x")  # built once


@pytest.mark.parametrize(
    ("header", "key_id"),
    [
        ("Bearer sk-a", "a-main"),
        ("bearer   sk-a ", "a-main"),
        ("Bearer sk-hashed", "a-hashed"),
        ("Bearer sk-b", "team-b-0"),
    ],
)
def test_a_configured_key_is_its_tenants(header: str, key_id: str) -> None:
    principal = store().authenticate(header, "team-b")  # the header is ignored once keys exist
    assert principal.key is not None and principal.key.id == key_id
    assert principal.tenant.name == ("team-b" if key_id == "team-b-0" else "team-a")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer  ", "Basic sk-a", "sk-a", "Bearer sk-a-", "Bearer SK-A"]
)
def test_a_missing_or_wrong_key_is_401(header: str | None) -> None:
    with pytest.raises(errors.Unauthorized) as info:
        store().authenticate(header, None)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


def test_what_a_key_allows() -> None:
    keys = store()
    a = keys.authenticate("Bearer sk-a", None)
    assert a.max_priority == 2 and a.allowed_models == frozenset({"m1"}) and a.limited
    b = keys.authenticate("Bearer sk-b", None)
    assert b.max_priority == 3 and b.allowed_models is None and not b.limited
    hashed = keys.authenticate("Bearer sk-hashed", None)
    assert hashed.limited  # its tenant's rpm applies to it


def test_runtime_keys_persist_as_digests_and_revoking_the_last_does_not_open(tmp_path: Path) -> None:
    keys = store(tmp_path, tenants=[])
    key, secret = asyncio.run(keys.create(CreateKey(tenant="team-c", rpm=10)))
    assert keys.authenticate(f"Bearer {secret}", None).tenant.name == "team-c"
    assert [k["id"] for k in keys.list()] == [key.id] and "key_sha256" not in keys.list()[0]
    again = store(tmp_path, tenants=[])  # a restart
    assert again.authenticate(f"Bearer {secret}", None).key.id == key.id  # type: ignore[union-attr]
    assert secret.encode() not in (tmp_path / "k.db").read_bytes()
    assert asyncio.run(again.revoke(key.id)) is not None and asyncio.run(again.revoke(key.id)) is None
    with pytest.raises(errors.Unauthorized):
        again.authenticate(f"Bearer {secret}", None)
    with pytest.raises(errors.Unauthorized):  # keyed once: closed for good
        again.authenticate(None, None)
    with pytest.raises(errors.Unauthorized):
        store(tmp_path, tenants=[]).authenticate(f"Bearer {secret}", None)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"tenant": ""}, "tenant"),
        ({"tenant": "t", "rpm": 0}, "rpm"),
        ({"tenant": "t", "tpm": -1}, "tpm"),
        ({"tenant": "t", "max_priority": "x"}, "max_priority"),
    ],
)
def test_a_bad_key_spec_says_which_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"^{field}: "):
        create_key_decoder.decode(msgspec.json.encode(spec))


@pytest.mark.parametrize(
    ("client", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.8.9.10:5000", True),
        ("::1:5000", True),
        ("[::1]:5000", True),
        ("::ffff:127.0.0.1:5000", True),  # an IPv4 client of a dual-stack listener (regression: refused)
        ("10.0.0.1:5000", False),
        ("::1f:5000", False),  # (regression: "starts with ::1" let it in)
        ("1270.0.0.1:5000", False),
        ("localhost:5000", False),
        ("", False),
        (None, False),
    ],
)
def test_without_admin_keys_admin_is_loopback_only(client: str | None, loopback: bool) -> None:
    keys = store()
    if loopback:
        assert keys.authenticate_admin(None, client) == "loopback"
    else:
        with pytest.raises(errors.Forbidden):
            keys.authenticate_admin("Bearer anything", client)


def test_admin_keys_name_the_caller() -> None:
    keys = store(admin_keys=["sk-admin-0", "sk-admin-1"])
    assert keys.authenticate_admin("Bearer sk-admin-1", "10.0.0.1:1") == "admin-1"
    for header in (None, "Bearer sk-a", "Bearer sk-admin-"):
        with pytest.raises(errors.Unauthorized):
            keys.authenticate_admin(header, "127.0.0.1:1")  # loopback is no key once keys exist


def test_rate_limits_wait_within_the_deadline_else_429() -> None:
    keys = store()
    limiter = RateLimiter()
    a = keys.authenticate("Bearer sk-a", None)  # its tenant: 120 rpm; the key: 1000 tpm
    requests, tokens = limiter.buckets(a, 0.0)
    assert len(requests) == 1 and len(tokens) == 1
    # The tenant's bucket is shared with its other keys.
    assert limiter.buckets(keys.authenticate("Bearer sk-hashed", None), 0.0)[0] == requests
    assert limiter.admit(requests, tokens, 600, 0.0, 30.0) == 0.0
    assert limiter.admit(requests, tokens, 400, 0.0, 30.0) == 0.0  # the last of the 1000
    # 100 tokens more come back in 6 s (1000/min): waited for, within a 30 s deadline...
    assert limiter.admit(requests, tokens, 100, 0.0, 30.0) == pytest.approx(6.0)
    # ... but not within 1 s: 429, saying when to come back.
    with pytest.raises(errors.RateLimited) as info:
        limiter.admit(requests, tokens, 100, 0.0, 1.0)
    assert info.value.retry_after is not None and info.value.retry_after > 1.0
    assert "tokens per minute" in str(info.value)
    # The real usage was far less than the estimates: refunded, the next request goes at once.
    limiter.correct(tokens, -900, 0.0)
    assert limiter.admit(requests, tokens, 100, 0.0, 1.0) == 0.0


def test_requests_per_minute_run_out_before_tokens() -> None:
    keys = store()
    limiter = RateLimiter()
    requests, tokens = limiter.buckets(keys.authenticate("Bearer sk-hashed", None), 0.0)  # tenant: 120 rpm
    assert tokens == []
    for _ in range(120):
        assert limiter.admit(requests, tokens, 1, 0.0, 0.1) == 0.0
    with pytest.raises(errors.RateLimited, match="requests per minute"):
        limiter.admit(requests, tokens, 1, 0.0, 0.1)
    assert limiter.admit(requests, tokens, 1, 0.0, 1.0) == pytest.approx(0.5)  # one every 0.5 s


def test_charge_names_the_limit_a_refused_request_hit() -> None:
    """What the exchange calls: the caller's token buckets and the wait, or a 429 told to the
    metrics with the limit that refused it (requests, not tokens, for a key that has both)."""
    keys = store()
    refused: list[tuple[str, str]] = []
    limiter = RateLimiter(lambda tenant, kind: refused.append((tenant, kind)))
    a = keys.authenticate("Bearer sk-a", None)  # its tenant: 120 rpm; the key: 1000 tpm
    tokens, wait = limiter.charge(a, 1000, 30.0, 0.0)
    assert wait == 0.0 and len(tokens) == 1
    with pytest.raises(errors.RateLimited):
        limiter.charge(a, 100, 1.0, 0.0)
    assert refused == [(a.tenant.name, "tokens")]
    limiter.correct(tokens, -1000, 0.0)  # the tokens back: now the requests run out first
    for _ in range(119):
        limiter.charge(a, 1, 1.0, 0.0)
    with pytest.raises(errors.RateLimited, match="requests per minute"):
        limiter.charge(a, 1, 0.1, 0.0)
    assert refused[-1] == (a.tenant.name, "requests")


@pytest.mark.parametrize(
    ("exc", "started", "gone", "status", "error_type", "answered"),
    [
        (errors.ModelNotFound("no such model", param="model"), False, False, 404, "model_not_found", True),
        (errors.RateLimited("slow down", retry_after=2), True, False, 429, "rate_limit_exceeded", False),
        (errors.ClientGone(), False, False, 499, "client_disconnected", False),
        (ConnectionResetError(), False, True, 499, "client_disconnected", False),
        (KeyError("bug"), False, False, 500, "internal_error", True),
        (KeyError("bug"), True, False, 500, "internal_error", False),
    ],
)
def test_the_error_edge(
    exc: BaseException, started: bool, gone: bool, status: int, error_type: str, answered: bool
) -> None:
    """Every way a request ends on an exception: its status and error type, and an OpenAI-shaped
    answer carrying the request id while nothing has been sent yet."""
    got_status, got_type, answer = errors.answer(exc, "00000000000000ab", started, gone)
    assert (got_status, got_type, answer is not None) == (status, error_type, answered)
    if answer is not None:
        code, headers, body = answer
        assert code == status and ("x-request-id", "00000000000000ab") in headers
        assert json.loads(body)["error"]["type"] in ("invalid_request_error", "server_error")
