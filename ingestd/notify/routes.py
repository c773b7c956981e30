"""Routes: which alert events go to which channels, when (grouping window, quiet hours),
and in what words (templates).

Routes are tried in their configured order; an event goes to every route that matches it
until one with ``stop`` (the default) matches. A ``target_only`` route is never matched:
it only receives escalations and fallbacks. Built once from the settings; read-only after,
so the worker threads may share it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from ingestd.config import WEEKDAYS, NotifyRoute, NotifySection, QuietWindow
from ingestd.notify.messages import Templates
from ingestd.rules.glob import Glob

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class _Daily:
    """Quiet every listed day from ``start`` to ``end`` (minutes after local midnight)."""

    start: int
    end: int
    days: frozenset[int]

    def until(self, when: float, zone: ZoneInfo) -> float | None:
        local = datetime.fromtimestamp(when, zone)
        for back in (0, 1):  # a window that started yesterday may still be on
            day = local.date() - timedelta(days=back)
            if day.weekday() not in self.days:
                continue
            start = _at(day, self.start, zone)
            end = _at(day if self.end > self.start else day + timedelta(days=1), self.end, zone)
            if start.timestamp() <= when < end.timestamp():
                return end.timestamp()
        return None


@dataclass(frozen=True, slots=True)
class _Once:
    start: float
    end: float

    def until(self, when: float, zone: ZoneInfo) -> float | None:
        return self.end if self.start <= when < self.end else None


def _at(day: date, minutes: int, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(minutes // 60, minutes % 60), zone)


def _window(spec: QuietWindow, zone: ZoneInfo) -> _Daily | _Once:
    if spec.daily:
        start_h, start_m = map(int, spec.start.split(":"))
        end_h, end_m = map(int, spec.end.split(":"))
        days = frozenset(WEEKDAYS.index(d) for d in spec.days)
        return _Daily(start_h * 60 + start_m, end_h * 60 + end_m, days)
    start, end = (datetime.fromisoformat(v) for v in (spec.start, spec.end))
    if start.tzinfo is None:
        start, end = start.replace(tzinfo=zone), end.replace(tzinfo=zone)
    return _Once(start.timestamp(), end.timestamp())


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    channels: tuple[str, ...]
    kinds: frozenset[str]
    target_only: bool
    stop: bool
    group_window: float
    group_max: int
    zone: ZoneInfo
    quiet: tuple[_Daily | _Once, ...]
    quiet_override: frozenset[str]
    quiet_action: str
    escalate_after: float | None
    escalate_to: str | None
    fallback: str | None
    templates: Templates
    severity: tuple[Glob, ...]
    site: tuple[Glob, ...]
    rule: tuple[Glob, ...]
    device: tuple[Glob, ...]
    labels: tuple[tuple[str, Glob], ...]

    @classmethod
    def build(cls, spec: NotifyRoute, section: NotifySection) -> Route:
        zone = ZoneInfo(spec.timezone)
        match = spec.match
        return cls(
            name=spec.name,
            channels=tuple(dict.fromkeys(spec.channels)),
            kinds=frozenset(spec.kinds),
            target_only=spec.target_only,
            stop=spec.stop,
            group_window=spec.group_window,
            group_max=spec.group_max,
            zone=zone,
            quiet=tuple(_window(w, zone) for w in spec.quiet_hours),
            quiet_override=frozenset(spec.quiet_override),
            quiet_action=spec.quiet_action,
            escalate_after=spec.escalate_after,
            escalate_to=spec.escalate_to,
            fallback=spec.fallback,
            templates=Templates.build(spec.title or section.title, spec.body or section.body),
            severity=tuple(Glob(p) for p in match.severity),
            site=tuple(Glob(p) for p in match.site),
            rule=tuple(Glob(p) for p in match.rule),
            device=tuple(Glob(p) for p in match.device),
            labels=tuple((k, Glob(p)) for k, p in match.labels.items()),
        )

    def matches(self, event: Mapping[str, Any]) -> bool:
        labels = event.get("labels") or {}
        return (
            _any(self.severity, str(event.get("severity", "")))
            and _any(self.site, str(event.get("site", "")))
            and _any(self.rule, str(event.get("rule", "")))
            and _any(self.device, str(event.get("device", "")))
            and all(glob.match(str(labels.get(key, ""))) for key, glob in self.labels)
        )

    def quiet_until(self, when: float, severity: str) -> float | None:
        """When the quiet time around ``when`` ends (None: not quiet, or ``severity``
        overrides it). Adjoining windows are followed to their common end."""
        if not self.quiet or severity in self.quiet_override:
            return None
        moved = when
        for _ in range(32):
            ends = [end for w in self.quiet if (end := w.until(moved, self.zone)) is not None]
            if not ends:
                break
            moved = max(ends)
        return moved if moved != when else None


def _any(globs: Sequence[Glob], value: str) -> bool:
    return any(glob.match(value) for glob in globs)


class Router:
    def __init__(self, section: NotifySection) -> None:
        self._order = tuple(Route.build(spec, section) for spec in section.routes)
        self.routes: dict[str, Route] = {route.name: route for route in self._order}

    def __len__(self) -> int:
        return len(self._order)

    def routes_for(self, event: Mapping[str, Any]) -> list[Route]:
        """The routes that send ``event`` (a route that matches but does not send its
        kind still stops the search: the alert is its)."""
        chosen = []
        for route in self._order:
            if route.target_only or not route.matches(event):
                continue
            if event["kind"] in route.kinds:
                chosen.append(route)
            if route.stop:
                break
        return chosen
