"""Message title and body from sandboxed Jinja2 templates, for an operator's phone at 3 a.m.

A message carries one or more alert events of one route (grouping). Templates see:

    events      list of events, oldest first; each has every field of an alert event
                (id, rule, device, site, field, measurement, severity, state, kind, value,
                threshold, started_at, at, labels, annotations, tags, acknowledged_by)
                plus: what (FIRING, RESOLVED, ...), headline, where, value_text,
                threshold_text, since_local, at_local, for_text (how long it has lasted),
                summary (annotation summary or description), needs_ack,
                ack_mqtt, ack_cli
    event       events[0]
    count       len(events)
    worst       the most severe severity among those still needing someone, else "ok"
    tally       "2 firing, 1 resolved"
    route       the route's name
    ref         the message's idempotency reference (receivers can drop repeats by it)
    now_local   the time of sending, in the route's zone

Nothing here does I/O; nothing here knows about configuration sections.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

__all__ = [
    "DEFAULT_BODY",
    "DEFAULT_TITLE",
    "Message",
    "Templates",
    "check_template",
    "compile_template",
    "message_ref",
    "render",
]

DEFAULT_TITLE = (
    "{% if count == 1 %}{{ event.headline }}"
    "{% else %}[{{ worst | upper }}] {{ count }} alerts: {{ tally }}{% endif %}"
)

DEFAULT_BODY = """\
{% for e in events %}
{% if not loop.first %}

{% endif %}
{{ e.headline }}
What:  {{ e.measurement }} {{ e.field }} = {{ e.value_text }}\
{% if e.threshold is not none %} (threshold {{ e.threshold_text }}){% endif %}

Where: {{ e.where }}
{% if e.kind == "resolved" %}
Ended: {{ e.at_local }}, after {{ e.for_text }}
{% else %}
Since: {{ e.since_local }} ({{ e.for_text }} ago)
{% endif %}
{% if e.summary %}
{{ e.summary }}
{% endif %}
{% if e.needs_ack %}
Acknowledge: {{ e.ack_mqtt }}
         or: {{ e.ack_cli }}
{% endif %}
alert {{ e.id }}
{% endfor %}

ref {{ ref }} · route {{ route }} · sent {{ now_local }}"""

_WHAT = {
    "firing": "FIRING",
    "escalated": "WORSE",
    "deescalated": "BETTER",
    "repeat": "STILL FIRING",
    "resolved": "RESOLVED",
    "acknowledged": "ACKNOWLEDGED",
    "flapping": "FLAPPING",
    "unacknowledged": "NOT ACKNOWLEDGED",
    "test": "TEST",
}
_NEEDS_ACK = frozenset({"firing", "escalated", "deescalated", "repeat", "unacknowledged"})
_SEVERITY_ORDER = ("critical", "error", "warning", "info")


def _environment() -> SandboxedEnvironment:
    return SandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, trim_blocks=True, lstrip_blocks=True
    )


def compile_template(text: str) -> Template:
    return _environment().from_string(text)


def check_template(text: str) -> None:
    """Raise ValueError when ``text`` does not compile or fails on a sample message."""
    try:
        template = compile_template(text)
        template.render(
            _context([_sample_event()], "route", "0123456789ab", 1.8e9, ZoneInfo("UTC"))
        )
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
        raise ValueError(f"template error: {exc}") from None


@dataclass(frozen=True, slots=True)
class Templates:
    title: Template
    body: Template

    @classmethod
    def build(cls, title: str | None, body: str | None) -> Templates:
        return cls(compile_template(title or DEFAULT_TITLE), compile_template(body or DEFAULT_BODY))


@dataclass(frozen=True, slots=True)
class Message:
    title: str
    body: str
    notify_type: str
    """Apprise's: info, success, warning or failure."""
    ref: str


def message_ref(keys: Sequence[str]) -> str:
    """A short stable reference of the entries a message carries."""
    digest = hashlib.sha1("\x1f".join(sorted(keys)).encode(), usedforsecurity=False)
    return digest.hexdigest()[:12]


def render(
    templates: Templates,
    events: Sequence[Mapping[str, Any]],
    *,
    route: str,
    ref: str,
    now: float,
    zone: ZoneInfo,
) -> Message:
    """The message for ``events``; a template failing on real values falls back to the
    default one (with a note), so a notification is never lost to a template."""
    context = _context(events, route, ref, now, zone)
    try:
        title = templates.title.render(context)
        body = templates.body.render(context)
    except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
        fallback = Templates.build(None, None)
        title = fallback.title.render(context)
        body = fallback.body.render(context) + f"\n(route template error: {exc})"
    title = " ".join(title.split())[:250]
    return Message(title, body.strip("\n"), _notify_type(events), ref)


