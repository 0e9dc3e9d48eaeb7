"""The nodes registered through the admin API, persisted in Shardon's database.

`shardon.fleet.Fleet` registers, changes and removes nodes in the registry and writes each change
here, so run-time nodes come back after a restart. A row holds the node's config as JSON (its
``api_key`` included: the node needs it, so it is kept like the database's other secrets, in a file
only Shardon's user reads) and whether it was draining. Like the key table, the file is created at
the first write.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import msgspec

from ..config import NodeConfig
from .schema import SmallTable, create_nodes_table

__all__ = ["NodeRow", "NodeTable"]


class NodeRow(NamedTuple):
    config: NodeConfig
    draining: bool
    created_at: float


class NodeTable(SmallTable):
    """The ``nodes`` table of the database at ``path``; one short connection per call, thread-safe."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, create_nodes_table)

    def load(self) -> list[NodeRow]:
        """Every registered node, oldest first (nothing read, no file created, without a database)."""
        if not self.path.exists():
            return []
        with self._connection() as conn:
            rows = conn.execute("SELECT config, draining, created_at FROM nodes ORDER BY created_at, id").fetchall()
        decode = msgspec.json.Decoder(NodeConfig).decode
        return [NodeRow(decode(config), bool(draining), at) for config, draining, at in rows]

    def save(self, config: NodeConfig, draining: bool) -> None:
        """Insert the node, or replace its config and draining state (its creation time is kept)."""
        now = time.time()
        with self._connection() as conn:
            conn.execute(
                "INSERT INTO nodes (id, config, draining, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(id) DO UPDATE SET config = excluded.config, draining = excluded.draining,"
                " updated_at = excluded.updated_at",
                (config.id, msgspec.json.encode(config).decode(), int(draining), now, now),
            )

    def delete(self, node_id: str) -> None:
        with self._connection() as conn:
            conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
