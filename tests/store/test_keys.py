"""The persisted API keys (shardon.store.keys), and the gateway keeping them with the request log off."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from shardon.auth import CreateKey, KeyStore, digest
from shardon.config import AuthConfig
from shardon.store import KeyTable
from shardon.store.keys import KeyRow
from tests.store.store_helpers import open_log
from tests.support import node_entry, post

CHAT = b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":3}'


def row(key_id: str, **kw: Any) -> KeyRow:
    fields: dict[str, Any] = {
        "id": key_id,
        "key_sha256": digest("secret-" + key_id),
        "tenant": "t",
        "rpm": None,
        "tpm": None,
        "max_priority": None,
        "models": None,
        "created_at": 1.0,
    }
    fields.update(kw)
    return KeyRow(**fields)


def test_a_table_that_was_never_written_creates_no_file(tmp_path: Path) -> None:
    table = KeyTable(tmp_path / "sub" / "shardon.db")
    assert table.load() == ([], False)
    assert not (tmp_path / "sub").exists()


def test_keys_round_trip_and_revocation(tmp_path: Path) -> None:
    db = tmp_path / "shardon.db"
    table = KeyTable(db)
    a = row("a", rpm=60.0, tpm=1000.0, max_priority="high", models=["m1", "m2"])
    table.insert(a)
    table.insert(row("b"))
    keys, ever = KeyTable(db).load()  # a new accessor, as after a restart
    assert ever and sorted(keys) == sorted([a, row("b")])
    table.revoke("b", at=5.0)
    keys, ever = KeyTable(db).load()
    assert keys == [a] and ever
    table.revoke("a")
    assert KeyTable(db).load() == ([], True)  # revoked keys still count as "ever keyed"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        stored = conn.execute("SELECT id, key_sha256, models, revoked_at FROM api_keys ORDER BY id").fetchall()
    assert stored[0][:3] == ("a", a.key_sha256, json.dumps(["m1", "m2"], separators=(",", ":")))
    assert stored[1][3] == 5.0 and abs(stored[0][3] - time.time()) < 60
    assert all("secret" not in str(v) for r in stored for v in r)  # digests only


def test_keys_share_the_request_logs_database(tmp_path: Path) -> None:
    with open_log(tmp_path) as rl:
        table = KeyTable(rl.path)
        table.insert(row("a"))
        assert table.load()[0] == [row("a")]
        with contextlib.closing(rl.connect_readonly()) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"requests", "audit", "api_keys"} <= tables


def test_key_store_persists_through_the_table(tmp_path: Path) -> None:
    db = tmp_path / "shardon.db"
    store = KeyStore(AuthConfig(), [], db)
    key, secret = asyncio.run(store.create(CreateKey(tenant="t", rpm=10.0, models=["m1"])))
    again = KeyStore(AuthConfig(), [], db)  # restart
    principal = again.authenticate(f"Bearer {secret}", None)
    assert principal.key is not None and principal.key.id == key.id and principal.key.models == ["m1"]
    assert asyncio.run(again.revoke(key.id)) is not None
    third = KeyStore(AuthConfig(), [], db)
    assert third.list() == [] and not third.open  # revoked, and the gateway stays closed


def test_keys_persist_with_the_request_log_off(make_mock: Any, make_gateway: Any, tmp_path: Path) -> None:
    """``request_log: false`` turns off the request rows, not the keys created at run time."""
    node = make_mock(models=["m1"], name="n")
    db = tmp_path / "keys.db"
    config = {"nodes": [node_entry(node, "n", ["m1"])], "request_log": False, "store": {"path": str(db)}}
    gw = make_gateway(dict(config))
    assert not db.exists()  # nothing written until a key is
    status, _, body = post(gw.url, "/admin/keys", b'{"tenant": "t"}')
    assert status == 201, body
    secret = json.loads(body)["key"]
    gw.stop()
    assert db.exists()
    gw2 = make_gateway(dict(config))
    assert post(gw2.url, "/v1/chat/completions", CHAT)[0] == 401  # the gateway is keyed now
    assert post(gw2.url, "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {secret}"})[0] == 200


def test_a_keys_overflow_setting_is_kept_and_an_older_table_gets_it(tmp_path: Path) -> None:
    db = tmp_path / "shardon.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:  # the table before it had the column
        conn.execute(
            "CREATE TABLE api_keys (id TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, "
            "rpm REAL, tpm REAL, max_priority TEXT, models TEXT, created_at REAL NOT NULL, revoked_at REAL)"
        )
        conn.execute("INSERT INTO api_keys (id, key_sha256, tenant, created_at) VALUES ('old', 'x', 't', 1.0)")
        conn.commit()
    table = KeyTable(db)
    table.insert(row("local-only", overflow=False))
    keys = {k.id: k for k in KeyTable(db).load()[0]}
    assert keys["old"].overflow is True and keys["local-only"].overflow is False
    store = KeyStore(AuthConfig(), [], db)
    key, secret = asyncio.run(store.create(CreateKey(tenant="t", overflow=False)))
    assert key.public()["overflow"] is False
    again = KeyStore(AuthConfig(), [], db)  # after a restart
    assert again.authenticate(f"Bearer {secret}", None).overflow is False


def test_writes_from_the_loop_run_off_it_in_order(tmp_path: Path) -> None:
    """What the admin API does: a key created and revoked, many times over, each write awaited from the
    event loop. They run in the tables' own thread (the loop's thread never opens the database) and
    in the order asked, so the table ends as the keys in memory."""
    import threading

    keys = KeyStore(AuthConfig(), [], tmp_path / "shardon.db")
    assert keys.table is not None
    writers: set[str] = set()
    insert = keys.table.insert

    def spy(key: KeyRow) -> None:
        writers.add(threading.current_thread().name)
        insert(key)

    async def main() -> list[str]:
        assert keys.table is not None
        keys.table.insert = spy  # type: ignore[method-assign]
        kept = []
        for n in range(20):
            key, _ = await keys.create(CreateKey(tenant=f"t{n}"))
            if n % 3:
                assert await keys.revoke(key.id) is key
            else:
                kept.append(key.id)
        return kept

    kept = asyncio.run(main())
    assert writers and threading.current_thread().name not in writers
    assert all(name.startswith("shardon-tables") for name in writers)
    rows, _ = KeyTable(tmp_path / "shardon.db").load()  # the keys not revoked
    assert (
        sorted(r.id for r in rows)
        == sorted(kept)
        == sorted(k["id"] for k in KeyStore(AuthConfig(), [], tmp_path / "shardon.db").list())
    )
