"""Injection and impersonation, end to end: hostile topics and payloads go to the real broker,
through two ``ingestd run`` processes, into the real VictoriaMetrics and InfluxDB 1.x, and are
read back from both. Every message ends as a point stored exactly as sent (names, tags, values,
timestamp) in both TSDBs, or as a dead letter with a named reason in both daemons; a topic the
broker itself refuses never reaches ingestd. Nothing ends as a mangled point.

Two TSDB quirks stay visible here: VictoriaMetrics has no string values (it stores a string
field as 0, so string fields are compared in InfluxDB only), and InfluxDB 1.x refuses a tag
or field named ``time`` (that line becomes a ``tsdb_refused`` dead letter of the v1 daemon).
"""

from __future__ import annotations

import json
import math
import socket
import sqlite3
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from conftest import ServiceFactory
from daemon import DaemonProcess, daemon_config
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from services import InfluxDB1, Mosquitto, VictoriaMetrics, http_request

from ingestd.lineproto import parse_line

S = 1_000_000_000
FieldValue = float | bool | str


def subscriptions(run: str) -> list[dict[str, Any]]:
    """Every topic starts ``<run>/<test>/``: ``test`` is a tag, so each test reads back its own."""
    base = f"{run}/{{test}}"
    permissive = r"(?s).+"  # an operator's loosest device pattern: escaping must hold alone
    return [
        {
            "template": f"{base}/strict/{{site}}/{{device}}/{{measurement}}",
            "string_fields": ["note"],
        },
        {
            "template": f"{base}/open/{{site}}/{{device}}/{{measurement}}",
            "device_pattern": permissive,
            "string_fields": ["note"],
        },
        {
            "template": f"{base}/lp/{{site}}/{{device}}",
            "codec": "line",
            "device_pattern": permissive,
        },
        {
            "template": f"{base}/val/{{site}}/{{device}}/{{field}}",
            "codec": "value",
            "measurement": "val",
            "device_pattern": permissive,
        },
        {"template": f"{base}/tele/{{device}}/SENSOR", "codec": "tasmota"},
    ]


@dataclass(frozen=True)
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    time_ns: int


@dataclass
class Case:
    """One test's messages and what each must become."""

    run: str
    test: str
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    points: list[tuple[str, Point]] = field(default_factory=list)
    """(topic, point) expected in both TSDBs."""
    rejects: list[tuple[str, str]] = field(default_factory=list)
    """(topic, reason) expected as dead letters in both daemons."""
    v1_refused: list[str] = field(default_factory=list)
    """Topics whose line only InfluxDB 1.x refuses (``tsdb_refused`` in the v1 daemon)."""

    def topic(self, kind: str, *levels: str) -> str:
        return "/".join((self.run, self.test, kind, *levels))

    def stored(self, topic: str, payload: bytes | str, point: Point) -> None:
        self.messages.append((topic, payload.encode() if isinstance(payload, str) else payload))
        self.points.append((topic, point))

    def refused(self, topic: str, payload: bytes | str, reason: str) -> None:
        self.messages.append((topic, payload.encode() if isinstance(payload, str) else payload))
        self.rejects.append((topic, reason))

    def point(
        self,
        measurement: str,
        device: str,
        fields: dict[str, FieldValue],
        time_ns: int,
        **tags: str,
    ) -> Point:
        return Point(measurement, {"test": self.test, "device": device, **tags}, fields, time_ns)


