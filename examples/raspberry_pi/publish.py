#!/usr/bin/env python3
"""Raspberry Pi reservoir probe for ingestd (CPython 3.9+, paho-mqtt 2.x).

Publishes one JSON reading every --interval seconds, at QoS 1, to

    farm/<site>/<device>/reservoir      {"water_temp": 20.437, "ph": 6.1, "ec": 1.8, "time": ...}

logged in to the gateway's broker as <device> (the MQTT username IS the device id; get its
password with `sudo ingestd broker add-device DEVICE --site SITE` on the gateway). The water
temperature comes from a DS18B20 on the 1-Wire bus (dtoverlay=w1-gpio); pH and EC are stubs
to replace with your probe's code (read_ph, read_ec below).

    pip install 'paho-mqtt>=2,<3'
    MQTT_PASSWORD=... ./publish.py --broker gateway.local --site greenhouse-1 --device rpi-3
    ./publish.py ... --once        # one reading, wait for the broker's PUBACK, exit 0 (or 1)

See examples/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

W1_DIR = Path("/sys/bus/w1/devices")
MIN_VALID_YEAR = 2024


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# ---- SENSORS: replace read_ph and read_ec with your probe's code -----------------------------
def read_ph() -> float | None:
    """REPLACE: the reservoir's pH, e.g. from an ADS1115 ADC over I2C. None when unreadable."""
    return 6.0 + random.uniform(-0.3, 0.3)


def read_ec() -> float | None:
    """REPLACE: electrical conductivity in mS/cm. None when unreadable."""
    return 1.8 + random.uniform(-0.2, 0.2)


def read_ds18b20(w1_dir: Path) -> float | None:
    """Water temperature (deg C) from the first DS18B20 (family 28) under ``w1_dir``.

    Reads ``temperature`` (millidegrees, newer kernels) or else ``w1_slave`` (two lines:
    "... crc=xx YES" and "... t=20437"). None when there is no sensor or the CRC failed.
    """
    for sensor in sorted(w1_dir.glob("28-*")):
        try:
            plain = sensor / "temperature"
            if plain.exists():
                return int(plain.read_text().strip()) / 1000
            lines = (sensor / "w1_slave").read_text().splitlines()
        except (OSError, ValueError) as exc:
            log(f"ds18b20 {sensor.name}: {exc}")
            continue
        if len(lines) >= 2 and lines[0].strip().endswith("YES") and "t=" in lines[1]:
            return int(lines[1].rsplit("t=", 1)[1]) / 1000
        log(f"ds18b20 {sensor.name}: bad read (CRC), skipped")
    return None


_warned: set[Path] = set()


def read_water_temp(w1_dir: Path) -> float | None:
    value = read_ds18b20(w1_dir)
    if value is None:
        # Fallback stub so the example runs on a Pi without the sensor: REPLACE or remove.
        if w1_dir not in _warned:
            _warned.add(w1_dir)
            log(f"no DS18B20 under {w1_dir}: using a stub water temperature")
        return 20.5 + random.uniform(-1.0, 1.0)
    return value


# ---- end of SENSORS --------------------------------------------------------------------------


