"""Retention against a real PostgreSQL and a real dead-letter store: exactly what is past its
age goes, in batches that each commit; a dry run deletes nothing; open alerts always stay."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from services import free_port

from ingestd.cli import main
from ingestd.deadletters import DeadLetter, DeadLetters
from ingestd.retention import purge_alert_history, purge_deadletters
from ingestd.store.postgres import LATEST

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def _alert(
    conn: psycopg.Connection, alert_id: str, resolved_at: datetime | None, started_at: datetime
) -> None:
    conn.execute(
        "INSERT INTO alert_events (id, rule, device_id, field, level, state, started_at,"
        " resolved_at, updated_at) VALUES (%s, 'ph-low', %s, 'ph', 'critical', %s, %s, %s, %s)",
        (
            alert_id,
            f"esp-{alert_id}",  # one open alert per (rule, device, field)
            "firing" if resolved_at is None else "resolved",
            started_at,
            resolved_at,
            resolved_at or started_at,
        ),
    )


def _ids(conn: psycopg.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT id FROM alert_events").fetchall()}


def _letter(received: datetime, topic: str = "farm/gh1/esp-1/ph") -> DeadLetter:
    ns = (received - datetime(1970, 1, 1, tzinfo=UTC)) // US * 1000
    return DeadLetter(ns, topic, "malformed", "not JSON", 3, b"abc")


def _topics(directory: Path) -> list[str]:
    store = DeadLetters(directory, 1_000_000)
    try:
        return sorted(letter.topic for letter in store.list(limit=1_000_000))
    finally:
        store.close()


# --- alert history ------------------------------------------------------------------------


def test_alert_history_deletes_exactly_the_resolved_alerts_past_their_age(pg_url: str) -> None:
    cutoff = NOW - timedelta(days=30)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for i in range(7):
            _alert(conn, f"old-{i}", cutoff - timedelta(days=100 + i), cutoff - timedelta(days=101))
        _alert(conn, "just-past", cutoff - US, cutoff - timedelta(days=1))
        _alert(conn, "at-cutoff", cutoff, cutoff - timedelta(days=1))
        _alert(conn, "just-inside", cutoff + US, cutoff - timedelta(days=1))
        _alert(conn, "recent", NOW - timedelta(hours=1), NOW - timedelta(hours=2))
        _alert(conn, "open-ancient", None, cutoff - timedelta(days=400))
        _alert(conn, "open-recent", None, NOW - timedelta(minutes=5))
        kept = {"at-cutoff", "just-inside", "recent", "open-ancient", "open-recent"}

        dry = list(purge_alert_history(conn, cutoff, 3, dry_run=True))
        assert dry == [8]
        assert len(_ids(conn)) == 13  # the dry run deleted nothing

        batches = purge_alert_history(conn, cutoff, 3)
        assert next(batches) == 3
        # Each batch is its own transaction: another session already sees it gone.
        with psycopg.connect(pg_url) as other:
            assert len(_ids(other)) == 10
        assert list(batches) == [3, 2]
        assert _ids(conn) == kept

        assert list(purge_alert_history(conn, cutoff, 3)) == []  # nothing left to delete
        assert list(purge_alert_history(conn, cutoff, 3, dry_run=True)) == [0]
        assert _ids(conn) == kept


def test_an_exact_multiple_of_the_batch_size_ends_without_an_empty_batch(pg_url: str) -> None:
    cutoff = NOW - timedelta(days=1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for i in range(4):
            _alert(conn, f"old-{i}", cutoff - timedelta(hours=i + 1), cutoff - timedelta(days=2))
        assert list(purge_alert_history(conn, cutoff, 2)) == [2, 2]
        assert _ids(conn) == set()


def test_the_purge_refuses_a_connection_that_would_hold_one_long_transaction(
    pg_url: str,
) -> None:
    with psycopg.connect(pg_url) as conn, pytest.raises(ValueError, match="autocommit"):
        list(purge_alert_history(conn, NOW, 10))


# --- dead letters -------------------------------------------------------------------------


def test_dead_letters_past_their_age_go_in_batches_and_a_dry_run_only_counts(
    tmp_path: Path,
) -> None:
    cutoff = NOW - timedelta(days=7)
    cutoff_ns = (cutoff - datetime(1970, 1, 1, tzinfo=UTC)) // US * 1000
    store = DeadLetters(tmp_path, 1000)
    try:
        store.add([_letter(cutoff - timedelta(days=30 - i), f"old/{i}") for i in range(5)])
        store.add([_letter(NOW, "new/0")])
        # Received out of id order (a letter's time is its message's receipt time).
        store.add([_letter(cutoff - timedelta(days=60), "old/late-id")])
        store.add(
            [
                DeadLetter(cutoff_ns - 1, "edge/just-past", "malformed", "", 0, b""),
                DeadLetter(cutoff_ns, "edge/at-cutoff", "malformed", "", 0, b""),
                DeadLetter(cutoff_ns + 1, "edge/just-inside", "malformed", "", 0, b""),
            ]
        )

        assert list(purge_deadletters(store, cutoff_ns, 2, dry_run=True)) == [7]
        assert store.count_before(cutoff_ns) == 7  # nothing deleted

        assert list(purge_deadletters(store, cutoff_ns, 2)) == [2, 2, 2, 1]
        assert store.count_before(cutoff_ns) == 0
    finally:
        store.close()
    assert _topics(tmp_path) == ["edge/at-cutoff", "edge/just-inside", "new/0"]


def test_dead_letters_purge_beside_a_writing_daemon(tmp_path: Path) -> None:
    """The daemon's commit thread keeps adding dead letters (its own connection) while the
    CLI purges in batches of one: neither fails on a lock, nothing fresh is lost."""
    cutoff = NOW - timedelta(days=7)
    cutoff_ns = (cutoff - datetime(1970, 1, 1, tzinfo=UTC)) // US * 1000
    daemon_store = DeadLetters(tmp_path, 1_000_000)
    daemon_store.add([_letter(cutoff - timedelta(hours=i + 1), f"old/{i}") for i in range(300)])
    written: list[int] = []
    errors: list[BaseException] = []
    first_write, stop = threading.Event(), threading.Event()

    def daemon() -> None:
        try:
            n = 0
            while not stop.is_set() or n < 20:
                daemon_store.add([_letter(NOW, f"new/{n}/{k}") for k in range(5)])
                written.append(5)
                n += 1
                first_write.set()
        except BaseException as exc:
            errors.append(exc)
            first_write.set()

    writer = threading.Thread(target=daemon)
    writer.start()
    try:
        assert first_write.wait(60)
        cli_store = DeadLetters(tmp_path, 1_000_000)
        try:
            batches = list(purge_deadletters(cli_store, cutoff_ns, 1))
        finally:
            cli_store.close()
    finally:
        stop.set()
        writer.join(120)
        daemon_store.close()
    assert not errors, errors
    assert batches == [1] * 300
    topics = _topics(tmp_path)
    assert not [t for t in topics if t.startswith("old/")]
    assert len(topics) == sum(written)


# --- ingestd retention apply --------------------------------------------------------------


def _config(tmp_path: Path, pg_url: str | None, **retention: str) -> Path:
    lines = [f"spool:\n  dir: {tmp_path / 'spool'}", "retention:"]
    lines += [f"  {key}: {value}" for key, value in retention.items()]
    if pg_url is not None:
        lines.append(f"postgres:\n  url: {pg_url}\n  connect_timeout: 2s")
    path = tmp_path / "ingestd.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _seed(tmp_path: Path, pg_url: str) -> None:
    """Alerts around a 30-day age and dead letters around a 7-day age, relative to now."""
    now = datetime.now(UTC)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for i in range(3):
            _alert(conn, f"old-{i}", now - timedelta(days=31 + i), now - timedelta(days=40))
        _alert(conn, "recent", now - timedelta(days=29), now - timedelta(days=40))
        _alert(conn, "open", None, now - timedelta(days=400))
    (tmp_path / "spool").mkdir()
    store = DeadLetters(tmp_path / "spool", 1000)
    try:
        store.add([_letter(now - timedelta(days=8 + i), f"old/{i}") for i in range(2)])
        store.add([_letter(now - timedelta(days=6), "recent")])
    finally:
        store.close()


def test_retention_apply_dry_run_then_for_real(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path, pg_url)
    config = _config(tmp_path, pg_url, alert_history="30d", deadletters="7d", batch_size="2")

    assert main(["retention", "apply", "--dry-run", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "alert history: would delete 3 resolved alerts, resolved before 20" in out
    assert "(retention.alert_history = 30d); dry run\n" in out
    assert "dead letters: would delete 2 dead letters, received before 20" in out
    assert "(retention.deadletters = 7d); dry run\n" in out
    with psycopg.connect(pg_url) as conn:
        assert len(_ids(conn)) == 5
    assert len(_topics(tmp_path / "spool")) == 3

    assert main(["retention", "apply", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    cutoff_day = (datetime.now(UTC) - timedelta(days=30)).date().isoformat()
    assert f"alert history: deleted 3 resolved alerts, resolved before {cutoff_day}T" in out
    assert "(retention.alert_history = 30d), in 2 batches\n" in out
    assert "dead letters: deleted 2 dead letters, received before" in out
    assert "(retention.deadletters = 7d), in 1 batch\n" in out
    with psycopg.connect(pg_url) as conn:
        assert _ids(conn) == {"recent", "open"}
    assert _topics(tmp_path / "spool") == ["recent"]

    assert main(["retention", "apply", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "alert history: deleted 0 resolved alerts, resolved before" in out
    assert "), in 0 batches\n" in out
    assert "dead letters: deleted 0 dead letters, received before" in out


def test_age_zero_keeps_forever_and_no_postgres_is_skipped(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path, pg_url)
    config = _config(tmp_path, pg_url, alert_history="0", deadletters="0")
    assert main(["retention", "apply", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "alert history: kept forever (retention.alert_history = 0)" in out
    assert "dead letters: kept forever (retention.deadletters = 0)" in out
    with psycopg.connect(pg_url) as conn:
        assert len(_ids(conn)) == 5
    assert len(_topics(tmp_path / "spool")) == 3

    config = _config(tmp_path, None, deadletters="7d")
    assert main(["retention", "apply", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "alert history: skipped, PostgreSQL is not configured (postgres.url)" in out
    assert "dead letters: deleted 2 dead letters" in out
    with psycopg.connect(pg_url) as conn:
        assert len(_ids(conn)) == 5


def test_unreachable_postgres_exits_1_and_dead_letters_still_go(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path, pg_url)
    down = f"postgresql://ingestd:secret@127.0.0.1:{free_port()}/ingestd"
    config = _config(tmp_path, down, deadletters="7d")
    assert main(["retention", "apply", "--dry-run", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "ingestd: alert history: cannot connect to PostgreSQL at" in captured.err
    assert "dead letters: would delete 2 dead letters" in captured.out

    assert main(["retention", "apply", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert "ingestd: alert history: cannot connect to PostgreSQL at postgresql://ingestd:***@" in (
        captured.err
    )
    assert "nothing deleted" in captured.err
    assert "secret" not in captured.err + captured.out
    assert "dead letters: deleted 2 dead letters" in captured.out
    with psycopg.connect(pg_url) as conn:
        assert len(_ids(conn)) == 5


def test_an_old_schema_exits_2_with_the_fix_and_deletes_nothing(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path, pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM ingestd_schema WHERE version = %s", (LATEST,))
    config = _config(tmp_path, pg_url, alert_history="30d", deadletters="7d")
    assert main(["retention", "apply", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "run `ingestd db migrate`" in err
    with psycopg.connect(pg_url) as conn:
        assert len(_ids(conn)) == 5
    assert len(_topics(tmp_path / "spool")) == 3
