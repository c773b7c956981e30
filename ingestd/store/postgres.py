"""PostgreSQL: how to connect, the schema migrations and the check that they are applied.

Migrations are ``migrations/NNNN_name.sql`` shipped in the package. ``ingestd db migrate``
applies the missing ones in order, each in its own transaction together with its row in
``ingestd_schema``, under an advisory lock so two instances never migrate at once. The
daemon refuses a database whose schema is older than the code (:func:`check_schema`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ingestd.config import PostgresSection
from ingestd.errors import ConfigError

__all__ = [
    "LATEST",
    "MIGRATIONS",
    "Migration",
    "SchemaError",
    "applied_version",
    "check_schema",
    "connect",
    "conninfo",
    "migrate",
    "open_pool",
    "schema_problem",
]

_LOCK = 0x1A6E57D  # pg_advisory_xact_lock key: one migrating instance at a time

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS ingestd_schema (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaError(ConfigError):
    """The database's schema does not match this version of ingestd."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def _migrations() -> tuple[Migration, ...]:
    found = []
    for entry in resources.files("ingestd.store").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps: {found}")
    return tuple(found)


MIGRATIONS = _migrations()
LATEST = MIGRATIONS[-1].version
"""The schema version this code needs."""


def conninfo(section: PostgresSection) -> dict[str, Any]:
    """Keyword arguments for psycopg.connect / the pool (password kept out of the URL)."""
    if not section.url:
        raise ConfigError("postgres.url is not set: PostgreSQL is not configured")
    kwargs: dict[str, Any] = {
        "conninfo": section.url,
        "connect_timeout": max(1, round(section.connect_timeout)),
        "application_name": "ingestd",
        # A server that vanished without a word (a cut network) is noticed in about a
        # minute, not after the kernel's 15: keepalives, and a bound on unacknowledged sends.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 60_000,
    }
    if section.password is not None:
        kwargs["password"] = section.password.get_secret_value()
    return kwargs


def connect(section: PostgresSection, **extra: Any) -> psycopg.Connection[Any]:
    """A plain connection (admin commands); raises psycopg.OperationalError when down."""
    kwargs = conninfo(section)
    return psycopg.connect(kwargs.pop("conninfo"), **kwargs, **extra)


def open_pool(section: PostgresSection) -> AsyncConnectionPool:
    """The daemon's pool; not opened: ``await pool.open(wait=False)`` starts it, and it
    keeps reconnecting in the background while PostgreSQL is down."""
    kwargs = conninfo(section)
    info = kwargs.pop("conninfo")
    return AsyncConnectionPool(
        info,
        kwargs=kwargs,
        min_size=section.pool_min,
        max_size=section.pool_max,
        timeout=section.connect_timeout,
        # Background refills keep trying for a day; a request grows the pool on demand
        # anyway, so the pool never stays empty while the daemon runs degraded.
        reconnect_timeout=86400,
        check=AsyncConnectionPool.check_connection,  # a connection dead since a restart
        open=False,
        name="ingestd",
    )


def applied_version(conn: psycopg.Connection[Any]) -> int:
    """The newest applied migration; 0 for an empty database."""
    exists = conn.execute("SELECT to_regclass('ingestd_schema') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM ingestd_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply the missing migrations in order; returns those applied (none: up to date)."""
    applied: list[Migration] = []
    for migration in MIGRATIONS:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
            conn.execute(_VERSION_TABLE)
            done = conn.execute(
                "SELECT 1 FROM ingestd_schema WHERE version = %s", (migration.version,)
            ).fetchone()
            if done:
                continue
            conn.execute(migration.sql.encode())  # several statements: simple query protocol
            conn.execute(
                "INSERT INTO ingestd_schema (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration)
    return applied


def schema_problem(version: int) -> str | None:
    """What is wrong with a database at ``version``, for an operator; None when current."""
    if version == LATEST:
        return None
    if version < LATEST:
        return (
            f"the PostgreSQL schema is at version {version}, this ingestd needs {LATEST}:"
            " run `ingestd db migrate` (safe to repeat), then start again"
        )
    return (
        f"the PostgreSQL schema is at version {version}, newer than this ingestd knows"
        f" ({LATEST}): upgrade ingestd, or point it at another database"
    )


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """Raise SchemaError unless the database has exactly the schema this code expects."""
    problem = schema_problem(applied_version(conn))
    if problem:
        raise SchemaError(problem)
