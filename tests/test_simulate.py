"""The sensor simulator: the greenhouse model offline (diurnal shape, determinism, anomalies
caught by the example rules through the rules engine), and the publisher against a real
Mosquitto (topics, fields, ranges, sites, exact counts, seq across processes, the report)."""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from services import Mosquitto

from ingestd.cli import _parser, main
from ingestd.config import load_settings
from ingestd.decode import Decoder
from ingestd.greenhouse import BASIC_FIELDS, FIELDS, KINDS, RANGES, Device, Episode
from ingestd.model import FieldValue, Reading
from ingestd.rules import AlertEvent, Engine, load_rules
from ingestd.simulate import Fleet, simulate

REPO = Path(__file__).resolve().parent.parent
MIDNIGHT = datetime(2026, 6, 1, tzinfo=UTC).timestamp()  # a Monday; the model's time is UTC+0
HOUR = 3600.0

# The rules of rules/*.yaml that each anomaly must set off (for the device it happens to).
CAUGHT_BY = {
    "ph_drift": {"ph_out_of_range"},
    "ec_drift": {"ec_out_of_range"},
    "chiller_failure": {"water_temperature_high"},
    "heater_failure": {"air_temperature"},
    "vent_failure": {"air_humidity"},
    "co2_valve_stuck": {"co2_high"},
    "leak": {"reservoir_level_low", "reservoir_draining_fast"},
    "dropout": {"sensor_silent"},
    "ph_probe_lost": {"ph_probe_silent"},
}
# ... and the others they may set off too: a long dropout silences the pH probe as well.
MAY_ALSO = {"dropout": {"ph_probe_silent"}}


def devices(n: int, *, seed: int, anomalies: str = "off") -> list[Device]:
    fleet = Fleet(devices=n, sites=("north", "south"), anomalies=anomalies, seed=seed, utc_offset=0)
    return fleet.models(seed)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_farm(
    models: list[Device], start: float, hours: float, step: float = 30.0
) -> list[AlertEvent]:
    """Feed every device's readings (none while it is silent) every ``step`` seconds to an
    engine with the example rules, on a clock that moves with the readings."""
    clock = Clock(start)
    engine = Engine(load_rules(REPO / "rules"), clock)
    events: list[AlertEvent] = []
    at = start
    while at < start + hours * HOUR:
        clock.now = at
        events.extend(engine.tick())
        for model in models:
            if model.silent(at):
                continue
            fields: dict[str, FieldValue] = dict(model.reading(at))
            reading = Reading("reservoir", model.name, {"site": model.site}, fields, int(at * 1e9))
            events.extend(engine.evaluate(reading))
        at += step
    return events


# --- offline: the greenhouse model ---------------------------------------------------------


def test_readings_follow_the_time_of_day() -> None:
    models = devices(6, seed=11)

    def mean(field: str, hour: float) -> float:
        # Average a few days at that hour: the comparison is of the cycle, not of the noise.
        values = [
            m.reading(MIDNIGHT + day * 24 * HOUR + hour * HOUR)[field]
            for m in models
            for day in range(3)
        ]
        return sum(values) / len(values)

    assert mean("light", 0) == 0  # night: no sun, grow lights off
    assert mean("light", 12) > mean("light", 7) > mean("light", 0)  # the sun, plus lamps
    assert mean("light", 20) > 10_000  # evening: grow lights on (06:00-22:00)
    assert mean("air_temp", 15) > mean("air_temp", 9) + 3 > mean("air_temp", 3) + 3
    assert mean("humidity", 3) > mean("humidity", 15) + 10  # humid nights, dry afternoons
    assert mean("co2", 0) > mean("co2", 12) + 200  # respiration at night, photosynthesis by day
    assert mean("level", 12) < mean("level", 0)  # transpiration by day, topped up at night
    assert mean("water_temp", 17) > mean("water_temp", 5)  # the water lags the air


def test_utc_offset_moves_the_day_to_local_time() -> None:
    # 12:00 UTC is midnight at UTC+12: dark there, while a UTC greenhouse is in full sun.
    utc = Device(1, "a", seed=3, utc_offset=0).reading(MIDNIGHT + 12 * HOUR)
    far_east = Device(1, "a", seed=3, utc_offset=12 * HOUR).reading(MIDNIGHT + 12 * HOUR)
    assert far_east["light"] == 0 < utc["light"]


