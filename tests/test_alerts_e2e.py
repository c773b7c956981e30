"""Alert rules end to end: readings in over MQTT, alert events and retained state out,
acknowledgements in; restart and reload keep alerts quiet and correct."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from daemon import REPO, DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, VictoriaMetrics

RULES = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: {threshold}
    clear: {{below: 6.8}}
    severity: warning
    annotations:
      summary: "pH {{{{ value }}}} on {{{{ device }}}}"
  - name: ec_low
    select: {{measurement: reservoir, field: ec, tags: {{farm: "{farm}"}}}}
    below: 1.0
    severity: critical
"""


class Watcher:
    """Everything published under alerts/# and ingestd/rules/#, with the retain flag."""

    def __init__(self, broker: Mosquitto, filters: tuple[str, ...] = ("alerts/#",)) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        host, port = broker.url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.subscribe([(f, 1) for f in filters])
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            found = [
                orjson.loads(p)
                for t, p, _ in self.messages
                if not t.startswith(("alerts/state/", "alerts/ack/", "ingestd/")) and p
            ]
        return [e for e in found if kind is None or e["kind"] == kind]

    def on(self, topic_prefix: str) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if m[0].startswith(topic_prefix)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def wait_for(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def reading(watcher: Watcher, prefix: str, device: str, **fields: float) -> None:
    watcher.publish(f"{prefix}/site1/{device}/reservoir", orjson.dumps(fields))


def start(tmp: Path, broker: Mosquitto, tsdb: VictoriaMetrics, prefix: str) -> DaemonProcess:
    config = daemon_config(
        tmp,
        broker.url,
        prefix,
        {"url": tsdb.url},
        rules={"dir": str(tmp / "rules"), "watch_interval": "200ms"},
    )
    return DaemonProcess(tmp, config).start()


def write_rules(tmp: Path, prefix: str, threshold: float = 7.0) -> Path:
    rules = tmp / "rules"
    rules.mkdir(exist_ok=True)
    path = rules / "farm.yaml"
    path.write_text(RULES.format(farm=prefix, threshold=threshold))
    return path


def test_alert_fires_is_acknowledged_over_mqtt_and_resolves_with_retained_state(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"a{unique}"
    write_rules(tmp_path, prefix)
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "dev1", ph=6.5, ec=1.8)
        reading(watcher, prefix, "dev1", ph=7.4, ec=1.8)
        wait_for(lambda: watcher.events("firing"), "the firing event")
        (firing,) = watcher.events("firing")
        assert firing["rule"] == "ph_high" and firing["device"] == "dev1"
        assert firing["value"] == 7.4 and firing["severity"] == "warning"
        assert firing["annotations"]["summary"] == "pH 7.4 on dev1"
        state_topic = "alerts/state/site1/dev1/ph_high/ph"
        assert watcher.on("alerts/warning/site1/dev1/ph_high")
        wait_for(lambda: watcher.on(state_topic), "the retained state")

        # a late subscriber sees the current picture: the retained state
        late = Watcher(mosquitto, ("alerts/state/#",))
        wait_for(lambda: late.on(state_topic), "the retained state for a late subscriber")
        assert late.on(state_topic)[0][2] is True
        late.close()

        listing = subprocess.run(
            [sys.executable, "-m", "ingestd", "alerts", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        assert firing["id"] in listing

        watcher.publish(f"alerts/ack/{firing['id']}/night-shift", b"")
        wait_for(lambda: watcher.events("acknowledged"), "the acknowledgement event")
        assert watcher.events("acknowledged")[0]["acknowledged_by"] == "night-shift"

        reading(watcher, prefix, "dev1", ph=6.6, ec=1.8)
        wait_for(lambda: watcher.events("resolved"), "the resolution")
        assert len(watcher.events("resolved")) == 1
        wait_for(lambda: watcher.on(state_topic)[-1][1] == b"", "the retained state cleared")
        late = Watcher(mosquitto, ("alerts/state/#",))
        time.sleep(1)
        assert not [m for m in late.on(state_topic) if m[1]], "a cleared state stays retained"
        late.close()
        assert daemon.metric('ingestd_alert_events_total{kind="firing",severity="warning"}') == 1
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_an_acknowledgement_names_its_sender_in_the_topic_never_in_the_payload(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    """The old form, alerts/ack/<id> with a name as payload, let anyone write any name: it
    is refused (logged), and the note a payload carries is cut."""
    prefix = f"k{unique}"
    write_rules(tmp_path, prefix)
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "dev2", ph=7.5, ec=1.8)
        wait_for(lambda: watcher.events("firing"), "the firing event")
        alert = watcher.events("firing")[0]["id"]
        watcher.publish(f"alerts/ack/{alert}", b"mallory")
        wait_for(lambda: "acknowledgement refused" in daemon.log(), "the old form refused")
        assert f"publish to alerts/ack/{alert}/<your broker username>" in daemon.log()
        note = "probe swapped \x1b[31m\n" + "z" * 300
        watcher.publish(f"alerts/ack/{alert}/night-shift", note.encode())
        wait_for(lambda: watcher.events("acknowledged"), "the acknowledgement event")
        (acked,) = watcher.events("acknowledged")
        assert acked["acknowledged_by"] == "night-shift"
        assert acked["reason"] == ("probe swapped [31m " + "z" * 300)[:199] + "\u2026"
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_restart_mid_alert_neither_loses_nor_reannounces_it(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"r{unique}"
    write_rules(tmp_path, prefix)
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "dev2", ph=7.5, ec=1.8)
        wait_for(lambda: watcher.events("firing"), "the firing event")
        assert daemon.terminate() == 0
        daemon.start()
        # still firing after the restart, and not announced again
        firing = subprocess.run(
            [sys.executable, "-m", "ingestd", "alerts", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        assert '"rule":"ph_high"' in firing and '"device":"dev2"' in firing
        reading(watcher, prefix, "dev2", ph=7.6, ec=1.8)  # still high: no new event
        reading(watcher, prefix, "dev2", ph=6.2, ec=1.8)  # clears it
        wait_for(lambda: watcher.events("resolved"), "the resolution")
        time.sleep(1)
        assert len(watcher.events("firing")) == 1
        assert len(watcher.events("resolved")) == 1
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_reload_keeps_old_rules_on_a_broken_file_and_state_on_a_changed_threshold(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"h{unique}"
    rules = write_rules(tmp_path, prefix)
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto, ("alerts/#", "ingestd/rules/#"))
    try:
        reading(watcher, prefix, "dev3", ph=6.5, ec=0.5)  # ec_low fires
        wait_for(lambda: watcher.events("firing"), "ec_low firing")

        # a broken edit: refused with file:line, the old rules stay in force
        good = rules.read_text()
        rules.write_text(good.replace("above: 7.0", "abvoe: 7.0"))
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(lambda: watcher.on("ingestd/rules/error"), "the rule error event")
        error = orjson.loads(watcher.on("ingestd/rules/error")[0][1])
        assert any(f"{rules}:" in p and "abvoe" in p for p in error["problems"]), error
        assert daemon.metric("ingestd_rule_reload_errors_total") >= 1
        reading(watcher, prefix, "dev3", ph=7.4, ec=0.5)  # the old ph_high still applies
        wait_for(lambda: len(watcher.events("firing")) == 2, "ph_high firing under old rules")

        # a changed threshold (seen by the file watch): ec_low's alert keeps its state
        rules.write_text(good.replace("above: 7.0", "above: 7.2"))
        wait_for(lambda: daemon.metric("ingestd_rule_reloads_total") >= 1, "the reload")
        time.sleep(0.5)
        events = watcher.events()
        assert [e["kind"] for e in events if e["rule"] == "ec_low"] == ["firing"]
        assert daemon.metric("ingestd_rules_loaded") == 2
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_kill_right_after_a_transition_neither_loses_it_nor_acks_it_unsaved(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    """A message is acknowledged only once the transition it caused is saved: killed the
    moment the event is out, the restarted daemon still has the alert (saved, or fired
    again from the redelivered message), never a forgotten one."""
    prefix = f"k{unique}"
    write_rules(tmp_path, prefix)
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto)
    try:
        for round_ in range(3):
            device = f"dev{round_}"
            reading(watcher, prefix, device, ph=7.5, ec=1.8)
            wait_for(
                lambda d=device: any(e["device"] == d for e in watcher.events("firing")), device
            )
            daemon.kill()
            daemon.start()
            firing = subprocess.run(
                [sys.executable, "-m", "ingestd", "alerts", "--config", str(daemon.config_path)],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            ).stdout
            assert f'"device":"{device}"' in firing, f"round {round_}: the alert was forgotten"
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()
