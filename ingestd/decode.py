"""Topic + payload -> readings, or a :class:`Reject` naming why not.

A :class:`Decoder` is built once from the subscriptions and the guard settings (everything
is compiled then; a subscription that cannot work raises :class:`ConfigError`). Its
:meth:`Decoder.decode` is the hot path: it returns the readings of one MQTT message, an
empty list for a message that carries no reading by design (Homie ``$`` attributes and
``/set`` commands, an empty retained Homie value), or raises ``Reject(reason, detail)``
with ``reason`` one of :data:`REASONS`.

Topic mapping: the first subscription whose filter matches the topic and whose template
has as many levels applies. Template ``{device}`` is the device (it must fully match
``device_pattern``), ``{measurement}`` and ``{field}`` name the measurement and the field,
every other ``{name}`` becomes a tag (dropped when the level is empty), and literal levels
must match. Identity comes from the topic only: a ``device`` in a payload is ignored, and
a topic tag wins over a payload tag of the same key.

Codecs, chosen per subscription:

``json``     one object; nested objects are flattened with ``_``; numbers become floats
             (a field never flips between int and float), bools stay bools; strings are
             kept only for ``string_fields``, nulls and arrays are skipped; the first
             present ``time_keys`` key is the timestamp and no time key is a field.
``value``    one plain value: a number, ``true``/``false``/``on``/``off`` (any case).
``line``     InfluxDB line protocol, one point per line (blank and ``#`` lines skipped).
``tasmota``  a Tasmota ``SENSOR`` object: one reading per sensor object, tag ``sensor``.
``homie``    Homie v4/v5 property topics with plain values (see :class:`Decoder`).

Every field listed in ``string_fields`` is always a string (a number sent there is kept in
its JSON spelling), so no field's type ever changes between messages.

Names (measurement, tag keys and values, field keys) must be non-empty, at most
:data:`MAX_NAME_BYTES` long (``name_too_long``) and free of ASCII control characters, DEL,
lone surrogates and backslashes that TSDBs read differently (before a backslash, comma,
equals sign, space or quote, or at the end); a field name holds no double quote; string
values must be free of ``\\n`` and ``\\r``: line protocol cannot carry them (see
:mod:`ingestd.lineproto`), so they are refused here (``bad_characters``) rather than mangled
later. The device is never empty (``device_invalid``), whatever ``device_pattern`` allows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from ingestd.config import TEMPLATE_VAR, GuardSection, Subscription
from ingestd.errors import ConfigError
from ingestd.lineproto import AMBIGUOUS_BACKSLASH, parse_line
from ingestd.model import FieldValue, Reading, Reject

__all__ = [
    "BAD_CHARACTERS",
    "BAD_TIMESTAMP",
    "DEVICE_INVALID",
    "MALFORMED",
    "MAX_NAME_BYTES",
    "MEASUREMENT_NOT_ALLOWED",
    "NAME_TOO_LONG",
    "NOT_FINITE",
    "NO_FIELDS",
    "REASONS",
    "TAG_NOT_ALLOWED",
    "TIME_FUTURE",
    "TIME_TOO_OLD",
    "TOO_LARGE",
    "TOO_MANY_SERIES",
    "TOPIC_UNMATCHED",
    "Decoder",
]

TOO_LARGE = "too_large"
"""The payload exceeds ``guard.max_payload_bytes``; it was not parsed."""
TOPIC_UNMATCHED = "topic_unmatched"
"""No subscription's filter and template match the topic."""
DEVICE_INVALID = "device_invalid"
"""The ``{device}`` level does not match the subscription's ``device_pattern``."""
MALFORMED = "malformed"
"""The payload is not what the codec reads (bad JSON, bad line protocol, not a value)."""
NOT_FINITE = "not_finite"
"""A number is NaN or infinite (or overflows a double)."""
BAD_CHARACTERS = "bad_characters"
"""A name is empty, holds a control character or an ambiguous backslash; a string value
holds a newline."""
NO_FIELDS = "no_fields"
"""Decoding left no field to write."""
BAD_TIMESTAMP = "bad_timestamp"
"""The device's timestamp cannot be read."""
TIME_FUTURE = "time_future"
"""The timestamp is further ahead of receipt than ``guard.max_future``."""
TIME_TOO_OLD = "time_too_old"
"""The timestamp is further behind receipt than ``guard.max_age``."""
MEASUREMENT_NOT_ALLOWED = "measurement_not_allowed"
"""``line``: the measurement is not in the subscription's ``measurements``."""
TAG_NOT_ALLOWED = "tag_not_allowed"
"""``line``: a tag key is not in the subscription's ``tags``, or is ``__name__`` (which
VictoriaMetrics drops)."""
NAME_TOO_LONG = "name_too_long"
"""A measurement, tag key, tag value or field key is longer than :data:`MAX_NAME_BYTES`."""

