"""The outbox: every notification to send, durable until it is delivered or given up.

One entry per (alert event, route, channel), keyed by an idempotency key, so the same
event handed over twice (a replay, a retried save) is stored once, and a delivered entry
is never sent again. Escalation timers (a firing alert left unacknowledged) live here too,
and the channels' circuit-breaker state, so ``ingestd notify status`` can show it and a
restart keeps it.

:class:`Outbox` is the interface the notifier uses; :class:`SqliteOutbox` is the local
store (``<spool dir>/notify.sqlite``, WAL, synchronous=FULL: an entry is on disk before the
alert state that produced it). A PostgreSQL outbox (several instances sharing one) is the
same interface over the same tables. Implementations are synchronous and not thread-safe:
the notifier calls them from one thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

__all__ = [
    "ChannelRecord",
    "ChannelStats",
    "CloseAlert",
    "Entry",
    "MarkFailed",
    "MarkFellBack",
    "NewEntry",
    "NewTimer",
    "Op",
    "Outbox",
    "Pending",
    "SqliteOutbox",
    "Timer",
    "TimerFired",
]

FILENAME = "notify.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    route TEXT NOT NULL,
    channel TEXT NOT NULL,
    alert TEXT NOT NULL,
    kind TEXT NOT NULL,
    severity TEXT NOT NULL,
    event BLOB NOT NULL,
    created_at REAL NOT NULL,
    not_before REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    done_at REAL,
    message TEXT,
    fell_back INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_pending ON entries (channel, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS entries_age ON entries (created_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS entries_done ON entries (done_at) WHERE state != 'pending';
CREATE TABLE IF NOT EXISTS timers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    alert TEXT NOT NULL,
    route TEXT NOT NULL,
    due_at REAL NOT NULL,
    event BLOB NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS timers_due ON timers (due_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS timers_alert ON timers (alert);
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    breaker TEXT NOT NULL,
    failures INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    retry_at REAL NOT NULL,
    last_error TEXT NOT NULL,
    last_ok REAL,
    updated_at REAL NOT NULL
);
"""

# --- what is stored ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewEntry:
    key: str
    route: str
    channel: str
    alert: str
    kind: str
    severity: str
    event: dict[str, Any]
    created_at: float
    not_before: float
    """Not sent before this: the end of the grouping window, or of quiet hours."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    key: str
    route: str
    channel: str
    alert: str
    kind: str
    severity: str
    event: dict[str, Any]
    created_at: float
    not_before: float
    attempts: int
    fell_back: bool
    state: str = "pending"
    last_error: str | None = None
    done_at: float | None = None
    message: str | None = None
    """The ref of the message that carried it first: a retry sends that same group."""


@dataclass(frozen=True, slots=True)
class NewTimer:
    """Escalate ``alert`` from ``route`` at ``due_at`` unless it is acknowledged or ends."""

    key: str
    alert: str
    route: str
    due_at: float
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Timer:
    id: int
    key: str
    alert: str
    route: str
    due_at: float
    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CloseAlert:
    """The alert was acknowledged or ended: its escalation timers stop."""

    alert: str


@dataclass(frozen=True, slots=True)
class MarkFailed:
    ids: tuple[int, ...]
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class MarkFellBack:
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TimerFired:
    """The timer ran out: store what it sends, unless the alert closed in the meantime."""

    id: int
    entries: tuple[NewEntry, ...] = ()
    timers: tuple[NewTimer, ...] = ()


Op = NewEntry | NewTimer | CloseAlert | MarkFailed | MarkFellBack | TimerFired


@dataclass(slots=True)
class ChannelRecord:
    """A channel's retry and circuit-breaker state."""

    name: str
    breaker: str = "closed"
    """closed (sending), open (not sending until the cool-down ends), half_open (probing)."""
    failures: int = 0
    """Consecutive failed calls."""
    opened_at: float = 0.0
    retry_at: float = 0.0
    last_error: str = ""
    last_ok: float | None = None
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Pending:
    count: int
    oldest: float
    """created_at of the oldest undelivered entry."""
    next_due: float | None
    """The earliest not_before still in the future (grouping, quiet hours)."""


@dataclass(slots=True)
class ChannelStats:
    pending: int = 0
    failed: int = 0
    delivered: int = 0
    oldest_pending: float | None = None
    """created_at of the oldest undelivered entry."""


@dataclass(slots=True)
class OutboxStats:
    channels: dict[str, ChannelStats] = field(default_factory=dict)
    timers_pending: int = 0


