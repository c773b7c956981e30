"""Line protocol: exact escaping, refusal of what cannot be written, a strict parser."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.lineproto import AMBIGUOUS_BACKSLASH, _format_escaped, format_reading, parse_line
from ingestd.model import FieldValue, Reading

T = 1714564800123456789


def reading(
    measurement: str = "env",
    device: str = "esp32-01",
    tags: dict[str, str] | None = None,
    fields: dict[str, FieldValue] | None = None,
    time_ns: int = T,
) -> Reading:
    return Reading(
        measurement,
        device,
        {"site": "north"} if tags is None else tags,
        {"temp": 21.5} if fields is None else fields,
        time_ns,
    )


def roundtrip(r: Reading) -> tuple[str, dict[str, str], dict[str, object], int | None]:
    line = format_reading(r)
    assert b"\n" not in line and b"\r" not in line
    return parse_line(line)


# --- format_reading: exact output ----------------------------------------------------------


def test_typical_reading_is_one_exact_line() -> None:
    r = reading(fields={"temp": 21.5, "hum": 55.0, "co2": 412.0, "ph": 6.1, "ec": 1.83})
    assert format_reading(r) == (
        b"env,device=esp32-01,site=north temp=21.5,hum=55.0,co2=412.0,ph=6.1,ec=1.83 "
        + str(T).encode()
    )


def test_device_first_then_tags_sorted_by_key_and_empty_tags_dropped() -> None:
    r = reading(tags={"zone": "b", "bed": "3", "empty": "", "site": "north"})
    assert (
        format_reading(r)
        == b"env,device=esp32-01,bed=3,site=north,zone=b temp=21.5 " + str(T).encode()
    )


def test_fields_keep_their_order() -> None:
    r = reading(tags={}, fields={"z": 1.0, "a": 2.0, "m": 3.0})
    assert format_reading(r) == b"env,device=esp32-01 z=1.0,a=2.0,m=3.0 " + str(T).encode()


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (21.0, "21.0"),
        (-0.0, "-0.0"),
        (1e16, "1e+16"),
        (1.5e-07, "1.5e-07"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (True, "true"),
        (False, "false"),
        (3, "3.0"),  # an int that slipped in is still written as a float
    ],
)
def test_field_values_are_typed_unambiguously(value: FieldValue, text: str) -> None:
    line = format_reading(reading(tags={}, fields={"v": value}))
    assert line == f"env,device=esp32-01 v={text} {T}".encode()


def test_float_subclass_is_written_as_a_plain_float() -> None:
    class Celsius(float):
        def __repr__(self) -> str:
            return f"Celsius({float(self)})"

    line = format_reading(reading(fields={"v": Celsius(21.5)}))
    assert b" v=21.5 " in line


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('say "hi"', r'"say \"hi\""'),
        ("C:\\temp\\", r'"C:\\temp\\"'),
        ("a, b=c d", '"a, b=c d"'),
        ("tab\there", '"tab\there"'),
        ("", '""'),
    ],
)
def test_string_values_escape_quote_and_backslash(value: str, text: str) -> None:
    line = format_reading(reading(tags={}, fields={"s": value}))
    assert line == f"env,device=esp32-01 s={text} {T}".encode()
    assert parse_line(line)[2] == {"s": value}


def test_names_are_escaped_per_element() -> None:
    r = Reading(
        measurement="air env,x=1",
        device="dev 1",
        tags={"a b": "c,d=e", "k=": "v "},
        fields={"f,1 x=": 1.0},
        time_ns=5,
    )
    assert format_reading(r) == (
        rb"air\ env\,x=1,device=dev\ 1,a\ b=c\,d\=e,k\==v\  f\,1\ x\==1.0 5"
    )
    assert roundtrip(r) == (
        "air env,x=1",
        {"device": "dev 1", "a b": "c,d=e", "k=": "v "},
        {"f,1 x=": 1.0},
        5,
    )


def test_a_backslash_before_an_ordinary_character_is_written_as_it_is() -> None:
    line = format_reading(reading(tags={"t": "C:\\temp"}, fields={"f": 1.0}))
    assert line == f"env,device=esp32-01,t=C:\\temp f=1.0 {T}".encode()
    assert parse_line(line)[1] == {"device": "esp32-01", "t": "C:\\temp"}


@pytest.mark.parametrize("value", ["a\\", "a\\,b", "a\\\\b", 'a\\"b', "a\\=b", "a\\ b", "\\"])
@pytest.mark.parametrize("where", ["measurement", "device", "tag key", "tag value", "field key"])
def test_backslashes_that_tsdbs_read_differently_are_refused(value: str, where: str) -> None:
    """No spelling works everywhere: InfluxDB 1.x keeps a doubled backslash doubled (and a
    measurement ending in one swallows the tags after it), 2.x and VictoriaMetrics halve it."""
    r = reading()
    if where == "measurement":
        r.measurement = value
    elif where == "device":
        r.device = value
    elif where == "tag key":
        r.tags = {value: "v"}
    elif where == "tag value":
        r.tags = {"k": value}
    else:
        r.fields = {value: 1.0}
    with pytest.raises(ValueError, match="backslash before a separator"):
        format_reading(r)
    string = reading(fields={"s": value})  # in a string value, every backslash is doubled
    assert parse_line(format_reading(string))[2] == {"s": value}


def test_fast_path_and_escaping_path_agree_on_a_plain_reading() -> None:
    r = reading(tags={"site": "north", "bed": "2"}, fields={"t": 1.5, "ok": True, "s": "x"})
    assert format_reading(r) == _format_escaped(r)


# --- format_reading: refusals --------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\t", "\x1b", "\x7f"])
@pytest.mark.parametrize("where", ["measurement", "device", "tag key", "tag value", "field key"])
def test_control_characters_in_names_are_refused(bad: str, where: str) -> None:
    name = f"a{bad}b"
    r = reading()
    if where == "measurement":
        r.measurement = name
    elif where == "device":
        r.device = name
    elif where == "tag key":
        r.tags = {name: "v"}
    elif where == "tag value":
        r.tags = {"k": name}
    else:
        r.fields = {name: 1.0}
    with pytest.raises(ValueError, match="control character"):
        format_reading(r)


@pytest.mark.parametrize("bad", ["\n", "\r", "line1\r\nline2"])
def test_newlines_in_string_values_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="newline"):
        format_reading(reading(fields={"note": f"x{bad}y"}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused(value: float) -> None:
    with pytest.raises(ValueError, match="not finite"):
        format_reading(reading(fields={"t": 1.0, "v": value}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"measurement": ""}, "measurement"),
        ({"measurement": "#comment"}, "start with '#'"),
        ({"device": ""}, "device must not be empty"),
        ({"tags": {"device": "other"}}, "must not contain 'device'"),
        ({"tags": {"": "v"}}, "tag keys must not be empty"),
        ({"fields": {}}, "at least one field"),
        ({"fields": {"": 1.0}}, "field keys must not be empty"),
        ({"fields": {"v": None}}, "unsupported type NoneType"),
        ({"time_ns": 1.5}, "format code"),
    ],
)
def test_readings_that_cannot_be_one_line_are_refused(
    changes: dict[str, object], message: str
) -> None:
    r = reading()
    for key, value in changes.items():
        setattr(r, key, value)
    with pytest.raises(ValueError, match=message):
        format_reading(r)


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(ValueError):
        format_reading(reading(tags={"site": "\ud800"}))


@pytest.mark.parametrize(
    "evil",
    [
        "dev1 x=1",
        "site,evil=1",
        "a b=1 2",
        "x=1i 123",
        'q" f=1',
        "\\x",
        "#",
    ],
)
def test_no_string_can_inject_tags_fields_or_lines(evil: str) -> None:
    key = evil.replace('"', "'")  # a field key with a double quote is refused (below)
    r = Reading(
        measurement="m" + evil,
        device="d" + evil,
        tags={evil: evil, "k": evil},
        fields={key: 1.0, "s": evil},
        time_ns=7,
    )
    assert roundtrip(r) == (
        "m" + evil,
        {"device": "d" + evil, evil: evil, "k": evil},
        {key: 1.0, "s": evil},
        7,
    )


def test_a_double_quote_in_a_field_key_is_refused() -> None:
    """VictoriaMetrics reads it as the start of a string value and loses the rest of the line;
    InfluxDB 1.x unescapes \\" in a field key: no spelling works for both."""
    with pytest.raises(ValueError, match="double quote"):
        format_reading(reading(fields={'q"': 1.0}))


