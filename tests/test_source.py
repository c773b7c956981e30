"""End to end for the MQTT source: a real broker, ingestd as a real process, real VictoriaMetrics.

Credentials (URL, secret file, refused), TLS, MQTT 3.1.1, shared subscriptions, a changed
topic list taking effect on restart, and the persistent session that queues for us while
ingestd is down.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory, start_service
from daemon import REPO, DaemonProcess, daemon_config, expected_keys, seqs_in_victoria
from services import Mosquitto, ServiceError, VictoriaMetrics, find_binary, free_port, http_request

from ingestd.config import MqttSection, Subscription
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.simulate import Fleet
from ingestd.source import MqttSource

RECEIVED = "ingestd_messages_received_total"
# Room for what ingestd has not yet acknowledged: Mosquitto's default of 1000 queued
# messages per client would drop readings on a busy machine (a broker setting, not ours).


# --- helpers ----------------------------------------------------------------------------


def _mqtt_string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def raw_connack(host: str, port: int, username: str | None, password: str | None) -> int:
    """CONNECT (MQTT 3.1.1, clean session) with optional credentials; the CONNACK return code."""
    flags = 0x02
    payload = _mqtt_string("")  # empty client id: legal with a clean session
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += _mqtt_string(password)
    body = _mqtt_string("MQTT") + bytes([4, flags, 0, 10]) + payload
    assert len(body) < 128, "one-byte remaining length only"
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        connack = sock.recv(4)
        if connack[:2] != b"\x20\x02" or len(connack) != 4:
            raise ServiceError(f"unexpected CONNACK {connack!r}")
        if connack[3] == 0:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return connack[3]


class PasswordMosquitto(Mosquitto):
    """A broker that refuses anonymous clients: ``allow_anonymous false`` + a password file."""

    def __init__(self, username: str, password: str) -> None:
        self.passwd = find_binary("mosquitto_passwd")
        self.username = username
        self.password = password
        super().__init__()

    def _prepare(self) -> None:
        password_file = self.dir / "passwd"
        subprocess.run(
            [self.passwd, "-c", "-b", str(password_file), self.username, self.password],
            check=True,
            capture_output=True,
        )
        # The base config says `allow_anonymous true`; for mosquitto the last setting wins.
        self.extra_config = f"allow_anonymous false\npassword_file {password_file}\n"
        super()._prepare()

    def _probe(self) -> None:
        code = raw_connack(self.host, self.port, self.username, self.password)
        if code != 0:
            raise ServiceError(f"CONNACK return code {code} for valid credentials")


class DaemonWithArgs(DaemonProcess):
    """``ingestd run`` with extra command-line arguments (e.g. ``--secrets-dir``)."""

    def __init__(self, tmp: Path, config: dict[str, Any], extra_args: list[str]) -> None:
        super().__init__(tmp, config)
        self.extra_args = extra_args

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env.pop("CREDENTIALS_DIRECTORY", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ingestd",
                    "run",
                    "--config",
                    str(self.config_path),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        if wait_ready:
            self.wait(
                lambda: http_request("GET", self.http + "/readyz").status == 200,
                "ready (subscribed, spool open)",
            )
        return self


def log_events(daemon: DaemonProcess, since: int = 0) -> list[dict[str, Any]]:
    """The daemon's JSON log lines from byte offset ``since`` on."""
    text = daemon.log_path.read_bytes()[since:].decode(errors="replace")
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def stored_count(vm: VictoriaMetrics, farm: str) -> int:
    vm.flush()
    return sum(len(s["values"]) for s in vm.export(f'reservoir_seq{{farm="{farm}"}}'))


def wait_stored(vm: VictoriaMetrics, farm: str, expected: int, timeout: float = 30) -> None:
    vm.export_until(
        f'reservoir_seq{{farm="{farm}"}}',
        lambda series: sum(len(s["values"]) for s in series) >= expected,
        timeout=timeout,
    )


def assert_exactly_once(
    vm: VictoriaMetrics, farm: str, devices: int, per_device: int
) -> dict[tuple[str, float], list[int]]:
    found = seqs_in_victoria(vm, farm, devices * per_device)
    expected = expected_keys(devices, per_device)
    missing = expected - found.keys()
    assert not missing, f"{len(missing)} readings never arrived, e.g. {sorted(missing)[:5]}"
    assert found.keys() == expected, f"unexpected readings: {sorted(found.keys() - expected)[:5]}"
    twice = {k: v for k, v in found.items() if len(v) != 1}
    assert not twice, f"{len(twice)} readings stored more than once, e.g. {list(twice.items())[:3]}"
    return found


