"""Alert history: every alert transition, queued locally, written to PostgreSQL in batches.

The alert stage hands each transition over (:meth:`History.submit`) and writes what
:meth:`History.take` returns in the same ordered step as its own state, so a transition is
in the local queue (``<spool dir>/history.sqlite``) before the state that produced it is
saved. A task writes the queue to ``alert_events`` in batches (one pipelined round trip,
one transaction) and forgets what PostgreSQL committed. While PostgreSQL is down the queue
grows on disk, /healthz says so, and the backlog goes out when it returns.

``alert_events`` holds one row per alert (its engine id) that each transition updates; a
transition older than the row's last one never overwrites it, so a replay after a crash is
harmless. An alert that opens while an older one of the same rule, device and field is still
open in the table (a lost "resolved", say) closes the older one as ``superseded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ingestd.config import PostgresSection
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.rules import AlertEvent

__all__ = ["EXAMPLE_PARAMS", "QUERIES", "History", "row_of"]

log = get_logger("history")

FILENAME = "history.sqlite"
_STAGED_MAX = 100_000

_UPSERT = """
INSERT INTO alert_events AS a (id, rule, device_id, site, field, measurement, level, state,
    value, threshold, started_at, fired_at, resolved_at, acknowledged_at, acknowledged_by,
    reason, labels, updated_at)
VALUES (%(id)s, %(rule)s, %(device)s, %(site)s, %(field)s, %(measurement)s, %(level)s,
    %(state)s, %(value)s, %(threshold)s, to_timestamp(%(started_at)s),
    CASE WHEN %(fired)s THEN to_timestamp(%(at)s) END,
    CASE WHEN %(resolved)s THEN to_timestamp(%(at)s) END,
    CASE WHEN %(acknowledged)s THEN to_timestamp(%(at)s) END,
    %(acknowledged_by)s, %(reason)s, %(labels)s, to_timestamp(%(at)s))
ON CONFLICT (id) DO UPDATE SET
    level = excluded.level,
    state = excluded.state,
    value = coalesce(excluded.value, a.value),
    threshold = coalesce(excluded.threshold, a.threshold),
    fired_at = coalesce(a.fired_at, excluded.fired_at),
    resolved_at = coalesce(excluded.resolved_at, a.resolved_at),
    acknowledged_at = coalesce(a.acknowledged_at, excluded.acknowledged_at),
    acknowledged_by = coalesce(a.acknowledged_by, excluded.acknowledged_by),
    reason = coalesce(excluded.reason, a.reason),
    labels = excluded.labels,
    updated_at = excluded.updated_at
WHERE a.updated_at <= excluded.updated_at
"""

_SUPERSEDE = """
UPDATE alert_events SET state = 'resolved', resolved_at = to_timestamp(%(at)s),
    reason = coalesce(reason, 'superseded'), updated_at = to_timestamp(%(at)s)
WHERE rule = %(rule)s AND device_id = %(device)s AND field = %(field)s
  AND resolved_at IS NULL AND id <> %(id)s
  AND started_at < to_timestamp(%(started_at)s) AND updated_at <= to_timestamp(%(at)s)
"""

QUERIES: dict[str, str] = {"history_supersede": _SUPERSEDE, "history_upsert": _UPSERT}

_LOCAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    row BLOB NOT NULL
);
"""


def row_of(event: AlertEvent) -> dict[str, Any]:
    """The parameters of one transition for :data:`QUERIES`."""
    return {
        "id": event.id,
        "rule": event.rule,
        "device": event.device,
        "site": event.site,
        "field": event.field,
        "measurement": event.measurement,
        "level": event.severity,
        "state": "cancelled" if event.kind == "cancelled" else event.state,
        "value": event.value,
        "threshold": event.threshold,
        "started_at": event.started_at,
        "at": event.at,
        "fired": event.kind == "firing",
        "resolved": event.state == "resolved",
        "acknowledged": event.kind == "acknowledged",
        "acknowledged_by": event.acknowledged_by,
        "reason": event.reason,
        "labels": dict(event.labels),
    }


_EXAMPLE = {
    "id": "0123456789abcdef",
    "rule": "ph-low",
    "device": "dev-00042",
    "site": "gh1",
    "field": "ph",
    "measurement": "water",
    "level": "critical",
    "state": "firing",
    "value": 5.1,
    "threshold": 5.5,
    "started_at": 1_790_000_000.0,
    "at": 1_790_000_060.0,
    "fired": True,
    "resolved": False,
    "acknowledged": False,
    "acknowledged_by": None,
    "reason": None,
    "labels": Jsonb({}),
}
EXAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "history_supersede": _EXAMPLE,
    "history_upsert": _EXAMPLE,
}


