"""Decoding: topic templates, every codec, every reason, and no way to inject anything."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.config import GuardSection, MqttSection, Subscription
from ingestd.decode import (
    BAD_CHARACTERS,
    BAD_TIMESTAMP,
    DEVICE_INVALID,
    MALFORMED,
    MEASUREMENT_NOT_ALLOWED,
    NAME_TOO_LONG,
    NO_FIELDS,
    NOT_FINITE,
    REASONS,
    TAG_NOT_ALLOWED,
    TIME_FUTURE,
    TIME_TOO_OLD,
    TOO_LARGE,
    TOPIC_UNMATCHED,
    Decoder,
)
from ingestd.errors import ConfigError
from ingestd.lineproto import format_reading, parse_line
from ingestd.model import Reading, Reject

S = 1_000_000_000
T0 = 1714557600  # 2024-05-01T10:00:00Z = 12:00:00 in Europe/Berlin (CEST)
RECEIVED = (T0 + 5) * S

SUBSCRIPTIONS = [
    Subscription(template="farm/{site}/{device}/{measurement}", string_fields=["fw", "note"]),
    Subscription(
        template="sensors/{site}/{device}/{field}",
        codec="value",
        measurement="env",
        string_fields=["state"],
    ),
    Subscription(template="relay/{device}", codec="value", measurement="relay"),
    Subscription(
        template="lp/{site}/{device}",
        codec="line",
        measurements=["env", "water"],
        tags=["room", "probe", "site"],
    ),
    Subscription(template="tele/{device}/SENSOR", codec="tasmota", timezone="Europe/Berlin"),
    Subscription(template="homie/5/{device}/{node}/{property}", codec="homie", topic="homie/5/#"),
    Subscription(template="homie/{device}/{node}/{property}", codec="homie", topic="homie/#"),
]


def make(subs: Sequence[Subscription] = SUBSCRIPTIONS, **guard: Any) -> Decoder:
    return Decoder(subs, GuardSection(**guard))


DECODER = make()


def decode(topic: str, payload: bytes | str, received_ns: int = RECEIVED) -> list[Reading]:
    data = payload.encode() if isinstance(payload, str) else payload
    return DECODER.decode(topic, data, received_ns)


def one(topic: str, payload: bytes | str, received_ns: int = RECEIVED) -> Reading:
    readings = decode(topic, payload, received_ns)
    assert len(readings) == 1
    return readings[0]


def rejected(topic: str, payload: bytes | str, decoder: Decoder = DECODER) -> Reject:
    data = payload.encode() if isinstance(payload, str) else payload
    with pytest.raises(Reject) as caught:
        decoder.decode(topic, data, RECEIVED)
    assert caught.value.reason in REASONS
    assert len(caught.value.detail) < 200
    return caught.value


def written(r: Reading) -> tuple[str, dict[str, str], dict[str, object], int | None]:
    """What the TSDB will read back from the line we write."""
    return parse_line(format_reading(r))


def test_reasons_are_distinct_labels() -> None:
    assert len(set(REASONS)) == len(REASONS) == 14
    assert all(r.isidentifier() and r.islower() for r in REASONS)


# --- json --------------------------------------------------------------------------------------


def test_esp32_json() -> None:
    payload = {
        "temp": 21.5,
        "hum": 55,
        "co2": 412,
        "ph": 6.1,
        "ec": 1.83,
        "rssi": -67,
        "heater": False,
        "fw": "1.4.2",
        "ip": "10.0.0.7",
        "err": None,
        "hist": [1, 2],
        "ts": T0,
    }
    r = one("farm/north/esp32-01/env", orjson.dumps(payload))
    assert r == Reading(
        measurement="env",
        device="esp32-01",
        tags={"site": "north"},
        fields={
            "temp": 21.5,
            "hum": 55.0,
            "co2": 412.0,
            "ph": 6.1,
            "ec": 1.83,
            "rssi": -67.0,
            "heater": False,
            "fw": "1.4.2",
        },
        time_ns=T0 * S,
        device_time=True,  # the device's own: a retained replay of it may be stored
    )
    assert all(type(v) is float for k, v in r.fields.items() if k not in {"heater", "fw"})
    assert format_reading(r) == (
        b"env,device=esp32-01,site=north temp=21.5,hum=55.0,co2=412.0,ph=6.1,ec=1.83,"
        b'rssi=-67.0,heater=false,fw="1.4.2" 1714557600000000000'
    )


def test_integers_and_floats_give_the_same_field_type() -> None:
    a = one("farm/n/d1/env", '{"t": 21}')
    b = one("farm/n/d1/env", '{"t": 21.5}')
    assert type(a.fields["t"]) is type(b.fields["t"]) is float


def test_nested_objects_are_flattened_with_underscores() -> None:
    r = one("farm/n/d1/env", '{"air": {"temp": 21, "hum": {"rel": 55.5}}, "water": {"t": 19}}')
    assert r.fields == {"air_temp": 21.0, "air_hum_rel": 55.5, "water_t": 19.0}


def test_string_fields_are_always_strings() -> None:
    r = one("farm/n/d1/env", '{"t": 1, "fw": 2, "note": true, "other": "skipped"}')
    assert r.fields == {"t": 1.0, "fw": "2", "note": "true"}


def test_no_time_key_is_a_field_and_the_first_present_one_wins() -> None:
    payload = {"v": 1, "ts": T0 - 60, "timestamp": T0 - 30, "time": None}
    r = one("farm/n/d1/env", orjson.dumps(payload))
    assert r.fields == {"v": 1.0}
    assert r.time_ns == (T0 - 30) * S


def test_without_a_timestamp_the_receipt_time_is_used() -> None:
    assert one("farm/n/d1/env", '{"v": 1}').time_ns == RECEIVED


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (T0, T0 * S),
        (T0 + 0.123, T0 * S + 123_000_000),  # exactly, not via a lossy float product
        (T0 * 1000 + 456, T0 * S + 456_000_000),
        (T0 * 1_000_000 + 7, T0 * S + 7_000),
        (T0 * S + 9, T0 * S + 9),
        (str(T0), T0 * S),
        (" 1714557600.5 ", T0 * S + 500_000_000),
        ("2024-05-01T10:00:00Z", T0 * S),
        ("2024-05-01T10:00:00.123456789Z", T0 * S + 123456789),
        ("2024-05-01t10:00:00.1234567891234z", T0 * S + 123456789),
        ("2024-05-01 10:00:00,5Z", T0 * S + 500_000_000),
        ("2024-05-01T12:00:00+02:00", T0 * S),
        ("2024-05-01T12:00:00.25+0200", T0 * S + 250_000_000),
        ("2024-05-01T05:30:00-04:30", T0 * S),
        ("2024-05-01T10:00", T0 * S),
        ("2024-05-01T10:00:00", T0 * S),  # no offset: the subscription's zone, UTC here
    ],
)
def test_timestamp_formats(stamp: object, expected: int) -> None:
    assert one("farm/n/d1/env", orjson.dumps({"v": 1, "time": stamp})).time_ns == expected


@pytest.mark.parametrize(
    "stamp",
    [
        "yesterday",
        "2024-05-01",
        "2024-13-01T00:00:00Z",
        "2024-05-01T10:00:00+25:00",
        "2024-05-01T10:00:00 UTC",
        "",
        True,
        [T0],
        {"s": T0},
        "1e30",
        -(2**62) * 10.0,
        "0001-01-01T00:00:00+01:00",
    ],
)
def test_unreadable_timestamps(stamp: object) -> None:
    error = rejected("farm/n/d1/env", orjson.dumps({"v": 1, "time": stamp}))
    assert error.reason == BAD_TIMESTAMP


def test_clock_skew_guard() -> None:
    ahead = one("farm/n/d1/env", orjson.dumps({"v": 1, "time": T0 + 5 + 300}))
    assert ahead.time_ns == RECEIVED + 300 * S
    error = rejected("farm/n/d1/env", orjson.dumps({"v": 1, "time": T0 + 5 + 301}))
    assert error.reason == TIME_FUTURE
    assert "301 s ahead" in error.detail
    month = 30 * 86400
    assert one("farm/n/d1/env", orjson.dumps({"v": 1, "time": T0 + 5 - month})).time_ns
    error = rejected("farm/n/d1/env", orjson.dumps({"v": 1, "time": T0 + 5 - month - 1}))
    assert error.reason == TIME_TOO_OLD
    assert rejected("farm/n/d1/env", '{"v": 1, "ts": 0}').reason == TIME_TOO_OLD


def test_guard_limits_come_from_the_guard_section() -> None:
    strict = make(max_future="1s", max_age="1m", max_payload_bytes=24)
    assert rejected("farm/n/d1/env", f'{{"v":1.5,"ts":{T0 + 7}}}', strict).reason == TOO_LARGE
    assert rejected("farm/n/d1/env", f'{{"v":1,"ts":{T0 + 7}}}', strict).reason == TIME_FUTURE
    assert rejected("farm/n/d1/env", f'{{"v":1,"ts":{T0 - 60}}}', strict).reason == TIME_TOO_OLD
    assert strict.decode("farm/n/d1/env", f'{{"v":1,"ts":{T0 + 6}}}'.encode(), RECEIVED)


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        ("[1, 2]", MALFORMED, "expected a JSON object, got list"),
        ("21.5", MALFORMED, "expected a JSON object, got float"),
        ('"x"', MALFORMED, "expected a JSON object, got str"),
        ("{", MALFORMED, "not valid JSON"),
        ('{"v": 1}{', MALFORMED, "not valid JSON"),
        (b'{"v": "\xff"}', MALFORMED, "not valid JSON"),
        ('{"v": NaN}', MALFORMED, "not valid JSON"),
        ('{"v": Infinity}', MALFORMED, "not valid JSON"),
        ('{"v": 1e400}', NOT_FINITE, "infinity"),
        ('{"v": -1e400}', NOT_FINITE, "infinity"),
        ("{}", NO_FIELDS, "no numeric"),
        ('{"status": "ok", "x": null, "y": [1]}', NO_FIELDS, "no numeric"),
        ('{"ts": 1714557600}', NO_FIELDS, "no numeric"),
        ('{"a_b": 1, "a": {"b": 2}}', MALFORMED, "same field name"),
        ('{"a": {"b": 2}, "a_b": 1}', MALFORMED, "same field name"),
        ('{"": 1}', BAD_CHARACTERS, "empty field name"),
        ('{"a\\nb": 1}', BAD_CHARACTERS, "'\\n'"),
        ('{"a\\rb": 1}', BAD_CHARACTERS, "'\\r'"),
        ('{"a\\u0000b": 1}', BAD_CHARACTERS, "'\\x00'"),
        ('{"a\\tb": 1}', BAD_CHARACTERS, "'\\t'"),
        ('{"a\x7fb": 1}', BAD_CHARACTERS, "'\\x7f'"),
        ('{"x": {"a\\nb": 1}}', BAD_CHARACTERS, "field name"),
        ('{"v": 1, "note": "two\\nlines"}', BAD_CHARACTERS, "'note' contains a newline"),
        ('{"v": 1, "note": "cr\\r"}', BAD_CHARACTERS, "'note' contains a newline"),
    ],
)
def test_json_refusals(payload: str | bytes, reason: str, detail: str) -> None:
    error = rejected("farm/n/d1/env", payload)
    assert (error.reason, detail in error.detail) == (reason, True), error.detail


def test_deeply_nested_json_is_refused_without_recursion_trouble() -> None:
    payload = '{"a":' * 18 + "1" + "}" * 18
    assert rejected("farm/n/d1/env", payload).detail == "objects nested deeper than 16 levels"
    assert one("farm/n/d1/env", '{"a":' * 17 + "1" + "}" * 17).fields == {"a" + "_a" * 16: 1.0}
    assert rejected("farm/n/d1/env", "[" * 5000 + "]" * 5000).reason == MALFORMED


def test_detail_holds_at_most_80_characters_of_payload() -> None:
    payload = '{"status": "' + "x" * 5000 + '"}'
    error = rejected("farm/n/d1/env", payload)
    assert error.reason == NO_FIELDS
    assert "x" * 81 not in error.detail


def test_too_large_is_checked_before_parsing() -> None:
    limit = int(GuardSection().max_payload_bytes)
    assert one("farm/n/d1/env", '{"v": 1' + " " * (limit - 9) + "}").fields == {"v": 1.0}
    error = rejected("farm/n/d1/env", b"\xff" * (limit + 1))
    assert (error.reason, error.detail) == (TOO_LARGE, f"{limit + 1} bytes > {limit}")


# --- topics ------------------------------------------------------------------------------------


def test_topic_levels_become_tags_and_empty_ones_are_dropped() -> None:
    assert one("farm/north/d1/env", '{"v": 1}').tags == {"site": "north"}
    assert one("farm//d1/env", '{"v": 1}').tags == {}


@pytest.mark.parametrize(
    "topic",
    [
        "farm/n/d1",
        "farm/n/d1/env/extra",
        "barn/n/d1/env",
        "",
        "/",
        "tele/d1/STATE",
        "tele/d1/sensor",
        "$SYS/broker/load",
    ],
)
def test_unmatched_topics(topic: str) -> None:
    error = rejected(topic, "{}")
    assert error.reason == TOPIC_UNMATCHED
    assert repr(topic) in error.detail


@pytest.mark.parametrize(
    "device",
    ["dev 1", "dev1 x=1", "dev,1", "dev=1", "-dev", "", "x" * 65, "dév"],
)
def test_devices_must_match_the_pattern(device: str) -> None:
    assert rejected(f"farm/n/{device}/env", '{"v": 1}').reason == DEVICE_INVALID


def test_device_pattern_is_matched_in_full() -> None:
    # With re.match, "$" would also match before a trailing newline.
    loose = make([Subscription(template="x/{device}", measurement="m", device_pattern=r"^\w+$")])
    assert rejected("x/dev1\n", '{"v": 1}', loose).reason == BAD_CHARACTERS
    assert rejected("x/dev1 ", '{"v": 1}', loose).reason == DEVICE_INVALID
    assert loose.decode("x/dev1", b'{"v": 1}', RECEIVED)[0].device == "dev1"


@pytest.mark.parametrize("level", ["a\nb", "a\rb", "a\x00b", "a\tb", "\x7f", "\ud800"])
def test_control_characters_in_any_topic_level_are_refused(level: str) -> None:
    assert rejected(f"farm/{level}/d1/env", '{"v": 1}').reason == BAD_CHARACTERS
    assert rejected(f"farm/n/d1/{level}", '{"v": 1}').reason == BAD_CHARACTERS


@pytest.mark.parametrize("measurement", ["", "#env"])
def test_measurement_levels_that_cannot_be_written(measurement: str) -> None:
    assert rejected(f"farm/n/d1/{measurement}", '{"v": 1}').reason == BAD_CHARACTERS


def test_first_matching_subscription_wins_and_level_count_must_agree() -> None:
    decoder = make(
        [
            Subscription(template="a/{device}/{measurement}", topic="a/#"),
            Subscription(template="a/{site}/{device}/{measurement}", topic="a/#"),
            Subscription(template="a/{device}/{measurement}", codec="value"),
        ]
    )
    assert decoder.decode("a/d1/m", b'{"v": 1}', RECEIVED)[0].fields == {"v": 1.0}
    r = decoder.decode("a/s1/d1/m", b'{"v": 1}', RECEIVED)[0]
    assert (r.device, r.tags) == ("d1", {"site": "s1"})


def test_literal_filter_levels_narrow_the_template() -> None:
    decoder = make(
        [
            Subscription(template="f/{site}/{device}/{measurement}", topic="f/north/+/+"),
            Subscription(template="f/{zone}/{device}/{measurement}"),
        ]
    )
    assert decoder.decode("f/north/d1/m", b'{"v": 1}', RECEIVED)[0].tags == {"site": "north"}
    assert decoder.decode("f/south/d1/m", b'{"v": 1}', RECEIVED)[0].tags == {"zone": "south"}


def test_shared_subscription_filters_are_understood() -> None:
    decoder = make([Subscription(template="f/{device}/{measurement}", topic="$share/g/f/#")])
    assert decoder.decode("f/d1/m", b'{"v": 1}', RECEIVED)[0].device == "d1"


def test_wildcards_do_not_match_dollar_topics() -> None:
    decoder = make([Subscription(template="{site}/{device}/{measurement}")])
    assert decoder.decode("s/d1/m", b'{"v": 1}', RECEIVED)[0].tags == {"site": "s"}
    assert rejected("$SYS/d1/m", '{"v": 1}', decoder).reason == TOPIC_UNMATCHED


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        (Subscription(template="a/{device}"), "codec json needs {measurement} or measurement"),
        (Subscription(template="a/{device}", codec="value"), "codec value needs"),
        (Subscription(template="a/{device}/{measurement}", codec="line"), "codec line takes"),
        (Subscription(template="a/{device}", codec="line", measurement="m"), "codec line takes"),
        (Subscription(template="a/{device}/{field}", measurement="m"), "{field} is meaningful"),
        (Subscription(template="t/{sensor}/{device}", codec="tasmota"), "sets the tag sensor"),
        (Subscription(template="h/{device}/{node}", codec="homie"), "homie needs a {property}"),
        (Subscription(template="h/{device}/{property}", codec="homie"), "homie needs {node}"),
        (Subscription(template="a/{device}/{measurement}", topic="b/#"), "never matches"),
        (Subscription(template="a/{device}/{measurement}", topic="a/+"), "fewer levels"),
        (Subscription(template="a/{device}/{measurement}", topic="a/+/+/+"), "more levels"),
        (Subscription(template="a/{device}", measurement="#m"), "cannot be written"),
        (Subscription(template="a/{device}", measurement="m", timezone="Mars/Base"), "timezone"),
    ],
)
def test_subscriptions_that_cannot_work_are_config_errors(sub: Subscription, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        make([sub])


def test_the_default_subscriptions_build() -> None:
    decoder = make(MqttSection().subscriptions)
    assert decoder.decode("farm/s/d1/env", b'{"t": 20}', RECEIVED)[0].fields == {"t": 20.0}


# --- value -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        ("21.5", 21.5),
        ("-3", -3.0),
        ("1e3", 1000.0),
        ("+.5", 0.5),
        (" 21.5\r\n", 21.5),
        ("ON", True),
        ("off", False),
        ("True", True),
        ("FALSE", False),
    ],
)
def test_plain_values(payload: str, value: object) -> None:
    r = one("sensors/north/d1/water_temp", payload)
    assert r == Reading("env", "d1", {"site": "north"}, {"water_temp": value}, RECEIVED)
    assert type(r.fields["water_temp"]) is type(value)


def test_value_field_defaults_to_the_subscription_field() -> None:
    assert one("relay/pump-1", "on").fields == {"value": True}


def test_string_field_values_are_kept_verbatim_as_strings() -> None:
    assert one("sensors/n/d1/state", "ON").fields == {"state": "ON"}
    assert one("sensors/n/d1/state", "21").fields == {"state": "21"}
    assert one("sensors/n/d1/state", " idle\n").fields == {"state": "idle"}
    error = rejected("sensors/n/d1/state", "two\nlines")
    assert error.reason == BAD_CHARACTERS


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("nan", NOT_FINITE),
        ("NaN", NOT_FINITE),
        ("inf", NOT_FINITE),
        ("-Infinity", NOT_FINITE),
        ("1e999", NOT_FINITE),
        ("", MALFORMED),
        ("abc", MALFORMED),
        ("0x10", MALFORMED),
        ("1,5", MALFORMED),
        ("1_000", MALFORMED),
        ("٣", MALFORMED),  # a non-ASCII digit that float() would accept
        ('{"v": 1}', MALFORMED),
        (b"\xff", MALFORMED),
    ],
)
def test_value_refusals(payload: str | bytes, reason: str) -> None:
    assert rejected("sensors/n/d1/t", payload).reason == reason


def test_empty_field_level_is_refused() -> None:
    assert rejected("sensors/n/d1/", "1").reason == BAD_CHARACTERS


# --- line --------------------------------------------------------------------------------------


def test_line_protocol_lines_become_readings() -> None:
    payload = (
        'env,room=a temp=21.5,hum=55i,count=3u,ok=t,note="fine" 1714557601000000000\n'
        "water,probe=p1 ph=6.1\r\n"
        "\n"
        "# a comment\n"
        "water,probe=p2 ec=1.8\n"
    )
    first, second, third = decode("lp/north/d7", payload)
    assert first == Reading(
        "env",
        "d7",
        {"room": "a", "site": "north"},
        {"temp": 21.5, "hum": 55.0, "count": 3.0, "ok": True, "note": "fine"},
        (T0 + 1) * S,
        device_time=True,
    )
    assert all(type(first.fields[k]) is float for k in ("hum", "count"))
    assert (second.tags, second.fields) == ({"probe": "p1", "site": "north"}, {"ph": 6.1})
    # untimed lines: the receipt time, a nanosecond apart so they cannot overwrite each other
    assert (second.time_ns, third.time_ns) == (RECEIVED, RECEIVED + 1)
    assert not second.device_time and not third.device_time


def test_line_timestamps_are_guarded() -> None:
    assert rejected("lp/n/d7", f"env t=1 {(T0 + 400) * S}").reason == TIME_FUTURE
    assert rejected("lp/n/d7", "env t=1 0").reason == TIME_TOO_OLD


def test_a_forged_device_tag_is_ignored_and_topic_tags_win() -> None:
    payload = "env,device=victim,site=elsewhere,room=a t=1\nenv,device=victim2 t=2"
    readings = decode("lp/north/attacker", payload)
    assert [r.device for r in readings] == ["attacker", "attacker"]
    assert [written(r)[1] for r in readings] == [
        {"device": "attacker", "room": "a", "site": "north"},
        {"device": "attacker", "site": "north"},
    ]


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        ("air t=1", MEASUREMENT_NOT_ALLOWED, "line 1: measurement 'air' is not allowed"),
        ("env t=1\nenv,rack=3 t=1", TAG_NOT_ALLOWED, "line 2: tag 'rack' is not allowed"),
        ("env t=1\nenv t=", MALFORMED, "line 2: column 7: field 't' has no value"),
        ("env t=1i=2", MALFORMED, "line 1: "),
        ("env t=nan", MALFORMED, "invalid value 'nan'"),
        ("env t=1e999", MALFORMED, "out of range"),
        (b"env t=\xff", MALFORMED, "not UTF-8"),
        ("env t=1\renv t=2", BAD_CHARACTERS, "line 1: carriage return"),
        ("env,room=a\tb t=1", BAD_CHARACTERS, "'\\t'"),
        ("env a\x00=1", BAD_CHARACTERS, "'\\x00'"),
        ("", NO_FIELDS, "no line-protocol line"),
        ("\n# only a comment\n\n", NO_FIELDS, "no line-protocol line"),
        (f"env t=1 {2**63}", MALFORMED, "int64"),
    ],
)
def test_line_refusals(payload: str | bytes, reason: str, detail: str) -> None:
    error = rejected("lp/n/d7", payload)
    assert (error.reason, detail in error.detail) == (reason, True), error.detail


# --- tasmota -----------------------------------------------------------------------------------

TASMOTA = {
    "Time": "2024-05-01T12:00:00",
    "DS18B20": {"Id": "3C01", "Temperature": 21.5},
    "AM2301": {"Temperature": 22.1, "Humidity": 55.3, "DewPoint": 12.6},
    "Switch1": "ON",
    "TempUnit": "C",
}


def test_tasmota_sensor_message() -> None:
    ds, am = decode("tele/tasmota_A1B2C3/SENSOR", orjson.dumps(TASMOTA))
    when = T0 * S  # 12:00 local time in Berlin (CEST) is 10:00 UTC
    assert ds == Reading(
        "tasmota", "tasmota_A1B2C3", {"sensor": "DS18B20"}, {"Temperature": 21.5}, when, True
    )
    assert am == Reading(
        "tasmota",
        "tasmota_A1B2C3",
        {"sensor": "AM2301"},
        {"Temperature": 22.1, "Humidity": 55.3, "DewPoint": 12.6},
        when,
        device_time=True,
    )


def test_tasmota_local_time_follows_daylight_saving() -> None:
    winter = 1705316400  # 2024-01-15T11:00:00Z = 12:00 CET
    payload = orjson.dumps({**TASMOTA, "Time": "2024-01-15T12:00:00"})
    assert DECODER.decode("tele/t1/SENSOR", payload, (winter + 1) * S)[0].time_ns == winter * S


def test_tasmota_energy_measurement_and_missing_time() -> None:
    decoder = make(
        [Subscription(template="tele/{device}/SENSOR", codec="tasmota", measurement="power")]
    )
    payload = {
        "ENERGY": {
            "TotalStartTime": "2024-01-01T00:00:00",
            "Total": 12.5,
            "Voltage": 231,
            "Phases": [1],
        },
        "ESP32": {"Temperature": 45},
        "Info": {"Id": "x"},
    }
    energy, esp = decoder.decode("tele/plug1/SENSOR", orjson.dumps(payload), RECEIVED)
    assert energy == Reading(
        "power", "plug1", {"sensor": "ENERGY"}, {"Total": 12.5, "Voltage": 231.0}, RECEIVED
    )
    assert (esp.tags, esp.fields) == ({"sensor": "ESP32"}, {"Temperature": 45.0})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ('{"Time": "2024-05-01T12:00:00", "TempUnit": "C"}', NO_FIELDS),
        ('{"Info": {"Id": "x"}}', NO_FIELDS),
        ("[1]", MALFORMED),
        ('{"Time": "noon", "S": {"T": 1}}', BAD_TIMESTAMP),
        ('{"": {"T": 1}}', BAD_CHARACTERS),
        ('{"S\\n": {"T": 1}}', BAD_CHARACTERS),
        ('{"S": {"T\\n": 1}}', BAD_CHARACTERS),
        ('{"S": {"T": 1e999}}', NOT_FINITE),
    ],
)
def test_tasmota_refusals(payload: str, reason: str) -> None:
    assert rejected("tele/t1/SENSOR", payload).reason == reason


# --- homie -------------------------------------------------------------------------------------


def test_homie_v4_and_v5_properties() -> None:
    v4 = one("homie/greenhouse-1/climate/temperature", "21.5")
    v5 = one("homie/5/greenhouse-1/climate/temperature", "21.5")
    expected = Reading("climate", "greenhouse-1", {}, {"temperature": 21.5}, RECEIVED)
    assert v4 == v5 == expected
    assert one("homie/gh/pump/running", "true").fields == {"running": True}


@pytest.mark.parametrize(
    "topic",
    [
        "homie/dev1/$state",
        "homie/dev1/$homie",
        "homie/dev1/climate/$name",
        "homie/dev1/climate/temperature/$datatype",
        "homie/dev1/climate/temperature/set",
        "homie/5/dev1/$state",
        "homie/5/dev1/$description",
        "homie/5/dev1/climate/$name",
        "homie/5/dev1/climate/temperature/$target",
        "homie/5/dev1/climate/temperature/set",
        "homie/5/$broadcast/alert",
    ],
)
def test_homie_attributes_and_commands_carry_no_reading(topic: str) -> None:
    assert decode(topic, "ready") == []


def test_homie_attributes_are_recognised_without_a_wildcard_topic() -> None:
    decoder = make([Subscription(template="homie/{device}/{node}/{property}", codec="homie")])
    assert decoder.decode("homie/dev1/$state", b"ready", RECEIVED) == []
    assert decoder.decode("homie/dev1/n/p/set", b"1", RECEIVED) == []
    assert rejected("homie/dev1/n/p/x", "1", decoder).reason == TOPIC_UNMATCHED


def test_an_empty_retained_homie_value_carries_no_reading() -> None:
    assert decode("homie/dev1/climate/temperature", b"") == []


def test_homie_with_a_configured_measurement_keeps_the_node_as_a_tag() -> None:
    decoder = make(
        [
            Subscription(
                template="homie/{device}/{node}/{property}", codec="homie", measurement="homie"
            )
        ]
    )
    r = decoder.decode("homie/dev1/climate/temperature", b"20", RECEIVED)[0]
    assert r == Reading("homie", "dev1", {"node": "climate"}, {"temperature": 20.0}, RECEIVED)


def test_a_homie_v5_topic_one_level_short_is_no_reading_of_a_device_named_5() -> None:
    """homie/5/X/prop matches the v4 template homie/{device}/{node}/{property} as device
    "5"; device X may publish it (its own v5 tree), so it would write as another device."""
    only_v4 = make([Subscription(template="homie/{device}/{node}/{property}", codec="homie")])
    for decoder in (DECODER, only_v4):
        refused = rejected("homie/5/esp32-x/temperature", "21.5", decoder)
        assert refused.reason == DEVICE_INVALID and "Homie v5" in refused.detail, refused
        assert rejected("homie/5/esp32-x/temperature", "", decoder).reason == DEVICE_INVALID
    # The v5 property itself, and v4 devices whose names merely contain a 5, are readings.
    assert one("homie/5/esp32-x/climate/temperature", "21.5").device == "esp32-x"
    assert only_v4.decode("homie/esp5/climate/t", b"1", RECEIVED)[0].device == "esp5"
    assert only_v4.decode("homie/55/climate/t", b"1", RECEIVED)[0].device == "55"
    # Only where the device level follows a literal "homie": elsewhere 5 is a device id.
    other = make([Subscription(template="h/{device}/{node}/{property}", codec="homie")])
    assert other.decode("h/5/climate/t", b"1", RECEIVED)[0].device == "5"


def test_homie_values_follow_the_value_rules() -> None:
    assert rejected("homie/dev1/door/state", "open").reason == MALFORMED
    assert rejected("homie/dev1/climate/t", "NaN").reason == NOT_FINITE
    assert rejected("homie/dev 1/climate/t", "1").reason == DEVICE_INVALID


# --- injection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["dev1 x=1", "site,evil=1", 'q" f=1i', "C:\\temp", "x=1 2"])
def test_topic_levels_cannot_inject(site: str) -> None:
    r = one(f"farm/{site}/d1/env{site}", '{"v": 1}')
    assert written(r) == (f"env{site}", {"device": "d1", "site": site}, {"v": 1.0}, RECEIVED)


@pytest.mark.parametrize("level", ["a\\", "\\", "a\\\\b", "a\\,b", "a\\=b", "a\\ b", 'a\\"b'])
def test_backslashes_that_tsdbs_read_differently_are_refused(level: str) -> None:
    """InfluxDB 1.x keeps "\\\\" as two backslashes where 2.x and VictoriaMetrics read one,
    and a measurement ending in a backslash swallows the tags after it (test_injection.py
    shows both on the real servers): no spelling is safe, so the name is refused."""
    assert rejected(f"farm/{level}/d1/env", '{"v": 1}').reason == BAD_CHARACTERS
    assert rejected(f"farm/n/d1/{level}", '{"v": 1}').reason == BAD_CHARACTERS
    assert rejected("farm/n/d1/env", orjson.dumps({level: 1})).reason == BAD_CHARACTERS
    escaped = "".join("\\" + c if c in "\\ ,=" else c for c in level)  # as 2.x writes it
    assert rejected("lp/n/d1", f"env,room={escaped} t=1").reason == BAD_CHARACTERS
    assert rejected("tele/d1/SENSOR", orjson.dumps({level: {"T": 1}})).reason == BAD_CHARACTERS


def test_a_permissive_device_pattern_still_cannot_inject() -> None:
    decoder = make([Subscription(template="x/{device}", measurement="m", device_pattern=".*")])
    for device in ["dev1 x=1", "d,site=evil", "d\\x"]:
        r = decoder.decode(f"x/{device}", b'{"v": 1}', RECEIVED)[0]
        assert written(r) == ("m", {"device": device}, {"v": 1.0}, RECEIVED)
    assert rejected("x/a\nb", '{"v": 1}', decoder).reason == BAD_CHARACTERS
    assert rejected("x/d\\", '{"v": 1}', decoder).reason == BAD_CHARACTERS
    # An empty device level would be a point without its device tag.
    assert rejected("x/", '{"v": 1}', decoder).reason == DEVICE_INVALID


def test_json_strings_and_keys_cannot_inject() -> None:
    note = 'he said "hi", a=b \\ c\\'
    payload = {"note": note, "t x=1,y": 2, "q'": 3}
    r = one("farm/n/d1/env", orjson.dumps(payload))
    assert written(r) == (
        "env",
        {"device": "d1", "site": "n"},
        {"note": note, "t x=1,y": 2.0, "q'": 3.0},
        RECEIVED,
    )


def test_a_double_quote_in_a_field_name_is_refused() -> None:
    """VictoriaMetrics reads it as the start of a string: the rest of the line (fields, the
    timestamp) was lost and the field stored as 0 (test_injection.py, on the real server)."""
    assert rejected("farm/n/d1/env", orjson.dumps({'q"': 3})).reason == BAD_CHARACTERS
    assert rejected("lp/n/d1", 'env q"x=1,t=2').reason == BAD_CHARACTERS
    assert rejected('sensors/n/d1/q"x', "1").reason == BAD_CHARACTERS
    assert rejected("tele/d1/SENSOR", orjson.dumps({"S": {'T"': 1}})).reason == BAD_CHARACTERS
    assert one('farm/n/d1/en"v', '{"v": 1}').measurement == 'en"v'  # elsewhere it is fine


def test_names_longer_than_256_bytes_are_refused_not_truncated() -> None:
    """VictoriaMetrics truncates label names past 256 bytes and values past 16 KiB without a
    word (test_injection.py shows it on the real server): such a point would be stored under
    another name, so the name is refused."""
    assert one(f"farm/{'s' * 256}/d1/env", '{"v": 1}').tags == {"site": "s" * 256}
    for topic in (f"farm/{'s' * 257}/d1/env", f"farm/{'é' * 129}/d1/env", f"farm/n/d1/{'m' * 300}"):
        assert rejected(topic, '{"v": 1}').reason == NAME_TOO_LONG
    assert rejected("farm/n/d1/env", orjson.dumps({"k" * 257: 1})).reason == NAME_TOO_LONG
    assert rejected("lp/n/d1", f"env,room={'r' * 257} t=1").reason == NAME_TOO_LONG
    assert rejected("tele/d1/SENSOR", orjson.dumps({"S" * 257: {"T": 1}})).reason == NAME_TOO_LONG


def test_a_name_tag_in_line_protocol_is_refused() -> None:
    """VictoriaMetrics drops a tag named __name__ and keeps the point: refused instead."""
    unrestricted = make([Subscription(template="lp/{device}", codec="line")])
    error = rejected("lp/d1", "env,__name__=evil t=1", unrestricted)
    assert (error.reason, error.detail) == (TAG_NOT_ALLOWED, "line 1: tag '__name__' is reserved")
    with pytest.raises(ConfigError, match="metric name"):
        make([Subscription(template="x/{__name__}/{device}", measurement="m")])


def test_line_payload_cannot_smuggle_lines_or_fields() -> None:
    payload = 'env,room=a s="x\\" t=9 1" 1714557601000000000\nenv,room=b t=2'
    first, second = decode("lp/n/d1", payload)
    assert written(first) == (
        "env",
        {"device": "d1", "room": "a", "site": "n"},
        {"s": 'x" t=9 1'},
        (T0 + 1) * S,
    )
    assert written(second)[2] == {"t": 2.0}


# --- properties --------------------------------------------------------------------------------

_TOPIC_LEVELS = st.one_of(
    st.sampled_from(
        [
            "farm",
            "sensors",
            "relay",
            "lp",
            "tele",
            "SENSOR",
            "homie",
            "5",
            "d1",
            "env",
            "$state",
            "set",
            "",
        ]
    ),
    st.text(max_size=6),
)
topics = st.one_of(
    st.lists(_TOPIC_LEVELS, min_size=1, max_size=6).map("/".join), st.text(max_size=20)
)
json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-(2**64), 2**64) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.one_of(
    st.binary(max_size=80),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=40).map(str.encode),
    st.sampled_from([b"21.5", b"ON", b"nan", b"env t=1", b'{"t": 1, "ts": 1714557600}']),
)


def check_decoded(readings: list[Reading]) -> None:
    """Every reading decode returns can be written as one line that reads back the same."""
    for r in readings:
        measurement, tags, fields, time_ns = written(r)
        assert (measurement, fields, time_ns) == (r.measurement, r.fields, r.time_ns)
        assert tags == {"device": r.device, **{k: v for k, v in r.tags.items() if v}}
        assert all(type(v) in (float, bool, str) for v in r.fields.values())


@settings(max_examples=500, deadline=None)
@given(topics, payloads)
def test_decode_raises_nothing_but_reject(topic: str, payload: bytes) -> None:
    try:
        readings = DECODER.decode(topic, payload, RECEIVED)
    except Reject as error:
        assert error.reason in REASONS
        return
    check_decoded(readings)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["farm/n/d1/env", "tele/d1/SENSOR", "farm/s,x=1/d 1/e v"]), json_values)
def test_any_json_decodes_to_writable_readings_or_a_reason(topic: str, value: Any) -> None:
    payload = json.dumps(value).encode()  # big integers and NaN literals included
    try:
        readings = DECODER.decode(topic, payload, RECEIVED)
    except Reject as error:
        assert error.reason in REASONS
        return
    check_decoded(readings)


@pytest.mark.parametrize("stamp", ['"1e999999"', '"1e9999999"', '"-1e99999999"', '"NaN"', '"sNaN"'])
def test_absurd_decimal_timestamps_are_bad_timestamps_not_crashes(stamp: str) -> None:
    """decimal.Overflow is an ArithmeticError, not a ValueError: once it escaped decode
    and, raised inside paho's callback, made paho replay the packet forever."""
    reason = rejected("farm/gh1/dev1/climate", f'{{"temp": 21.5, "time": {stamp}}}').reason
    assert reason == BAD_TIMESTAMP
