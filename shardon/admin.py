"""The admin API (``/admin/*``): keys, nodes, the request log, statistics, status.

Every call is authenticated with an admin key (``auth.admin_keys``; loopback only while none is
configured) — ``/v1`` keys are refused. Calls that change something are written to the audit log.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from . import __version__, errors
from .auth import create_key_decoder
from .rsgi import HTTPProtocol, Scope
from .store import format_request_id, queries, receipt_for

if TYPE_CHECKING:
    from .app import Gateway

JSON = [("content-type", "application/json")]

AdminHandler = Callable[[Scope, HTTPProtocol, str, list[str]], Awaitable[Any]]


class Admin:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        # (method, first path segment after /admin/, number of further segments) → handler
        self.table: dict[tuple[str, str, int], AdminHandler] = {
            ("POST", "keys", 0): self.create_key,
            ("GET", "keys", 0): self.list_keys,
            ("DELETE", "keys", 1): self.revoke_key,
            ("GET", "requests", 0): self.requests,
            ("GET", "requests", 1): self.request,
            ("GET", "stats", 0): self.stats,
            ("GET", "stats", 1): self.stats_sub,
            ("GET", "status", 0): self.status,
            ("GET", "audit", 0): self.audit,
            ("GET", "models", 0): self.models,
            ("PATCH", "models", 1): self.route_model,
            ("POST", "nodes", 0): self.register_node,
            ("GET", "nodes", 0): self.list_nodes,
            ("GET", "nodes", 1): self.get_node,
            ("PATCH", "nodes", 1): self.change_node,
            ("DELETE", "nodes", 1): self.delete_node,
        }

    def register(self, method: str, segment: str, extra: int, handler: AdminHandler) -> None:
        self.table[(method, segment, extra)] = handler

    def enable_models(self) -> None:
        """The model-lifecycle endpoints, when Shardon manages models."""
        self.register("POST", "models", 2, self.model_action)
        self.register("GET", "gpus", 0, self.gpus)

    async def handle(self, scope: Scope, proto: HTTPProtocol) -> None:
        parts = [p for p in scope.path[len("/admin/") :].split("/") if p]
        try:
            actor = self.gw.ui.admin_caller(scope)  # the admin key, or the dashboard's session cookie
            if not parts:
                raise errors.NotFound(f"no route for {scope.method} {scope.path}")
            handler = self.table.get((scope.method, parts[0], len(parts) - 1))
            if handler is None:
                if any(key[1:] == (parts[0], len(parts) - 1) for key in self.table):
                    raise errors.MethodNotAllowed(f"method {scope.method} not allowed on {scope.path}")
                raise errors.NotFound(f"no route for {scope.method} {scope.path}")
            result = await handler(scope, proto, actor, parts[1:])
        except errors.ShardonError as err:
            proto.response_bytes(err.status, err.headers(), err.body())
            return
        except ValueError as exc:  # a bad query parameter: "param: why"
            param, _, why = str(exc).partition(":")
            bad = errors.BadRequest(f"invalid {param}:{why}", param=param.strip() or None)
            proto.response_bytes(bad.status, bad.headers(), bad.body())
            return
        if result is not None:
            status, body = result
            proto.response_bytes(status, JSON, orjson.dumps(body, default=str))

    def _log(self) -> Any:
        log = self.gw.request_log
        if log is None:
            raise errors.NotFound("the request log is disabled")
        return log

    def _audit(self, actor: str, action: str, target: str | None, detail: dict[str, Any] | None = None) -> None:
        if self.gw.request_log is not None:
            self.gw.request_log.audit(actor, action, target, detail)

    # -- keys -------------------------------------------------------------------------------
    async def create_key(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        body = await proto()
        try:
            spec = create_key_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise errors.BadRequest(f"invalid key: {exc}") from None
        except msgspec.DecodeError as exc:
            raise errors.BadRequest(f"request body is not valid JSON: {exc}") from None
        key, secret = await self.gw.keys.create(spec)
        self._audit(actor, "key.create", key.id, {"tenant": key.tenant})
        out = key.public()
        out["key"] = secret  # shown this once
        return 201, out

    async def list_keys(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        return 200, {"data": self.gw.keys.list()}

    async def revoke_key(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        key = await self.gw.keys.revoke(args[0])
        if key is None:
            raise errors.NotFound(f"no key with id '{args[0]}'")
        self._audit(actor, "key.revoke", key.id, {"tenant": key.tenant})
        return 200, {"id": key.id, "revoked": True}

    # -- nodes (shardon.fleet) ----------------------------------------------------------------
    async def register_node(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        fleet = self.gw.fleet
        return 201, fleet.public(await fleet.register(await proto(), actor))

    async def list_nodes(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        return 200, {"data": self.gw.fleet.listing()}

    async def get_node(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        fleet = self.gw.fleet
        return 200, fleet.public(fleet.get(args[0]))

    async def change_node(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        fleet = self.gw.fleet
        return 200, fleet.public(await fleet.change(args[0], await proto(), actor))

    async def delete_node(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        fleet = self.gw.fleet
        node, gone = await fleet.delete(args[0], actor)
        out = fleet.public(node)
        out["removed"] = gone
        return (200 if gone else 202), out

    # -- models -----------------------------------------------------------------------------
    async def models(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        """Every model: those started on demand with their lifecycle state, and the nodes' own."""
        gw = self.gw
        rows: list[dict[str, Any]] = []
        managed: set[str] = set()
        if gw.lifecycle is not None:
            for row in gw.lifecycle.models_status():
                managed.add(row["name"])
                route = gw.scheduler.route(row["name"])
                row["queued"] = route.waiting if route is not None else 0
                rows.append(row)
        balancer = gw.scheduler.balancer
        for name, route in sorted(gw.scheduler.routes.items()):
            if name in managed:
                continue
            nodes = [gw.registry.by_index[i] for i in route.candidates if i in gw.registry.by_index]
            rows.append(
                {
                    "name": name,
                    "state": "ready" if any(n.healthy for n in nodes) else "unavailable",
                    "backend": "remote",
                    "where": ",".join(n.id for n in nodes),
                    "in_flight": sum(balancer.inflight(n.index) for n in nodes),
                    "queued": route.waiting,
                    "pinned": True,
                }
            )
        routed = set(gw.router.routed_names())
        for row in rows:
            if row["name"] in routed:
                row["routing"] = gw.router.describe(row["name"])
        return 200, {"data": rows}

    async def route_model(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        """Change a model's routing: ``{"policy", "split", "sticky", "overflow", "load_bound"}``, each
        key given replacing the current one (null clears it)."""
        body = await proto()
        try:
            patch = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise errors.BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(patch, dict):
            raise errors.BadRequest("expected a JSON object: policy, split, sticky, overflow")
        name = args[0]
        routing = self.gw.router.update(name, patch)  # a bad field: ValueError, a 400 naming it
        detail = {k: v for k, v in patch.items() if k != "overflow"}
        if "overflow" in patch:
            detail["overflow"] = routing["overflow"]  # (without its key)
        self._audit(actor, "model.routing", name, detail)
        return 200, routing

    async def model_action(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        lifecycle = self.gw.lifecycle
        name, action = args
        if lifecycle is None or not lifecycle.knows(name):
            raise errors.ModelNotFound(f"no managed model named '{name}'")
        if action == "load":
            self._audit(actor, "model.load", name)
            await lifecycle.load(name)
        elif action == "unload":
            self._audit(actor, "model.unload", name)
            await lifecycle.unload(name)
        else:
            raise errors.NotFound(f"no model action '{action}' (load, unload)")
        canonical = lifecycle.resolve(name)
        row = next((r for r in lifecycle.models_status() if r["name"] == canonical), {"name": canonical})
        return 200, row

    async def gpus(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        assert self.gw.lifecycle is not None
        return 200, self.gw.lifecycle.gpus_status()

    # -- request log ------------------------------------------------------------------------
    async def requests(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        kwargs = queries.parse_requests_query(scope.query_string)
        return 200, await self._log().query(**kwargs)

    async def request(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        request_id = queries.parse_request_id(args[0])  # the hex id of x-request-id → int
        row = await self._log().get(request_id)
        if row is None:
            raise errors.NotFound(f"no request with id '{format_request_id(request_id)}'")
        if row.get("receipt") is None and row.get("finished_at") is not None:
            row["receipt"] = receipt_for(row)
        return 200, row

    async def stats(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        kwargs = queries.parse_stats_query(scope.query_string)
        out = await self._log().stats(**kwargs)
        out["in_flight"] = self.gw.in_flight
        out["queued"] = sum(self.gw.scheduler.queue_depths().values())
        return 200, out

    async def stats_sub(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        if args[0] == "models":
            return 200, await self._log().stats_by_model(**queries.parse_stats_by_model_query(scope.query_string))
        if args[0] == "tenants":
            return 200, await self._log().stats_by_tenant(**queries.parse_usage_query(scope.query_string))
        raise errors.NotFound(f"no statistics named '{args[0]}'")

    async def audit(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        return 200, await self._log().audit_entries(**queries.parse_audit_query(scope.query_string))

    async def status(self, scope: Scope, proto: HTTPProtocol, actor: str, args: list[str]) -> Any:
        gw = self.gw
        nodes = [gw.fleet.public(node) for node in gw.registry.nodes.values()]
        body: dict[str, Any] = {
            "version": __version__,
            "uptime_s": round(time.time() - gw.started_at, 3),
            "draining": gw.draining,
            "in_flight": gw.in_flight,
            "queues": gw.scheduler.queue_depths(),
            "nodes": nodes,
            "models": sorted(gw.scheduler.routes),
        }
        if gw.request_log is not None:
            body["request_log"] = {
                "path": str(gw.request_log.path),
                "pending": gw.request_log.pending,
                "backlog_bytes": gw.request_log.backlog_bytes,
                "written": gw.request_log.written,
                "dropped": gw.request_log.dropped,
            }
        access = gw.access_log
        if access is not None:
            body["access_log"] = {
                "path": str(access.path) if access.path is not None else "stderr",
                "pending": access.pending,
                "written": access.written,
                "dropped": access.dropped,
                "write_errors": access.write_errors,
            }
        return 200, body