def _notify_type(events: Sequence[Mapping[str, Any]]) -> str:
    kinds = {e["kind"] for e in events}
    if kinds <= {"resolved", "acknowledged", "deescalated"}:
        return "success"
    if kinds <= {"test"}:
        return "info"
    severities = {e["severity"] for e in events if e["kind"] in _NEEDS_ACK}
    if severities & {"critical", "error"}:
        return "failure"
    if severities:
        return "warning"
    return "info"


def _worst(events: Sequence[Mapping[str, Any]]) -> str:
    """The most severe severity among the events that still need someone; ``ok`` when
    none does (all resolved or acknowledged)."""

    def rank(severity: str) -> int:
        return _SEVERITY_ORDER.index(severity) if severity in _SEVERITY_ORDER else 99

    pressing = [str(e["severity"]) for e in events if e["kind"] in _NEEDS_ACK]
    return min(pressing, key=rank, default="ok")


def _context(
    events: Sequence[Mapping[str, Any]], route: str, ref: str, now: float, zone: ZoneInfo
) -> dict[str, Any]:
    shown = [_describe(e, now, zone) for e in events]
    counts: dict[str, int] = {}
    for event in shown:
        counts[event["what"].lower()] = counts.get(event["what"].lower(), 0) + 1
    return {
        "events": shown,
        "event": shown[0] if shown else {},
        "count": len(shown),
        "worst": _worst(events),
        "tally": ", ".join(f"{n} {what}" for what, n in counts.items()),
        "route": route,
        "ref": ref,
        "now_local": _local(now, zone),
    }


def _describe(event: Mapping[str, Any], now: float, zone: ZoneInfo) -> dict[str, Any]:
    e = dict(event)
    kind = str(e["kind"])
    e["what"] = _WHAT.get(kind, kind.upper())
    e["value_text"] = _number(e.get("value"))
    e["threshold_text"] = _number(e.get("threshold"))
    site = e.get("site") or "?"
    e["where"] = f"site {site}, device {e['device']}"
    e["since_local"] = _local(float(e["started_at"]), zone)
    e["at_local"] = _local(float(e["at"]), zone)
    until = float(e["at"]) if kind == "resolved" else now
    e["for_text"] = _duration(max(0.0, until - float(e["started_at"])))
    annotations = e.get("annotations") or {}
    e["summary"] = annotations.get("summary") or annotations.get("description") or ""
    e["needs_ack"] = kind in _NEEDS_ACK and e.get("state") != "acknowledged"
    # The topic's last level is who acknowledges, and the gateway broker takes it only from
    # that account (mosquitto/acl): the same name twice, the payload an optional note.
    e["ack_mqtt"] = (
        f"mosquitto_pub -u YOU -P PASSWORD -t alerts/ack/{e['id']}/YOU -m 'optional note'"
    )
    e["ack_cli"] = f"ingestd alerts ack {e['id']}"
    e["headline"] = _headline(e)
    return e


def _headline(e: Mapping[str, Any]) -> str:
    kind = e["kind"]
    on = f"{e['rule']} on {e['device']} ({e.get('site') or '?'})"
    reading = f"{e['field']} {e['value_text']}"
    if kind == "resolved":
        return f"[RESOLVED] {on}: {reading}"
    if kind == "acknowledged":
        return f"[ACK] {on} by {e.get('acknowledged_by') or 'unknown'}"
    if kind == "test":
        return f"[TEST] ingestd notification test through route {e.get('route', '?')}"
    if kind == "unacknowledged":
        waited = _duration(float(e.get("unacknowledged_for") or 0.0))
        return f"[{str(e['severity']).upper()}] NOT ACKNOWLEDGED for {waited}: {on}: {reading}"
    limit = f", threshold {e['threshold_text']}" if e.get("threshold") is not None else ""
    return f"[{str(e['severity']).upper()}] {e['what']} {on}: {reading}{limit}"


def _number(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "no value"
    if isinstance(value, int | float):
        return f"{value:.6g}"
    return str(value)


def _local(when: float, zone: ZoneInfo) -> str:
    return datetime.fromtimestamp(when, zone).strftime("%Y-%m-%d %H:%M %Z")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _sample_event() -> dict[str, Any]:
    return {
        "id": "0123456789abcdef",
        "rule": "ph_high",
        "device": "esp32-7",
        "site": "greenhouse-1",
        "field": "ph",
        "measurement": "reservoir",
        "severity": "critical",
        "state": "firing",
        "kind": "firing",
        "value": 7.4,
        "threshold": 7.0,
        "started_at": 1.8e9 - 600,
        "at": 1.8e9,
        "labels": {"team": "water"},
        "annotations": {"summary": "pH 7.4 on esp32-7"},
        "flapping": False,
        "notify": True,
        "reason": None,
        "acknowledged_by": None,
        "tags": {"site": "greenhouse-1"},
    }