class Outbox(Protocol):
    """What the notifier needs from a store; one caller thread at a time."""

    def apply(self, ops: Sequence[Op]) -> int:
        """Apply ``ops`` in order, in one durable transaction; return how many new
        entries were stored (an entry whose key is already known is skipped)."""
        ...

    def due(self, channel: str, now: float, limit: int, exclude: Collection[int]) -> list[Entry]:
        """The oldest undelivered entries of ``channel`` that may go out at ``now``, all
        of one route, at most ``limit``, none of ``exclude`` (in flight). Entries already
        tried together are returned together, so a retry repeats the same message."""
        ...

    def delivered(self, ids: Sequence[int], at: float, message: str) -> None: ...

    def attempt_failed(self, ids: Sequence[int], error: str, message: str) -> None: ...

    def expired(self, before: float, limit: int) -> list[Entry]:
        """Undelivered entries created before ``before``."""
        ...

    def beyond_budget(self, max_pending: int, limit: int) -> list[Entry]:
        """The oldest undelivered entries beyond the newest ``max_pending``."""
        ...

    def unfallen(self, channels: Sequence[str], routes: Sequence[str], limit: int) -> list[Entry]:
        """Undelivered entries of ``channels`` and ``routes`` not yet sent to a fallback."""
        ...

    def due_timers(self, now: float, limit: int) -> list[Timer]: ...

    def escalated(self) -> list[tuple[str, str]]:
        """(alert, route) of escalations fired for alerts not closed since."""
        ...

    def pending(self, now: float) -> dict[str, Pending]:
        """Channel -> its undelivered entries."""
        ...

    def stats(self) -> OutboxStats: ...

    def recent_failures(self, limit: int) -> list[Entry]: ...

    def channel_records(self) -> list[ChannelRecord]: ...

    def save_channel(self, record: ChannelRecord) -> None: ...

    def purge(self, before: float) -> int:
        """Forget delivered and failed entries, and finished timers, done before ``before``."""
        ...

    def close(self) -> None: ...


# --- SQLite ------------------------------------------------------------------------------

_ENTRY_COLUMNS = (
    "id, key, route, channel, alert, kind, severity, event, created_at, not_before, attempts,"
    " fell_back, state, last_error, done_at, message"
)


def _entry(row: Sequence[Any]) -> Entry:
    return Entry(
        id=row[0],
        key=row[1],
        route=row[2],
        channel=row[3],
        alert=row[4],
        kind=row[5],
        severity=row[6],
        event=orjson.loads(row[7]),
        created_at=row[8],
        not_before=row[9],
        attempts=row[10],
        fell_back=bool(row[11]),
        state=row[12],
        last_error=row[13],
        done_at=row[14],
        message=row[15],
    )


def _marks(items: Sequence[object]) -> str:
    return ",".join("?" * len(items))


