"""What awaits its commit is bounded in bytes: a full spool cannot grow the daemon's memory.

64 KiB readings at QoS 1 and QoS 0 (which the broker's Receive Maximum does not limit) while
the TSDB is down and the spool's disk budget is full: the daemon stops reading the broker
once ``mqtt.max_unacked_bytes`` awaits a commit, its peak RSS stays within that budget plus
a fixed overhead, and when the TSDB is back every reading arrives.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory
from daemon import DaemonProcess, daemon_config, seqs_in_victoria
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, Redis

MiB = 1 << 20
BUDGET = 16 * MiB
OVERHEAD = 40 * MiB
"""What the daemon may take above its idle peak besides the budget, whatever the budget:
the drainer's batch (4 MiB of lines, joined, compressed), a record being written and one
being read (1 MiB each, a few copies), the message being decoded, and the allocator's
slack in each thread's arena. Measured: 23-34 MiB over budgets of 4, 16 and 32 MiB."""
BLOB = 60 * 1024
"""Bytes of text per reading (a string field): lines of ~60 KiB, under the 64 KiB guard."""
PER_QOS = 600
"""Readings at each QoS: 70 MiB in all, four times the budget."""


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def publish(broker: Mosquitto, messages: list[tuple[str, bytes, int]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos) for topic, payload, qos in messages]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("quotas", ["memory", "redis"])
def test_big_readings_with_the_tsdb_down_and_the_spool_full_stay_within_the_byte_budget(
    tmp_path: Path,
    services: ServiceFactory,
    redis_server: Redis,
    unique: str,
    quotas: str,
) -> None:
    """With ``quotas.backend: redis`` readings also wait in the gate for Redis' verdict."""
    tsdb = services.victoria_metrics()
    mosquitto = services.mosquitto()  # its own: it holds ~70 MiB of readings for us
    farm = f"m{unique}"
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        farm,
        {"url": tsdb.url, "backoff_max": "300ms", "timeout": "1s"},
        spool={"max_bytes": "1MiB"},
        mqtt={"max_unacked_bytes": BUDGET},
        redis={"url": redis_server.url},
        quotas={
            "backend": quotas,
            "rules": [{"name": "all", "topic": f"{farm}/+/{{device}}/#", "rate": 100_000}],
        },
    )
    config["mqtt"]["subscriptions"][0]["string_fields"] = ["blob"]
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        topic = f"{farm}/site1/esp32-{{:05d}}/reservoir"
        warmup = [(topic.format(0), orjson.dumps({"seq": n, "blob": "x"}), 1) for n in range(5)]
        publish(mosquitto, warmup)
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 5, "warmed up")
        assert daemon.process is not None
        idle = peak_rss(daemon.process.pid)

        tsdb.stop()
        big = [
            (topic.format(qos + 1), orjson.dumps({"seq": n, "blob": f"{n:0{BLOB}d}"}), qos)
            for n in range(PER_QOS)
            for qos in (1, 0)
        ]
        publish(mosquitto, big)
        daemon.wait(lambda: daemon.metric("ingestd_spool_full") == 1, "reporting a full spool")
        daemon.wait(
            lambda: (
                daemon.metric("ingestd_intake_paused") == 1
                or daemon.metric("ingestd_messages_received_total") == len(warmup) + len(big)
            ),
            "paused, or holding everything",
        )
        outage = peak_rss(daemon.process.pid)
        held = daemon.metric("ingestd_messages_received_total") - len(warmup)
        print(f"\nidle peak {idle / MiB:.1f} MiB, peak in the outage {outage / MiB:.1f} MiB")
        assert outage - idle <= BUDGET + OVERHEAD, (
            f"peak RSS {outage / MiB:.1f} MiB, idle {idle / MiB:.1f} MiB: more than the"
            f" budget ({BUDGET / MiB:.0f} MiB) + {OVERHEAD / MiB:.0f} MiB, {held:.0f} held"
        )
        assert held < len(big), "nothing was left with the broker"

        tsdb.start()
        found = seqs_in_victoria(tsdb, farm, len(warmup) + len(big), timeout=120)
        assert found.keys() == {("esp32-00000", float(n)) for n in range(5)} | {
            (f"esp32-{qos + 1:05d}", float(n)) for n in range(PER_QOS) for qos in (1, 0)
        }
        final = peak_rss(daemon.process.pid)
        print(f"\npeak over the whole run {final / MiB:.1f} MiB")
        assert final - idle <= BUDGET + OVERHEAD, f"peak RSS {final / MiB:.1f} MiB after the outage"
        assert daemon.terminate() == 0
    finally:
        daemon.close()
