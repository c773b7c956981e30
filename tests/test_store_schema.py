"""Schema migrations against a real PostgreSQL: from empty, repeated, and refused when old."""

from __future__ import annotations

import psycopg
import pytest

from ingestd.store.postgres import (
    LATEST,
    MIGRATIONS,
    SchemaError,
    applied_version,
    check_schema,
    migrate,
)


def _tables(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {row[0] for row in rows}


def test_migrate_from_empty_then_again_changes_nothing(pg_empty: str) -> None:
    with psycopg.connect(pg_empty, autocommit=True) as conn:
        assert applied_version(conn) == 0
        applied = migrate(conn)
        assert [m.version for m in applied] == [m.version for m in MIGRATIONS]
        assert applied_version(conn) == LATEST
        assert {"sites", "devices", "calibrations", "alert_events", "ingestd_schema"} <= _tables(
            conn
        )
        conn.execute("INSERT INTO sites (id) VALUES ('gh1')")
        conn.execute("INSERT INTO devices (id, site_id) VALUES ('esp-1', 'gh1')")
        assert migrate(conn) == []  # a second run applies nothing and keeps the data
        assert applied_version(conn) == LATEST
        assert conn.execute("SELECT site_id FROM devices").fetchall() == [("gh1",)]
        rows = conn.execute("SELECT version, name FROM ingestd_schema ORDER BY version").fetchall()
        assert rows == [(m.version, m.name) for m in MIGRATIONS]
        check_schema(conn)  # current: no complaint


def test_an_older_schema_is_refused_with_the_fix(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM ingestd_schema WHERE version = %s", (LATEST,))
        with pytest.raises(SchemaError, match=r"run `ingestd db migrate`"):
            check_schema(conn)


def test_an_empty_database_is_refused_with_the_fix(pg_empty: str) -> None:
    needs = rf"at version 0, this ingestd needs {LATEST}"
    with psycopg.connect(pg_empty) as conn, pytest.raises(SchemaError, match=needs):
        check_schema(conn)


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO ingestd_schema (version, name) VALUES (%s, 'future')", (LATEST + 1,)
        )
        with pytest.raises(SchemaError, match="newer than this ingestd knows"):
            check_schema(conn)


def test_one_open_alert_per_rule_device_field(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        insert = (
            "INSERT INTO alert_events (id, rule, device_id, field, level, state, started_at,"
            " updated_at, resolved_at) VALUES (%s, 'ph-low', 'esp-1', 'ph', 'critical', %s,"
            " now(), now(), %s)"
        )
        conn.execute(insert, ("a1", "resolved", "2026-01-01"))
        conn.execute(insert, ("a2", "firing", None))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, ("a3", "firing", None))
