"""The ``ingestd`` command: the only place that turns errors into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

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
    letters = commands.add_parser(
        "deadletters", parents=[common], help="list refused messages, newest first"
    )
    letters.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    letters.add_argument("--reason", help="only this reason (e.g. malformed, too_large)")
    rules = commands.add_parser("rules", help="check or test alert rule files")
    rule_commands = rules.add_subparsers(dest="rules_command", required=True, metavar="COMMAND")
    rules_check = rule_commands.add_parser(
        "check", parents=[common], help="validate rule files without connecting anywhere"
    )
    rules_check.add_argument(
        "paths", nargs="*", type=Path, help="rule files or directories (default: rules.dir)"
    )
    rules_test = rule_commands.add_parser(
        "test", help="run rule unit tests written in YAML (like promtool test rules)"
    )
    rules_test.add_argument("files", nargs="+", type=Path, help="rule test files")
    alerts = commands.add_parser(
        "alerts", parents=[common], help="firing alerts of a running ingestd; ack ID to acknowledge"
    )
    alerts.add_argument("action", nargs="?", choices=("list", "ack"), default="list")
    alerts.add_argument("alert_id", nargs="?", help="the alert to acknowledge")
    alerts.add_argument("--by", default=os.environ.get("USER", "cli"), help="who acknowledges")
    notify = commands.add_parser("notify", help="notification routes and outbox")
    notify_commands = notify.add_subparsers(dest="notify_command", required=True, metavar="COMMAND")
    notify_test = notify_commands.add_parser(
        "test", parents=[common], help="send a test message through every channel of a route"
    )
    notify_test.add_argument("route", help="the route's name (notify.routes)")
    notify_status = notify_commands.add_parser(
        "status",
        parents=[common],
        help="the outbox: pending, failed, oldest pending, each channel's circuit breaker",
    )
    notify_status.add_argument("--json", action="store_true", help="print JSON")
    quotas = commands.add_parser(
        "quotas", parents=[common], help="the devices a running ingestd throttles now"
    )
    quotas.add_argument("--top", type=int, default=20, help="how many (default 20)")
    simulate = commands.add_parser(
        "simulate", help="publish simulated hydroponic sensor readings (a load generator)"
    )
    simulate.add_argument("--url", default="mqtt://127.0.0.1:1883", help="the broker")
    simulate.add_argument("--devices", type=int, default=10)
    simulate.add_argument("--sites", type=int, default=2)
    simulate.add_argument("--prefix", default="farm", help="first topic level (default farm)")
    simulate.add_argument("--rate", type=float, default=5.0, help="messages per second, in all")
    simulate.add_argument("--count", type=int, help="stop after this many messages")
    simulate.add_argument("--duration", type=float, help="stop after this many seconds")
    simulate.add_argument("--qos", type=int, choices=(0, 1), default=1)
    status = commands.add_parser(
        "status", parents=[common], help="a one-screen summary of a running ingestd"
    )
    status.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the two /metrics samples"
    )
    tail = commands.add_parser(
        "tail", parents=[common], help="follow alert events live (firing, acknowledged, resolved)"
    )
    tail.add_argument("--url", help="the broker, mqtt://[user:pass@]host:port (default: mqtt.url)")
    tail.add_argument(
        "--severity",
        action="append",
        default=[],
        help="only these severities (repeat or comma-separate)",
    )
    tail.add_argument("--count", type=int, help="stop after this many live events")
    broker = commands.add_parser("broker", help="the gateway broker (mosquitto/): device accounts")
    broker_commands = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    add_device = broker_commands.add_parser(
        "add-device",
        help="add or update a device's broker credentials and print what to flash onto it",
    )
    add_device.add_argument("name", help="device id = MQTT username (the topic's device level)")
    add_device.add_argument(
        "--passwd", type=Path, default=Path("/etc/mosquitto/passwd"), help="Mosquitto password file"
    )
    add_device.add_argument("--site", help="the device's site (topic farm/<site>/<name>/...)")
    add_device.add_argument("--password", help="use this password (default: a random one)")
    add_device.add_argument("--host", default="gateway.local", help="broker host for the device")
    add_device.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    add_device.add_argument(
        "--acl",
        type=Path,
        default=Path("/etc/mosquitto/acl"),
        help="the broker's ACL file: its users (ingestd, operators) are not device names",
    )
    add_device.add_argument(
        "--device-pattern", help="ingestd's device_pattern, when not the default"
    )
    add_device.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _default_secrets_dir() -> Path | None:
    value = os.environ.get("INGESTD_SECRETS_DIR") or os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(value) if value else None


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(args.config, args.secrets_dir)


def _check(args: argparse.Namespace) -> int:
    from ingestd.decode import Decoder  # noqa: PLC0415
    from ingestd.quota import QuotaRules  # noqa: PLC0415
    from ingestd.rules import load_rules  # noqa: PLC0415

    settings = _load(args)
    Decoder(settings.mqtt.subscriptions, settings.guard)  # a subscription that cannot work
    for warning in QuotaRules(settings.quotas).warnings:  # errors raise ConfigError
        print(f"ingestd: quotas: {warning}", file=sys.stderr)
    if settings.rules.dir.exists():
        ruleset = load_rules(settings.rules.dir)  # RulesError is a ConfigError: exit 2
        print(f"ingestd: {settings.rules.dir}: {len(ruleset)} alert rules valid", file=sys.stderr)
    else:
        print(
            f"ingestd: rules.dir {settings.rules.dir} does not exist: no alert rules",
            file=sys.stderr,
        )
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


def _deadletters(args: argparse.Namespace) -> int:
    from ingestd.deadletters import DeadLetters  # noqa: PLC0415

    settings = _load(args)
    if not (settings.spool.dir / DeadLetters.FILENAME).exists():
        print(f"ingestd: no dead letters in {settings.spool.dir}", file=sys.stderr)
        return EXIT_OK
    store = DeadLetters(settings.spool.dir, settings.guard.deadletters_max)
    try:
        counts = store.counts()
        print("by reason: " + (", ".join(f"{r}={n}" for r, n in sorted(counts.items())) or "none"))
        for letter in store.list(args.limit, args.reason):
            when = datetime.fromtimestamp(letter.received_ns / 1e9, UTC).isoformat(
                timespec="milliseconds"
            )
            sample = letter.sample.decode("utf-8", "backslashreplace")
            more = (
                f" (+{letter.size - len(letter.sample)} bytes)"
                if letter.size > len(letter.sample)
                else ""
            )
            print(
                f"{when}  {letter.reason:<22} {letter.topic}\n    {letter.detail}\n"
                f"    payload: {sample!r}{more}"
            )
    finally:
        store.close()
    return EXIT_OK


def _rules(args: argparse.Namespace) -> int:
    from ingestd.rules import check_command, testing  # noqa: PLC0415

    if args.rules_command == "test":
        code, text = testing.test_command(args.files)
    else:
        paths = args.paths or [_load(args).rules.dir]
        code, text = check_command(paths)
    print(text, file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


def _ask_daemon(settings: Settings, path: str, method: str = "GET") -> Any:
    """A request to the running daemon's HTTP endpoint; OSError when it is not there."""
    url = f"http://{settings.http.listen}{path}"
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return orjson.loads(exc.read())
    except OSError as exc:
        raise OSError(f"cannot reach the daemon at {url}: {exc}; is it running?") from exc