# --- property tests ------------------------------------------------------------------------

_NAME_CHARS = st.one_of(
    st.sampled_from(list('\\ ,="#')),
    st.characters(
        exclude_categories=("Cs",), exclude_characters=[chr(c) for c in range(32)] + ["\x7f"]
    ),
)
names = st.text(_NAME_CHARS, min_size=1, max_size=12).filter(
    lambda s: not AMBIGUOUS_BACKSLASH.search(s)
)
strings = st.text(
    st.one_of(st.sampled_from(list('\\"\t ,=')), st.characters(exclude_categories=("Cs",))).filter(
        lambda c: c not in "\r\n"
    ),
    max_size=16,
)
values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    strings,
)


@st.composite
def readings(draw: st.DrawFn) -> Reading:
    return Reading(
        measurement=draw(names.filter(lambda s: not s.startswith("#"))),
        device=draw(names),
        tags=draw(
            st.dictionaries(names.filter(lambda s: s != "device"), st.one_of(st.just(""), names))
        ),
        fields=draw(
            st.dictionaries(names.filter(lambda s: '"' not in s), values, min_size=1, max_size=6)
        ),
        time_ns=draw(st.integers(-(2**63), 2**63 - 1)),
    )


@settings(max_examples=400, deadline=None)
@given(readings())
def test_any_reading_round_trips_exactly(r: Reading) -> None:
    measurement, tags, fields, time_ns = roundtrip(r)
    assert measurement == r.measurement
    assert tags == {"device": r.device, **{k: v for k, v in r.tags.items() if v}}
    assert fields == r.fields
    assert list(fields) == list(r.fields)
    assert all(type(fields[k]) is type(v) for k, v in r.fields.items())
    assert time_ns == r.time_ns
    assert format_reading(r) == _format_escaped(r)


