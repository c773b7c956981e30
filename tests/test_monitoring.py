"""Monitoring files (deploy/grafana, deploy/prometheus) and the sensor publisher examples.

The dashboard and the alert rules may only use metric names and labels that ingestd really
exports (a renamed metric must break this test, not silently blank a panel or an alert).
The Raspberry Pi publisher runs against the real broker; the MicroPython one runs on
CPython with its hardware modules replaced by fakes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import py_compile
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from services import Mosquitto

from ingestd.config import GuardSection, Subscription
from ingestd.decode import Decoder
from ingestd.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "ingestd-dashboard.json"
ALERT_RULES = REPO / "deploy" / "prometheus" / "ingestd-alerts.yaml"
ESP32 = REPO / "examples" / "esp32_micropython" / "main.py"
RASPBERRY_PI = REPO / "examples" / "raspberry_pi" / "publish.py"

# Labels Prometheus attaches to every scraped series, and the histogram bucket label.
TARGET_LABELS = frozenset({"instance", "job"})
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR_LABELS = re.compile(r"\{([^}]*)\}")
DURATION = re.compile(r"^\d+[smhdw]$")


# --- what ingestd exports -------------------------------------------------------------------


def exported() -> dict[str, frozenset[str]]:
    """Every sample name ingestd's registry can produce -> its label names.

    From the metric families (not the samples: a labelled metric without children yet has
    none), with the suffixes prometheus_client adds per type.
    """
    names: dict[str, frozenset[str]] = {}
    metrics = Metrics()
    for family in metrics.registry.collect():
        labels = _family_labels(metrics, family.name)
        for suffix in SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            names[family.name + suffix] = frozenset(labels | extra)
    return names


def _family_labels(metrics: Metrics, name: str) -> set[str]:
    for value in vars(metrics).values():
        if getattr(value, "_name", None) in (name, name + "_total"):
            return set(value._labelnames)
    raise AssertionError(f"no attribute of Metrics exports {name}")


EXPORTED = exported()


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers outside label matchers, string
    literals and durations that are not functions, keywords or label names."""
    stripped = SELECTOR_LABELS.sub("{}", expr)
    stripped = re.sub(r'"[^"]*"', '""', stripped)
    stripped = re.sub(r"\[[^\]]*\]", "[]", stripped)
    stripped = BY_CLAUSE.sub("", stripped)  # "sum by (x) (" -> "sum  (": an aggregation
    names = set()
    for match in IDENTIFIER.finditer(stripped):
        word = match.group()
        following = stripped[match.end() :].lstrip()
        if following.startswith("("):  # a function or aggregation
            continue
        if word in {"by", "without", "and", "or", "unless", "on", "ignoring", "bool"}:
            continue
        names.add(word)
    return names


def check_expr(expr: str, allowed_external: frozenset[str] = frozenset()) -> set[str]:
    """Asserts the expression only names exported metrics and their labels; returns them."""
    assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"
    assert expr.count("{") == expr.count("}"), f"unbalanced braces: {expr}"
    names = metric_names(expr)
    unknown = names - EXPORTED.keys() - allowed_external
    assert not unknown, f"{sorted(unknown)} not exported by ingestd (in {expr!r})"
    assert names & EXPORTED.keys() or names & allowed_external, f"no metric in {expr!r}"
    labels = set(TARGET_LABELS)
    for name in names & EXPORTED.keys():
        labels |= EXPORTED[name]
    for clause in BY_CLAUSE.findall(expr):
        used = {label.strip() for label in clause.split(",") if label.strip()}
        assert used <= labels, f"labels {sorted(used - labels)} do not exist in {expr!r}"
    for matchers in SELECTOR_LABELS.findall(expr):
        for matcher in filter(None, (m.strip() for m in matchers.split(","))):
            label = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            assert label in labels, f"label {label!r} does not exist in {expr!r}"
    return names


