"""Command line → Config, then serve; the commands that talk to a running gateway are in
``commands.py``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__, commands
from .client import Client, GatewayError
from .config import Config, load_config
from .errors import ConfigError

_GATEWAY_COMMANDS = {
    "models": commands.models,
    "ps": commands.models,
    "keys": commands.keys,
    "nodes": commands.nodes,
    "chat": commands.chat,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardon", description="LLM routing and scheduling gateway")
    parser.add_argument("--version", action="version", version=f"shardon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", "-c", required=True)
    doctor = sub.add_parser("doctor", help="check this machine and config; say what to fix (exit 1 if anything fails)")
    doctor.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    for name, text in (("models", "list every model and its state"), ("ps", "list running model backends")):
        cmd = sub.add_parser(name, help=f"{text} (asks a running gateway's admin API)")
        _gateway_options(cmd, admin=True)
        cmd.add_argument("--json", action="store_true", help="print the raw JSON")
    keys = sub.add_parser("keys", help="create, list or revoke API keys (a running gateway's admin API)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print its secret (shown once)")
    create.add_argument("--tenant", default="default", help="the tenant the key belongs to (default: default)")
    create.add_argument("--rpm", type=float, help="requests per minute allowed")
    create.add_argument("--tpm", type=float, help="tokens per minute allowed")
    create.add_argument("--max-priority", choices=("low", "normal", "high", "critical"))
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    listing = actions.add_parser("list", help="list the keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("id", help="the key's id (key_...)")
    for cmd in (create, listing, revoke):
        _gateway_options(cmd, admin=True)
    for cmd in (create, listing):
        cmd.add_argument("--json", action="store_true", help="print the raw JSON")
    nodes = sub.add_parser(
        "nodes",
        help="list the nodes; add, drain, undrain or remove one (a running gateway's admin API)",
        description="shardon nodes [list] | add ID URL --models a,b | drain ID | undrain ID | remove ID",
    )
    nodes.add_argument("action", nargs="?", default="list", choices=commands.NODE_ACTIONS)
    nodes.add_argument("id", nargs="?", help="the node's id")
    nodes.add_argument("node_url", nargs="?", metavar="URL", help="add: the node's URL (http:// or https://)")
    nodes.add_argument("--models", help="add: comma-separated models it serves (public=name-on-the-node to rename)")
    nodes.add_argument("--max-concurrent", type=int, help="add: requests it takes at once (default 4)")
    nodes.add_argument("--weight", type=float, help="add: its share of requests (default 1)")
    nodes.add_argument("--node-key", help="add: the node's own API key, sent to it as a Bearer token")
    nodes.add_argument("--ca-file", help="add: PEM of the CA that signed an https:// node's certificate")
    nodes.add_argument("--json", action="store_true", help="print the raw JSON")
    _gateway_options(nodes, admin=True)
    chat = sub.add_parser("chat", help="chat with a model in the terminal (/exit to leave)")
    chat.add_argument("--model", "-m", help="the model (default: the first chat model the gateway lists)")
    chat.add_argument("--system", help="a system message to start the conversation with")
    chat.add_argument("--max-tokens", type=int, help="max_tokens of each answer (default: the model's)")
    chat.add_argument("--temperature", type=float, help="sampling temperature (default: the model's)")
    _gateway_options(chat, admin=False)
    return parser


def _gateway_options(cmd: argparse.ArgumentParser, *, admin: bool) -> None:
    cmd.add_argument("--config", "-c", help="the gateway's config (for its address)")
    cmd.add_argument("--url", help="gateway URL (default: from the config, http://127.0.0.1:8080)")
    if admin:
        cmd.add_argument("--admin-key", default=os.environ.get("SHARDON_ADMIN_KEY"), help="or $SHARDON_ADMIN_KEY")
    else:
        cmd.add_argument("--api-key", default=os.environ.get("SHARDON_API_KEY"), help="or $SHARDON_API_KEY")


def _client(args: argparse.Namespace, config: Config) -> Client:
    url = args.url
    if not url:
        host = config.server.host
        host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        url = f"http://[{host}]:{config.server.port}" if ":" in host else f"http://{host}:{config.server.port}"
    key = args.admin_key if hasattr(args, "admin_key") else args.api_key
    return Client(url, key)


def _load(args: argparse.Namespace) -> Config:
    environ = dict(os.environ)
    if getattr(args, "host", None):
        environ["SHARDON_SERVER_HOST"] = args.host
    if getattr(args, "port", None) is not None:
        environ["SHARDON_SERVER_PORT"] = str(args.port)
    return load_config(args.config, environ)


def _setup_logging(config: Config) -> None:
    level = getattr(logging, config.log.level.upper())
    if config.log.format == "json":
        fmt = '{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
    else:
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":  # reports a bad config as one of its checks
        from .doctor import main as doctor

        return doctor(args.config, args.json)
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"shardon: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print("config ok")
        return 0
    if args.command in _GATEWAY_COMMANDS:
        try:
            client = _client(args, config)
        except GatewayError as exc:
            print(f"shardon: {exc}", file=sys.stderr)
            return 2
        return _GATEWAY_COMMANDS[args.command](args, client)
    _setup_logging(config)
    from .server import serve

    return serve(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
