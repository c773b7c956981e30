"""Compiled rules (what the engine runs) and alert events (what the engine says).

A :class:`Rule` is built by ``loader.py`` from a validated rule file; nothing here parses
YAML. An :class:`AlertEvent` is one transition of one alert and is JSON-serialisable with
:meth:`AlertEvent.to_dict`; :class:`Alert` is the current picture of one active alert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from jinja2 import StrictUndefined, Template, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from ingestd.rules.glob import Glob

__all__ = [
    "EVENT_KINDS",
    "RESERVED_SEVERITIES",
    "STATES",
    "Alert",
    "AlertEvent",
    "Flapping",
    "Level",
    "Rule",
    "RuleSet",
    "alert_id",
    "template_context",
    "template_environment",
    "topic_level",
]

STATES = ("pending", "firing", "resolved", "acknowledged")
EVENT_KINDS = (
    "pending",
    "firing",
    "escalated",
    "deescalated",
    "repeat",
    "resolved",
    "cancelled",
    "acknowledged",
    "flapping",
)
# Topic levels next to alerts/<severity>/... that must never be taken for a severity.
RESERVED_SEVERITIES = frozenset({"ack", "state", "rules", "error"})

State = Literal["pending", "firing", "resolved", "acknowledged"]
Kind = Literal[
    "pending",
    "firing",
    "escalated",
    "deescalated",
    "repeat",
    "resolved",
    "cancelled",
    "acknowledged",
    "flapping",
]
ConditionKind = Literal["above", "below", "outside", "rate", "deadman"]


def template_environment() -> SandboxedEnvironment:
    """The one way annotation templates are compiled: sandboxed, undefined names are errors."""
    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def template_context(
    *,
    rule: str,
    device: str,
    site: str,
    field: str,
    measurement: str,
    severity: str,
    state: str,
    kind: str,
    value: float | None,
    threshold: float | None,
    last: float | None,
    started_at: float,
    last_seen: float,
    at: float,
    tags: Mapping[str, str],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """What an annotation template can use. ``value`` is what the condition tested (the
    rate per minute for ``rate``, the seconds of silence for ``deadman``), ``last`` the
    last reading; ``since``/``last_seen``/``now`` are ISO 8601 UTC texts."""
    return {
        "rule": rule,
        "device": device,
        "site": site,
        "field": field,
        "measurement": measurement,
        "severity": severity,
        "level": severity,
        "state": state,
        "kind": kind,
        "value": value,
        "threshold": threshold,
        "last": last,
        "started_at": started_at,
        "since": iso(started_at),
        "last_seen": iso(last_seen),
        "now": iso(at),
        "tags": dict(tags),
        "labels": dict(labels),
    }


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Level:
    """One severity of a rule: latched when ``trigger(value)``, unlatched when ``cleared(value)``.

    ``value`` is the reading's value, or for ``rate`` the change per minute over ``window``.
    """

    severity: str
    kind: ConditionKind
    threshold: float | tuple[float, float]
    clear: float | tuple[float, float] | None
    for_: float
    window: float | None
    trigger: Callable[[float], bool] = dataclasses.field(repr=False, compare=False)
    cleared: Callable[[float], bool] = dataclasses.field(repr=False, compare=False)

    def threshold_for(self, value: float | None) -> float:
        """The threshold crossed (for ``outside``: the bound nearer to ``value``)."""
        if isinstance(self.threshold, tuple):
            lo, hi = self.threshold
            return hi if value is not None and value >= (lo + hi) / 2 else lo
        return self.threshold

    def shape(self) -> tuple[str, str, float | None]:
        """What this level alerts on, without its numbers: part of a rule's identity."""
        return (self.severity, self.kind, self.window)


@dataclass(frozen=True, slots=True)
class Flapping:
    max_changes: int
    window: float
    stable: float


@dataclass(frozen=True, eq=False)
class Rule:
    """One compiled rule. ``levels`` go from least to most severe."""

    name: str
    source: str
    """``file:line:column`` where the rule starts, for messages."""
    measurement: Glob
    field: Glob
    device: Glob
    site: Glob
    tags: tuple[tuple[str, Glob], ...]
    levels: tuple[Level, ...]
    deadman: float | None
    per: Literal["field", "device"]
    grace: float
    forget: float | None
    labels: Mapping[str, str]
    annotations: Mapping[str, Template]
    annotation_sources: Mapping[str, str]
    repeat_interval: float | None
    flapping: Flapping
    max_window: float = 0.0
    identity: str = ""
    restricted: bool = True
    """Whether the device, site or tag matchers can refuse a reading (else all pass)."""
    restricted_beyond_site: bool = True
    """Whether the device or tag matchers can refuse a reading whose site matched."""

    def __post_init__(self) -> None:
        windows = [lvl.window for lvl in self.levels if lvl.window is not None]
        object.__setattr__(self, "max_window", max(windows, default=0.0))
        object.__setattr__(self, "identity", self._identity())
        open_ = self.device.matches_everything and self.site.matches_everything
        object.__setattr__(self, "restricted", not (open_ and not self.tags))
        beyond = not (self.device.matches_everything and not self.tags)
        object.__setattr__(self, "restricted_beyond_site", beyond)

    @property
    def is_deadman(self) -> bool:
        return self.deadman is not None

    def _identity(self) -> str:
        """Name + selector + condition shape (kinds, severities, rate windows, deadman
        scope), without thresholds, clear values, ``for``, labels or annotations: tuning a
        threshold keeps an alert's state, changing what it looks at does not."""
        parts = [
            self.name,
            self.measurement.pattern,
            self.field.pattern,
            self.device.pattern,
            self.site.pattern,
            repr(sorted((k, g.pattern) for k, g in self.tags)),
            repr([lvl.shape() for lvl in self.levels]),
            f"deadman:{self.per}" if self.is_deadman else "condition",
        ]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    def matches(self, device: str, tags: Mapping[str, str]) -> bool:
        """Whether the device and tag matchers accept a reading (measurement and field are
        matched by the engine's index)."""
        if not self.device.matches_everything and not self.device.match(device):
            return False
        if not self.site.matches_everything and not self.site.match(tags.get("site", "")):
            return False
        return all(glob.match(tags.get(key, "")) for key, glob in self.tags)

    def render(self, context: Mapping[str, Any]) -> dict[str, str]:
        """Annotations for an event; a template failing on real values (it rendered with the
        sample values at load time) yields a marked text rather than an exception."""
        rendered = {}
        for key, template in self.annotations.items():
            try:
                rendered[key] = template.render(context)
            except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
                rendered[key] = f"<template error: {exc}> {self.annotation_sources[key]}"
        return rendered


