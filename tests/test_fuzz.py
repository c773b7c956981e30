"""Fuzzing: every decoder, the topic template matcher, the rule loader and the config loader.

Properties (issue 11):

- every message either yields readings that can be written, or a ``Reject`` whose reason is
  one of :data:`ingestd.decode.REASONS`; no other exception escapes, nothing hangs;
- the line protocol written for a reading reads back exactly through :func:`strict_parse`,
  a parser of the portable subset of line protocol: what InfluxDB 1.x, InfluxDB 2.x and
  VictoriaMetrics all read the same way (test_injection.py checks that claim against the
  real servers);
- a topic is routed exactly as MQTT matching and the subscription's template say;
- a rule file is a ``RuleSet`` or a ``RulesError`` whose every problem starts ``file:line:col:``;
- a config file is ``Settings`` (that ``ingestd check`` accepts) or a ``ConfigError``.

The suite runs a bounded number of examples; ``make fuzz`` runs the same properties with
``FUZZ_SCALE`` times as many (and prints hypothesis' statistics: inputs tried per target).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingestd.config import GuardSection, Settings, Subscription, load_settings
from ingestd.decode import REASONS, Decoder
from ingestd.errors import ConfigError
from ingestd.lineproto import format_reading, parse_line
from ingestd.model import Reading, Reject
from ingestd.quota import QuotaRules
from ingestd.rules.loader import RulesError, load_rule_files

REPO = Path(__file__).resolve().parent.parent
SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
"""``make fuzz`` sets this (50 by default): every property runs that many times longer."""


def fuzz(examples: int) -> settings:
    """Bounded in the suite; ``FUZZ_SCALE`` times more under ``make fuzz``. No deadline: the
    machine is shared, so time is never asserted (a hang trips pytest-timeout instead)."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def words(text: str) -> list[str]:
    return text.split()


def one_in(n: int, draw: st.DrawFn) -> bool:
    """True about once in ``n`` draws. Not ``integers(0, n - 1) == 0``: hypothesis favours
    the bounds of a range, which would make the rare case common."""
    return draw(st.integers(0, n - 1)) == n // 2


S = 1_000_000_000
T0 = 1714557600  # 2024-05-01T10:00:00Z
RECEIVED = (T0 + 5) * S
GUARD = GuardSection()
MAX_FUTURE, MAX_AGE = int(GUARD.max_future * S), int(GUARD.max_age * S)


# --- a strict parser of portable line protocol ---------------------------------------------
#
# InfluxDB 1.x scans a name treating any byte after a backslash as literal and unescapes only
# "\," "\ " (and "\=" outside measurements); InfluxDB 2.x and VictoriaMetrics also read "\\"
# as one backslash. A backslash before "\", ",", "=", " ", '"' or at the end of a name is
# therefore read differently by different servers (InfluxDB 1.x even swallows the tags after
# a measurement ending in one), so this parser refuses it; also a double quote in a field key
# (VictoriaMetrics starts a string there), a tag named __name__ (VictoriaMetrics drops it) and
# a name over 256 bytes (VictoriaMetrics truncates it). A line it accepts means the same on
# every server.

_PORTABLE_ESCAPES = {"measurement": ", ", "key": ",= "}


class NotPortable(ValueError):
    """The line is not in the portable subset of line protocol."""


def _scan_name(s: str, pos: int, kind: str, stops: str) -> tuple[str, int]:
    escapes = _PORTABLE_ESCAPES[kind]
    out: list[str] = []
    start = pos
    while pos < len(s) and s[pos] not in stops:
        c = s[pos]
        if c == "\\":
            nxt = s[pos + 1] if pos + 1 < len(s) else ""
            if nxt in escapes and nxt:
                out.append(nxt)
                pos += 2
                continue
            if nxt in ("", "\\", '"', ",", "=", " ") or nxt in stops:
                raise NotPortable(f"column {pos + 1}: ambiguous backslash before {nxt!r}")
            out.append(c)  # a literal backslash before an ordinary character
            pos += 1
            continue
        if kind == "key" and c in ",= ":  # pragma: no cover - stops cover these
            raise NotPortable(f"column {pos + 1}: unescaped {c!r}")
        if ord(c) < 0x20 or c == "\x7f":
            raise NotPortable(f"column {pos + 1}: control character {c!r} in a name")
        out.append(c)
        pos += 1
    if pos == start:
        raise NotPortable(f"column {pos + 1}: empty {kind}")
    name = "".join(out)
    if len(name.encode()) > 256:  # VictoriaMetrics truncates label names past 256 bytes
        raise NotPortable(f"column {start + 1}: a name of {len(name.encode())} bytes")
    return name, pos


