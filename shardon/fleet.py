"""The fleet at run time: nodes registered, changed, drained and removed through the admin API.

`Fleet` is what ``/admin/nodes`` calls (`shardon.admin`): it checks a request, changes the registry
(`shardon.nodes`), keeps the nodes registered here in the store (`shardon.store.NodeTable`) so they
come back after a restart, and writes an audit entry for every change. Nodes of every source are
shown and may be changed or drained; only those registered here (``source: admin``) may be deleted.
A change to a config node lasts until the restart (the config file is its source); a lifecycle
node's models are the lifecycle's. A node's ``api_key`` is never shown nor audited.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from . import errors
from .config import NodeConfig, validate_node
from .errors import ConfigError
from .store import NodeTable

if TYPE_CHECKING:
    from .app import Gateway
    from .nodes import Node

__all__ = ["Fleet", "NodePatch"]

log = logging.getLogger("shardon.fleet")


class NodePatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PATCH /admin/nodes/{id}``: the fields to change, and ``drain`` on or off."""

    weight: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_concurrent: Annotated[int, msgspec.Meta(ge=1)] | None = None
    models: list[str] | dict[str, str] | None = None
    labels: dict[str, str] | None = None
    drain: bool | None = None


_node_decoder = msgspec.json.Decoder(NodeConfig)
_patch_decoder = msgspec.json.Decoder(NodePatch)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes, what: str) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        param = msg.rsplit("`$.", 1)[1].rstrip("`") if "`$." in msg else None
        if "missing required field" in msg:
            param = msg.split("`")[1]
        raise errors.BadRequest(f"invalid {what}: {msg}", param=param) from None
    except msgspec.DecodeError as exc:
        raise errors.BadRequest(f"request body is not valid JSON: {exc}") from None


class Fleet:
    """Run-time changes to the registry, persisted and audited."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.table = NodeTable(gateway.paths.database)

    @property
    def registry(self) -> Any:
        return self.gw.registry

    def restore(self) -> None:
        """The nodes registered before the last stop, back in the registry (a config node of the
        same id wins: the registered one is skipped, and said)."""
        for row in self.table.load():
            if row.config.id in self.registry.nodes:
                log.warning("registered node %s not restored: the config has a node of that id", row.config.id)
                continue
            try:
                validate_node(row.config, f"registered node {row.config.id}")
            except ConfigError as exc:
                log.warning("registered node not restored: %s", exc)
                continue
            node = self.registry.add(row.config, source="admin")
            if row.draining:
                self.registry.set_draining(node, True)

    # -- reads ----------------------------------------------------------------------------------
    def get(self, node_id: str) -> Node:
        node = self.registry.nodes.get(node_id)
        if node is None:
            raise errors.NotFound(f"no node with id '{node_id}'", param="id")
        return node

    def public(self, node: Node) -> dict[str, Any]:
        """The node as ``/admin/nodes`` shows it: its state, its load, what runs on it."""
        out = node.snapshot()
        out["in_flight"] = self.gw.scheduler.balancer.inflight(node.index)
        out["capacity"] = node.max_concurrent
        return out

    def listing(self) -> list[dict[str, Any]]:
        return [self.public(node) for node in sorted(self.registry.nodes.values(), key=lambda n: n.id)]

    # -- changes --------------------------------------------------------------------------------
    async def register(self, body: bytes, actor: str) -> Node:
        """``POST /admin/nodes``: a new node, routable at once (400 bad, 409 duplicate)."""
        config = _decode(_node_decoder, body, "node")
        try:
            validate_node(config, "node")
        except ConfigError as exc:
            where, _, why = str(exc).partition(": ")
            raise errors.BadRequest(f"invalid {where}: {why}", param=where.removeprefix("node.")) from None
        if config.id.startswith("lifecycle:"):
            raise errors.BadRequest(
                "invalid node.id: ids starting with 'lifecycle:' are the model lifecycle's", param="id"
            )
        if config.id in self.registry.nodes:
            raise errors.Conflict(f"a node with id '{config.id}' exists already", param="id")
        node = self.registry.add(config, source="admin")
        await self.table.write(self.table.save, config, False)
        self._audit(actor, "node.register", node, {"url": config.url, "models": sorted(node.models)})
        log.info("node %s registered by %s: %s", node.id, actor, config.url)
        return node

    async def change(self, node_id: str, body: bytes, actor: str) -> Node:
        """``PATCH /admin/nodes/{id}``: weight, max_concurrent, models, labels, drain on or off."""
        node = self.get(node_id)
        patch = _decode(_patch_decoder, body or b"{}", "change")
        fields = {
            name: value
            for name in ("weight", "max_concurrent", "models", "labels")
            if (value := getattr(patch, name)) is not None
        }
        if "models" in fields:
            if not fields["models"]:
                raise errors.BadRequest("invalid change: a node must serve at least one model", param="models")
            if node.source == "lifecycle":
                raise errors.Conflict(f"node '{node.id}' runs a model Shardon starts: its models are the lifecycle's")
            if node.source == "routing":
                raise errors.Conflict(f"node '{node.id}' is an overflow endpoint: it serves no model (see routing)")
        if fields:
            self.registry.update(node, msgspec.structs.replace(node.config, **fields))
        if patch.drain is not None and patch.drain != node.draining:
            if node.removing:
                raise errors.Conflict(f"node '{node.id}' is being removed", param="drain")
            self.registry.set_draining(node, patch.drain)
        if node.source == "admin":
            await self.table.write(self.table.save, node.config, node.draining)
        detail: dict[str, Any] = dict(fields)
        if patch.drain is not None:
            detail["drain"] = patch.drain
        self._audit(actor, "node.update", node, detail)
        return node

    async def delete(self, node_id: str, actor: str) -> tuple[Node, bool]:
        """``DELETE /admin/nodes/{id}``: drain, then gone once nothing runs on it; (node, gone now)."""
        node = self.get(node_id)
        if node.source != "admin":
            raise errors.Conflict(
                f"node '{node.id}' comes from the {node.source}: it can be drained (PATCH drain), not deleted"
            )
        await self.table.write(self.table.delete, node.id)
        gone = self.registry.retire(node)
        self._audit(actor, "node.remove", node, {"drained": gone})
        log.info("node %s removed by %s%s", node.id, actor, "" if gone else " once its requests finish")
        return node, gone

    def _audit(self, actor: str, action: str, node: Node, detail: dict[str, Any]) -> None:
        if self.gw.request_log is not None:
            self.gw.request_log.audit(actor, action, node.id, {"source": node.source, **detail})
