"""Dead letters: every refused message, kept with its reason, bounded, listable.

A SQLite file beside the spool. Writes happen in the spool's commit thread, inside the
group commit that precedes the broker acknowledgement, so a dead letter is durable before
the message that caused it is acknowledged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DeadLetter", "DeadLetters"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deadletters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ns INTEGER NOT NULL,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    size INTEGER NOT NULL,
    sample BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS deadletters_reason ON deadletters (reason, id);
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_ns: int
    topic: str
    reason: str
    detail: str
    size: int
    """The whole payload's size; ``sample`` holds its first bytes."""
    sample: bytes


class DeadLetters:
    """The dead-letter store. Not thread-safe: one writer thread, readers open their own."""

    FILENAME = "deadletters.sqlite"

    def __init__(self, directory: Path, max_rows: int) -> None:
        self._path = directory / self.FILENAME
        self._max_rows = max_rows
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a dead letter is on disk before its message is acknowledged.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def add(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO deadletters (received_ns, topic, reason, detail, size, sample)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(d.received_ns, d.topic, d.reason, d.detail, d.size, d.sample) for d in letters],
            )
            self._db.execute(
                "DELETE FROM deadletters WHERE id <= (SELECT max(id) FROM deadletters) - ?",
                (self._max_rows,),
            )

    def list(self, limit: int = 50, reason: str | None = None) -> Iterator[DeadLetter]:
        """The newest first."""
        query = "SELECT received_ns, topic, reason, detail, size, sample FROM deadletters"
        params: tuple[object, ...] = ()
        if reason:
            query += " WHERE reason = ?"
            params = (reason,)
        query += " ORDER BY id DESC LIMIT ?"
        for row in self._db.execute(query, (*params, limit)):
            yield DeadLetter(*row)

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT reason, count(*) FROM deadletters GROUP BY reason")
        return dict(rows.fetchall())

    def count_before(self, received_ns: int) -> int:
        """How many were received before ``received_ns`` (``ingestd retention apply``)."""
        row = self._db.execute(
            "SELECT count(*) FROM deadletters WHERE received_ns < ?", (received_ns,)
        ).fetchone()
        return int(row[0])

    def delete_before(self, received_ns: int, limit: int) -> int:
        """Delete at most ``limit`` received before ``received_ns``, oldest first, in one
        short transaction (a daemon writing meanwhile waits at most for this one); returns
        how many went. No index on received_ns: the store is bounded (``deadletters_max``)
        and old rows have the low ids, where the scan in id order starts."""
        cursor = self._db.execute(
            "DELETE FROM deadletters WHERE id IN (SELECT id FROM deadletters"
            " WHERE received_ns < ? ORDER BY id LIMIT ?)",
            (received_ns, limit),
        )
        return cursor.rowcount

    def close(self) -> None:
        self._db.close()