class Stores:
    """The broker, two daemons (one per TSDB API) and reading back from both TSDBs."""

    def __init__(
        self, tmp: Path, broker: Mosquitto, vm: VictoriaMetrics, influx: InfluxDB1
    ) -> None:
        self.run = f"inj{uuid.uuid4().hex[:8]}"
        self.broker, self.vm, self.influx = broker, vm, influx
        influx.create_database(self.run)
        mqtt = {"subscriptions": subscriptions(self.run)}
        self.daemons = {
            "victoria": DaemonProcess(
                tmp / "victoria",
                daemon_config(tmp / "victoria", broker.url, self.run, {"url": vm.url}, mqtt=mqtt),
            ),
            "influx1": DaemonProcess(
                tmp / "influx1",
                daemon_config(
                    tmp / "influx1",
                    broker.url,
                    self.run,
                    {"url": influx.url, "api": "v1", "database": self.run},
                    mqtt=mqtt,
                ),
            ),
        }
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self._tests = 0

    def case(self) -> Case:
        self._tests += 1
        return Case(self.run, f"t{self._tests}")

    def start(self) -> None:
        for daemon in self.daemons.values():
            daemon.start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        for daemon in self.daemons.values():
            daemon.close()

    # --- sending ----------------------------------------------------------------------------

    def received(self) -> dict[str, float]:
        return {n: d.metric("ingestd_messages_received_total") for n, d in self.daemons.items()}

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish at QoS 1 and wait until both daemons took every message to the end: spool
        empty (written or refused), dead letters durable."""
        before = self.received()
        for topic, payload in messages:
            self.client.publish(topic, payload, qos=1).wait_for_publish(30)
        for name, daemon in self.daemons.items():
            want = before[name] + len(messages)
            daemon.wait(
                lambda d=daemon, w=want: (
                    d.metric("ingestd_messages_received_total") >= w
                    and d.metric("ingestd_spool_records") == 0
                ),
                f"done with {len(messages)} messages",
                timeout=60,
            )

    # --- reading back -----------------------------------------------------------------------

    def victoria(self, test: str, expected: int, skip: set[str]) -> set[tuple[Any, ...]]:
        """(metric name, labels, value, ms) of every sample tagged ``test`` but the metrics in
        ``skip``, once ``expected`` are searchable; then once more a second later, so that an
        extra one shows too."""
        match = f'{{test="{test}"}}'

        def samples(series: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
            return {
                (s["metric"]["__name__"], _labels(s["metric"]), value, stamp)
                for s in series
                if s["metric"]["__name__"] not in skip
                for value, stamp in zip(s["values"], s["timestamps"], strict=True)
            }

        self.vm.export_until(match, lambda series: len(samples(series)) >= expected, timeout=30)
        time.sleep(1.2)
        return samples(self.vm.export_until(match, bool))

    def influx1(self, test: str) -> set[tuple[Any, ...]]:
        """(measurement, tags, field, value, ns) of every value tagged ``test``."""
        query = f"SELECT * FROM /.*/ WHERE \"test\" = '{test}' GROUP BY *"
        params = urllib.parse.urlencode({"db": self.run, "q": query, "epoch": "ns"})
        response = http_request("GET", f"{self.influx.url}/query?{params}")
        assert response.status == 200, response.text
        # Numbers as Decimal: InfluxDB writes 1.8446744073709552e19 as 18446744073709552000,
        # which json would read as that integer, not as the double it stands for.
        result = json.loads(response.body, parse_int=Decimal, parse_float=Decimal)
        found = set()
        for series in result["results"][0].get("series", []):
            tags = {k: v for k, v in series["tags"].items() if v}
            for row in series["values"]:
                values = dict(zip(series["columns"], row, strict=True))
                stamp = int(values.pop("time"))
                for key, value in values.items():
                    if isinstance(value, Decimal):
                        value = float(value)  # noqa: PLW2901 - the double it stands for
                    if value is not None:
                        found.add((series["name"], _labels(tags), key, value, stamp))
        return found

    def letters(self, daemon: str, case: Case) -> list[tuple[str, str]]:
        """(topic, reason) of the daemon's dead letters for this test. A line the TSDB
        refused has no topic (the spool keeps lines): it shows as ("device <device>",
        "tsdb_refused"), read from its sample, the line itself."""
        path = Path(self.daemons[daemon].config["spool"]["dir"]) / "deadletters.sqlite"
        prefix = f"{case.run}/{case.test}/"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT topic, reason, sample FROM deadletters").fetchall()
        found = []
        for topic, reason, sample in rows:
            if topic.startswith(prefix):
                found.append((topic, reason))
            elif not topic and reason == "tsdb_refused":
                _, tags, _, _ = parse_line(sample)
                if tags.get("test") == case.test:
                    found.append((f"device {tags['device']}", reason))
        return found

    # --- the check every test ends with -----------------------------------------------------

    def check(self, case: Case) -> None:
        """Publish the case's messages; each is exactly its point in both TSDBs, or a dead
        letter with its reason in both daemons, and nothing else is stored."""
        self.publish(case.messages)
        want_vm = {
            (f"{p.measurement}_{k}", _labels(p.tags), float(v), p.time_ns // 1_000_000)
            for _, p in case.points
            for k, v in p.fields.items()
            if not isinstance(v, str)
        }
        # VictoriaMetrics has no string values: it keeps a string field as 0, so those are
        # compared in InfluxDB only.
        strings = {
            f"{p.measurement}_{k}"
            for _, p in case.points
            for k, v in p.fields.items()
            if isinstance(v, str)
        }
        want_v1 = {
            (p.measurement, _labels(p.tags), k, v, p.time_ns)
            for topic, p in case.points
            if topic not in case.v1_refused
            for k, v in p.fields.items()
        }
        found_vm = self.victoria(case.test, len(want_vm), strings)
        # VictoriaMetrics keeps about 12 significant digits, and no subnormals or -0
        assert {s[:2] + s[3:] for s in found_vm} == {s[:2] + s[3:] for s in want_vm}
        values = {s[:2] + s[3:]: s[2] for s in found_vm}
        for name, labels, value, stamp in want_vm:
            got = values[(name, labels, stamp)]
            assert math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-300), (name, got, value)
        assert self.influx1(case.test) == want_v1
        letters = {
            "victoria": sorted(case.rejects),
            "influx1": sorted(
                [
                    *case.rejects,
                    *(
                        (f"device {p.tags['device']}", "tsdb_refused")
                        for topic, p in case.points
                        if topic in case.v1_refused
                    ),
                ]
            ),
        }
        for name, want in letters.items():
            # a line the TSDB refuses becomes a dead letter after the write, not at intake
            self.daemons[name].wait(
                lambda n=name, w=want: len(self.letters(n, case)) >= len(w), "dead letters"
            )
            assert sorted(self.letters(name, case)) == want, name


def _labels(tags: dict[str, str]) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in tags.items() if k != "__name__")


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    influxdb1: InfluxDB1,
) -> Iterator[Stores]:
    harness = Stores(tmp_path_factory.mktemp("injection"), mosquitto, victoria_metrics, influxdb1)
    try:
        harness.start()
        yield harness
    finally:
        harness.close()


def now_s() -> int:
    return int(time.time())


def json_reading(ts: int, **fields: Any) -> bytes:
    return orjson.dumps({**fields, "ts": ts})


# --- names: separators, quotes, backslashes, unicode -------------------------------------------

HOSTILE_NAMES = [
    "dev,evil=1",
    "dev=x",
    "dev x=1 2",
    'dev"q',
    "dev'q",
    "C:\\temp",  # a backslash before an ordinary character is written as it is
    "semi;colon{brace}[x]",
    "dév€😀",
    "e\u0301\u200b\u202e\ufeff",  # combining accent, zero-width space, RTL override, BOM
    "\u2028line",  # a Unicode line separator is not a line-protocol newline
    "$SYS",
]
AMBIGUOUS = ["dev\\", "dev\\,x", "dev\\\\x", 'dev\\"q', "dev\\ x", "dev\\=x"]


def test_hostile_device_ids_are_stored_exactly_or_refused(stores: Stores) -> None:
    case = stores.case()
    ts = now_s()
    for i, device in enumerate(HOSTILE_NAMES):
        case.stored(
            case.topic("open", "site1", device, "env"),
            json_reading(ts, t=float(i), ok=True),
            case.point("env", device, {"t": float(i), "ok": True}, ts * S, site="site1"),
        )
        # the default device pattern refuses them all: identity is a plain name there
        case.refused(
            case.topic("strict", "site1", device, "env"), json_reading(ts, t=1), "device_invalid"
        )
    for device in AMBIGUOUS:  # read differently by InfluxDB 1.x and VictoriaMetrics
        case.refused(
            case.topic("open", "site1", device, "env"), json_reading(ts, t=1), "bad_characters"
        )
    stores.check(case)


def test_hostile_tag_values_and_measurements_are_stored_exactly_or_refused(stores: Stores) -> None:
    case = stores.case()
    ts = now_s()
    for i, name in enumerate(HOSTILE_NAMES):
        case.stored(
            case.topic("open", name, f"d{i}", name),
            json_reading(ts, t=1.5),
            case.point(name, f"d{i}", {"t": 1.5}, ts * S, site=name),
        )
    for name in AMBIGUOUS:
        case.refused(case.topic("open", name, "d", "env"), json_reading(ts, t=1), "bad_characters")
        case.refused(case.topic("open", "s", "d", name), json_reading(ts, t=1), "bad_characters")
    stores.check(case)


def test_hostile_field_names_and_string_values_are_stored_exactly_or_refused(
    stores: Stores,
) -> None:
    case = stores.case()
    ts = now_s()
    note = 'he said "hi", a=b c\\ d\\'
    fields: dict[str, FieldValue] = {
        name: float(i) for i, name in enumerate(HOSTILE_NAMES) if '"' not in name
    }
    case.stored(
        case.topic("open", "s", "d1", "env"),
        json_reading(ts, note=note, **fields),
        case.point("env", "d1", {"note": note, **fields}, ts * S, site="s"),
    )
    # a payload cannot name the device: "device" is just a field (and nested, a_device)
    case.stored(
        case.topic("open", "s", "d2", "env"),
        json_reading(ts, device="victim", site="elsewhere", t=1, a={"device": 2}),
        case.point("env", "d2", {"t": 1.0, "a_device": 2.0}, ts * S, site="s"),
    )
    for name in AMBIGUOUS:
        case.refused(
            case.topic("open", "s", "d3", "env"), json_reading(ts, **{name: 1}), "bad_characters"
        )
    # VictoriaMetrics reads a double quote in a field key as the start of a string: the rest
    # of the line (the other fields, the timestamp) was lost and the field stored as 0
    case.refused(
        case.topic("open", "s", "d5", "env"), json_reading(ts, t=1, **{'q"': 2}), "bad_characters"
    )
    case.refused(case.topic("val", "s", "d6", 'q"x'), "1", "bad_characters")
    case.refused(
        case.topic("open", "s", "d4", "env"),
        json_reading(ts, t=1, note="two\nlines"),
        "bad_characters",
    )
    stores.check(case)


def test_line_protocol_cannot_forge_identity_inject_tags_or_split_lines(stores: Stores) -> None:
    case = stores.case()
    ts = now_s() * S + 123_456_789  # line protocol carries nanoseconds: kept exactly
    topic = case.topic("lp", "s1", "sensor-7")
    line = (
        "env,device=victim,site=elsewhere,test=other,room=a\\ b\\,c\\=d"
        f' t=1.5,n=3i,ok=t,s="x\\" y=2, \\\\" {ts}'
    )
    case.stored(
        topic,
        line,
        case.point(
            "env",
            "sensor-7",
            {"t": 1.5, "n": 3.0, "ok": True, "s": 'x" y=2, \\'},
            ts,
            site="s1",
            room="a b,c=d",
        ),
    )
    case.refused(
        case.topic("lp", "s1", "sensor-8"), f"env,__name__=evil t=1 {ts}", "tag_not_allowed"
    )
    case.refused(
        case.topic("lp", "s1", "sensor-9"), f"env t=1 {ts}\nenv,t=a\\\\ t=1 {ts}", "bad_characters"
    )
    # InfluxDB 1.x refuses a tag or field named time; VictoriaMetrics stores it
    for kind, text in (("field", f"env time=1 {ts}"), ("tag", f"env,time=x t=1 {ts}")):
        topic = case.topic("lp", "s1", f"time-{kind}")
        tags = {"time": "x"} if kind == "tag" else {}
        fields = {"time": 1.0} if kind == "field" else {"t": 1.0}
        case.stored(topic, text, case.point("env", f"time-{kind}", fields, ts, site="s1", **tags))
        case.v1_refused.append(topic)
    stores.check(case)


# --- topics: wildcards, $SYS, what the broker refuses, length -------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_publish(broker: Mosquitto, topic: bytes, payload: bytes) -> bytes:
    """Publish at QoS 1 over a raw MQTT 3.1.1 connection (paho would refuse most of these
    topics itself); returns the broker's answer: a PUBACK, or b"" when it hung up."""
    connect = bytes([0x10, 12, 0, 4, *b"MQTT", 4, 0x02, 0, 30, 0, 0])
    body = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + payload
    with socket.create_connection((broker.host, broker.port), timeout=10) as sock:
        sock.sendall(connect)
        assert sock.recv(4)[:2] == b"\x20\x02", "no CONNACK"
        sock.sendall(bytes([0x32]) + _varint(len(body)) + body)
        return sock.recv(4)