def result_labels(expr: str) -> set[str]:
    """Labels the expression's result series carry (roughly: the last aggregation's `by`)."""
    clauses = BY_CLAUSE.findall(expr)
    if clauses:
        sets = [{label.strip() for label in clause.split(",")} for clause in clauses]
        return set.intersection(*sets)
    labels = set(TARGET_LABELS)
    for name in metric_names(expr) & EXPORTED.keys():
        labels |= EXPORTED[name] - {"le"}
    return labels


def test_the_metric_names_found_are_the_ones_prometheus_exposes() -> None:
    # The helper itself: cross-checked against a real exposition of every family.
    metrics = Metrics()
    metrics.rejected.labels(reason="bad_json").inc()
    metrics.write_errors.labels(status="500").inc()
    metrics.write_seconds.observe(0.1)
    exposition = metrics.registry  # collect() again now that labelled children exist
    sampled = {s.name for family in exposition.collect() for s in family.samples}
    assert {
        "ingestd_messages_rejected_total",
        "ingestd_write_errors_total",
        "ingestd_write_seconds_bucket",
        "ingestd_spool_full",
    } <= sampled
    assert sampled <= EXPORTED.keys()
    assert EXPORTED["ingestd_write_errors_total"] == {"status"}
    assert EXPORTED["ingestd_write_seconds_bucket"] == {"le"}
    assert metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(ingestd_write_seconds_bucket{instance=~"$i"}'
        "[$__rate_interval]))) and up == 0"
    ) == {"ingestd_write_seconds_bucket", "up"}


