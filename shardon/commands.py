"""The commands that talk to a running gateway: ``models``, ``ps``, ``keys``, ``nodes`` and ``chat``.

Each takes the parsed arguments and a :class:`~shardon.client.Client`, prints its result and returns
the exit status (1 when the gateway could not be reached or refused).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .client import Client, GatewayError

EXIT_WORDS = ("/exit", "/quit")

_COLUMNS = {
    "models": ("name", "state", "backend", "where", "memory_mb", "in_flight", "queued", "last_used"),
    "ps": ("name", "state", "pid", "url", "where", "memory_mb", "in_flight", "precision"),
    "keys": ("id", "tenant", "source", "rpm", "tpm", "max_priority", "models", "created_at"),
    "nodes": ("id", "source", "state", "in_flight", "weight", "load", "models", "url"),
}
NODE_ACTIONS = ("list", "add", "drain", "undrain", "remove")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], out: TextIO | None = None) -> None:
    out = out if out is not None else sys.stdout  # (looked up when called: a test may have replaced it)

    def cell(row: dict[str, Any], column: str) -> str:
        value = row.get(column)
        if column == "last_used" and isinstance(value, int | float):
            return f"{time.time() - value:.0f}s ago"
        if column == "created_at" and isinstance(value, int | float):
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(value)) if value else "-"
        if isinstance(value, list):
            return ",".join(str(v) for v in value)
        return "-" if value is None or value == "" else str(value)

    table = [[c.upper() for c in columns]] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip(), file=out)


def _fail(exc: GatewayError) -> int:
    print(f"shardon: {exc}", file=sys.stderr)
    return 1


def models(args: argparse.Namespace, client: Client) -> int:
    """``shardon models`` / ``shardon ps``: the admin API's model list (``ps``: running backends)."""
    try:
        rows = client.call("GET", "/admin/models")["data"]
    except GatewayError as exc:
        return _fail(exc)
    if args.command == "ps":
        rows = [r for r in rows if r.get("state") in ("loading", "ready", "unloading") and r.get("pid")]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows, _COLUMNS[args.command])
    return 0


def keys(args: argparse.Namespace, client: Client) -> int:
    """``shardon keys create|list|revoke``: API keys through the admin API."""
    try:
        if args.action == "create":
            spec: dict[str, Any] = {"tenant": args.tenant}
            if args.rpm is not None:
                spec["rpm"] = args.rpm
            if args.tpm is not None:
                spec["tpm"] = args.tpm
            if args.max_priority is not None:
                spec["max_priority"] = args.max_priority
            if args.models is not None:
                spec["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
            key = client.call("POST", "/admin/keys", spec)
            if args.json:
                print(json.dumps(key, indent=2))
            else:
                print(f"id:     {key['id']}")
                print(f"tenant: {key['tenant']}")
                print(f"key:    {key['key']}")
                print("The key is shown this once: keep it now (Shardon stores only its SHA-256).", file=sys.stderr)
        elif args.action == "list":
            rows = client.call("GET", "/admin/keys")["data"]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print_table(rows, _COLUMNS["keys"])
        else:
            client.call("DELETE", f"/admin/keys/{args.id}")
            print(f"revoked {args.id}")
    except GatewayError as exc:
        return _fail(exc)
    return 0


def _node_row(node: dict[str, Any]) -> dict[str, Any]:
    state = node["circuit"] + (", removing" if node.get("removing") else ", draining" if node["draining"] else "")
    load = node.get("load")
    return {
        **node,
        "state": state,
        "in_flight": f"{node['in_flight']}/{node['max_concurrent']}",
        "load": f"{load['running']:g} running, {load['waiting']:g} waiting" if load else None,
    }


def nodes(args: argparse.Namespace, client: Client) -> int:
    """``shardon nodes [list|add|drain|undrain|remove]``: the fleet through the admin API."""
    action = args.action
    if action != "list" and not args.id:
        print(f"shardon: nodes {action} needs the node's id", file=sys.stderr)
        return 2
    try:
        if action == "list":
            rows = client.call("GET", "/admin/nodes")["data"]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print_table([_node_row(r) for r in rows], _COLUMNS["nodes"])
            return 0
        if action == "add":
            if not args.node_url or not args.models:
                print("shardon: nodes add needs ID URL --models a,b", file=sys.stderr)
                return 2
            names = [m.strip() for m in args.models.split(",") if m.strip()]
            models: list[str] | dict[str, str] = names
            if any("=" in m for m in names):
                models = dict(m.split("=", 1) if "=" in m else (m, m) for m in names)
            spec: dict[str, Any] = {"id": args.id, "url": args.node_url, "models": models}
            for field, value in (
                ("max_concurrent", args.max_concurrent),
                ("weight", args.weight),
                ("api_key", args.node_key),
                ("ca_file", args.ca_file),
            ):
                if value is not None:
                    spec[field] = value
            node = client.call("POST", "/admin/nodes", spec)
        elif action in ("drain", "undrain"):
            node = client.call("PATCH", f"/admin/nodes/{args.id}", {"drain": action == "drain"})
        else:
            node = client.call("DELETE", f"/admin/nodes/{args.id}")
    except GatewayError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(node, indent=2))
    elif action == "remove":
        print(f"removed {node['id']}" if node["removed"] else f"removing {node['id']} once its requests finish")
    else:
        print_table([_node_row(node)], _COLUMNS["nodes"])
    return 0


def pick_chat_model(entries: Sequence[dict[str, Any]]) -> str | None:
    """The model ``shardon chat`` talks to without ``--model``: the first that takes chat requests
    (``/v1/models`` says ``"chat": false`` of a base model), a loaded one first."""
    chat = [e for e in entries if e.get("chat", True)]
    chat.sort(key=lambda e: not e.get("loaded", True))
    return chat[0]["id"] if chat else None


def chat(
    args: argparse.Namespace,
    client: Client,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> int:
    """``shardon chat``: a conversation in the terminal, each answer streamed as it is generated.

    ``/exit`` (or end of input) leaves; Ctrl-C stops an answer (the generation with it).
    """
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    model = args.model
    try:
        if model is None:
            model = pick_chat_model(client.models())
            if model is None:
                print("shardon: the gateway serves no chat model (give one with --model)", file=sys.stderr)
                return 1
    except GatewayError as exc:
        return _fail(exc)
    print(f"Chatting with {model} at {client.url} ({' or '.join(EXIT_WORDS)} to leave).", file=out, flush=True)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    options: dict[str, Any] = {}
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print(file=out)
            return 130
        text = line.strip()
        if not text:
            continue
        if text in EXIT_WORDS:
            return 0
        messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            for piece in client.stream_chat(model, messages, **options):
                pieces.append(piece)
                out.write(piece)
                out.flush()
            print(file=out, flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", file=out, flush=True)
        except GatewayError as exc:
            print(file=out, flush=True)
            print(f"shardon: {exc}", file=sys.stderr, flush=True)
            if not pieces:
                messages.pop()  # nothing came back: ask again later as if this turn had not happened
                continue
        messages.append({"role": "assistant", "content": "".join(pieces)})