def test_topics_the_broker_refuses_never_reach_ingestd(stores: Stores) -> None:
    """Wildcards in a topic name, NUL, other control characters, invalid UTF-8 (a lone
    surrogate, a non-character) and an empty topic: Mosquitto hangs up on the publisher.
    $SYS topics are acknowledged but delivered to no one. None of them reaches ingestd."""
    case = stores.case()
    base = f"{case.run}/{case.test}/open/".encode()
    reading = json_reading(now_s(), t=1)
    refused = [
        b"+",
        b"#",
        b"s+x",
        b"s#x",
        b"s\x00x",
        b"s\x01x",
        b"s\x1bx",
        b"s\nx",  # a newline: line protocol could not even escape it
        b"s\rx",
        b"\xff\xfe",  # not UTF-8
        b"\xed\xa0\x80",  # a surrogate
        b"\xef\xbf\xbf",  # U+FFFF, a non-character
    ]
    before = stores.received()
    for level in refused:
        assert raw_publish(stores.broker, base + level + b"/d1/env", reading) == b"", level
    assert raw_publish(stores.broker, b"", reading) == b""
    for topic in (f"$SYS/{case.run}/{case.test}/open/s/d1/env".encode(), b"$SYS/broker/load"):
        assert raw_publish(stores.broker, topic, reading) == b"\x40\x02\x00\x01"  # PUBACK
    ts = now_s()
    # "$SYS" and "$share" below the first level are ordinary names
    for i, level in enumerate(("$SYS", "$share", "$")):
        case.stored(
            case.topic("open", level, f"d{i}", "env"),
            json_reading(ts, t=1),
            case.point("env", f"d{i}", {"t": 1.0}, ts * S, site=level),
        )
    stores.check(case)
    after = stores.received()
    assert all(after[name] - before[name] == len(case.messages) for name in after), (before, after)