def _scan_value(s: str, pos: int) -> tuple[float | bool | str, int]:
    if s.startswith('"', pos):
        out: list[str] = []
        pos += 1
        while True:
            if pos >= len(s):
                raise NotPortable("unterminated string")
            c = s[pos]
            if c == '"':
                return "".join(out), pos + 1
            if c == "\\":
                nxt = s[pos + 1 : pos + 2]
                if nxt not in ('"', "\\"):
                    raise NotPortable(f"column {pos + 1}: backslash before {nxt!r} in a string")
                out.append(nxt)
                pos += 2
                continue
            if c in "\r\n":
                raise NotPortable("newline in a string")
            out.append(c)
            pos += 1
    end = pos
    while end < len(s) and s[end] not in ", ":
        end += 1
    token = s[pos:end]
    if token in ("true", "false"):
        return token == "true", end
    # Only what the formatter writes: a float with "." or "e", never an integer suffix.
    if not re.fullmatch(r"-?[0-9]+(\.[0-9]+)?(e[-+][0-9]+)?", token) or not re.search(
        r"[.e]", token
    ):
        raise NotPortable(f"column {pos + 1}: not a float, bool or string: {token!r}")
    value = float(token)
    if not math.isfinite(value):
        raise NotPortable(f"column {pos + 1}: not finite: {token!r}")
    return value, end


def strict_parse(line: bytes) -> tuple[str, dict[str, str], dict[str, float | bool | str], int]:
    """``(measurement, tags, fields, time_ns)``, or NotPortable for anything that is not
    one point every server reads identically (a timestamp is required)."""
    s = line.decode("utf-8")  # UnicodeDecodeError is a failure too
    if not s or s[0] in "# ,":
        raise NotPortable("a line starts with a measurement")
    measurement, pos = _scan_name(s, 0, "measurement", ", ")
    tags: dict[str, str] = {}
    while pos < len(s) and s[pos] == ",":
        key, pos = _scan_name(s, pos + 1, "key", ",= ")
        if not s.startswith("=", pos):
            raise NotPortable(f"column {pos + 1}: tag {key!r} without '='")
        value, pos = _scan_name(s, pos + 1, "key", ",= ")
        if key in tags or key == "__name__":  # VictoriaMetrics drops a __name__ tag
            raise NotPortable(f"duplicate or reserved tag {key!r}")
        tags[key] = value
    if not s.startswith(" ", pos):
        raise NotPortable(f"column {pos + 1}: expected a space before the fields")
    fields: dict[str, float | bool | str] = {}
    while True:
        key, pos = _scan_name(s, pos + 1, "key", ",= ")
        if '"' in key:  # VictoriaMetrics reads a string from there on
            raise NotPortable(f"column {pos + 1}: field key {key!r} with a double quote")
        if not s.startswith("=", pos):
            raise NotPortable(f"column {pos + 1}: field {key!r} without '='")
        value, pos = _scan_value(s, pos + 1)
        if key in fields:
            raise NotPortable(f"duplicate field {key!r}")
        fields[key] = value
        if s.startswith(" ", pos):
            break
        if not s.startswith(",", pos):
            raise NotPortable(f"column {pos + 1}: expected ',' or ' ' after a field")
    stamp = s[pos + 1 :]
    if not re.fullmatch(r"-?[0-9]{1,19}", stamp) or not -(2**63) <= int(stamp) < 2**63:
        raise NotPortable(f"bad timestamp {stamp[:30]!r}")
    return measurement, tags, fields, int(stamp)


def assert_portable_line(r: Reading) -> bytes:
    """The line written for ``r``: one line, and exactly ``r`` again for every parser."""
    line = format_reading(r)
    expected_tags = {"device": r.device, **{k: v for k, v in r.tags.items() if v}}
    assert strict_parse(line) == (r.measurement, expected_tags, r.fields, r.time_ns), line
    assert parse_line(line) == (r.measurement, expected_tags, r.fields, r.time_ns), line
    return line


# --- the decoders ---------------------------------------------------------------------------

SUBSCRIPTIONS = [
    Subscription(template="farm/{site}/{device}/{measurement}", string_fields=["fw", "note"]),
    # an operator's permissive device pattern: escaping must hold on its own
    Subscription(
        template="open/{site}/{device}/{measurement}",
        device_pattern=r"(?s).*",
        string_fields=["note"],
        time_keys=["ts"],
    ),
    Subscription(
        template="sensors/{site}/{device}/{field}",
        codec="value",
        measurement="env",
        string_fields=["state"],
    ),
    Subscription(template="relay/{device}", codec="value", measurement="relay"),
    Subscription(template="lp/{site}/{device}", codec="line", device_pattern=r"(?s).*"),
    Subscription(
        template="lpr/{site}/{device}",
        codec="line",
        measurements=["env", "water"],
        tags=["room", "probe", "site"],
    ),
    Subscription(template="tele/{device}/SENSOR", codec="tasmota", timezone="Europe/Berlin"),
    Subscription(template="homie/5/{device}/{node}/{property}", codec="homie", topic="homie/5/#"),
    Subscription(template="homie/{device}/{node}/{property}", codec="homie", topic="homie/#"),
    Subscription(template="{site}/{device}/{measurement}", device_pattern=r"(?s).+"),
]
DECODER = Decoder(SUBSCRIPTIONS, GUARD)
CODEC_OF = {i: sub.codec for i, sub in enumerate(SUBSCRIPTIONS)}

