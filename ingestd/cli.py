"""The ``ingestd`` command: the only place that turns errors into exit codes.

Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ingestd import __version__
from ingestd.config import (
    DEFAULT_CONFIG_PATH,
    DURATION_HELP,
    LoggingSection,
    Settings,
    load_settings,
    parse_duration,
    render_settings,
)
from ingestd.errors import ConfigError

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

# --- argument types ---------------------------------------------------------------------
# A bad value is refused while parsing, before the config is read or a server asked:
# argparse names the option and exits 2; these messages give the value and what is accepted.

_INT_MAX = 2**31 - 1  # PostgreSQL integer columns
_V = TypeVar("_V")


def _duration(text: str) -> str:
    """A duration such as ``24h`` (kept as written, for messages); any length is accepted."""
    try:
        parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {DURATION_HELP}") from None
    return text


def _checked(
    parse: Callable[[str], _V], accept: Callable[[_V], bool], expected: str
) -> Callable[[str], _V]:
    """An argparse type: ``parse`` the text, refused with ``expected`` unless ``accept``."""

    def check(text: str) -> _V:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r}: {expected}")
        return value

    return check


_positive_int = _checked(int, lambda v: v >= 1, "expected a whole number, 1 or more")
_finite = _checked(float, math.isfinite, "expected a number such as -0.12 or 1.5")
_scale = _checked(
    float,
    lambda v: math.isfinite(v) and v != 0,
    "expected a number other than 0 (which would erase every value) such as 1.01;"
    " 1 leaves values unchanged",
)
_quota_rate = _checked(
    float,
    lambda v: math.isfinite(v) and v > 0,
    "expected messages per second, a number above 0 such as 0.5 or 10",
)
_quota_burst = _checked(
    int,
    lambda v: 1 <= v <= _INT_MAX,
    f"expected a whole number of messages from 1 to {_INT_MAX}",
)


def _instant(text: str) -> datetime:
    """An ISO 8601 time (UTC when it names no zone), within what PostgreSQL and the TSDB's
    nanosecond timestamps can both hold."""
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        found = None
    if found is not None and found.tzinfo is None:
        found = found.replace(tzinfo=UTC)
    if found is None or not 1970 <= found.year <= 2261:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO 8601 time from 1970 to 2261, e.g. 2026-11-29T08:00:00Z"
        )
    return found


def _topic_level(what: str) -> Callable[[str], str]:
    """A device or site id: one topic level, so never empty and without '/', '+', '#'."""

    def check(text: str) -> str:
        if not text or any(c in text for c in "/+#\0"):
            raise argparse.ArgumentTypeError(
                f"{text!r}: a {what} id is one MQTT topic level: not empty, without '/', '+' or '#'"
            )
        return text

    return check


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
    client = argparse.ArgumentParser(add_help=False)  # commands that ask the running daemon
    client.add_argument(
        "--token-file",
        type=Path,
        help="file holding the bearer token of a daemon with http.token_sha256 set"
        " (default: $INGESTD_HTTP_TOKEN)",
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
        "alerts",
        parents=[common, client],
        help="firing alerts of a running ingestd; ack ID to acknowledge",
    )
    alerts.add_argument("action", nargs="?", choices=("list", "ack", "history"), default="list")
    alerts.add_argument("alert_id", nargs="?", help="the alert to acknowledge")
    alerts.add_argument("--by", default=os.environ.get("USER", "cli"), help="who acknowledges")
    alerts.add_argument("--device", help="history: only this device")
    alerts.add_argument("--rule", help="history: only this rule")
    alerts.add_argument(
        "--since", type=_duration, default="24h", help="history: how far back (default 24h)"
    )
    alerts.add_argument(
        "--limit", type=_positive_int, default=100, help="history: at most (default 100)"
    )
    alerts.add_argument("--json", action="store_true", help="history: JSON lines")
    db = commands.add_parser("db", help="the PostgreSQL schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_commands.add_parser(
        "migrate", parents=[common], help="apply the schema migrations (safe to repeat)"
    )
    devices = commands.add_parser("devices", help="the device registry (PostgreSQL)")
    device_commands = devices.add_subparsers(
        dest="devices_command", required=True, metavar="COMMAND"
    )
    devices_list = device_commands.add_parser("list", parents=[common], help="list devices")
    devices_list.add_argument("--site", help="only this site")
    devices_list.add_argument("--json", action="store_true", help="JSON lines")
    devices_add = device_commands.add_parser(
        "add", parents=[common], help="add a device, or update it"
    )
    devices_add.add_argument("device", type=_topic_level("device"), help="its topic level")
    devices_add.add_argument(
        "--site", type=_topic_level("site"), help="its site (created when new)"
    )
    devices_add.add_argument("--kind", help="e.g. esp32, rpi, tasmota")
    devices_add.add_argument(
        "--quota-rate",
        type=_quota_rate,
        help="its own quota, messages per second: replaces the rate of the quota rule its"
        " topic matches, or limits it alone (rule 'registry') where none does",
    )
    devices_add.add_argument(
        "--quota-burst",
        type=_quota_burst,
        help="messages at once, with --quota-rate (default: the rate, at least 1)",
    )
    devices_add.add_argument("--disabled", action="store_true", help="add it disabled")
    devices_add.add_argument("--note", help="free text")
    for verb in ("disable", "enable"):
        toggle = device_commands.add_parser(
            verb, parents=[common], help=f"{verb} a device (disabled: its messages are refused)"
        )
        toggle.add_argument("device")
    devices_cal = device_commands.add_parser(
        "calibrate",
        parents=[common],
        help="add a calibration (value * scale + offset) or list a device's calibrations",
    )
    devices_cal.add_argument("device")
    devices_cal.add_argument("field", nargs="?", help="the field (e.g. ph); none: list")
    devices_cal.add_argument("--offset", type=_finite, help="added after scaling (default 0)")
    devices_cal.add_argument("--scale", type=_scale, help="multiplied first (default 1)")
    devices_cal.add_argument(
        "--from",
        dest="valid_from",
        type=_instant,
        help="effective from (ISO 8601, UTC unless it says; default now)",
    )
    devices_cal.add_argument("--by", default=os.environ.get("USER", "cli"), help="who")
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
        "quotas", parents=[common, client], help="the devices a running ingestd throttles now"
    )
    quotas.add_argument("--top", type=int, default=20, help="how many (default 20)")
    latest = commands.add_parser(
        "latest",
        parents=[common, client],
        help="the latest value of every device and field (from Redis, else the daemon)",
    )
    latest.add_argument("device", nargs="?", type=_topic_level("device"), help="only this device")
    latest.add_argument("--json", action="store_true", help="print JSON")
    http = commands.add_parser("http", help="the daemon's HTTP endpoint")
    http_commands = http.add_subparsers(dest="http_command", required=True, metavar="COMMAND")
    http_commands.add_parser(
        "token", help="make a bearer token and print the http.token_sha256 line for the config"
    )
    retention = commands.add_parser("retention", help="delete history older than its age")
    retention_commands = retention.add_subparsers(
        dest="retention_command", required=True, metavar="COMMAND"
    )
    retention_apply = retention_commands.add_parser(
        "apply",
        parents=[common],
        help="delete resolved alerts and dead letters older than retention.* (in batches)",
    )
    retention_apply.add_argument(
        "--dry-run", action="store_true", help="print how many would go; delete nothing"
    )
    influx = commands.add_parser("influx", help="the TSDB: bucket or database and its retention")
    influx_commands = influx.add_subparsers(dest="influx_command", required=True, metavar="COMMAND")
    influx_commands.add_parser(
        "setup",
        parents=[common],
        help="create the bucket (v2) or database (v1) with retention.tsdb, or update it;"
        " prints the admin's command where the token may not",
    )
    simulate = commands.add_parser(
        "simulate", help="publish simulated hydroponic sensor readings (a load generator)"
    )
    simulate.add_argument(
        "--url", default="mqtt://127.0.0.1:1883", help="the broker, mqtt://[user:pass@]host:port"
    )
    simulate.add_argument("--devices", type=int, default=10, help="devices esp32-00000, ...")
    sites = simulate.add_mutually_exclusive_group()
    sites.add_argument("--sites", type=int, default=2, help="sites site1, site2, ... (default 2)")
    sites.add_argument(
        "--site", action="append", default=[], help="site names (repeat or comma-separate)"
    )
    simulate.add_argument("--prefix", default="farm", help="first topic level (default farm)")
    simulate.add_argument("--rate", type=float, default=5.0, help="messages per second, in all")
    simulate.add_argument("--count", type=int, help="stop after this many messages")
    simulate.add_argument("--duration", type=float, help="stop after this many seconds")
    simulate.add_argument("--qos", type=int, choices=(0, 1), default=1)
    simulate.add_argument(
        "--processes", type=int, help="publisher processes (default: one per 5000 msg/s)"
    )
    simulate.add_argument(
        "--anomalies",
        choices=("off", "normal", "high"),
        default="normal",
        help="drifts and dropouts: about one per device every 2 days (normal) or 5 h (high)",
    )
    simulate.add_argument("--seed", type=int, help="same seed, same devices and anomalies")
    simulate.add_argument(
        "--model-shift",
        type=_finite,
        default=0.0,
        metavar="SECONDS",
        help="run the devices' model SECONDS ahead of the clock (negative: behind): their"
        " anomalies and day as they are then (timestamps stay now)",
    )
    simulate.add_argument("--json", action="store_true", help="print the final report as JSON")
    status = commands.add_parser(
        "status", parents=[common], help="a one-screen summary of a running ingestd"
    )
    status.add_argument(
        "--interval", type=float, default=1.0, help="seconds between the two /metrics samples"
    )
    status.add_argument(
        "--cluster",
        action="store_true",
        help="every instance of the cluster (cluster.enabled), from Redis: heartbeats, rates,"
        " partitions owned and partitions without an owner",
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
    broker = commands.add_parser(
        "broker", help="the gateway broker (mosquitto/): device and operator accounts"
    )
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
    add_operator = broker_commands.add_parser(
        "add-operator",
        help="add a person who follows and acknowledges alerts: ACL block and password",
    )
    add_operator.add_argument(
        "name", help="MQTT username, recorded as who acknowledged (alerts/ack/<id>/<name>)"
    )
    add_operator.add_argument(
        "--passwd", type=Path, default=Path("/etc/mosquitto/passwd"), help="Mosquitto password file"
    )
    add_operator.add_argument(
        "--acl", type=Path, default=Path("/etc/mosquitto/acl"), help="the broker's ACL file"
    )
    add_operator.add_argument("--password", help="use this password (default: a random one)")
    add_operator.add_argument("--host", default="gateway.local", help="broker host, for the hints")
    add_operator.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    add_operator.add_argument("--json", action="store_true", help="print JSON")
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
    if settings.notify.channels:  # refused as `run` and `notify test` refuse it: exit 2
        from ingestd.notify.channels import open_channels  # noqa: PLC0415

        open_channels(settings.notify)
    if args.show:
        sys.stdout.write(render_settings(settings))
    print(f"ingestd: {args.config}: configuration is valid", file=sys.stderr)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from ingestd.daemon import (  # noqa: PLC0415 - keeps `check` free of runtime imports
        Daemon,
        raise_open_files_limit,
    )
    from ingestd.logs import configure_logging  # noqa: PLC0415

    settings = _load(args)
    configure_logging(settings.logging)
    raise_open_files_limit()
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


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token for the daemon: ``--token-file``, else ``$INGESTD_HTTP_TOKEN``."""
    path: Path | None = getattr(args, "token_file", None)
    if path is None:
        return os.environ.get("INGESTD_HTTP_TOKEN", "").strip() or None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read it: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(f"--token-file {path}: the file is empty; it should hold the token")
    return token


