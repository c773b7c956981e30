"""Latest values end to end: real broker, ingestd process, VictoriaMetrics and a private Redis
that goes away and comes back while readings and alerts keep flowing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from conftest import ServiceFactory
from daemon import REPO, DaemonProcess, daemon_config, seqs_in_victoria
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, Redis, VictoriaMetrics, http_request

TOKEN = "e2e-latest-token"
RULES = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 7.0
    severity: warning
"""
DEVICES = ("dev1", "dev2")


class Broker:
    """Publishes readings; collects alert events."""

    def __init__(self, broker: Mosquitto, prefix: str) -> None:
        self.prefix = prefix
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        host, port = broker.url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.subscribe("alerts/warning/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.events.append(orjson.loads(msg.payload))

    def firing(self, device: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["kind"] == "firing" and e["device"] == device]

    def readings(self, seqs: range, ph: float = 6.2) -> None:
        for seq in seqs:
            for device in DEVICES:
                payload = orjson.dumps({"seq": float(seq), "ph": ph, "ec": 1.8})
                topic = f"{self.prefix}/site1/{device}/reservoir"
                self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def latest(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    response = http_request(
        "GET", daemon.http + "/latest", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    return response.status, response.json()


def latest_seq(daemon: DaemonProcess, device: str) -> float | None:
    status, answer = latest(daemon)
    if status != 200 or device not in answer["devices"]:
        return None
    return float(answer["devices"][device]["reservoir.seq"]["value"])


def command(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "INGESTD_HTTP_TOKEN": TOKEN},
        check=False,
    )


def test_latest_values_survive_a_redis_outage_without_holding_up_ingestion_or_alerts(
    tmp_path: Path,
    services: ServiceFactory,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    redis: Redis = services.redis()
    prefix = f"l{unique}"
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "farm.yaml").write_text(RULES.format(farm=prefix))
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": victoria_metrics.url},
        redis={"url": redis.url, "timeout": "500ms"},
        latest={"interval": "100ms", "ttl": "1h"},
        rules={"dir": str(tmp_path / "rules")},
        http={"token_sha256": hashlib.sha256(TOKEN.encode()).hexdigest()},
    )
    daemon = DaemonProcess(tmp_path, config).start()
    broker = Broker(mosquitto, prefix)
    try:
        # readings in: the latest ones show up, over HTTP and on the command line
        broker.readings(range(10))
        for device in DEVICES:
            daemon.wait(lambda d=device: latest_seq(daemon, d) == 9, f"showing {device} seq 9")
        assert latest(daemon)[1]["devices"]["dev1"]["reservoir.ph"]["tags"] == {
            "farm": prefix,
            "site": "site1",
        }
        assert http_request("GET", daemon.http + "/latest").status == 401
        table = command(daemon, "latest")
        assert table.returncode == 0, table.stderr
        rows = [line.split() for line in table.stdout.splitlines()]
        assert ["dev1", "reservoir", "seq", "9"] in [row[:4] for row in rows]
        assert ["dev2", "reservoir", "ph", "6.2"] in [row[:4] for row in rows]
        one = command(daemon, "latest", "dev2", "--json")
        assert orjson.loads(one.stdout)["values"]["reservoir.seq"]["value"] == 9

        # Redis goes away: readings still land in the TSDB, alerts still go out
        redis.stop()
        broker.readings(range(10, 30))
        broker.readings(range(30, 31), ph=7.5)  # ph_high fires for both devices
        found = seqs_in_victoria(victoria_metrics, prefix, expected=31 * len(DEVICES))
        assert set(found) == {(d, float(n)) for d in DEVICES for n in range(31)}
        daemon.wait(lambda: all(broker.firing(d) for d in DEVICES), "publishing the alerts")
        daemon.wait(lambda: daemon.health()[0] == 503, "degraded")
        report = daemon.health()[1]
        assert report["status"] == "degraded"
        assert not report["components"]["latest"]["ok"]
        assert "Redis unavailable" in report["components"]["latest"]["detail"]
        assert latest(daemon)[0] == 503  # answered from Redis or not at all, never the TSDB
        assert daemon.metric("ingestd_latest_write_errors_total") > 0
        assert command(daemon, "latest").returncode == 1
        listing = command(daemon, "alerts")  # the token works for the daemon's other endpoints
        assert listing.returncode == 0 and '"rule":"ph_high"' in listing.stdout

        # Redis is back (empty): what waited is written, new readings show, health is ok
        redis.start()
        for device in DEVICES:
            daemon.wait(lambda d=device: latest_seq(daemon, d) == 30, f"catching up {device}")
        daemon.wait(lambda: daemon.health()[0] == 200, "healthy again")
        broker.readings(range(31, 35))
        for device in DEVICES:
            daemon.wait(lambda d=device: latest_seq(daemon, d) == 34, f"showing {device} seq 34")
        assert daemon.health()[1]["components"]["latest"] == {"ok": True, "detail": "in Redis"}
        assert daemon.terminate() == 0
    finally:
        broker.close()
        daemon.close()
