"""Command line → Config, nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import Config, load_config
from .errors import ConfigError


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
        cmd.add_argument("--config", "-c", help="the gateway's config (for its address)")
        cmd.add_argument("--url", help="gateway URL (default: from the config, http://127.0.0.1:8080)")
        cmd.add_argument("--admin-key", default=os.environ.get("SHARDON_ADMIN_KEY"), help="or $SHARDON_ADMIN_KEY")
        cmd.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


_COLUMNS = {
    "models": ("name", "state", "backend", "where", "memory_mb", "in_flight", "queued", "last_used"),
    "ps": ("name", "state", "pid", "url", "where", "memory_mb", "in_flight", "precision"),
}


def _admin_models(args: argparse.Namespace, config: Config) -> int:
    import json
    import time
    import urllib.error
    import urllib.request

    url = args.url or f"http://{config.server.host}:{config.server.port}"
    request = urllib.request.Request(url.rstrip("/") + "/admin/models")
    if args.admin_key:
        request.add_header("Authorization", f"Bearer {args.admin_key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            rows = json.loads(resp.read())["data"]
    except urllib.error.HTTPError as exc:
        print(f"shardon: {url} answered {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"shardon: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if args.command == "ps":
        rows = [r for r in rows if r.get("state") in ("loading", "ready", "unloading") and r.get("pid")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = _COLUMNS[args.command]

    def cell(row: dict[str, object], column: str) -> str:
        value = row.get(column)
        if column == "last_used" and isinstance(value, int | float):
            return f"{time.time() - value:.0f}s ago"
        return "-" if value is None or value == "" else str(value)

    table = [[c.upper() for c in columns]] + [[cell(r, c) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip())
    return 0


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
    if args.command in ("models", "ps"):
        return _admin_models(args, config)
    _setup_logging(config)
    from .server import serve

    return serve(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