@dataclass(frozen=True)
class RuleSet:
    """Every rule of a directory (or file), by name; names are unique."""

    rules: tuple[Rule, ...] = ()
    files: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Any:
        return iter(self.rules)

    def by_name(self) -> dict[str, Rule]:
        return {rule.name: rule for rule in self.rules}


def alert_id(rule: str, device: str, field_name: str, started_at: float) -> str:
    """Stable id of one alert instance: the same alert keeps it through every transition."""
    text = f"{rule}\x1f{device}\x1f{field_name}\x1f{started_at!r}"
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:16]


def topic_level(text: str) -> str:
    """``text`` made safe as one MQTT topic level: ``%``, ``/``, ``+``, ``#`` and NUL are
    percent-encoded (so distinct values stay distinct), an empty value becomes ``_``."""
    if not text:
        return "_"
    return (
        text.replace("%", "%25")
        .replace("/", "%2F")
        .replace("+", "%2B")
        .replace("#", "%23")
        .replace("\x00", "%00")
    )


def _number(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One transition of one alert.

    ``state`` is the alert's state after the transition; ``kind`` says which transition.
    ``cancelled`` (state ``resolved``, ``notify`` False) ends an alert that was pending and
    never fired; ``flapping`` announces the start (``flapping`` True) or end of flapping.
    ``notify`` is False for pending/cancelled and while the alert is flapping.
    """

    id: str
    rule: str
    device: str
    site: str
    field: str
    measurement: str
    severity: str
    state: State
    kind: Kind
    value: float | None
    threshold: float | None
    started_at: float
    at: float
    labels: dict[str, str]
    annotations: dict[str, str]
    flapping: bool
    notify: bool
    reason: str | None = None
    """Why, when it is not the values: ``rule removed``, ``rule changed``, ``expired``."""
    acknowledged_by: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "device": self.device,
            "site": self.site,
            "field": self.field,
            "measurement": self.measurement,
            "severity": self.severity,
            "state": self.state,
            "kind": self.kind,
            "value": _number(self.value),
            "threshold": _number(self.threshold),
            "started_at": self.started_at,
            "at": self.at,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "flapping": self.flapping,
            "notify": self.notify,
            "reason": self.reason,
            "acknowledged_by": self.acknowledged_by,
            "tags": dict(self.tags),
        }

    def topic_parts(self) -> tuple[str, str, str, str, str]:
        """``("alerts", severity, site, device, rule)``, each a safe topic level."""
        return (
            "alerts",
            topic_level(self.severity),
            topic_level(self.site),
            topic_level(self.device),
            topic_level(self.rule),
        )

    def topic(self) -> str:
        """``alerts/<severity>/<site>/<device>/<rule>``: where the event is published."""
        return "/".join(self.topic_parts())

    def state_topic(self) -> str:
        """``alerts/state/<site>/<device>/<rule>/<field>``: the retained current state of
        this alert (independent of severity); publish an empty retained payload to clear
        it when ``state == "resolved"``."""
        return "/".join(
            (
                "alerts",
                "state",
                topic_level(self.site),
                topic_level(self.device),
                topic_level(self.rule),
                topic_level(self.field),
            )
        )


@dataclass(frozen=True, slots=True)
class Alert:
    """The current picture of one pending, firing or acknowledged alert."""

    id: str
    rule: str
    device: str
    site: str
    field: str
    measurement: str
    severity: str
    state: State
    value: float | None
    threshold: float | None
    started_at: float
    since: float
    """When the alert reached its current severity."""
    flapping: bool
    acknowledged_by: str | None
    labels: dict[str, str]
    annotations: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "device": self.device,
            "site": self.site,
            "field": self.field,
            "measurement": self.measurement,
            "severity": self.severity,
            "state": self.state,
            "value": _number(self.value),
            "threshold": _number(self.threshold),
            "started_at": self.started_at,
            "since": self.since,
            "flapping": self.flapping,
            "acknowledged_by": self.acknowledged_by,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
        }
