"""Notifications end to end: real Mosquitto, ingestd as a process, real Apprise, a local
webhook receiver and a local SMTP server. Readings in over MQTT; alerts out on MQTT and
through the notification channels; channels that fail, hang or come back; a daemon
killed with notifications pending."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from daemon import REPO, DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion
from services import Mosquitto, VictoriaMetrics
from test_alerts_e2e import Watcher, reading, wait_for
from test_notify_endpoints import HookServer, MailServer

COMPACT = "{% for e in events %}{{ e.kind }} {{ e.device }}\n{% endfor %}"
HANG = 60.0  # "a channel that hangs for a minute" (issue 6)
RULES = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 7.0
    clear: {{below: 6.8}}
    severity: critical
    annotations:
      summary: "pH {{{{ value }}}} on {{{{ device }}}}"
"""


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()


@dataclass(frozen=True)
class SecretChannels:
    hooks: HookServer
    mail: MailServer
    token: str


@pytest.fixture
def secret_channels(
    tmp_path: Path, hooks: HookServer, unique: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SecretChannels]:
    """Channels ``hook`` (its URL holds a token) and ``mail``, from the secret file
    notify__channels in $CREDENTIALS_DIRECTORY, which the daemon and the CLI inherit."""
    mail = MailServer()
    token = f"tok{unique}SECRET"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    hook_url = f"json://ingestd:{token}@127.0.0.1:{hooks.port}/hook"
    (secrets / "notify__channels").write_text(f"hook: '{hook_url}'\nmail: '{mail.url()}'\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(secrets))
    yield SecretChannels(hooks, mail, token)
    mail.close()


def start(
    tmp: Path, broker: Mosquitto, tsdb: VictoriaMetrics, prefix: str, notify: dict[str, Any]
) -> DaemonProcess:
    rules = tmp / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "farm.yaml").write_text(RULES.format(farm=prefix))
    config = daemon_config(
        tmp,
        broker.url,
        prefix,
        {"url": tsdb.url},
        rules={"dir": str(rules), "watch_interval": "1s"},
        notify=notify,
    )
    return DaemonProcess(tmp, config).start()


def fast_retries(**values: Any) -> dict[str, Any]:
    """Test-sized retry timings (the defaults are minutes)."""
    return {
        "retry_min": "200ms",
        "retry_max": "1s",
        "breaker_failures": 3,
        "breaker_cooldown": "1s",
        **values,
    }


def route(channels: list[str], **values: Any) -> dict[str, Any]:
    return {"name": "ops", "channels": channels, "group_window": "0s", "body": COMPACT, **values}


def lines(hooks: HookServer, path: str) -> list[str]:
    return [line for m in hooks.delivered(path) for line in m["message"].splitlines() if line]


def cli(daemon: DaemonProcess, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout


def test_alerts_reach_http_and_smtp_channels_and_tokens_never_show(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
    secret_channels: SecretChannels,
) -> None:
    hooks, mail, token = secret_channels.hooks, secret_channels.mail, secret_channels.token
    prefix = f"n{unique}"
    notify = {
        **fast_retries(),
        "routes": [{"name": "ops", "channels": ["hook", "mail"], "group_window": "0s"}],
    }
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix, notify)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "tank-1", ph=7.4)
        wait_for(lambda: hooks.delivered("hook") and mail.mails(), "both notifications")
        alert = watcher.events("firing")[0]["id"]
        (firing,) = hooks.delivered("hook")
        assert firing["title"] == "[CRITICAL] FIRING ph_high on tank-1 (site1): ph 7.4, threshold 7"
        assert f"-t alerts/ack/{alert}/YOU -m 'optional note'" in firing["message"]
        assert f"ingestd alerts ack {alert}" in firing["message"]
        assert "Where: site site1, device tank-1" in firing["message"]
        ((subject, text),) = mail.mails()
        assert subject == firing["title"] and "pH 7.4 on tank-1" in text

        watcher.publish(f"alerts/ack/{alert}/night-shift", b"")
        wait_for(lambda: len(hooks.delivered("hook")) == 2, "the acknowledgement")
        reading(watcher, prefix, "tank-1", ph=6.5)
        wait_for(lambda: len(hooks.delivered("hook")) == 3, "the resolution")
        wait_for(lambda: len(mail.mails()) == 3, "acknowledgement and resolution by mail")
        titles = [m["title"] for m in hooks.delivered("hook")]
        assert titles[1] == "[ACK] ph_high on tank-1 (site1) by night-shift"
        assert titles[2] == "[RESOLVED] ph_high on tank-1 (site1): ph 6.5"
        assert [subject for subject, _ in mail.mails()] == titles
        for channel in ("hook", "mail"):  # recorded just after the endpoint answered
            sent = f'ingestd_notifications_sent_total{{channel="{channel}"}}'
            wait_for(lambda s=sent: daemon.metric(s) == 3, f"{channel}'s deliveries recorded")
        assert daemon.metric('ingestd_notifications_pending{channel="hook"}') == 0

        status = cli(daemon, "notify", "status")
        assert "0 pending, 0 failed" in status
        assert "json://127.0.0.1" in status and "mailto://127.0.0.1" in status
        show = cli(daemon, "check", "--show")
        metrics = daemon.metrics()
        for text_ in (status, show, str(metrics)):
            assert token not in text_
        assert daemon.terminate() == 0
        assert token not in daemon.log_path.read_text()
    finally:
        watcher.close()
        daemon.close()


