"""The device registry and the alert history against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from services import Postgres

from ingestd.config import PostgresSection, RegistrySection
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.model import Reading, Reject
from ingestd.rules import AlertEvent
from ingestd.store.history import History
from ingestd.store.postgres import SchemaError, migrate, open_pool
from ingestd.store.registry import Device, Registry

T0 = 1_790_000_000  # seconds


def _reading(device: str, ph: float, at_s: float, **more: Any) -> Reading:
    return Reading("water", device, {"site": "gh1"}, {"ph": ph, **more}, int(at_s * 1e9))


def _registry(
    url: str, tmp: Path, unknown: str = "accept", changes: list[Any] | None = None
) -> Registry:
    section = PostgresSection(url=url, connect_timeout=2, retry=0.2)
    return Registry(
        RegistrySection(unknown=unknown),  # type: ignore[arg-type]
        section,
        tmp,
        Metrics(),
        Health(),
        on_change=None if changes is None else lambda b, a: changes.append((b, a)),
    )


async def _until(
    check: Callable[[], bool | Awaitable[bool]], what: str, within: float = 20
) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _running(registry: Registry) -> AsyncIterator[Registry]:
    await registry.start()
    task = asyncio.create_task(registry.run())
    try:
        yield registry
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await registry.close()


def _sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def _calibrate(
    url: str, device: str, field: str, offset: float, scale: float, *, at_s: float
) -> int:
    rows = _sql(
        url,
        'INSERT INTO calibrations (device_id, field, "offset", scale, valid_from)'
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (device, field, offset, scale, datetime.fromtimestamp(at_s, UTC)),
    )
    return int(rows[0][0])


# --- registry ----------------------------------------------------------------------------


def test_registry_loads_devices_and_calibrates_by_valid_from(pg_url: str, tmp_path: Path) -> None:
    _sql(pg_url, "INSERT INTO sites (id) VALUES ('gh1')")
    _sql(pg_url, "INSERT INTO devices (id, site_id, kind) VALUES ('esp-1', 'gh1', 'esp32')")
    first = _calibrate(pg_url, "esp-1", "ph", 0.5, 1.0, at_s=T0)
    second = _calibrate(pg_url, "esp-1", "ph", 0.0, 2.0, at_s=T0 + 100)

    async def scenario() -> None:
        registry = _registry(pg_url, tmp_path)
        await registry.start()
        await registry.close()
        before = _reading("esp-1", 6.0, T0 - 1)
        during = _reading("esp-1", 6.0, T0 + 99.999, ec=1.5, ok=True)
        after = _reading("esp-1", 6.0, T0 + 100)
        registry.admit([before])
        registry.admit([during])
        registry.admit([after])
        assert before.fields == {"ph": 6.0}  # before any calibration: raw, no trace
        assert during.fields == {"ph": 6.5, "ph_cal": float(first), "ec": 1.5, "ok": True}
        assert after.fields == {"ph": 12.0, "ph_cal": float(second)}
        device = registry.get("esp-1")
        assert device is not None
        assert (device.site, device.kind) == ("gh1", "esp32")

    asyncio.run(scenario())


def test_unknown_and_disabled_devices(pg_url: str, tmp_path: Path) -> None:
    _sql(pg_url, "INSERT INTO devices (id, enabled) VALUES ('known', true), ('off', false)")

    async def scenario() -> None:
        accept = _registry(pg_url, tmp_path / "a", "accept")
        reject = _registry(pg_url, tmp_path / "r", "reject")
        for registry in (accept, reject):
            (tmp_path / registry._cache.parent.name).mkdir(exist_ok=True)
            await registry.start()
            await registry.close()
        accept.admit([_reading("stranger", 7.0, T0)])  # accepted: no exception
        with pytest.raises(Reject) as caught:
            reject.admit([_reading("stranger", 7.0, T0)])
        assert caught.value.reason == "unknown_device"
        assert "ingestd devices add stranger" in caught.value.detail
        reject.admit([_reading("known", 7.0, T0)])
        for registry in (accept, reject):
            with pytest.raises(Reject) as caught:
                registry.admit([_reading("off", 7.0, T0)])
            assert caught.value.reason == "device_disabled"
            assert "ingestd devices enable off" in caught.value.detail

    asyncio.run(scenario())


def test_a_change_by_another_connection_is_seen_without_a_restart(
    pg_url: str, tmp_path: Path
) -> None:
    _sql(pg_url, "INSERT INTO devices (id) VALUES ('esp-1')")
    changes: list[tuple[Device | None, Device | None]] = []

    async def scenario() -> None:
        async with _running(_registry(pg_url, tmp_path, "reject", changes)) as registry:
            registry.admit([_reading("esp-1", 7.0, T0)])
            _sql(pg_url, "UPDATE devices SET enabled = false, quota_rate = 2 WHERE id = 'esp-1'")
            await _until(lambda: not registry.get("esp-1").enabled, "the disable")  # type: ignore[union-attr]
            with pytest.raises(Reject):
                registry.admit([_reading("esp-1", 7.0, T0)])
            assert changes[-1][1] is not None and changes[-1][1].quota_rate == 2
            _sql(pg_url, "INSERT INTO devices (id) VALUES ('esp-2')")
            cal = _calibrate(pg_url, "esp-2", "ph", 1.0, 1.0, at_s=T0)
            await _until(
                lambda: bool(registry.get("esp-2") and registry.get("esp-2").calibrations), "esp-2"
            )  # type: ignore[union-attr]
            reading = _reading("esp-2", 6.0, T0 + 1)
            registry.admit([reading])
            assert reading.fields == {"ph": 7.0, "ph_cal": float(cal)}
            _sql(pg_url, "DELETE FROM devices WHERE id = 'esp-2'")
            await _until(lambda: registry.get("esp-2") is None, "the delete")
            with pytest.raises(Reject):
                registry.admit([_reading("esp-2", 7.0, T0)])

    asyncio.run(scenario())


def test_register_policy_adds_unknown_devices(pg_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _running(_registry(pg_url, tmp_path, "register")) as registry:
            for name in ("new-1", "new-2", "new-1"):
                registry.admit([_reading(name, 7.0, T0)])
            rows = lambda: _sql(pg_url, "SELECT id, auto_registered FROM devices ORDER BY id")  # noqa: E731
            await _until(lambda: len(rows()) == 2, "the registrations")
            assert rows() == [("new-1", True), ("new-2", True)]
            registry.admit([_reading("new-2", 7.0, T0)])  # still accepted after the reload

    asyncio.run(scenario())


def test_a_device_sends_only_under_the_site_the_registry_knows(pg_url: str, tmp_path: Path) -> None:
    _sql(pg_url, "INSERT INTO sites (id) VALUES ('gh1'), ('gh2')")
    _sql(pg_url, "INSERT INTO devices (id, site_id) VALUES ('esp-1', 'gh1'), ('free', NULL)")

    def at(device: str, site: str | None) -> Reading:
        tags = {} if site is None else {"site": site}
        return Reading("water", device, tags, {"ph": 7.0}, int(T0 * 1e9))

    async def scenario() -> None:
        async with _running(_registry(pg_url, tmp_path, "reject")) as registry:
            registry.admit([at("esp-1", "gh1")])
            registry.admit([at("esp-1", None)])  # a topic without a site level claims none
            with pytest.raises(Reject) as caught:
                registry.admit([at("esp-1", "gh2")])
            assert caught.value.reason == "site_mismatch"
            assert "'esp-1' is at site 'gh1' in the registry, not 'gh2'" in caught.value.detail
            # a line-protocol message: one reading under another site refuses the message
            with pytest.raises(Reject, match="site_mismatch"):
                registry.admit([at("esp-1", "gh1"), at("esp-1", "gh2")])
            # a device without a site in the registry: its topic's word
            registry.admit([at("free", "gh1")])
            registry.admit([at("free", "gh2")])
            # moved by another connection: applies within a second
            _sql(pg_url, "UPDATE devices SET site_id = 'gh2' WHERE id = 'esp-1'")
            await _until(lambda: registry.get("esp-1").site == "gh2", "the move")  # type: ignore[union-attr]
            registry.admit([at("esp-1", "gh2")])
            with pytest.raises(Reject, match="site_mismatch"):
                registry.admit([at("esp-1", "gh1")])

    asyncio.run(scenario())


def test_register_policy_records_the_first_site_seen(pg_url: str, tmp_path: Path) -> None:
    def at(device: str, site: str | None) -> Reading:
        tags = {} if site is None else {"site": site}
        return Reading("water", device, tags, {"ph": 7.0}, int(T0 * 1e9))

    async def scenario() -> None:
        async with _running(_registry(pg_url, tmp_path, "register")) as registry:
            registry.admit([at("new-1", "gh1")])
            with pytest.raises(Reject) as caught:  # at once, before it is written
                registry.admit([at("new-1", "gh9")])
            assert caught.value.reason == "site_mismatch"
            assert "is at site 'gh1' in the registry, not 'gh9'" in caught.value.detail
            registry.admit([at("new-2", None)])  # no site level: registered without one
            with pytest.raises(Reject) as caught:  # one message, two sites
                registry.admit([at("new-3", "gh3"), at("new-3", "gh4")])
            assert "is being registered at site 'gh3' in the registry, not 'gh4'" in str(
                caught.value
            )
            rows = lambda: _sql(pg_url, "SELECT id, site_id FROM devices ORDER BY id")  # noqa: E731
            await _until(lambda: len(rows()) == 2, "the registrations")
            assert rows() == [("new-1", "gh1"), ("new-2", None)]
            assert _sql(pg_url, "SELECT id FROM sites") == [("gh1",)]
            await _until(lambda: registry.get("new-1").site == "gh1", "the reload")  # type: ignore[union-attr]
            with pytest.raises(Reject, match="site_mismatch"):  # and after the reload
                registry.admit([at("new-1", "gh9")])
            registry.admit([at("new-2", "gh5")])

    asyncio.run(scenario())


def test_registry_copy_serves_while_postgres_is_down(
    services: Any, tmp_path: Path, unique: str
) -> None:
    server: Postgres = services.postgres()
    url = server.create_database(f"r_{unique}")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
        conn.execute("INSERT INTO devices (id, enabled) VALUES ('esp-1', true), ('off', false)")

    async def load_once() -> Registry:
        registry = _registry(url, tmp_path, "reject")
        await registry.start()
        await registry.close()
        return registry

    assert asyncio.run(load_once()).loaded
    server.stop()
    registry = asyncio.run(load_once())  # from the copy in the state dir
    assert registry.loaded
    registry.admit([_reading("esp-1", 7.0, T0)])
    with pytest.raises(Reject, match="device_disabled"):
        registry.admit([_reading("off", 7.0, T0)])
    with pytest.raises(Reject, match="unknown_device"):
        registry.admit([_reading("stranger", 7.0, T0)])


def test_no_copy_and_no_postgres_accepts_everyone(services: Any, tmp_path: Path) -> None:
    server: Postgres = services.postgres()
    url = server.dsn
    server.stop()

    async def scenario() -> None:
        registry = _registry(url, tmp_path, "reject")
        await registry.start()
        assert not registry.loaded
        registry.admit([_reading("stranger", 7.0, T0)])  # not lost to a missing registry

    asyncio.run(scenario())


def test_start_refuses_an_old_schema(pg_url: str, tmp_path: Path) -> None:
    _sql(pg_url, "DELETE FROM ingestd_schema")

    async def scenario() -> None:
        with pytest.raises(SchemaError, match="ingestd db migrate"):
            await _registry(pg_url, tmp_path).start()

    asyncio.run(scenario())


# --- alert history -----------------------------------------------------------------------


def _event(alert: str, kind: str, state: str, at: float, **more: Any) -> AlertEvent:
    values: dict[str, Any] = {
        "id": alert,
        "rule": "ph-low",
        "device": "esp-1",
        "site": "gh1",
        "field": "ph",
        "measurement": "water",
        "severity": "critical",
        "state": state,
        "kind": kind,
        "value": 5.0,
        "threshold": 5.5,
        "started_at": T0,
        "at": at,
        "labels": {"team": "night"},
        "annotations": {},
        "flapping": False,
        "notify": True,
    }
    values.update(more)
    return AlertEvent(**values)


async def _history(url: str, tmp: Path) -> History:
    section = PostgresSection(url=url, connect_timeout=1, retry=0.2, history_batch=3)
    pool = open_pool(section)
    await pool.open(wait=False)
    return History(section, pool, tmp, Metrics(), Health())


async def _hand_over(history: History, events: list[AlertEvent]) -> None:
    history.submit(events)
    write = history.take()
    assert write is not None
    assert await asyncio.to_thread(write)


def _alert_rows(url: str) -> list[tuple[Any, ...]]:
    return _sql(
        url,
        "SELECT id, state, value, extract(epoch FROM fired_at)::float8,"
        " extract(epoch FROM resolved_at)::float8,"
        " acknowledged_by, reason, labels FROM alert_events ORDER BY id",
    )


def test_history_records_each_alert_through_its_transitions(pg_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        history = await _history(pg_url, tmp_path)
        await _hand_over(
            history,
            [
                _event("a1", "pending", "pending", T0),
                _event("a1", "firing", "firing", T0 + 60, value=4.9),
                _event(
                    "a1", "acknowledged", "acknowledged", T0 + 90, acknowledged_by="ann", value=4.8
                ),
                _event("a1", "resolved", "resolved", T0 + 120, value=None),
                _event("a2", "pending", "pending", T0 + 200),
                _event("a2", "cancelled", "resolved", T0 + 210),
                _event("a3", "firing", "firing", T0 + 300),
            ],
        )
        assert history.pending == 7
        while await history.flush_once():  # batches of 3
            pass
        assert history.pending == 0
        await history.close()

    asyncio.run(scenario())
    rows = _alert_rows(pg_url)
    assert rows == [
        ("a1", "resolved", 4.8, T0 + 60, T0 + 120, "ann", None, {"team": "night"}),
        ("a2", "cancelled", 5.0, None, T0 + 210, None, None, {"team": "night"}),
        ("a3", "firing", 5.0, T0 + 300, None, None, None, {"team": "night"}),
    ]


def test_history_replay_never_moves_an_alert_back(pg_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        history = await _history(pg_url, tmp_path)
        firing = _event("a1", "firing", "firing", T0 + 60)
        resolved = _event("a1", "resolved", "resolved", T0 + 120)
        await _hand_over(history, [firing, resolved])
        await history.flush_once()
        await _hand_over(history, [firing])  # replayed after a crash: older than the row
        await history.flush_once()
        await history.close()

    asyncio.run(scenario())
    assert [r[:2] for r in _alert_rows(pg_url)] == [("a1", "resolved")]


def test_a_new_alert_closes_a_stale_open_one(pg_url: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        history = await _history(pg_url, tmp_path)
        # The resolution of a1 was never recorded (state lost); a2 of the same rule,
        # device and field fires: one open alert per (rule, device, field) holds.
        await _hand_over(history, [_event("a1", "firing", "firing", T0 + 60)])
        await _hand_over(history, [_event("a2", "firing", "firing", T0 + 500, started_at=T0 + 400)])
        while await history.flush_once():
            pass
        await history.close()

    asyncio.run(scenario())
    rows = _alert_rows(pg_url)
    assert [(r[0], r[1], r[4], r[6]) for r in rows] == [
        ("a1", "resolved", T0 + 500, "superseded"),
        ("a2", "firing", None, None),
    ]


def test_a_replayed_queue_never_closes_the_newer_alert(pg_url: str, tmp_path: Path) -> None:
    """[A fires, A resolves, B fires] written, then written again (a crash between the
    commit and trimming the queue): B stays open, A stays resolved."""
    queue = [
        _event("A", "firing", "firing", T0 + 60),
        _event("A", "resolved", "resolved", T0 + 120),
        _event("B", "firing", "firing", T0 + 300, started_at=T0 + 300),
    ]

    async def scenario() -> None:
        history = await _history(pg_url, tmp_path)
        for _ in range(2):
            await _hand_over(history, queue)
            while await history.flush_once():
                pass
        await history.close()

    asyncio.run(scenario())
    assert [(r[0], r[1], r[4], r[6]) for r in _alert_rows(pg_url)] == [
        ("A", "resolved", T0 + 120, None),
        ("B", "firing", None, None),
    ]


def test_history_waits_while_postgres_is_down_and_survives_a_restart(
    services: Any, tmp_path: Path, unique: str
) -> None:
    server: Postgres = services.postgres()
    url = server.create_database(f"h_{unique}")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    server.stop()

    async def while_down() -> None:
        history = await _history(url, tmp_path)
        await _hand_over(
            history,
            [_event(f"a{i}", "firing", "firing", T0 + i, started_at=T0 + i) for i in range(5)],
        )
        assert not await history.flush_once()
        assert history.pending == 5
        assert "alert_history" in str(history._health.report())
        await history.close()  # the daemon stops; the queue stays on disk

    asyncio.run(while_down())
    server.start()

    async def after() -> None:
        history = await _history(url, tmp_path)  # a new process: finds the queue
        assert history.pending == 5
        task = asyncio.create_task(history.run())
        await _until(lambda: history.pending == 0, "the queue to drain")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await history.close()

    asyncio.run(after())
    assert [r[0] for r in _alert_rows(url)] == [f"a{i}" for i in range(5)]


# --- what review found ---------------------------------------------------------------


def test_a_bulk_change_of_thousands_of_devices_is_seen_in_full(pg_url: str, tmp_path: Path) -> None:
    """More notifications than one batch (1000) arrive in one burst: none is dropped."""
    _sql(pg_url, "INSERT INTO devices (id) SELECT 'd' || i FROM generate_series(1, 2500) i")

    async def scenario() -> None:
        async with _running(_registry(pg_url, tmp_path)) as registry:
            _sql(pg_url, "UPDATE devices SET quota_rate = 7")

            def all_seen() -> bool:
                return all(d.quota_rate == 7 for d in registry.devices())

            await _until(all_seen, "every device's change", within=60)
            assert len(registry.devices()) == 2500

    asyncio.run(scenario())


def test_calibrations_at_the_ends_of_time_load(pg_url: str, tmp_path: Path) -> None:
    """-infinity applies always, a year-3000 one never yet; neither breaks the load."""
    _sql(pg_url, "INSERT INTO devices (id) VALUES ('esp-1')")
    _sql(
        pg_url,
        'INSERT INTO calibrations (device_id, field, "offset", scale, valid_from) VALUES'
        " ('esp-1', 'ph', 1, 1, '-infinity'), ('esp-1', 'ph', 100, 1, '3000-01-01'),"
        " ('esp-1', 'ec', 5, 1, 'infinity')",
    )

    async def scenario() -> None:
        registry = _registry(pg_url, tmp_path)
        await registry.start()
        await registry.close()
        reading = _reading("esp-1", 6.0, T0, ec=1.0)
        registry.admit([reading])
        assert reading.fields["ph"] == 7.0 and reading.fields["ec"] == 1.0

    asyncio.run(scenario())


def test_history_waits_while_postgres_refuses_writes(pg_url: str, tmp_path: Path) -> None:
    """A read-only PostgreSQL (a failover to a standby) is an outage, not a crash."""
    database = pg_url.rsplit("/", 1)[1]

    async def scenario() -> None:
        history = await _history(pg_url, tmp_path)
        _sql(pg_url, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        await history._pool.close()  # new sessions pick the setting up
        history._pool = open_pool(PostgresSection(url=pg_url, connect_timeout=1))
        await history._pool.open(wait=False)
        await _hand_over(history, [_event("r1", "firing", "firing", T0)])
        assert not await history.flush_once()
        assert history.pending == 1
        report = history._health.report()
        assert "read-only" in str(report["components"]), report
        _sql(
            pg_url,
            "BEGIN READ WRITE; ALTER DATABASE"
            f' "{database}" SET default_transaction_read_only = off; COMMIT',
        )
        await history._pool.close()
        history._pool = open_pool(PostgresSection(url=pg_url, connect_timeout=1))
        await history._pool.open(wait=False)
        assert not await history.flush_once()  # written (and nothing more to do)
        assert history.pending == 0
        await history.close()

    asyncio.run(scenario())
    assert [r[0] for r in _alert_rows(pg_url)] == ["r1"]
