"""The routing table's owner: the ``routing:`` entries, applied to the scheduler's routes.

Each entry configures a public model name. What a route carries after `Router.apply`:

- ``route.policy``: the node choice of its requests (None: least connections), the entry's own
  policy, else that of a split naming the model as a variant;
- ``route.rules``: what the exchange applies to a request for the name (None for a plain route):
  its ``split`` and the ``overflow`` it may take (the entry's own, else its split's).

An overflow endpoint is a node of the registry (``overflow:<name>``) that is no route's candidate;
the routes that may overflow to it know the endpoint's model name (``served_names``). The admin API
changes an entry at run time through `Router.update` (audited by the caller); nothing of it is
persisted: the config file is what a restart reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ..config import overflow_node, validate_overflow
from ..errors import BadRequest, ConfigError, ModelNotFound
from ..schemas import FormRouting, session_decoder
from .config import RoutingEntry, check_variants, parse_entry
from .overflow import Overflow
from .policies import PrefixAffinity, RoundRobin
from .split import Split

__all__ = ["Router", "Rules"]

_PATCHABLE = ("policy", "split", "sticky", "overflow", "load_bound")


class Rules:
    """What the exchange applies to a request for a route's name: its split, the overflow it may take."""

    __slots__ = ("overflow", "sessions", "split")

    def __init__(self, split: Split | None, overflow: Overflow | None) -> None:
        self.split = split
        self.overflow = overflow
        self.sessions = split is not None and split.sticky  # a session is read for the split

    def apply(self, ex: Any, headers: Any) -> Any:
        """Route the request of exchange ``ex`` (in `Exchange.prepare`): a split's variant (its route
        then serves it), the key of the route's node policy, the overflow this caller may take.
        Returns the route that serves it."""
        session = headers.get("x-session-id")
        if session is None and self.sessions:
            session = _user_field(ex)
        rules: Rules | None = self
        split = self.split
        if split is not None:
            variant = split.choose(session)
            route = ex.core.scheduler.routes.get(variant)
            if route is None:
                raise ModelNotFound(f"the variant '{variant}' of model '{ex.rec.model}' does not exist")
            ex.route = route
            ex.variant = ex.rec.variant = variant
            rules = route.rules
        route = ex.route
        policy = route.policy
        if policy is not None:
            if session is None and policy.sessions and not self.sessions:
                session = _user_field(ex)
            ex.affinity = policy.key(session, ex.body)
        overflow = None if rules is None else rules.overflow
        if overflow is not None and overflow.allows(ex.principal):
            ex.overflow = overflow
        return route


def _user_field(ex: Any) -> str | None:
    """The request's ``user`` field: a form's routing fields have it, a JSON body is read for it."""
    req = ex.req
    if isinstance(req, FormRouting):
        return req.user
    try:
        return session_decoder.decode(ex.body).user
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}", param="user") from None


def _same_endpoint(a: Any, b: Any) -> bool:
    return bool(a.url == b.url and a.api_key == b.api_key and a.ca_file == b.ca_file)


