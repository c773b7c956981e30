"""A bug of ours on one message costs that message, never an in-flight slot or the intake.

A real daemon (tests/faulty_ingestd.py makes one stage raise for chosen devices), a real
broker and VictoriaMetrics: the message becomes a dead letter with reason internal_error,
whose error id is in the log line too; it is acknowledged in its turn (a restart on the same
session gets nothing back); it is counted; and /healthz is degraded until a quiet period.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory
from daemon import DaemonProcess, daemon_config, seqs_in_victoria
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, Redis, VictoriaMetrics

FAULTY = Path(__file__).resolve().parent / "faulty_ingestd.py"
QUIET = 8.0
"""Seconds without an internal error before /healthz is healthy again (production: 300)."""


class FaultyDaemon(DaemonProcess):
    """``ingestd run`` whose ``stage`` raises for devices named with ``marker``."""

    def __init__(self, tmp: Path, config: dict[str, Any], stage: str, marker: str) -> None:
        super().__init__(tmp, config)
        self.command = (sys.executable, str(FAULTY), stage, marker, str(QUIET))


def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def logged_error_ids(daemon: DaemonProcess) -> dict[str, str]:
    """error id -> stage, from the daemon's JSON log lines."""
    found = {}
    for line in daemon.log_path.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if "error_id" in event:
                assert "Traceback" in event.get("exception", ""), event
                found[event["error_id"]] = event["stage"]
    return found


