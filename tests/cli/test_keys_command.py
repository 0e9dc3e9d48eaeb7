"""``shardon keys create|list|revoke``: the admin API from the command line; a created key works on /v1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.support import call


def shardon(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHARDON_")} | env
    return subprocess.run(
        [sys.executable, "-m", "shardon", *args], capture_output=True, text=True, timeout=60, env=environ
    )


@pytest.fixture
def gateway(make_mock: Any, make_gateway: Any) -> Any:
    node = make_mock(models=["m1"], chunks=2)
    return make_gateway(nodes=[{"id": "n", "url": node.url, "models": ["m1"]}])


def test_a_created_key_works_on_v1_until_revoked(gateway: Any) -> None:
    import openai

    url = gateway.url
    assert call(url, "GET", "/v1/models")[0] == 200  # open while no key exists
    out = shardon("keys", "create", "--tenant", "team-a", "--rpm", "600", "--url", url)
    assert out.returncode == 0, out.stderr
    secret = re.search(r"^key:\s+(sk-shardon-\S+)$", out.stdout, re.M)
    key_id = re.search(r"^id:\s+(key_\w+)$", out.stdout, re.M)
    assert secret and key_id, out.stdout
    assert "shown this once" in out.stderr

    # Shardon is closed now: the key opens it.
    assert call(url, "GET", "/v1/models")[0] == 401
    with openai.OpenAI(base_url=f"{url}/v1", api_key=secret[1], max_retries=0) as client:
        reply = client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "tok0 tok1 "

    listed = shardon("keys", "list", "--url", url, "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["id"] == key_id[1] and row["tenant"] == "team-a" and row["rpm"] == 600
    assert secret[1] not in listed.stdout and "key_sha256" not in row
    table = shardon("keys", "list", "--url", url)
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "TENANT", "SOURCE"]
    assert f"{key_id[1]}  team-a  runtime" in table.stdout

    revoked = shardon("keys", "revoke", key_id[1], "--url", url)
    assert revoked.returncode == 0 and f"revoked {key_id[1]}" in revoked.stdout
    assert call(url, "GET", "/v1/models", key=secret[1])[0] == 401
    again = shardon("keys", "revoke", key_id[1], "--url", url)
    assert again.returncode == 1 and f"404 not_found: no key with id '{key_id[1]}'" in again.stderr


def test_keys_take_the_admin_key(make_mock: Any, make_gateway: Any) -> None:
    node = make_mock(models=["m1"])
    gw = make_gateway(nodes=[{"id": "n", "url": node.url, "models": ["m1"]}], auth={"admin_keys": ["sk-admin-x"]})
    refused = shardon("keys", "list", "--url", gw.url)
    assert refused.returncode == 1 and "401 invalid_api_key: missing admin key" in refused.stderr
    assert shardon("keys", "list", "--url", gw.url, "--admin-key", "sk-admin-x").returncode == 0
    created = shardon("keys", "create", "--url", gw.url, "--models", "m1", SHARDON_ADMIN_KEY="sk-admin-x")
    assert created.returncode == 0, created.stderr
    (row,) = json.loads(shardon("keys", "list", "--url", gw.url, "--json", SHARDON_ADMIN_KEY="sk-admin-x").stdout)
    assert row["tenant"] == "default" and row["models"] == ["m1"]


def test_bad_input_is_refused_with_the_reason(gateway: Any) -> None:
    bad = shardon("keys", "create", "--tenant", "", "--url", gateway.url)
    assert bad.returncode == 1 and "400 invalid_request: invalid key: tenant: must not be empty" in bad.stderr
    usage = shardon("keys", "create", "--max-priority", "urgent", "--url", gateway.url)
    assert usage.returncode == 2 and "invalid choice: 'urgent'" in usage.stderr
    assert shardon("keys", "list", "--url", "ftp://x").returncode == 2