def test_very_long_topics_and_names_are_stored_whole_or_refused(stores: Stores) -> None:
    """VictoriaMetrics truncates label values past 16 KiB and label names past 256 bytes
    without a word (a 20,000-character site was stored cut to 16,384); InfluxDB 1.x refuses a
    series key past 64 KiB. ingestd stores names up to 256 bytes whole and refuses longer
    ones, up to MQTT's longest topic (65,535 bytes)."""
    case = stores.case()
    ts = now_s()
    longest = "é" * 128  # 256 bytes
    case.stored(
        case.topic("open", longest, longest, longest),
        json_reading(ts, **{longest: 1}),
        case.point(longest, longest, {longest: 1.0}, ts * S, site=longest),
    )
    head = f"{case.run}/{case.test}/open/".encode()
    for size in (257, 20_000, 65_535 - len(head) - len("/d/env")):
        case.refused(
            case.topic("open", "s" * size, "d", "env"), json_reading(ts, t=1), "name_too_long"
        )
    case.refused(case.topic("open", "s", "d", "m" * 300), json_reading(ts, t=1), "name_too_long")
    case.refused(case.topic("open", "s", "é" * 129, "env"), json_reading(ts, t=1), "name_too_long")
    case.refused(
        case.topic("open", "s", "d", "env"), json_reading(ts, **{"k" * 257: 1}), "name_too_long"
    )
    case.refused(case.topic("lp", "s", "d"), f"env,{'k' * 257}=v t=1 {ts * S}", "name_too_long")
    case.refused(
        case.topic("strict", "s", "d" * 65, "env"), json_reading(ts, t=1), "device_invalid"
    )
    stores.check(case)


