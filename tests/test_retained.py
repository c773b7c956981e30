"""Retained messages are old values: never a new reading at receipt, never seen by the rules.

Against a real broker (restarted) and a real daemon (restarted): Homie devices whose
properties are retained, as the convention has it, and JSON devices retaining their last
reading with and without a timestamp of their own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory
from daemon import DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from services import Mosquitto, VictoriaMetrics

RULES = """
rules:
  - name: sensor_silent
    select: {{measurement: reservoir, tags: {{farm: "{farm}"}}}}
    deadman: 2s
    per: device
    severity: critical
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 8
    for: 1s
    severity: warning
"""


class AlertWatcher:
    """Alert events, over a persistent session that outlives a broker restart."""

    def __init__(self, broker: Mosquitto, client_id: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.on_connect = lambda c, *_: c.subscribe("alerts/+/+/+/+", qos=1)
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=properties)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.startswith(("alerts/state/", "alerts/ack/")) or not msg.payload:
            return
        with self._lock:
            self.events.append(orjson.loads(msg.payload))

    def of(self, device: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(e["rule"], e["kind"]) for e in self.events if e["device"] == device]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    """Retained, at QoS 1, as Homie devices and many ESP32 firmwares publish."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def points(vm: VictoriaMetrics, farm: str) -> dict[str, list[tuple[float, int]]]:
    """device -> its (value, timestamp in ms) of reservoir_ph, as VictoriaMetrics has them."""
    found: dict[str, list[tuple[float, int]]] = {}
    for series in vm.export(f'reservoir_ph{{farm="{farm}"}}'):
        pairs = zip(series["values"], series["timestamps"], strict=True)
        found.setdefault(series["metric"]["device"], []).extend(pairs)
    return found


@pytest.mark.parametrize("setting", ["5 once", "3.1.1 once", "5 ignore", "3.1.1 ignore"])
def test_retained_values_are_not_readings_across_broker_and_ingestd_restarts(
    tmp_path: Path,
    services: ServiceFactory,
    victoria_metrics: VictoriaMetrics,
    unique: str,
    setting: str,
) -> None:
    protocol, mode = setting.split()  # mqtt.protocol, mqtt.retained
    broker = services.mosquitto()
    farm = f"r{unique}"
    stamp = int(time.time()) - 60
    # Before ingestd's first start: what the broker will replay at its subscription.
    publish(
        broker,
        [
            (f"{farm}/homie/dead/reservoir/ph", b"6.1"),  # an old value, no timestamp
            (f"{farm}/homie/dead/reservoir/$name", b"Reservoir"),  # an attribute, no reading
            (f"{farm}/json/stamped/reservoir", orjson.dumps({"ph": 9.0, "ts": stamp})),
            (f"{farm}/json/unstamped/reservoir", orjson.dumps({"ph": 9.0})),
        ],
    )
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "farm.yaml").write_text(RULES.format(farm=farm))
    config = daemon_config(
        tmp_path,
        broker.url,
        farm,
        {"url": victoria_metrics.url},
        rules={"dir": str(rules), "watch_interval": "200ms"},
        mqtt={
            "protocol": protocol,
            "retained": mode,
            "subscriptions": [
                {
                    "template": "{farm}/homie/{device}/{node}/{property}",
                    "topic": f"{farm}/homie/+/+/+",
                    "codec": "homie",
                },
                {"template": "{farm}/json/{device}/{measurement}", "topic": f"{farm}/json/+/+"},
            ],
        },
    )
    watcher = AlertWatcher(broker, f"watch-{unique}")
    daemon = DaemonProcess(tmp_path, config).start()
    alive = 0

    def live_reading() -> None:
        nonlocal alive
        publish(broker, [(f"{farm}/homie/alive/reservoir/ph", f"6.{alive}".encode())])
        alive += 1
        victoria_metrics.export_until(
            f'reservoir_ph{{farm="{farm}",device="alive"}}',
            lambda series: sum(len(s["values"]) for s in series) >= alive,
        )

    try:
        # Retained and published while ingestd is subscribed: a live reading (flag clear).
        publish(broker, [(f"{farm}/homie/dead/reservoir/ph", b"6.2")])
        live_reading()
        wait_for(lambda: ("sensor_silent", "firing") in watcher.of("dead"), "dead silent")
        before_restarts = daemon.metrics()

        broker.restart()
        daemon.wait(lambda: daemon.metric("ingestd_mqtt_reconnects_total") >= 1, "reconnected")
        daemon.wait(lambda: daemon.health()[1]["components"]["mqtt"]["ok"], "subscribed")
        live_reading()
        assert daemon.terminate() == 0
        daemon.start()
        live_reading()  # in order after any replay: the replays have been handled
        time.sleep(1.5)  # a late duplicate or alert event would show by now
        victoria_metrics.flush()
        stored = points(victoria_metrics, farm)

        assert [value for value, _ in stored.get("dead", [])] == [6.2], (
            "the dead device's retained value was stored again as a new reading"
        )
        assert len({t for _, t in stored["alive"]}) == alive == 3  # live retained: all kept
        if mode == "ignore":
            assert "stamped" not in stored
        else:
            assert {t for _, t in stored["stamped"]} == {stamp * 1000}  # its own time, once
            if protocol == "5":  # Retain Handling 1: no replay of an existing subscription
                assert len(stored["stamped"]) == 1
        assert "unstamped" not in stored, "an old value without a timestamp was dated now"
        assert watcher.of("dead") == [("sensor_silent", "firing")], (
            "the retained value reset the dead device's deadman"
        )
        for device in ("stamped", "unstamped"):
            assert watcher.of(device) == [], f"the rules saw {device}'s retained value"

        retained = {
            key.split('"')[1]: value
            for key, value in before_restarts.items()
            if key.startswith("ingestd_retained_messages_total")
        }
        if mode == "once":
            assert retained == {"stored": 1, "no_timestamp": 2, "no_reading": 1}
        else:  # MQTT 5: Retain Handling 2, the broker sends none
            assert retained == ({} if protocol == "5" else {"ignored": 4})
        with sqlite3.connect(tmp_path / "spool" / "deadletters.sqlite") as db:
            assert db.execute("SELECT count(*) FROM deadletters").fetchone() == (0,)
        assert daemon.terminate() == 0
    finally:
        daemon.close()
        watcher.close()