def _ask_daemon(
    settings: Settings, path: str, method: str = "GET", *, token: str | None = None
) -> Any:
    """A request to the running daemon's HTTP endpoint; OSError when it is not there."""
    url = f"http://{settings.http.listen}{path}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            refused = "refused the token given" if token else "needs a bearer token"
            raise PermissionError(
                f"the daemon at {url} {refused}: pass --token-file FILE or set"
                " INGESTD_HTTP_TOKEN (the token whose SHA-256 is http.token_sha256)"
            ) from None
        return orjson.loads(exc.read())
    except OSError as exc:
        raise OSError(f"cannot reach the daemon at {url}: {exc}; is it running?") from exc


def _alerts(args: argparse.Namespace) -> int:
    settings = _load(args)
    if args.action == "history":
        from ingestd.store import commands  # noqa: PLC0415

        return commands.alert_history(settings, sys.stdout, args)
    if args.action == "ack":
        if not args.alert_id:
            print("ingestd: alerts ack needs an alert id (see: ingestd alerts)", file=sys.stderr)
            return EXIT_CONFIG
        path = f"/alerts/{urllib.parse.quote(args.alert_id)}/ack?by={urllib.parse.quote(args.by)}"
        answer = _ask_daemon(settings, path, "POST", token=_token(args))
        if "error" in answer:
            print(f"ingestd: {answer['error']}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"acknowledged {answer['id']}: {answer['rule']} on {answer['device']} by {args.by}")
        return EXIT_OK
    firing = _ask_daemon(settings, "/alerts", token=_token(args))["firing"]
    if not firing:
        print("no alert is firing")
    for alert in firing:
        print(orjson.dumps(alert).decode())
    return EXIT_OK


def _db(args: argparse.Namespace) -> int:
    from ingestd.store import commands  # noqa: PLC0415

    return commands.db_migrate(_load(args), sys.stdout)


def _devices(args: argparse.Namespace) -> int:
    from ingestd.store import commands  # noqa: PLC0415

    settings = _load(args)
    verb = args.devices_command
    if verb == "list":
        return commands.list_devices(settings, sys.stdout, site=args.site, as_json=args.json)
    if verb == "add":
        return commands.add_device(settings, sys.stdout, args)
    if verb == "calibrate":
        return commands.calibrate(settings, sys.stdout, args)
    return commands.set_enabled(settings, sys.stdout, args.device, enabled=verb == "enable")


def _notify(args: argparse.Namespace) -> int:
    from ingestd.notify import commands  # noqa: PLC0415 - Apprise only for these commands

    settings = _load(args)
    if args.notify_command == "test":
        return commands.send_test(settings, args.route, sys.stdout)
    return commands.show_status(settings, sys.stdout, as_json=args.json)


def _quotas(args: argparse.Namespace) -> int:
    settings = _load(args)
    throttled = _ask_daemon(settings, f"/quotas?top={args.top}", token=_token(args))["throttled"]
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


def _latest(args: argparse.Namespace) -> int:
    from ingestd.latest import LatestUnavailable, read_redis, render_table  # noqa: PLC0415

    settings = _load(args)
    device: str | None = args.device
    if not settings.latest.enabled:
        print("ingestd: latest values are off (latest.enabled: false)", file=sys.stderr)
        return EXIT_FAILURE
    if settings.redis.url:  # straight from Redis: works with the daemon stopped
        try:
            values = asyncio.run(read_redis(settings.redis, settings.latest.ttl, device))
        except LatestUnavailable as exc:
            print(f"ingestd: cannot read the latest values: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    else:  # kept in the daemon's memory
        path = "/latest" + (f"/{urllib.parse.quote(device, safe='')}" if device else "")
        answer = _ask_daemon(settings, path, token=_token(args))
        if "error" in answer:
            print(f"ingestd: {answer['error']}", file=sys.stderr)
            return EXIT_FAILURE
        values = answer["devices"] if device is None else {device: answer["values"]}
    if device is not None and device not in values:
        print(
            f"ingestd: no latest values for device {device!r}: unknown, or silent longer"
            " than latest.ttl",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.json:
        shown: dict[str, Any] = (
            {"devices": values} if device is None else {"device": device, "values": values[device]}
        )
        print(orjson.dumps(shown).decode())
    elif not values:
        print("no latest values (no device sent readings within latest.ttl)")
    else:
        print("\n".join(render_table(values)))
    return EXIT_OK


def _http(args: argparse.Namespace) -> int:
    import secrets  # noqa: PLC0415

    from ingestd.http import token_sha256  # noqa: PLC0415

    token = secrets.token_urlsafe(32)
    digest = token_sha256(token)
    print(
        "A new bearer token for the daemon's HTTP endpoint (shown only now; the daemon keeps"
        f" its hash):\n\n  {token}\n\n"
        "Put its hash in the config file (or INGESTD_HTTP__TOKEN_SHA256, or the secret file"
        f" http__token_sha256):\n\n  http:\n    token_sha256: {digest}\n\n"
        f"Clients send the header 'Authorization: Bearer {token}'. ingestd commands (alerts,"
        " quotas, latest) send it from --token-file FILE (the token alone, in a file only"
        " they can read) or $INGESTD_HTTP_TOKEN. /metrics, /healthz and /readyz stay open."
    )
    return EXIT_OK


def _simulate(args: argparse.Namespace) -> int:
    from ingestd import simulate as sim  # noqa: PLC0415

    names = [s.strip() for value in args.site for s in value.split(",") if s.strip()]
    try:
        fleet = sim.Fleet(
            args.url,
            args.devices,
            names or args.sites,
            args.prefix,
            args.qos,
            fields=sim.FIELDS,
            anomalies=args.anomalies,
            seed=sim.new_seed() if args.seed is None else args.seed,
            shift=args.model_shift,
        )
        sim.check_run(args.rate, args.count, args.duration, args.processes)
    except ValueError as exc:
        raise ConfigError(f"simulate: {exc}") from exc
    processes = min(args.processes or sim.default_processes(args.rate, fleet.devices), args.devices)
    print(sim.describe(fleet, args.rate, processes), file=sys.stderr, flush=True)
    with sim.stop_on_signals() as stop:  # Ctrl-C: finish what is in flight, then report
        report = sim.simulate(
            fleet, args.rate, args.count, args.duration, processes=processes, stop=stop
        )
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        sys.stdout.write(report.text())
    if report.refused:
        print(
            f"ingestd simulate: the broker refused {report.refused} messages: with the gateway's"
            " ACL a user may publish only as the device it is named after",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def _broker(args: argparse.Namespace) -> int:
    from ingestd import broker  # noqa: PLC0415

    if args.broker_command == "add-operator":
        operator = broker.add_operator(
            args.name,
            args.passwd,
            args.acl,
            password=args.password,
            host=args.host,
            port=args.port,
        )
        sys.stdout.write(broker.render_operator(operator, as_json=args.json))
        return EXIT_OK
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

    if args.cluster:
        return operator.cluster_status(_load(args), sys.stdout)
    return operator.status(_load(args), sys.stdout, interval=args.interval)


def _tail(args: argparse.Namespace) -> int:
    from ingestd import operator  # noqa: PLC0415

    severities = [s.strip() for value in args.severity for s in value.split(",")]
    return operator.tail(
        _load(args), sys.stdout, sys.stderr, url=args.url, severities=severities, count=args.count
    )


def _retention(args: argparse.Namespace) -> int:
    from ingestd import retention  # noqa: PLC0415

    return retention.apply(_load(args), sys.stdout, sys.stderr, dry_run=args.dry_run)


def _influx(args: argparse.Namespace) -> int:
    from ingestd import influx_setup  # noqa: PLC0415

    settings = _load(args)
    outcome = influx_setup.setup(settings.influx, settings.retention.tsdb)
    if outcome.done:
        print(outcome.message)
        return EXIT_OK
    print(f"ingestd: {outcome.message}", file=sys.stderr)
    for command in outcome.commands:
        print(f"  {command}", file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": _run,
        "check": _check,
        "deadletters": _deadletters,
        "quotas": _quotas,
        "alerts": _alerts,
        "notify": _notify,
        "db": _db,
        "devices": _devices,
        "rules": _rules,
        "simulate": _simulate,
        "broker": _broker,
        "status": _status,
        "tail": _tail,
        "latest": _latest,
        "http": _http,
        "retention": _retention,
        "influx": _influx,
    }
    if args.command != "run":  # run logs as its config says
        # A command's output is on stdout (often JSON for a script): its warnings go to
        # stderr (unconfigured, structlog would print them on stdout).
        from ingestd.logs import configure_logging  # noqa: PLC0415

        configure_logging(LoggingSection(level="info", format="console"))
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