class SqliteOutbox:
    """The local outbox. Opened read-only (``ingestd notify status``) it never writes."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        if readonly:
            self._db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            return
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an entry is on disk before the alert state that produced it is saved.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    # --- writes -----------------------------------------------------------------------

    def apply(self, ops: Sequence[Op]) -> int:
        if not ops:
            return 0
        added = 0
        db = self._db
        with db:
            db.execute("BEGIN IMMEDIATE")
            for op in ops:
                if isinstance(op, NewEntry):
                    added += self._add_entry(op)
                elif isinstance(op, NewTimer):
                    self._add_timer(op)
                elif isinstance(op, CloseAlert):
                    db.execute(
                        "UPDATE timers SET state = CASE state WHEN 'pending' THEN 'cancelled'"
                        " ELSE 'closed' END WHERE alert = ? AND state IN ('pending', 'fired')",
                        (op.alert,),
                    )
                elif isinstance(op, MarkFailed):
                    db.execute(
                        "UPDATE entries SET state = 'failed', last_error = ?, done_at = ?"
                        f" WHERE state = 'pending' AND id IN ({_marks(op.ids)})",
                        (op.reason, op.at, *op.ids),
                    )
                elif isinstance(op, MarkFellBack):
                    db.execute(
                        f"UPDATE entries SET fell_back = 1 WHERE id IN ({_marks(op.ids)})",
                        op.ids,
                    )
                else:
                    fired = db.execute(
                        "UPDATE timers SET state = 'fired' WHERE id = ? AND state = 'pending'",
                        (op.id,),
                    ).rowcount
                    if fired:  # not cancelled by an acknowledgement a moment ago
                        added += sum(self._add_entry(entry) for entry in op.entries)
                        for timer in op.timers:
                            self._add_timer(timer)
        return added

    def _add_entry(self, op: NewEntry) -> int:
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO entries (key, route, channel, alert, kind, severity, event,"
            " created_at, not_before) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                op.key,
                op.route,
                op.channel,
                op.alert,
                op.kind,
                op.severity,
                orjson.dumps(op.event),
                op.created_at,
                op.not_before,
            ),
        )
        return cursor.rowcount

    def _add_timer(self, op: NewTimer) -> None:
        # A timer comes back to life when its alert fires again after an acknowledgement;
        # a pending or fired one is left as it is.
        self._db.execute(
            "INSERT INTO timers (key, alert, route, due_at, event, state)"
            " VALUES (?,?,?,?,?,'pending') ON CONFLICT (key) DO UPDATE SET"
            " state = 'pending', due_at = excluded.due_at, event = excluded.event"
            " WHERE timers.state IN ('cancelled', 'closed')",
            (op.key, op.alert, op.route, op.due_at, orjson.dumps(op.event)),
        )

    def delivered(self, ids: Sequence[int], at: float, message: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE entries SET state = 'delivered', done_at = ?, message = ?,"
                f" attempts = attempts + 1 WHERE id IN ({_marks(ids)})",
                (at, message, *ids),
            )

    def attempt_failed(self, ids: Sequence[int], error: str, message: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE entries SET attempts = attempts + 1, last_error = ?,"
                " message = coalesce(message, ?)"
                f" WHERE state = 'pending' AND id IN ({_marks(ids)})",
                (error, message, *ids),
            )

    def save_channel(self, record: ChannelRecord) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO channels (name, breaker, failures, opened_at, retry_at,"
                " last_error, last_ok, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                (
                    record.name,
                    record.breaker,
                    record.failures,
                    record.opened_at,
                    record.retry_at,
                    record.last_error,
                    record.last_ok,
                    record.updated_at,
                ),
            )

    def purge(self, before: float) -> int:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            gone = self._db.execute(
                "DELETE FROM entries WHERE state != 'pending' AND done_at < ?", (before,)
            ).rowcount
            self._db.execute(
                "DELETE FROM timers WHERE state IN ('cancelled', 'closed') AND due_at < ?",
                (before,),
            )
        return gone

    # --- reads ------------------------------------------------------------------------

    def due(self, channel: str, now: float, limit: int, exclude: Collection[int]) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE channel = ? AND state = 'pending'"
            " AND not_before <= ? ORDER BY id LIMIT ?",
            (channel, now, limit + len(exclude)),
        ).fetchall()
        entries = [_entry(row) for row in rows if row[0] not in exclude]
        if not entries:
            return []
        first = entries[0]
        if first.message is not None:
            return [e for e in entries if e.message == first.message][:limit]
        return [e for e in entries if e.route == first.route and e.message is None][:limit]

    def expired(self, before: float, limit: int) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state = 'pending' AND created_at < ?"
            " ORDER BY created_at LIMIT ?",
            (before, limit),
        )
        return [_entry(row) for row in rows]

    def beyond_budget(self, max_pending: int, limit: int) -> list[Entry]:
        (count,) = self._db.execute(
            "SELECT count(*) FROM entries WHERE state = 'pending'"
        ).fetchone()
        over = min(count - max_pending, limit)
        if over <= 0:
            return []
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state = 'pending'"
            " ORDER BY created_at LIMIT ?",
            (over,),
        )
        return [_entry(row) for row in rows]

    def unfallen(self, channels: Sequence[str], routes: Sequence[str], limit: int) -> list[Entry]:
        if not channels or not routes:
            return []
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state = 'pending' AND fell_back = 0"
            f" AND channel IN ({_marks(channels)}) AND route IN ({_marks(routes)})"
            " ORDER BY id LIMIT ?",
            (*channels, *routes, limit),
        )
        return [_entry(row) for row in rows]

    def due_timers(self, now: float, limit: int) -> list[Timer]:
        rows = self._db.execute(
            "SELECT id, key, alert, route, due_at, event FROM timers"
            " WHERE state = 'pending' AND due_at <= ? ORDER BY due_at LIMIT ?",
            (now, limit),
        )
        return [Timer(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5])) for r in rows]

    def escalated(self) -> list[tuple[str, str]]:
        rows = self._db.execute("SELECT alert, route FROM timers WHERE state = 'fired'")
        return [(alert, route) for alert, route in rows]

    def pending(self, now: float) -> dict[str, Pending]:
        rows = self._db.execute(
            "SELECT channel, count(*), min(created_at),"
            " min(CASE WHEN not_before > ? THEN not_before END)"
            " FROM entries WHERE state = 'pending' GROUP BY channel",
            (now,),
        )
        return {row[0]: Pending(row[1], row[2], row[3]) for row in rows}

    def stats(self) -> OutboxStats:
        stats = OutboxStats()
        rows = self._db.execute(
            "SELECT channel, state, count(*), min(created_at) FROM entries GROUP BY channel, state"
        )
        for channel, state, count, oldest in rows:
            entry = stats.channels.setdefault(channel, ChannelStats())
            if state == "pending":
                entry.pending, entry.oldest_pending = count, oldest
            elif state == "failed":
                entry.failed = count
            else:
                entry.delivered = count
        (stats.timers_pending,) = self._db.execute(
            "SELECT count(*) FROM timers WHERE state = 'pending'"
        ).fetchone()
        return stats

    def recent_failures(self, limit: int) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE state = 'failed'"
            " ORDER BY done_at DESC LIMIT ?",
            (limit,),
        )
        return [_entry(row) for row in rows]

    def channel_records(self) -> list[ChannelRecord]:
        rows = self._db.execute(
            "SELECT name, breaker, failures, opened_at, retry_at, last_error, last_ok,"
            " updated_at FROM channels ORDER BY name"
        )
        return [ChannelRecord(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