# Characters that mean something to MQTT, line protocol, JSON, YAML or a terminal.
HOSTILE = list(" ,=\"\\'#+$/{}[]:;\t\n\r\x00\x1b\x7f\u0085\u2028\ufeff\ud800é€😀")
_SIMPLE = list("abcdeAZ019_-.")
level_text = st.text(st.sampled_from(HOSTILE + _SIMPLE), max_size=10)
plain = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,12}", fullmatch=True)  # what sensors send
# one_of draws each branch equally often: plain names half the time, so that hostile parts
# are tried inside otherwise valid messages too.
levels = st.one_of(
    plain,
    plain,
    plain,
    st.sampled_from(["site1", "esp32-01", "env", "", "$SYS", "+", "#", "a" * 64, "a" * 65]),
    level_text,
    st.text(max_size=8),  # any code point, lone surrogates included
    st.builds(lambda n: "x" * n, st.integers(100, 70_000)),  # very long levels
)


@st.composite
def routed_topics(draw: st.DrawFn) -> tuple[int, str]:
    """A topic shaped like one subscription's template (sometimes bent out of shape)."""
    index = draw(st.integers(0, len(SUBSCRIPTIONS) - 1))
    variable = draw(st.sampled_from([plain, levels]))  # all levels plain half the time
    parts = []
    for level in SUBSCRIPTIONS[index].template.split("/"):
        if level.startswith("{"):
            parts.append(draw(variable))
        elif one_in(20, draw):
            parts.append(draw(levels))  # a literal level changed
        else:
            parts.append(level)
    if SUBSCRIPTIONS[index].codec == "homie" and one_in(5, draw):
        parts.append(draw(st.sampled_from(["set", "$name", "$datatype", "x"])))
    change = draw(st.integers(0, 14))
    if change == 7 and len(parts) > 1:
        del parts[draw(st.integers(0, len(parts) - 1))]
    elif change == 8:
        parts.insert(draw(st.integers(0, len(parts))), draw(levels))
    return index, "/".join(parts)


stamps = st.one_of(
    st.sampled_from(
        [
            T0,  # seconds
            T0 * 1000,  # milliseconds
            T0 * 1_000_000,  # microseconds
            T0 * S,  # nanoseconds
            T0 + 0.25,
            float(T0 * S),  # nanoseconds through a double
            0,
            -1,
            32503680000,  # 3000-01-01 in seconds
            32503680000 * 1000,
            32503680000 * 1_000_000,
            2**63,
            2**64,
            "2024-05-01T10:00:00Z",
            "2024-05-01T12:00:00+02:00",
            "3000-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59.999999999-23:59",
            "2024-02-30T00:00:00",
            "1e400",
            "-0",
            "NaN",
            "",
            True,
            None,
            [T0],
        ]
    ),
    st.integers(T0 - 40 * 86400, T0 + 600),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.sampled_from(list("0123456789-+:.TZz eE")), max_size=32),
)
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(),  # NaN and infinities become JSON's NaN/Infinity literals: not JSON
    st.integers(-(2**80), 2**80),
    st.sampled_from([-0.0, 0.0, 1e308, -1e308, 5e-324, 2**53 + 1, 10**30]),
)
json_scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_keys = st.one_of(
    st.sampled_from(["t", "ph", "note", "fw", "device", "time", "ts", "", "k" * 257, "é" * 129]),
    plain,
    level_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=16,
)


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """Flipped bits, a half-written message, a stray byte: what a bad radio link does."""
    if not data or not one_in(5, draw):
        return data
    pos = draw(st.integers(0, len(data) - 1))
    how = draw(st.integers(0, 3))
    if how == 0:
        return data[:pos] + bytes([data[pos] ^ (1 << draw(st.integers(0, 7)))]) + data[pos + 1 :]
    if how == 1:
        return data[:pos]
    if how == 2:
        return data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos:]
    return data + data[:pos]


@st.composite
def json_payloads(draw: st.DrawFn) -> bytes:
    obj = draw(st.dictionaries(json_keys, json_values, max_size=6))
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["time", "ts", "timestamp", "Time"]))] = draw(stamps)
    if one_in(10, draw):
        depth = draw(st.sampled_from([15, 16, 17, 10_000]))
        obj["deep"] = {}
        text = json.dumps(obj).replace(
            '"deep": {}', '"deep": ' + '{"a":' * depth + "1" + "}" * depth
        )
        return text.encode()
    return _mutate(json.dumps(obj).encode(), draw)


