"""``ingestd notify test ROUTE`` and ``ingestd notify status``.

``test`` sends one test message through every channel of a route, directly (no daemon
needed; quiet hours do not apply). ``status`` reads the outbox (``<spool dir>/notify.sqlite``,
and PostgreSQL's when notifications wait there) read-only, so it works whether or not the
daemon runs: pending and failed entries, the oldest pending age, escalation timers and each
channel's circuit breaker. Channels are shown by name and ``scheme://host`` only: URLs hold tokens.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from ingestd.config import Settings, mask_url
from ingestd.errors import ConfigError
from ingestd.notify.channels import Channel, open_channels, silence_apprise
from ingestd.notify.messages import message_ref, render
from ingestd.notify.outbox import FILENAME, ChannelRecord, ChannelStats, Outbox, SqliteOutbox
from ingestd.notify.pg_outbox import PostgresOutbox
from ingestd.notify.routes import Router

__all__ = ["send_test", "show_status"]


def send_test(settings: Settings, route_name: str, out: TextIO) -> int:
    """Exit code 0 when every channel of the route took the test message, else 1."""
    section = settings.notify
    route = Router(section).routes.get(route_name)
    if route is None:
        known = ", ".join(r.name for r in section.routes) or "none configured (notify.routes)"
        raise ConfigError(f"notify test: no route {route_name!r}; routes: {known}")
    channels = open_channels(section, route.channels)
    now = time.time()
    event = _test_event(route.name, now)
    ref = message_ref([f"test\x1f{route.name}\x1f{now!r}"])
    message = render(route.templates, [event], route=route.name, ref=ref, now=now, zone=route.zone)
    with ThreadPoolExecutor(len(channels), thread_name_prefix="ingestd-notify-test") as pool:
        results = list(pool.map(lambda channel: channel.send(message), channels))
    for channel, result in zip(channels, results, strict=True):
        if result.ok:
            out.write(f"ok      {channel.name} ({channel.target}) in {result.seconds:.2f}s\n")
        else:
            out.write(f"FAILED  {channel.name} ({channel.target}): {result.error}\n")
    return 0 if all(result.ok for result in results) else 1


def _test_event(route: str, now: float) -> dict[str, Any]:
    return {
        "id": f"test-{int(now)}",
        "rule": "ingestd-notify-test",
        "device": socket.gethostname(),
        "site": "-",
        "field": "test",
        "measurement": "notify",
        "severity": "info",
        "state": "firing",
        "kind": "test",
        "value": None,
        "threshold": None,
        "started_at": now,
        "at": now,
        "labels": {},
        "annotations": {
            "summary": f"A test of route {route}: if you read this, this channel works."
        },
        "flapping": False,
        "notify": True,
        "reason": None,
        "acknowledged_by": None,
        "tags": {},
        "route": route,
    }


@dataclass(slots=True)
class _Row:
    channel: str
    target: str
    breaker: str
    failures: int
    pending: int
    failed: int
    delivered: int
    oldest_pending_s: float | None
    last_error: str
    last_ok: str


def show_status(settings: Settings, out: TextIO, *, as_json: bool = False) -> int:
    path = settings.spool.dir / FILENAME
    section = settings.notify
    store: Outbox
    if settings.notify_outbox == "postgres":
        # The shared outbox, with this gateway's local one (used while PostgreSQL is down).
        local = SqliteOutbox(path if path.exists() else Path(":memory:"), readonly=path.exists())
        store = PostgresOutbox(settings.postgres, local, readonly=True)
    elif not path.exists():
        out.write(f"no outbox at {path}: no notification was queued yet\n")
        return 0
    else:
        store = SqliteOutbox(path, readonly=True)
    try:
        stats = store.stats()
        records = {r.name: r for r in store.channel_records()}
        failures = store.recent_failures(5)
    finally:
        store.close()
    silence_apprise()
    targets = {
        name: Channel(name, spec, section.call_timeout).target
        for name, spec in section.channels.items()
    }
    now = time.time()
    rows = []
    for name in sorted(set(targets) | set(stats.channels) | set(records)):
        counts = stats.channels.get(name) or ChannelStats()
        record = records.get(name) or ChannelRecord(name)
        breaker = record.breaker
        if breaker == "open" and now >= record.opened_at + section.breaker_cooldown:
            breaker = "open (probe due)"
        oldest = counts.oldest_pending
        rows.append(
            _Row(
                channel=name,
                target=targets.get(name, "(no longer configured)"),
                breaker=breaker,
                failures=record.failures,
                pending=counts.pending,
                failed=counts.failed,
                delivered=counts.delivered,
                oldest_pending_s=None if oldest is None else round(now - oldest, 1),
                last_error=record.last_error,
                last_ok=_when(record.last_ok),
            )
        )
    pending = sum(r.pending for r in rows)
    failed = sum(r.failed for r in rows)
    where = str(path)
    if settings.notify_outbox == "postgres":
        where = (
            f"PostgreSQL {mask_url(settings.postgres.url or '')} (local while it is down: {path})"
        )
    if as_json:
        report = {
            "outbox": where,
            "pending": pending,
            "failed": failed,
            "escalation_timers": stats.timers_pending,
            "channels": [dataclasses.asdict(r) for r in rows],
            "recent_failures": [
                {
                    "at": _when(e.done_at),
                    "channel": e.channel,
                    "route": e.route,
                    "alert": e.alert,
                    "rule": e.event.get("rule"),
                    "device": e.event.get("device"),
                    "kind": e.kind,
                    "attempts": e.attempts,
                    "why": e.last_error,
                }
                for e in failures
            ],
        }
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    ages = [r.oldest_pending_s for r in rows if r.oldest_pending_s is not None]
    oldest_text = f", oldest pending {_age(max(ages))}" if ages else ""
    out.write(
        f"outbox {where}: {pending} pending, {failed} failed{oldest_text}; "
        f"{stats.timers_pending} escalation timers waiting\n"
    )
    out.write(
        f"{'channel':<20} {'target':<32} {'breaker':<17} {'pending':>7} {'failed':>6} "
        f"{'sent':>6} {'oldest':>8}  last error\n"
    )
    for r in rows:
        age = "-" if r.oldest_pending_s is None else _age(r.oldest_pending_s)
        error = r.last_error if r.breaker != "closed" or r.failures else ""
        out.write(
            f"{r.channel:<20} {r.target:<32} {r.breaker:<17} {r.pending:>7} "
            f"{r.failed:>6} {r.delivered:>6} {age:>8}  {error[:80]}\n"
        )
    if failures:
        out.write("recent failures (given up):\n")
        for e in failures:
            out.write(
                f"  {_when(e.done_at)}  {e.channel}  {e.event.get('rule')} on "
                f"{e.event.get('device')} ({e.kind}, alert {e.alert}): {e.last_error}\n"
            )
    return 0


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
