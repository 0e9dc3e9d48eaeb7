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
    return parser


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
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"shardon: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print("config ok")
        return 0
    _setup_logging(config)
    from .server import serve

    return serve(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