@st.composite
def value_payloads(draw: st.DrawFn) -> bytes:
    text = draw(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False).map(repr),
            st.integers(-(2**70), 2**70).map(str),
            st.sampled_from(["21.5", "-0", "1e400", "-1e400", "on", "OFF", "tRuE", "nan", "inf"]),
            st.sampled_from(["9" * 400, "0x10", "1_000", "٣", " 7 ", "7\n", "", "\x00"]),
            st.text(st.sampled_from(list("0123456789.eE+- \t\r\nxinfatyNIO")), max_size=24),
            st.text(max_size=12),
        )
    )
    return _mutate(text.encode("utf-8", "surrogatepass"), draw)


def _lp_escape(name: str, chars: str) -> str:
    return "".join("\\" + c if c in chars else c for c in name)


lp_names = st.one_of(
    st.sampled_from(["env", "water", "room", "t", "device", "site", "__name__", "n" * 257]),
    plain,
    level_text,
)
lp_values = st.one_of(
    st.floats(allow_nan=False).map(repr),
    st.integers(-(2**64), 2**64).map(lambda i: f"{i}i"),
    st.integers(-5, 2**65).map(lambda i: f"{i}u"),
    st.sampled_from(["t", "F", "true", "FALSE", "1e999", "nan", "-0", ".5", "1."]),
    st.text(max_size=10).map(lambda v: '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'),
)


@st.composite
def line_payloads(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 9))
        if kind == 5:
            lines.append(draw(st.sampled_from(["", "# comment", "  "])))
            continue
        escape = kind != 6  # sometimes names go in raw: malformed lines
        measurement = draw(lp_names)
        text = _lp_escape(measurement, ", ") if escape else measurement
        for key, value in draw(st.dictionaries(lp_names, lp_names, max_size=3)).items():
            text += "," + (
                _lp_escape(key, ",= ") + "=" + _lp_escape(value, ",= ")
                if escape
                else f"{key}={value}"
            )
        fields = draw(st.dictionaries(lp_names, lp_values, min_size=1, max_size=4))
        text += " " + ",".join(
            (_lp_escape(k, ",= ") if escape else k) + "=" + v for k, v in fields.items()
        )
        stamp = draw(
            st.one_of(
                st.none(),
                st.integers(RECEIVED - 2 * MAX_AGE, RECEIVED + 2 * MAX_FUTURE),
                st.integers(-(2**64), 2**64),
            )
        )
        if stamp is not None:
            text += f" {stamp}"
        lines.append(text)
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return _mutate(sep.join(lines).encode("utf-8", "surrogatepass"), draw)


@st.composite
def tasmota_payloads(draw: st.DrawFn) -> bytes:
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["Time"] = draw(st.one_of(st.just("2024-05-01T12:00:00"), stamps))
    for sensor in draw(st.lists(json_keys, max_size=3)):
        obj[sensor] = draw(
            st.one_of(
                st.dictionaries(json_keys, json_values, max_size=4),
                json_scalars,
            )
        )
    obj.setdefault("TempUnit", "C")
    return _mutate(json.dumps(obj).encode(), draw)


CODEC_PAYLOADS = {
    "json": json_payloads(),
    "value": value_payloads(),
    "homie": value_payloads(),
    "line": line_payloads(),
    "tasmota": tasmota_payloads(),
}
any_payload = st.one_of(st.binary(max_size=64), *CODEC_PAYLOADS.values())


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    index, topic = draw(routed_topics())
    if one_in(10, draw):
        return topic, draw(any_payload)
    return topic, draw(CODEC_PAYLOADS[CODEC_OF[index]])


def check_message(topic: str, payload: bytes) -> str:
    """Decode one message and check what came out; returns the outcome (for statistics)."""
    try:
        readings = DECODER.decode(topic, payload, RECEIVED)
    except Reject as reject:
        assert reject.reason in REASONS, reject
        assert len(reject.detail) < 200, reject.detail
        return reject.reason
    topic_levels = topic.split("/")
    for r in readings:
        assert r.device in topic_levels, "identity comes from the topic, never the payload"
        assert "device" not in r.tags
        assert all(type(v) in (float, bool, str) for v in r.fields.values())
        assert RECEIVED - MAX_AGE <= r.time_ns <= RECEIVED + MAX_FUTURE
        assert_portable_line(r)
    return f"{len(readings)} readings" if readings else "nothing (by design)"


@fuzz(1500)
@given(messages())
@example(("farm/site1/esp32-01/env", b'{"t": 21.5, "ts": 1714557600}'))
@example(("open/s\\/d\\/env\\", b'{"note\\\\": "x"}'))  # backslashes before separators
@example(("open/s/dev\\/env", b'{"v": 1}'))  # a device ending in a backslash
@example(("open/s//env", b'{"v": 1}'))  # an empty device level
@example(("lp/s/d", b"env,t=a\\\\ f=1"))  # a tag value ending in a backslash
@example(("lp/s/d", b"env\\\\ f=1"))  # a measurement ending in one: InfluxDB 1.x loses tags
@example(("\U00018cd6" * 5 + "/tele/x/" + "a" * 70, b"{}"))  # repr spells it with 10 chars
@example((f"open/{'s' * 257}/d/env", b'{"v": 1}'))  # VictoriaMetrics would truncate it
@example(("lp/s/d", b"env,__name__=x f=1"))  # VictoriaMetrics would drop the tag
@example(("open/s/d/env", b'{"q\\"": 1, "t": 2}'))  # VictoriaMetrics: a string from the quote on
def test_every_message_is_readings_that_write_exactly_or_a_named_reject(
    message: tuple[str, bytes],
) -> None:
    event(check_message(*message))


