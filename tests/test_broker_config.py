"""The shipped gateway broker config (mosquitto/), run by the real Mosquitto.

Only what cannot work on a test machine is rewritten: the listener's port, the persistence
location and the paths of the password and ACL files (the ACL itself is copied verbatim).
Every other line, and so the whole access policy, is the one we ship.

The optional TLS listener (mosquitto/tls.conf) is enabled the way mosquitto/README.md tells an
admin to, with certificates from a throwaway CA made by the openssl CLI: its certificate
paths and its port are the only lines of tls.conf rewritten.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import start_service
from daemon import REPO, DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from services import (
    BinaryNotFoundError,
    Mosquitto,
    ServiceError,
    VictoriaMetrics,
    find_binary,
    free_port,
    http_request,
)

SHIPPED_CONF = REPO / "mosquitto" / "ingestd-gateway.conf"
SHIPPED_ACL = REPO / "mosquitto" / "acl"
SHIPPED_TLS = REPO / "mosquitto" / "tls.conf"
CLUSTER_ACL = REPO / "deploy" / "cluster" / "acl"
README = REPO / "mosquitto" / "README.md"
NOT_AUTHORIZED = 5  # MQTT 3.1.1 CONNACK return code
PUBACK_NOT_AUTHORIZED = 0x87
NO_MATCHING_SUBSCRIBERS = 0x10  # PUBACK: accepted, and nobody reads it
TIMEOUT = 15.0

USERS = {
    "ingestd": "ingestd-Pa55-word",
    "operator": "operator-Pa55-word",
    "esp32-a": "device-a-Pa55",
    "esp32-b": "device-b-Pa55",
    # An account made by hand for a name add-device refuses: Homie v5's version level.
    "5": "five-Pa55",
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


def _connack(
    sock: socket.socket, username: str | None, password: str | None, client_id: str = ""
) -> int:
    """MQTT 3.1.1 CONNECT (clean session) with optional credentials over ``sock``; the
    CONNACK return code. A code 0 is followed by DISCONNECT unless ``client_id`` is given:
    then the connection stays, holding that client id, until the socket is closed."""

    def string(value: str) -> bytes:
        raw = value.encode()
        return struct.pack("!H", len(raw)) + raw

    flags, payload = 0x02, string(client_id)
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    body = string("MQTT") + bytes([4, flags, 0, 10]) + payload
    assert len(body) < 128, "one-byte remaining length only"
    sock.sendall(bytes([0x10, len(body)]) + body)
    connack = sock.recv(4)
    if connack[:2] != b"\x20\x02" or len(connack) != 4:
        raise ServiceError(f"unexpected CONNACK {connack!r}")
    if connack[3] == 0 and not client_id:
        sock.sendall(b"\xe0\x00")
    return connack[3]


def raw_connack(host: str, port: int, username: str | None, password: str | None) -> int:
    """MQTT 3.1.1 CONNECT with optional credentials; the CONNACK return code."""
    with socket.create_connection((host, port), timeout=2) as sock:
        return _connack(sock, username, password)


def raw_tls_connack(host: str, port: int, context: ssl.SSLContext) -> int:
    """:func:`raw_connack` over TLS, without credentials (the certificate is the login)."""
    with (
        socket.create_connection((host, port), timeout=2) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        return _connack(sock, None, None)


def tls_refusal(host: str, port: int, context: ssl.SSLContext, username: str, password: str) -> str:
    """The TLS alert with which the broker refuses the client's certificate (its reason,
    such as ``TLSV1_ALERT_UNKNOWN_CA``); fails if it takes the client instead.

    With TLS 1.3 the client's side of the handshake completes before the broker has judged
    its certificate, so the verdict is read before anything is sent: a CONNECT sent first
    could reach a closing socket, and its reset could swallow the alert.
    """
    with (
        socket.create_connection((host, port), timeout=2) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        try:
            sock.recv(1)
        except ssl.SSLError as exc:
            return str(exc.reason)
        except TimeoutError:
            # Silence: the broker kept the connection; this is what it does with a CONNECT.
            code = _connack(sock, username, password)
            raise AssertionError(f"TLS accepted {username}'s client, CONNACK {code}") from None
        raise AssertionError("the broker closed the connection without an alert")


class GatewayMosquitto(Mosquitto):
    """Mosquitto with mosquitto/ingestd-gateway.conf and mosquitto/acl as shipped."""

    def __init__(self, users: dict[str, str], acl: Path = SHIPPED_ACL) -> None:
        self.passwd_binary = find_binary("mosquitto_passwd")
        self.users = users
        self.acl = acl
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
        self.acl_file.write_bytes(self.acl.read_bytes())
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


# --- the TLS option -----------------------------------------------------------------------

# Extensions for what a small farm CA issues; `req`'s distinguished name comes from -subj.
OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


class CertificateAuthority:
    """A throwaway CA made with the openssl CLI, which signs servers and clients (P-256)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.openssl = find_binary("openssl")
        self.dir = directory / name
        self.dir.mkdir()
        self.config = self.dir / "openssl.cnf"
        self.config.write_text(OPENSSL_CONFIG)
        self.cert, self.key = self.dir / "ca.crt", self.dir / "ca.key"
        self._serial = 1
        self._run(
            "req", "-x509", "-extensions", "ca", "-days", "2", "-subj", f"/CN={name}",
            "-out", self.cert, *self._new_key(self.key),
        )  # fmt: skip

    def issue(self, common_name: str, usage: str = "client") -> Identity:
        """A certificate for ``common_name``; ``usage`` is "client" or "server"."""
        identity = Identity(self.dir / f"{common_name}.crt", self.dir / f"{common_name}.key")
        request = self.dir / f"{common_name}.csr"
        self._run("req", "-new", "-subj", f"/CN={common_name}", "-out", request,
                  *self._new_key(identity.key))  # fmt: skip
        self._serial += 1
        self._run(
            "x509", "-req", "-in", request, "-CA", self.cert, "-CAkey", self.key,
            "-set_serial", str(self._serial), "-days", "2", "-extfile", self.config,
            "-extensions", usage, "-out", identity.cert,
        )  # fmt: skip
        return identity

    def _new_key(self, key: Path) -> list[str | Path]:
        """``req`` arguments that make a new key (unencrypted) and sign the request with it."""
        return ["-config", self.config, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", key]  # fmt: skip

    def _run(self, *args: str | Path) -> None:
        subprocess.run([self.openssl, *map(str, args)], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Pki:
    """The gateway's CA with the broker's and the clients' certificates, and a stranger:
    a certificate for a known device id signed by another CA."""

    ca: Path
    server: Identity
    clients: dict[str, Identity]
    stranger: Identity

    def context(self, identity: Identity | None) -> ssl.SSLContext:
        """What a client uses: trusts the gateway's CA, presents ``identity`` if any."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if identity is not None:
            context.load_cert_chain(identity.cert, identity.key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    try:
        farm = CertificateAuthority(directory, "farm-ca")
        other = CertificateAuthority(directory, "other-ca")
    except BinaryNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Pki(
        ca=farm.cert,
        server=farm.issue("gateway", "server"),
        clients={name: farm.issue(name) for name in ("ingestd", "operator", "esp32-a", "esp32-b")},
        stranger=other.issue("esp32-a"),
    )


@dataclass(frozen=True)
class Install:
    """One ``install -m MODE [-g GROUP] FILE... DIR/`` line of the README."""

    mode: int
    group: str | None
    files: tuple[str, ...]
    directory: str


@dataclass(frozen=True)
class ReadmeTlsSteps:
    """What mosquitto/README.md tells an admin to do to enable the TLS option."""

    certs: list[Install]  # the broker's certificate, key and CA
    tls_conf: Install  # mosquitto/tls.conf into the include dir
    sed: str  # the expression that enables include_dir in the main config

    @classmethod
    def parse(cls) -> ReadmeTlsSteps:
        text = README.read_text()
        section = text.split("\n## TLS with client certificates", 1)[1].split("\n## ", 1)[0]
        installs = [
            Install(int(mode, 8), group or None, tuple(files.split()), directory)
            for mode, group, files, directory in re.findall(
                r"install -m ([0-7]+) (?:-g (\S+) )?((?:\S+ )+?)(/\S+?)/?$", section, re.M
            )
        ]
        sed = re.search(r"sed -i '([^']+)' /etc/mosquitto/mosquitto\.conf$", section, re.M)
        tls_conf = [i for i in installs if i.files == ("mosquitto/tls.conf",)]
        assert sed and len(tls_conf) == 1, f"{README}: the TLS steps moved:\n{section}"
        certs = [i for i in installs if i is not tls_conf[0]]
        return cls(certs=certs, tls_conf=tls_conf[0], sed=sed.group(1))


def rewrite_tls_config(text: str, port: int, certs: Path) -> str:
    """tls.conf with the paths an admin edits pointing at ``certs``, and the test's port."""
    replacements = {
        r"^listener 8883$": f"listener {port} 127.0.0.1",
        r"^cafile /etc/mosquitto/certs/ca\.crt$": f"cafile {certs}/ca.crt",
        r"^certfile /etc/mosquitto/certs/server\.crt$": f"certfile {certs}/server.crt",
        r"^keyfile /etc/mosquitto/certs/server\.key$": f"keyfile {certs}/server.key",
    }
    for pattern, replacement in replacements.items():
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, f"{SHIPPED_TLS}: expected one line matching {pattern}, got {count}"
    return text


class TlsGatewayMosquitto(GatewayMosquitto):
    """The gateway broker with the TLS option enabled as mosquitto/README.md says.

    /etc/mosquitto/certs and /etc/mosquitto/ingestd.d are directories of the broker's temp
    dir; files get the README's modes and, as root (when mosquitto drops root for the user
    "mosquitto", as on a gateway), its groups.
    """

    def __init__(self, users: dict[str, str], pki: Pki) -> None:
        self.pki = pki
        super().__init__(users)
        self.tls_port = free_port()
        while self.tls_port == self.port:
            self.tls_port = free_port()
        self.certs = self.dir / "certs"
        self.include_dir = self.dir / "ingestd.d"
        self.tls_config_path = self.include_dir / "tls.conf"

    @property
    def ports(self) -> list[int]:
        return [self.port, self.tls_port]

    def _install(self, source: Path | str, step: Install, directory: Path, name: str) -> None:
        """``install -m MODE [-g GROUP] NAME DIR/``, ``source`` being the file or its text."""
        target = directory / name
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        else:
            target.write_text(source)
        target.chmod(step.mode)
        if step.group is not None and os.geteuid() == 0:
            shutil.chown(target, group=step.group)

    def _prepare(self) -> None:
        super()._prepare()
        steps = ReadmeTlsSteps.parse()
        # The broker's certificate, key and CA into /etc/mosquitto/certs ...
        self.certs.mkdir()
        ours = {"ca.crt": self.pki.ca, "server.crt": self.pki.server.cert,
                "server.key": self.pki.server.key}  # fmt: skip
        installed = sorted(name for step in steps.certs for name in step.files)
        assert installed == sorted(ours), f"{README} installs {installed}, tls.conf uses {ours}"
        for step in steps.certs:
            assert step.directory == "/etc/mosquitto/certs", step
            for name in step.files:
                self._install(ours[name], step, self.certs, name)
        # ... tls.conf, its paths edited, into the include dir ...
        self.include_dir.mkdir()
        edited = rewrite_tls_config(SHIPPED_TLS.read_text(), self.tls_port, self.certs)
        self._install(edited, steps.tls_conf, self.include_dir, "tls.conf")
        # ... the README's sed run on the main config ...
        before = self.config_path.read_text()
        subprocess.run(["sed", "-i", steps.sed, str(self.config_path)], check=True, timeout=10)
        assert self.config_path.read_text() != before, f"{README}: sed {steps.sed!r} did nothing"
        # ... whose include_dir is where the README put tls.conf.
        text, count = re.subn(
            f"^include_dir {re.escape(steps.tls_conf.directory)}$",
            f"include_dir {self.include_dir}",
            self.config_path.read_text(),
            flags=re.MULTILINE,
        )
        assert count == 1, f"{README}: no 'include_dir {steps.tls_conf.directory}' after its sed"
        self.config_path.write_text(text)
        if os.geteuid() == 0:
            shutil.chown(self.config_path, user="mosquitto", group="mosquitto")

    def _probe(self) -> None:
        super()._probe()
        context = self.pki.context(self.pki.clients["ingestd"])
        code = raw_tls_connack(self.host, self.tls_port, context)
        if code != 0:
            raise ServiceError(f"CONNACK return code {code} for ingestd's certificate")


@pytest.fixture
def tls_gateway(pki: Pki) -> Iterator[TlsGatewayMosquitto]:
    broker = start_service(lambda: TlsGatewayMosquitto(USERS, pki))
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

    def __init__(
        self,
        broker: Mosquitto,
        user: str,
        password: str | None,
        *,
        tls: tuple[int, ssl.SSLContext] | None = None,
        client_id: str | None = None,
        session_expiry: int = 0,
    ) -> None:
        """``tls``: the TLS listener's port and the client's context; ``password`` None
        sends no username (on the TLS listener the certificate says who the client is).
        ``session_expiry`` above 0: resume the session of ``client_id`` (clean start off)
        and keep it that long after a disconnect; else a clean start."""
        self.user = user
        self.client_id = client_id or f"{user}-{random.getrandbits(32):08x}"
        self.messages: list[tuple[str, bytes]] = []
        self.sizes: list[int] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.session_present: bool | None = None
        self.connects = 0
        self._lock = threading.Lock()
        self._connack: ReasonCode | None = None
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if password is not None:
            self.client.username_pw_set(user, password)
        port = broker.port
        if tls is not None:
            port, context = tls
            self.client.tls_set_context(context)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry
        self.client.connect(
            broker.host,
            port,
            keepalive=30,
            clean_start=session_expiry == 0,
            properties=properties,
        )
        self.client.loop_start()
        wait_until(lambda: self._connack is not None, f"{user} connected")
        assert self._connack is not None and not self._connack.is_failure, (
            f"{user} refused: {self._connack}"
        )

    def _on_connect(
        self, _c: Any, _u: Any, flags: paho.ConnectFlags, reason: ReasonCode, _p: Any
    ) -> None:
        self.session_present = flags.session_present
        self.connects += 1
        self._connack = reason

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        payload = bytes(message.payload)
        with self._lock:
            # Big payloads (queue-limit tests) are counted, not kept.
            self.messages.append((message.topic, payload if len(payload) <= 4096 else b""))
            self.sizes.append(len(payload))

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

    def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """QoS 1 publishes, up to 100 awaiting their PUBACK at once; all must be accepted."""
        mids: list[int] = []
        for topic, payload in messages:
            mids.append(self.client.publish(topic, payload, qos=1).mid)
            if len(mids) >= 100 and mids[-100] not in self.pubacks:
                wait_until(lambda m=mids[-100]: m in self.pubacks, f"{self.user} PUBACKs")
        wait_until(lambda: all(m in self.pubacks for m in mids), f"{self.user} PUBACKs")
        refused = {int(self.pubacks[m].value) for m in mids} - {0, NO_MATCHING_SUBSCRIBERS}
        assert not refused, f"{self.user}: PUBACK reason codes {refused}"

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


@pytest.fixture
def tls_clients(tls_gateway: TlsGatewayMosquitto, pki: Pki) -> Iterator[Callable[..., Client]]:
    opened: list[Client] = []

    def connect(
        name: str, login: tuple[str, str] | None = None, client_id: str | None = None
    ) -> Client:
        """A client on the TLS listener presenting ``name``'s certificate, sending no
        username unless a ``login`` (username, password) is given."""
        tls = (tls_gateway.tls_port, pki.context(pki.clients[name]))
        user, password = login or (name, None)
        client = Client(tls_gateway, user, password, tls=tls, client_id=client_id)
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
    for line in (
        "allow_anonymous false",
        "persistence true",
        "use_username_as_clientid true",
        "max_queued_messages 200000",
        "max_queued_bytes 67108864",
    ):
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
    trees = ("farm/#", "plain/#", "lp/#", "tele/+/SENSOR", "homie/#", "alerts/ack/#")
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
        "alerts/ack/some-alert/esp32-a",
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
    assert ingestd.subscribe("farm/#", "plain/#", "tele/+/SENSOR", "alerts/ack/#") == [1] * 4
    assert operator.subscribe("alerts/#") == [1]
    # ingestd publishes alert events; the operator sees them and acknowledges one.
    event = b'{"id": "a1b2", "state": "firing"}'
    assert ingestd.publish("alerts/critical/site1/esp32-a/ph_low", event) == 0
    operator.wait_for("alerts/critical/site1/esp32-a/ph_low", event)
    assert operator.publish("alerts/ack/a1b2/operator", b"on it") == 0
    ingestd.wait_for("alerts/ack/a1b2/operator", b"on it")
    fence = "alerts/ack/fence/operator"
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


def test_the_tls_option_enabled_as_the_readme_says_takes_only_farm_certificates(
    tls_gateway: TlsGatewayMosquitto, pki: Pki
) -> None:
    broker = tls_gateway
    shipped = SHIPPED_CONF.read_text().splitlines()
    running = broker.config_path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped, running, strict=True) if a != b]
    assert len(changed) == 5, changed  # as without TLS, and the include_dir the README enables
    include = ("#include_dir /etc/mosquitto/ingestd.d", f"include_dir {broker.include_dir}")
    assert changed[-1] == include, changed
    shipped_tls = SHIPPED_TLS.read_text().splitlines()
    running_tls = broker.tls_config_path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(shipped_tls, running_tls, strict=True) if a != b]
    assert len(changed) == 4, changed  # the listener's port and the three certificate paths
    for line in ("require_certificate true", "use_identity_as_username true"):
        assert line in shipped_tls
    assert broker.acl_file.read_bytes() == SHIPPED_ACL.read_bytes()
    host, port = broker.host, broker.tls_port
    # A certificate from the farm's CA is a login by itself: no username, no password.
    for name, identity in pki.clients.items():
        assert raw_tls_connack(host, port, pki.context(identity)) == 0, name
    # No certificate: refused in the handshake, before the device's password could help ...
    refusal = tls_refusal(host, port, pki.context(None), "esp32-a", USERS["esp32-a"])
    assert refusal == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    # ... and so is a certificate for the same device id from another CA.
    refusal = tls_refusal(host, port, pki.context(pki.stranger), "esp32-a", USERS["esp32-a"])
    assert refusal == "TLSV1_ALERT_UNKNOWN_CA"
    # The plain listener still wants passwords.
    assert raw_connack(host, broker.port, None, None) == NOT_AUTHORIZED
    assert raw_connack(host, broker.port, "esp32-a", "wrong") == NOT_AUTHORIZED
    assert raw_connack(host, broker.port, "esp32-a", USERS["esp32-a"]) == 0