@settings(deadline=None)
@given(readings(), st.sampled_from(["\n", "\r"]), st.integers(0, 4))
def test_any_newline_anywhere_is_refused(r: Reading, newline: str, where: int) -> None:
    if where == 0:
        r.measurement += newline
    elif where == 1:
        r.device = newline + r.device
    elif where == 2:
        r.tags["k"] = f"a{newline}b"
    elif where == 3:
        r.fields[f"f{newline}"] = 1.0
    else:
        r.fields["s"] = newline
    with pytest.raises(ValueError):
        format_reading(r)


# --- parse_line ----------------------------------------------------------------------------


def test_parse_a_full_line() -> None:
    line = (
        rb"weather,location=us\ midwest,season=summer"
        rb' temp=82,hum=71i,big=18446744073709551615u,ok=t,note="a \"b\" \\c",ratio=-1.5e-3'
        rb" 1465839830100400200"
    )
    assert parse_line(line) == (
        "weather",
        {"location": "us midwest", "season": "summer"},
        {
            "temp": 82.0,
            "hum": 71,
            "big": 18446744073709551615,
            "ok": True,
            "note": 'a "b" \\c',
            "ratio": -0.0015,
        },
        1465839830100400200,
    )


def test_timestamp_is_optional_and_may_be_negative() -> None:
    assert parse_line(b"m f=1") == ("m", {}, {"f": 1.0}, None)
    assert parse_line(b"m f=1 -5") == ("m", {}, {"f": 1.0}, -5)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[(t, True) for t in ("t", "T", "true", "True", "TRUE")],
        *[(f, False) for f in ("f", "F", "false", "False", "FALSE")],
        ("1", 1.0),
        ("-1.", -1.0),
        (".5", 0.5),
        ("1e3", 1000.0),
        ("1E-2", 0.01),
        ("-0", -0.0),
        ("0i", 0),
        ("-9223372036854775808i", -(2**63)),
        ("9223372036854775807i", 2**63 - 1),
        ("0u", 0),
    ],
)
def test_field_value_spellings(text: str, value: object) -> None:
    fields = parse_line(f"m f={text}".encode())[2]
    assert fields == {"f": value}
    assert type(fields["f"]) is type(value)