@fuzz(400)
@given(routed_topics(), st.binary(max_size=80))
def test_any_bytes_on_any_codec(topic: tuple[int, str], payload: bytes) -> None:
    event(check_message(topic[1], payload))


# --- the topic template matcher -------------------------------------------------------------


def mqtt_match(filter_: str, topic: str) -> bool:
    """MQTT 3.1.1/5 topic matching, written from the specification (4.7), not from ours."""
    if filter_.startswith("$share/"):
        filter_ = filter_.split("/", 2)[2]
    f, t = filter_.split("/"), topic.split("/")
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False  # 4.7.2: wildcards at the first level never match $ topics
    for i, want in enumerate(f):
        if want == "#":
            return True  # matches the parent level too: "a/#" matches "a"
        if i >= len(t) or (want != "+" and want != t[i]):
            return False
    return len(f) == len(t)


def expected_route(subs: list[Subscription], topic: str) -> tuple[int, str] | None:
    """(subscription index, device) of the first subscription that takes the topic."""
    levels = topic.split("/")
    for index, sub in enumerate(subs):
        template = sub.template.split("/")
        if len(template) != len(levels) or not mqtt_match(sub.filter, topic):
            continue
        if all(t.startswith("{") or t == lv for t, lv in zip(template, levels, strict=True)):
            return index, levels[template.index("{device}")]
    return None


template_levels = st.sampled_from(["a", "b", "x", "$SYS", "{site}", "{zone}", "{measurement}"])


@st.composite
def subscriptions(draw: st.DrawFn) -> Subscription | None:
    levels = draw(st.lists(template_levels, min_size=0, max_size=4))
    levels.insert(draw(st.integers(0, len(levels))), "{device}")
    template = "/".join(levels)
    topic: str | None = None
    how = draw(st.integers(0, 3))
    if how == 1:  # a narrower filter: some variables fixed
        topic = "/".join(
            draw(st.sampled_from(["a", "b", "+"])) if lv.startswith("{") else lv for lv in levels
        )
    elif how == 2:  # a wider one, ending in #
        cut = draw(st.integers(0, len(levels)))
        topic = "/".join(["+" if lv.startswith("{") else lv for lv in levels[:cut]] + ["#"])
    elif how == 3:
        topic = "$share/g/" + "/".join("+" if lv.startswith("{") else lv for lv in levels)
    measurement = None if "{measurement}" in levels else "m"
    try:
        return Subscription(
            template=template, topic=topic, measurement=measurement, device_pattern=".+"
        )
    except ValidationError:
        return None  # e.g. a variable twice: the config refuses it, which is the point


topic_levels = st.sampled_from(["a", "b", "x", "$SYS", "$x", "d1", "", "+", "#"])


@fuzz(800)
@given(st.lists(subscriptions(), min_size=1, max_size=4), st.data())
def test_topics_route_as_mqtt_matching_and_the_templates_say(
    subs: list[Subscription | None], data: st.DataObject
) -> None:
    valid = [s for s in subs if s is not None]
    if valid and data.draw(st.booleans()):  # a topic shaped like one of the templates
        template = data.draw(st.sampled_from(valid)).template.split("/")
        topic = "/".join(data.draw(topic_levels) if t[0] == "{" else t for t in template)
    else:
        topic = "/".join(data.draw(st.lists(topic_levels, min_size=1, max_size=6)))
    try:
        decoder = Decoder(valid, GUARD)
    except ConfigError as exc:
        event("ConfigError")
        assert "subscription" in str(exc)
        return
    expected = expected_route(valid, topic)
    try:
        readings = decoder.decode(topic, b'{"v": 1}', RECEIVED)
    except Reject as reject:
        assert reject.reason in REASONS
        if expected is None:
            assert reject.reason == "topic_unmatched", (topic, reject)
        else:
            assert reject.reason in ("bad_characters", "device_invalid"), (topic, reject)
        event(reject.reason)
        return
    assert expected is not None, f"{topic!r} routed, but no subscription takes it"
    index, device = expected
    assert [r.device for r in readings] == [device]
    template = valid[index].template.split("/")
    want_tags = {
        t[1:-1]: lv
        for t, lv in zip(template, topic.split("/"), strict=True)
        if t.startswith("{") and t not in ("{device}", "{measurement}") and lv
    }
    assert readings[0].tags == want_tags
    event("routed")


