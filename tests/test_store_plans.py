"""Every PostgreSQL statement ingestd runs uses an index, on tables of 100,000 rows.

Each module that talks to PostgreSQL lists its statements in ``QUERIES`` with example
parameters in ``EXAMPLE_PARAMS``; this test EXPLAINs each one against a realistic volume
(100,000 alert events over a year, 100,000 devices, their calibrations) and fails on a
sequential scan, except where a statement reads a whole table by design.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import psycopg
import pytest

from ingestd import retention
from ingestd.notify import pg_outbox
from ingestd.store import commands, history, registry

MODULES: tuple[ModuleType, ...] = (registry, history, commands, retention, pg_outbox)

ROWS = 100_000

# Statements that read every row of a table on purpose: the whole registry at start and
# after a reconnect, and `ingestd devices list`. Any other table they touch needs an index.
FULL_READS: dict[str, set[str]] = {
    "registry_load": {"devices"},
    "devices_list": {"devices"},
    # `ingestd notify status`: counts by channel and state over the whole outbox.
    "outbox_stats": {"notify_entries"},
    # A handful of channels (breaker states), read whole at start and by notify status.
    "outbox_channels": {"notify_channels"},
}


def _statements() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for module in MODULES:
        for name, sql in module.QUERIES.items():
            yield name, sql, module.EXAMPLE_PARAMS[name]


def _fill(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO sites (id) SELECT 'site-' || s FROM generate_series(0, 99) s")
    conn.execute(
        "INSERT INTO devices (id, site_id, kind)"
        " SELECT 'dev-' || lpad(i::text, 5, '0'), 'site-' || mod(i, 100), 'esp32'"
        f" FROM generate_series(0, {ROWS - 1}) i"
    )
    conn.execute(
        'INSERT INTO calibrations (device_id, field, "offset", scale, valid_from)'
        " SELECT 'dev-' || lpad(mod(i, 50000)::text, 5, '0'),"
        " CASE WHEN i < 50000 THEN 'ph' ELSE 'ec' END,"
        " 0.1, 1.0, timestamptz '2025-01-01' + i * interval '1 minute'"
        f" FROM generate_series(0, {ROWS - 1}) i"
    )
    # A year of alerts: most resolved, the newest few hundred still open (one per
    # rule/device/field, as the partial unique index demands).
    conn.execute(
        "INSERT INTO alert_events (id, rule, device_id, site, field, level, state, value,"
        " started_at, fired_at, resolved_at, updated_at)"
        " SELECT 'a' || i, 'rule-' || mod(i, 20), 'dev-' || lpad(mod(i, 5000)::text, 5, '0'),"
        " 'site-' || mod(i, 100), 'ph', 'warning', CASE WHEN i >= %(open)s THEN 'firing'"
        " ELSE 'resolved' END, 5.0, t, t, CASE WHEN i >= %(open)s THEN NULL"
        " ELSE t + interval '10 minutes' END, t"
        " FROM (SELECT i, timestamptz '2025-01-01' + i * interval '315 seconds' AS t"
        f"       FROM generate_series(0, {ROWS - 1}) i) g",
        {"open": ROWS - 300},
    )
    # A busy outbox: a year of delivered notifications, a few hundred pending, timers.
    conn.execute(
        "INSERT INTO notify_entries (key, route, channel, alert, kind, severity, event,"
        " created_at, not_before, state, done_at, message)"
        " SELECT 'k' || i, 'water', 'ch-' || mod(i, 5), 'a' || i, 'firing', 'warning', '{}',"
        " 1.76e9 + i * 315, 1.76e9 + i * 315,"
        " CASE WHEN i >= %(open)s THEN 'pending' WHEN mod(i, 50) = 0 THEN 'failed'"
        " ELSE 'delivered' END, CASE WHEN i >= %(open)s THEN NULL ELSE 1.76e9 + i * 315 END,"
        f" 'm' || i FROM generate_series(0, {ROWS - 1}) i",
        {"open": ROWS - 300},
    )
    conn.execute(
        "INSERT INTO notify_timers (key, alert, route, due_at, event, state)"
        " SELECT 't' || i, 'a' || i, 'water', 1.76e9 + i * 3150, '{}',"
        " CASE WHEN i >= 9900 THEN 'pending' WHEN i >= 9850 THEN 'fired'"
        " ELSE 'closed' END FROM generate_series(0, 9999) i"
    )
    conn.execute("ANALYZE")


def _seq_scans(plan: dict[str, Any]) -> Iterator[str]:
    if plan.get("Node Type") == "Seq Scan":
        yield plan["Relation Name"]
    for child in plan.get("Plans", []):
        yield from _seq_scans(child)


def _indexes(plan: dict[str, Any]) -> Iterator[str]:
    if "Index Name" in plan:
        yield plan["Index Name"]
    for child in plan.get("Plans", []):
        yield from _indexes(child)


@pytest.fixture(scope="module")
def volume(postgres: Any) -> Iterator[str]:
    from ingestd.store.postgres import migrate  # noqa: PLC0415

    url = postgres.create_database("plans_volume")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        _fill(conn)
    yield url


def test_every_module_lists_its_statements() -> None:
    names = [name for name, _, _ in _statements()]
    assert len(names) == len(set(names)), "statement names must be unique across modules"
    for module in MODULES:
        assert module.QUERIES, module.__name__
        assert set(module.QUERIES) == set(module.EXAMPLE_PARAMS), module.__name__


@pytest.mark.parametrize(
    ("name", "sql", "params"),
    list(_statements()),
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "",
)
def test_statement_uses_an_index(volume: str, name: str, sql: str, params: dict[str, Any]) -> None:
    with psycopg.connect(volume) as conn:
        (rows,) = conn.execute(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone()  # type: ignore[misc]
    plan = rows[0]["Plan"]
    scanned = set(_seq_scans(plan)) - FULL_READS.get(name, set())
    assert not scanned, f"{name}: sequential scan of {sorted(scanned)}:\n{plan}"
    touches_rows = name not in {
        "site_add",
        "registry_register",
        "registry_register_sites",
        "device_add",
        "calibration_add",
        "history_upsert",
        "outbox_add_entry",
        "outbox_add_timer",
        "outbox_save_channel",
    }
    if touches_rows and name not in FULL_READS:
        assert list(_indexes(plan)), f"{name}: no index in the plan:\n{plan}"
