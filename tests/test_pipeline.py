"""End to end: a real broker, ingestd as a real process, real TSDBs; nothing acknowledged lost."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from conftest import ServiceFactory
from daemon import REPO, DaemonProcess, daemon_config, expected_keys, seqs_in_victoria
from paho.mqtt.enums import CallbackAPIVersion
from services import InfluxDB1, Mosquitto, VictoriaMetrics

from ingestd.simulate import Fleet


def publish_in_background(fleet: Fleet, rate: float, count: int) -> threading.Thread:
    thread = threading.Thread(target=fleet.run, args=(rate, count), daemon=True)
    thread.start()
    return thread


def publish(url: str, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    host, port = url.removeprefix("mqtt://").split(":")
    client.connect(host, int(port))
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def assert_exactly_once(found: dict[tuple[str, float], list[int]], devices: int, per: int) -> None:
    expected = expected_keys(devices, per)
    missing = expected - found.keys()
    assert not missing, f"{len(missing)} readings never arrived, e.g. {sorted(missing)[:5]}"
    assert found.keys() == expected
    replays = {k: v for k, v in found.items() if len(set(v)) != 1}
    assert not replays, f"readings stored under two timestamps (duplicates): {list(replays)[:5]}"


def test_10000_readings_from_100_devices_land_exactly_once_in_victoria_and_influx1(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    influxdb1: InfluxDB1,
    unique: str,
) -> None:
    prefix = f"t{unique}"
    influxdb1.create_database(prefix)
    v2 = DaemonProcess(
        tmp_path / "v2",
        daemon_config(
            tmp_path / "v2", mosquitto.url, prefix, {"url": victoria_metrics.url, "api": "v2"}
        ),
    )
    v1 = DaemonProcess(
        tmp_path / "v1",
        daemon_config(
            tmp_path / "v1",
            mosquitto.url,
            prefix,
            {"url": influxdb1.url, "api": "v1", "database": prefix},
        ),
    )
    try:
        v2.start()
        v1.start()
        Fleet(mosquitto.url, devices=100, sites=4, prefix=prefix).run(rate=4000, count=10_000)

        found = seqs_in_victoria(victoria_metrics, prefix, 10_000)
        assert_exactly_once(found, devices=100, per=100)
        assert sum(len(v) for v in found.values()) == 10_000  # no replay in a calm run

        def influx_count() -> int:
            result = influxdb1.query(prefix, "SELECT count(seq) FROM reservoir")
            series = result["results"][0].get("series")
            return int(series[0]["values"][0][1]) if series else 0

        v1.wait(lambda: influx_count() >= 10_000, "done writing to influxd", timeout=60)
        per_device = influxdb1.query(
            prefix, "SELECT count(seq), count(distinct(seq)) FROM reservoir GROUP BY device"
        )
        series = per_device["results"][0]["series"]
        assert len(series) == 100
        assert all(s["values"][0][1:] == [100, 100] for s in series)
        # every field arrived as a float with the topic's tags
        sample = influxdb1.query(
            prefix, "SELECT * FROM reservoir WHERE device='esp32-00007' LIMIT 1"
        )
        row = dict(
            zip(
                sample["results"][0]["series"][0]["columns"],
                sample["results"][0]["series"][0]["values"][0],
                strict=True,
            )
        )
        assert row["site"] == "site4" and row["farm"] == prefix
        assert {"ph", "ec", "water_temp", "air_temp", "humidity"} <= row.keys()
        for daemon in (v1, v2):
            assert daemon.metric("ingestd_messages_accepted_total") == 10_000
            assert daemon.metric("ingestd_points_written_total") == 10_000
        assert v2.terminate() == 0
        assert v1.terminate() == 0
    finally:
        v1.close()
        v2.close()


def test_kill_9_mid_stream_then_restart_every_reading_arrives_once(
    tmp_path: Path,
    services: ServiceFactory,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    broker = services.mosquitto()
    prefix = f"k{unique}"
    config = daemon_config(tmp_path, broker.url, prefix, {"url": victoria_metrics.url})
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        publisher = publish_in_background(
            Fleet(broker.url, devices=50, prefix=prefix), rate=3000, count=15_000
        )
        daemon.wait(lambda: daemon.metric("ingestd_messages_received_total") > 4000, "receiving")
        daemon.kill()  # kill -9: no chance to commit, ack or flush anything
        received_before = daemon.log()
        assert "stopped" not in received_before.splitlines()[-1]
        daemon.start()
        publisher.join(60)
        assert not publisher.is_alive()
        found = seqs_in_victoria(victoria_metrics, prefix, 15_000)
        assert_exactly_once(found, devices=50, per=300)
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_tsdb_outage_longer_than_backoff_then_everything_arrives(
    tmp_path: Path,
    services: ServiceFactory,
    mosquitto: Mosquitto,
    unique: str,
) -> None:
    tsdb = services.victoria_metrics()
    prefix = f"o{unique}"
    config = daemon_config(
        tmp_path, mosquitto.url, prefix, {"url": tsdb.url, "backoff_max": "300ms", "timeout": "1s"}
    )
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        publisher = publish_in_background(
            Fleet(mosquitto.url, devices=20, prefix=prefix), rate=800, count=4000
        )
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") > 500, "writing")
        tsdb.stop()
        daemon.wait(lambda: daemon.health()[0] == 503, "reporting the TSDB outage")
        _, report = daemon.health()
        assert not report["components"]["tsdb"]["ok"]
        time.sleep(3)  # several backoff caps (300 ms) and request timeouts (1 s)
        assert daemon.metric("ingestd_spool_records") > 0
        errors = daemon.metrics()
        assert sum(v for k, v in errors.items() if k.startswith("ingestd_write_errors_total")) > 0
        tsdb.start()
        publisher.join(30)
        found = seqs_in_victoria(tsdb, prefix, 4000)
        assert_exactly_once(found, devices=20, per=200)
        daemon.wait(lambda: daemon.health()[0] == 200, "healthy again")
        assert daemon.metric("ingestd_spool_records") == 0
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_broker_restart_while_publishing_loses_nothing_acknowledged(
    tmp_path: Path,
    services: ServiceFactory,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    broker = services.mosquitto()
    prefix = f"b{unique}"
    config = daemon_config(tmp_path, broker.url, prefix, {"url": victoria_metrics.url})
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        publisher = publish_in_background(
            Fleet(broker.url, devices=20, prefix=prefix), rate=1000, count=4000
        )
        daemon.wait(lambda: daemon.metric("ingestd_messages_received_total") > 1000, "receiving")
        broker.restart()
        publisher.join(90)
        assert not publisher.is_alive(), "the publisher never got all its acks"
        found = seqs_in_victoria(victoria_metrics, prefix, 4000)
        assert_exactly_once(found, devices=20, per=200)
        assert daemon.metric("ingestd_mqtt_reconnects_total") >= 1
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_full_spool_stops_acks_and_resumes_by_itself(
    tmp_path: Path,
    services: ServiceFactory,
    unique: str,
) -> None:
    tsdb = services.victoria_metrics()
    # The broker holds what we do not acknowledge (the fixture's max_queued_messages is
    # large; Mosquitto's default of 1000 would drop the rest - a broker setting, not ours).
    mosquitto = services.mosquitto()
    prefix = f"f{unique}"
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": tsdb.url, "backoff_max": "300ms"},
        spool={"max_bytes": "1MiB"},
        mqtt={"receive_maximum": 100},
    )
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        tsdb.stop()
        # ~180 bytes of line protocol per reading: 12,000 readings need ~2 MiB
        publisher = publish_in_background(
            Fleet(mosquitto.url, devices=40, prefix=prefix), rate=3000, count=12_000
        )
        daemon.wait(lambda: daemon.metric("ingestd_spool_full") == 1, "reporting a full spool")
        status, report = daemon.health()
        assert status == 503 and "disk budget exhausted" in report["components"]["spool"]["detail"]
        time.sleep(1)
        stalled = daemon.metric("ingestd_messages_received_total")
        time.sleep(1)
        # flow control: nothing more arrives while nothing is acknowledged
        assert daemon.metric("ingestd_messages_received_total") == stalled
        assert stalled < 12_000
        assert daemon.metric("ingestd_spool_bytes") <= 1 << 20
        tsdb.start()
        publisher.join(60)
        found = seqs_in_victoria(tsdb, prefix, 12_000, timeout=90)
        assert_exactly_once(found, devices=40, per=300)
        assert daemon.metric("ingestd_spool_full") == 0
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_bad_input_is_dead_lettered_with_a_reason_and_never_crashes(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    prefix = f"d{unique}"
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": victoria_metrics.url},
        guard={"max_payload_bytes": 2048},
    )
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        publish(
            mosquitto.url,
            [
                (f"{prefix}/s1/dev1/reservoir", b"not json"),
                (f"{prefix}/s1/dev1/reservoir", b'{"ph": NaN}'),
                (f"{prefix}/s1/dev1/reservoir", b'{"note": "text only"}'),
                (f"{prefix}/s1/dev1/reservoir", b'{"ph": 6.1, "time": 4102444800}'),  # year 2100
                (f"{prefix}/s1/dev1/reservoir", b'{"ph": 6.1, "time": 946684800}'),  # year 2000
                (f"{prefix}/s1/dev1/reservoir", b"{" + b" " * 4096 + b"}"),
                (f"{prefix}/s1/dev 1 x=1/reservoir", b'{"ph": 6.1}'),  # injection via the topic
                (f"{prefix}/s1,evil=1/dev2/reservoir", b'{"ph": 6.2, "seq": 1}'),  # escaped tag
            ],
        )
        daemon.wait(lambda: daemon.metric("ingestd_messages_received_total") == 8, "received")
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 1, "written")
        metrics = daemon.metrics()
        rejected = {
            k.split('"')[1]: v
            for k, v in metrics.items()
            if k.startswith("ingestd_messages_rejected_total")
        }
        assert rejected == {
            "malformed": 2,
            "no_fields": 1,
            "time_future": 1,
            "time_too_old": 1,
            "too_large": 1,
            "device_invalid": 1,
        }
        series = victoria_metrics.export_until(f'reservoir_ph{{farm="{prefix}"}}')
        assert [s["metric"]["site"] for s in series] == ["s1,evil=1"]
        assert series[0]["metric"]["device"] == "dev2" and "evil" not in series[0]["metric"]
        assert daemon.terminate() == 0
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "ingestd",
                "deadletters",
                "--config",
                str(daemon.config_path),
                "--limit",
                "50",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        for reason in rejected:
            assert reason in listing
        assert "payload: 'not json'" in listing
        assert f"{prefix}/s1/dev 1 x=1/reservoir" in listing
    finally:
        daemon.close()


def test_sigterm_drains_to_the_tsdb_and_exits_0(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    prefix = f"s{unique}"
    config = daemon_config(
        tmp_path, mosquitto.url, prefix, {"url": victoria_metrics.url, "flush_interval": "5s"}
    )
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        Fleet(mosquitto.url, devices=10, prefix=prefix).run(rate=2000, count=500)
        daemon.wait(lambda: daemon.metric("ingestd_messages_accepted_total") == 500, "accepted")
        assert daemon.terminate() == 0  # before the 5 s linger: the drain on stop wrote it all
        found = seqs_in_victoria(victoria_metrics, prefix, 500)
        assert_exactly_once(found, devices=10, per=50)
        assert '"readings_left_in_spool": 0' in daemon.log()
    finally:
        daemon.close()


def test_line_protocol_batch_with_one_bad_line_lands_the_rest_in_influx1(
    tmp_path: Path, mosquitto: Mosquitto, influxdb1: InfluxDB1, unique: str
) -> None:
    prefix = f"l{unique}"
    influxdb1.create_database(prefix)
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": influxdb1.url, "api": "v1", "database": prefix, "flush_interval": "1s"},
    )
    config["mqtt"]["subscriptions"] = [
        {"template": "{farm}/{site}/{device}", "topic": f"{prefix}/+/+", "codec": "line"}
    ]
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        # irrigation.valve is a boolean in InfluxDB after the first line; the one line that
        # sends it as a string is refused by the TSDB itself, inside a batch of 200.
        base = time.time_ns() - 3600 * 10**9
        good = [
            f"irrigation,zone=z{i % 4} valve={'true' if i % 2 else 'false'},flow={i}.5 "
            f"{base + i * 1000}"
            for i in range(200)
        ]
        bad = f'irrigation,zone=z9 valve="open" {base + 999_999}'
        payloads = [*good[:100], bad, *good[100:]]
        publish(
            mosquitto.url, [(f"{prefix}/s1/gw-{i % 5}", p.encode()) for i, p in enumerate(payloads)]
        )

        def stored() -> int:
            result = influxdb1.query(prefix, "SELECT count(flow) FROM irrigation")
            series = result["results"][0].get("series")
            return int(series[0]["values"][0][1]) if series else 0

        daemon.wait(lambda: stored() == 200, "done writing the good lines", timeout=60)
        daemon.wait(
            lambda: daemon.metric('ingestd_messages_rejected_total{reason="tsdb_refused"}') == 1,
            "dead-lettering the refused line",
        )
        assert daemon.metric("ingestd_points_written_total") == 200
        assert daemon.terminate() == 0
        listing = subprocess.run(
            [
                sys.executable,
                "-m",
                "ingestd",
                "deadletters",
                "--config",
                str(daemon.config_path),
                "--reason",
                "tsdb_refused",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        assert "valve" in listing and "400" in listing
    finally:
        daemon.close()
