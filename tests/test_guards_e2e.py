"""What one device may do to the rest, end to end (a daemon, the broker, VictoriaMetrics,
Redis, PostgreSQL): the series cap (too_many_series) and the site a device may claim
(site_mismatch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from daemon import REPO, DaemonProcess, daemon_config
from services import Mosquitto, Redis, VictoriaMetrics, http_request
from test_alerts_e2e import Watcher, wait_for

from ingestd.latest import KEY_PREFIX


def _deadletters(daemon: DaemonProcess, reason: str) -> str:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd",
            "deadletters",
            "--config",
            str(daemon.config_path),
            "--reason",
            reason,
            "--limit",
            "1000",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout


def _series(vm: VictoriaMetrics, farm: str, device: str, count: int) -> list[dict[str, Any]]:
    return vm.export_until(
        f'{{farm="{farm}",device="{device}"}}', lambda s: len(s) >= count, timeout=60
    )


def test_a_device_inventing_series_is_capped_and_the_others_are_not(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    redis_server: Redis,
    unique: str,
) -> None:
    """Three devices invent series with the default caps (200 series, 100 tag sets): new
    JSON keys, new measurements (topic level), new line-protocol tag values. Past the cap
    their readings are dead letters too_many_series; a fourth device is not affected; the
    TSDB and the latest values (Redis) hold at most the cap of each."""
    prefix = f"s{unique}"
    fields, measures, tags, good = (f"{kind}-{unique}" for kind in ("keys", "meas", "tags", "good"))
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": victoria_metrics.url},
        redis={"url": redis_server.url},
        latest={"interval": "100ms"},
    )
    config["mqtt"]["subscriptions"].append(
        {"template": "{farm}/{site}/{device}", "topic": f"{prefix}/+/+", "codec": "line"}
    )
    daemon = DaemonProcess(tmp_path, config).start()
    publisher = Watcher(mosquitto, (f"{prefix}-nothing",))
    sent_good = 0
    try:
        for n in range(250):
            if n < 30:  # 10 new keys a message: 20 messages fill the 200
                keys = {f"k{n * 10 + i}": 1.0 for i in range(10)}
                publisher.publish(f"{prefix}/gh1/{fields}/reservoir", orjson.dumps(keys))
            publisher.publish(f"{prefix}/gh1/{measures}/m{n}", orjson.dumps({"v": 1.0}))
            if n < 120:
                publisher.publish(f"{prefix}/gh1/{tags}", f"env,probe=p{n} t=1".encode())
            if n % 5 == 0:
                publisher.publish(f"{prefix}/gh1/{good}/reservoir", orjson.dumps({"ph": n}))
                sent_good += 1
        refused = 10 + 50 + 20
        wait_for(
            lambda: (
                daemon.metric('ingestd_messages_rejected_total{reason="too_many_series"}')
                == refused
            ),
            f"{refused} dead letters too_many_series",
            timeout=60,
        )
        accepted = 20 + 200 + 100 + sent_good
        wait_for(
            lambda: daemon.metric("ingestd_messages_accepted_total") == accepted,
            f"{accepted} messages accepted",
        )
        assert daemon.metric("ingestd_series_capped_devices") == 3
        letters = _deadletters(daemon, "too_many_series")
        assert "guard.max_series_per_device (200)" in letters
        assert "guard.max_tag_sets_per_device (100)" in letters

        # the TSDB: the cap of each, all of the good device's readings
        assert len(_series(victoria_metrics, prefix, fields, 200)) == 200
        assert len(_series(victoria_metrics, prefix, measures, 200)) == 200
        assert len(_series(victoria_metrics, prefix, tags, 100)) == 100
        (ph,) = victoria_metrics.export_until(
            f'reservoir_ph{{farm="{prefix}",device="{good}"}}',
            lambda s: bool(s) and len(s[0]["values"]) == sent_good,
        )
        assert sorted(ph["values"]) == [float(n) for n in range(0, 250, 5)]

        # the latest values (Redis): at most the cap too
        admin = redis_server.client()
        wait_for(lambda: admin.hlen(KEY_PREFIX + measures) == 200, "the latest values")
        assert admin.hlen(KEY_PREFIX + fields) == 200
        answer = http_request("GET", f"{daemon.http}/latest/{measures}").json()
        assert len(answer["values"]) == 200

        # one warning per device
        capped = [line for line in daemon.log().splitlines() if "at its series cap" in line]
        assert sorted(orjson.loads(line)["device"] for line in capped) == sorted(
            [fields, measures, tags]
        )
        assert daemon.terminate() == 0
    finally:
        publisher.close()
        daemon.close()