# --- Grafana dashboard ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_is_an_importable_grafana_10_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 36  # Grafana 10.0 writes 38
    assert dashboard["title"] and dashboard["uid"]
    assert dashboard["id"] is None  # Grafana assigns it on import
    inputs = {item["name"]: item for item in dashboard["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} says what it shows"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    # Panels do not overlap: each grid cell belongs to at most one panel.
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_use_only_metrics_and_labels_ingestd_exports(
    dashboard: dict[str, Any],
) -> None:
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            used |= check_expr(target["expr"])
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in result_labels(target["expr"]), (
                    f"legend {{{{{label}}}}} is not a label of {target['expr']!r}"
                )
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            assert match.group(1) in EXPORTED
    # What an operator needs is on it.
    needed = {
        "ingestd_messages_received_total",
        "ingestd_messages_accepted_total",
        "ingestd_messages_rejected_total",
        "ingestd_points_written_total",
        "ingestd_write_errors_total",
        "ingestd_write_seconds_bucket",
        "ingestd_lag_seconds",
        "ingestd_spool_records",
        "ingestd_spool_bytes",
        "ingestd_spool_full",
        "ingestd_mqtt_connected",
        "ingestd_mqtt_reconnects_total",
        "ingestd_quota_dropped_total",
        "ingestd_quota_shared",
        "ingestd_alerts",
        "ingestd_alert_events_total",
        "ingestd_rule_reload_errors_total",
        "ingestd_notifications_sent_total",
        "ingestd_notifications_failed_total",
        "ingestd_notifications_pending",
        "ingestd_notifications_oldest_pending_seconds",
    }
    assert needed <= used, f"missing from the dashboard: {sorted(needed - used)}"


# --- Prometheus alert rules -----------------------------------------------------------------


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERT_RULES.read_text())
    assert [group["name"] for group in data["groups"]] == ["ingestd"]
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_are_complete_and_use_only_exported_metrics(
    rules: list[dict[str, Any]],
) -> None:
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Ingestd[A-Za-z]+", rule["alert"])
        check_expr(rule["expr"], allowed_external=frozenset({"up"}))
        assert DURATION.match(str(rule["for"])), f"{rule['alert']}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in {"critical", "warning"}
        annotations = rule["annotations"]
        assert len(annotations["summary"]) > 20 and len(annotations["description"]) > 80
        for text in annotations.values():
            assert text.count("{{") == text.count("}}"), rule["alert"]
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in result_labels(rule["expr"]), (
                    f"{rule['alert']}: $labels.{label} is not on {rule['expr']!r}"
                )
        # A state alert (a comparison of a gauge) must hold for a while before it fires;
        # only "this happened" alerts over an increase() window may fire at once.
        if "increase(" not in rule["expr"]:
            assert rule["for"] != "0m" and not str(rule["for"]).startswith("0"), rule["alert"]


def test_alert_rules_cover_what_breaks_a_gateway(rules: list[dict[str, Any]]) -> None:
    by_expr = {" ".join(rule["expr"].split()): rule for rule in rules}

    def rule_with(*fragments: str) -> dict[str, Any]:
        found = [r for e, r in by_expr.items() if all(f in e for f in fragments)]
        assert found, f"no rule with {fragments}"
        return found[0]

    assert rule_with('up{job="ingestd"} == 0')["for"] == "2m"
    assert rule_with("ingestd_spool_full == 1")["labels"]["severity"] == "critical"
    rule_with("deriv(ingestd_spool_bytes")
    sink = rule_with("ingestd_write_errors_total[5m]", "ingestd_points_written_total[5m])) == 0")
    assert sink["for"] == "5m"
    assert rule_with("ingestd_mqtt_connected == 0")["for"] == "2m"
    lost = rule_with('ingestd_mqtt_session_lost_total{cause!="expired"}')
    assert lost["labels"]["severity"] == "critical"
    rule_with("ingestd_lag_seconds >")
    assert rule_with("ingestd_quota_shared == 0")["for"] == "5m"
    rule_with("ingestd_notifications_failed_total")
    rule_with("ingestd_notifications_oldest_pending_seconds >")
    rule_with("ingestd_rule_reload_errors_total")


# --- Raspberry Pi publisher (CPython + paho-mqtt) -------------------------------------------


class Subscriber:
    """Collects what arrives on ``pattern`` (QoS 1), ready once the SUBACK came back."""

    def __init__(self, broker: Mosquitto, pattern: str) -> None:
        self.messages: list[tuple[str, bytes, int]] = []
        self.arrived = threading.Condition()
        subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=MQTTProtocolVersion.MQTTv311,
        )

        def on_connect(client: paho.Client, *_: Any) -> None:
            client.subscribe(pattern, qos=1)

        def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
            with self.arrived:
                self.messages.append((message.topic, message.payload, message.qos))
                self.arrived.notify_all()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def wait(self, count: int, timeout: float = 15) -> list[tuple[str, bytes, int]]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_publisher(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RASPBERRY_PI), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "MQTT_PASSWORD": "device-secret"},
    )


def decode(topic: str, payload: bytes) -> Any:
    """What ingestd makes of the message, with its default farm/... subscription."""
    decoder = Decoder([Subscription(template="farm/{site}/{device}/{measurement}")], GuardSection())
    return decoder.decode(topic, payload, time.time_ns())


