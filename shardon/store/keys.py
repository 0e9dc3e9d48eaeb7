"""The API keys created at run time, persisted (digest only) in Shardon's database.

`shardon.auth.KeyStore` keeps the keys in memory and writes each change here, so run-time keys
survive a restart. The table lives in the same SQLite file as the request log, whether the request
log is on or not; the file is created only when a key is first created (a gateway that never
creates one writes nothing here).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import msgspec

from .schema import SmallTable, create_keys_table

__all__ = ["KeyRow", "KeyTable"]


class KeyRow(NamedTuple):
    """A persisted key: everything but the secret, which is never stored."""

    id: str
    key_sha256: str
    tenant: str
    rpm: float | None
    tpm: float | None
    max_priority: str | None
    models: list[str] | None
    created_at: float
    overflow: bool = True  # False: never sent to an overflow endpoint


class KeyTable(SmallTable):
    """The ``api_keys`` table of the database at ``path``; one short connection per call, thread-safe."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, create_keys_table)

    def load(self) -> tuple[list[KeyRow], bool]:
        """The keys not revoked, and whether any key (revoked ones too) was ever created.

        Reads nothing, and creates no file, when the database does not exist yet.
        """
        if not self.path.exists():
            return [], False
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT id, key_sha256, tenant, rpm, tpm, max_priority, models, created_at, overflow"
                " FROM api_keys WHERE revoked_at IS NULL"
            ).fetchall()
            ever = bool(conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0])
        keys = [
            KeyRow(
                key_id,
                sha,
                tenant,
                rpm,
                tpm,
                priority,
                msgspec.json.decode(models) if models else None,
                created,
                bool(overflow),
            )
            for key_id, sha, tenant, rpm, tpm, priority, models, created, overflow in rows
        ]
        return keys, ever

    def insert(self, key: KeyRow) -> None:
        models = msgspec.json.encode(key.models).decode() if key.models is not None else None
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, key_sha256, tenant, rpm, tpm, max_priority, models, created_at, overflow)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*key[:6], models, key.created_at, int(key.overflow)),  # (KeyRow is in the columns' order)
            )

    def revoke(self, key_id: str, at: float | None = None) -> None:
        with self._connection() as conn:
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time() if at is None else at, key_id))