# --- numbers, nesting, timestamps -------------------------------------------------------------


def test_extreme_numbers_are_stored_exactly_or_refused(stores: Stores) -> None:
    case = stores.case()
    ts = now_s()
    exact = {
        "zero": 0.0,
        "neg_zero": -0.0,
        "max": 1.7976931348623157e308,
        "tiny": 5e-324,
        "u64": 18446744073709551615,  # every number is a double: the nearest one
        "i64_min": -9223372036854775808,
        "big": 2**53 + 1,
    }
    case.stored(
        case.topic("open", "s", "d1", "env"),
        json_reading(ts, **exact),
        case.point("env", "d1", {k: float(v) for k, v in exact.items()}, ts * S, site="s"),
    )
    for i, text in enumerate(("2" + "0" * 19, "-" + "2" * 20, "1" + "0" * 30)):  # past 64 bits
        case.stored(
            case.topic("open", "s", f"int{i}", "env"),
            f'{{"t": {text}, "ts": {ts}}}',
            case.point("env", f"int{i}", {"t": float(text)}, ts * S, site="s"),
        )
    for i, text in enumerate(("1e400", "-1e400", "1" + "0" * 400)):  # beyond a double
        case.refused(
            case.topic("open", "s", f"inf{i}", "env"), f'{{"t": {text}, "ts": {ts}}}', "not_finite"
        )
    for i, text in enumerate(("NaN", "Infinity", "-Infinity", "0x10", "1_000", "+1")):
        case.refused(
            case.topic("open", "s", f"bad{i}", "env"), f'{{"t": {text}, "ts": {ts}}}', "malformed"
        )
    for i, text in enumerate(("1e400", "nan", "-inf")):
        case.refused(case.topic("val", "s", f"v{i}", "t"), text, "not_finite")
    ns = ts * S
    lines = {"i": "9223372036854775807i", "u": "18446744073709551615u", "f": "-0", "e": "1e308"}
    case.stored(
        case.topic("lp", "s", "lp1"),
        "env " + ",".join(f"{k}={v}" for k, v in lines.items()) + f" {ns}",
        case.point(
            "env",
            "lp1",
            {"i": 9223372036854775807.0, "u": 18446744073709551615.0, "f": -0.0, "e": 1e308},
            ns,
            site="s",
        ),
    )
    for i, value in enumerate(("9223372036854775808i", "18446744073709551616u", "1e400", "nan")):
        case.refused(case.topic("lp", "s", f"lpbad{i}"), f"env t={value} {ns}", "malformed")
    stores.check(case)