def test_a_device_certificate_publishes_only_as_its_device(
    tls_clients: Callable[..., Client],
) -> None:
    ingestd = tls_clients("ingestd")  # its ACL block: it reads every device's readings
    trees = ("farm/#", "plain/#", "tele/+/SENSOR", "alerts/ack/#")
    assert ingestd.subscribe(*trees) == [1] * len(trees)
    a, b = tls_clients("esp32-a"), tls_clients("esp32-b")
    own = "farm/site1/esp32-a/reservoir"
    assert a.publish(own, b'{"ph": 6.1}') == 0
    ingestd.wait_for(own, b'{"ph": 6.1}')
    assert b.publish("farm/site1/esp32-b/reservoir", b'{"ph": 5.9}') == 0
    ingestd.wait_for("farm/site1/esp32-b/reservoir", b'{"ph": 5.9}')
    for topic in (
        "farm/site1/esp32-b/reservoir",
        "plain/site1/esp32-b/ph",
        "tele/esp32-b/SENSOR",
        "alerts/ack/some-alert",
    ):
        refused_and_never_delivered(a, topic, own, ingestd, "sensor trees and acks")
    # The certificate, not the username sent, says who a client is: A's certificate with
    # B's username and password is still A.
    posing = tls_clients("esp32-a", login=("esp32-b", USERS["esp32-b"]))
    refused_and_never_delivered(posing, "farm/site1/esp32-b/reservoir", own, ingestd, "farm/#")
    assert posing.publish(own, b'{"ph": 6.2}') == 0
    ingestd.wait_for(own, b'{"ph": 6.2}')
    # The certificate is the client id too: another certificate sending the client id
    # ingestd's connection sent gets its own (the operator's: every device's is in use).
    tls_clients("operator", client_id=ingestd.client_id).close()
    assert posing.publish(own, b'{"ph": 6.3}') == 0
    ingestd.wait_for(own, b'{"ph": 6.3}')
    assert ingestd.connects == 1, "ingestd's connection was taken over"
    # An operator's certificate gets its ACL block too: acknowledgements, no readings.
    operator = tls_clients("operator")
    fence = "alerts/ack/fence/operator"
    refused_and_never_delivered(operator, "farm/site1/operator/x", fence, ingestd, "farm/#")


def test_ingestd_receives_over_tls_with_its_certificate(
    tmp_path: Path, tls_gateway: TlsGatewayMosquitto, pki: Pki, victoria_metrics: VictoriaMetrics
) -> None:
    site = f"bt{random.getrandbits(40):x}"
    identity = pki.clients["ingestd"]
    # As the README says: an mqtts:// URL, the CA and ingestd's certificate, no username.
    config = daemon_config(
        tmp_path,
        f"mqtts://{tls_gateway.host}:{tls_gateway.tls_port}",
        "farm",
        {"url": victoria_metrics.url},
        mqtt={
            "subscriptions": [{"template": "farm/{site}/{device}/{measurement}"}],
            "ca_file": str(pki.ca),
            "cert_file": str(identity.cert),
            "key_file": str(identity.key),
        },
    )
    daemon = DaemonProcess(tmp_path, config)
    devices = {
        name: Client(
            tls_gateway, name, None, tls=(tls_gateway.tls_port, pki.context(pki.clients[name]))
        )
        for name in ("esp32-a", "esp32-b")
    }
    try:
        daemon.start()  # ready: subscribed to farm/+/+/+ and alerts/ack/+
        # A spoofed reading (A as B) first: A's readings after it are its fence.
        spoof = json.dumps({"seq": 999, "ph": 1.0})
        topic_b = f"farm/{site}/esp32-b/reservoir"
        assert devices["esp32-a"].publish(topic_b, spoof) == PUBACK_NOT_AUTHORIZED
        per_device = 20
        for seq in range(per_device):
            for name, device in devices.items():
                payload = json.dumps({"seq": seq, "ph": 6.0})
                assert device.publish(f"farm/{site}/{name}/reservoir", payload) == 0
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
    ("pattern", "name", "says"),
    [
        (None, "bad/name", "no / + #"),
        (None, "-starts-with-dash", "device pattern"),
        (None, "x" * 65, "1-64 characters"),
        (None, "plus+", "no / + #"),
        (None, "dev\n", "control characters"),  # "^...$" searched: $ matched before the \n
        (None, "tab\there", "control characters"),
        (None, "esp32:7", "':'"),
        (None, "ingestd", "reserved"),
        (None, "5", "Homie v5"),
        (None, "operator", "reserved"),  # a user block in the shipped ACL
        # Whatever a subscription's device_pattern allows, a name is one topic level.
        (".*", "a/b", "no / + #"),
        (".*", "a+b", "no / + #"),
        (".*", "a#b", "no / + #"),
        (".*", "esc\x1b[31m", "control characters"),  # (a NUL cannot be an argument)
        (".*", "del\x7f", "control characters"),
        (".*", "", "1-64 characters"),
    ],
)
def test_add_device_refuses_bad_names(
    tmp_path: Path, pattern: str | None, name: str, says: str
) -> None:
    passwd = tmp_path / "passwd"
    made = _add_device(passwd, SHIPPED_ACL, "esp32-first")
    assert made.returncode == 0, made.stderr
    before = passwd.read_bytes()
    option = ["--device-pattern", pattern] if pattern is not None else []
    result = _add_device(passwd, SHIPPED_ACL, *option, "--", name)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert says in result.stderr and "invalid device name" in result.stderr, result.stderr
    assert result.stdout == ""
    assert passwd.read_bytes() == before


def test_add_device_refuses_a_site_that_is_not_one_topic_level(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    for site in ("gh/1", "gh+", "gh#", "gh\n", "gh\x01", "x" * 65):
        result = _add_device(passwd, SHIPPED_ACL, "--site", site, "esp32-7")
        assert result.returncode == 2 and "invalid site" in result.stderr, (site, result.stderr)
    assert not passwd.exists()


# --- sessions: a client's id is its account ---------------------------------------------

INGESTD_CLIENT_ID = "ingestd-gateway"  # config/ingestd.yaml's mqtt.client_id


def _gateway_daemon(
    tmp_path: Path, gateway: GatewayMosquitto, victoria_metrics: VictoriaMetrics
) -> DaemonProcess:
    """ingestd logged in as ``ingestd`` with the shipped config's client id."""
    url = f"mqtt://ingestd:{USERS['ingestd']}@{gateway.host}:{gateway.port}"
    config = daemon_config(
        tmp_path,
        url,
        "farm",
        {"url": victoria_metrics.url},
        mqtt={
            "client_id": INGESTD_CLIENT_ID,
            "subscriptions": [{"template": "farm/{site}/{device}/{measurement}"}],
        },
    )
    return DaemonProcess(tmp_path, config)


def _seqs_stored(victoria_metrics: VictoriaMetrics, site: str, count: int) -> set[float]:
    """The ``seq`` values of ``site``'s readings, once ``count`` are in VictoriaMetrics."""
    series = victoria_metrics.export_until(
        f'reservoir_seq{{site="{site}"}}',
        lambda s: sum(len(x["values"]) for x in s) >= count,
        timeout=60,
    )
    values = [v for s in series for v in s["values"]]
    assert len(values) == count, f"{len(values)} points for {count} readings"
    return set(values)


def intrude(gateway: GatewayMosquitto, user: str, client_id: str) -> socket.socket | None:
    """``user`` connects with ``client_id`` and a clean session (MQTT 3.1.1, as
    ``mosquitto_sub -i``); the open connection, or None when the broker refused it."""
    sock = socket.create_connection((gateway.host, gateway.port), timeout=5)
    if _connack(sock, user, USERS[user], client_id) != 0:
        sock.close()
        return None
    return sock


def test_a_device_using_ingestds_client_id_cannot_take_the_readings_queued_for_it(
    tmp_path: Path, gateway: GatewayMosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    site = f"bq{random.getrandbits(40):x}"
    daemon = _gateway_daemon(tmp_path, gateway, victoria_metrics)
    device = Client(gateway, "esp32-b", USERS["esp32-b"])
    try:
        daemon.start()
        assert daemon.terminate() == 0  # away: its session stays, the broker queues for it
        count = 2000
        topic = f"farm/{site}/esp32-b/reservoir"
        device.publish_many([(topic, json.dumps({"seq": n}).encode()) for n in range(count)])
        # A device's credentials with ingestd's client id, the one it sends and the one the
        # broker keys its session by (its username), each with a clean start: a broker that
        # let them would drop ingestd's session and the 2,000 readings in it.
        for client_id in (INGESTD_CLIENT_ID, "ingestd"):
            sock = intrude(gateway, "esp32-a", client_id)
            assert sock is not None, "the device's own login refused"
            sock.sendall(b"\xe0\x00")  # DISCONNECT: the clean session ends with it
            sock.close()
        daemon.start()
        assert _seqs_stored(victoria_metrics, site, count) == {float(n) for n in range(count)}
        assert daemon.metric('ingestd_mqtt_session_lost_total{cause="not_present"}') == 0
        status, report = daemon.health()
        assert status == 200, report
        assert daemon.terminate() == 0
    finally:
        device.close()
        daemon.close()


def test_a_device_reconnecting_with_ingestds_client_id_every_second_costs_no_reading(
    tmp_path: Path, gateway: GatewayMosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    """Firmware that finds its connection dropped reconnects a second later: on a broker
    that keyed sessions by the client id sent, it and ingestd would throw each other out
    once a second, each time with ingestd's session and readings."""
    site = f"bl{random.getrandbits(40):x}"
    daemon = _gateway_daemon(tmp_path, gateway, victoria_metrics)
    device = Client(gateway, "esp32-b", USERS["esp32-b"])
    stop = threading.Event()
    intrusions: list[str] = []

    def firmware() -> None:
        ids = (INGESTD_CLIENT_ID, "ingestd")
        while not stop.is_set():
            client_id = ids[len(intrusions) % 2]
            try:
                sock = intrude(gateway, "esp32-a", client_id)
            except OSError:
                sock = None
            if sock is not None:
                intrusions.append(client_id)
                stop.wait(1.0)  # holds the connection until the broker drops it, or a second
                sock.close()
            stop.wait(1.0)

    thread = threading.Thread(target=firmware, daemon=True)
    try:
        daemon.start()
        thread.start()
        count = 600
        topic = f"farm/{site}/esp32-b/reservoir"
        for n in range(count):  # readings flow while the device keeps reconnecting
            # (no matching subscriber: at that instant ingestd had no session)
            accepted = (0, NO_MATCHING_SUBSCRIBERS)
            assert device.publish(topic, json.dumps({"seq": n})) in accepted
            time.sleep(0.01)
        stop.set()
        thread.join(10)
        assert len(intrusions) >= 3, intrusions
        assert _seqs_stored(victoria_metrics, site, count) == {float(n) for n in range(count)}
        lost = [k for k, v in daemon.metrics().items() if "session_lost" in k and v]
        assert not lost, lost
        assert daemon.metric("ingestd_mqtt_reconnects_total") == 0
        assert daemon.terminate() == 0
    finally:
        stop.set()
        device.close()
        daemon.close()


# --- what the broker keeps for a client ---------------------------------------------------


def _shipped_setting(name: str) -> int:
    match = re.search(rf"^{name} (\d+)$", SHIPPED_CONF.read_text(), re.MULTILINE)
    assert match, f"{SHIPPED_CONF}: no {name}"
    return int(match.group(1))


def test_a_flooding_device_cannot_grow_ingestds_queue_past_max_queued_bytes(
    gateway: GatewayMosquitto,
) -> None:
    limit = _shipped_setting("max_queued_bytes")
    assert 0 < limit <= 256 * 2**20, "sized for a 1 GiB gateway"
    # ingestd's session, subscribed, then away (restarting, or its spool full).
    ingestd = Client(gateway, "ingestd", USERS["ingestd"], client_id="ingestd", session_expiry=3600)
    assert ingestd.subscribe("farm/#") == [1]
    ingestd.close()
    device = Client(gateway, "esp32-a", USERS["esp32-a"])
    try:
        size = 120 * 1024  # a packet just under max_packet_size
        blob = b"x" * size
        flood = limit * 5 // 4 // size + 1  # a quarter more than the limit
        device.publish_many([("farm/site1/esp32-a/blob", blob)] * flood)
        back = Client(
            gateway, "ingestd", USERS["ingestd"], client_id="ingestd", session_expiry=3600
        )
        try:
            assert back.session_present
            # Published after the flood: queued behind what the broker kept of it.
            assert device.publish("farm/site1/esp32-a/fence", b"fence") == 0
            wait_until(
                lambda: b"fence" in back.received("farm/site1/esp32-a/fence"),
                "ingestd got the flood the broker kept, then the fence",
                timeout=120,
            )
            with back._lock:
                kept = sum(n for n in back.sizes if n == size)
            assert kept <= limit + size, f"{kept} bytes queued for ingestd, limit {limit}"
            assert kept >= limit // 2, f"only {kept} bytes of {limit} kept"
        finally:
            back.close()
    finally:
        device.close()


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) / 1024


def _packet(kind: int, body: bytes) -> bytes:
    """An MQTT packet: fixed header (type and flags, remaining length) and body."""
    length, size = b"", len(body)
    while True:
        size, digit = divmod(size, 128)
        length += bytes([digit | (0x80 if size else 0)])
        if not size:
            return bytes([kind]) + length + body


def _string(text: str) -> bytes:
    return struct.pack("!H", len(text.encode())) + text.encode()


def test_a_device_that_stops_reading_cannot_make_the_broker_hold_more_than_the_limits(
    gateway: GatewayMosquitto,
) -> None:
    """A device subscribed to its own /set topic (it may read that), which publishes there
    and never reads its socket, with the largest in-flight window MQTT 5 allows: the
    broker holds what it cannot send for it, up to max_inflight_bytes + max_queued_bytes of
    payload (twice that in RAM: the stored message and the packet waiting to be sent)."""
    limits = _shipped_setting("max_inflight_bytes") + _shipped_setting("max_queued_bytes")
    assert gateway.pid is not None
    user, password = "esp32-a", USERS["esp32-a"]
    topic = f"homie/{user}/probe/ph/set"
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect((gateway.host, gateway.port))
        receive_maximum = b"\x21\xff\xff"  # property: Receive Maximum 65,535
        connect = _string("MQTT") + bytes([5, 0xC2]) + struct.pack("!H", 60)
        connect += bytes([len(receive_maximum)]) + receive_maximum
        connect += _string(user) + _string(user) + _string(password)
        sock.sendall(_packet(0x10, connect))
        assert sock.recv(4)[:4] == b"\x20\x0e\x00\x00", "CONNACK"
        sock.sendall(_packet(0x82, struct.pack("!H", 1) + b"\x00" + _string(topic) + b"\x01"))
        time.sleep(0.5)  # the SUBACK waits in the socket, unread, like all that follows
        before = _rss_mib(gateway.pid)
        payload = b"x" * (120 * 1024)
        sent = 0
        for mid in itertools.cycle(range(1, 65536)):  # QoS 1, each back to this device
            sock.sendall(_packet(0x32, _string(topic) + struct.pack("!H", mid) + b"\x00" + payload))
            sent += len(payload)
            if sent >= 4 * limits:
                break
        # Past the limits the broker drops what it cannot hold, and says so once.
        wait_until(
            lambda: f"dropped for client {user}" in gateway.log_path.read_text(),
            "the broker dropping messages for the device",
        )
        grown = _rss_mib(gateway.pid) - before
    limit_mib = limits / 2**20
    assert grown < 3 * limit_mib, f"the broker grew {grown:.0f} MiB for {sent >> 20} MiB sent"


def test_a_device_reads_nothing_but_its_own_set_commands(
    clients: Callable[[str], Client],
) -> None:
    ingestd, operator = clients("ingestd"), clients("operator")
    a, b = clients("esp32-a"), clients("esp32-b")
    # Mosquitto 2.0.11 grants every subscription; "read" applies when it delivers.
    wide = ("#", "homie/#", "homie/esp32-a/#", "homie/5/#", "farm/#", "alerts/#", "ingestd/#")
    assert a.subscribe(*wide) == [1] * len(wide)
    for client, topic in (
        (b, "farm/site1/esp32-b/reservoir"),
        (b, "homie/esp32-b/probe/ph"),
        (b, "homie/esp32-b/probe/ph/set"),
        (b, "homie/5/esp32-b/probe/ph"),
        (a, "farm/site1/esp32-a/reservoir"),  # its own readings are not read back
        (a, "homie/esp32-a/probe/ph"),
        (a, "homie/esp32-a/$state"),
        (a, "homie/5/esp32-a/probe/ph"),
        (ingestd, "alerts/warning/site1/esp32-a/ph_high"),
        (ingestd, "ingestd/quota/esp32-b"),
        (operator, "alerts/ack/a1b2/operator"),
    ):
        assert client.publish(topic, b"not for a") == 0, topic
    own = ("homie/esp32-a/probe/ph/set", "homie/5/esp32-a/probe/ph/set")
    for topic in own:
        assert a.publish(topic, b"6.0") == 0
    assert ingestd.publish("ingestd/quota/esp32-a", b"fence") == 0
    a.wait_for("ingestd/quota/esp32-a", b"fence")
    assert sorted({t for t, _ in a.messages}) == sorted([*own, "ingestd/quota/esp32-a"])


def test_a_device_cannot_keep_a_session_that_fills_with_its_own_readings(
    gateway: GatewayMosquitto,
) -> None:
    """A device with a persistent session subscribed to everything, then away, and the
    same account publishing from a second connection: nothing may pile up in the session."""
    user, password = "esp32-a", USERS["esp32-a"]
    sink = Client(gateway, user, password, client_id="esp32-a-sink", session_expiry=3600)
    assert sink.subscribe("#") == [1]
    sink.close()
    source = Client(gateway, user, password, client_id="esp32-a-source")
    try:
        source.publish_many(
            [("homie/esp32-a/probe/ph", b"6.1")] * 20
            + [("farm/site1/esp32-a/reservoir", b'{"ph": 6.1}')] * 20
        )
    finally:
        source.close()
    back = Client(gateway, user, password, client_id="esp32-a-sink", session_expiry=3600)
    try:
        # Anything queued comes at once on connecting, before this fence it may read.
        assert back.subscribe("homie/esp32-a/+/+/set") == [1]
        assert back.publish("homie/esp32-a/probe/ph/set", b"fence") == 0
        back.wait_for("homie/esp32-a/probe/ph/set", b"fence")
        assert back.messages == [("homie/esp32-a/probe/ph/set", b"fence")]
    finally:
        back.close()


# --- Homie v5 ------------------------------------------------------------------------------


def test_an_account_named_5_gets_no_homie_v5_device(clients: Callable[[str], Client]) -> None:
    ingestd, b, five = clients("ingestd"), clients("esp32-b"), clients("5")
    assert ingestd.subscribe("homie/#") == [1]
    assert five.subscribe("homie/5/#", "homie/#") == [1, 1]
    assert b.publish("homie/5/esp32-b/probe/ph", b"6.2") == 0
    assert b.publish("homie/5/esp32-b/probe/ph/set", b"6.0") == 0
    ingestd.wait_for("homie/5/esp32-b/probe/ph/set", b"6.0")
    # The broker answers a SUBSCRIBE after what it queued for the client before it.
    assert five.subscribe("fence/#") == [1]
    assert five.messages == [], "the account named 5 read Homie v5 devices"
    for topic in ("homie/5/esp32-b/probe/ph", "homie/5/esp32-b/probe/ph/set", "homie/5/x"):
        assert five.publish(topic, b"1") == PUBACK_NOT_AUTHORIZED, topic
    assert b.publish("homie/esp32-b/probe/ph", b"fence") == 0
    ingestd.wait_for("homie/esp32-b/probe/ph", b"fence")
    assert not [t for t, p in ingestd.messages if p == b"1"]


# --- acknowledgements: who is the broker's word ------------------------------------------


def _add_operator(gateway: GatewayMosquitto, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ingestd", "broker", "add-operator",
         "--passwd", str(gateway.passwd_file), "--acl", str(gateway.acl_file),
         "--host", gateway.host, "--port", str(gateway.port), *args],
        capture_output=True, text=True, check=False, env=env, cwd=REPO, timeout=60,
    )  # fmt: skip


def test_an_operator_acknowledges_only_under_their_own_name(
    gateway: GatewayMosquitto, clients: Callable[[str], Client]
) -> None:
    ingestd = clients("ingestd")
    assert ingestd.subscribe("alerts/ack/#", "farm/#") == [1, 1]
    operator, device = clients("operator"), clients("esp32-a")
    assert operator.publish("alerts/ack/a1b2/operator", b"on it") == 0
    ingestd.wait_for("alerts/ack/a1b2/operator", b"on it")
    # Not as another, not in the old form (whose payload named anyone), not deeper.
    for topic in ("alerts/ack/a1b2/alice", "alerts/ack/a1b2", "alerts/ack/a1b2/operator/x"):
        refused_and_never_delivered(
            operator, topic, "alerts/ack/fence/operator", ingestd, "alerts/ack/#"
        )
    # A second operator, added as mosquitto/README.md says.
    made = _add_operator(gateway, "--json", "alice")
    assert made.returncode == 0, made.stderr
    alice_password = json.loads(made.stdout)["password"]
    gateway.reload()
    wait_until(
        lambda: raw_connack(gateway.host, gateway.port, "alice", alice_password) == 0,
        "alice accepted after reload",
    )
    alice = Client(gateway, "alice", alice_password)
    try:
        assert alice.publish("alerts/ack/a1b2/alice", b"me too") == 0
        ingestd.wait_for("alerts/ack/a1b2/alice", b"me too")
        refused_and_never_delivered(
            alice, "alerts/ack/a1b2/operator", "alerts/ack/fence/alice", ingestd, "alerts/ack/#"
        )
        # A device acknowledges nothing, not even under its own name.
        refused_and_never_delivered(
            device, "alerts/ack/a1b2/esp32-a", "farm/site1/esp32-a/reservoir", ingestd, "farm/#"
        )
        # Alice is an operator like the shipped one: alerts, and no readings.
        refused_and_never_delivered(
            alice, "farm/site1/alice/reservoir", "alerts/ack/fence/alice", ingestd, "farm/#"
        )
    finally:
        alice.close()


RULES = """
rules:
  - name: ph_high
    select: {measurement: reservoir, field: ph}
    above: 7.0
    severity: warning
"""


def test_an_acknowledgement_names_the_broker_account_and_keeps_a_short_note(
    tmp_path: Path, gateway: GatewayMosquitto, victoria_metrics: VictoriaMetrics
) -> None:
    site = f"ba{random.getrandbits(40):x}"
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "farm.yaml").write_text(RULES)
    url = f"mqtt://ingestd:{USERS['ingestd']}@{gateway.host}:{gateway.port}"
    config = daemon_config(
        tmp_path,
        url,
        "farm",
        {"url": victoria_metrics.url},
        mqtt={"subscriptions": [{"template": "farm/{site}/{device}/{measurement}"}]},
        rules={"dir": str(tmp_path / "rules")},
    )
    daemon = DaemonProcess(tmp_path, config)
    device = Client(gateway, "esp32-a", USERS["esp32-a"])
    operator = Client(gateway, "operator", USERS["operator"])
    try:
        daemon.start()
        assert operator.subscribe("alerts/#") == [1]
        assert device.publish(f"farm/{site}/esp32-a/reservoir", b'{"ph": 7.6}') == 0

        def events(kind: str) -> list[dict[str, Any]]:
            found = []
            for topic, payload in list(operator.messages):
                if topic.startswith(f"alerts/warning/{site}/") and payload:
                    event = json.loads(payload)
                    if event["kind"] == kind:
                        found.append(event)
            return found

        wait_until(lambda: events("firing"), "the alert firing")
        alert = events("firing")[0]["id"]
        note = "replacing the probe; " + "x" * 10_000  # a packet may carry 128 KiB
        assert operator.publish(f"alerts/ack/{alert}/operator", note) == 0
        wait_until(lambda: events("acknowledged"), "the acknowledged event")
        (acked,) = events("acknowledged")
        assert acked["acknowledged_by"] == "operator"
        assert acked["reason"] == note[:199] + "\u2026"
        firing = http_request("GET", daemon.http + "/alerts").json()["firing"]
        assert [(a["id"], a["acknowledged_by"]) for a in firing] == [(alert, "operator")]
        assert daemon.terminate() == 0
    finally:
        device.close()
        operator.close()
        daemon.close()