def test_raspberry_pi_publisher_once_delivers_a_reading_ingestd_accepts(
    mosquitto: Mosquitto, unique: str, tmp_path: Path
) -> None:
    site, device = f"site-{unique}", f"rpi-{unique}"
    sensor = tmp_path / "w1" / "28-0316a2795aff"
    sensor.mkdir(parents=True)
    (sensor / "w1_slave").write_text(
        "5d 01 4b 46 7f ff 0c 10 1c : crc=1c YES\n5d 01 4b 46 7f ff 0c 10 1c t=21812\n"
    )
    subscriber = Subscriber(mosquitto, f"farm/{site}/#")
    try:
        before = time.time()
        result = run_publisher(
            "--broker", mosquitto.url, "--site", site, "--device", device,
            "--w1-dir", str(tmp_path / "w1"), "--time", "always", "--once", "--timeout", "10",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        messages = subscriber.wait(1)
    finally:
        subscriber.close()
    assert len(messages) == 1, messages
    topic, payload, qos = messages[0]
    assert topic == f"farm/{site}/{device}/reservoir"
    assert qos == 1
    reading = json.loads(payload)
    assert set(reading) == {"ph", "ec", "water_temp", "time"}
    assert reading["water_temp"] == 21.812  # from the DS18B20's w1_slave file
    assert 5.0 < reading["ph"] < 7.0 and 1.0 < reading["ec"] < 3.0
    assert before * 1000 - 1000 <= reading["time"] <= time.time() * 1000 + 1000
    [decoded] = decode(topic, payload)
    assert decoded.device == device and decoded.measurement == "reservoir"
    assert decoded.tags == {"site": site}
    assert decoded.fields == {k: v for k, v in reading.items() if k != "time"}
    assert decoded.time_ns == reading["time"] * 1_000_000
    assert f"sent {topic}" in result.stderr


def test_raspberry_pi_publisher_without_sensor_or_clock_sends_stub_values_and_no_time(
    mosquitto: Mosquitto, unique: str, tmp_path: Path
) -> None:
    site, device = f"site-{unique}", f"rpi-{unique}"
    subscriber = Subscriber(mosquitto, f"farm/{site}/#")
    try:
        result = run_publisher(
            "--broker", mosquitto.host, "--port", str(mosquitto.port), "--site", site,
            "--device", device, "--w1-dir", str(tmp_path), "--time", "never", "--once",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        [(topic, payload, _)] = subscriber.wait(1)
    finally:
        subscriber.close()
    reading = json.loads(payload)
    assert set(reading) == {"ph", "ec", "water_temp"}
    assert 19.0 <= reading["water_temp"] <= 22.0
    assert "no DS18B20" in result.stderr
    [decoded] = decode(topic, payload)
    assert decoded.fields["water_temp"] == reading["water_temp"]


def test_raspberry_pi_publisher_once_fails_when_no_broker_answers() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = run_publisher(
        "--broker", f"mqtt://127.0.0.1:{port}", "--site", "s", "--device", "d",
        "--once", "--timeout", "2",
    )  # fmt: skip
    assert result.returncode == 1
    assert f"no connection to 127.0.0.1:{port}" in result.stderr
    assert time.monotonic() - started < 20


def test_raspberry_pi_publisher_reads_the_kernel_temperature_file(tmp_path: Path) -> None:
    module = load(RASPBERRY_PI, "rpi_publish")
    (tmp_path / "28-000000000001").mkdir()
    (tmp_path / "28-000000000001" / "temperature").write_text("19875\n")
    assert module.read_ds18b20(tmp_path) == 19.875
    bad = tmp_path / "bad"
    (bad / "28-000000000002").mkdir(parents=True)
    (bad / "28-000000000002" / "w1_slave").write_text("ff ff : crc=00 NO\nff ff t=85000\n")
    assert module.read_ds18b20(bad) is None  # a CRC failure is no reading, not 85 degrees


# --- ESP32 MicroPython publisher ------------------------------------------------------------


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_micropython_publisher_compiles(tmp_path: Path) -> None:
    py_compile.compile(str(ESP32), cfile=str(tmp_path / "main.pyc"), doraise=True)


class FakeMicroPythonTime:
    """CPython's time plus MicroPython's ticks_* and sleep_ms, with sleeps that do not wait."""

    def __init__(self, synced: bool) -> None:
        self.synced = synced
        self.slept: list[float] = []

    def time(self) -> int:
        return int(time.time())

    def gmtime(self, secs: float | None = None) -> time.struct_time:
        if secs is None and not self.synced:
            return time.gmtime(0)  # the RTC after power-on without NTP
        return time.gmtime(secs)

    def ticks_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000

    def ticks_add(self, ticks: int, delta: int) -> int:
        return ticks + delta

    def ticks_diff(self, end: int, start: int) -> int:
        return end - start

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def sleep_ms(self, ms: int) -> None:
        self.slept.append(ms / 1000)


class FakeMQTTClient:
    """umqtt.simple.MQTTClient's surface: the first publish fails like a dropped link."""

    instances: list[FakeMQTTClient] = []
    published: list[tuple[str, str, int]] = []
    fail_next = True

    def __init__(self, client_id: str, server: str, **kwargs: Any) -> None:
        self.client_id, self.server, self.kwargs = client_id, server, kwargs
        self.sock = types.SimpleNamespace(settimeout=lambda _: None, close=lambda: None)
        self.disconnected = False
        FakeMQTTClient.instances.append(self)

    def connect(self) -> None:
        pass

    def publish(self, topic: str, msg: str, retain: bool = False, qos: int = 0) -> None:
        if FakeMQTTClient.fail_next:
            FakeMQTTClient.fail_next = False
            raise OSError(104, "ECONNRESET")
        FakeMQTTClient.published.append((topic, msg, qos))

    def ping(self) -> None:
        pass

    def disconnect(self) -> None:
        self.disconnected = True


@pytest.fixture
def esp32(monkeypatch: pytest.MonkeyPatch) -> Any:
    wlan = types.SimpleNamespace(
        isconnected=lambda: True, active=lambda *_: None, ifconfig=lambda: ("10.0.0.7",)
    )
    fakes = {
        "machine": types.SimpleNamespace(reset=lambda: None),
        "network": types.SimpleNamespace(STA_IF=0, WLAN=lambda _: wlan),
        "umqtt": types.ModuleType("umqtt"),
        "umqtt.simple": types.SimpleNamespace(MQTTClient=FakeMQTTClient),
        "ntptime": types.SimpleNamespace(host="", settime=lambda: None),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeMQTTClient.instances, FakeMQTTClient.published = [], []
    FakeMQTTClient.fail_next = True
    return load(ESP32, "esp32_main")


def test_micropython_publisher_sends_json_at_qos_1_and_republishes_after_a_failure(
    esp32: Any,
) -> None:
    clock = FakeMicroPythonTime(synced=True)
    esp32.time = clock
    esp32.INTERVAL = 0
    before_ms = time.time() * 1000
    esp32.run(iterations=2)
    assert esp32.TOPIC == "farm/greenhouse-1/esp32-7/reservoir"
    assert len(FakeMQTTClient.published) == 2
    first = FakeMQTTClient.instances[0]
    assert first.kwargs["user"] == "esp32-7" and first.client_id == "esp32-7"
    assert first.disconnected  # the broken connection was closed before reconnecting
    assert len(FakeMQTTClient.instances) == 2
    assert any(seconds == 1 for seconds in clock.slept)  # backed off before reconnecting
    readings = []
    for topic, msg, qos in FakeMQTTClient.published:
        assert (topic, qos) == (esp32.TOPIC, 1)
        readings.append(json.loads(msg))
    for reading in readings:
        assert set(reading) == {"ph", "ec", "water_temp", "time"}
        assert all(math.isfinite(reading[k]) for k in ("ph", "ec", "water_temp"))
        assert before_ms - 2000 <= reading["time"] <= time.time() * 1000 + 1000
        [decoded] = decode(esp32.TOPIC, json.dumps(reading).encode())
        assert decoded.device == "esp32-7" and decoded.tags == {"site": "greenhouse-1"}
        assert decoded.time_ns == reading["time"] * 1_000_000


def test_micropython_publisher_omits_time_without_ntp(esp32: Any) -> None:
    esp32.time = FakeMicroPythonTime(synced=False)
    reading = esp32.make_reading()
    assert set(reading) == {"ph", "ec", "water_temp"}
    assert 5.7 <= reading["ph"] <= 6.3 and 1.6 <= reading["ec"] <= 2.0
