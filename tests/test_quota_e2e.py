"""Quotas end to end: real broker, ingestd processes, VictoriaMetrics and Redis."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory
from daemon import REPO, DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, Redis, VictoriaMetrics

from ingestd.cli import main
from ingestd.simulate import Fleet

RATE, BURST = 20, 20


def quota_config(tmp: Path, broker: str, tsdb: str, prefix: str, **extra: Any) -> dict[str, Any]:
    quotas = {
        "rules": [
            {
                "name": f"q{prefix}",
                "topic": f"{prefix}/+/{{device}}/#",
                "rate": RATE,
                "burst": BURST,
            }
        ],
        "notice_interval": "2s",
        **extra.pop("quotas", {}),
    }
    return daemon_config(tmp, broker, prefix, {"url": tsdb}, quotas=quotas, **extra)


def stored(vm: VictoriaMetrics, prefix: str, device: str) -> list[int]:
    """Receipt timestamps (ms) of the device's readings in VictoriaMetrics."""
    vm.flush()
    series = vm.export(f'reservoir_seq{{farm="{prefix}",device="{device}"}}')
    return sorted(t for s in series for t in s["timestamps"])


def assert_quota_held(stamps: list[int], label: str) -> None:
    """GCRA: over the span of accepted readings, burst + rate * span of them, within 5 %."""
    span = (stamps[-1] - stamps[0]) / 1000
    expected = BURST + RATE * span
    assert span >= 10, f"{label}: measured over {span:.1f}s only"
    assert abs(len(stamps) - expected) <= 0.05 * expected, (
        f"{label}: {len(stamps)} accepted over {span:.1f}s, quota allows {expected:.0f}"
    )


