"""The shipped gateway broker config (mosquitto/), run by the real Mosquitto.

Only what cannot work on a test machine is rewritten: the listener's port, the persistence
location and the paths of the password and ACL files (the ACL itself is copied verbatim).
Every other line, and so the whole access policy, is the one we ship.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import start_service
from daemon import REPO, DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from services import Mosquitto, ServiceError, VictoriaMetrics, find_binary

SHIPPED_CONF = REPO / "mosquitto" / "ingestd-gateway.conf"
SHIPPED_ACL = REPO / "mosquitto" / "acl"
NOT_AUTHORIZED = 5  # MQTT 3.1.1 CONNACK return code
PUBACK_NOT_AUTHORIZED = 0x87
TIMEOUT = 15.0

USERS = {
    "ingestd": "ingestd-Pa55-word",
    "operator": "operator-Pa55-word",
    "esp32-a": "device-a-Pa55",
    "esp32-b": "device-b-Pa55",
}


# --- the broker ---------------------------------------------------------------------------


def rewrite_config(text: str, port: int, directory: Path) -> str:
    """The shipped config with test paths and port; fails if a rewritten line moved."""
    replacements = {
        r"^listener 1883$": f"listener {port} 127.0.0.1",
        r"^persistence_location /var/lib/mosquitto/$": f"persistence_location {directory}/",
        r"^password_file /etc/mosquitto/passwd$": f"password_file {directory}/passwd",
        r"^acl_file /etc/mosquitto/acl$": f"acl_file {directory}/acl",
    }
    for pattern, replacement in replacements.items():
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, f"{SHIPPED_CONF}: expected one line matching {pattern}, got {count}"
    return text


def raw_connack(host: str, port: int, username: str | None, password: str | None) -> int:
    """MQTT 3.1.1 CONNECT with optional credentials; the CONNACK return code."""

    def string(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("!H", len(raw)) + raw

    flags, payload = 0x02, string("")
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    body = string("MQTT") + bytes([4, flags, 0, 10]) + payload
    assert len(body) < 128, "one-byte remaining length only"
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        connack = sock.recv(4)
        if connack[:2] != b"\x20\x02" or len(connack) != 4:
            raise ServiceError(f"unexpected CONNACK {connack!r}")
        if connack[3] == 0:
            sock.sendall(b"\xe0\x00")
        return connack[3]


class GatewayMosquitto(Mosquitto):
    """Mosquitto with mosquitto/ingestd-gateway.conf and mosquitto/acl as shipped."""

    def __init__(self, users: dict[str, str]) -> None:
        self.passwd_binary = find_binary("mosquitto_passwd")
        self.users = users
        super().__init__()
        self.passwd_file = self.dir / "passwd"
        self.acl_file = self.dir / "acl"

    def _prepare(self) -> None:
        for number, (user, password) in enumerate(self.users.items()):
            create = ["-c"] if number == 0 else []
            subprocess.run(
                [self.passwd_binary, *create, "-b", str(self.passwd_file), user, password],
                check=True,
                capture_output=True,
            )
        self.acl_file.write_bytes(SHIPPED_ACL.read_bytes())
        self.config_path.write_text(rewrite_config(SHIPPED_CONF.read_text(), self.port, self.dir))
        if os.geteuid() == 0:
            # The shipped config keeps mosquitto's default of dropping root for the user
            # "mosquitto" (as on Debian), which must be able to use its files.
            account = pwd.getpwnam("mosquitto")
            for path in (self.dir, self.passwd_file, self.acl_file, self.config_path):
                os.chown(path, account.pw_uid, account.pw_gid)

    def _probe(self) -> None:
        code = raw_connack(self.host, self.port, "ingestd", self.users["ingestd"])
        if code != 0:
            raise ServiceError(f"CONNACK return code {code} for ingestd's credentials")

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads the password and ACL files."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)


@pytest.fixture
def gateway() -> Iterator[GatewayMosquitto]:
    broker = start_service(lambda: GatewayMosquitto(USERS))
    try:
        yield broker
    finally:
        broker.close()


# --- MQTT clients -------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout}s")
        time.sleep(0.02)


class Client:
    """A paho MQTT 5 client logged in as ``user``: records messages and PUBACK reasons."""

    def __init__(self, broker: Mosquitto, user: str, password: str) -> None:
        self.user = user
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self._lock = threading.Lock()
        self._connack: ReasonCode | None = None
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{random.getrandbits(32):08x}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        wait_until(lambda: self._connack is not None, f"{user} connected")
        assert self._connack is not None and not self._connack.is_failure, (
            f"{user} refused: {self._connack}"
        )

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connack = reason

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            self.pubacks[mid] = reason

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._lock:
            self.subacks[mid] = reasons

    def subscribe(self, *filters: str) -> list[int]:
        """Subscribe at QoS 1; the SUBACK reason codes, one per filter."""
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        assert mid is not None
        wait_until(lambda: mid in self.subacks, f"{self.user} SUBACK")
        return [r.value for r in self.subacks[mid]]

    def publish(self, topic: str, payload: str | bytes) -> int:
        """QoS 1 publish; the PUBACK reason code (0 accepted, 0x87 not authorized)."""
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, f"{self.user} PUBACK for {topic}")
        return int(self.pubacks[info.mid].value)

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload in self.messages if t == topic]

    def wait_for(self, topic: str, payload: bytes) -> None:
        wait_until(lambda: payload in self.received(topic), f"{self.user} got {topic} {payload!r}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(gateway: GatewayMosquitto) -> Iterator[Callable[[str], Client]]:
    opened: list[Client] = []

    def connect(user: str) -> Client:
        client = Client(gateway, user, gateway.users[user])
        opened.append(client)
        return client

    try:
        yield connect
    finally:
        for client in opened:
            client.close()


def refused_and_never_delivered(
    publisher: Client, topic: str, fence_topic: str, watcher: Client, watched: str
) -> None:
    """``publisher`` may not publish on ``topic``: the broker says so, and ``watcher``
    (subscribed to ``watched``) never gets it, proven by a later allowed publish (the fence)
    from the same connection arriving alone."""
    payload = f"spoof-{random.getrandbits(48):x}".encode()
    assert publisher.publish(topic, payload) == PUBACK_NOT_AUTHORIZED, topic
    fence = f"fence-{random.getrandbits(48):x}".encode()
    assert publisher.publish(fence_topic, fence) == 0, fence_topic
    watcher.wait_for(fence_topic, fence)
    got = [t for t, p in watcher.messages if p == payload]
    assert not got, f"{watcher.user} received {publisher.user}'s message on {got} ({watched})"


# --- tests --------------------------------------------------------------------------------


def test_the_shipped_config_starts_as_shipped_and_refuses_anonymous(
    gateway: GatewayMosquitto,
) -> None:
    shipped = SHIPPED_CONF.read_text().splitlines()
    running = gateway.config_path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, running, strict=True) if a != b]
    assert len(changed) == 4, changed  # listener, persistence_location, password/acl files
    assert gateway.acl_file.read_bytes() == SHIPPED_ACL.read_bytes()
    for line in ("allow_anonymous false", "persistence true", "max_queued_messages 1000000"):
        assert line in shipped
    assert gateway.running
    assert raw_connack(gateway.host, gateway.port, None, None) == NOT_AUTHORIZED
    assert raw_connack(gateway.host, gateway.port, "esp32-a", "wrong") == NOT_AUTHORIZED
    assert raw_connack(gateway.host, gateway.port, "nobody", "x") == NOT_AUTHORIZED
    assert raw_connack(gateway.host, gateway.port, "esp32-a", USERS["esp32-a"]) == 0
    # Persistence on, where the config says: a clean stop saves the database there.
    gateway.stop()
    assert (gateway.dir / "mosquitto.db").exists(), gateway.log_tail()


def test_a_device_publishes_only_as_itself(clients: Callable[[str], Client]) -> None:
    ingestd = clients("ingestd")
    trees = ("farm/#", "plain/#", "lp/#", "tele/+/SENSOR", "homie/#", "alerts/ack/+")
    assert ingestd.subscribe(*trees) == [1] * len(trees)
    a, b = clients("esp32-a"), clients("esp32-b")
    own = "farm/site1/esp32-a/reservoir"
    assert a.publish(own, b'{"ph": 6.1}') == 0
    ingestd.wait_for(own, b'{"ph": 6.1}')
    assert b.publish("farm/site1/esp32-b/reservoir", b'{"ph": 5.9}') == 0
    ingestd.wait_for("farm/site1/esp32-b/reservoir", b'{"ph": 5.9}')
    # Not as B, in any tree, nor a level deeper/shallower, nor in ingestd's own topics.
    for topic in (
        "farm/site1/esp32-b/reservoir",
        "farm/site2/esp32-b/climate",
        "farm/esp32-a/reservoir",
        "plain/site1/esp32-b/ph",
        "lp/site1/esp32-b",
        "tele/esp32-b/SENSOR",
        "homie/esp32-b/probe/ph",
        "alerts/ack/some-alert",
        "alerts/critical/site1/esp32-b/ph_low",
        "ingestd/quota/esp32-b",
    ):
        refused_and_never_delivered(a, topic, own, ingestd, "sensor trees and acks")
    # Its own place in the other trees works.
    for topic in ("plain/site1/esp32-a/ph", "lp/site1/esp32-a", "tele/esp32-a/SENSOR"):
        assert a.publish(topic, b"6.0") == 0
        ingestd.wait_for(topic, b"6.0")


def test_an_operator_reads_and_acks_alerts_and_cannot_publish_readings(
    clients: Callable[[str], Client],
) -> None:
    ingestd, operator = clients("ingestd"), clients("operator")
    assert ingestd.subscribe("farm/#", "plain/#", "tele/+/SENSOR", "alerts/ack/+") == [1] * 4
    assert operator.subscribe("alerts/#") == [1]
    # ingestd publishes alert events; the operator sees them and acknowledges one.
    event = b'{"id": "a1b2", "state": "firing"}'
    assert ingestd.publish("alerts/critical/site1/esp32-a/ph_low", event) == 0
    operator.wait_for("alerts/critical/site1/esp32-a/ph_low", event)
    assert operator.publish("alerts/ack/a1b2", b"alice") == 0
    ingestd.wait_for("alerts/ack/a1b2", b"alice")
    fence = "alerts/ack/fence"
    # No readings: not as a device, not as a "device" named like the operator (the ACL
    # patterns apply to every user; the operator's deny lines must win), and no alerts.
    for topic in (
        "farm/site1/esp32-a/reservoir",
        "farm/site1/operator/reservoir",
        "plain/site1/operator/ph",
        "tele/operator/SENSOR",
    ):
        refused_and_never_delivered(operator, topic, fence, ingestd, "sensor trees")
    assert operator.publish("alerts/critical/site1/esp32-a/fake", b"x") == PUBACK_NOT_AUTHORIZED
    assert operator.publish("ingestd/rules/error", b"x") == PUBACK_NOT_AUTHORIZED
    # ... nor read them: a reading published now never reaches the operator, while the alert
    # ingestd publishes after it does.
    operator.subscribe("farm/#")
    device = clients("esp32-a")
    assert device.publish("farm/site1/esp32-a/reservoir", b"secret-reading") == 0
    assert ingestd.publish("alerts/info/site1/esp32-a/x", b"after") == 0
    operator.wait_for("alerts/info/site1/esp32-a/x", b"after")
    assert not [t for t, p in operator.messages if p == b"secret-reading"]


def test_ingestd_receives_what_devices_send(
    tmp_path: Path, gateway: GatewayMosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    site = f"bc{random.getrandbits(40):x}"
    url = f"mqtt://ingestd:{USERS['ingestd']}@{gateway.host}:{gateway.port}"
    config = daemon_config(
        tmp_path,
        url,
        "farm",
        {"url": victoria_metrics.url},
        # ingestd's own subscription as shipped in config/ingestd.yaml: farm/+/+/+
        mqtt={"subscriptions": [{"template": "farm/{site}/{device}/{measurement}"}]},
    )
    daemon = DaemonProcess(tmp_path, config)
    devices = {name: Client(gateway, name, USERS[name]) for name in ("esp32-a", "esp32-b")}
    try:
        daemon.start()  # ready: subscribed to farm/+/+/+ and alerts/ack/+
        per_device = 20
        for seq in range(per_device):
            for name, device in devices.items():
                payload = json.dumps({"seq": seq, "ph": 6.0})
                assert device.publish(f"farm/{site}/{name}/reservoir", payload) == 0
        # A spoofed reading (A as B) is refused by the broker, so it never reaches ingestd.
        spoof = json.dumps({"seq": 999, "ph": 1.0})
        topic_b = f"farm/{site}/esp32-b/reservoir"
        assert devices["esp32-a"].publish(topic_b, spoof) == PUBACK_NOT_AUTHORIZED
        sent = 2 * per_device
        daemon.wait(
            lambda: daemon.metric("ingestd_messages_received_total") >= sent, "received all"
        )
        series = victoria_metrics.export_until(
            f'reservoir_seq{{site="{site}"}}',
            lambda s: sum(len(x["values"]) for x in s) >= sent,
            timeout=30,
        )
        stored = {(s["metric"]["device"], v) for s in series for v in s["values"]}
        expected = {(n, float(q)) for n in devices for q in range(per_device)}
        assert stored == expected
        assert daemon.metric("ingestd_messages_received_total") == sent
        status, report = daemon.health()
        assert status == 200 and report["components"]["mqtt"]["ok"], report
        assert "subscription refused" not in daemon.log_path.read_text()
        assert daemon.terminate() == 0
    finally:
        for device in devices.values():
            device.close()
        daemon.close()


def _add_device(
    passwd: Path, acl: Path, *args: str, host: str = "127.0.0.1", port: int = 1883
) -> subprocess.CompletedProcess[str]:
    """``ingestd broker add-device`` as a real process; ``args`` end with the name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ingestd", "broker", "add-device",
         "--passwd", str(passwd), "--acl", str(acl), "--host", host, "--port", str(port), *args],
        capture_output=True, text=True, check=False, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip


def test_add_device_creates_a_working_credential(
    gateway: GatewayMosquitto, clients: Callable[[str], Client]
) -> None:
    def add(*args: str) -> subprocess.CompletedProcess[str]:
        return _add_device(
            gateway.passwd_file, gateway.acl_file, *args, host=gateway.host, port=gateway.port
        )

    result = add("--site", "greenhouse-1", "--json", "esp32-new")
    assert result.returncode == 0, result.stderr
    flashed = json.loads(result.stdout)
    assert flashed["device"] == flashed["client_id"] == "esp32-new"
    assert flashed["topic"] == "farm/greenhouse-1/esp32-new/<measurement>"
    assert (flashed["host"], flashed["port"]) == (gateway.host, gateway.port)
    password = flashed["password"]
    assert len(password) >= 24 and password not in gateway.passwd_file.read_text()
    gateway.reload()
    wait_until(
        lambda: raw_connack(gateway.host, gateway.port, "esp32-new", password) == 0,
        "the new device accepted after reload",
    )
    # The printed credentials work for the printed topic, and only there.
    ingestd = clients("ingestd")
    assert ingestd.subscribe("farm/#") == [1]
    device = Client(gateway, "esp32-new", password)
    try:
        assert device.publish("farm/greenhouse-1/esp32-new/reservoir", b'{"ph": 6.2}') == 0
        ingestd.wait_for("farm/greenhouse-1/esp32-new/reservoir", b'{"ph": 6.2}')
        refused_and_never_delivered(
            device,
            "farm/greenhouse-1/esp32-a/reservoir",
            "farm/greenhouse-1/esp32-new/reservoir",
            ingestd,
            "farm/#",
        )
    finally:
        device.close()
    # The other accounts are untouched.
    assert raw_connack(gateway.host, gateway.port, "esp32-a", USERS["esp32-a"]) == 0

    # The human-readable form, updating the device: a new password replaces the old one.
    result = add("--site", "greenhouse-1", "esp32-new")
    assert result.returncode == 0, result.stderr
    assert "updated in" in result.stdout
    assert "farm/greenhouse-1/esp32-new/<measurement>" in result.stdout
    match = re.search(r"^\s+password\s+(\S+)$", result.stdout, re.MULTILINE)
    assert match, result.stdout
    new_password = match.group(1)
    assert new_password != password
    gateway.reload()
    wait_until(
        lambda: raw_connack(gateway.host, gateway.port, "esp32-new", password) == NOT_AUTHORIZED,
        "the old password refused after reload",
    )
    assert raw_connack(gateway.host, gateway.port, "esp32-new", new_password) == 0


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("bad/name", "device pattern"),
        ("-starts-with-dash", "device pattern"),
        ("x" * 65, "device pattern"),
        ("plus+", "device pattern"),
        ("esp32:7", "':'"),
        ("ingestd", "reserved"),
        ("operator", "reserved"),  # a user block in the shipped ACL
    ],
)
def test_add_device_refuses_bad_names(tmp_path: Path, name: str, says: str) -> None:
    passwd = tmp_path / "passwd"
    made = _add_device(passwd, SHIPPED_ACL, "esp32-first")
    assert made.returncode == 0, made.stderr
    before = passwd.read_bytes()
    result = _add_device(passwd, SHIPPED_ACL, "--", name)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert says in result.stderr and "invalid device name" in result.stderr, result.stderr
    assert result.stdout == ""
    assert passwd.read_bytes() == before