def test_a_seed_replays_the_same_fleet() -> None:
    times = [MIDNIGHT + i * 37.0 for i in range(500)]

    def trace(seed: int, first: int, n: int) -> tuple[list[Any], list[Episode]]:
        fleet = Fleet(devices=n, first=first, anomalies="high", seed=seed, utc_offset=0)
        models = fleet.models(seed)
        readings = [[m.reading(at) for m in models] for at in times]
        return readings, fleet.episodes(MIDNIGHT, MIDNIGHT + 24 * HOUR, seed)

    readings, episodes = trace(42, 0, 8)
    assert (readings, episodes) == trace(42, 0, 8)
    assert episodes and readings[0][0] != readings[1][0]  # it is not a constant either
    other_readings, other_episodes = trace(43, 0, 8)
    assert other_readings != readings and other_episodes != episodes
    # A device is the same whichever process (share of the fleet) simulates it.
    tail_readings, tail_episodes = trace(42, 5, 3)
    assert tail_readings == [row[5:] for row in readings]
    assert tail_episodes == [e for e in episodes if e.device >= "esp32-00005"]


def test_normal_readings_are_realistic_and_raise_no_alert() -> None:
    models = devices(6, seed=5)
    for at in (MIDNIGHT + i * 600.0 for i in range(3 * 144)):  # three days, every 10 min
        for model in models:
            values = model.reading(at)
            assert set(values) == set(FIELDS)
            for field, value in values.items():
                low, high = RANGES[field]
                assert low <= value <= high, (field, value)
    events = run_farm(models, MIDNIGHT, hours=48, step=60.0)
    assert events == []


def test_anomalies_are_caught_by_the_example_rules() -> None:
    models = devices(12, seed=2024, anomalies="high")
    start, hours = MIDNIGHT, 24.0
    events = run_farm(models, start, hours)
    fired: dict[str, list[AlertEvent]] = defaultdict(list)
    for event in events:
        if event.kind == "firing":
            fired[event.device].append(event)
    # Deadman rules wait 15 min (grace) after the engine starts; the last anomalies may not
    # have had their `for` yet when the day ends.
    episodes = [
        e
        for m in models
        for e in m.episodes(start, start + hours * HOUR)
        if e.start >= start + 20 * 60 and e.end <= start + hours * HOUR
    ]
    assert {e.kind for e in episodes} == set(KINDS), "the seed should produce every kind"
    for episode in episodes:
        during = {
            e.rule for e in fired[episode.device] if episode.start <= e.at <= episode.end + 60
        }
        assert CAUGHT_BY[episode.kind] <= during, episode
    # ... and nothing fires outside an anomaly of its device.
    for device, device_events in fired.items():
        own = [e for m in models if m.name == device for e in m.episodes(start, start + 25 * HOUR)]
        for event in device_events:
            cause = [
                e
                for e in own
                if e.start <= event.at <= e.end + 60
                and event.rule in CAUGHT_BY[e.kind] | MAY_ALSO.get(e.kind, set())
            ]
            assert cause, event


def test_a_drift_ramps_out_of_range_and_recovers() -> None:
    model = next(
        m
        for m in devices(12, seed=2024, anomalies="high")
        if any(e.kind == "ph_drift" for e in m.episodes(MIDNIGHT, MIDNIGHT + 24 * HOUR))
    )
    drift = next(e for e in model.episodes(MIDNIGHT, MIDNIGHT + 24 * HOUR) if e.kind == "ph_drift")
    assert drift.target is not None
    before = model.reading(drift.start - 60)["ph"]
    halfway = model.reading(drift.start + drift.ramp / 2)["ph"]
    held = model.reading(drift.end - 60)["ph"]
    after = model.reading(drift.end + 60)["ph"]
    assert 5.6 < before < 6.7 and 5.6 < after < 6.7
    assert abs(held - drift.target) < 0.1
    assert min(before, held) < halfway < max(before, held)  # slowly, not a jump


def test_a_dropout_silences_the_device_and_only_it() -> None:
    models = devices(12, seed=2024, anomalies="high")
    dropouts = [
        (m, e)
        for m in models
        for e in m.episodes(MIDNIGHT, MIDNIGHT + 24 * HOUR)
        if e.kind == "dropout"
    ]
    assert dropouts
    model, dropout = dropouts[0]
    assert not model.silent(dropout.start - 1)
    assert model.silent(dropout.start) and model.silent(dropout.end - 1)
    assert not model.silent(dropout.end)
    assert 12 * 60 <= dropout.end - dropout.start <= 60 * 60
    others = [m for m in models if m is not model and not m.episodes(dropout.start, dropout.end)]
    assert others and not any(m.silent(dropout.start) for m in others)