def clock_synced(mode: str) -> bool:
    """Whether to trust this Pi's clock for the reading's "time" field.

    A Pi has no battery clock: after boot fake-hwclock restores the last saved time, which
    looks plausible but is wrong until NTP has synced. ``auto`` asks systemd (timesyncd or
    chrony) whether the kernel clock is synchronized.
    """
    if mode != "auto":
        return mode == "always"
    timedatectl = shutil.which("timedatectl")
    if timedatectl is None or time.gmtime().tm_year < MIN_VALID_YEAR:
        return False
    try:
        result = subprocess.run(
            [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.stdout.strip() == "yes"


def make_reading(w1_dir: Path, time_mode: str) -> dict[str, Any]:
    """The message: a field per sensor that answered, and "time" (epoch ms) when the clock
    is trusted; without it ingestd stamps the reading with its receipt time."""
    reading: dict[str, Any] = {}
    sensors = (
        ("ph", read_ph),
        ("ec", read_ec),
        ("water_temp", lambda: read_water_temp(w1_dir)),
    )
    for field, read in sensors:
        try:
            value = read()
        except Exception as exc:  # one broken sensor must not stop the others
            log(f"sensor {field} failed: {exc!r}")
            continue
        if value is not None:
            reading[field] = round(value, 3)
    if reading and clock_synced(time_mode):
        reading["time"] = time.time_ns() // 1_000_000
    return reading


class Publisher:
    """A paho client on its own network thread that reconnects by itself (1 s .. 60 s)."""

    def __init__(self, args: argparse.Namespace, password: str | None) -> None:
        self.connected = threading.Event()
        self.refused: str | None = None
        self.stopping = False
        self.acks = threading.Condition()
        self.acked: set[int] = set()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=args.client_id or args.device,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        self.client.username_pw_set(args.username or args.device, password)
        if args.tls or args.ca_file:
            self.client.tls_set(ca_certs=args.ca_file)
        # paho keeps QoS 1 messages that were not acknowledged and re-sends them after a
        # reconnect; bound what it holds while the broker is away (a day at 30 s: 2880).
        self.client.max_queued_messages_set(5000)
        self.client.reconnect_delay_set(min_delay=1, max_delay=60)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.host, self.port = args.broker, args.port

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        if reason.is_failure:
            # Bad username/password or not authorised: retrying will not help.
            self.refused = str(reason)
            log(f"broker refused the connection: {reason} (check --device and the password)")
            client.disconnect()
            return
        log(f"connected to {self.host}:{self.port}")
        self.connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:  # fmt: skip
        if self.connected.is_set() and not self.stopping:
            log(f"disconnected ({reason}); reconnecting")
        self.connected.clear()

    def start(self, timeout: float) -> bool:
        self.client.connect_async(self.host, self.port, keepalive=60)
        self.client.loop_start()
        return self.connected.wait(timeout)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:  # fmt: skip
        with self.acks:  # QoS 1: called when the broker's PUBACK for ``mid`` arrived
            self.acked.add(mid)
            self.acks.notify_all()

    def publish(self, topic: str, reading: dict[str, Any], timeout: float) -> bool:
        """Publish at QoS 1; True once the broker's PUBACK came back within ``timeout``.

        When it did not (broker away), paho keeps the message and re-sends it after
        reconnecting.
        """
        payload = json.dumps(reading, separators=(",", ":"))
        with self.acks:
            self.acked.clear()  # late PUBACKs of earlier readings
        info = self.client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log(f"publish failed: {mqtt.error_string(info.rc)}")  # e.g. paho's queue is full
            return False
        with self.acks:
            acked = self.acks.wait_for(lambda: info.mid in self.acked, timeout)
            self.acked.discard(info.mid)
        return acked

    def stop(self) -> None:
        self.stopping = True
        self.client.disconnect()
        self.client.loop_stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Publish reservoir readings to an ingestd gateway over MQTT (QoS 1)."
    )
    parser.add_argument(
        "--broker",
        default="gateway.local",
        help="broker host, or mqtt://HOST:PORT / mqtts://HOST:PORT (default gateway.local)",
    )
    parser.add_argument("--port", type=int, default=None, help="default 1883, 8883 with TLS")
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-file", help="CA bundle for TLS (system CAs when not given)")
    parser.add_argument("--site", required=True, help="the site level of the topic")
    parser.add_argument("--device", required=True, help="device id = MQTT username")
    parser.add_argument("--username", help="MQTT username (default: --device; keep it so)")
    parser.add_argument(
        "--password-file", type=Path, help="file holding the password (else $MQTT_PASSWORD)"
    )
    parser.add_argument("--client-id", help="MQTT client id (default: --device)")
    parser.add_argument("--measurement", default="reservoir", help="default reservoir")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds (default 30)")
    parser.add_argument("--once", action="store_true", help="publish one reading and exit")
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="seconds to wait for the broker (--once)"
    )
    parser.add_argument(
        "--w1-dir", type=Path, default=W1_DIR, help=f"1-Wire devices (default {W1_DIR})"
    )
    parser.add_argument(
        "--time",
        choices=("auto", "always", "never"),
        default="auto",
        help='send the Pi\'s clock as "time": auto = only when NTP-synchronized',
    )
    args = parser.parse_args(argv)
    if "://" in args.broker:
        url = urlsplit(args.broker)
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname:
            parser.error(f"--broker {args.broker!r}: expected mqtt://HOST:PORT or mqtts://")
        args.tls = args.tls or url.scheme == "mqtts"
        args.port = args.port or url.port
        args.broker = url.hostname
    args.port = args.port or (8883 if args.tls else 1883)
    if args.interval <= 0:
        parser.error("--interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.password_file is not None:
        password: str | None = args.password_file.read_text().strip()
    else:
        password = os.environ.get("MQTT_PASSWORD")
    topic = f"farm/{args.site}/{args.device}/{args.measurement}"
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    publisher = Publisher(args, password)
    try:
        if args.once:
            if not publisher.start(args.timeout):
                log(publisher.refused or f"no connection to {args.broker}:{args.port}")
                return 1
            reading = make_reading(args.w1_dir, args.time)
            if not publisher.publish(topic, reading, args.timeout):
                log(f"no PUBACK from the broker within {args.timeout}s")
                return 1
            log(f"sent {topic} {reading}")
            return 0

        publisher.start(0)
        next_at = time.monotonic()
        while not stop.is_set():
            if publisher.refused:
                return 1
            reading = make_reading(args.w1_dir, args.time)
            if publisher.publish(topic, reading, min(args.interval, 30.0)):
                log(f"sent {topic} {reading}")
            else:
                log("not acknowledged yet; paho re-sends it after reconnecting")
            next_at += args.interval
            stop.wait(max(0.0, next_at - time.monotonic()))
        return 0
    finally:
        publisher.stop()


if __name__ == "__main__":
    sys.exit(main())