@pytest.mark.parametrize(
    ("escaped", "value"),
    # The InfluxDB 2 reference's table: with two contiguous backslashes the first escapes.
    [("x\\y", "x\\y"), ("x\\\\y", "x\\y"), ("x\\\\\\y", "x\\\\y"), ("x\\\\\\\\y", "x\\\\y")],
)
def test_backslashes_read_as_the_influxdb_reference_says(escaped: str, value: str) -> None:
    assert parse_line(f"m,t={escaped} f=1".encode())[1] == {"t": value}


def test_strings_may_hold_separators_and_escaped_quotes() -> None:
    line = rb'm s="a, b=c \"d\" e\\",n="\\x\y" 1'
    assert parse_line(line)[2] == {"s": 'a, b=c "d" e\\', "n": "\\x\\y"}


def test_measurement_may_hold_an_equals_sign_and_escaped_separators() -> None:
    assert parse_line(rb"a=b\,c\ d f=1")[0] == "a=b,c d"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"", "empty line"),
        (b"   ", "empty line"),
        (b"# comment", "comment"),
        (b"m f=1\nn f=2", "column 6: newline inside a line"),
        (b"m f=1\r", "carriage return"),
        (b"\xff f=1", "byte 1: not UTF-8"),
        (b",t=1 f=1", "column 1: expected a measurement"),
        (b" m f=1", "column 1: expected a measurement"),
        (b"m", "column 2: expected a space before the fields, got the end of the line"),
        (b"m,t f=1", "column 4: expected '=' after tag key 't'"),
        (b"m,=v f=1", "column 3: expected a tag key"),
        (b"m,t= f=1", "tag 't' has an empty value"),
        (b"m,t=1,t=2 f=1", "duplicate tag key 't'"),
        (b"m,t=a=b f=1", "column 6: expected a space before the fields, got '='"),
        (b"m  f=1", "column 3: expected a field key"),
        (b"m ", "column 3: expected a field key"),
        (b"m f", "column 4: expected '=' after field key 'f'"),
        (b"m f=", "field 'f' has no value"),
        (b"m f=,g=1", "field 'f' has no value"),
        (b"m f=1,f=2", "duplicate field key 'f'"),
        (b'm f="abc', "unterminated string in field 'f'"),
        (b'm f="a"b', "expected ',' or ' ' after field 'f'"),
        (b"m f=abc", "field 'f' has invalid value 'abc'"),
        (b"m f=1.2.3", "invalid value"),
        (b"m f=0x10", "invalid value"),
        (b"m f=+1", "invalid value"),
        (b"m f=nan", "invalid value"),
        (b"m f=inf", "invalid value"),
        (b"m f=1e999", "float field 'f' out of range"),
        (b"m f=1.5i", "invalid value"),
        (b"m f=9223372036854775808i", "out of int64 range"),
        (b"m f=" + b"9" * 30 + b"i", "out of int64 range"),
        (b"m f=-1u", "invalid value"),
        (b"m f=18446744073709551616u", "out of uint64 range"),
        (b"m f=1 ", "expected an integer timestamp, got ''"),
        (b"m f=1  5", "expected an integer timestamp"),
        (b"m f=1 12:00", "expected an integer timestamp, got '12:00'"),
        (b"m f=1 5 6", "expected an integer timestamp"),
        (b"m f=1 9223372036854775808", "timestamp out of int64 range"),
        (b"m,t=a\\", "expected a space before the fields"),
    ],
)
def test_malformed_lines_are_refused_precisely(line: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_line(line)


@settings(deadline=None)
@given(st.binary(max_size=64))
def test_parse_line_raises_only_value_error(line: bytes) -> None:
    try:
        measurement, tags, fields, _ = parse_line(line)
    except ValueError:
        return
    assert measurement and fields
    assert all(tags.values())