def test_json_nested_10000_deep_is_refused_without_a_crash(stores: Stores) -> None:
    case = stores.case()
    ts = now_s()
    deep = '{"a":' * 10_000 + "1" + "}" * 10_000
    case.refused(case.topic("open", "s", "d1", "env"), deep, "malformed")
    case.refused(case.topic("open", "s", "d2", "env"), "[" * 10_000 + "]" * 10_000, "malformed")
    case.refused(
        case.topic("tele", "d3", "SENSOR"), '{"S":' * 10_000 + "1" + "}" * 10_000, "malformed"
    )
    nested = f'{{"ts": {ts}, ' + '"a": {' * 16 + '"a": 1' + "}" * 16 + "}"  # 16 levels in
    case.stored(
        case.topic("open", "s", "d4", "env"),
        nested,
        case.point("env", "d4", {"_".join(["a"] * 17): 1.0}, ts * S, site="s"),
    )
    deeper = nested.replace('"a": 1', '"a": {"a": 1}')  # one more: flattening stops at 16
    case.refused(case.topic("open", "s", "d5", "env"), deeper, "malformed")
    stores.check(case)


def test_timestamps_in_every_unit_or_confused_are_exact_or_refused(stores: Stores) -> None:
    """Epoch seconds, ms, µs and ns are told apart by magnitude, so each lands on the same
    instant; what no unit makes plausible (0, the year 3000, a unit the codec does not take)
    is refused by the clock guard, never stored at a wrong time."""
    case = stores.case()
    ts = now_s()
    year_3000 = 32503680000  # beyond 2262 in every unit: no TSDB holds it in nanoseconds
    year_2200 = 7258118400
    same = {
        "s": ts,
        "ms": ts * 1000,
        "us": ts * 1_000_000,
        "ns": ts * S,
        "s_text": str(ts),
        "ms_text": str(ts * 1000),
        "iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)),
        "iso_offset": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts)),
    }
    for unit, stamp in same.items():
        case.stored(
            case.topic("open", "s", f"same-{unit}", "env"),
            orjson.dumps({"t": 1, "ts": stamp}),
            case.point("env", f"same-{unit}", {"t": 1.0}, ts * S, site="s"),
        )
    case.stored(  # a fraction of a second in text is kept to the nanosecond
        case.topic("open", "s", "fraction", "env"),
        orjson.dumps({"t": 1, "ts": f"{ts}.123456789"}),
        case.point("env", "fraction", {"t": 1.0}, ts * S + 123_456_789, site="s"),
    )
    refused = {
        "zero": (0, "time_too_old"),
        "negative": (-1, "time_too_old"),
        "year3000-s": (year_3000, "bad_timestamp"),
        "year3000-ms": (year_3000 * 1000, "bad_timestamp"),
        "year3000-us": (year_3000 * 1_000_000, "bad_timestamp"),
        "year3000-ns": (year_3000 * S, "bad_timestamp"),
        "year3000-iso": ("3000-01-01T00:00:00Z", "bad_timestamp"),
        "year2200-s": (year_2200, "time_future"),
        "year2200-ms": (year_2200 * 1000, "time_future"),
        "year2200-us": (year_2200 * 1_000_000, "time_future"),
        "year2200-ns": (year_2200 * S, "time_future"),
        "year2200-iso": ("2200-01-01T00:00:00Z", "time_future"),
        "ahead-6min": (ts + 360, "time_future"),
        "behind-31d": (ts - 31 * 86400, "time_too_old"),
        "1970-iso": ("1970-01-01T00:00:00Z", "time_too_old"),
        "feb30": ("2024-02-30T00:00:00Z", "bad_timestamp"),
        "bool": (True, "bad_timestamp"),
        "words": ("yesterday", "bad_timestamp"),
        "huge": ("1e400", "bad_timestamp"),
    }
    for name, (stamp, reason) in refused.items():
        payload = f'{{"t": 1, "ts": {json.dumps(stamp)}}}'  # orjson stops at 64-bit integers
        case.refused(case.topic("open", "s", name, "env"), payload, reason)
    # line protocol is nanoseconds: seconds or milliseconds there mean 1970
    for unit, stamp in (("s", ts), ("ms", ts * 1000), ("us", ts * 1_000_000)):
        case.refused(case.topic("lp", "s", f"lp-{unit}"), f"env t=1 {stamp}", "time_too_old")
    case.stored(
        case.topic("lp", "s", "lp-ns"),
        f"env t=1 {ts * S + 7}",
        case.point("env", "lp-ns", {"t": 1.0}, ts * S + 7, site="s"),
    )
    stores.check(case)


