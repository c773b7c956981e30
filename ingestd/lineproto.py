"""InfluxDB line protocol, both ways: a fast injection-proof formatter and a strict parser.

Escaping (https://docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol/):

======================  ================================  ================================
element                 backslash-escaped                 refused (ValueError)
======================  ================================  ================================
measurement             comma, space                      empty, leading ``#``, controls,
                                                          an ambiguous backslash (below)
tag key, value          comma, equals sign, space         empty key, controls, ambiguous
                                                          backslash
field key               comma, equals sign, space         empty, controls, ambiguous
                                                          backslash, double quote
string field value      double quote, backslash           ``\\n``, ``\\r``
======================  ================================  ================================

Newlines cannot be escaped in line protocol at all, so they (and, in names, every other
ASCII control character and DEL, which some parsers treat as separators) must never reach
the output: the decoder refuses them with the reason ``bad_characters`` and
:func:`format_reading` raises ``ValueError`` as the last line of defence. A measurement
starting with ``#`` would turn the line into a comment (a silent loss), so it is refused too.

Backslashes in names: InfluxDB 2.x and VictoriaMetrics read ``\\\\`` as one backslash;
InfluxDB 1.x reads every character after a backslash as literal and unescapes only ``\\,``,
``\\ `` and ``\\=`` (measured on InfluxDB 1.6: ``a\\\\`` is stored as two backslashes, a tag
value ending in one is refused, and a measurement ending in one swallows the tags after it).
No spelling of a name with a backslash before a backslash, comma, equals sign, space or
double quote, or at its end, is read the same by both, so such a name is refused
(:data:`AMBIGUOUS_BACKSLASH`; the decoder says ``bad_characters``). Any other backslash is
written as it is and read back unchanged by every server (``C:\\temp``). A double quote in a
field key is refused too: VictoriaMetrics (1.79) reads it as the start of a string value and
loses the rest of the line, InfluxDB 1.x unescapes ``\\"`` there. :func:`parse_line`
reads ``\\\\`` as one backslash and ``\\`` before any other character as a literal
backslash, as the InfluxDB 2 reference and VictoriaMetrics do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from ingestd.model import FieldValue, Reading

__all__ = ["AMBIGUOUS_BACKSLASH", "ParsedValue", "format_reading", "parse_line"]

ParsedValue = float | int | bool | str
"""A field value as read from line protocol: ``i``/``u`` integers stay ``int``."""

# ASCII controls and DEL: never valid in a name. The translate tables map them to "\n", so
# a single `"\n" in line` test at the end catches every forbidden character at once.
_CONTROLS = {c: "\n" for c in (*range(0x20), 0x7F)}
_MEASUREMENT = str.maketrans({**_CONTROLS, ",": "\\,", " ": "\\ "})
_KEY = str.maketrans({**_CONTROLS, ",": "\\,", "=": "\\=", " ": "\\ "})
# VictoriaMetrics reads a double quote in a field key as the start of a string value (the rest
# of the line is lost) and InfluxDB 1.x unescapes \" there: no spelling works for both.
_FIELD_KEY = str.maketrans({**_CONTROLS, ",": "\\,", "=": "\\=", " ": "\\ ", '"': "\n"})
_STRING = str.maketrans({"\\": "\\\\", '"': '\\"', "\r": "\n"})
AMBIGUOUS_BACKSLASH = re.compile(r'\\(?=[\\,= "]|\Z)')
"""A backslash in a name that InfluxDB 1.x and 2.x/VictoriaMetrics would read differently."""

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


def _name(value: str, table: dict[int, str]) -> str:
    if "\\" in value and AMBIGUOUS_BACKSLASH.search(value):
        return "\n"  # refused by the caller's newline check, with the name (_forbidden)
    return value.translate(table)


def _field_value(value: FieldValue) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"field value {value!r} is not finite")
        # The shortest round-trip form, always with "." or "e", so never typed as an integer;
        # float.__repr__ because a subclass (numpy.float64) may print itself differently.
        return float.__repr__(value)
    if isinstance(value, str):
        return '"' + value.translate(_STRING) + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):  # not a FieldValue, but keep the field a float if one slips in
        return float.__repr__(float(value))
    raise ValueError(f"field value of unsupported type {type(value).__name__}")


def format_reading(r: Reading) -> bytes:
    """One line (no trailing newline): ``measurement,device=D,<tags by key> fields time_ns``.

    Tags with an empty value are dropped; fields keep their order. Raises ValueError when the
    reading cannot be written as exactly one line with exactly these tags and fields.
    """
    measurement, device, tags, fields = r.measurement, r.device, r.tags, r.fields
    # Fast path: no name needs escaping (the usual reading). Every other case, and every
    # error, goes through _format_escaped, which escapes and checks element by element.
    if (
        not measurement
        or measurement[0] == "#"
        or not device
        or not fields
        or "device" in tags
        or "" in tags
        or "" in fields
    ):
        return _format_escaped(r)
    if _SPECIAL.search("".join((measurement, device, *tags, *tags.values(), *fields))):
        return _format_escaped(r)
    if len(tags) > 1:
        tag_part = "".join([f",{k}={v}" for k, v in sorted(tags.items()) if v])
    else:
        tag_part = "".join([f",{k}={v}" for k, v in tags.items() if v])
    field_part = ",".join(
        [f"{k}={repr(v) if type(v) is float else _field_value(v)}" for k, v in fields.items()]
    )
    line = f"{measurement},device={device}{tag_part} {field_part} {r.time_ns:d}"
    if "=inf" in line or "=nan" in line or "=-inf" in line or "\n" in line:
        return _format_escaped(r)  # a non-finite float, or a newline in a string value
    return line.encode()


# Any character that an element may need escaped, or that no element may contain.
_SPECIAL = re.compile(r'[\\,= "\x00-\x1f\x7f]')


def _format_escaped(r: Reading) -> bytes:
    measurement = r.measurement
    if not measurement or measurement[0] == "#":
        raise ValueError(
            f"measurement {measurement[:80]!r} must be non-empty and not start with '#'"
        )
    if not r.device:
        raise ValueError("device must not be empty")
    tags = r.tags
    if "device" in tags:
        raise ValueError("tags must not contain 'device': it is the reading's device")
    if "" in tags:
        raise ValueError("tag keys must not be empty")
    fields = r.fields
    if not fields:
        raise ValueError("a reading needs at least one field")
    if "" in fields:
        raise ValueError("field keys must not be empty")
    parts = [_name(measurement, _MEASUREMENT), ",device=", _name(r.device, _KEY)]
    for key, value in sorted(tags.items()):
        if value:
            parts += (",", _name(key, _KEY), "=", _name(value, _KEY))
    sep = " "
    for key, field in fields.items():
        parts += (sep, _name(key, _FIELD_KEY), "=", _field_value(field))
        sep = ","
    parts += (" ", f"{r.time_ns:d}")
    line = "".join(parts)
    if "\n" in line:
        raise ValueError(_forbidden(r))
    return line.encode()


def _forbidden(r: Reading) -> str:
    """Name the element that holds a forbidden character (the slow path of an error)."""
    names = [("measurement", r.measurement), ("device", r.device)]
    names += [(f"tag key {k[:40]!r}", k) for k in r.tags]
    names += [(f"tag {k[:40]!r}", v) for k, v in r.tags.items()]
    names += [(f"field key {k[:40]!r}", k) for k in r.fields]
    for what, name in names:
        if "\n" in name.translate(_KEY):
            return f"{what} contains a control character: {name[:80]!r}"
        if AMBIGUOUS_BACKSLASH.search(name):
            return (
                f"{what} has a backslash before a separator, a quote, a backslash or its "
                f"end, which TSDBs read differently: {name[:80]!r}"
            )
    for key, value in r.fields.items():
        if '"' in key:
            return f"field key {key[:40]!r} contains a double quote"
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            return f"string field {key[:40]!r} contains a newline: {value[:80]!r}"
    return "a newline would split the line"  # pragma: no cover - one of the above holds


# --- parsing ------------------------------------------------------------------------------

# Unescaped, a name ends at a separator; a backslash always takes the next character along.
_MEASUREMENT_TOKEN = re.compile(r"(?:[^\\, ]|\\.)+", re.DOTALL)
_KEY_TOKEN = re.compile(r"(?:[^\\,= ]|\\.)+", re.DOTALL)
_STRING_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_VALUE_TOKEN = re.compile(r"[^, ]+")
_MEASUREMENT_ESCAPE = re.compile(r"\\([\\, ])")
_KEY_ESCAPE = re.compile(r"\\([\\,= ])")
_STRING_ESCAPE = re.compile(r'\\([\\"])')
_FLOAT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_INT = re.compile(r"-?[0-9]+")
_UINT = re.compile(r"[0-9]+")
_BOOLS = {
    **dict.fromkeys(("t", "T", "true", "True", "TRUE"), True),
    **dict.fromkeys(("f", "F", "false", "False", "FALSE"), False),
}


def _unescaper(pattern: re.Pattern[str]) -> Callable[[str], str]:
    def unescape(token: str) -> str:
        return pattern.sub(r"\1", token) if "\\" in token else token

    return unescape


_unescape_measurement = _unescaper(_MEASUREMENT_ESCAPE)
_unescape_key = _unescaper(_KEY_ESCAPE)
_unescape_string = _unescaper(_STRING_ESCAPE)


def _at(pos: int) -> str:
    return f"column {pos + 1}"


def _number(token: str, key: str, pos: int) -> ParsedValue:
    boolean = _BOOLS.get(token)
    if boolean is not None:
        return boolean
    last = token[-1]
    if last == "i" and _INT.fullmatch(token, 0, len(token) - 1):
        number = int(token[:-1]) if len(token) < 22 else _UINT64_MAX
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise ValueError(
                f"{_at(pos)}: integer field {key[:40]!r} out of int64 range: {token[:40]}"
            )
        return number
    if last == "u" and _UINT.fullmatch(token, 0, len(token) - 1):
        number = int(token[:-1]) if len(token) < 22 else _UINT64_MAX + 1
        if number > _UINT64_MAX:
            raise ValueError(
                f"{_at(pos)}: unsigned field {key[:40]!r} out of uint64 range: {token[:40]}"
            )
        return number
    if _FLOAT.fullmatch(token):
        value = float(token)
        if not math.isfinite(value):
            raise ValueError(f"{_at(pos)}: float field {key[:40]!r} out of range: {token[:40]}")
        return value
    raise ValueError(
        f"{_at(pos)}: field {key[:40]!r} has invalid value {token[:40]!r}"
        " (expected a float, an integer with i or u, a bool or a quoted string)"
    )


def parse_line(
    line: bytes,
) -> tuple[str, dict[str, str], dict[str, ParsedValue], int | None]:
    """``(measurement, tags, fields, time_ns or None)`` of one line; ValueError if malformed.

    Strict: one space between sections, no trailing space, no empty tag value, no
    duplicate tag or field key; a blank line or a ``#`` comment is not a point.
    """
    try:
        s = line.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"byte {exc.start + 1}: not UTF-8") from None
    for bad, name in (("\n", "newline"), ("\r", "carriage return")):
        if bad in s:
            raise ValueError(f"{_at(s.index(bad))}: {name} inside a line")
    if not s.strip():
        raise ValueError("empty line")
    if s[0] == "#":
        raise ValueError("a comment, not a point")
    end = len(s)
    token = _MEASUREMENT_TOKEN.match(s)
    if token is None:
        raise ValueError(f"{_at(0)}: expected a measurement, got {s[0]!r}")
    measurement = _unescape_measurement(token.group())
    pos = token.end()

    tags: dict[str, str] = {}
    while pos < end and s[pos] == ",":
        token = _KEY_TOKEN.match(s, pos + 1)
        if token is None:
            raise ValueError(f"{_at(pos + 1)}: expected a tag key after ','")
        key = _unescape_key(token.group())
        pos = token.end()
        if pos >= end or s[pos] != "=":
            raise ValueError(f"{_at(pos)}: expected '=' after tag key {key[:40]!r}")
        token = _KEY_TOKEN.match(s, pos + 1)
        if token is None:
            raise ValueError(f"{_at(pos + 1)}: tag {key[:40]!r} has an empty value")
        if key in tags:
            raise ValueError(f"{_at(pos)}: duplicate tag key {key[:40]!r}")
        tags[key] = _unescape_key(token.group())
        pos = token.end()
    if pos >= end or s[pos] != " ":
        got = repr(s[pos]) if pos < end else "the end of the line"
        raise ValueError(f"{_at(pos)}: expected a space before the fields, got {got}")

    fields: dict[str, ParsedValue] = {}
    while True:
        token = _KEY_TOKEN.match(s, pos + 1)
        if token is None:
            raise ValueError(f"{_at(pos + 1)}: expected a field key")
        key = _unescape_key(token.group())
        pos = token.end()
        if pos >= end or s[pos] != "=":
            raise ValueError(f"{_at(pos)}: expected '=' after field key {key[:40]!r}")
        pos += 1
        value: ParsedValue
        if pos < end and s[pos] == '"':
            token = _STRING_TOKEN.match(s, pos)
            if token is None:
                raise ValueError(f"{_at(pos)}: unterminated string in field {key[:40]!r}")
            value = _unescape_string(token.group(1))
        else:
            token = _VALUE_TOKEN.match(s, pos)
            if token is None:
                raise ValueError(f"{_at(pos)}: field {key[:40]!r} has no value")
            value = _number(token.group(), key, pos)
        if key in fields:
            raise ValueError(f"{_at(pos)}: duplicate field key {key[:40]!r}")
        fields[key] = value
        pos = token.end()
        if pos >= end or s[pos] == " ":
            break
        if s[pos] != ",":
            raise ValueError(f"{_at(pos)}: expected ',' or ' ' after field {key[:40]!r}")

    if pos >= end:
        return measurement, tags, fields, None
    stamp = s[pos + 1 :]
    if not _INT.fullmatch(stamp):
        raise ValueError(f"{_at(pos + 1)}: expected an integer timestamp, got {stamp[:40]!r}")
    time_ns = int(stamp) if len(stamp) < 22 else _UINT64_MAX
    if not _INT64_MIN <= time_ns <= _INT64_MAX:
        raise ValueError(f"{_at(pos + 1)}: timestamp out of int64 range")
    return measurement, tags, fields, time_ns