class Arrivals:
    """When each firing alert event arrived on MQTT, by device (monotonic time)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.at: dict[str, float] = {}
        self._lock = threading.Lock()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        host, port = broker.url.removeprefix("mqtt://").split(":")
        self.client.connect(host, int(port))
        self.client.subscribe("alerts/critical/#", qos=1)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.payload:
            event = orjson.loads(msg.payload)
            with self._lock:
                self.at.setdefault(event["device"], time.monotonic())

    def seen(self, device: str) -> float | None:
        with self._lock:
            return self.at.get(device)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_hung_channel_slows_neither_ingestion_nor_alert_publication(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
    hooks: HookServer,
) -> None:
    prefix = f"g{unique}"
    call_timeout = 2.0  # the per-call deadline: each call to the hung channel gives up after it
    notify = {
        **fast_retries(breaker_failures=2),
        "call_timeout": f"{call_timeout}s",
        "channels": {"good": hooks.url("good"), "hung": hooks.url("hung")},
        "routes": [route(["good", "hung"])],
    }
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix, notify)
    arrivals = Arrivals(mosquitto)
    publisher = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    publisher.max_inflight_messages_set(1000)
    host, port = mosquitto.url.removeprefix("mqtt://").split(":")
    publisher.connect(host, int(port))
    publisher.loop_start()

    def ingest_seconds(count: int) -> float:
        """Time to have ``count`` readings accepted (spooled) by ingestd."""
        before = daemon.metric("ingestd_messages_accepted_total")
        started = time.monotonic()
        for n in range(count):
            topic = f"{prefix}/site1/load-{n % 20}/reservoir"
            publisher.publish(topic, orjson.dumps({"ph": 6.5, "n": n}), qos=1)
        daemon.wait(
            lambda: daemon.metric("ingestd_messages_accepted_total") >= before + count,
            f"{count} readings accepted",
            timeout=60,
        )
        return time.monotonic() - started

    def alert_latencies(tag: str, count: int) -> list[float]:
        """Reading published -> firing alert event on MQTT, for ``count`` new alerts."""
        found = []
        for n in range(count):
            device = f"{tag}-{n}"
            sent = time.monotonic()
            publisher.publish(f"{prefix}/site1/{device}/reservoir", b'{"ph": 7.6}', qos=1)
            wait_for(lambda d=device: arrivals.seen(d) is not None, f"the alert of {device}")
            seen = arrivals.seen(device)
            assert seen is not None
            found.append(seen - sent)
            time.sleep(0.1)
        return found

    try:
        ingest_seconds(500)  # warm up
        healthy_ingest = ingest_seconds(4000)
        healthy_alerts = alert_latencies("calm", 6)
        wait_for(lambda: len(lines(hooks, "hung")) == 6, "the healthy run's notifications")

        # The channel hangs for a minute: every call stays unanswered until it is set again.
        hooks.set("hung", "hang", hang=2 * HANG)
        hang_ends = time.monotonic() + HANG
        reading_before = hooks.arrivals("hung")
        alert_latencies("first", 1)
        wait_for(lambda: hooks.arrivals("hung") > reading_before, "a call to the hung channel")
        hung_ingest = [ingest_seconds(4000)]
        hung_alerts = alert_latencies("stuck", 6)
        wait_for(
            lambda: daemon.metric('ingestd_notifications_retried_total{channel="hung"}') >= 1,
            "the hung channel's calls failing on their deadline",
        )
        # the other channel of the same route is served all along
        wait_for(lambda: len(lines(hooks, "good")) == 13, "the good channel, during the hang")
        # ... and so on through the minute, its breaker open and probing the hung channel
        calls_before = hooks.arrivals("hung")
        late = []
        for n, before_end in enumerate((40, 20, 8)):  # seconds before the hang ends
            time.sleep(max(0.0, hang_ends - before_end - time.monotonic()))
            hung_ingest.append(ingest_seconds(4000))
            hung_alerts += alert_latencies(f"late{n}", 3)
            late += [f"firing late{n}-{i}" for i in range(3)]
        fired = 13 + len(late)
        wait_for(lambda: len(lines(hooks, "good")) == fired, "the good channel, late in the hang")
        assert hooks.arrivals("hung") > calls_before, "the hung channel was probed all along"

        # unaffected, compared with the healthy run of this same test
        assert max(hung_ingest) <= healthy_ingest * 3, (healthy_ingest, hung_ingest)
        assert statistics.median(hung_alerts) <= 3 * statistics.median(healthy_alerts) + 0.1, (
            healthy_alerts,
            hung_alerts,
        )
        assert max(hung_alerts) < call_timeout, "an alert waited for a notification call"

        assert time.monotonic() < hang_ends, "the checks above ran during the hang"
        time.sleep(hang_ends - time.monotonic())
        assert len(lines(hooks, "hung")) == 6, "nothing got through the hang"
        hooks.set("hung", "ok")  # the channel answers again, a minute later
        answered = time.monotonic()
        expected = sorted(
            [f"firing calm-{n}" for n in range(6)]
            + ["firing first-0"]
            + [f"firing stuck-{n}" for n in range(6)]
            + late
        )
        wait_for(lambda: len(lines(hooks, "hung")) >= fired, "the hung channel's notifications")
        # when it answers: its breaker's next probe (breaker_cooldown 1s), then the rest
        assert time.monotonic() - answered < 10, "the notifications came late"
        time.sleep(1.0)  # a duplicate would show by now
        assert sorted(lines(hooks, "hung")) == expected, "each exactly once"
        assert sorted(lines(hooks, "good")) == expected, "no duplicates on the good channel"
        assert daemon.terminate() == 0
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        arrivals.close()
        daemon.close()


def test_a_channel_down_then_back_gets_each_notification_once_resolution_included(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
    hooks: HookServer,
) -> None:
    prefix = f"d{unique}"
    hooks.set("flaky", "fail")
    notify = {
        **fast_retries(),
        "channels": {"good": hooks.url("good"), "flaky": hooks.url("flaky")},
        "routes": [route(["good", "flaky"])],
    }
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix, notify)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "tank-1", ph=7.5)
        reading(watcher, prefix, "tank-2", ph=7.5)
        wait_for(lambda: len(lines(hooks, "good")) == 2, "the firings on the good channel")
        reading(watcher, prefix, "tank-1", ph=6.5)  # resolved while its firing is retried
        expected = ["firing tank-1", "firing tank-2", "resolved tank-1"]
        wait_for(lambda: lines(hooks, "good") == expected, "the resolution on the good channel")
        wait_for(
            lambda: daemon.metric('ingestd_notify_breaker_open{channel="flaky"}') == 1,
            "the flaky channel's breaker open",
        )
        time.sleep(2.0)  # down a while: probed, not hammered
        attempts = len(hooks.posts("flaky"))
        assert 3 <= attempts <= 8, attempts
        assert "open" in cli(daemon, "notify", "status")

        hooks.set("flaky", "ok")
        wait_for(lambda: len(lines(hooks, "flaky")) >= 3, "the flaky channel back")
        time.sleep(1.5)  # a duplicate would show by now
        assert lines(hooks, "flaky") == expected, "each once, the firing before its resolution"
        assert lines(hooks, "good") == expected, "the healthy channel got no duplicates"
        assert daemon.metric('ingestd_notifications_retried_total{channel="flaky"}') >= 3
        assert daemon.metric('ingestd_notify_breaker_open{channel="flaky"}') == 0
        assert daemon.metric('ingestd_notifications_pending{channel="flaky"}') == 0
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_daemon_killed_with_notifications_pending_delivers_them_once_after_restart(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
    hooks: HookServer,
) -> None:
    prefix = f"k{unique}"
    hooks.set("flaky", "fail")
    notify = {
        **fast_retries(),
        "channels": {"good": hooks.url("good"), "flaky": hooks.url("flaky")},
        "routes": [route(["good", "flaky"])],
    }
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix, notify)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "tank-1", ph=7.5)
        reading(watcher, prefix, "tank-2", ph=7.5)
        reading(watcher, prefix, "tank-1", ph=6.5)
        expected = ["firing tank-1", "firing tank-2", "resolved tank-1"]
        wait_for(
            lambda: daemon.metric('ingestd_notifications_sent_total{channel="good"}') == 3,
            "the good channel's deliveries recorded",
        )
        wait_for(
            lambda: daemon.metric('ingestd_notifications_pending{channel="flaky"}') == 3,
            "three notifications pending on the flaky channel",
        )
        pending = orjson.loads(cli(daemon, "notify", "status", "--json"))
        assert pending["pending"] == 3

        daemon.kill()  # SIGKILL: no shutdown, nothing flushed
        hooks.set("flaky", "ok")
        daemon.start()
        wait_for(lambda: len(lines(hooks, "flaky")) >= 3, "the pending notifications delivered")
        time.sleep(1.5)  # a duplicate would show by now
        assert lines(hooks, "flaky") == expected, "each once, after the restart"
        assert lines(hooks, "good") == expected, "nothing delivered before the kill went again"
        assert orjson.loads(cli(daemon, "notify", "status", "--json"))["pending"] == 0
        assert len(watcher.events("firing")) == 2, "the restart re-announced nothing"
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()
