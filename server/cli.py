"""``vlserve``: ``serve`` the API, or ``make-tiny-model DIR`` to build the test model.

Every ``serve`` flag has a ``VLSERVE_*`` environment variable (see ``server.options``);
a flag wins over its variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import trio

from server.config import ServerConfig
from server.options import ConfigError, Option, config_from_env, config_options, convert


def _add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    common: dict[str, Any] = {"dest": option.name, "default": argparse.SUPPRESS}
    help_text = f"{option.help} [env {option.env}]"
    if option.kind is bool:
        parser.add_argument(option.flag, action=argparse.BooleanOptionalAction, help=help_text, **common)
    elif option.kind is tuple:
        parser.add_argument(
            option.flag,
            action="append",
            metavar="VALUE",
            help=help_text + " (repeatable)",
            **common,
        )
    else:
        parser.add_argument(option.flag, metavar=option.kind.__name__.upper(), help=help_text, **common)


LOG_FORMATS = ("plain", "json")


def configure_logging(level: str, log_format: str) -> None:
    """Root logging on stderr at ``level``: ``plain`` lines or JSON lines
    (``server.access_log.JsonLineFormatter``)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from server.access_log import JsonLineFormatter

        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    for option in config_options():
        _add_option(serve, option)
    serve.add_argument("--log-level", default=os.environ.get("VLSERVE_LOG_LEVEL", "INFO"), help="logging level")
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("VLSERVE_LOG_FORMAT", "plain"),
        help="plain text lines, or one JSON object per line (access-log fields as keys) [env VLSERVE_LOG_FORMAT]",
    )
    tiny = commands.add_parser("make-tiny-model", help="build the tiny random test model")
    tiny.add_argument("directory", help="where to save it")
    return parser


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Flags over environment over defaults. Raises ``ConfigError`` naming the bad value."""
    flags: dict[str, Any] = {}
    for option in config_options():
        if option.name not in vars(args):
            continue
        raw = getattr(args, option.name)
        if option.kind is tuple:
            flags[option.name] = tuple(v for item in raw for v in convert(option, item, option.flag))
        elif option.kind is bool:
            flags[option.name] = raw
        else:
            flags[option.name] = convert(option, raw, option.flag)
    return config_from_env(environ, **flags)


def _serve(args: argparse.Namespace) -> int:
    from server.serve import serve_until_signalled

    config = config_from_args(args, os.environ)
    return trio.run(serve_until_signalled, config)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from engine.tiny_model import build_tiny_model

    build_tiny_model(args.directory)
    print(args.directory)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"), getattr(args, "log_format", "plain"))
    # one INFO line per fetched image is noise, and costs the event loop under bursts
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "serve":
            return _serve(args)
        return _make_tiny_model(args)
    except ConfigError as error:
        parser.error(str(error))
    return 2


if __name__ == "__main__":
    sys.exit(main())