@pytest.fixture
def broker(services: ServiceFactory) -> Mosquitto:
    """A private broker (the fixtures' brokers all queue generously)."""
    return services.mosquitto()


@pytest.fixture
def password_broker() -> Iterator[PasswordMosquitto]:
    broker = start_service(lambda: PasswordMosquitto("farmhand", "s3cret-Pa55"))
    try:
        yield broker
    finally:
        broker.close()


# --- 1. username / password -------------------------------------------------------------


def test_credentials_in_the_url_are_used_and_the_broker_refuses_anonymous(
    tmp_path: Path,
    password_broker: PasswordMosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    broker = password_broker
    assert raw_connack(broker.host, broker.port, None, None) == 5  # not authorized
    assert raw_connack(broker.host, broker.port, "farmhand", "wrong") == 5
    prefix = f"u{unique}"
    url = f"mqtt://farmhand:s3cret-Pa55@{broker.host}:{broker.port}"
    daemon = DaemonProcess(
        tmp_path, daemon_config(tmp_path, url, prefix, {"url": victoria_metrics.url})
    )
    try:
        daemon.start()
        Fleet(url, devices=5, prefix=prefix).run(rate=2000, count=100)
        wait_stored(victoria_metrics, prefix, 100)
        assert daemon.metric(RECEIVED) == 100
        assert "s3cret-Pa55" not in daemon.log_path.read_text()
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_password_from_a_secret_file_with_the_username_in_the_config(
    tmp_path: Path,
    password_broker: PasswordMosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    broker = password_broker
    prefix = f"p{unique}"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "mqtt__password").write_text("s3cret-Pa55\n")  # trailing newline as from echo
    config = daemon_config(
        tmp_path / "d",
        broker.url,  # no userinfo
        prefix,
        {"url": victoria_metrics.url},
        mqtt={"username": "farmhand"},
    )
    daemon = DaemonWithArgs(tmp_path / "d", config, ["--secrets-dir", str(secrets)])
    try:
        daemon.start()
        publisher_url = f"mqtt://farmhand:s3cret-Pa55@{broker.host}:{broker.port}"
        Fleet(publisher_url, devices=5, prefix=prefix).run(rate=2000, count=100)
        wait_stored(victoria_metrics, prefix, 100)
        assert daemon.metric(RECEIVED) == 100
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_wrong_password_keeps_ingestd_up_unhealthy_and_saying_why(
    tmp_path: Path,
    password_broker: PasswordMosquitto,
    victoria_metrics: VictoriaMetrics,
    unique: str,
) -> None:
    broker = password_broker
    url = f"mqtt://farmhand:not-the-password@{broker.host}:{broker.port}"
    config = daemon_config(tmp_path, url, f"w{unique}", {"url": victoria_metrics.url})
    daemon = DaemonProcess(tmp_path, config)

    def refusals() -> list[dict[str, Any]]:
        return [e for e in log_events(daemon) if "refused the connection" in e.get("event", "")]

    try:
        daemon.start(wait_ready=False)
        # It keeps trying (reconnect_max is 1 s here) and stays up while refused.
        daemon.wait(lambda: len(refusals()) >= 3, "retrying after refusals", timeout=30)
        assert daemon.process is not None and daemon.process.poll() is None
        reason = refusals()[-1].get("reason", "")
        assert "not authori" in reason.lower(), refusals()[-1]
        # ... and nothing in the log contradicts that: the broker did answer.
        misleading = [
            e
            for e in log_events(daemon)
            if "no CONNACK" in json.dumps(e) or "unreachable" in e.get("event", "")
        ]
        assert not misleading, f"the log says the broker did not answer: {misleading[:2]}"
        # Every look at /healthz between attempts tells the operator the same thing.
        details = []
        for _ in range(10):
            status, report = daemon.health()
            mqtt = report["components"]["mqtt"]
            assert status == 503 and not report["ready"] and not mqtt["ok"], report
            details.append(mqtt["detail"])
            time.sleep(0.1)
        wrong = [d for d in details if "refused" not in d.lower() or "not authori" not in d.lower()]
        assert not wrong, f"/healthz mqtt detail does not say the broker refused us: {details}"
        assert http_request("GET", daemon.http + "/readyz").status == 503
        assert "not-the-password" not in daemon.log_path.read_text()
        assert daemon.terminate() == 0
    finally:
        daemon.close()


# --- 2. TLS -----------------------------------------------------------------------------


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.fail(
            'openssl not found: install it (Debian: "apt-get install openssl") to run the TLS test',
            pytrace=False,
        )
    return found


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (IP SAN): (ca, cert, key)."""
    openssl = _openssl()
    directory.mkdir()
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = IP:127.0.0.1\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca_crt, "-days", "2",
         "-subj", "/CN=ingestd test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
         "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext],
    ]  # fmt: skip
    for command in commands:
        result = subprocess.run(
            [str(c) for c in command], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"{command[:2]} failed:\n{result.stderr}"
    return ca_crt, crt, key


def test_tls_with_a_private_ca(
    tmp_path: Path, services: ServiceFactory, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    ca, cert, key = make_certificates(tmp_path / "pki")
    tls_port = free_port()
    # The plain listener (the fixture's) serves the publisher; ingestd uses only TLS.
    broker: Mosquitto = services.mosquitto(
        extra_config=(
            f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
        )
    )
    prefix = f"tls{unique}"
    config = daemon_config(
        tmp_path / "d",
        f"mqtts://127.0.0.1:{tls_port}",
        prefix,
        {"url": victoria_metrics.url},
        mqtt={"ca_file": str(ca)},
    )
    daemon = DaemonProcess(tmp_path / "d", config)
    try:
        daemon.start()
        assert any(
            e.get("event") == "connected" and e.get("broker") == f"127.0.0.1:{tls_port}"
            for e in log_events(daemon)
        )
        Fleet(broker.url, devices=5, prefix=prefix).run(rate=2000, count=200)
        wait_stored(victoria_metrics, prefix, 200)
        daemon.wait(lambda: daemon.metric(RECEIVED) == 200, "received all 200")
        assert daemon.terminate() == 0
    finally:
        daemon.close()


# --- 3. MQTT 3.1.1 ----------------------------------------------------------------------


def test_mqtt_3_1_1_readings_arrive_exactly_once(
    tmp_path: Path, broker: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"v{unique}"
    config = daemon_config(
        tmp_path, broker.url, prefix, {"url": victoria_metrics.url}, mqtt={"protocol": "3.1.1"}
    )
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.start()
        Fleet(broker.url, devices=10, prefix=prefix).run(rate=3000, count=1000)
        assert_exactly_once(victoria_metrics, prefix, devices=10, per_device=100)
        assert daemon.metric(RECEIVED) == 1000
        assert daemon.metric("ingestd_points_written_total") == 1000
        assert daemon.terminate() == 0
    finally:
        daemon.close()


# --- 4. shared subscription -------------------------------------------------------------


def test_shared_subscription_splits_the_stream_between_two_instances(
    tmp_path: Path, broker: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"g{unique}"
    daemons = [
        DaemonProcess(
            tmp_path / name,
            daemon_config(
                tmp_path / name,
                broker.url,
                prefix,
                {"url": victoria_metrics.url},
                mqtt={"share_group": f"ingestd-{unique}"},
            ),
        )
        for name in ("a", "b")
    ]
    assert daemons[0].config["mqtt"]["client_id"] != daemons[1].config["mqtt"]["client_id"]
    try:
        for daemon in daemons:
            daemon.start()
        Fleet(broker.url, devices=40, prefix=prefix).run(rate=4000, count=4000)
        assert_exactly_once(victoria_metrics, prefix, devices=40, per_device=100)
        shares = [d.metric(RECEIVED) for d in daemons]
        assert all(share > 0 for share in shares), f"one instance got nothing: {shares}"
        assert sum(shares) == 4000, f"received {shares}: a message went to both instances"
        for daemon in daemons:
            assert daemon.terminate() == 0
    finally:
        for daemon in daemons:
            daemon.close()


# --- 5. changed topic list --------------------------------------------------------------


def test_a_topic_dropped_from_the_config_is_unsubscribed_on_restart(
    tmp_path: Path, broker: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix_a, prefix_b = f"a{unique}", f"b{unique}"
    config = daemon_config(tmp_path, broker.url, prefix_a, {"url": victoria_metrics.url})
    first = DaemonProcess(tmp_path, config)
    try:
        first.start()
        Fleet(broker.url, devices=5, prefix=prefix_a).run(rate=2000, count=50)
        wait_stored(victoria_metrics, prefix_a, 50)
        assert first.terminate() == 0
    finally:
        first.close()

    # Same client id and spool dir (so the same broker session), only prefix B subscribed.
    config_b = json.loads(json.dumps(config))
    config_b["mqtt"]["subscriptions"] = [
        {"template": "{farm}/{site}/{device}/{measurement}", "topic": f"{prefix_b}/+/+/+"}
    ]
    log_offset = first.log_path.stat().st_size
    second = DaemonProcess(tmp_path, config_b)
    assert second.config["mqtt"]["client_id"] == config["mqtt"]["client_id"]
    try:
        second.start()
        # All of A is on the broker (acknowledged) before B is published: had A still been
        # subscribed, its messages would be queued for us ahead of B's.
        Fleet(broker.url, devices=5, prefix=prefix_a).run(rate=2000, count=70)
        Fleet(broker.url, devices=5, prefix=prefix_b).run(rate=2000, count=60)
        wait_stored(victoria_metrics, prefix_b, 60)
        second.wait(lambda: second.metric("ingestd_points_written_total") == 60, "written B")
        assert second.metric(RECEIVED) == 60
        assert stored_count(victoria_metrics, prefix_a) == 50  # nothing more from A
        assert stored_count(victoria_metrics, prefix_b) == 60
        unsubscribed = [
            e for e in log_events(second, since=log_offset) if "unsubscribed" in e.get("event", "")
        ]
        assert unsubscribed, f"no unsubscribe logged:\n{second.log()}"
        assert f"{prefix_a}/+/+/+" in unsubscribed[0].get("filters", []), unsubscribed
        assert f"{prefix_b}/+/+/+" not in unsubscribed[0].get("filters", [])
        assert second.terminate() == 0
    finally:
        second.close()


# --- 6. persistent session --------------------------------------------------------------


def test_readings_published_while_ingestd_is_down_arrive_after_restart(
    tmp_path: Path, broker: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"q{unique}"
    config = daemon_config(tmp_path, broker.url, prefix, {"url": victoria_metrics.url})
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.start()  # creates the session and its subscription on the broker
        assert daemon.terminate() == 0
        # Fleet returns only once the broker acknowledged all 500: they are queued for us.
        sent = Fleet(broker.url, devices=10, prefix=prefix).run(rate=3000, count=500)
        assert sent == 500
        assert stored_count(victoria_metrics, prefix) == 0
        log_offset = daemon.log_path.stat().st_size
        daemon.start()
        connected = [e for e in log_events(daemon, log_offset) if e.get("event") == "connected"]
        assert connected and connected[0].get("session_present") is True, connected
        assert_exactly_once(victoria_metrics, prefix, devices=10, per_device=50)
        assert daemon.metric(RECEIVED) == 500
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_a_backlog_is_read_in_slices_so_the_loop_does_its_other_work_between(
    mosquitto: Mosquitto, unique: str, tmp_path: Path
) -> None:
    """The source reads for a bounded time per wakeup: with a backlog in its socket, TSDB
    writes, commits and alert timers still get their turns (one wakeup once read 4,096
    messages, 0.6 s of the loop, and the TSDB writes starved)."""
    backlog = 300
    handled = 0
    started, finished = asyncio.Event(), asyncio.Event()

    def on_message(_topic: str, _payload: bytes, _dup: bool, _retained: bool, _ack: Any) -> None:
        nonlocal handled
        handled += 1
        started.set()
        if handled == backlog:
            finished.set()
        time.sleep(0.002)  # what decoding, quotas, spooling and rules cost, made visible

    section = MqttSection(
        url=mosquitto.url,
        client_id=f"slices-{unique}",
        subscriptions=[Subscription(template=f"{unique}/{{device}}")],
    )
    publisher = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()

    async def scenario() -> int:
        source = MqttSource(section, on_message, Metrics(), Health(), tmp_path)
        task = asyncio.create_task(source.run())
        await asyncio.wait_for(source.wait_subscribed(), 10)
        source.pause()
        infos = [publisher.publish(f"{unique}/d{i}", b"1", qos=0) for i in range(backlog)]
        for info in infos:
            info.wait_for_publish(5)
        await asyncio.sleep(1)  # the broker has written them all into our socket
        assert handled == 0
        source.resume()
        await started.wait()
        first_turn = handled  # what was read before the loop came back to us
        await asyncio.wait_for(finished.wait(), 30)
        await source.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return first_turn

    try:
        first_turn = asyncio.run(scenario())
    finally:
        publisher.loop_stop()
        publisher.disconnect()
    assert 0 < first_turn < backlog // 4, first_turn