TOO_MANY_SERIES = "too_many_series"
"""The device would pass ``guard.max_series_per_device`` or ``max_tag_sets_per_device``
(given by :class:`ingestd.series.SeriesGuard`, after decode and the registry)."""

MAX_NAME_BYTES = 256
"""The longest name written (UTF-8 bytes): VictoriaMetrics silently truncates label names
past 256 bytes and label values past 16 KiB, which would store a point under another name."""

REASONS = (
    TOO_LARGE,
    TOPIC_UNMATCHED,
    DEVICE_INVALID,
    MALFORMED,
    NOT_FINITE,
    BAD_CHARACTERS,
    NO_FIELDS,
    BAD_TIMESTAMP,
    TIME_FUTURE,
    TIME_TOO_OLD,
    MEASUREMENT_NOT_ALLOWED,
    TAG_NOT_ALLOWED,
    NAME_TOO_LONG,
    TOO_MANY_SERIES,
)
"""Every reason the guard gives (:meth:`Decoder.decode`, and the series cap after it): the
label set of the rejection metric, with the registry's and the drainer's."""

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# In a whole topic a level ends at "/": a backslash there ends a name too.
_TOPIC_BACKSLASH = re.compile(r'\\(?=[\\,= "/]|\Z)')
_NEWLINE = re.compile(r"[\r\n]")
_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NOT_FINITE = re.compile(r"[-+]?(?:nan|inf|infinity)", re.IGNORECASE)
_BOOL_WORDS = {"true": True, "on": True, "false": False, "off": False}
_ISO = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2})"
    r"(?::([0-9]{2})(?:[.,]([0-9]+))?)?"
    r"(?:([Zz])|([+-])([0-9]{2})(?::?([0-9]{2}))?)?"
)
_MAX_DEPTH = 16
_KNOWN_DEVICES_MAX = 65_536
_MAX_NAME_CHARS = MAX_NAME_BYTES // 4  # a name this short is short enough in any encoding
_NS = 1_000_000_000
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_DECIMAL_LIMIT = Decimal("1e19")
_MISSING: Any = object()
_UTC = ZoneInfo("UTC")


def _clip(value: str | bytes, limit: int = 80) -> str:
    """A short, printable excerpt of input for a detail string."""
    shown = repr(value[:limit])
    # repr spells an unprintable character as up to 10 ("\U00018cd6"): clip the spelling too
    if len(value) > limit or len(shown) > limit + 3:
        return shown[: limit + 3] + "..."
    return shown


# --- timestamps -----------------------------------------------------------------------------


def _epoch_ns(number: int | Decimal) -> int:
    """Epoch seconds, ms, µs or ns, told apart by magnitude, as integer nanoseconds."""
    size = int(number.copy_abs()) if isinstance(number, Decimal) else abs(number)
    if size < 100_000_000_000:  # < 1e11: seconds (until the year 5138)
        scale = _NS
    elif size < 100_000_000_000_000:  # < 1e14: milliseconds
        scale = 1_000_000
    elif size < 100_000_000_000_000_000:  # < 1e17: microseconds
        scale = 1_000
    else:
        scale = 1
    scaled = number * scale
    ns = scaled if isinstance(scaled, int) else int(scaled.to_integral_value())
    if not _INT64_MIN <= ns <= _INT64_MAX:
        raise Reject(BAD_TIMESTAMP, f"timestamp {number} is out of range")
    return ns