def run_fleets(*fleets: tuple[Fleet, float, int]) -> None:
    threads = [threading.Thread(target=f.run, args=(rate, count)) for f, rate, count in fleets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()


def test_a_flooding_device_gets_its_quota_and_its_neighbour_loses_nothing(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"q{unique}"
    daemon = DaemonProcess(
        tmp_path, quota_config(tmp_path, mosquitto.url, victoria_metrics.url, prefix)
    ).start()
    notices: list[dict[str, Any]] = []
    watcher = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    watcher.on_message = lambda c, u, m: notices.append(orjson.loads(m.payload))
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    watcher.connect(host, int(port))
    watcher.subscribe("ingestd/quota/esp32-00000", qos=1)
    watcher.loop_start()
    try:
        flood = Fleet(mosquitto.url, devices=1, prefix=prefix)  # esp32-00000: 10x its rate
        neighbour = Fleet(mosquitto.url, devices=1, prefix=prefix, first=1)  # esp32-00001
        lag: list[float] = []
        sampling = threading.Event()

        def sample_lag() -> None:
            while not sampling.is_set():
                lag.append(daemon.metric("ingestd_lag_seconds"))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample_lag)
        sampler.start()
        run_fleets((flood, RATE * 10, RATE * 10 * 12), (neighbour, RATE / 2, RATE // 2 * 12))
        sampling.set()
        sampler.join()

        daemon.wait(
            lambda: len(stored(victoria_metrics, prefix, "esp32-00001")) == RATE // 2 * 12,
            "storing every reading of the neighbour",
        )
        assert_quota_held(stored(victoria_metrics, prefix, "esp32-00000"), "flooding device")
        # the neighbour's lag did not grow while its flooding neighbour was throttled
        assert max(lag[len(lag) // 2 :]) <= max(lag[: len(lag) // 2]) + 1.0, lag
        dropped = daemon.metric(
            f'ingestd_quota_dropped_total{{device="esp32-00000",limit="rate",rule="q{prefix}"}}'
        )
        assert dropped > RATE * 10 * 12 * 0.8
        assert not any("esp32-00001" in k for k in daemon.metrics() if "quota_dropped" in k)
        # told at most once per notice window (2 s) over the ~12 s flood, with its counts
        daemon.wait(lambda: len(notices) >= 2, "publishing throttle notices")
        assert len(notices) <= 12 / 2 + 2
        assert notices[0]["device"] == "esp32-00000" and notices[0]["limit"] == "rate"
        assert sum(n["dropped"] for n in notices) <= dropped
        # ingestd quotas lists the throttled device now (its drops are recent)
        listing = subprocess.run(
            [sys.executable, "-m", "ingestd", "quotas", "--config", str(daemon.config_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        ).stdout
        assert "esp32-00000" in listing and "esp32-00001" not in listing
        assert daemon.terminate() == 0
    finally:
        watcher.loop_stop()
        watcher.disconnect()
        daemon.close()


def test_two_instances_share_one_quota_per_device_through_redis_and_survive_its_outage(
    tmp_path: Path,
    services: ServiceFactory,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    redis: Redis = services.redis()
    prefix = f"r{unique}"
    daemons = []
    for name in ("a", "b"):
        config = quota_config(
            tmp_path / name,
            mosquitto.url,
            victoria_metrics.url,
            prefix,
            quotas={"backend": "redis", "redis_timeout": "200ms", "redis_retry": "300ms"},
            redis={"url": redis.url},
            mqtt={"share_group": f"g{unique}"},
        )
        daemons.append(DaemonProcess(tmp_path / name, config).start())
    try:
        # One device at 10x its quota, its messages shared between the two instances:
        # together they accept one quota, not two.
        run_fleets((Fleet(mosquitto.url, devices=1, prefix=prefix), RATE * 10, RATE * 10 * 12))
        for d in daemons:
            d.wait(lambda d=d: d.metric("ingestd_spool_records") == 0, "drained")
        assert all(d.metric("ingestd_messages_received_total") > 500 for d in daemons)
        assert all(d.metric("ingestd_quota_shared") == 1 for d in daemons)
        assert_quota_held(stored(victoria_metrics, prefix, "esp32-00000"), "two instances")

        # Redis goes away: ingestion goes on under local limits, and says so.
        redis.stop()
        outage = Fleet(mosquitto.url, devices=1, prefix=prefix, first=2)  # esp32-00002
        outage_thread = threading.Thread(target=outage.run, args=(RATE * 5, RATE * 5 * 6))
        outage_thread.start()
        for d in daemons:
            d.wait(lambda d=d: d.metric("ingestd_quota_shared") == 0, "falling back")
            status, report = d.health()
            assert status == 503 and "local limits" in report["components"]["quota"]["detail"]
        outage_thread.join(60)
        accepted_in_outage = len(stored(victoria_metrics, prefix, "esp32-00002"))
        assert accepted_in_outage > 0  # ingestion never stalled on Redis
        # each instance enforced the quota locally: at most twice the shared quota
        assert accepted_in_outage <= 2 * (BURST + RATE * 6) * 1.05

        # Redis is back: shared limits resume by themselves.
        redis.start()
        after = Fleet(mosquitto.url, devices=1, prefix=prefix, first=3)  # esp32-00003
        after_thread = threading.Thread(target=after.run, args=(RATE * 10, RATE * 10 * 12))
        after_thread.start()
        for d in daemons:
            d.wait(lambda d=d: d.metric("ingestd_quota_shared") == 1, "back on shared limits")
            d.wait(lambda d=d: d.health()[0] == 200, "healthy again")
        after_thread.join(60)
        for d in daemons:
            d.wait(lambda d=d: d.metric("ingestd_spool_records") == 0, "drained")
        assert_quota_held(stored(victoria_metrics, prefix, "esp32-00003"), "after the outage")
        for d in daemons:
            assert d.terminate() == 0
    finally:
        for d in daemons:
            d.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_registry_quota_limits_its_device_with_no_quota_rule(  # noqa: PLR0917 - fixtures
    tmp_path: Path,
    services: ServiceFactory,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    pg_url: str,
    unique: str,
    backend: str,
) -> None:
    """The audit's case: `devices add --quota-rate 1 --quota-burst N` on a daemon without
    quota rules. The device gets burst + rate x span of a flood; its unregistered neighbour
    loses nothing; the drops say rule 'registry'."""
    prefix = f"g{unique}"
    rate, burst = 1, 5
    quotas: dict[str, Any] = {"notice_interval": "2s", "backend": backend}
    more: dict[str, Any] = {}
    if backend == "redis":
        more["redis"] = {"url": services.redis().url}
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": victoria_metrics.url},
        quotas=quotas,
        postgres={"url": pg_url, "connect_timeout": "1s", "retry": "300ms"},
        **more,
    )
    daemon = DaemonProcess(tmp_path, config)
    flooder, neighbour = "esp32-00000", "esp32-00001"
    added = main(
        [
            "devices",
            "add",
            flooder,
            "--quota-rate",
            str(rate),
            "--quota-burst",
            str(burst),
            "--config",
            str(daemon.config_path),
        ]
    )
    assert added == 0
    daemon.start()
    try:
        assert daemon.metric("ingestd_registry_devices") == 1
        flood = Fleet(mosquitto.url, devices=1, prefix=prefix)  # 20x its rate
        calm = Fleet(mosquitto.url, devices=1, prefix=prefix, first=1)  # not in the registry
        run_fleets((flood, 20, 20 * 12), (calm, 5, 5 * 12))
        daemon.wait(
            lambda: len(stored(victoria_metrics, prefix, neighbour)) == 5 * 12,
            "storing every reading of the unregistered neighbour",
        )
        daemon.wait(
            lambda: daemon.metric("ingestd_messages_received_total") == 25 * 12, "every message"
        )
        daemon.wait(lambda: daemon.metric("ingestd_spool_records") == 0, "drained")
        stamps = stored(victoria_metrics, prefix, flooder)
        span = (stamps[-1] - stamps[0]) / 1000
        expected = burst + rate * span
        assert span >= 10, stamps
        assert abs(len(stamps) - expected) <= 2, (len(stamps), span)
        dropped = daemon.metric(
            f'ingestd_quota_dropped_total{{device="{flooder}",limit="rate",rule="registry"}}'
        )
        assert dropped == 20 * 12 - len(stamps)
        assert not any(neighbour in k for k in daemon.metrics() if "quota_dropped" in k)
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["quotas", "--config", str(daemon.config_path)]) == 0
        (row,) = [line.split() for line in out.getvalue().splitlines() if flooder in line]
        assert row[:3] == [flooder, "registry", "rate"]
        assert daemon.terminate() == 0
    finally:
        daemon.close()
