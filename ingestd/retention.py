"""Retention: ``ingestd retention apply`` deletes what is older than its configured age.

    kind            where                           age setting                  what goes
    alert history   PostgreSQL ``alert_events``     ``retention.alert_history``  resolved alerts
    dead letters    ``<spool.dir>/deadletters.sqlite``  ``retention.deadletters``  refused messages

Both are deleted in batches of ``retention.batch_size`` rows, each batch its own short
transaction, so a large purge never holds locks for long: the daemon keeps writing alert
history and dead letters meanwhile, and a purge that is interrupted loses nothing (the next
run goes on where it stopped). An open alert is never deleted, however old.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import psycopg

from ingestd.config import Settings, mask_url
from ingestd.deadletters import DeadLetters
from ingestd.store.postgres import check_schema, connect

__all__ = [
    "EXAMPLE_PARAMS",
    "QUERIES",
    "Purge",
    "apply",
    "format_age",
    "purge_alert_history",
    "purge_deadletters",
    "purges",
]

QUERIES: dict[str, str] = {
    # ``resolved_at < cutoff`` implies ``resolved_at IS NOT NULL``, so both use the partial
    # index alert_events_resolved (and can never touch an open alert).
    "retention_alerts_count": "SELECT count(*) FROM alert_events WHERE resolved_at < %(cutoff)s",
    # The ids are gathered first (an index range scan in resolved_at order, LIMIT n), then
    # deleted by primary key. The repeated condition keeps a row that changed in between.
    "retention_alerts_delete": (
        "DELETE FROM alert_events WHERE id = ANY(ARRAY("
        "SELECT id FROM alert_events WHERE resolved_at < %(cutoff)s"
        " ORDER BY resolved_at LIMIT %(limit)s)) AND resolved_at < %(cutoff)s"
    ),
}
"""Every PostgreSQL statement this module runs (a test checks each plan uses an index)."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

EXAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    # A daily run deletes about one day of a year's history.
    "retention_alerts_count": {"cutoff": datetime(2025, 1, 1, tzinfo=UTC)},
    "retention_alerts_delete": {"cutoff": datetime(2025, 1, 1, tzinfo=UTC), "limit": 5000},
}


@dataclass(frozen=True, slots=True)
class Purge:
    """What one kind's retention did (or, in a dry run, would do)."""

    kind: str
    """``alert history`` or ``dead letters``."""
    rows: str
    """What its rows are, e.g. ``resolved alerts``."""
    event: str
    """The row's time the age counts from, e.g. ``resolved``."""
    setting: str
    """The age's setting, e.g. ``retention.alert_history``."""
    age: float
    """Seconds; 0: kept forever."""
    cutoff: datetime | None = None
    """Rows older than this go; None when nothing was looked at."""
    count: int = 0
    """Rows deleted (dry run: that would be deleted)."""
    batches: int = 0
    dry_run: bool = False
    skipped: str | None = None
    """Why nothing was looked at (not configured, kept forever); not a problem."""
    problem: str | None = None
    """Why it failed (a server unreachable); ``count`` rows were deleted before it did."""

    @property
    def _noun(self) -> str:
        return self.rows if self.count != 1 else self.rows.removesuffix("s")

    def describe(self) -> str:
        setting = f"{self.setting} = {format_age(self.age)}"
        if self.age == 0:
            return f"{self.kind}: kept forever ({setting})"
        if self.skipped:
            return f"{self.kind}: skipped, {self.skipped}"
        if self.problem and not self.count:
            return f"{self.kind}: {self.problem}; nothing deleted"
        assert self.cutoff is not None
        which = f"{self.event} before {self.cutoff.isoformat(timespec='seconds')} ({setting})"
        if self.problem:
            return (
                f"{self.kind}: {self.problem}, after deleting {self.count} {self._noun}, {which};"
                " the next run goes on from there"
            )
        if self.dry_run:
            return f"{self.kind}: would delete {self.count} {self._noun}, {which}; dry run"
        batches = f"{self.batches} batch{'es' if self.batches != 1 else ''}"
        return f"{self.kind}: deleted {self.count} {self._noun}, {which}, in {batches}"


def format_age(seconds: float) -> str:
    """``365d``, ``36h``, ``90m``, ``45s``: the largest unit that divides it; ``0``: forever."""
    whole = round(seconds)
    if whole == 0:
        return "0"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole % size == 0:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def purge_alert_history(
    conn: psycopg.Connection[Any], cutoff: datetime, batch_size: int, *, dry_run: bool = False
) -> Iterator[int]:
    """Delete resolved alerts resolved before ``cutoff``; yields each batch's count.

    ``conn`` must be in autocommit mode, so each batch is its own transaction. A dry run
    yields the count once and deletes nothing.
    """
    if not conn.autocommit:
        raise ValueError("purge_alert_history needs an autocommit connection")
    if dry_run:
        row = conn.execute(QUERIES["retention_alerts_count"], {"cutoff": cutoff}).fetchone()
        yield int(row[0]) if row else 0
        return
    params = {"cutoff": cutoff, "limit": batch_size}
    while True:
        deleted = conn.execute(QUERIES["retention_alerts_delete"], params).rowcount
        if deleted:
            yield deleted
        if deleted < batch_size:
            return


