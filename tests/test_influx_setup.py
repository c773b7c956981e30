"""``ingestd influx setup`` against a real InfluxDB 1.6 and a real VictoriaMetrics; refusals
(401/403) come from the fault server standing in front of the real TSDB."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from faultserver import FaultServer
from services import InfluxDB1, VictoriaMetrics, free_port

from ingestd.cli import main


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def _config(tmp_path: Path, tsdb: str, **influx: str) -> Path:
    lines = ["influx:", *(f"  {key}: {value}" for key, value in influx.items())]
    lines += ["retention:", f"  tsdb: {tsdb}"]
    path = tmp_path / "ingestd.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _policies(influx: InfluxDB1, database: str) -> list[dict[str, Any]]:
    result = influx.query(database, f'SHOW RETENTION POLICIES ON "{database}"', epoch=None)
    series = result["results"][0]["series"][0]
    return [dict(zip(series["columns"], row, strict=True)) for row in series["values"]]


def _databases(influx: InfluxDB1) -> set[str]:
    result = influx.query("", "SHOW DATABASES", epoch=None)
    return {row[0] for row in result["results"][0]["series"][0].get("values", [])}


def _setup(config: Path) -> int:
    return main(["influx", "setup", "--config", str(config)])


def test_v1_creates_the_database_with_its_retention_then_keeps_or_changes_it(
    tmp_path: Path, influxdb1: InfluxDB1, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"farm_{unique}"
    config = _config(tmp_path, "30d", url=influxdb1.url, api="v1", database=db)
    assert _setup(config) == 0
    assert f"created database '{db}', keeping data 30d" in capsys.readouterr().out
    [policy] = _policies(influxdb1, db)
    assert (policy["name"], policy["duration"], policy["default"]) == ("autogen", "720h0m0s", True)

    assert _setup(config) == 0  # again: nothing to change
    assert "keeps data 30d (retention policy autogen): nothing to change" in (
        capsys.readouterr().out
    )
    assert _policies(influxdb1, db) == [policy]

    # Shorter than the policy's shard groups (1d): InfluxDB needs those shortened too.
    config = _config(tmp_path, "12h", url=influxdb1.url, api="v1", database=db)
    assert _setup(config) == 0
    assert "now keeps data 12h (retention policy autogen, was 30d)" in capsys.readouterr().out
    [policy] = _policies(influxdb1, db)
    assert (policy["duration"], policy["shardGroupDuration"]) == ("12h0m0s", "1h0m0s")

    config = _config(tmp_path, "0", url=influxdb1.url, api="v1", database=db)
    assert _setup(config) == 0
    assert "now keeps data forever (retention policy autogen, was 12h)" in (capsys.readouterr().out)
    [policy] = _policies(influxdb1, db)
    assert policy["duration"] == "0s"


def test_v1_changes_the_default_policy_of_an_existing_database(
    tmp_path: Path, influxdb1: InfluxDB1, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"farm-{unique}"  # a dash: the identifier must be quoted
    influxdb1.create_database(db)  # autogen, infinite
    influxdb1.query(db, f'CREATE RETENTION POLICY "other" ON "{db}" DURATION 2d REPLICATION 1')
    config = _config(tmp_path, "90d", url=influxdb1.url, api="v1", database=db)
    assert _setup(config) == 0
    assert "now keeps data 90d (retention policy autogen, was forever)" in (capsys.readouterr().out)
    policies = {p["name"]: p for p in _policies(influxdb1, db)}
    assert policies["autogen"]["duration"] == "2160h0m0s"
    assert policies["autogen"]["default"] is True
    assert policies["other"]["duration"] == "48h0m0s"  # not the default: left alone


def test_v1_refused_prints_the_influxql_an_admin_should_run(
    tmp_path: Path, influxdb1: InfluxDB1, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"farm_{unique}"
    body = b'{"error":"error authorizing query: reader not authorized to execute statement"}'
    with FaultServer(influxdb1.url, paths=("/query",)) as fault:
        fault.respond(403, times=None, body=body)
        config = _config(tmp_path, "30d", url=fault.url, api="v1", database=db, username="reader")
        assert _setup(config) == 1
    err = capsys.readouterr().err
    assert "answered 403" in err
    assert "user 'reader' may not do this (it takes an admin)" in err
    host = f"influx -host 127.0.0.1 -port {fault.port} -username ADMIN -execute"
    assert f"  {host} 'CREATE DATABASE \"{db}\" WITH DURATION 30d'\n" in err
    assert f'  {host} \'ALTER RETENTION POLICY "autogen" ON "{db}" DURATION 30d\'\n' in err
    assert db not in _databases(influxdb1)


def test_v1_retention_below_an_hour_is_a_configuration_error(
    tmp_path: Path, influxdb1: InfluxDB1, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"farm_{unique}"
    config = _config(tmp_path, "30m", url=influxdb1.url, api="v1", database=db)
    assert _setup(config) == 2
    assert "retention.tsdb = 30m: InfluxDB keeps data at least 1h" in capsys.readouterr().err
    assert db not in _databases(influxdb1)


@pytest.mark.parametrize("api", ["v2", "v1"])
def test_victoria_metrics_gets_the_retention_period_flag(
    tmp_path: Path,
    victoria_metrics: VictoriaMetrics,
    api: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # VictoriaMetrics answers any InfluxQL /query with its database list: a v1 setup that
    # trusted it would report a database created that does not exist.
    config = _config(tmp_path, "90d", url=victoria_metrics.url, api=api)
    assert _setup(config) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "is VictoriaMetrics" in captured.err
    assert "  victoria-metrics -retentionPeriod=90d -storageDataPath=...\n" in captured.err
    assert "/etc/default/victoria-metrics" in captured.err

    config = _config(tmp_path, "0", url=victoria_metrics.url, api=api)
    assert _setup(config) == 1
    assert "-retentionPeriod=100y" in capsys.readouterr().err


def test_v2_token_refused_prints_the_influx_bucket_command(
    tmp_path: Path, victoria_metrics: VictoriaMetrics, capsys: pytest.CaptureFixture[str]
) -> None:
    body = b'{"code":"unauthorized","message":"unauthorized access"}'
    # Only the bucket API is faulted: VictoriaMetrics' own endpoints are out of reach (404),
    # as they would be on an InfluxDB 2.x.
    paths = ("/api/v2/buckets", "/api/v2/orgs")
    with FaultServer(victoria_metrics.url, paths=paths) as fault:
        fault.respond(401, times=None, body=body)
        config = _config(
            tmp_path, "30d", url=fault.url, api="v2", org="acme", bucket="sensors", token="t0k"
        )
        assert _setup(config) == 1
        asked = {r.path for r in fault.requests}
    err = capsys.readouterr().err
    assert "cannot look up bucket 'sensors' of org 'acme'" in err
    assert "answered 401" in err and "influx.token is not accepted" in err
    create = f"influx bucket create --host {fault.url} --org acme --name sensors --retention 30d"
    assert f"  {create}\n" in err
    assert f"influx bucket update --host {fault.url} --id BUCKET_ID --retention 30d" in err
    assert "t0k" not in err
    assert "/api/v2/buckets" in asked


def test_unreachable_tsdb_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = _config(tmp_path, "30d", url=url, api="v1")
    assert _setup(config) == 1
    assert f"ingestd: cannot reach the TSDB at {url}" in capsys.readouterr().err
