"""The audited prototype's design as a reference consumer: paho-mqtt subscribes, and each
message is written to the TSDB synchronously through influxdb-client, one write per message,
inside the message callback (/work/shared/seed/: ``write_api(write_options=SYNCHRONOUS)``).

    .venv/bin/python bench/prototype.py --mqtt mqtt://127.0.0.1:1883 --topic 'farm/#' \\
        --influx http://127.0.0.1:8428

Topics are ``<farm>/<site>/<device>/<measurement>`` with a JSON object of numbers, as the
simulator sends; each becomes one point tagged farm, site and device, stamped at receipt
(nanoseconds). Prints ``subscribed`` once the broker granted the subscription, then
``<written> <CLOCK_MONOTONIC of the last write>`` whenever the count changed (at most every
50 ms), for bench/run.py to follow. A failed write is reported on stderr and skipped, as
the prototype did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from paho.mqtt.enums import CallbackAPIVersion

new_point: Callable[[str], Any] = Point  # influxdb-client's Point is untyped


class Prototype:
    def __init__(self, influx_url: str, bucket: str) -> None:
        self.influx = InfluxDBClient(url=influx_url, token="bench", org="farm", timeout=30_000)
        self.write_api = self.influx.write_api(write_options=SYNCHRONOUS)
        self.bucket = bucket
        self.written = 0
        self.errors = 0
        self.last = time.monotonic()

    def on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        farm, site, device, measurement = message.topic.split("/")
        point = (
            new_point(measurement)
            .tag("farm", farm)
            .tag("site", site)
            .tag("device", device)
            .time(time.time_ns(), WritePrecision.NS)
        )
        for field, value in json.loads(message.payload).items():
            point.field(field, float(value))
        try:
            self.write_api.write(bucket=self.bucket, record=point)
        except Exception as exc:  # the prototype logged and went on
            self.errors += 1
            print(f"write failed: {exc}", file=sys.stderr, flush=True)
            return
        self.written += 1
        self.last = time.monotonic()

    def report(self) -> None:
        shown = -1
        while True:
            if self.written != shown:
                shown = self.written
                print(f"{shown} {self.last}", flush=True)
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mqtt", required=True, help="mqtt://HOST:PORT")
    parser.add_argument("--topic", required=True, help="MQTT filter, e.g. 'farm/#'")
    parser.add_argument("--influx", required=True, help="http://HOST:PORT of the TSDB")
    parser.add_argument("--bucket", default="farm")
    parser.add_argument("--client-id", default="")
    args = parser.parse_args()

    prototype = Prototype(args.influx, args.bucket)
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=args.client_id)
    client.on_message = prototype.on_message

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        c.subscribe(args.topic, qos=1)

    def on_subscribe(_c: Any, _u: Any, _mid: Any, _codes: Any, _p: Any) -> None:
        print("subscribed", flush=True)
        threading.Thread(target=prototype.report, daemon=True).start()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    url = urlsplit(args.mqtt)
    client.connect(url.hostname or "127.0.0.1", url.port or 1883)
    with contextlib.suppress(KeyboardInterrupt):
        client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