def purge_deadletters(
    store: DeadLetters, cutoff_ns: int, batch_size: int, *, dry_run: bool = False
) -> Iterator[int]:
    """Delete dead letters received before ``cutoff_ns``; yields each batch's count.

    A dry run yields the count once and deletes nothing.
    """
    if dry_run:
        yield store.count_before(cutoff_ns)
        return
    while True:
        deleted = store.delete_before(cutoff_ns, batch_size)
        if deleted:
            yield deleted
        if deleted < batch_size:
            return


def _one_line(exc: BaseException) -> str:
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _alert_history(settings: Settings, now: datetime, dry_run: bool) -> Purge:
    age = settings.retention.alert_history
    purge = Purge(
        kind="alert history",
        rows="resolved alerts",
        event="resolved",
        setting="retention.alert_history",
        age=age,
        dry_run=dry_run,
    )
    if age == 0:
        return purge
    section = settings.postgres
    if not section.url:
        return replace(purge, skipped="PostgreSQL is not configured (postgres.url)")
    cutoff = now - timedelta(seconds=age)
    where = mask_url(section.url)
    try:
        conn = connect(section, autocommit=True)
    except psycopg.OperationalError as exc:
        problem = f"cannot connect to PostgreSQL at {where}: {_one_line(exc)}"
        return replace(purge, cutoff=cutoff, problem=problem)
    count = batches = 0
    with conn:
        check_schema(conn)  # SchemaError (a ConfigError) says to migrate: exit 2
        try:
            for deleted in purge_alert_history(
                conn, cutoff, settings.retention.batch_size, dry_run=dry_run
            ):
                count += deleted
                batches += 1
        except psycopg.OperationalError as exc:
            problem = f"PostgreSQL at {where} failed: {_one_line(exc)}"
            return replace(purge, cutoff=cutoff, count=count, batches=batches, problem=problem)
    return replace(purge, cutoff=cutoff, count=count, batches=0 if dry_run else batches)


def _deadletters(settings: Settings, now: datetime, dry_run: bool) -> Purge:
    age = settings.retention.deadletters
    purge = Purge(
        kind="dead letters",
        rows="dead letters",
        event="received",
        setting="retention.deadletters",
        age=age,
        dry_run=dry_run,
    )
    if age == 0:
        return purge
    cutoff = now - timedelta(seconds=age)
    directory = settings.spool.dir
    if not (directory / DeadLetters.FILENAME).exists():
        return replace(purge, skipped=f"no dead letters in {directory}")
    cutoff_ns = (cutoff - _EPOCH) // timedelta(microseconds=1) * 1000
    count = batches = 0
    try:
        # Safe beside a running daemon: WAL, one short write transaction per batch, and
        # SQLite's busy timeout makes either side wait for the other's batch.
        store = DeadLetters(directory, settings.guard.deadletters_max)
        try:
            for deleted in purge_deadletters(
                store, cutoff_ns, settings.retention.batch_size, dry_run=dry_run
            ):
                count += deleted
                batches += 1
        finally:
            store.close()
    except sqlite3.Error as exc:
        problem = f"{directory / DeadLetters.FILENAME}: {_one_line(exc)}"
        return replace(purge, cutoff=cutoff, count=count, batches=batches, problem=problem)
    return replace(purge, cutoff=cutoff, count=count, batches=0 if dry_run else batches)


def purges(
    settings: Settings, *, dry_run: bool = False, now: datetime | None = None
) -> Iterator[Purge]:
    """Apply each kind's retention in turn (alert history, then dead letters).

    One kind failing (PostgreSQL down) does not stop the other; an outdated PostgreSQL
    schema raises SchemaError before anything is deleted.
    """
    now = now or datetime.now(UTC)
    yield _alert_history(settings, now, dry_run)
    yield _deadletters(settings, now, dry_run)


def apply(
    settings: Settings,
    out: TextIO,
    err: TextIO,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
) -> int:
    """``ingestd retention apply``: one line per kind; 0, or 1 when a kind failed."""
    failed = False
    for purge in purges(settings, dry_run=dry_run, now=now):
        if purge.problem:
            failed = True
            print(f"ingestd: {purge.describe()}", file=err)
        else:
            print(purge.describe(), file=out)
    return 1 if failed else 0