def _decimal_epoch_ns(text: str) -> int:
    try:
        number = Decimal(text)
        # copy_abs needs no context: abs() would overflow on exponents like 1e9999999.
        if not number.is_finite() or number.copy_abs() >= _DECIMAL_LIMIT:
            raise Reject(BAD_TIMESTAMP, f"timestamp {_clip(text, 40)} is out of range")
        return _epoch_ns(number)
    except ArithmeticError:  # InvalidOperation, Overflow, ...: all mean "not a timestamp"
        raise Reject(BAD_TIMESTAMP, f"not a timestamp: {_clip(text, 40)}") from None


def _iso_ns(text: str, zone: ZoneInfo) -> int:
    match = _ISO.fullmatch(text)
    if match is None:
        raise Reject(BAD_TIMESTAMP, f"not an epoch number or ISO 8601 time: {_clip(text, 40)}")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0))
    except ValueError as exc:
        raise Reject(BAD_TIMESTAMP, f"{exc}: {_clip(text, 40)}") from None
    offset = 0
    if sign:
        hours, minutes = int(off_h), int(off_m or 0)
        if hours > 23 or minutes > 59:
            raise Reject(BAD_TIMESTAMP, f"bad UTC offset: {_clip(text, 40)}")
        offset = (hours * 3600 + minutes * 60) * (1 if sign == "+" else -1)
    # Without an offset, local time in the subscription's zone (fold=0 in a DST overlap).
    local = zone if not (zulu or sign) else _UTC
    seconds = int(moment.replace(tzinfo=local).timestamp()) - offset
    ns = seconds * _NS + (int(fraction[:9].ljust(9, "0")) if fraction else 0)
    if not _INT64_MIN <= ns <= _INT64_MAX:  # beyond 1677-09-21 .. 2262-04-11
        raise Reject(BAD_TIMESTAMP, f"out of range: {_clip(text, 40)}")
    return ns


def _timestamp_ns(value: object, zone: ZoneInfo) -> int:
    """A device timestamp (epoch number or numeric string, or ISO 8601) in nanoseconds."""
    if isinstance(value, bool):
        raise Reject(BAD_TIMESTAMP, f"a boolean is not a timestamp: {value!r}")
    if isinstance(value, int):
        return _epoch_ns(value)
    if isinstance(value, float):
        # repr is the shortest text that reads back as this float: what the device sent,
        # converted exactly (1714564800.123 s -> ...123000000 ns, not ...122999906 ns).
        return _decimal_epoch_ns(repr(value))
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER.fullmatch(text):
            return _decimal_epoch_ns(text)
        return _iso_ns(text, zone)
    raise Reject(BAD_TIMESTAMP, f"a {type(value).__name__} is not a timestamp")


# --- values ---------------------------------------------------------------------------------


def _as_string(value: object) -> str:
    """A scalar of a ``string_fields`` field in its JSON spelling."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _check_names(names: str, what: str) -> None:
    """Refuse control characters, DEL and lone surrogates in the concatenated names."""
    bad = _BAD_NAME.search(names)
    if bad is not None:
        raise Reject(BAD_CHARACTERS, f"{what} contains {bad.group()!r}")


def _check_lengths(names: Collection[str], what: str) -> None:
    """Refuse a name longer than MAX_NAME_BYTES (counting bytes only for long ones)."""
    if max(map(len, names), default=0) <= _MAX_NAME_CHARS:  # the usual case, at C speed
        return
    for name in names:
        if (
            len(name) > _MAX_NAME_CHARS
            and len(name.encode(errors="surrogatepass")) > MAX_NAME_BYTES
        ):
            raise Reject(
                NAME_TOO_LONG, f"{what} {_clip(name, 40)} is longer than {MAX_NAME_BYTES} bytes"
            )


def _check_quotes(field_names: Iterable[str]) -> None:
    """Refuse a double quote in a field name: VictoriaMetrics takes it for a string value."""
    for name in field_names:
        if '"' in name:
            raise Reject(BAD_CHARACTERS, f"field name {_clip(name, 40)} contains a double quote")


def _check_backslashes(names: Iterable[str], what: str) -> None:
    """Refuse a name with a backslash that InfluxDB 1.x and 2.x read differently."""
    for name in names:
        if "\\" in name and AMBIGUOUS_BACKSLASH.search(name):
            raise Reject(
                BAD_CHARACTERS,
                f"{what} {_clip(name, 40)} has a backslash before a separator, a quote, "
                "a backslash or its end",
            )


# --- topic routing --------------------------------------------------------------------------


def _filter_levels(subscription: Subscription) -> list[str]:
    levels = subscription.filter.split("/")
    if levels[0] == "$share" and len(levels) > 2:  # a shared subscription: $share/group/...
        levels = levels[2:]
    return levels


def _filter_matches(filter_levels: Sequence[str], levels: Sequence[str]) -> bool:
    """MQTT matching: ``+`` one level, ``#`` any rest; wildcards never match a ``$`` level 0."""
    if levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, want in enumerate(filter_levels):
        if want == "#":
            return True
        if i >= len(levels) or (want != "+" and want != levels[i]):
            return False
    return len(filter_levels) == len(levels)


