"""Latency probes that run beside a background load (bench/run.py, scenario 3).

- ``TsdbProbe``: publish a reading to MQTT and see when it becomes visible in
  VictoriaMetrics; the same moment, write a reading straight to VictoriaMetrics and see
  when that one becomes visible (the TSDB's own share of the delay).
- ``AlertProbe``: a probe device's reading crosses a rule's threshold (or comes back);
  the time until its alert event arrives on ``alerts/<severity>/...``.

Both take their times from CLOCK_MONOTONIC in this process, so publisher and observer
share one clock. Each runs on its own threads.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from services import VictoriaMetrics

SITE = "probe"
PROBE_RULE = """
  - name: ph_probe
    select: {measurement: probe, field: ph}
    above: 7.0
    severity: warning
"""
"""The rule AlertProbe's readings cross (appended to the benchmark's rule file)."""


def _client(url: str) -> paho.Client:
    parts = urlsplit(url)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    return client


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """count, p50, p99 and max (nearest rank), rounded to 0.1."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "count": len(values),
        "p50": round(statistics.median(ordered), 1),
        "p99": round(rank(0.99), 1),
        "max": round(ordered[-1], 1),
    }


class TsdbProbe:
    """Every ``interval`` s: reading ``n`` to ``<prefix>/probe/tsdb-probe/probe`` over MQTT
    (QoS 1) and ``direct n=<n>`` straight to VictoriaMetrics; every ``poll`` s: a
    ``force_flush`` and an export of both series. A value is visible from the first export
    that holds it (an upper bound: at most one poll late)."""

    def __init__(
        self,
        broker_url: str,
        vm: VictoriaMetrics,
        prefix: str,
        interval: float = 0.2,
        poll: float = 0.1,
    ) -> None:
        self.vm, self.prefix = vm, prefix
        self.interval, self.poll = interval, poll
        self.client = _client(broker_url)
        self.sent: dict[int, float] = {}
        self.seen: dict[str, dict[int, float]] = {"mqtt": {}, "direct": {}}
        self.publishing = threading.Event()
        self.polling = threading.Event()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._publish, daemon=True),
            threading.Thread(target=self._watch, daemon=True),
        ]

    def start(self) -> TsdbProbe:
        self.publishing.set()
        self.polling.set()
        for thread in self.threads:
            thread.start()
        return self

    def published(self) -> int:
        """Readings sent through ingestd so far."""
        return len(self.sent)

    def _publish(self) -> None:
        n = 0
        topic = f"{self.prefix}/{SITE}/tsdb-probe/probe"
        while self.publishing.is_set():
            n += 1
            self.sent[n] = time.monotonic()
            self.client.publish(topic, orjson.dumps({"n": n}), qos=1)
            try:
                self.vm.write(f"direct,farm={self.prefix} n={n} {time.time_ns()}")
            except Exception as exc:  # reported with the result
                self.errors.append(repr(exc))
            time.sleep(self.interval)

    def _watch(self) -> None:
        selectors = {
            "mqtt": f'probe_n{{farm="{self.prefix}"}}',
            "direct": f'direct_n{{farm="{self.prefix}"}}',
        }
        while self.polling.is_set():
            try:
                self.vm.flush()
                for path, selector in selectors.items():
                    series = self.vm.export(selector)
                    now = time.monotonic()
                    for s in series:
                        for value in s["values"]:
                            self.seen[path].setdefault(int(value), now)
            except Exception as exc:
                self.errors.append(repr(exc))
            time.sleep(self.poll)

    def halt(self) -> None:
        """Publish no more probes (at once: the caller is timing something)."""
        self.publishing.clear()

    def stop(self, timeout: float = 15) -> None:
        """Stop publishing; wait (at most ``timeout``) for the last probes to show."""
        self.publishing.clear()
        self.threads[0].join()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            len(seen) < len(self.sent) for seen in self.seen.values()
        ):
            time.sleep(0.1)
        self.polling.clear()
        self.threads[1].join()
        self.client.loop_stop()
        self.client.disconnect()

    def latencies_ms(self, path: str) -> list[float]:
        seen = self.seen[path]
        return [(seen[n] - at) * 1000 for n, at in self.sent.items() if n in seen]

    def result(self) -> dict[str, Any]:
        return {
            "probes": len(self.sent),
            "interval_s": self.interval,
            "poll_s": self.poll,
            "mqtt_via_ingestd_ms": percentiles(self.latencies_ms("mqtt")),
            "direct_write_ms": percentiles(self.latencies_ms("direct")),
            "missing": {path: len(self.sent) - len(seen) for path, seen in self.seen.items()},
            "errors": self.errors[:5],
            "samples_ms": {
                path: [round(x, 1) for x in self.latencies_ms(path)] for path in self.seen
            },
        }


class AlertProbe:
    """Every ``interval`` s, a probe device publishes a pH above (then below) the threshold
    of ``ph_probe``: one alert event (firing, then resolved) per reading. Each device fires
    once and resolves once (a single flipping device would be flapping, which the engine
    reports with events of its own)."""

    def __init__(
        self, broker_url: str, prefix: str, interval: float = 0.5, severity: str = "warning"
    ) -> None:
        self.prefix, self.interval = prefix, interval
        self.sent: dict[tuple[str, str], float] = {}
        self.received: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.watcher = _client(broker_url)
        self.watcher.on_message = self._on_event
        subscribed = threading.Event()
        self.watcher.on_subscribe = lambda *_: subscribed.set()
        self.watcher.subscribe(f"alerts/{severity}/{SITE}/+/ph_probe", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the alert watcher's subscription was not granted")
        self.prober = _client(broker_url)
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._flip, daemon=True)

    def _on_event(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        at = time.monotonic()
        event = orjson.loads(message.payload)
        with self.lock:
            self.received.setdefault((event["device"], event["kind"]), at)

    def start(self) -> AlertProbe:
        self.running.set()
        self.thread.start()
        return self

    def published(self) -> int:
        with self.lock:
            return len(self.sent)

    def _flip(self) -> None:
        flip = 0
        while self.running.is_set():
            device, high = f"alert-probe-{flip // 2}", flip % 2 == 0
            payload = orjson.dumps({"ph": 8.0 if high else 6.0})
            with self.lock:
                self.sent[(device, "firing" if high else "resolved")] = time.monotonic()
            self.prober.publish(f"{self.prefix}/{SITE}/{device}/probe", payload, qos=1)
            flip += 1
            time.sleep(self.interval)

    def halt(self) -> None:
        """Publish no more probe readings (at once)."""
        self.running.clear()

    def stop(self, timeout: float = 15) -> None:
        """Stop publishing; wait (at most ``timeout``) for the last events."""
        self.running.clear()
        self.thread.join()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= len(self.sent):
                    break
            time.sleep(0.1)
        for client in (self.watcher, self.prober):
            client.loop_stop()
            client.disconnect()

    def result(self) -> dict[str, Any]:
        with self.lock:
            latencies = [
                (self.received[key] - at) * 1000
                for key, at in self.sent.items()
                if key in self.received
            ]
            return {
                "readings": len(self.sent),
                "events": len(self.received),
                "missing": len(self.sent) - len(latencies),
                "interval_s": self.interval,
                "ms": percentiles(latencies),
                "samples_ms": [round(x, 2) for x in latencies],
            }