# --- the rule loader ------------------------------------------------------------------------

SHIPPED_RULES = [
    REPO / "rules" / name for name in ("reservoir.yaml", "climate.yaml", "sensors.yaml")
]
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(
        words(
            "5m 1h30m -1s 0s inf nan 1e400 warning critical info * [ {{x {{value}} ph !x 2024-05-01"
        )
    ),
)
RULE_KEYS = st.sampled_from(
    words(
        "name select measurement field device site tags above below outside rate window clear "
        "inside for severity levels deadman per grace forget labels annotations repeat_interval "
        "flapping max_changes stable rules"
    )
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(RULE_KEYS, st.text(max_size=6)), inner, max_size=4)
    ),
    max_leaves=10,
)
# YAML's own tricks, spliced into a document as text.
YAML_TRICKS = [
    "a: 2024-02-30",  # a timestamp that resolves but does not exist
    "a: !!int abc",
    "a: !!float x",
    "a: !!binary '%%%'",
    "a: !!python/object:os.system x",
    "a: !!timestamp 2024-13-01",
    "a: &x [1, *x]",
    "a: *undefined",
    "a: {<<: [1]}",
    "a: " + "[" * 3000 + "]" * 3000,  # nested too deep for a recursive parser
    "a: " + "{b: " * 300 + "1" + "}" * 300,
    "l0: &l0 [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)),
    "--- a\n--- b",
    "\ufeffrules: []",
    "rules:\n\t- name: x",
    "rules: [{name: x, name: y}]",
    "? [a, {b: c}]\n: 1",
    "rules: !!set {a, b}",
    "rules: !!omap [{a: 1}, {a: 2}]",
    "%YAML 1.1\n--- {}",
    "rules:\n- {name: r, select: {field: f}, above: 1, annotations: {s: '{{ range(10**9) }}'}}",
]


def mutate(
    data: Any, draw: st.DrawFn, values: st.SearchStrategy[Any], keys: st.SearchStrategy[str]
) -> None:
    """Replace, delete or add one entry somewhere in a document (a mapping or a list)."""
    target = data
    while True:
        children = list(target.values()) if isinstance(target, dict) else list(target)
        nested = [c for c in children if isinstance(c, dict | list) and c]
        if not nested or draw(st.integers(0, 2)) == 0:
            break
        target = draw(st.sampled_from(nested))
    if isinstance(target, list):
        index = draw(st.integers(0, len(target)))
        how = draw(st.integers(0, 2))
        if how == 0 and index < len(target):
            del target[index]
        elif how == 1 and index < len(target):
            target[index] = draw(values)
        else:
            target.insert(index, draw(values))
        return
    key = draw(st.one_of(st.sampled_from(sorted(target, key=str)), keys)) if target else draw(keys)
    if draw(st.integers(0, 3)) == 0:
        target.pop(key, None)
    else:
        target[key] = draw(values)


@st.composite
def rule_documents(draw: st.DrawFn) -> str:
    how = draw(st.integers(0, 5))
    if how == 0:
        return draw(st.text(max_size=200))
    if how == 1:
        return draw(st.sampled_from(YAML_TRICKS))
    if how == 2:
        alphabet = list("rules:-name{}[],&*!|>'\"#%@ \n\tabc01.")
        return draw(st.text(st.sampled_from(alphabet), max_size=200))
    # A shipped rule file with a few entries replaced, removed or added.
    data = yaml.safe_load(draw(st.sampled_from(SHIPPED_RULES)).read_text())
    for _ in range(draw(st.integers(1, 3))):
        mutate(data, draw, yaml_values, st.one_of(RULE_KEYS, st.text(max_size=6)))
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    if how == 4:
        text += "\n" + draw(st.sampled_from(YAML_TRICKS))
    return text


_BREAKS = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")  # what YAML counts as a line break


def check_rules_text(tmp: Path, text: str) -> str:
    path = tmp / "rules.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        ruleset = load_rule_files([path])
    except RulesError as exc:
        assert exc.problems
        lines = len(_BREAKS.findall(text)) + 2
        for problem in exc.problems:
            found = re.match(rf"{re.escape(str(path))}:(\d+):(\d+): .", problem)
            assert found, problem
            line = int(found.group(1))
            assert line in range(1, lines + 1), problem
        return "RulesError"
    assert all(rule.source.startswith(f"{path}:") for rule in ruleset)
    return f"RuleSet of {min(len(ruleset), 3)}{'+' if len(ruleset) > 3 else ''}"


