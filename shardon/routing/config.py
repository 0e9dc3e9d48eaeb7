"""The ``routing:`` section: per public model name, how its requests choose a node, a variant, or
the overflow endpoint. Read from the config file and from ``PATCH /admin/models/{name}``; each
error names its field (``routing.chat.split.chat-v2: ...``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

__all__ = [
    "OVERFLOW_NODE_PREFIX",
    "POLICIES",
    "OverflowConfig",
    "RoutingEntry",
    "overflow_node_id",
    "parse_entry",
    "parse_routing",
]

POLICIES: tuple[str, ...] = ("least_conn", "round_robin", "prefix_affinity")
Policy = Literal["least_conn", "round_robin", "prefix_affinity"]
OVERFLOW_NODE_PREFIX = "overflow:"
# A model name that becomes a response header value (x-shardon-variant): printable ASCII.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class OverflowConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """Where a model's requests go when the local nodes cannot serve them in time."""

    url: str
    """An OpenAI-compatible endpoint: ``http(s)://host[:port]`` (its ``/v1/...`` paths are used)."""
    ca_file: str | None = None
    """PEM file of the CA that signed an ``https://`` endpoint's certificate (a private CA)."""
    api_key: str | None = None
    """Sent as ``Authorization: Bearer``; never shown by the admin API."""
    model: str | None = None
    """The name the endpoint knows the model by (default: the public name)."""
    tenants: list[str] | None = None
    """The tenants whose requests may overflow (all when omitted)."""
    deadline_s: Annotated[float, Meta(gt=0)] | None = None
    """Overflow when the estimated queue wait passes this (default: the request's queue deadline)."""
    max_concurrent: Annotated[int, Meta(ge=1)] = 64
    """Requests in flight at the endpoint at most; past it, requests queue locally."""


class RoutingEntry(Struct, forbid_unknown_fields=True, kw_only=True):
    """One public model name's routing (every key optional)."""

    policy: Policy | None = None
    """How a node of the model is chosen; unset: least connections (or the policy of the split
    that names this model as a variant)."""
    split: dict[str, Annotated[float, Meta(gt=0)]] | None = None
    """Weighted variants under this name, each a model that nodes serve."""
    sticky: Literal["session"] | None = None
    """``session``: a session (the ``user`` field or ``X-Session-ID``) keeps its variant."""
    overflow: OverflowConfig | None = None
    load_bound: Annotated[float, Meta(ge=1)] = 1.25
    """Prefix affinity's bound: the preferred node is skipped once its load would pass this many
    times its share of the model's load."""


def overflow_node_id(model: str) -> str:
    """The id of the node that stands for ``model``'s overflow endpoint (``x-shardon-node``; a node
    id has no ``/``)."""
    return OVERFLOW_NODE_PREFIX + model.replace("/", "_")


def _name(where: str, value: str) -> None:
    if not _HEADER_SAFE.fullmatch(value):
        raise ValueError(f"{where}: a model name is printable ASCII without spaces, got {value!r}")


def parse_entry(name: str, raw: Any) -> RoutingEntry:
    """One entry from its YAML/JSON form; ValueError ``routing.<name>[.field]: why``."""
    where = f"routing.{name}"
    _name(where, name)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping (policy, split, sticky, overflow)")
    policy = raw.get("policy")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"{where}.policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
    try:
        entry = msgspec.convert(raw, RoutingEntry, str_keys=True)
    except msgspec.ValidationError as exc:
        raise ValueError(_located(where, raw, str(exc))) from None
    if entry.split is not None:
        if not entry.split:
            raise ValueError(f"{where}.split: name at least one variant")
        for variant in entry.split:
            _name(f"{where}.split", variant)
            if variant == name:
                raise ValueError(f"{where}.split.{variant}: a variant cannot be the split's own name")
    if entry.sticky is not None and entry.split is None:
        raise ValueError(f"{where}.sticky: only a split has variants to keep")
    overflow = entry.overflow
    if overflow is not None and overflow.model is not None and not overflow.model:
        raise ValueError(f"{where}.overflow.model: must not be empty")
    # (The endpoint's URL and CA file are a node's: shardon.config.validate_node checks them.)
    return entry


def parse_routing(raw: Any) -> dict[str, RoutingEntry]:
    """The whole section; ValueError naming the field. A variant may not be split again."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError("routing: expected a mapping of model names")
    entries = {str(name): parse_entry(str(name), value if value is not None else {}) for name, value in raw.items()}
    check_variants(entries)
    return entries


def check_variants(entries: Mapping[str, RoutingEntry]) -> None:
    """A split's variants are models nodes serve, not splits themselves."""
    for name, entry in entries.items():
        for variant in entry.split or ():
            other = entries.get(variant)
            if other is not None and other.split is not None:
                raise ValueError(f"routing.{name}.split.{variant}: a variant cannot be split again")


_MSGSPEC_PATH = re.compile(r" - at `\$(.*)`$")


def _located(where: str, raw: Mapping[str, Any], message: str) -> str:
    """msgspec's message with its path (``$.split[...]``) spelled with the real keys."""
    match = _MSGSPEC_PATH.search(message)
    if match is None:
        return f"{where}: {message}"
    path = match.group(1)
    text = message[: match.start()]
    steps = re.findall(r"\.([A-Za-z_]\w*)|\[(\d+|\.\.\.)\]", path)
    node: Any = raw
    out = where
    for field, index in steps:
        if field:
            out += "." + field
            node = node.get(field) if isinstance(node, Mapping) else None
        elif index == "..." and isinstance(node, Mapping):
            key = _bad_key(node, text)
            out += f".{key}"
            node = node.get(key)
        else:
            out += f"[{index}]"
            node = node[int(index)] if isinstance(node, list) and index.isdigit() and int(index) < len(node) else None
    return f"{out}: {text}"


def _bad_key(mapping: Mapping[str, Any], message: str) -> str:
    """The key of ``mapping`` whose value msgspec refused (a split weight: the first not > 0)."""
    for key, value in mapping.items():
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            return str(key)
    return "..."