@pytest.mark.parametrize("stage", ["quota", "rules", "latest", "spool"])
def test_an_internal_error_makes_a_dead_letter_that_is_acked_counted_and_degrades_health(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
    stage: str,
) -> None:
    farm = f"i{unique}"
    config = daemon_config(tmp_path, mosquitto.url, farm, {"url": victoria_metrics.url})
    daemon = FaultyDaemon(tmp_path, config, stage, "boom")
    daemon.start()
    try:
        messages = []
        for n in range(4):  # good and failing messages interleaved: acks go out in order
            payload = orjson.dumps({"seq": n, "ph": 6.0})
            messages.append((f"{farm}/site1/esp32-00000/reservoir", payload))
            if n < 3:
                messages.append((f"{farm}/site1/boom{n}/reservoir", payload))
        publish(mosquitto, messages)
        daemon.wait(
            lambda: daemon.metric('ingestd_messages_rejected_total{reason="internal_error"}') == 3,
            "three dead letters with reason internal_error",
        )
        status, report = daemon.health()
        assert status == 503
        intake = report["components"]["intake"]
        assert not intake["ok"] and "3 internal errors" in intake["detail"], intake
        assert daemon.metric(f'ingestd_internal_errors_total{{stage="{stage}"}}') == 3

        # The good readings around them all arrived: no in-flight slot is stuck.
        found = seqs_in_victoria(victoria_metrics, farm, 4)
        assert found.keys() == {("esp32-00000", float(n)) for n in range(4)}

        # The log line and the dead letter carry the same error id.
        with sqlite3.connect(tmp_path / "spool" / "deadletters.sqlite") as db:
            letters = db.execute("SELECT topic, reason, detail FROM deadletters").fetchall()
        assert sorted(topic for topic, _, _ in letters) == [
            f"{farm}/site1/boom{n}/reservoir" for n in range(3)
        ]
        assert {reason for _, reason, _ in letters} == {"internal_error"}
        ids = logged_error_ids(daemon)
        assert ids == dict.fromkeys(ids, stage) and len(ids) == 3
        assert {detail.split()[1] for _, _, detail in letters} == ids.keys()
        assert all(f"in {stage}: RuntimeError: injected fault" in d for _, _, d in letters)

        daemon.wait(
            lambda: daemon.health()[1]["components"]["intake"]["ok"],
            "healthy again after a quiet period",
            timeout=QUIET + 30,
        )
        assert daemon.terminate() == 0

        # Acknowledged: the broker has nothing of them left for our session. A redelivery
        # would come first, before a message published after the restart.
        daemon.start()
        publish(mosquitto, [(f"{farm}/site1/esp32-00000/reservoir", b'{"seq": 4}')])
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 1, "the new one")
        assert daemon.metric("ingestd_messages_received_total") == 1
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_a_puback_that_fails_holds_back_no_other_and_its_message_comes_back_once(
    tmp_path: Path, services: ServiceFactory, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    """The first PUBACK raises: the acks after it still go out, the error is counted, and
    the broker redelivers that one message at the next connection; it keeps its first
    receipt time, so it overwrites itself, and is acknowledged then."""
    broker = services.mosquitto()
    farm = f"a{unique}"
    config = daemon_config(tmp_path, broker.url, farm, {"url": victoria_metrics.url})
    daemon = FaultyDaemon(tmp_path, config, "ack", "-")
    daemon.start()
    try:
        topic = f"{farm}/site1/esp32-00000/reservoir"
        publish(broker, [(topic, orjson.dumps({"seq": n})) for n in range(4)])
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 4, "stored")
        daemon.wait(
            lambda: daemon.metric('ingestd_internal_errors_total{stage="acknowledgement"}') == 1,
            "the failed acknowledgement counted",
        )
        assert daemon.metric("ingestd_messages_received_total") == 4

        broker.restart()  # a new connection: the unacknowledged message comes back
        daemon.wait(lambda: daemon.metric("ingestd_messages_received_total") == 5, "redelivered")
        found = seqs_in_victoria(victoria_metrics, farm, 4)
        assert found.keys() == {("esp32-00000", float(n)) for n in range(4)}
        assert all(len(set(stamps)) == 1 for stamps in found.values()), found

        # Acknowledged this time: another new connection brings nothing back before a
        # message published after it.
        broker.restart()
        daemon.wait(lambda: daemon.metric("ingestd_mqtt_reconnects_total") == 2, "reconnected")
        publish(broker, [(topic, b'{"seq": 4}')])
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") >= 6, "the new one")
        assert daemon.metric("ingestd_messages_received_total") == 6
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_an_internal_error_in_the_redis_quota_check_makes_its_readings_dead_letters(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    redis_server: Redis,
    unique: str,
) -> None:
    """With quotas.backend redis readings wait in a gate for one check per batch: a check
    that raises makes that batch's readings dead letters under one error id, acknowledged;
    the gate goes on with the next batch."""
    farm = f"g{unique}"
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        farm,
        {"url": victoria_metrics.url},
        redis={"url": redis_server.url},
        quotas={
            "backend": "redis",
            "rules": [{"name": "all", "topic": f"{farm}/+/{{device}}/#", "rate": 1000}],
        },
    )
    daemon = FaultyDaemon(tmp_path, config, "gate", "boom")
    daemon.start()
    try:
        publish(mosquitto, [(f"{farm}/site1/boom/reservoir", b'{"seq": 0}')])
        daemon.wait(
            lambda: daemon.metric('ingestd_messages_rejected_total{reason="internal_error"}') == 1,
            "a dead letter with reason internal_error",
        )
        assert daemon.metric('ingestd_internal_errors_total{stage="quota"}') == 1
        publish(mosquitto, [(f"{farm}/site1/esp32-00000/reservoir", b'{"seq": 1}')])
        found = seqs_in_victoria(victoria_metrics, farm, 1)
        assert found.keys() == {("esp32-00000", 1.0)}
        with sqlite3.connect(tmp_path / "spool" / "deadletters.sqlite") as db:
            letters = db.execute("SELECT topic, detail FROM deadletters").fetchall()
        ids = logged_error_ids(daemon)
        assert [topic for topic, _ in letters] == [f"{farm}/site1/boom/reservoir"]
        assert letters[0][1].split()[1] in ids
        assert daemon.terminate() == 0

        daemon.start()  # acknowledged: nothing comes back before a new message
        publish(mosquitto, [(f"{farm}/site1/esp32-00000/reservoir", b'{"seq": 2}')])
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 1, "the new one")
        assert daemon.metric("ingestd_messages_received_total") == 1
        assert daemon.terminate() == 0
    finally:
        daemon.close()
