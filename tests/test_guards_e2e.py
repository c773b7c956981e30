"""What one device may do to the rest, end to end (a daemon, the broker, VictoriaMetrics,
Redis, PostgreSQL): the series cap (too_many_series) and the site a device may claim
(site_mismatch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import psycopg
from daemon import REPO, DaemonProcess, daemon_config
from services import Mosquitto, Redis, VictoriaMetrics, http_request
from test_alerts_e2e import Watcher, wait_for
from test_store_e2e import _cli

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


SITE_RULE = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 7.0
    clear: {{below: 6.8}}
    severity: warning
"""


def test_a_device_cannot_claim_another_site_than_the_registry_knows(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    pg_url: str,
    unique: str,
) -> None:
    """The registry knows dev1 at gh1: its reading under gh2 is a dead letter site_mismatch,
    stored nowhere and raising no alert under gh2. With registry.unknown register a new
    device is recorded at the site of its first message, and held to it."""
    prefix = f"g{unique}"
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "farm.yaml").write_text(SITE_RULE.format(farm=prefix))
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": victoria_metrics.url},
        postgres={"url": pg_url, "connect_timeout": "1s", "retry": "300ms"},
        registry={"unknown": "register"},
        rules={"dir": str(rules), "watch_interval": "200ms"},
    )
    daemon = DaemonProcess(tmp_path, config)
    code, out = _cli(daemon.config_path, "devices", "add", "dev1", "--site", "gh1")
    assert code == 0, out
    daemon.start()
    watcher = Watcher(mosquitto)
    try:
        watcher.publish(f"{prefix}/gh1/dev1/reservoir", orjson.dumps({"ph": 6.5}))
        watcher.publish(f"{prefix}/gh2/dev1/reservoir", orjson.dumps({"ph": 9.0}))  # a lie
        watcher.publish(f"{prefix}/gh1/roamer/reservoir", orjson.dumps({"ph": 6.6}))
        wait_for(
            lambda: daemon.metric("ingestd_registry_registered_total") == 1, "roamer registered"
        )
        watcher.publish(f"{prefix}/gh3/roamer/reservoir", orjson.dumps({"ph": 9.1}))  # a lie
        watcher.publish(f"{prefix}/gh1/dev1/reservoir", orjson.dumps({"ph": 7.5}))  # true
        wait_for(
            lambda: daemon.metric('ingestd_messages_rejected_total{reason="site_mismatch"}') == 2,
            "two dead letters site_mismatch",
        )
        wait_for(lambda: watcher.events("firing"), "the alert at the true site")
        letters = _deadletters(daemon, "site_mismatch")
        assert "'dev1' is at site 'gh1' in the registry, not 'gh2'" in letters
        assert "'roamer' is at site 'gh1' in the registry, not 'gh3'" in letters
        with psycopg.connect(pg_url, autocommit=True) as conn:
            rows = conn.execute("SELECT id, site_id, auto_registered FROM devices ORDER BY id")
            assert rows.fetchall() == [("dev1", "gh1", False), ("roamer", "gh1", True)]
        # stored only under the true site; the alert fired there and nowhere else
        series = victoria_metrics.export_until(
            f'reservoir_ph{{farm="{prefix}"}}', lambda s: sum(len(x["values"]) for x in s) == 3
        )
        assert {(s["metric"]["device"], s["metric"]["site"]) for s in series} == {
            ("dev1", "gh1"),
            ("roamer", "gh1"),
        }
        assert sorted(v for s in series for v in s["values"]) == [6.5, 6.6, 7.5]
        assert [(e["device"], e["site"]) for e in watcher.events("firing")] == [("dev1", "gh1")]
        assert not [m for m in watcher.messages if "/gh2/" in m[0] or "/gh3/" in m[0]]
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()
