"""Three ingestd processes as one system: one real Mosquitto with an MQTT 5 shared
subscription, one real Redis (leases, partition streams and state, heartbeats), one real
PostgreSQL (the notification outbox), VictoriaMetrics, and a local webhook receiving the
notifications through Apprise. Every reading stored once, every alert transition published
and notified exactly once; an instance killed -9; Redis restarted without its data."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from daemon import DaemonProcess, daemon_config, seqs_in_victoria
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, Redis, VictoriaMetrics
from test_alerts_e2e import Watcher, wait_for
from test_notify_e2e import cli, fast_retries, lines, route
from test_notify_endpoints import HookServer

from ingestd.cluster.leases import lease_key, partition_of

PARTITIONS = 8
RULES = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 7.0
    clear: {{below: 6.8}}
    severity: critical
  - name: silent
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}, device: "quiet-*"}}
    deadman: 3s
    severity: warning
"""


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()


class Cluster:
    """Instances ``a``, ``b``, ``c`` of one cluster, each ``ingestd run`` in its own process."""

    def __init__(  # noqa: PLR0917 - the fixtures it is made of
        self,
        tmp: Path,
        broker: Mosquitto,
        tsdb: VictoriaMetrics,
        redis: Redis,
        pg_url: str,
        hooks: HookServer,
        prefix: str,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        rules = tmp / "rules"
        rules.mkdir()
        (rules / "farm.yaml").write_text(RULES.format(farm=prefix))
        self.instances: dict[str, DaemonProcess] = {}
        for name in ("a", "b", "c"):
            config = daemon_config(
                tmp / name,
                broker.url,
                prefix,
                {"url": tsdb.url},
                mqtt={"share_group": f"g{prefix}", "client_id": f"ingestd-{prefix}-{name}"},
                redis={"url": redis.url},
                postgres={"url": pg_url},
                cluster={
                    "enabled": True,
                    "instance": name,
                    "partitions": PARTITIONS,
                    "lease": "3s",
                    "heartbeat": "500ms",
                },
                rules={"dir": str(rules), "watch_interval": "1s"},
                notify={
                    **fast_retries(),
                    "outbox": "postgres",
                    "channels": {"hook": hooks.url("hook")},
                    "routes": [route(["hook"])],
                },
            )
            self.instances[name] = DaemonProcess(tmp / name, config)

    def start(self) -> Cluster:
        for daemon in self.instances.values():
            daemon.start()
        wait_for(lambda: self.balanced(set(self.instances)), "partitions spread", timeout=30)
        return self

    def owners(self) -> dict[int, str | None]:
        with self.redis.client() as client:
            values = client.mget([lease_key(p) for p in range(PARTITIONS)])
        return {p: (v.decode().rsplit(":", 1)[0] if v else None) for p, v in enumerate(values)}

    def balanced(self, live: set[str]) -> bool:
        owners = self.owners()
        if None in owners.values() or set(owners.values()) != live:
            return False
        share = -(-PARTITIONS // len(live))
        return all(n <= share for n in Counter(owners.values()).values())

    def close(self) -> None:
        for daemon in self.instances.values():
            daemon.close()


@pytest.fixture
def cluster(  # noqa: PLR0917 - pytest passes fixtures by name
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    services: Any,
    pg_url: str,
    hooks: HookServer,
    unique: str,
) -> Iterator[Cluster]:
    group = Cluster(
        tmp_path, mosquitto, victoria_metrics, services.redis(), pg_url, hooks, f"c{unique}"
    )
    try:
        yield group
    finally:
        group.close()


class Publisher:
    """Sequence-numbered QoS 1 readings with the device's own millisecond timestamps."""

    def __init__(self, broker: Mosquitto, prefix: str) -> None:
        self.prefix = prefix
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.max_inflight_messages_set(1000)
        host, port = broker.url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.base_ms = int(time.time() * 1000)
        self.sent = 0

    def send(self, device: str, seq: int, ph: float) -> None:
        payload = orjson.dumps({"ph": ph, "seq": seq, "ts": self.base_ms + seq * 10})
        info = self.client.publish(f"{self.prefix}/site1/{device}/reservoir", payload, qos=1)
        self.sent += 1
        if self.sent % 500 == 0:
            info.wait_for_publish(30)  # the broker has it: keep the client's queue short

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _ph(device: int, seq: int, high: range) -> float:
    """Devices 0-29 go above 7.0 for the seqs in ``high``; everyone else stays at 6.5."""
    return 7.5 if device < 30 and seq in high else 6.5


def _names(devices: range) -> list[str]:
    return [f"esp32-{d:05d}" for d in devices]


def test_three_instances_store_every_reading_once_and_alert_once(
    cluster: Cluster,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    hooks: HookServer,
) -> None:
    cluster.start()
    watcher = Watcher(mosquitto)
    publisher = Publisher(mosquitto, cluster.prefix)
    devices, per_device = 300, 100
    try:
        for seq in range(per_device):
            for d, device in enumerate(_names(range(devices))):
                publisher.send(device, seq, _ph(d, seq, range(20, 40)))
        found = seqs_in_victoria(victoria_metrics, cluster.prefix, devices * per_device, 120)
        assert len(found) == devices * per_device
        assert all(len(stamps) == 1 for stamps in found.values()), "a reading stored twice"

        alerting = _names(range(30))
        wait_for(lambda: len(watcher.events("resolved")) >= 30, "30 resolutions", 60)
        wait_for(lambda: len(lines(hooks, "hook")) >= 60, "60 notifications", 60)
        time.sleep(2.0)  # a duplicate would show by now
        for kind in ("firing", "resolved"):
            published = sorted(e["device"] for e in watcher.events(kind))
            assert published == alerting, f"each {kind} published exactly once"
        notified = sorted(lines(hooks, "hook"))
        assert notified == sorted(
            [f"firing {d}" for d in alerting] + [f"resolved {d}" for d in alerting]
        )

        # every instance took part: each stored readings and owned partitions
        for name, daemon in cluster.instances.items():
            assert daemon.metric("ingestd_messages_accepted_total") > 0, name
            assert daemon.metric("ingestd_cluster_partitions") >= 1, name
        status = cli(cluster.instances["a"], "status", "--cluster")
        assert f"all {PARTITIONS} partitions owned" in status, status
        for name in ("a", "b", "c"):
            assert any(line.split()[:1] == [name] for line in status.splitlines()), status
        rounds = sum(
            d.metric("ingestd_cluster_redis_round_trips_total") for d in cluster.instances.values()
        )
        print(
            f"Redis round trips per reading (cluster only): {rounds / (devices * per_device):.3f}"
        )
        for daemon in cluster.instances.values():
            assert daemon.terminate() == 0, daemon.log()
    finally:
        publisher.close()
        watcher.close()


def test_an_instance_killed_mid_stream_loses_nothing_and_its_deadman_timers_move(
    cluster: Cluster,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    hooks: HookServer,
) -> None:
    cluster.start()
    owned_by_b = [p for p, owner in cluster.owners().items() if owner == "b"]
    assert owned_by_b
    # A device whose deadman timer instance b runs: it falls silent when b dies.
    quiet = next(
        name for n in range(1000) if partition_of(name := f"quiet-{n}", PARTITIONS) in owned_by_b
    )
    watcher = Watcher(mosquitto)
    publisher = Publisher(mosquitto, cluster.prefix)
    devices, per_device = 200, 60
    names = _names(range(devices))
    try:
        for seq in range(per_device):
            if seq == per_device // 2:
                time.sleep(1.0)  # b has taken its share and evaluated the quiet device
                cluster.instances["b"].kill()
                killed_at = time.monotonic()
            elif seq < per_device // 2:
                publisher.send(quiet, seq, 6.5)
            for d, device in enumerate(names):
                publisher.send(device, seq, _ph(d, seq, range(40, 50)))

        wait_for(lambda: cluster.balanced({"a", "c"}), "b's partitions taken over", 15)
        moved_after = time.monotonic() - killed_at
        wait_for(
            lambda: any(e["device"] == quiet for e in watcher.events("firing")),
            "the quiet device's deadman alert, from b's successor",
            15,
        )
        # b comes back (systemd restarts it): its session's messages and its spool arrive
        cluster.instances["b"].start()
        found = seqs_in_victoria(victoria_metrics, cluster.prefix, devices * per_device, 120)
        expected = {(device, float(seq)) for device in names for seq in range(per_device)}
        assert expected <= set(found), sorted(expected - set(found))[:5]
        # a redelivered reading keeps its timestamp: at most overwrites itself
        assert all(len(set(stamps)) == 1 for stamps in found.values())

        alerting = names[:30]
        wait_for(lambda: len(watcher.events("resolved")) >= 30, "30 resolutions", 60)
        time.sleep(2.0)
        fired = Counter(e["device"] for e in watcher.events("firing") if e["rule"] == "ph_high")
        resolved = Counter(e["device"] for e in watcher.events("resolved"))
        assert set(fired) == set(alerting) and set(resolved) >= set(alerting)
        deadman = [e for e in watcher.events("firing") if e["rule"] == "silent"]
        assert [e["device"] for e in deadman] == [quiet], "the deadman fired once, elsewhere"
        notified = Counter(lines(hooks, "hook"))
        assert {f"firing {d}" for d in alerting} <= set(notified)
        assert notified[f"firing {quiet}"] == 1
        print(f"partitions moved {moved_after:.1f}s after the kill (lease 3s)")
    finally:
        publisher.close()
        watcher.close()


def test_redis_restarted_without_its_data_neither_loses_nor_doubles_an_alert(
    cluster: Cluster,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    hooks: HookServer,
) -> None:
    cluster.start()
    watcher = Watcher(mosquitto)
    publisher = Publisher(mosquitto, cluster.prefix)
    devices = 100
    names = _names(range(devices))
    try:
        for seq in range(20):  # devices 0-9 go high
            for d, device in enumerate(names):
                publisher.send(device, seq, 7.5 if d < 10 and seq >= 10 else 6.5)
        wait_for(lambda: len(watcher.events("firing")) >= 10, "10 alerts firing", 30)
        time.sleep(1.0)  # every transition saved in Redis
        cluster.redis.restart()  # no persistence: every lease, stream and state is gone
        for seq in range(20, 60):  # 0-9 back to normal, 10-19 go high
            for d, device in enumerate(names):
                high = (d < 10 and seq < 30) or (10 <= d < 20 and seq >= 40)
                publisher.send(device, seq, 7.5 if high else 6.5)
        wait_for(lambda: len(watcher.events("resolved")) >= 10, "0-9 resolved", 60)
        wait_for(lambda: len(watcher.events("firing")) >= 20, "10-19 firing", 60)
        wait_for(lambda: cluster.balanced({"a", "b", "c"}), "every partition owned again", 30)
        found = seqs_in_victoria(victoria_metrics, cluster.prefix, devices * 60, 120)
        assert len(found) == devices * 60
        time.sleep(2.0)  # a duplicate would show by now
        firing = sorted(e["device"] for e in watcher.events("firing"))
        resolved = sorted(e["device"] for e in watcher.events("resolved"))
        assert firing == names[:20], "each alert fired exactly once"
        assert resolved == names[:10], "each alert resolved exactly once, by the same owner"
        wait_for(lambda: len(lines(hooks, "hook")) >= 30, "30 notifications", 30)
        notified = sorted(lines(hooks, "hook"))
        assert notified == sorted(
            [f"firing {d}" for d in names[:20]] + [f"resolved {d}" for d in names[:10]]
        )
    finally:
        publisher.close()
        watcher.close()