class _Route:
    """One subscription, compiled: where each template variable sits and how to decode."""

    def __init__(self, sub: Subscription, guard: GuardSection) -> None:
        where = f"subscription {sub.template!r}"
        template = sub.template.split("/")
        self.size = len(template)
        variables: dict[str, int] = {}
        literals: dict[int, str] = {}
        for i, level in enumerate(template):
            match = TEMPLATE_VAR.match(level)
            if match:
                variables[match.group(1)] = i
            else:
                literals[i] = level

        # The filter decides what the broker sends; the template decides what is accepted.
        self.filter_levels = _filter_levels(sub)
        for i, want in enumerate(self.filter_levels):
            if want == "#":
                break
            if i >= self.size:
                raise ConfigError(f"{where}: topic {sub.filter!r} has more levels than it")
            if want != "+":
                if literals.get(i, want) != want:
                    raise ConfigError(f"{where}: topic {sub.filter!r} never matches it")
                literals[i] = want
        else:
            if len(self.filter_levels) != self.size:
                raise ConfigError(f"{where}: topic {sub.filter!r} has fewer levels than it")
        self.checks = tuple(sorted(literals.items()))
        self.root: list[str] = []
        for level in template:
            if TEMPLATE_VAR.match(level):
                break
            self.root.append(level)
        self.no_dollar = self.filter_levels[0] in ("+", "#")

        codec = sub.codec
        self.device_at = variables.pop("device")
        self.measurement_at = variables.pop("measurement", None)
        self.field_at = variables.pop("field", None)
        self.measurement = sub.measurement
        if codec == "homie":
            # Homie: the node is the measurement unless the template has {measurement} or
            # the subscription names one (then the node is an ordinary tag `node`); the
            # property is the field unless the template has {field}.
            if self.measurement_at is None and self.measurement is None:
                self.measurement_at = variables.pop("node", None)
            if self.field_at is None:
                self.field_at = variables.pop("property", None)
            if self.measurement_at is None and self.measurement is None:
                raise ConfigError(f"{where}: homie needs {{node}}, {{measurement}} or measurement")
            if self.field_at is None:
                raise ConfigError(f"{where}: homie needs a {{property}} or {{field}} level")
        elif codec == "line":
            if self.measurement_at is not None or self.measurement is not None:
                raise ConfigError(
                    f"{where}: codec line takes the measurement from each line;"
                    " remove {measurement}/measurement (restrict with measurements)"
                )
        elif codec == "tasmota":
            if self.measurement_at is None and self.measurement is None:
                self.measurement = "tasmota"
            if "sensor" in variables:
                raise ConfigError(f"{where}: codec tasmota sets the tag sensor itself")
        elif self.measurement_at is None and self.measurement is None:
            raise ConfigError(f"{where}: codec {codec} needs {{measurement}} or measurement")
        if self.field_at is not None and codec not in ("value", "homie"):
            raise ConfigError(f"{where}: {{field}} is meaningful for codecs value and homie only")
        if self.measurement is not None and (
            not self.measurement
            or self.measurement[0] == "#"
            or _BAD_NAME.search(self.measurement)
            or AMBIGUOUS_BACKSLASH.search(self.measurement)
            or len(self.measurement.encode(errors="surrogatepass")) > MAX_NAME_BYTES
        ):
            raise ConfigError(f"{where}: measurement {self.measurement!r} cannot be written")
        if "__name__" in variables:
            raise ConfigError(f"{where}: {{__name__}} is VictoriaMetrics' metric name, not a tag")
        self.tag_at = tuple(variables.items())
        self.field = sub.field

        # fullmatch, not match: with match, "$" also matches before a trailing newline.
        self.device_pattern = re.compile(sub.device_pattern)
        # Devices that passed the pattern: a set lookup is cheaper than a regex, and a fleet
        # has a bounded number of devices (cleared when full, so memory stays bounded).
        self.known_devices: set[str] = set()
        try:
            self.zone = ZoneInfo(sub.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: 'America'
            raise ConfigError(f"{where}: unknown timezone {sub.timezone!r}: {exc}") from None
        self.string_fields = frozenset(sub.string_fields)
        self.time_keys = tuple(sub.time_keys)
        self.measurements = None if sub.measurements is None else frozenset(sub.measurements)
        self.tags = None if sub.tags is None else frozenset(sub.tags)
        self.max_future_ns = int(guard.max_future * _NS)
        self.max_age_ns = int(guard.max_age * _NS)
        self.is_homie = codec == "homie"
        # A Homie v4 template (homie/{device}/...) also matches v5 topics one level short:
        # homie/5/X/prop, which device X may publish, would be device "5"'s reading.
        self.v5_clash = (
            self.is_homie and self.device_at > 0 and template[self.device_at - 1] == "homie"
        )
        codecs: dict[str, Callable[[list[str], bytes, int], list[Reading]]] = {
            "json": self._json,
            "value": self._value,
            "line": self._line,
            "tasmota": self._tasmota,
            "homie": self._homie,
        }
        self.decode = codecs[codec]

    def ignores(self, levels: list[str]) -> bool:
        """Homie topics that carry no reading: ``$`` attributes and ``/set`` commands.

        They are recognised under the template's root (its leading literal levels, such as
        ``homie`` or ``homie/5``), or by the filter when the template starts with a variable.
        """
        root = self.root
        if root:
            if levels[: len(root)] != root:
                return False
        elif not _filter_matches(self.filter_levels, levels):
            return False
        if any(level[:1] == "$" for level in levels[len(root) :]):
            return True
        if len(levels) != self.size + 1 or levels[-1] != "set":
            return False
        return all(levels[i] == literal for i, literal in self.checks)

    # --- what every codec shares ------------------------------------------------------------

    def _topic(self, levels: list[str]) -> tuple[str, dict[str, str]]:
        """Device and topic tags (the caller has checked the topic's characters)."""
        device = levels[self.device_at]
        known = self.known_devices
        if device not in known:
            if not device:  # whatever the pattern allows: a point needs its device tag
                raise Reject(DEVICE_INVALID, "empty device level")
            if self.device_pattern.fullmatch(device) is None:
                raise Reject(
                    DEVICE_INVALID, f"device {_clip(device, 64)} does not match the pattern"
                )
            if len(known) >= _KNOWN_DEVICES_MAX:
                known.clear()
            known.add(device)
        return device, {name: levels[i] for name, i in self.tag_at if levels[i]}

    def _measurement(self, levels: list[str]) -> str:
        if self.measurement_at is None:
            return self.measurement  # type: ignore[return-value] # checked in __init__
        measurement = levels[self.measurement_at]
        if not measurement or measurement[0] == "#":
            raise Reject(
                BAD_CHARACTERS, f"measurement level {measurement[:40]!r} cannot be written"
            )
        return measurement

    def _time(self, value: object, received_ns: int) -> int:
        """The device's timestamp, refused when too far from receipt."""
        if value is _MISSING:
            return received_ns
        time_ns = _timestamp_ns(value, self.zone)
        return self._guard_time(time_ns, received_ns)

    def _guard_time(self, time_ns: int, received_ns: int) -> int:
        if time_ns > received_ns + self.max_future_ns:
            ahead = (time_ns - received_ns) / _NS
            raise Reject(TIME_FUTURE, f"timestamp {time_ns} is {ahead:.0f} s ahead of receipt")
        if time_ns < received_ns - self.max_age_ns:
            behind = (received_ns - time_ns) / _NS
            raise Reject(TIME_TOO_OLD, f"timestamp {time_ns} is {behind:.0f} s before receipt")
        return time_ns

    def _load_object(self, payload: bytes) -> dict[str, Any]:
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            message = str(exc)
            # orjson refuses numbers that overflow a double (1e400) as "infinity".
            reason = NOT_FINITE if "infinity" in message else MALFORMED
            raise Reject(reason, f"not valid JSON: {message[:100]}") from None
        if type(document) is not dict:
            raise Reject(MALFORMED, f"expected a JSON object, got {type(document).__name__}")
        return document

    def _flatten(self, obj: dict[str, Any], prefix: str, depth: int) -> dict[str, FieldValue]:
        """The fields of a JSON object: numbers as floats, nested objects joined with ``_``."""
        fields: dict[str, FieldValue] = {}
        strings = self.string_fields
        count = 0
        for key, value in obj.items():
            if prefix:
                key = prefix + key  # noqa: PLW2901 - the flattened name replaces the key
            kind = type(value)
            if strings and key in strings and kind is not dict:
                if value is None or kind is list:
                    continue
                fields[key] = value if kind is str else _as_string(value)
            elif kind is float or kind is bool:
                fields[key] = value
            elif kind is int:
                fields[key] = float(value)
            elif kind is dict:
                if depth >= _MAX_DEPTH:
                    raise Reject(MALFORMED, f"objects nested deeper than {_MAX_DEPTH} levels")
                nested = self._flatten(value, key + "_", depth + 1)
                fields.update(nested)
                count += len(nested) - 1
            else:  # str not in string_fields, None, list
                continue
            count += 1
        if count != len(fields):
            raise Reject(MALFORMED, "two keys flatten to the same field name")
        return fields

    def _check_fields(self, fields: dict[str, FieldValue], payload: bytes) -> None:
        if "" in fields:
            raise Reject(BAD_CHARACTERS, "empty field name")
        if len(payload) > MAX_NAME_BYTES:  # a (flattened) name is never longer than its JSON
            _check_lengths(fields, "field name")
        # A JSON string holds a control character or a surrogate only as a \-escape, and DEL
        # only raw: without either byte no name or string value can hold a bad character.
        if b"\\" in payload or b"\x7f" in payload:
            _check_names("".join(fields), "a field name")
            _check_backslashes(fields, "field name")
            _check_quotes(fields)
            for key, value in fields.items():
                if type(value) is str and _NEWLINE.search(value):
                    raise Reject(BAD_CHARACTERS, f"string field {key[:40]!r} contains a newline")

    # --- codecs -----------------------------------------------------------------------------

    def _json(self, levels: list[str], payload: bytes, received_ns: int) -> list[Reading]:
        device, tags = self._topic(levels)
        measurement = self._measurement(levels)
        obj = self._load_object(payload)
        stamp = _MISSING
        for key in self.time_keys:
            value = obj.pop(key, None)
            if value is not None and stamp is _MISSING:
                stamp = value
        fields = self._flatten(obj, "", 0)
        if not fields:
            raise Reject(NO_FIELDS, f"no numeric, boolean or string field in {_clip(payload)}")
        self._check_fields(fields, payload)
        time_ns = self._time(stamp, received_ns)
        return [Reading(measurement, device, tags, fields, time_ns, stamp is not _MISSING)]

    def _plain(self, payload: bytes, field: str) -> FieldValue:
        """One plain value: number, true/false/on/off (any case), or a string field's text."""
        try:
            text = payload.decode().strip()
        except UnicodeDecodeError:
            raise Reject(MALFORMED, f"not UTF-8: {_clip(payload, 40)}") from None
        if field in self.string_fields:
            if _NEWLINE.search(text):
                raise Reject(BAD_CHARACTERS, f"string field {field[:40]!r} contains a newline")
            return text
        if _NUMBER.fullmatch(text):
            number = float(text)
            if not math.isfinite(number):
                raise Reject(NOT_FINITE, f"{_clip(text, 40)} overflows a double")
            return number
        word = _BOOL_WORDS.get(text.lower())
        if word is not None:
            return word
        if _NOT_FINITE.fullmatch(text):
            raise Reject(NOT_FINITE, f"value {_clip(text, 40)} is not finite")
        raise Reject(MALFORMED, f"not a number or boolean: {_clip(text, 40)}")

    def _value(self, levels: list[str], payload: bytes, received_ns: int) -> list[Reading]:
        device, tags = self._topic(levels)
        measurement = self._measurement(levels)
        field = self.field if self.field_at is None else levels[self.field_at]
        if not field:
            raise Reject(BAD_CHARACTERS, "empty field level")
        if '"' in field:
            _check_quotes((field,))
        value = self._plain(payload, field)
        return [Reading(measurement, device, tags, {field: value}, received_ns)]

    def _homie(self, levels: list[str], payload: bytes, received_ns: int) -> list[Reading]:
        if self.v5_clash and levels[self.device_at] == "5":
            # Refused, not skipped: a device publishing there is worth seeing in the dead
            # letters, and the next level says who may have.
            raise Reject(
                DEVICE_INVALID,
                f"device '5' is Homie v5's version level: {_clip('/'.join(levels), 60)} is"
                " a v5 topic (homie/5/<device>/<node>/<property>) one level short",
            )
        if not payload:  # an empty retained message deletes a property: nothing to record
            return []
        return self._value(levels, payload, received_ns)

    def _line(self, levels: list[str], payload: bytes, received_ns: int) -> list[Reading]:
        device, topic_tags = self._topic(levels)
        readings: list[Reading] = []
        untimed = 0
        for number, raw in enumerate(payload.split(b"\n"), 1):
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line.strip() or line.startswith(b"#"):
                continue
            if b"\r" in line:
                raise Reject(BAD_CHARACTERS, f"line {number}: carriage return inside a line")
            try:
                measurement, tags, parsed, stamp = parse_line(line)
            except ValueError as exc:
                raise Reject(MALFORMED, f"line {number}: {exc}") from None
            if self.measurements is not None and measurement not in self.measurements:
                raise Reject(
                    MEASUREMENT_NOT_ALLOWED,
                    f"line {number}: measurement {_clip(measurement, 40)} is not allowed",
                )
            # Identity comes from the topic, never from the payload: a device tag in the
            # line is dropped (not refused), and topic tags win over payload tags.
            tags.pop("device", None)
            if "__name__" in tags:  # VictoriaMetrics would drop it and keep the point
                raise Reject(TAG_NOT_ALLOWED, f"line {number}: tag '__name__' is reserved")
            if self.tags is not None:
                for key in tags:
                    if key not in self.tags:
                        raise Reject(
                            TAG_NOT_ALLOWED, f"line {number}: tag {_clip(key, 40)} is not allowed"
                        )
            _check_names("".join((measurement, *tags, *tags.values(), *parsed)), f"line {number}")
            if b"\\" in line:
                _check_backslashes((measurement, *tags, *tags.values(), *parsed), f"line {number}:")
            if len(line) > _MAX_NAME_CHARS:
                _check_lengths((measurement, *tags, *tags.values(), *parsed), f"line {number}:")
            if b'"' in line:
                _check_quotes(parsed)
            tags.update(topic_tags)
            # Integers become floats so that a field never changes type between messages.
            fields: dict[str, FieldValue] = {
                key: float(value) if type(value) is int else value for key, value in parsed.items()
            }
            if stamp is None:
                # Receipt time, one nanosecond apart per line, so that two untimed lines
                # of one series in one message do not overwrite each other.
                time_ns = received_ns + untimed
                untimed += 1
            else:
                time_ns = self._guard_time(stamp, received_ns)
            readings.append(Reading(measurement, device, tags, fields, time_ns, stamp is not None))
        if not readings:
            raise Reject(NO_FIELDS, "no line-protocol line in the payload")
        return readings

    def _tasmota(self, levels: list[str], payload: bytes, received_ns: int) -> list[Reading]:
        device, tags = self._topic(levels)
        measurement = self._measurement(levels)
        obj = self._load_object(payload)
        stamp = obj.get("Time")
        time_ns = self._time(_MISSING if stamp is None else stamp, received_ns)
        device_time = stamp is not None
        readings: list[Reading] = []
        for sensor, values in obj.items():
            if type(values) is not dict:  # Time, TempUnit, Switch1: "ON", ...
                continue
            fields = self._flatten(values, "", 1)
            if not fields:
                continue  # a sensor object without a number (only an Id, say)
            if not sensor:
                raise Reject(BAD_CHARACTERS, "empty sensor name")
            self._check_fields(fields, payload)
            _check_names(sensor, "sensor name")
            _check_backslashes((sensor,), "sensor name")
            _check_lengths((sensor,), "sensor name")
            readings.append(
                Reading(
                    measurement, device, {**tags, "sensor": sensor}, fields, time_ns, device_time
                )
            )
        if not readings:
            raise Reject(NO_FIELDS, f"no sensor object with a number in {_clip(payload)}")
        return readings


class Decoder:
    """Turns ``(topic, payload)`` into readings for a set of subscriptions.

    Raises ConfigError when a subscription cannot work: a codec without a measurement, a
    ``topic`` filter that never matches its template, an unknown timezone, ...

    Homie (v4 ``homie/{device}/{node}/{property}``, v5 ``homie/5/{device}/{node}/{property}``):
    the payload is a plain value as for ``value``; the measurement is ``{measurement}``,
    else the subscription's ``measurement`` (the node then stays a tag ``node``), else the
    node; the field is ``{field}``, else the property. Under a homie template's root (its
    leading literal levels, ``homie`` or ``homie/5``) a topic with a level starting with
    ``$`` (device and node attributes, ``$target``, ``$broadcast``) or a property topic
    ending in ``/set`` yields ``[]``, as does an empty payload (a retained value deleted).
    Where the device level follows a literal ``homie`` (v4), device ``5`` is refused
    (``device_invalid``): ``homie/5/X/prop`` is a v5 topic one level short, which device X
    may publish, not a reading of a device named 5.

    Tasmota: the timestamp is the payload's ``Time`` (local time, ``timezone``), and the
    measurement is ``{measurement}``, else ``measurement``, else ``tasmota``.
    """

    def __init__(self, subscriptions: Sequence[Subscription], guard: GuardSection) -> None:
        self._routes = tuple(_Route(sub, guard) for sub in subscriptions)
        self._max_payload = int(guard.max_payload_bytes)

    def decode(self, topic: str, payload: bytes, received_ns: int) -> list[Reading]:
        """The readings of one message; ``[]`` when it carries none by design.

        Raises Reject with a reason from REASONS. ``received_ns`` is the time of first
        receipt, unique per message: it stamps readings that bring no timestamp (their
        ``device_time`` is False; True where the time is the device's own).
        """
        if len(payload) > self._max_payload:
            raise Reject(TOO_LARGE, f"{len(payload)} bytes > {self._max_payload}")
        levels = topic.split("/")
        size = len(levels)
        for route in self._routes:
            if route.is_homie and route.ignores(levels):
                return []
            if route.size != size or (route.no_dollar and topic[:1] == "$"):
                continue
            for i, literal in route.checks:
                if levels[i] != literal:
                    break
            else:
                _check_names(topic, "topic")
                if len(topic) > _MAX_NAME_CHARS:
                    _check_lengths(levels, "topic level")
                if "\\" in topic and _TOPIC_BACKSLASH.search(topic):
                    raise Reject(
                        BAD_CHARACTERS,
                        f"a level of topic {_clip(topic, 60)} has a backslash before a "
                        "separator, a quote, a backslash or its end",
                    )
                return route.decode(levels, payload, received_ns)
        raise Reject(TOPIC_UNMATCHED, f"no subscription matches topic {_clip(topic)}")