class Router:
    def __init__(self, entries: Mapping[str, RoutingEntry], *, scheduler: Any, registry: Any) -> None:
        self.entries: dict[str, RoutingEntry] = dict(entries)
        self.scheduler = scheduler
        self.registry = registry
        self._policies: dict[str, Any] = {}
        self._splits: dict[str, Split] = {}
        self._overflows: dict[str, tuple[Any, Overflow]] = {}  # entry name → (its config, rule)
        self._served: dict[str, int] = {}  # route name → the overflow node index in its served_names

    # -- applying ---------------------------------------------------------------------------
    def apply(self) -> None:
        """Set every configured route's policy and rules from the entries (and their splits)."""
        entries = self.entries
        self._sync_overflow_nodes()
        parents: dict[str, RoutingEntry] = {}
        for entry in entries.values():
            for variant in entry.split or ():
                parents.setdefault(variant, entry)
        parent_names = {id(e): n for n, e in entries.items()}
        names = set(entries) | set(parents)
        for route in self.scheduler.routes.values():
            if route.name not in names and (route.policy is not None or route.rules is not None):
                self._clear(route)
        for name in names:
            route = self.scheduler.ensure_route(name)
            own = entries.get(name)
            parent = parents.get(name)
            source = own if own is not None and own.policy is not None else parent
            route.policy = self._policy(name, source)
            split = self._split(name, own)
            overflow = None
            if own is not None and own.overflow is not None:
                overflow = self._overflows[name][1]
            elif parent is not None and parent.overflow is not None:
                overflow = self._overflows[parent_names[id(parent)]][1]
            self._serve_overflow(route, overflow)
            has_rules = split is not None or overflow is not None or route.policy is not None
            route.rules = Rules(split, overflow) if has_rules else None

    def _clear(self, route: Any) -> None:
        route.policy = None
        route.rules = None
        self._serve_overflow(route, None)
        self._policies.pop(route.name, None)

    def _policy(self, name: str, entry: RoutingEntry | None) -> Any:
        kind = None if entry is None else entry.policy
        policy = self._policies.get(name)
        if kind is None or kind == "least_conn":
            self._policies.pop(name, None)
            return None
        if policy is None or policy.name != kind:
            policy = self._policies[name] = PrefixAffinity() if kind == "prefix_affinity" else RoundRobin()
        if isinstance(policy, PrefixAffinity):
            assert entry is not None
            policy.load_bound = entry.load_bound
        return policy

    def _split(self, name: str, entry: RoutingEntry | None) -> Split | None:
        if entry is None or entry.split is None:
            self._splits.pop(name, None)
            return None
        split = self._splits.get(name)
        sticky = entry.sticky == "session"
        if split is None or dict(zip(split.names, split.weights, strict=True)) != entry.split or split.sticky != sticky:
            split = self._splits[name] = Split(entry.split, sticky)
        return split

    def _sync_overflow_nodes(self) -> None:
        """An endpoint node per entry with an overflow. A change that keeps the endpoint (its URL,
        key and CA file) is made in place; a new endpoint replaces the node, and a dropped overflow
        removes it (requests running there are cut: before their first byte they retry locally)."""
        registry = self.registry
        for name in list(self._overflows):
            config, rule = self._overflows[name]
            entry = self.entries.get(name)
            new = None if entry is None else entry.overflow
            if new == config:
                continue
            node = registry.nodes.get(rule.node_id)
            if new is not None and node is not None and _same_endpoint(new, config):
                registry.update(node, overflow_node(name, new))
                self._overflows[name] = (new, Overflow(name, new, node.id, node.index))
            else:
                del self._overflows[name]
                registry.remove(rule.node_id)
        for name, entry in self.entries.items():
            config = entry.overflow
            if config is None or name in self._overflows:
                continue
            node = registry.add(overflow_node(name, config), source="routing")
            self._overflows[name] = (config, Overflow(name, config, node.id, node.index))

    def _serve_overflow(self, route: Any, overflow: Overflow | None) -> None:
        """The route's requests sent to ``overflow``'s node name the model as the endpoint knows it."""
        old = self._served.pop(route.name, None)
        if old is not None:
            route.served_names.pop(old, None)
        if overflow is not None:
            route.served_names[overflow.index] = overflow.served
            self._served[route.name] = overflow.index

    # -- the admin API ----------------------------------------------------------------------
    def update(self, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Change ``name``'s entry: each key given replaces the entry's (null clears it); ValueError
        ``routing.<name>.<field>: why`` for a bad one, ModelNotFound for a model nobody serves (a
        split makes a new name)."""
        unknown = [key for key in patch if key not in _PATCHABLE]
        if unknown:
            raise ValueError(f"routing.{name}.{unknown[0]}: not a field that can change ({', '.join(_PATCHABLE)})")
        current = self.entries.get(name)
        merged: dict[str, Any] = msgspec.to_builtins(current) if current is not None else {}
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        if "split" in patch and patch["split"] is None and "sticky" not in patch:
            merged.pop("sticky", None)  # a split's own setting goes with it
        entry = parse_entry(name, merged)
        if entry.overflow is not None:
            try:
                validate_overflow(name, entry.overflow)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if entry.split is None and name not in self.scheduler.routes:
            raise ModelNotFound(f"no model named '{name}'")
        entries = dict(self.entries)
        entries[name] = entry
        check_variants(entries)
        self.entries = entries
        self.apply()
        return self.describe(name)

    def describe(self, name: str) -> dict[str, Any]:
        """A model's routing as the admin API shows it (an overflow's key never shown)."""
        route = self.scheduler.routes.get(name)
        entry = self.entries.get(name)
        policy = route.policy if route is not None else None
        out: dict[str, Any] = {
            "name": name,
            "policy": "least_conn" if policy is None else policy.name,
            "split": None,
            "sticky": None,
            "overflow": None,
        }
        if entry is not None:
            out["split"] = entry.split
            out["sticky"] = entry.sticky
            out["load_bound"] = entry.load_bound
        rules = route.rules if route is not None else None
        overflow = rules.overflow if rules is not None else None
        if overflow is not None:
            config = self._overflows[overflow.model][0]
            out["overflow"] = {
                "node": overflow.node_id,
                "url": config.url,
                "model": overflow.served,
                "tenants": config.tenants,
                "deadline_s": config.deadline_s,
                "max_concurrent": config.max_concurrent,
                "from": overflow.model,
            }
        return out

    def routed_names(self) -> list[str]:
        """The models with routing rules or a policy."""
        return sorted(n for n, r in self.scheduler.routes.items() if r.rules is not None or r.policy is not None)
