"""The daemon with PostgreSQL: registry and calibration at ingest, alert history through an
outage, the schema check at start, and the admin commands."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml
from daemon import REPO, DaemonProcess, daemon_config
from services import Mosquitto, Postgres, VictoriaMetrics
from test_alerts_e2e import Watcher, wait_for

from ingestd.cli import main
from ingestd.store.postgres import migrate

RULE = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 7.0
    clear: {{below: 6.8}}
    severity: warning
"""


def _sql(url: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def _config(
    tmp: Path, broker: Mosquitto, tsdb: VictoriaMetrics, prefix: str, pg: str, **more: Any
) -> dict[str, Any]:
    rules = tmp / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "farm.yaml").write_text(RULE.format(farm=prefix))
    return daemon_config(
        tmp,
        broker.url,
        prefix,
        {"url": tsdb.url},
        postgres={"url": pg, "connect_timeout": "1s", "retry": "300ms", "history_batch": 50},
        rules={"dir": str(rules), "watch_interval": "200ms"},
        **more,
    )


def _cli(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([*args, "--config", str(config)])
    return code, out.getvalue()


def test_calibration_applies_from_its_valid_from_in_the_tsdb(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    pg_url: str,
    unique: str,
) -> None:
    prefix = f"c{unique}"
    config = _config(tmp_path, mosquitto, victoria_metrics, prefix, pg_url)
    daemon = DaemonProcess(tmp_path, config)
    switch = time.time() - 60
    code, out = _cli(daemon.config_path, "devices", "add", "dev1", "--site", "site1")
    assert code == 0 and "dev1 saved" in out
    code, out = _cli(
        daemon.config_path,
        "devices",
        "calibrate",
        "dev1",
        "ph",
        "--offset",
        "-0.5",
        "--scale",
        "2",
        "--from",
        datetime.fromtimestamp(switch, UTC).isoformat(),
    )
    assert code == 0 and "value * 2 + -0.5" in out, out
    (cal_id,) = _sql(pg_url, "SELECT id FROM calibrations")[0]
    daemon.start()
    watcher = Watcher(mosquitto)
    try:
        for offset, ph in ((-2.0, 3.0), (-1.0, 3.1), (+1.0, 3.2), (+2.0, 3.3)):
            payload = {"ph": ph, "time": round(switch + offset, 3)}
            watcher.publish(f"{prefix}/site1/dev1/reservoir", orjson.dumps(payload))
        series = victoria_metrics.export_until(
            f'reservoir_ph{{farm="{prefix}"}}', lambda s: sum(len(x["values"]) for x in s) >= 4
        )
        values = dict(zip(series[0]["timestamps"], series[0]["values"], strict=True))
        at = {round((switch + o) * 1000): o for o in (-2.0, -1.0, 1.0, 2.0)}
        by_offset = {at[t]: v for t, v in values.items()}
        # raw before valid_from, calibrated (x2 - 0.5) from it
        assert by_offset == {-2.0: 3.0, -1.0: 3.1, 1.0: 5.9, 2.0: 6.1}
        traced = victoria_metrics.export_until(f'reservoir_ph_cal{{farm="{prefix}"}}')
        assert traced[0]["values"] == [float(cal_id), float(cal_id)]
        # a new calibration (another connection) applies without a restart
        _cli(daemon.config_path, "devices", "calibrate", "dev1", "ph", "--offset", "1")
        (new_id,) = _sql(pg_url, "SELECT max(id) FROM calibrations")[0]
        wait_for(lambda: daemon.metric("ingestd_registry_updates_total") >= 1, "the NOTIFY")
        watcher.publish(f"{prefix}/site1/dev1/reservoir", orjson.dumps({"ph": 6.0}))
        traced = victoria_metrics.export_until(
            f'reservoir_ph_cal{{farm="{prefix}"}}', lambda s: len(s[0]["values"]) >= 3
        )
        assert traced[0]["values"][-1] == float(new_id)
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_unknown_and_disabled_devices_become_dead_letters(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    pg_url: str,
    unique: str,
) -> None:
    prefix = f"u{unique}"
    config = _config(
        tmp_path, mosquitto, victoria_metrics, prefix, pg_url, registry={"unknown": "reject"}
    )
    daemon = DaemonProcess(tmp_path, config)
    _cli(daemon.config_path, "devices", "add", "good")
    _cli(daemon.config_path, "devices", "add", "bad", "--disabled")
    daemon.start()
    watcher = Watcher(mosquitto)
    try:
        for device in ("good", "bad", "stranger"):
            watcher.publish(f"{prefix}/site1/{device}/reservoir", orjson.dumps({"ph": 6.5}))
        wait_for(
            lambda: (
                daemon.metric('ingestd_messages_rejected_total{reason="unknown_device"}') == 1
                and daemon.metric('ingestd_messages_rejected_total{reason="device_disabled"}') == 1
            ),
            "both rejections",
        )
        assert daemon.metric("ingestd_messages_accepted_total") == 1
        letters = subprocess.run(
            [sys.executable, "-m", "ingestd", "deadletters", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        assert "ingestd devices add stranger" in letters
        assert "ingestd devices enable bad" in letters
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_run_refuses_an_old_schema_and_says_to_migrate(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, pg_empty: str
) -> None:
    config = _config(tmp_path, mosquitto, victoria_metrics, "old", pg_empty)
    daemon = DaemonProcess(tmp_path, config)
    result = subprocess.run(
        [sys.executable, "-m", "ingestd", "run", "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "run `ingestd db migrate`" in result.stderr
    code, out = _cli(daemon.config_path, "db", "migrate")
    assert code == 0 and "applied 0001 initial" in out
    code, out = _cli(daemon.config_path, "db", "migrate")
    assert code == 0 and "up to date" in out


def test_postgres_down_for_a_minute_loses_no_alert_event(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    services: Any,
    unique: str,
) -> None:
    server: Postgres = services.postgres()
    url = server.create_database(f"d_{unique}")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    prefix = f"p{unique}"
    daemon = DaemonProcess(tmp_path, _config(tmp_path, mosquitto, victoria_metrics, prefix, url))
    daemon.start()
    watcher = Watcher(mosquitto)
    try:

        def publish(device: str, ph: float) -> None:
            watcher.publish(f"{prefix}/site1/{device}/reservoir", orjson.dumps({"ph": ph}))

        publish("dev0", 7.5)  # written while PostgreSQL is up
        wait_for(lambda: _sql(url, "SELECT count(*) FROM alert_events")[0][0] == 1, "dev0 row")
        server.stop()
        outage = time.monotonic()
        wait_for(
            lambda: daemon.health()[1].get("status") == "degraded", "health degraded", timeout=30
        )
        devices = [f"dev{i}" for i in range(1, 11)]
        for device in devices:
            publish(device, 7.5)  # fires
        for device in devices[:5]:
            publish(device, 6.5)  # and resolves
        publish("dev0", 6.5)
        wait_for(lambda: len(watcher.events("resolved")) == 6, "the resolutions on MQTT")
        # kill -9 mid-outage: the queued history survives on disk
        daemon.kill()
        daemon.start(wait_ready=True)
        # the transitions wait in the local queue (those of messages not acknowledged
        # before the kill happen again when the broker redelivers them)
        wait_for(lambda: daemon.metric("ingestd_alert_history_pending") >= 1, "queued history")
        time.sleep(max(0.0, 60 - (time.monotonic() - outage)))  # down for a minute in all
        server.start()
        wait_for(lambda: daemon.metric("ingestd_alert_history_pending") == 0, "the backlog", 60)
        rows = _sql(
            url,
            "SELECT device_id, state, resolved_at IS NOT NULL FROM alert_events ORDER BY device_id",
        )
        expected = {("dev0", "resolved", True)} | {
            (d, "resolved" if d in devices[:5] else "firing", d in devices[:5]) for d in devices
        }
        assert set(rows) == expected and len(rows) == 11
        wait_for(lambda: daemon.health()[1].get("status") == "ok", "health ok again", 30)
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_devices_commands(tmp_path: Path, pg_url: str) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        yaml.safe_dump({"postgres": {"url": pg_url}, "spool": {"dir": str(tmp_path)}})
    )
    assert _cli(config, "devices", "add", "esp-1", "--site", "gh1", "--kind", "esp32")[0] == 0
    assert (
        _cli(config, "devices", "add", "esp-2", "--quota-rate", "2", "--quota-burst", "5")[0] == 0
    )
    code, out = _cli(config, "devices", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["esp-1", "gh1", "esp32", "yes"]
    assert "2/s burst 5" in lines[2]
    assert _cli(config, "devices", "disable", "esp-1") == (0, "device esp-1 disabled\n")
    code, out = _cli(config, "devices", "list", "--site", "gh1", "--json")
    assert orjson.loads(out.splitlines()[0])["enabled"] is False
    assert _cli(config, "devices", "disable", "nope")[0] == 2
    assert _cli(config, "devices", "calibrate", "nope", "ph", "--offset", "1")[0] == 2
    with pytest.raises(SystemExit, match="2"):  # refused while parsing (test_store_cli.py)
        _cli(config, "devices", "calibrate", "esp-1", "ph", "--scale", "0")
    assert _cli(config, "devices", "calibrate", "esp-2") == (
        0,
        "device esp-2 has no calibrations\n",
    )
    code, out = _cli(
        config,
        "devices",
        "calibrate",
        "esp-1",
        "ph",
        "--offset",
        "0.2",
        "--from",
        "2026-01-01T00:00:00Z",
    )
    assert code == 0
    code, out = _cli(config, "devices", "calibrate", "esp-1")
    assert "ph: value * 1 + 0.2 from 2026-01-01 00:00:00Z" in out
    _sql(
        pg_url,
        "INSERT INTO alert_events (id, rule, device_id, field, level, state, started_at,"
        " updated_at, resolved_at) VALUES ('x1', 'ph_high', 'esp-1', 'ph', 'warning', 'resolved',"
        " now() - interval '2 hours', now(), now() - interval '1 hour'),"
        " ('x2', 'ph_high', 'esp-2', 'ph', 'warning', 'firing', now() - interval '3 days',"
        " now(), NULL)",
    )
    code, out = _cli(config, "alerts", "history", "--device", "esp-1", "--since", "24h")
    assert code == 0 and "ph_high on esp-1" in out and "resolved" in out and "x1" in out
    code, out = _cli(config, "alerts", "history", "--since", "24h", "--json")
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == ["x1"]
    code, out = _cli(config, "alerts", "history", "--since", "7d", "--rule", "ph_high")
    assert "x1" in out and "x2" in out
    # Longer than the calendar goes back: everything. More than PostgreSQL counts: all.
    code, out = _cli(config, "alerts", "history", "--since", "100000000d")
    assert code == 0 and "x1" in out and "x2" in out
    code, out = _cli(config, "alerts", "history", "--since", "7d", "--limit", "9" * 30)
    assert code == 0 and "x1" in out and "x2" in out
    code, out = _cli(config, "alerts", "history", "--since", "7d", "--limit", "1")
    assert code == 0 and len(out.splitlines()) == 1
    ages = tmp_path / "ages.yaml"
    ages.write_text(
        yaml.safe_dump(
            {
                "postgres": {"url": pg_url},
                "spool": {"dir": str(tmp_path)},
                "retention": {"alert_history": "36500d"},
            }
        )
    )
    code, out = _cli(ages, "retention", "apply", "--dry-run")
    assert code == 0 and "would delete 0 resolved alerts" in out


def test_devices_commands_refuse_what_the_database_would(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """What once reached PostgreSQL and came back as a psycopg traceback (a CHECK, a LIMIT,
    a foreign key), or was stored to do harm later (NaN quotas and calibrations)."""
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        yaml.safe_dump({"postgres": {"url": pg_url}, "spool": {"dir": str(tmp_path)}})
    )
    for argv in (
        ["devices", "add", "x", "--quota-rate", "-1"],
        ["devices", "add", "x", "--quota-rate", "nan"],
        ["devices", "add", "x", "--quota-rate", "1", "--quota-burst", "-1"],
        ["devices", "add", "x", "--site", ""],
        ["devices", "calibrate", "x", "ph", "--scale", "inf"],
        ["alerts", "history", "--limit", "-5"],
        ["alerts", "history", "--since", "bogus"],
    ):
        with pytest.raises(SystemExit, match="2"):
            _cli(config, *argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"'{argv[-1]}'" in err.splitlines()[-1], err
    assert _cli(config, "devices", "calibrate", "nope") == (2, "")
    assert "no device 'nope' in the registry" in capsys.readouterr().err
    assert _cli(config, "devices", "add", "x", "--quota-burst", "5") == (2, "")
    assert "needs --quota-rate" in capsys.readouterr().err
    assert _sql(pg_url, "SELECT count(*) FROM devices")[0][0] == 0