def test_anomaly_levels_set_how_often() -> None:
    day = (MIDNIGHT, MIDNIGHT + 30 * 24 * HOUR)

    def count(level: str) -> int:
        return sum(len(m.episodes(*day)) for m in devices(20, seed=9, anomalies=level))

    off, normal, high = count("off"), count("normal"), count("high")
    assert off == 0 < normal < high
    # 20 devices x 180 slots: 1/12 and 3/4 of them, within a wide margin.
    assert 200 < normal < 400 and 2400 < high < 3000


# --- against a real Mosquitto -----------------------------------------------------------------


class Subscriber:
    """Everything published under ``prefix/#``, at QoS 1."""

    def __init__(self, url: str, prefix: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.prefix = prefix
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.barrier = threading.Event()
        subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(f"{prefix}/#", qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        if message.topic == f"{self.prefix}/barrier":
            self.barrier.set()
            return
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def collect(self, expected: int) -> list[tuple[str, bytes]]:
        """Wait for ``expected`` messages, then for a barrier message published after them:
        anything extra that was on its way has arrived by then."""
        deadline = time.monotonic() + 60  # a hang guard, not a performance threshold
        while len(self.messages) < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        self.client.publish(f"{self.prefix}/barrier", b"", qos=1)
        assert self.barrier.wait(30), "barrier message never came back"
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(mosquitto: Mosquitto, unique: str) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto.url, unique)
    yield sub
    sub.close()


def check_seqs(messages: list[tuple[str, bytes]]) -> Counter[str]:
    """Each device's seq runs 0, 1, 2, ... with no duplicate and no gap; per-device counts."""
    seqs: dict[str, list[float]] = defaultdict(list)
    for topic, payload in messages:
        seqs[topic.split("/")[2]].append(orjson.loads(payload)["seq"])
    for device, numbers in seqs.items():
        assert sorted(numbers) == [float(i) for i in range(len(numbers))], device
    return Counter({device: len(numbers) for device, numbers in seqs.items()})


@pytest.mark.parametrize(
    ("qos", "fields"), [(1, FIELDS), (0, None)], ids=["qos1-every-field", "qos0-default-fields"]
)
def test_fleet_publishes_on_the_documented_topics(
    mosquitto: Mosquitto,
    subscriber: Subscriber,
    unique: str,
    qos: int,
    fields: tuple[str, ...] | None,
) -> None:
    sites = ("greenhouse-1", "greenhouse-2", "nursery")
    fleet = Fleet(mosquitto.url, devices=7, sites=sites, prefix=unique, qos=qos)
    if fields is None:  # what tests and benchmarks get: the first version's five fields
        fields = BASIC_FIELDS
    else:
        fleet.fields = fields
    report = simulate(fleet, rate=1000, count=71)
    messages = subscriber.collect(71)
    assert report.messages == len(messages) == 71 and report.refused == 0
    assert check_seqs(messages) == Counter({f"esp32-{i:05d}": 11 - (i >= 1) for i in range(7)})
    # Decoded as ingestd's shipped config decodes farm/{site}/{device}/{measurement}.
    settings = load_settings(REPO / "config" / "ingestd.yaml")
    decoder = Decoder(settings.mqtt.subscriptions, settings.guard)
    for topic, payload in messages:
        _, site, device, measurement = topic.split("/")
        assert site == sites[int(device.removeprefix("esp32-")) % 3] and measurement == "reservoir"
        [reading] = decoder.decode("farm/" + topic.split("/", 1)[1], payload, time.time_ns())
        assert (reading.measurement, reading.device, reading.tags) == (
            "reservoir",
            device,
            {"site": site},
        )
        assert set(reading.fields) == {"seq", *fields}
        for field in fields:
            value = reading.fields[field]
            assert isinstance(value, float)
            assert RANGES[field][0] <= value <= RANGES[field][1], (field, value)


def test_cli_splits_the_fleet_over_processes_and_reports_what_arrived(
    mosquitto: Mosquitto,
    subscriber: Subscriber,
    unique: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["simulate", "--url", mosquitto.url, "--prefix", unique, "--devices", "10"]
    argv += ["--site", "north", "--site", "south,east", "--rate", "2000", "--count", "2003"]
    argv += ["--processes", "3", "--anomalies", "off", "--seed", "7", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    messages = subscriber.collect(2003)

    assert report["messages"] == len(messages) == 2003
    per_device = check_seqs(messages)  # across processes too: no duplicates, no gaps
    assert sorted(per_device) == [f"esp32-{i:05d}" for i in range(10)]
    assert max(per_device.values()) - min(per_device.values()) <= 1  # an even share each
    assert {topic.split("/")[1] for topic, _ in messages} == {"north", "south", "east"}
    for topic, payload in messages:
        site, device = topic.split("/")[1:3]
        assert site == ("north", "south", "east")[int(device.removeprefix("esp32-")) % 3]
        assert set(orjson.loads(payload)) == {"seq", *FIELDS}  # the command sends every field

    # The report's per-process counts are what the subscriber got from those devices.
    shares = report["processes"]
    assert [s["devices"] for s in shares] == [4, 3, 3]
    for share in shares:
        first = int(share["first_device"].removeprefix("esp32-"))
        last = int(share["last_device"].removeprefix("esp32-"))
        received = sum(per_device[f"esp32-{i:05d}"] for i in range(first, last + 1))
        assert share["messages"] == received > 0
        assert share["rate"] == pytest.approx(share["messages"] / share["seconds"], rel=0.01)
    assert sum(s["messages"] for s in shares) == report["messages"]
    assert report["seconds"] >= max(s["seconds"] for s in shares)
    assert report["rate"] == pytest.approx(report["messages"] / report["seconds"], rel=0.01)
    assert (report["qos"], report["seed"], report["refused"]) == (1, 7, 0)
    print(f"simulator: {report['rate']} msg/s offered 2000 over 3 processes")  # for -s


def test_a_stop_ends_every_process_and_the_report_counts_what_was_sent(
    mosquitto: Mosquitto, subscriber: Subscriber, unique: str
) -> None:
    # What Ctrl-C does to `ingestd simulate`: no count, no duration; stopped from outside.
    stop = threading.Event()

    def stop_when_300_arrived() -> None:
        deadline = time.monotonic() + 60  # a hang guard: the assertion below then fails
        while len(subscriber.messages) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()

    threading.Thread(target=stop_when_300_arrived, daemon=True).start()
    fleet = Fleet(mosquitto.url, devices=6, prefix=unique)
    report = simulate(fleet, rate=1000, processes=2, stop=stop)
    messages = subscriber.collect(report.messages)
    assert report.messages == len(messages) >= 300
    per_device = check_seqs(messages)
    assert [s.messages for s in report.shares] == [
        sum(per_device[f"esp32-{i:05d}"] for i in range(3)),
        sum(per_device[f"esp32-{i:05d}"] for i in range(3, 6)),
    ]


def test_messages_the_broker_refuses_are_reported(
    services: Any, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic write elsewhere/#\n")  # anonymous clients: nothing under the prefix
    broker = services.mosquitto(extra_config=f"acl_file {acl}\n")
    argv = ["simulate", "--url", broker.url, "--prefix", unique, "--devices", "2"]
    assert main([*argv, "--rate", "500", "--count", "20", "--anomalies", "off"]) == 1
    captured = capsys.readouterr()
    assert "REFUSED by the broker: 20" in captured.out
    assert "the broker refused 20 messages" in captured.err


def test_the_readme_walkthrough_uses_only_commands_that_exist() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    walkthrough = readme.split("## Gateway install walkthrough", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in walkthrough.split("```sh\n")[1:]]
    script = "\n".join(blocks).replace("\\\n", " ")
    commands = [
        shlex.split(line, comments=True)
        for line in script.splitlines()
        if line.strip().removeprefix("sudo ").startswith("ingestd ")
    ]
    assert len(commands) >= 6
    for argv in commands:
        args = argv[1:] if argv[0] == "sudo" else argv
        _parser().parse_args(args[1:])  # exits with 2 on an unknown command or option
    for path in ("deploy/install.sh", "examples/esp32_micropython/main.py", "mosquitto/acl"):
        assert path in walkthrough and (REPO / path).exists()
