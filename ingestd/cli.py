"""The ``ingestd`` command: the only place that turns errors into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ingestd import __version__
from ingestd.config import DEFAULT_CONFIG_PATH, Settings, load_settings, render_settings
from ingestd.errors import ConfigError

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingestd", description="MQTT-native ingestion daemon for farm sensor fleets."
    )
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("INGESTD_CONFIG", DEFAULT_CONFIG_PATH)),
        help=f"config file (default: $INGESTD_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    common.add_argument(
        "--secrets-dir",
        type=Path,
        default=_default_secrets_dir(),
        help="directory of secret files named <section>__<key> "
        "(default: $INGESTD_SECRETS_DIR, else systemd's $CREDENTIALS_DIRECTORY)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", parents=[common], help="run the daemon")
    check = commands.add_parser(
        "check", parents=[common], help="validate the configuration without connecting anywhere"
    )
    check.add_argument(
        "--show", action="store_true", help="print the effective settings, secrets masked"
    )
    return parser


def _default_secrets_dir() -> Path | None:
    value = os.environ.get("INGESTD_SECRETS_DIR") or os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, args.secrets_dir)


def _check(args: argparse.Namespace) -> int:
    settings = _load(args)
    if args.show:
        sys.stdout.write(render_settings(settings))
    print(f"ingestd: {args.config}: configuration is valid", file=sys.stderr)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from ingestd.daemon import Daemon  # noqa: PLC0415 - keeps `check` free of runtime imports
    from ingestd.logs import configure_logging  # noqa: PLC0415

    settings = _load(args)
    configure_logging(settings.logging)
    return asyncio.run(Daemon(settings).serve())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"run": _run, "check": _check}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILURE
