"""ingestd's broker session: a lost or taken-over session is said loudly, never quietly
replaced by a fresh one (log, /healthz, ingestd_mqtt_session_lost_total, a pause).

The brokers are real Mosquitto 2.0.11 with the permissive test config, where any client may
use any client id. Mosquitto 2.0.11 never sends MQTT 5's DISCONNECT reason 0x8E "session
taken over" (it closes the socket; 2.0.15 and later send it), so one test puts a relay in
front of the real broker that sends it on demand, as a newer broker does.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory
from daemon import DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion
from services import HOST, Mosquitto, VictoriaMetrics

LOST = 'ingestd_mqtt_session_lost_total{{cause="{}"}}'


def log_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    events = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def arrives(vm: VictoriaMetrics, prefix: str, device: str, seq: int) -> None:
    vm.export_until(
        f'reservoir_seq{{farm="{prefix}",device="{device}"}}',
        lambda series: any(seq in s["values"] for s in series),
        timeout=30,
    )


def take_session(broker: Mosquitto, client_id: str) -> socket.socket:
    """Connect with ``client_id`` and a clean session (MQTT 3.1.1, as ``mosquitto_sub
    -i``), and keep the connection open."""
    raw = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(raw).to_bytes(2, "big") + raw
    sock = socket.create_connection((broker.host, broker.port), timeout=10)
    sock.sendall(bytes([0x10, len(body)]) + body)
    assert sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK refused"
    return sock


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_client_with_ingestds_client_id_and_a_clean_start_is_reported(
    tmp_path: Path, services: ServiceFactory, victoria_metrics: VictoriaMetrics, protocol: str
) -> None:
    broker = services.mosquitto()
    prefix = f"sl{random.getrandbits(32):x}"
    config = daemon_config(tmp_path, broker.url, prefix, {"url": victoria_metrics.url})
    config["mqtt"]["protocol"] = protocol
    client_id = config["mqtt"]["client_id"]
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.start()  # the first connection ever: no session to expect, no alarm
        publish(broker, f"{prefix}/site1/esp32-1/reservoir", b'{"seq": 1}')
        arrives(victoria_metrics, prefix, "esp32-1", 1)
        assert daemon.health()[0] == 200, daemon.health()
        assert not [k for k in daemon.metrics() if "session_lost" in k and "{" in k]

        intruder = take_session(broker, client_id)  # as `mosquitto_sub -i <its id>` would
        try:
            daemon.wait(
                lambda: daemon.metric(LOST.format("not_present")) == 1,
                "reporting its session gone",
            )
        finally:
            intruder.close()
        status, report = daemon.health()
        assert status == 503, report
        session = report["components"]["mqtt_session"]
        assert not session["ok"] and "not_present" in session["detail"], session
        assert client_id in session["detail"], session
        (error,) = [e for e in log_events(daemon) if e.get("cause") == "not_present"]
        assert error["level"] == "error" and error["client_id"] == client_id, error
        for words in ("readings", "lost", "client id", "use_username_as_clientid"):
            assert words in error["event"], error["event"]
        # Loudly, and still at work: with a session of its own again, readings arrive.
        publish(broker, f"{prefix}/site1/esp32-1/reservoir", b'{"seq": 2}')
        arrives(victoria_metrics, prefix, "esp32-1", 2)
        assert daemon.metric(LOST.format("not_present")) == 1
        assert daemon.health()[0] == 503, "the alarm stays up for an operator to see"
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_a_first_start_a_restart_and_an_expired_session_raise_no_alarm(
    tmp_path: Path, services: ServiceFactory, victoria_metrics: VictoriaMetrics
) -> None:
    broker = services.mosquitto()
    prefix = f"se{random.getrandbits(32):x}"
    config = daemon_config(
        tmp_path, broker.url, prefix, {"url": victoria_metrics.url}, mqtt={"session_expiry": "2s"}
    )
    daemon = DaemonProcess(tmp_path, config)
    record = tmp_path / "spool" / "mqtt_session.json"
    try:
        daemon.start()
        assert (
            json.loads(record.read_text())["identity"]["client_id"] == config["mqtt"]["client_id"]
        )
        assert daemon.terminate() == 0
        daemon.start()  # a restart within the session's expiry resumes it
        connected = [e for e in log_events(daemon) if e.get("event") == "connected"]
        assert [e["session_present"] for e in connected] == [False, True], connected
        assert daemon.health()[0] == 200
        assert daemon.terminate() == 0
        # Away longer than the expiry it asked for: the session is gone, as configured.
        stopped = json.loads(record.read_text())["seen_at"]
        while time.time() < stopped + 3:
            time.sleep(0.1)
        take_session(broker, config["mqtt"]["client_id"]).close()  # gone for sure
        daemon.start()
        daemon.wait(lambda: daemon.metric(LOST.format("expired")) == 1, "counting the expiry")
        status, report = daemon.health()
        assert status == 200, report
        (warning,) = [e for e in log_events(daemon) if "session expiry" in e.get("event", "")]
        assert warning["level"] == "warning", warning
        assert daemon.metric(LOST.format("not_present")) == 0
        assert daemon.terminate() == 0
    finally:
        daemon.close()


# --- MQTT 5 "session taken over" ----------------------------------------------------------------


class TakeoverRelay:
    """A TCP relay to a real broker that can end a client's connection the way a broker
    whose session was taken over does: DISCONNECT with reason 0x8E, between two packets.

    Nothing else is changed: the client's bytes go to the broker as they are, the broker's
    packets come back whole (a packet is never cut by the injected DISCONNECT).
    """

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[tuple[socket.socket, socket.socket, threading.Lock]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((self.broker.host, self.broker.port))
            writing = threading.Lock()
            with self._lock:
                self.connections.append((client, upstream, writing))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(
                target=self._packets, args=(upstream, client, writing), daemon=True
            ).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    @staticmethod
    def _packets(source: socket.socket, target: socket.socket, writing: threading.Lock) -> None:
        buffer = b""
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                buffer += data
                while (size := _packet_size(buffer)) is not None:
                    with writing:
                        target.sendall(buffer[:size])
                    buffer = buffer[size:]
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def take_over(self) -> None:
        """DISCONNECT 0x8E to the newest connection's client, then both sides closed."""
        with self._lock:
            client, upstream, writing = self.connections[-1]
        with writing:
            with contextlib.suppress(OSError):
                client.sendall(b"\xe0\x02\x8e\x00")  # reason 0x8E, no properties
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for client, upstream, _ in self.connections:
                client.close()
                upstream.close()


def _packet_size(buffer: bytes) -> int | None:
    """The length of the complete MQTT packet at the start of ``buffer``, or None."""
    remaining, shift = 0, 0
    for i in range(1, min(len(buffer), 5)):
        remaining |= (buffer[i] & 0x7F) << shift
        shift += 7
        if not buffer[i] & 0x80:
            size = i + 1 + remaining
            return size if len(buffer) >= size else None
    return None


@pytest.fixture
def relay(mosquitto: Mosquitto) -> Iterator[TakeoverRelay]:
    relay = TakeoverRelay(mosquitto)
    try:
        yield relay
    finally:
        relay.close()


def test_a_session_taken_over_is_reported_and_ingestd_pauses_before_taking_it_back(
    tmp_path: Path, mosquitto: Mosquitto, relay: TakeoverRelay, victoria_metrics: VictoriaMetrics
) -> None:
    prefix = f"st{random.getrandbits(32):x}"
    config = daemon_config(
        tmp_path, f"mqtt://{HOST}:{relay.port}", prefix, {"url": victoria_metrics.url}
    )
    daemon = DaemonProcess(tmp_path, config)
    try:
        daemon.start()
        relay.take_over()
        daemon.wait(lambda: daemon.metric(LOST.format("taken_over")) == 1, "the takeover counted")
        status, report = daemon.health()
        assert status == 503, report
        session = report["components"]["mqtt_session"]
        assert not session["ok"] and "taken_over" in session["detail"], session
        events = log_events(daemon)
        (error,) = [e for e in events if e.get("cause") == "taken_over"]
        assert error["level"] == "error" and "session taken over" in error["event"], error
        assert "disconnected" not in [e.get("event") for e in events], "said as a plain drop"
        assert [e for e in events if str(e.get("event")).startswith("pausing before")], events
        # Back (through the relay) once the pause is over: the broker kept the session, and
        # what was published meanwhile arrives.
        publish(mosquitto, f"{prefix}/site1/esp32-2/reservoir", b'{"seq": 7}')
        daemon.wait(lambda: daemon.metric("ingestd_mqtt_reconnects_total") == 1, "reconnected")
        arrives(victoria_metrics, prefix, "esp32-2", 7)
        connected = [e for e in log_events(daemon) if e.get("event") == "connected"]
        assert [e["session_present"] for e in connected] == [False, True], connected
        assert daemon.metric(LOST.format("not_present")) == 0
        assert daemon.terminate() == 0
    finally:
        daemon.close()