def test_tasmota_sensor_names_are_stored_exactly_or_refused(stores: Stores) -> None:
    case = stores.case()
    ts = now_s()
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))  # Tasmota: local time, UTC here
    sensors = {"DS18B20,x=1": {"T": 1.5}, "AM 2301": {"T": 2.5}, "Ñ😀": {"T": 3.5}}
    case.stored(
        case.topic("tele", "plug-1", "SENSOR"),
        orjson.dumps({"Time": when, **sensors, "device": "victim", "TempUnit": "C"}),
        case.point("tasmota", "plug-1", {"T": 1.5}, ts * S, sensor="DS18B20,x=1"),
    )
    for sensor in ("AM 2301", "Ñ😀"):
        case.points.append(
            (
                case.topic("tele", "plug-1", "SENSOR"),
                case.point("tasmota", "plug-1", sensors[sensor], ts * S, sensor=sensor),
            )
        )
    for i, bad in enumerate(("S\\\\", 'S"', "S" * 257)):
        case.refused(
            case.topic("tele", f"plug-{i + 2}", "SENSOR"),
            orjson.dumps(
                {"Time": when, "S": {bad if i == 1 else "T": 1}}
                if i == 1
                else {"Time": when, bad: {"T": 1}}
            ),
            "name_too_long" if i == 2 else "bad_characters",
        )
    stores.check(case)


# --- a 100 MB payload ---------------------------------------------------------------------------

MIB = 1 << 20


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (the peak) of a process, from /proc."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def _one_daemon(tmp: Path, broker: Mosquitto, vm: VictoriaMetrics, prefix: str) -> DaemonProcess:
    config = daemon_config(tmp, broker.url, prefix, {"url": vm.url})
    return DaemonProcess(tmp, config).start()


