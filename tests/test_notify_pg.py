"""The notification outbox in PostgreSQL (``notify.outbox: auto`` with postgres.url, or
``postgres``): the notifier's whole behaviour over it, one deliverer among instances, and
PostgreSQL going away and back."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import test_notify as tn
from services import Postgres
from test_notify import _clean_environment, hooks, mail  # noqa: F401 - fixtures
from test_notify_endpoints import HookServer, MailServer

from ingestd.config import PostgresSection
from ingestd.notify import worker
from ingestd.notify.outbox import FILENAME, NewEntry, SqliteOutbox
from ingestd.notify.pg_outbox import PostgresOutbox
from ingestd.store.postgres import migrate

T0 = tn.T0


def _section(url: str) -> PostgresSection:
    return PostgresSection(url=url, connect_timeout=1, retry=0.1)


def _count(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def over_postgres(monkeypatch: pytest.MonkeyPatch, pg_url: str) -> str:
    """Every Notifier made in the test keeps its outbox in PostgreSQL."""

    def outbox(path: Path, **kwargs: Any) -> PostgresOutbox:
        return PostgresOutbox(_section(pg_url), SqliteOutbox(path, **kwargs))

    monkeypatch.setattr(worker, "SqliteOutbox", outbox)
    return pg_url


CASES: list[Callable[..., None]] = [
    tn.test_delivery_grouping_and_idempotency_across_a_restart,
    tn.test_quiet_hours_delay_to_one_message_critical_overrides_drop_drops,
    tn.test_retry_backoff_then_circuit_breaker_probes_one_entry_and_closes,
    tn.test_a_retry_repeats_the_same_message_with_the_same_ref,
    tn.test_breaker_open_and_max_age_hand_notifications_to_the_fallback_route,
    tn.test_escalation_when_unacknowledged_is_durable_and_cancelled_by_an_ack,
    tn.test_a_slow_channel_holds_one_worker_and_its_late_answer_counts_once,
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("test_"))
def test_the_notifier_behaves_the_same_over_postgres(
    case: Callable[..., None],
    over_postgres: str,
    tmp_path: Path,
    hooks: HookServer,  # noqa: F811
    mail: MailServer,  # noqa: F811
) -> None:
    available = {"tmp_path": tmp_path, "hooks": hooks, "mail": mail}
    case(**{name: available[name] for name in inspect.signature(case).parameters})
    # ... and the entries lived in PostgreSQL, not in the local file
    assert _count(over_postgres, "SELECT count(*) FROM notify_entries") > 0
    local = SqliteOutbox(tmp_path / FILENAME, readonly=True)
    assert sum(c.pending + c.delivered + c.failed for c in local.stats().channels.values()) == 0
    local.close()


def _entry(key: str, *, at: float = T0) -> NewEntry:
    return NewEntry(
        key=key,
        route="ops",
        channel="a",
        alert=key,
        kind="firing",
        severity="critical",
        event={"id": key},
        created_at=at,
        not_before=at,
    )


def test_one_instance_delivers_and_another_takes_over_when_it_goes(
    pg_url: str, tmp_path: Path
) -> None:
    first = PostgresOutbox(_section(pg_url), SqliteOutbox(tmp_path / "a.sqlite"))
    second = PostgresOutbox(_section(pg_url), SqliteOutbox(tmp_path / "b.sqlite"))
    assert [e.key for e in first.due("a", T0, 10, ())] == []  # first takes the lead
    assert second.apply([_entry("from-second")]) == 1  # every instance writes
    assert [e.key for e in second.due("a", T0, 10, ())] == []  # ...one delivers
    (entry,) = first.due("a", T0, 10, ())
    assert entry.key == "from-second" and entry.id > 0
    first.close()  # its session ends: the lock is free
    (again,) = second.due("a", T0, 10, ())
    assert again.key == "from-second"
    second.delivered([again.id], T0, "m1")
    assert second.due("a", T0, 10, ()) == []
    assert _count(pg_url, "SELECT count(*) FROM notify_entries WHERE state = 'delivered'") == 1
    second.close()


def test_postgres_down_the_local_outbox_serves_and_everything_moves_back(
    services: Any, tmp_path: Path, unique: str
) -> None:
    server: Postgres = services.postgres()
    url = server.create_database(f"n_{unique}")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    outbox = PostgresOutbox(_section(url), SqliteOutbox(tmp_path / FILENAME))
    assert outbox.apply([_entry("before")]) == 1
    (before,) = outbox.due("a", T0, 10, ())
    server.stop()
    # an update of an entry in PostgreSQL while it is down: deferred, not lost
    outbox.delivered([before.id], T0, "m-before")
    # a new entry while it is down: local, and delivered from there
    assert outbox.apply([_entry("during", at=T0 + 1)]) == 1
    (during,) = outbox.due("a", T0 + 1, 10, ())
    assert during.key == "during" and during.id < 0
    assert outbox.pending(T0 + 1)["a"].count == 1
    outbox.delivered([during.id], T0 + 1, "m-during")
    assert outbox.due("a", T0 + 2, 10, ()) == []
    assert outbox.apply([_entry("during")]) == 0, "a replay is known locally"
    server.start()
    time.sleep(0.2)  # past postgres.retry
    assert outbox.due("a", T0 + 3, 10, ()) == []  # reconnects: replays, moves, nothing due
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT key, state, message FROM notify_entries ORDER BY key"
        ).fetchall()
    assert rows == [("before", "delivered", "m-before"), ("during", "delivered", "m-during")]
    assert outbox.apply([_entry("during"), _entry("before")]) == 0, "replays stay known"
    local = SqliteOutbox(tmp_path / FILENAME, readonly=True)
    assert local.stats().channels == {}, "the local outbox is empty again"
    local.close()
    outbox.close()


def test_the_daemon_config_and_status_command(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import orjson  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    from ingestd.cli import main  # noqa: PLC0415
    from ingestd.config import Settings  # noqa: PLC0415
    from ingestd.daemon import Daemon  # noqa: PLC0415

    spool = tmp_path / "spool"
    spool.mkdir()
    document: dict[str, Any] = {
        "postgres": {"url": pg_url},
        "spool": {"dir": str(spool)},
        # no notify.outbox: auto, so the outbox is in PostgreSQL (postgres.url is set)
        "notify": {"channels": {"a": "json://127.0.0.1:9/a"}},
    }
    config = tmp_path / "ingestd.yaml"
    config.write_text(yaml.safe_dump(document))
    outbox = PostgresOutbox(_section(pg_url), SqliteOutbox(tmp_path / "x.sqlite"))
    outbox.apply([_entry("waiting", at=time.time() - 60)])  # by another instance
    outbox.close()
    capsys.readouterr()
    assert main(["notify", "status", "--config", str(config), "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)  # the document alone, no log line before
    assert status["outbox"].startswith(f"PostgreSQL {pg_url} (local while it is down: ")
    assert (status["pending"], status["failed"], status["escalation_timers"]) == (1, 0, 0)
    (channel,) = status["channels"]
    oldest = channel.pop("oldest_pending_s")
    assert 60 <= oldest < 120, oldest
    assert channel == {
        "channel": "a",
        "target": "json://127.0.0.1",
        "breaker": "closed",
        "failures": 0,
        "pending": 1,
        "failed": 0,
        "delivered": 0,
        "last_error": "",
        "last_ok": "-",
    }
    assert status["recent_failures"] == []

    # the daemon picks the same outbox; None is the notifier's local one: without
    # postgres.url, and without channels (nothing is ever queued: no connection)
    daemon_outbox = Daemon(Settings(**document))._outbox()
    assert isinstance(daemon_outbox, PostgresOutbox)
    daemon_outbox.close()
    assert Daemon(Settings(**{**document, "postgres": {}}))._outbox() is None
    assert Daemon(Settings(**{**document, "notify": {}}))._outbox() is None

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"notify": {"outbox": "postgres"}}))
    assert main(["check", "--config", str(bad)]) == 2