@fuzz(500)
@given(rule_documents())
@example("rules: []\n? '\n\n  '\n: null\n")  # a key that is a line break: quoted, one line
@example("rules:\n- name: x\n  ? 'se lect'\n  : 1\n")
def test_any_rule_file_is_a_ruleset_or_problems_at_file_line_column(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        event(check_rules_text(Path(tmp), text))


@pytest.mark.parametrize("trick", YAML_TRICKS)
def test_yaml_tricks_in_rule_files(tmp_path: Path, trick: str) -> None:
    check_rules_text(tmp_path, trick)


# --- the config loader -----------------------------------------------------------------------

EXAMPLE_CONFIG = REPO / "config" / "ingestd.yaml"
CONFIG_KEYS = st.sampled_from(
    words(
        "url subscriptions template topic codec measurement field timezone device_pattern "
        "time_keys measurements tags max_payload_bytes max_future max_age batch_size listen "
        "level channels routes quiet_hours start end days rules rate burst key overrides backend "
        "dir max_bytes token_sha256 match kinds escalate_to escalate_after fallback title body "
        "outbox"
    )
)
# Values that mean something somewhere in the config: each is wrong somewhere else.
config_specials = st.sampled_from(
    [
        *words("America Europe Europe/Berlin Mars/Base posixrules zone.tab ../etc UTC"),
        *words("mqtt://h:99999 http://[::1 {device} (a+)+$ [ a:b 0.0.0.0:9108 [::]:1"),
        *words("farm/{site}/{device}/+ farm/+/{device}/# $share/g/# {device}/{device}"),
        *words("json://127.0.0.1/p unknown://x 64KiB 1EiB -1 {a: 2024-05-01T06:00 22:00"),
        *words("{{events {%if%} redis postgres value line homie tasmota * !x v1 5 3.1.1"),
        "x" * 300,
        "a" * 64,
    ]
)
config_values = st.recursive(
    st.one_of(yaml_scalars, config_specials, config_specials),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(CONFIG_KEYS, st.text(max_size=6)), inner, max_size=4)
    ),
    max_leaves=8,
)
CONFIG_BASE = {
    "mqtt": {
        "subscriptions": [
            {"template": "farm/{site}/{device}/{measurement}", "timezone": "UTC"},
            {"template": "tele/{device}/SENSOR", "codec": "tasmota", "timezone": "UTC"},
        ]
    },
    "quotas": {"rules": [{"name": "q", "topic": "farm/+/{device}/#", "rate": 5}]},
    "notify": {
        "channels": {"hook": "json://127.0.0.1:9/x"},
        "routes": [
            {
                "name": "ops",
                "channels": ["hook"],
                "timezone": "UTC",
                "quiet_hours": [{"start": "22:00", "end": "06:00"}],
            }
        ],
    },
}


# What a setting of that name is likely to be given, right or wrong.
LEAF_VALUES = {
    "timezone": st.sampled_from(
        [
            *words("UTC Europe/Berlin America America/ Europe posixrules zone.tab ../UTC"),
            *["x" * 300, "", "UTC\x00", "Etc/GMT+5", "tzdata.zi"],
        ]
    ),
    "template": st.lists(
        st.sampled_from(words("farm {site} {device} {measurement} {field} {node} + # $SYS {x")),
        min_size=1,
        max_size=5,
    ).map("/".join),
    "topic": st.lists(
        st.sampled_from(words("farm {device} + # $share g $SYS a")), min_size=1, max_size=5
    ).map("/".join),
    "device_pattern": st.sampled_from(words(".* ^$ [ (a+)+$ (?P<x> \\ (?s).+ \\d{0,99999}")),
    "url": st.sampled_from(
        words("mqtt://h:1 mqtt://[::1]:1883 http://h:0 http://h:65536 redis://")
    ),
    "listen": st.sampled_from(words("127.0.0.1:9108 0.0.0.0:1 [::1]:9108 :9108 h:x ::1")),
    "start": st.sampled_from(words("22:00 24:00 2026-05-01T06:00 2026-02-30T06:00 7")),
    "end": st.sampled_from(words("06:00 22:00 2026-05-01T05:00 2026-05-01T06:00+01:00")),
    "title": st.sampled_from(["{{ events", "{{ 1/0 }}", "{% for %}", "{{ count }}", "{{ x.y }}"]),
    "codec": st.sampled_from(words("json value line tasmota homie xml")),
}
CONFIG_LEAVES: list[tuple[str | int, ...]] = [
    *(
        ("mqtt", "subscriptions", i, key)
        for i in (0, 1)
        for key in words(
            "template topic codec measurement field string_fields time_keys timezone "
            "device_pattern measurements tags"
        )
    ),
    *(("mqtt", key) for key in words("url protocol client_id share_group receive_maximum")),
    *(("guard", key) for key in words("max_payload_bytes max_future max_age sample_bytes")),
    *(("influx", key) for key in words("url api batch_size flush_interval timeout")),
    *(("quotas", "rules", 0, key) for key in words("name topic key rate burst timezone")),
    ("quotas", "backend"),
    *(
        ("notify", "routes", 0, key)
        for key in words(
            "name channels kinds timezone escalate_after escalate_to fallback title body match"
        )
    ),
    *(("notify", "routes", 0, "quiet_hours", 0, key) for key in words("start end days")),
    *(("notify", key) for key in words("channels workers retry_min title body outbox")),
    *(("notify", "channels", key) for key in words("hook other")),
    *(("http", key) for key in words("listen token_sha256")),
    *(("spool", key) for key in words("dir max_bytes")),
    ("logging", "level"),
    ("rules", "dir"),
]