def _publish(broker: Mosquitto, topic: str, payload: bytes) -> None:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(120)
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_100_mb_payload_is_refused_before_parsing_and_memory_comes_back(
    tmp_path: Path, services: ServiceFactory, victoria_metrics: VictoriaMetrics
) -> None:
    """Through a broker without a size limit (the test fixture's), a 100 MB reading reaches
    ingestd: paho has to read it whole, so the peak RSS rises by a few times its size, but it
    is refused by size (too_large) before the JSON is parsed - it is valid JSON that would
    otherwise be a reading - kept as a dead letter with a 1 KiB sample, and the memory goes
    back: after three of them RSS has grown by less than one payload. (It grew by 100 MiB per
    payload: the Reject kept by the intake held its traceback, and through it the frames
    holding the packet, in a cycle that only a full GC collects.) What the allocator keeps
    of paho's receive buffers varies from run to run: +10 to +49 MiB measured here."""
    broker = services.mosquitto()
    prefix = f"big{uuid.uuid4().hex[:8]}"
    daemon = _one_daemon(tmp_path, broker, victoria_metrics, prefix)
    try:
        assert daemon.process is not None
        pid = daemon.process.pid
        for i in range(20):  # warm up: a steady state to compare with
            _publish(broker, f"{prefix}/s1/dev{i}/reservoir", b'{"ph": 6.1}')
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 20, "warm")
        before = memory_kib(pid)
        payload = b'{"ph": 6.1, "pad": "' + b"x" * (100 * MIB) + b'"}'
        for n in (1, 2, 3):
            _publish(broker, f"{prefix}/s1/big/reservoir", payload)
            daemon.wait(
                lambda n=n: (
                    daemon.metric('ingestd_messages_rejected_total{reason="too_large"}') == n
                ),
                "the 100 MB payload refused",
                timeout=120,
            )
        _publish(broker, f"{prefix}/s1/after/reservoir", b'{"ph": 6.2}')
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 21, "going on")
        after = memory_kib(pid)
        grew_mib = (after["VmRSS"] - before["VmRSS"]) / 1024
        peak_mib = (after["VmHWM"] - before["VmRSS"]) / 1024
        print(
            f"RSS before {before['VmRSS'] / 1024:.1f} MiB, after {after['VmRSS'] / 1024:.1f} "
            f"MiB (+{grew_mib:.1f}), peak +{peak_mib:.1f} MiB"
        )
        assert grew_mib < len(payload) / MIB, (before, after)  # no payload is held
        path = Path(daemon.config["spool"]["dir"]) / "deadletters.sqlite"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            rows = db.execute("SELECT topic, reason, detail, size, sample FROM deadletters")
            (topic, reason, detail, size, sample), *others = rows.fetchall()
        assert len(others) == 2
        assert (topic, reason, size) == (f"{prefix}/s1/big/reservoir", "too_large", len(payload))
        assert detail == f"{len(payload)} bytes > 65536"
        assert sample == payload[:1024]
        series = victoria_metrics.export_until(
            f'reservoir_ph{{farm="{prefix}"}}', lambda s: len(s) == 21
        )
        assert "big" not in {s["metric"]["device"] for s in series}
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_the_gateway_broker_config_refuses_100_mb_and_ingestd_never_sees_it(
    tmp_path: Path, services: ServiceFactory, victoria_metrics: VictoriaMetrics
) -> None:
    """mosquitto/ingestd-gateway.conf's max_packet_size (128 KiB, twice guard.max_payload_bytes)
    makes the broker hang up on the sender: the daemon's memory and counters do not move."""
    gateway = Path(__file__).resolve().parent.parent / "mosquitto" / "ingestd-gateway.conf"
    limit = next(
        line for line in gateway.read_text().splitlines() if line.startswith("max_packet_size ")
    )
    broker = services.mosquitto(extra_config=limit)
    prefix = f"gw{uuid.uuid4().hex[:8]}"
    daemon = _one_daemon(tmp_path, broker, victoria_metrics, prefix)
    try:
        assert daemon.process is not None
        _publish(broker, f"{prefix}/s1/dev/reservoir", b'{"ph": 6.1}')
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 1, "warm")
        before = memory_kib(daemon.process.pid)
        received = daemon.metric("ingestd_messages_received_total")
        topic = f"{prefix}/s1/big/reservoir".encode()
        payload = b'{"ph": 6.1, "pad": "' + b"x" * (100 * MIB) + b'"}'
        body_size = 2 + len(topic) + 2 + len(payload)
        with socket.create_connection((broker.host, broker.port), timeout=10) as sock:
            sock.sendall(bytes([0x10, 12, 0, 4, *b"MQTT", 4, 0x02, 0, 30, 0, 0]))
            assert sock.recv(4)[:2] == b"\x20\x02"
            head = bytes([0x32]) + _varint(body_size) + len(topic).to_bytes(2, "big") + topic
            sent = 0
            with pytest.raises(OSError):  # the broker hangs up: EPIPE or ECONNRESET
                sock.sendall(head + b"\x00\x01")
                for start in range(0, len(payload), MIB):
                    sock.sendall(payload[start : start + MIB])
                    sent += MIB
                assert sock.recv(4) == b"", "no PUBACK for an oversized packet"
                raise ConnectionResetError("hung up after reading it all")  # pragma: no cover
        assert sent < len(payload), "the broker read the whole 100 MB"
        _publish(broker, f"{prefix}/s1/after/reservoir", b'{"ph": 6.2}')
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") == 2, "going on")
        assert daemon.metric("ingestd_messages_received_total") == received + 1
        after = memory_kib(daemon.process.pid)
        assert after["VmHWM"] - before["VmHWM"] < 8 * 1024, (before, after)
        assert daemon.terminate() == 0
    finally:
        daemon.close()
