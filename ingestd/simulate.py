"""A sensor fleet simulator: hydroponic readings over MQTT, at a steady rate, with sequence numbers.

Each device publishes JSON like an ESP32 reservoir probe to ``<prefix>/<site>/<device>/reservoir``;
``seq`` counts each device's messages from 0 so a test can prove that none went missing.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

__all__ = ["Fleet", "reading"]


def reading(device_index: int, seq: int, when: float) -> dict[str, float]:
    """Plausible values that drift slowly, with a little noise, per device."""
    phase = when / 600 + device_index
    return {
        "seq": float(seq),
        "ph": round(6.0 + 0.3 * math.sin(phase) + random.gauss(0, 0.02), 3),
        "ec": round(1.8 + 0.2 * math.sin(phase / 2) + random.gauss(0, 0.01), 3),
        "water_temp": round(20.5 + 1.5 * math.sin(phase / 3) + random.gauss(0, 0.05), 2),
        "air_temp": round(23.0 + 3.0 * math.sin(phase / 4) + random.gauss(0, 0.1), 2),
        "humidity": round(62.0 + 8.0 * math.sin(phase / 5) + random.gauss(0, 0.3), 1),
    }


@dataclass
class Fleet:
    url: str = "mqtt://127.0.0.1:1883"
    devices: int = 10
    sites: int = 2
    prefix: str = "farm"
    qos: int = 1
    client_id: str | None = None
    first: int = 0
    """Number of the first device (esp32-<first>...): fleets with different ranges coexist."""

    def topics(self) -> Iterator[tuple[int, str]]:
        for index in range(self.devices):
            number = self.first + index
            site = f"site{number % self.sites + 1}"
            yield index, f"{self.prefix}/{site}/esp32-{number:05d}/reservoir"

    def run(
        self,
        rate: float,
        count: int | None = None,
        duration: float | None = None,
        ack_timeout: float = 120.0,
    ) -> int:
        """Publish ``rate`` messages/s in round-robin over the devices; returns how many.

        Stops after ``count`` messages, ``duration`` seconds, or never; QoS 1 messages are
        all acknowledged by the broker before this returns.
        """
        parts = urlsplit(self.url)
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id or f"ingestd-sim-{random.getrandbits(32):08x}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if parts.username:
            client.username_pw_set(parts.username, parts.password)
        if parts.scheme == "mqtts":
            client.tls_set()
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        # While the broker is away paho keeps QoS 1 messages and re-sends them after it
        # reconnects by itself; count the broker's acks rather than trusting publish().
        client.reconnect_delay_set(min_delay=1, max_delay=2)
        connected = threading.Event()
        acked = threading.Semaphore(0)
        client.on_connect = lambda *args: connected.set()
        client.on_publish = lambda *args: acked.release()
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=30)
        client.loop_start()
        if not connected.wait(10):
            raise ConnectionError(f"simulator: no CONNACK from {parts.hostname}:{parts.port}")
        topics = list(self.topics())
        seqs = [0] * len(topics)
        sent = 0
        started = time.monotonic()
        try:
            while (count is None or sent < count) and (
                duration is None or time.monotonic() - started < duration
            ):
                index, topic = topics[sent % len(topics)]
                payload = orjson.dumps(reading(index, seqs[index], time.time()))
                info = client.publish(topic, payload, qos=self.qos)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    raise ConnectionError(f"simulator: publish failed: {info.rc}")
                seqs[index] += 1
                sent += 1
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0.002:
                    time.sleep(ahead)
            if self.qos:  # every message acknowledged by the broker
                deadline = time.monotonic() + ack_timeout
                for _ in range(sent):
                    if not acked.acquire(timeout=max(0.0, deadline - time.monotonic())):
                        raise TimeoutError(
                            f"simulator: the broker did not acknowledge all "
                            f"{sent} messages within {ack_timeout}s"
                        )
        finally:
            client.disconnect()
            client.loop_stop()
        return sent