def _alerts(args: argparse.Namespace) -> int:
    settings = _load(args)
    if args.action == "ack":
        if not args.alert_id:
            print("ingestd: alerts ack needs an alert id (see: ingestd alerts)", file=sys.stderr)
            return EXIT_CONFIG
        path = f"/alerts/{urllib.parse.quote(args.alert_id)}/ack?by={urllib.parse.quote(args.by)}"
        answer = _ask_daemon(settings, path, "POST")
        if "error" in answer:
            print(f"ingestd: {answer['error']}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"acknowledged {answer['id']}: {answer['rule']} on {answer['device']} by {args.by}")
        return EXIT_OK
    firing = _ask_daemon(settings, "/alerts")["firing"]
    if not firing:
        print("no alert is firing")
    for alert in firing:
        print(orjson.dumps(alert).decode())
    return EXIT_OK


def _notify(args: argparse.Namespace) -> int:
    from ingestd.notify import commands  # noqa: PLC0415 - Apprise only for these commands

    settings = _load(args)
    if args.notify_command == "test":
        return commands.send_test(settings, args.route, sys.stdout)
    return commands.show_status(settings, sys.stdout, as_json=args.json)


def _quotas(args: argparse.Namespace) -> int:
    settings = _load(args)
    throttled = _ask_daemon(settings, f"/quotas?top={args.top}")["throttled"]
    if not throttled:
        print("no device is being throttled")
        return EXIT_OK
    print(f"{'device':<32} {'rule':<24} {'limit':<18} {'dropped':>9} {'last drop':>10}")
    for t in throttled:
        print(
            f"{t['device']:<32} {t['rule']:<24} {t['limit']:<18} {t['dropped']:>9}"
            f" {t['last_drop_s_ago']:>8}s ago"
        )
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    from ingestd.simulate import Fleet  # noqa: PLC0415

    fleet = Fleet(args.url, args.devices, args.sites, args.prefix, args.qos)
    sent = fleet.run(args.rate, args.count, args.duration)
    print(f"ingestd simulate: published {sent} readings", file=sys.stderr)
    return EXIT_OK


def _broker(args: argparse.Namespace) -> int:
    from ingestd import broker  # noqa: PLC0415

    creds = broker.add_device(
        args.name,
        args.passwd,
        password=args.password,
        site=args.site,
        host=args.host,
        port=args.port,
        pattern=args.device_pattern,
        acl_file=args.acl,
    )
    sys.stdout.write(broker.render(creds, as_json=args.json))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from ingestd import operator  # noqa: PLC0415

    return operator.status(_load(args), sys.stdout, interval=args.interval)


def _tail(args: argparse.Namespace) -> int:
    from ingestd import operator  # noqa: PLC0415

    severities = [s.strip() for value in args.severity for s in value.split(",")]
    return operator.tail(
        _load(args), sys.stdout, sys.stderr, url=args.url, severities=severities, count=args.count
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": _run,
        "check": _check,
        "deadletters": _deadletters,
        "quotas": _quotas,
        "alerts": _alerts,
        "notify": _notify,
        "rules": _rules,
        "simulate": _simulate,
        "broker": _broker,
        "status": _status,
        "tail": _tail,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