class History:
    def __init__(
        self,
        section: PostgresSection,
        pool: AsyncConnectionPool,
        state_dir: Path,
        metrics: Metrics,
        health: Health,
    ) -> None:
        self._section = section
        self._pool = pool
        self._metrics = metrics
        self._health = health
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            state_dir / FILENAME, isolation_level=None, check_same_thread=False, timeout=1.0
        )
        # A write hung on a half-open connection must not hold the queue for long.
        self._write_timeout = max(30.0, 6 * section.connect_timeout)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_LOCAL_SCHEMA)
        self._staged: list[bytes] = []
        self._wake = asyncio.Event()
        self._failing = False
        self._pending = self._count()  # once; then kept by the writes and deletes
        pending = self._pending
        metrics.history_pending.set(pending)
        if pending:
            log.info("alert history waiting for PostgreSQL", transitions=pending)
            self._wake.set()

    # --- hand-off from the alert stage ------------------------------------------------

    def submit(self, events: Sequence[AlertEvent]) -> None:
        for event in events:
            if len(self._staged) >= _STAGED_MAX:
                self._staged.pop(0)
                log.error("alert history hand-off full (the local queue cannot be written)")
            self._staged.append(orjson.dumps(row_of(event)))

    def take(self) -> Callable[[], bool] | None:
        """What was submitted, as a blocking durable write (runs in the alert saver thread)."""
        if not self._staged:
            return None
        rows, self._staged = self._staged, []
        loop = asyncio.get_running_loop()

        def write() -> bool:
            try:
                with self._lock, self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany("INSERT INTO queue (row) VALUES (?)", [(r,) for r in rows])
                    self._pending += len(rows)
            except sqlite3.Error as exc:
                loop.call_soon_threadsafe(self._restage, rows, str(exc))
                return False
            loop.call_soon_threadsafe(self._wake.set)
            return True

        return write

    def _restage(self, rows: list[bytes], error: str) -> None:
        self._staged[:0] = rows
        self._health.problem("alert_history", f"the local queue cannot be written: {error}")
        log.error("alert history queue cannot be written; transitions wait in memory", error=error)

    # --- to PostgreSQL ------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._section.retry)
            self._wake.clear()
            try:
                while await self.flush_once():
                    pass
            except Exception:  # a bug of ours must not end the daemon: say so, retry
                self._health.problem("alert_history", "internal error; see the log")
                log.exception("internal error writing alert history; retrying")

    async def flush_once(self) -> bool:
        """Write one batch from the local queue; True when there may be more."""
        try:
            batch = await asyncio.to_thread(self._read, self._section.history_batch)
        except sqlite3.Error as exc:
            self._health.problem("alert_history", f"the local queue cannot be read: {exc}")
            log.error("alert history queue cannot be read; retrying", error=str(exc))
            return False
        if not batch:
            self._metrics.history_pending.set(0)
            return False
        last = batch[-1][0]
        rows = [orjson.loads(blob) for _, blob in batch]
        try:
            async with asyncio.timeout(self._write_timeout):
                skipped = await self._write(rows)
        except (psycopg.Error, PoolTimeout, OSError, TimeoutError) as exc:
            # Down, read-only (a failover), refusing: either way the queue keeps it.
            self._metrics.history_errors.inc()
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not self._failing:
                log.warning(
                    "cannot write alert history to PostgreSQL; it waits in the local queue",
                    error=why,
                )
            self._failing = True
            self._health.problem(
                "alert_history",
                f"cannot write to PostgreSQL ({why}); {self._pending} transitions queued",
            )
            return False
        try:
            await asyncio.to_thread(self._forget, last, len(batch))
        except sqlite3.Error as exc:  # written twice later: harmless (idempotent upserts)
            log.error("alert history queue cannot be trimmed", error=str(exc))
            return False
        self._metrics.history_written.inc(len(rows) - skipped)
        pending = self._pending
        self._metrics.history_pending.set(pending)
        if self._failing:
            self._failing = False
            log.info("alert history written again", transitions=len(rows), left=pending)
        self._health.ok("alert_history")
        return len(batch) == self._section.history_batch

    async def _write(self, rows: list[dict[str, Any]]) -> int:
        """Write ``rows`` in order in one transaction; a row PostgreSQL refuses (never
        expected) is logged and skipped rather than blocking the queue forever."""
        for row in rows:
            row["labels"] = Jsonb(row["labels"])
        try:
            async with (
                self._pool.connection(timeout=self._section.connect_timeout) as conn,
                conn.transaction(),
                conn.pipeline(),
            ):
                for row in rows:
                    if not row["resolved"]:
                        await conn.execute(_SUPERSEDE, row)
                    await conn.execute(_UPSERT, row)
            return 0
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError):
            pass
        skipped = 0
        async with self._pool.connection(timeout=self._section.connect_timeout) as conn:
            for row in rows:
                try:
                    async with conn.transaction():
                        if not row["resolved"]:
                            await conn.execute(_SUPERSEDE, row)
                        await conn.execute(_UPSERT, row)
                except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                    skipped += 1
                    self._metrics.history_errors.inc()
                    log.error(
                        "alert transition refused by PostgreSQL; skipped",
                        alert=row["id"],
                        error=str(exc),
                    )
        return skipped

    def _read(self, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._db.execute(
                "SELECT id, row FROM queue ORDER BY id LIMIT ?", (limit,)
            ).fetchall()

    def _forget(self, last: int, count: int) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM queue WHERE id <= ?", (last,))
            self._pending = max(0, self._pending - count)

    def _count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM queue").fetchone()
        return int(count)

    @property
    def pending(self) -> int:
        return self._pending

    async def close(self, grace: float = 2.0) -> None:
        """Try to write what is queued (briefly); what is left goes out at the next start."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drain(), grace)
        with self._lock:
            self._db.close()

    async def _drain(self) -> None:
        while await self.flush_once():
            pass