@st.composite
def config_documents(draw: st.DrawFn) -> str:
    how = draw(st.integers(0, 5))
    if how == 0:
        return draw(st.text(max_size=200))
    if how == 1:
        return draw(st.sampled_from(YAML_TRICKS)).replace("rules:", "mqtt:")
    if how == 2:
        alphabet = list("mqtt:url-{}[],&*!|>'\"#%@ \n\tabc01.")
        return draw(st.text(st.sampled_from(alphabet), max_size=200))
    base = yaml.safe_load(EXAMPLE_CONFIG.read_text()) if how == 3 else {}
    data = {**base, **json.loads(json.dumps(CONFIG_BASE))}
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):  # a setting that exists, to a value that may not fit
            *parents, last = draw(st.sampled_from(CONFIG_LEAVES))
            target: Any = data
            for part in parents:
                if isinstance(target, dict) and isinstance(part, str):
                    target = target.setdefault(part, {})
                elif isinstance(target, list) and isinstance(part, int) and part < len(target):
                    target = target[part]
                else:
                    break  # an earlier change removed the way there
            if isinstance(target, dict):
                target[last] = draw(
                    st.one_of(LEAF_VALUES.get(str(last), config_values), config_values)
                )
        else:
            mutate(data, draw, config_values, st.one_of(CONFIG_KEYS, st.text(max_size=6)))
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    if how == 4:
        text += "\n" + draw(st.sampled_from(YAML_TRICKS)).replace("rules:", "zzz:")
    return text


def check_config_text(tmp: Path, text: str) -> str:
    """What ``ingestd check`` does: load, build the decoder and the quota rules."""
    path = tmp / "ingestd.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        settings = load_settings(path)
        Decoder(settings.mqtt.subscriptions, settings.guard)
        QuotaRules(settings.quotas)
    except ConfigError as exc:
        assert str(path) in str(exc) or "subscription" in str(exc) or "quota" in str(exc), exc
        counted = re.match(r"invalid configuration \((\d+) problems?\):\n", str(exc))
        if counted:  # one line per problem, whatever the keys are called
            assert len(str(exc).split("\n")) == int(counted.group(1)) + 1, exc
        return "ConfigError"
    assert isinstance(settings, Settings)
    return "Settings"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


@fuzz(400)
@given(config_documents())
@example("mqtt: {}\n? '\n\n  '\n: null\n")  # a key that is a line break: quoted, one line
def test_any_config_file_is_settings_or_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        event(check_config_text(Path(tmp), text))


@pytest.mark.parametrize("trick", YAML_TRICKS)
def test_yaml_tricks_in_config_files(tmp_path: Path, trick: str) -> None:
    check_config_text(tmp_path, trick.replace("rules:", "mqtt:"))


LAUGHS = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("ok: 1\nrules: 2024-02-30\n", 2, "cannot read '2024-02-30' as timestamp"),
        ("rules:\n  a: !!int abc\n", 2, "cannot read 'abc' as int"),
        ("rules: !!float x\n", 1, "cannot read 'x' as float"),
        ("rules: [1]\n\x1f\n", 2, "unacceptable character #x001f"),
        ("a: " + "[" * 3000 + "]" * 3000, 1, "nested too deeply"),
        ("&a [*a]", 1, "nested too deeply"),
        (LAUGHS, 1, "expands to"),
    ],
)
def test_yaml_that_escaped_the_loaders_is_a_problem_at_its_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    """Found by the properties above: PyYAML lets ValueError out of !!int, !!float and dates
    that do not exist, ReaderError out of its constructor, and RecursionError out of deep
    nesting; nested aliases (billion laughs) ran the machine out of memory. Each escaped
    both loaders (a traceback from ``ingestd check`` or a rule reload)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(text)
    with pytest.raises(RulesError) as caught:
        load_rule_files([rules])
    (problem,) = caught.value.problems
    assert problem.startswith(f"{rules}:{line}:") and message in problem, problem
    config = tmp_path / "ingestd.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    where = f"{config}:{line}" if "nested" not in message else f"{config}: "
    assert str(error.value).startswith(where), error.value
    assert message.split(" '", maxsplit=1)[0] in str(error.value), error.value


def test_a_list_as_a_key_is_refused_where_it_is() -> None:
    """A key that is a list or a mapping was turned into text, deep-constructed: through an
    alias that is the billion laughs again, in the key."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text("a: &a [x]\nrules:\n  ? *a\n  : 1\n")
        with pytest.raises(RulesError) as caught:
            load_rule_files([path])
    assert any("a key must be a plain value" in p for p in caught.value.problems)
