"""The outbox in PostgreSQL (``notify.outbox: postgres``, or ``auto`` with postgres.url): one
outbox for every instance.

Every instance writes its entries to the shared tables; the instance holding an advisory
lock delivers them (one deliverer at a time, so no notification goes out twice; when it
dies its session ends, the lock is free, and another instance takes over within a cycle).

PostgreSQL down never loses or holds back a notification: the local outbox
(:class:`SqliteOutbox`, ``<spool dir>/notify.sqlite``) takes the new entries and this
instance delivers them itself; updates to entries that live in PostgreSQL (delivered,
attempt failed, ...) are deferred in the local file and replayed first when it is back,
then the local entries not in flight move to PostgreSQL (by idempotency key, so nothing is
stored twice). Entries of the local outbox have negative ids here, so the two never mix.

Like the local outbox: synchronous, one caller thread (the notifier's outbox thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from ingestd.config import PostgresSection
from ingestd.logs import get_logger
from ingestd.notify.outbox import (
    ChannelRecord,
    ChannelStats,
    CloseAlert,
    Entry,
    MarkFailed,
    MarkFellBack,
    NewEntry,
    NewTimer,
    Op,
    OutboxStats,
    Pending,
    SqliteOutbox,
    Timer,
    TimerFired,
)
from ingestd.store.postgres import SchemaError, check_schema, conninfo

__all__ = ["EXAMPLE_PARAMS", "QUERIES", "PostgresOutbox"]

log = get_logger("notify")

_LOCK = 0x1A6E57E  # pg_try_advisory_lock key: the one delivering instance
_COLUMNS = (
    "id, key, route, channel, alert, kind, severity, event, created_at, not_before, attempts,"
    " fell_back, state, last_error, done_at, message"
)
_DEFERRED = """
CREATE TABLE IF NOT EXISTS pg_deferred (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    call BLOB NOT NULL
);
"""

QUERIES: dict[str, str] = {
    "outbox_add_entry": (
        "INSERT INTO notify_entries (key, route, channel, alert, kind, severity, event,"
        " created_at, not_before, state, attempts, last_error, done_at, message, fell_back)"
        " VALUES (%(key)s, %(route)s, %(channel)s, %(alert)s, %(kind)s, %(severity)s,"
        " %(event)s, %(created_at)s, %(not_before)s, %(state)s, %(attempts)s, %(last_error)s,"
        " %(done_at)s, %(message)s, %(fell_back)s) ON CONFLICT (key) DO NOTHING"
    ),
    "outbox_add_timer": (
        "INSERT INTO notify_timers (key, alert, route, due_at, event, state)"
        " VALUES (%(key)s, %(alert)s, %(route)s, %(due_at)s, %(event)s, 'pending')"
        " ON CONFLICT (key) DO UPDATE SET state = 'pending', due_at = excluded.due_at,"
        " event = excluded.event WHERE notify_timers.state IN ('cancelled', 'closed')"
    ),
    "outbox_close_alert": (
        "UPDATE notify_timers SET state = CASE state WHEN 'pending' THEN 'cancelled'"
        " ELSE 'closed' END WHERE alert = %(alert)s AND state IN ('pending', 'fired')"
    ),
    "outbox_mark_failed": (
        "UPDATE notify_entries SET state = 'failed', last_error = %(reason)s, done_at = %(at)s"
        " WHERE state = 'pending' AND id = ANY(%(ids)s)"
    ),
    "outbox_mark_fell_back": ("UPDATE notify_entries SET fell_back = true WHERE id = ANY(%(ids)s)"),
    "outbox_timer_fired": (
        "UPDATE notify_timers SET state = 'fired' WHERE id = %(id)s AND state = 'pending'"
    ),
    "outbox_delivered": (
        "UPDATE notify_entries SET state = 'delivered', done_at = %(at)s, message = %(message)s,"
        " attempts = attempts + 1 WHERE id = ANY(%(ids)s)"
    ),
    "outbox_attempt_failed": (
        "UPDATE notify_entries SET attempts = attempts + 1, last_error = %(error)s,"
        " message = coalesce(message, %(message)s) WHERE state = 'pending' AND id = ANY(%(ids)s)"
    ),
    "outbox_save_channel": (
        "INSERT INTO notify_channels (name, breaker, failures, opened_at, retry_at, last_error,"
        " last_ok, updated_at) VALUES (%(name)s, %(breaker)s, %(failures)s, %(opened_at)s,"
        " %(retry_at)s, %(last_error)s, %(last_ok)s, %(updated_at)s) ON CONFLICT (name) DO UPDATE"
        " SET breaker = excluded.breaker, failures = excluded.failures,"
        " opened_at = excluded.opened_at, retry_at = excluded.retry_at,"
        " last_error = excluded.last_error, last_ok = excluded.last_ok,"
        " updated_at = excluded.updated_at"
    ),
    "outbox_purge_entries": (
        "DELETE FROM notify_entries WHERE state <> 'pending' AND done_at < %(before)s"
    ),
    "outbox_purge_timers": (
        "DELETE FROM notify_timers WHERE state IN ('cancelled', 'closed') AND due_at < %(before)s"
    ),
    "outbox_due": (
        f"SELECT {_COLUMNS} FROM notify_entries WHERE channel = %(channel)s"
        " AND state = 'pending' AND not_before <= %(now)s ORDER BY id LIMIT %(limit)s"
    ),
    "outbox_expired": (
        f"SELECT {_COLUMNS} FROM notify_entries WHERE state = 'pending'"
        " AND created_at < %(before)s ORDER BY created_at LIMIT %(limit)s"
    ),
    "outbox_count_pending": "SELECT count(*) FROM notify_entries WHERE state = 'pending'",
    "outbox_oldest_pending": (
        f"SELECT {_COLUMNS} FROM notify_entries WHERE state = 'pending'"
        " ORDER BY created_at LIMIT %(limit)s"
    ),
    "outbox_unfallen": (
        f"SELECT {_COLUMNS} FROM notify_entries WHERE state = 'pending' AND NOT fell_back"
        " AND channel = ANY(%(channels)s) AND route = ANY(%(routes)s) ORDER BY id LIMIT %(limit)s"
    ),
    "outbox_due_timers": (
        "SELECT id, key, alert, route, due_at, event FROM notify_timers"
        " WHERE state = 'pending' AND due_at <= %(now)s ORDER BY due_at LIMIT %(limit)s"
    ),
    "outbox_escalated": "SELECT alert, route FROM notify_timers WHERE state = 'fired'",
    "outbox_pending": (
        "SELECT channel, count(*), min(created_at),"
        " min(CASE WHEN not_before > %(now)s THEN not_before END)"
        " FROM notify_entries WHERE state = 'pending' GROUP BY channel"
    ),
    "outbox_stats": (
        "SELECT channel, state, count(*), min(created_at) FROM notify_entries"
        " GROUP BY channel, state"
    ),
    "outbox_timers_pending": "SELECT count(*) FROM notify_timers WHERE state = 'pending'",
    "outbox_recent_failures": (
        f"SELECT {_COLUMNS} FROM notify_entries WHERE state = 'failed'"
        " ORDER BY done_at DESC LIMIT %(limit)s"
    ),
    "outbox_channels": (
        "SELECT name, breaker, failures, opened_at, retry_at, last_error, last_ok, updated_at"
        " FROM notify_channels ORDER BY name"
    ),
}
"""Every statement this module runs (a test checks each plan uses an index)."""

_E = {
    "key": "k",
    "route": "water",
    "channel": "farm-hook",
    "alert": "0123456789abcdef",
    "kind": "firing",
    "severity": "critical",
    "event": Jsonb({}),
    "created_at": 1.79e9,
    "not_before": 1.79e9,
    "state": "pending",
    "attempts": 0,
    "last_error": None,
    "done_at": None,
    "message": None,
    "fell_back": False,
}
EXAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "outbox_add_entry": _E,
    "outbox_add_timer": {**_E, "due_at": 1.79e9},
    "outbox_close_alert": {"alert": "0123456789abcdef"},
    "outbox_mark_failed": {"reason": "x", "at": 1.79e9, "ids": [1, 2]},
    "outbox_mark_fell_back": {"ids": [1, 2]},
    "outbox_timer_fired": {"id": 1},
    "outbox_delivered": {"ids": [1, 2], "at": 1.79e9, "message": "m"},
    "outbox_attempt_failed": {"ids": [1, 2], "error": "e", "message": "m"},
    "outbox_save_channel": {
        "name": "farm-hook",
        "breaker": "closed",
        "failures": 0,
        "opened_at": 0.0,
        "retry_at": 0.0,
        "last_error": "",
        "last_ok": None,
        "updated_at": 1.79e9,
    },
    # A daily purge forgets about a day: keep_done ago, the oldest done ones.
    "outbox_purge_entries": {"before": 1.7603e9},
    "outbox_purge_timers": {"before": 1.7603e9},
    "outbox_due": {"channel": "farm-hook", "now": 1.79e9, "limit": 20},
    "outbox_expired": {"before": 1.7e9, "limit": 100},
    "outbox_count_pending": {},
    "outbox_oldest_pending": {"limit": 100},
    "outbox_unfallen": {"channels": ["farm-hook"], "routes": ["water"], "limit": 100},
    "outbox_due_timers": {"now": 1.79e9, "limit": 100},
    "outbox_escalated": {},
    "outbox_pending": {"now": 1.79e9},
    "outbox_stats": {},
    "outbox_timers_pending": {},
    "outbox_recent_failures": {"limit": 5},
    "outbox_channels": {},
}


def _entry(row: Sequence[Any], sign: int = 1) -> Entry:
    event = row[7] if isinstance(row[7], dict) else orjson.loads(row[7])
    return Entry(
        id=sign * int(row[0]),
        key=row[1],
        route=row[2],
        channel=row[3],
        alert=row[4],
        kind=row[5],
        severity=row[6],
        event=event,
        created_at=row[8],
        not_before=row[9],
        attempts=row[10],
        fell_back=bool(row[11]),
        state=row[12],
        last_error=row[13],
        done_at=row[14],
        message=row[15],
    )


def _local(entry: Entry) -> Entry:
    """An entry of the local outbox, as handed out here: a negative id."""
    return dataclasses.replace(entry, id=-entry.id)


def _split(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    return [i for i in ids if i > 0], [-i for i in ids if i < 0]


class PostgresOutbox:
    def __init__(
        self,
        section: PostgresSection,
        local: SqliteOutbox,
        *,
        on_state: Callable[[str | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        readonly: bool = False,
    ) -> None:
        self._section = section
        self._local = local
        self._on_state = on_state
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._retry_at = 0.0
        self._leader = False
        self._handed: set[int] = set()  # local entries handed out by due(), not yet settled
        self._readonly = readonly  # `ingestd notify status`: reads only, moves nothing
        self._db = local._db  # the local file also keeps the deferred updates
        if not readonly:
            self._db.executescript(_DEFERRED)
        self._connect(first=True)

    # --- the connection ---------------------------------------------------------------

    def _connect(self, *, first: bool = False) -> psycopg.Connection[Any] | None:
        if self._conn is not None:
            return self._conn
        if self._clock() < self._retry_at:
            return None
        kwargs = conninfo(self._section)
        try:
            conn = psycopg.connect(kwargs.pop("conninfo"), autocommit=True, **kwargs)
        except psycopg.OperationalError as exc:
            self._down(exc)
            return None
        try:
            check_schema(conn)
        except SchemaError as exc:
            conn.close()
            if first:
                raise  # `ingestd run` refuses to start: exit 2 with the fix
            self._down(exc)
            return None
        self._conn = conn
        try:
            if not self._readonly:
                self._replay()
                self._move_local()
        except psycopg.Error as exc:
            self._down(exc)
            return None
        if not self._readonly:  # `notify status --json`: stdout is the document, no log line
            log.info("notification outbox in PostgreSQL")
        if self._on_state is not None:
            self._on_state(None)
        return conn

    def _down(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()
        why = first[0] if first else type(exc).__name__
        if self._conn is not None:
            log.warning(
                "PostgreSQL unreachable: notifications go through the local outbox", error=why
            )
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None
        self._leader = False
        self._retry_at = self._clock() + self._section.retry
        if self._on_state is not None:
            self._on_state(f"PostgreSQL unreachable, outbox local meanwhile: {why}")

    def _pg(self, call: Callable[[psycopg.Connection[Any]], Any]) -> tuple[bool, Any]:
        """(True, result) from PostgreSQL, or (False, None) when it is down."""
        conn = self._connect()
        if conn is None:
            return False, None
        try:
            return True, call(conn)
        except psycopg.Error as exc:  # down, or refusing: either way the local outbox serves
            if not isinstance(exc, psycopg.OperationalError):
                log.error("PostgreSQL refused an outbox statement", error=str(exc))
            self._down(exc)
            return False, None

    def _lead(self, conn: psycopg.Connection[Any]) -> bool:
        if not self._leader:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK,)).fetchone()
            self._leader = bool(row and row[0])
            if self._leader:
                log.info("this instance delivers the shared notification outbox")
        return self._leader

    # --- deferred updates of entries in PostgreSQL ----------------------------------------

    def _defer(self, method: str, *args: Any) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO pg_deferred (call) VALUES (?)",
                (orjson.dumps([method, list(args)]),),
            )

    def _replay(self) -> None:
        assert self._conn is not None
        rows = self._db.execute("SELECT id, call FROM pg_deferred ORDER BY id").fetchall()
        for ident, blob in rows:
            method, args = orjson.loads(blob)
            getattr(self, f"_pg_{method}")(self._conn, *args)
            with self._db:
                self._db.execute("DELETE FROM pg_deferred WHERE id = ?", (ident,))

    def _move_local(self) -> None:
        """Move the local entries (not in flight) and timers into PostgreSQL."""
        assert self._conn is not None
        db = self._db
        entries = db.execute(
            "SELECT id, key, route, channel, alert, kind, severity, event, created_at,"
            " not_before, attempts, fell_back, state, last_error, done_at, message FROM entries"
        ).fetchall()
        timers = db.execute(
            "SELECT id, key, alert, route, due_at, event, state FROM timers"
        ).fetchall()
        moving = [row for row in entries if row[0] not in self._handed]
        if not moving and not timers:
            return
        with self._conn.transaction():
            for row in moving:
                self._conn.execute(
                    QUERIES["outbox_add_entry"],
                    {
                        "key": row[1],
                        "route": row[2],
                        "channel": row[3],
                        "alert": row[4],
                        "kind": row[5],
                        "severity": row[6],
                        "event": Jsonb(orjson.loads(row[7])),
                        "created_at": row[8],
                        "not_before": row[9],
                        "attempts": row[10],
                        "fell_back": bool(row[11]),
                        "state": row[12],
                        "last_error": row[13],
                        "done_at": row[14],
                        "message": row[15],
                    },
                )
            for row in timers:
                self._conn.execute(
                    "INSERT INTO notify_timers (key, alert, route, due_at, event, state)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (key) DO UPDATE SET"
                    " state = excluded.state, due_at = excluded.due_at, event = excluded.event",
                    (row[1], row[2], row[3], row[4], Jsonb(orjson.loads(row[5])), row[6]),
                )
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM entries WHERE id = ?", [(row[0],) for row in moving])
            db.executemany("DELETE FROM timers WHERE id = ?", [(row[0],) for row in timers])
        log.info(
            "notifications queued locally moved to PostgreSQL",
            entries=len(moving),
            timers=len(timers),
        )

    # --- writes -----------------------------------------------------------------------

    def apply(self, ops: Sequence[Op]) -> int:
        if not ops:
            return 0
        ok, added = self._pg(lambda conn: self._pg_apply(conn, ops))
        if ok:
            return int(added)
        return self._apply_locally(ops)

    def _apply_locally(self, ops: Sequence[Op]) -> int:
        local: list[Op] = []
        for op in ops:
            if isinstance(op, MarkFailed):
                pg, mine = _split(op.ids)
                if pg:
                    self._defer("mark_failed", pg, op.reason, op.at)
                if mine:
                    local.append(MarkFailed(tuple(mine), op.reason, op.at))
            elif isinstance(op, MarkFellBack):
                pg, mine = _split(op.ids)
                if pg:
                    self._defer("mark_fell_back", pg)
                if mine:
                    local.append(MarkFellBack(tuple(mine)))
            elif isinstance(op, TimerFired) and op.id > 0:
                # A timer of PostgreSQL fired while it is down: send now (locally); the
                # timer is marked when it is back. A repeat is possible, a loss is not.
                self._defer("timer_fired", op.id)
                local.extend(op.entries)
                local.extend(op.timers)
            elif isinstance(op, TimerFired):
                local.append(TimerFired(-op.id, op.entries, op.timers))
            else:
                local.append(op)
        return self._local.apply(local)

    def _pg_apply(self, conn: psycopg.Connection[Any], ops: Sequence[Op]) -> int:
        added = 0
        local: list[Op] = []
        with conn.transaction():
            for op in ops:
                if isinstance(op, NewEntry):
                    added += self._add_entry(conn, op)
                elif isinstance(op, NewTimer):
                    self._add_timer(conn, op)
                elif isinstance(op, CloseAlert):
                    conn.execute(QUERIES["outbox_close_alert"], {"alert": op.alert})
                    local.append(op)
                elif isinstance(op, MarkFailed):
                    pg, mine = _split(op.ids)
                    if pg:
                        self._pg_mark_failed(conn, pg, op.reason, op.at)
                    if mine:
                        local.append(MarkFailed(tuple(mine), op.reason, op.at))
                elif isinstance(op, MarkFellBack):
                    pg, mine = _split(op.ids)
                    if pg:
                        self._pg_mark_fell_back(conn, pg)
                    if mine:
                        local.append(MarkFellBack(tuple(mine)))
                elif op.id < 0:
                    local.append(TimerFired(-op.id, op.entries, op.timers))
                elif self._pg_timer_fired(conn, op.id):
                    added += sum(self._add_entry(conn, entry) for entry in op.entries)
                    for timer in op.timers:
                        self._add_timer(conn, timer)
        if local:
            added += self._local.apply(local)
        return added

    def _add_entry(self, conn: psycopg.Connection[Any], op: NewEntry) -> int:
        params = {
            "key": op.key,
            "route": op.route,
            "channel": op.channel,
            "alert": op.alert,
            "kind": op.kind,
            "severity": op.severity,
            "event": Jsonb(op.event),
            "created_at": op.created_at,
            "not_before": op.not_before,
            "state": "pending",
            "attempts": 0,
            "last_error": None,
            "done_at": None,
            "message": None,
            "fell_back": False,
        }
        return conn.execute(QUERIES["outbox_add_entry"], params).rowcount

    def _add_timer(self, conn: psycopg.Connection[Any], op: NewTimer) -> None:
        conn.execute(
            QUERIES["outbox_add_timer"],
            {
                "key": op.key,
                "alert": op.alert,
                "route": op.route,
                "due_at": op.due_at,
                "event": Jsonb(op.event),
            },
        )

    def _pg_mark_failed(
        self, conn: psycopg.Connection[Any], ids: list[int], reason: str, at: float
    ) -> None:
        conn.execute(QUERIES["outbox_mark_failed"], {"reason": reason, "at": at, "ids": ids})

    def _pg_mark_fell_back(self, conn: psycopg.Connection[Any], ids: list[int]) -> None:
        conn.execute(QUERIES["outbox_mark_fell_back"], {"ids": ids})

    def _pg_timer_fired(self, conn: psycopg.Connection[Any], ident: int) -> bool:
        return bool(conn.execute(QUERIES["outbox_timer_fired"], {"id": ident}).rowcount)

    def _pg_delivered(
        self, conn: psycopg.Connection[Any], ids: list[int], at: float, message: str
    ) -> None:
        conn.execute(QUERIES["outbox_delivered"], {"ids": ids, "at": at, "message": message})

    def _pg_attempt_failed(
        self, conn: psycopg.Connection[Any], ids: list[int], error: str, message: str
    ) -> None:
        conn.execute(
            QUERIES["outbox_attempt_failed"], {"ids": ids, "error": error, "message": message}
        )

    def _pg_save_channel(self, conn: psycopg.Connection[Any], record: dict[str, Any]) -> None:
        conn.execute(QUERIES["outbox_save_channel"], record)

    def delivered(self, ids: Sequence[int], at: float, message: str) -> None:
        pg, mine = _split(ids)
        if mine:
            self._local.delivered(mine, at, message)
            self._handed.difference_update(mine)
        if pg:
            ok, _ = self._pg(lambda conn: self._pg_delivered(conn, pg, at, message))
            if not ok:
                self._defer("delivered", pg, at, message)

    def attempt_failed(self, ids: Sequence[int], error: str, message: str) -> None:
        pg, mine = _split(ids)
        if mine:
            self._local.attempt_failed(mine, error, message)
            self._handed.difference_update(mine)
        if pg:
            ok, _ = self._pg(lambda conn: self._pg_attempt_failed(conn, pg, error, message))
            if not ok:
                self._defer("attempt_failed", pg, error, message)

    def save_channel(self, record: ChannelRecord) -> None:
        data = dataclasses.asdict(record)
        ok, _ = self._pg(lambda conn: self._pg_save_channel(conn, data))
        if not ok:
            self._local.save_channel(record)

    def purge(self, before: float) -> int:
        gone = self._local.purge(before)

        def purge(conn: psycopg.Connection[Any]) -> int:
            count = conn.execute(QUERIES["outbox_purge_entries"], {"before": before}).rowcount
            conn.execute(QUERIES["outbox_purge_timers"], {"before": before})
            return count

        ok, count = self._pg(purge)
        return gone + (int(count) if ok else 0)

    # --- reads ------------------------------------------------------------------------

    def _deliverer(self) -> psycopg.Connection[Any] | None:
        """PostgreSQL when this instance delivers its entries; None otherwise."""
        ok, conn = self._pg(lambda conn: conn if self._lead(conn) else None)
        if ok and self._settled_locally():
            self._pg(lambda _: self._move_local())  # what was in flight locally has settled
        return conn if ok else None

    def _settled_locally(self) -> bool:
        row = self._db.execute("SELECT count(*) FROM entries").fetchone()
        return bool(row and row[0] > len(self._handed))

    def due(self, channel: str, now: float, limit: int, exclude: Collection[int]) -> list[Entry]:
        # Local entries first (written while PostgreSQL was down, or in flight since).
        mine = self._local.due(channel, now, limit, {-i for i in exclude if i < 0})
        if mine:
            self._handed.update(e.id for e in mine)
            return [_local(e) for e in mine]
        conn = self._deliverer()
        if conn is None:
            return []

        def due(conn: psycopg.Connection[Any]) -> list[Entry]:
            rows = conn.execute(
                QUERIES["outbox_due"],
                {"channel": channel, "now": now, "limit": limit + len(exclude)},
            ).fetchall()
            return [_entry(row) for row in rows if row[0] not in exclude]

        ok, entries = self._pg(due)
        if not ok or not entries:
            return []
        first = entries[0]
        if first.message is not None:
            return [e for e in entries if e.message == first.message][:limit]
        return [e for e in entries if e.route == first.route and e.message is None][:limit]

    def _both(
        self, local: list[Entry], pg_query: str, params: dict[str, Any], limit: int
    ) -> list[Entry]:
        found = [_local(e) for e in local]
        if self._deliverer() is None:
            return found

        def read(conn: psycopg.Connection[Any]) -> list[Entry]:
            return [_entry(row) for row in conn.execute(QUERIES[pg_query], params).fetchall()]

        ok, entries = self._pg(read)
        return (found + (entries if ok else []))[:limit]

    def expired(self, before: float, limit: int) -> list[Entry]:
        return self._both(
            self._local.expired(before, limit),
            "outbox_expired",
            {"before": before, "limit": limit},
            limit,
        )

    def beyond_budget(self, max_pending: int, limit: int) -> list[Entry]:
        local = self._local.beyond_budget(max_pending, limit)
        if self._deliverer() is None:
            return [_local(e) for e in local]

        def over(conn: psycopg.Connection[Any]) -> list[Entry]:
            row = conn.execute(QUERIES["outbox_count_pending"]).fetchone()
            count = int(row[0]) if row else 0
            excess = min(count - max_pending, limit)
            if excess <= 0:
                return []
            rows = conn.execute(QUERIES["outbox_oldest_pending"], {"limit": excess}).fetchall()
            return [_entry(r) for r in rows]

        ok, entries = self._pg(over)
        return ([_local(e) for e in local] + (entries if ok else []))[:limit]

    def unfallen(self, channels: Sequence[str], routes: Sequence[str], limit: int) -> list[Entry]:
        if not channels or not routes:
            return []
        return self._both(
            self._local.unfallen(channels, routes, limit),
            "outbox_unfallen",
            {"channels": list(channels), "routes": list(routes), "limit": limit},
            limit,
        )

    def due_timers(self, now: float, limit: int) -> list[Timer]:
        local = [
            Timer(-t.id, t.key, t.alert, t.route, t.due_at, t.event)
            for t in self._local.due_timers(now, limit)
        ]
        if local or self._deliverer() is None:
            return local

        def timers(conn: psycopg.Connection[Any]) -> list[Timer]:
            rows = conn.execute(QUERIES["outbox_due_timers"], {"now": now, "limit": limit})
            return [Timer(int(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows.fetchall()]

        ok, found = self._pg(timers)
        return list(found) if ok else []

    def escalated(self) -> list[tuple[str, str]]:
        ok, rows = self._pg(lambda conn: conn.execute(QUERIES["outbox_escalated"]).fetchall())
        return self._local.escalated() + ([(a, r) for a, r in rows] if ok else [])

    def pending(self, now: float) -> dict[str, Pending]:
        found = dict(self._local.pending(now))
        ok, rows = self._pg(
            lambda conn: conn.execute(QUERIES["outbox_pending"], {"now": now}).fetchall()
        )
        for channel, count, oldest, next_due in rows if ok else []:
            mine = found.get(channel)
            if mine is None:
                found[channel] = Pending(int(count), oldest, next_due)
            else:
                dues = [d for d in (mine.next_due, next_due) if d is not None]
                found[channel] = Pending(
                    mine.count + int(count), min(mine.oldest, oldest), min(dues, default=None)
                )
        return found

    def stats(self) -> OutboxStats:
        stats = self._local.stats()

        def read(conn: psycopg.Connection[Any]) -> tuple[list[Any], int]:
            rows = conn.execute(QUERIES["outbox_stats"]).fetchall()
            (timers,) = conn.execute(QUERIES["outbox_timers_pending"]).fetchone() or (0,)
            return rows, int(timers)

        ok, found = self._pg(read)
        if not ok:
            return stats
        rows, timers = found
        stats.timers_pending += timers
        for channel, state, count, oldest in rows:
            entry = stats.channels.setdefault(channel, ChannelStats())
            if state == "pending":
                entry.pending += int(count)
                entry.oldest_pending = (
                    oldest if entry.oldest_pending is None else min(oldest, entry.oldest_pending)
                )
            elif state == "failed":
                entry.failed += int(count)
            else:
                entry.delivered += int(count)
        return stats

    def recent_failures(self, limit: int) -> list[Entry]:
        local = [_local(e) for e in self._local.recent_failures(limit)]
        ok, rows = self._pg(
            lambda conn: conn.execute(
                QUERIES["outbox_recent_failures"], {"limit": limit}
            ).fetchall()
        )
        found = local + ([_entry(r) for r in rows] if ok else [])
        found.sort(key=lambda e: e.done_at or 0.0, reverse=True)
        return found[:limit]

    def channel_records(self) -> list[ChannelRecord]:
        ok, rows = self._pg(lambda conn: conn.execute(QUERIES["outbox_channels"]).fetchall())
        if not ok:
            return self._local.channel_records()
        return [ChannelRecord(*row) for row in rows]

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        self._local.close()