# --- add-operator, add-device ----------------------------------------------------------------


def test_the_shipped_operator_block_is_the_one_add_operator_writes() -> None:
    from ingestd.broker import operator_block  # noqa: PLC0415

    lines = [line.strip() for line in SHIPPED_ACL.read_text().splitlines()]
    start = lines.index("user operator")
    block = [line for line in lines[start:] if line and not line.startswith("#")]
    assert "\n".join(block) + "\n" == operator_block("operator")


def test_add_operator_adds_one_block_and_refuses_other_accounts(
    gateway: GatewayMosquitto,
) -> None:
    made = _add_operator(gateway, "bob")
    assert made.returncode == 0, made.stderr
    assert "alerts/ack/<alert id>/bob" in made.stdout
    again = _add_operator(gateway, "--json", "bob")  # a new password, the same block
    assert again.returncode == 0, again.stderr
    assert not json.loads(again.stdout)["acl_added"]
    acl = gateway.acl_file.read_text()
    assert acl.count("user bob\n") == 1 and acl.count("topic write alerts/ack/+/bob\n") == 1
    assert acl.startswith(SHIPPED_ACL.read_text())
    for name, says in (
        ("esp32-a", "a device's account"),  # a password, no ACL block
        ("ingestd", "reserved"),
        ("5", "reserved"),
        ("bad/name", "invalid operator name"),
        ("eve\n", "invalid operator name"),
    ):
        before = (gateway.acl_file.read_bytes(), gateway.passwd_file.read_bytes())
        result = _add_operator(gateway, "--", name)
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert says in result.stderr, (name, result.stderr)
        assert (gateway.acl_file.read_bytes(), gateway.passwd_file.read_bytes()) == before


def test_the_cluster_acl_gives_each_instance_an_account_and_a_session_of_its_own() -> None:
    instances = {"ingestd-a": "instance-a-Pa55", "ingestd-b": "instance-b-Pa55"}
    broker = start_service(lambda: GatewayMosquitto({**USERS, **instances}, CLUSTER_ACL))
    opened: list[Client] = []
    try:
        for user, password in instances.items():
            # Both send the same client id: each still gets the session of its account.
            client = Client(broker, user, password, client_id="ingestd", session_expiry=3600)
            opened.append(client)
            assert client.subscribe("$share/ingestd/farm/+/+/+", "alerts/ack/#") == [1, 1]
        device = Client(broker, "esp32-a", USERS["esp32-a"])
        opened.append(device)
        sent = [f'{{"seq": {n}}}'.encode() for n in range(40)]
        device.publish_many([("farm/site1/esp32-a/reservoir", p) for p in sent])
        instance_a, instance_b = opened[:2]

        def received() -> list[bytes]:
            return [p for c in (instance_a, instance_b) for _, p in list(c.messages)]

        wait_until(lambda: len(received()) >= len(sent), "every reading at one instance")
        assert sorted(received()) == sorted(sent)  # each once
        assert instance_a.messages and instance_b.messages, "one instance got them all"
        assert instance_a.connects == instance_b.connects == 1, "an instance was thrown out"
        # An instance passes an acknowledgement it was given over HTTP on to the others.
        assert instance_b.publish("alerts/ack/a1b2/night-shift", b"") == 0
        instance_a.wait_for("alerts/ack/a1b2/night-shift", b"")
    finally:
        for client in opened:
            client.close()
        broker.close()
