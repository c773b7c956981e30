"""Admin commands on PostgreSQL: ``ingestd db migrate``, ``ingestd devices ...``,
``ingestd alerts history``. They talk to the database directly (the daemon need not run);
a running daemon sees registry changes within a second (LISTEN/NOTIFY)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import orjson
import psycopg

from ingestd.config import Settings, mask_url, parse_duration
from ingestd.errors import ConfigError
from ingestd.store.postgres import LATEST, applied_version, check_schema, connect, migrate

__all__ = [
    "EXAMPLE_PARAMS",
    "QUERIES",
    "add_device",
    "alert_history",
    "calibrate",
    "db_migrate",
    "list_devices",
    "set_enabled",
]

QUERIES: dict[str, str] = {
    "devices_list": (
        "SELECT d.id, d.site_id, d.kind, d.enabled, d.quota_rate, d.quota_burst,"
        " d.auto_registered, d.created_at,"
        " (SELECT count(*) FROM calibrations c WHERE c.device_id = d.id)"
        " FROM devices d ORDER BY d.id"
    ),
    "devices_list_site": (
        "SELECT d.id, d.site_id, d.kind, d.enabled, d.quota_rate, d.quota_burst,"
        " d.auto_registered, d.created_at,"
        " (SELECT count(*) FROM calibrations c WHERE c.device_id = d.id)"
        " FROM devices d WHERE d.site_id = %(site)s ORDER BY d.id"
    ),
    "site_add": "INSERT INTO sites (id) VALUES (%(site)s) ON CONFLICT (id) DO NOTHING",
    "device_add": (
        "INSERT INTO devices (id, site_id, kind, enabled, quota_rate, quota_burst, note)"
        " VALUES (%(id)s, %(site)s, %(kind)s, %(enabled)s, %(rate)s, %(burst)s, %(note)s)"
        " ON CONFLICT (id) DO UPDATE SET site_id = excluded.site_id, kind = excluded.kind,"
        " enabled = excluded.enabled, quota_rate = excluded.quota_rate,"
        " quota_burst = excluded.quota_burst, note = excluded.note,"
        " auto_registered = false, updated_at = now()"
    ),
    "device_enable": (
        "UPDATE devices SET enabled = %(enabled)s, updated_at = now() WHERE id = %(id)s"
    ),
    "calibration_add": (
        'INSERT INTO calibrations (device_id, field, "offset", scale, valid_from, created_by)'
        " VALUES (%(id)s, %(field)s, %(offset)s, %(scale)s, %(valid_from)s, %(by)s)"
        ' ON CONFLICT (device_id, field, valid_from) DO UPDATE SET "offset" = excluded."offset",'
        " scale = excluded.scale, created_by = excluded.created_by RETURNING id"
    ),
    "device_get": "SELECT id FROM devices WHERE id = %(id)s",
    "calibrations_of": (
        'SELECT id, field, "offset", scale, valid_from, created_by FROM calibrations'
        " WHERE device_id = %(id)s ORDER BY field, valid_from"
    ),
    "history_all": (
        "SELECT id, rule, device_id, site, field, level, state, value, threshold, started_at,"
        " fired_at, resolved_at, acknowledged_at, acknowledged_by, reason FROM alert_events"
        " WHERE started_at >= %(since)s ORDER BY started_at DESC LIMIT %(limit)s"
    ),
    "history_device": (
        "SELECT id, rule, device_id, site, field, level, state, value, threshold, started_at,"
        " fired_at, resolved_at, acknowledged_at, acknowledged_by, reason FROM alert_events"
        " WHERE device_id = %(device)s AND started_at >= %(since)s"
        " ORDER BY started_at DESC LIMIT %(limit)s"
    ),
    "history_rule_device": (
        "SELECT id, rule, device_id, site, field, level, state, value, threshold, started_at,"
        " fired_at, resolved_at, acknowledged_at, acknowledged_by, reason FROM alert_events"
        " WHERE rule = %(rule)s AND device_id = %(device)s AND started_at >= %(since)s"
        " ORDER BY started_at DESC LIMIT %(limit)s"
    ),
    "history_rule": (
        "SELECT id, rule, device_id, site, field, level, state, value, threshold, started_at,"
        " fired_at, resolved_at, acknowledged_at, acknowledged_by, reason FROM alert_events"
        " WHERE rule = %(rule)s AND started_at >= %(since)s"
        " ORDER BY started_at DESC LIMIT %(limit)s"
    ),
}
_T = datetime(2026, 1, 1, tzinfo=UTC)
_BIGINT_MAX = 2**63 - 1
EXAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "devices_list": {},
    "devices_list_site": {"site": "gh1"},
    "site_add": {"site": "gh1"},
    "device_add": {
        "id": "dev-00042",
        "site": "gh1",
        "kind": "esp32",
        "enabled": True,
        "rate": None,
        "burst": None,
        "note": "",
    },
    "device_enable": {"id": "dev-00042", "enabled": False},
    "calibration_add": {
        "id": "dev-00042",
        "field": "ph",
        "offset": 0.1,
        "scale": 1.0,
        "valid_from": _T,
        "by": "admin",
    },
    "device_get": {"id": "dev-00042"},
    "calibrations_of": {"id": "dev-00042"},
    "history_all": {"since": _T, "limit": 100},
    "history_device": {"device": "dev-00042", "since": _T, "limit": 100},
    "history_rule_device": {"rule": "ph-low", "device": "dev-00042", "since": _T, "limit": 100},
    "history_rule": {"rule": "ph-low", "since": _T, "limit": 100},
}


def _open(settings: Settings, *, check: bool = True) -> psycopg.Connection[Any]:
    try:
        conn = connect(settings.postgres, autocommit=True)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = mask_url(settings.postgres.url or "")
        raise OSError(f"cannot reach PostgreSQL ({where}): {first}") from exc
    if check:
        try:
            check_schema(conn)
        except BaseException:
            conn.close()
            raise
    return conn


def db_migrate(settings: Settings, out: TextIO) -> int:
    with _open(settings, check=False) as conn:
        before = applied_version(conn)
        applied = migrate(conn)
    if not applied:
        print(f"schema is up to date (version {before})", file=out)
    for migration in applied:
        print(f"applied {migration.version:04d} {migration.name}", file=out)
    if applied:
        print(f"schema is at version {LATEST} (was {before})", file=out)
    return 0


def _time(value: Any) -> str:
    if value is None:
        return "-"
    return str(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ"))


def list_devices(settings: Settings, out: TextIO, *, site: str | None, as_json: bool) -> int:
    with _open(settings) as conn:
        if site is None:
            rows = conn.execute(QUERIES["devices_list"]).fetchall()
        else:
            rows = conn.execute(QUERIES["devices_list_site"], {"site": site}).fetchall()
    if as_json:
        for r in rows:
            item = {
                "id": r[0],
                "site": r[1],
                "kind": r[2],
                "enabled": r[3],
                "quota_rate": r[4],
                "quota_burst": r[5],
                "auto_registered": r[6],
                "created_at": r[7].isoformat(),
                "calibrations": r[8],
            }
            out.write(orjson.dumps(item).decode() + "\n")
        return 0
    if not rows:
        print("no devices in the registry" + (f" for site {site}" if site else ""), file=out)
        return 0
    print(
        f"{'device':<28} {'site':<14} {'kind':<10} {'enabled':<8} {'quota':<14}"
        f" {'calibrations':>12}",
        file=out,
    )
    for r in rows:
        quota = "-" if r[4] is None else f"{r[4]:g}/s" + (f" burst {r[5]}" if r[5] else "")
        enabled = ("yes" if r[3] else "NO") + ("*" if r[6] else "")
        print(
            f"{r[0]:<28} {r[1] or '-':<14} {r[2] or '-':<10} {enabled:<8} {quota:<14} {r[8]:>12}",
            file=out,
        )
    if any(r[6] for r in rows):
        print("* registered automatically (registry.unknown: register)", file=out)
    return 0


def add_device(settings: Settings, out: TextIO, args: Any) -> int:
    if args.quota_burst is not None and args.quota_rate is None:
        raise ConfigError(
            f"--quota-burst {args.quota_burst} needs --quota-rate: a burst alone limits nothing"
        )
    with _open(settings) as conn, conn.transaction():
        if args.site:
            conn.execute(QUERIES["site_add"], {"site": args.site})
        conn.execute(
            QUERIES["device_add"],
            {
                "id": args.device,
                "site": args.site,
                "kind": args.kind or "",
                "enabled": not args.disabled,
                "rate": args.quota_rate,
                "burst": args.quota_burst,
                "note": args.note or "",
            },
        )
    state = "disabled" if args.disabled else "enabled"
    print(f"device {args.device} saved ({state})", file=out)
    return 0


def set_enabled(settings: Settings, out: TextIO, device: str, *, enabled: bool) -> int:
    with _open(settings) as conn:
        count = conn.execute(QUERIES["device_enable"], {"id": device, "enabled": enabled}).rowcount
    if not count:
        raise ConfigError(f"no device {device!r} in the registry (see: ingestd devices list)")
    print(f"device {device} {'enabled' if enabled else 'disabled'}", file=out)
    return 0


def calibrate(settings: Settings, out: TextIO, args: Any) -> int:
    """``args.valid_from``: a datetime (the CLI parses and bounds it), None for now."""
    valid_from: datetime = args.valid_from or datetime.now(UTC)
    if args.field is not None and args.offset is None and args.scale is None:
        raise ConfigError("give --offset and/or --scale for the calibration of " + args.field)
    if args.field is None:
        given = [
            f"--{name.removeprefix('valid_')}"
            for name in ("offset", "scale", "valid_from")
            if getattr(args, name) is not None
        ]
        if given:
            raise ConfigError(
                f"{' '.join(given)} without a field: name it, e.g. ingestd devices calibrate"
                f" {args.device} ph {given[0]} ... (no field lists the calibrations)"
            )
    with _open(settings) as conn:
        if args.field is None:
            rows = conn.execute(QUERIES["calibrations_of"], {"id": args.device}).fetchall()
            if not rows:
                if conn.execute(QUERIES["device_get"], {"id": args.device}).fetchone() is None:
                    raise ConfigError(
                        f"no device {args.device!r} in the registry (see: ingestd devices list)"
                    )
                print(f"device {args.device} has no calibrations", file=out)
            for r in rows:
                print(
                    f"#{r[0]} {r[1]}: value * {r[3]:g} + {r[2]:g} from {_time(r[4])}"
                    f" (by {r[5] or '?'})",
                    file=out,
                )
            return 0
        try:
            row = conn.execute(
                QUERIES["calibration_add"],
                {
                    "id": args.device,
                    "field": args.field,
                    "offset": args.offset if args.offset is not None else 0.0,
                    "scale": args.scale if args.scale is not None else 1.0,
                    "valid_from": valid_from,
                    "by": args.by,
                },
            ).fetchone()
        except psycopg.errors.ForeignKeyViolation:
            raise ConfigError(
                f"no device {args.device!r} in the registry: add it first with"
                f" ingestd devices add {args.device}"
            ) from None
    assert row is not None
    print(
        f"calibration #{row[0]} for {args.device} {args.field}: value * "
        f"{args.scale if args.scale is not None else 1.0:g} + "
        f"{args.offset if args.offset is not None else 0.0:g} from {_time(valid_from)}",
        file=out,
    )
    return 0


def alert_history(settings: Settings, out: TextIO, args: Any) -> int:
    """``args.since``: a duration (any length: longer than the calendar is everything);
    ``args.limit``: 1 or more (more than PostgreSQL's bigint is all)."""
    try:
        since = datetime.now(UTC) - timedelta(seconds=parse_duration(args.since))
    except OverflowError:  # before year 1
        since = datetime.min.replace(tzinfo=UTC)
    params: dict[str, Any] = {"since": since, "limit": min(args.limit, _BIGINT_MAX)}
    if args.device and args.rule:
        query = "history_rule_device"
    elif args.device:
        query = "history_device"
    elif args.rule:
        query = "history_rule"
    else:
        query = "history_all"
    params.update(device=args.device, rule=args.rule)
    with _open(settings) as conn:
        rows = conn.execute(QUERIES[query], params).fetchall()
    names = [
        "id",
        "rule",
        "device",
        "site",
        "field",
        "level",
        "state",
        "value",
        "threshold",
        "started_at",
        "fired_at",
        "resolved_at",
        "acknowledged_at",
        "acknowledged_by",
        "reason",
    ]
    if args.json:
        for r in rows:
            item = dict(zip(names, r, strict=True))
            for key in ("started_at", "fired_at", "resolved_at", "acknowledged_at"):
                item[key] = item[key].isoformat() if item[key] else None
            out.write(orjson.dumps(item).decode() + "\n")
        return 0
    if not rows:
        print(f"no alerts in the last {args.since}", file=out)
        return 0
    for r in rows:
        item = dict(zip(names, r, strict=True))
        value = "-" if item["value"] is None else f"{item['value']:g}"
        ended = (
            f"resolved {_time(item['resolved_at'])}"
            if item["resolved_at"]
            else f"open ({item['state']})"
        )
        acked = (
            f", acknowledged by {item['acknowledged_by']} at {_time(item['acknowledged_at'])}"
            if item["acknowledged_at"]
            else ""
        )
        reason = f" [{item['reason']}]" if item["reason"] else ""
        print(
            f"{_time(item['started_at'])} {item['level']:<8} {item['rule']} on {item['device']}"
            f" {item['field']}={value}: {ended}{acked}{reason}  ({item['id']})",
            file=out,
        )
    return 0
