"""Stream readings through rules; turn each alert's transitions into events. Pure, synchronous.

State machine, per (rule, device, field)::

    inactive ──latch──► pending ──`for` elapsed──► firing ◄──► acknowledged
        ▲                  │                         │  ▲ escalated / deescalated
        └──── cancelled ───┘                         └──┴──── resolved ──► inactive

Each level of a rule is a latch: set when its condition holds, reset only when its clear
condition holds (hysteresis; the default clear is "condition no longer holds"). The alert
fires at the most severe latched level whose ``for`` has elapsed (on the engine clock,
measured from when it latched); once firing, it moves down at once when a level unlatches
and up when a higher level's ``for`` has elapsed; it resolves when nothing is latched.

Time: ``now()`` (wall-clock epoch seconds, so a snapshot means the same after a restart)
drives ``for``, deadman, repeat, flapping and expiry; a reading's own ``time_ns`` drives
``rate`` and the per-state stale guard (a reading not newer than the last one seen for a
state is ignored, so a replayed reading cannot re-fire anything).

Cost: readings are routed by a cached (measurement, field) index, then by literal device or
site; a reading examines only the rules that can match it. Timers live in one heap with at
most a few entries per state (lazy re-scheduling); ``tick`` pops only what is due.

Memory, for a bound on what is kept: a condition rule keeps state for a (device, field) only
while it is pending/firing/acknowledged or latched, while a ``rate`` window holds samples
(at most 65 per state, thinned to window/64), or while flapping history is within its
window. A deadman rule keeps one small state per (device, field) it has seen, forgotten
after ``forget`` (default max(forget_after, 2 x deadman)). Any state not updated by a
reading for ``forget_after`` (default 7 days) is dropped; an alert it held is resolved
with reason ``expired``.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ingestd.errors import IngestdError
from ingestd.model import FieldValue, Reading
from ingestd.rules.model import (
    Alert,
    AlertEvent,
    Kind,
    Rule,
    RuleSet,
    State,
    alert_id,
    template_context,
)

__all__ = ["Engine", "EngineStats", "SnapshotError"]

SNAPSHOT_VERSION = 1
DEFAULT_FORGET_AFTER = 7 * 86400.0
_LOG_SIZE = 16
_RATE_SAMPLES = 64
_SITE_CACHE = 4096  # distinct site values remembered per route
_COUNTED = frozenset({"firing", "resolved", "escalated", "deescalated"})
_INF = math.inf

StateKey = tuple[str, str, str]


class SnapshotError(IngestdError):
    """A snapshot that cannot be restored (corrupt or of another version): start fresh."""


@dataclass(slots=True)
class EngineStats:
    """Counters for metrics and for tests that prove cost does not grow with unrelated rules."""

    readings: int = 0
    route_lookups: int = 0
    """(measurement, field) index lookups that found candidate rules."""
    routes_built: int = 0
    """Index entries built: one per (measurement, field), one per (that, site value) when
    rules there are restricted to sites; each scans the rules once."""
    rules_examined: int = 0
    """Candidate rules the index gave for readings (their matchers were then checked)."""
    evaluations: int = 0
    """Rule conditions evaluated against a value."""
    stale: int = 0
    """Readings ignored because they were not newer than the last one of their state."""
    timers: int = 0
    events: int = 0


@dataclass(slots=True)
class _Instance:
    """One alert, from pending or firing to resolution; ``id`` is stable throughout."""

    id: str
    started_at: float
    state: State
    level: int
    since: float
    last_notified: float | None = None
    acked_by: str | None = None
    acked_at: float | None = None
    value: float | None = None
    threshold: float | None = None
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _State:
    rule: Rule
    device: str
    field: str
    measurement: str
    site: str
    tags: dict[str, str]
    latched: list[float | None]
    measured: list[float | None]
    alert: _Instance | None = None
    last: _Instance | None = None
    last_value: float | None = None
    last_ns: int = -1
    last_seen: float = 0.0
    samples: array[float] | None = None
    """A rate rule's samples, flat: time, value, time, value... (16 bytes a sample; as
    tuples in a deque they were 104, and 40 of a state's 88 MiB at 10,000 devices)."""
    changes: deque[float] | None = None  # made at the first counted change (flapping)
    last_change: float = -_INF
    flapping: bool = False
    expired: bool = False
    log: deque[tuple[float, str, str, bool]] | None = None  # made at the first event
    scheduled: float = _INF

    @property
    def key(self) -> StateKey:
        return (self.rule.name, self.device, self.field)


@dataclass(slots=True)
class _Route:
    """The rules of one (measurement, field), split so a reading examines only those that
    can match its device and site: literal devices by dict, sites through a cache of which
    site-restricted rules (literal or glob) accept each site value seen."""

    general: tuple[Rule, ...] = ()
    by_device: dict[str, tuple[Rule, ...]] = dataclasses.field(default_factory=dict)
    site_bound: tuple[Rule, ...] = ()
    by_site: dict[str, tuple[Rule, ...]] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.general or self.by_device or self.site_bound)

    def for_site(self, site: str, stats: EngineStats) -> tuple[Rule, ...]:
        rules = self.by_site.get(site)
        if rules is None:
            stats.routes_built += 1
            if len(self.by_site) >= _SITE_CACHE:
                self.by_site.clear()
            rules = tuple(r for r in self.site_bound if r.site.match(site))
            self.by_site[site] = rules
        return rules


def _number(raw: FieldValue) -> float | None:
    if type(raw) is float:
        return raw if math.isfinite(raw) else None
    if isinstance(raw, bool | int):
        return float(raw)
    return None


class Engine:
    """Evaluates readings against a rule set and keeps every alert's state.

    Not thread-safe: call it from one thread (the event loop). Every method that changes
    state returns the events it caused, in order; the caller publishes them.
    """

    def __init__(
        self,
        ruleset: RuleSet,
        now: Callable[[], float] = time.time,
        *,
        forget_after: float = DEFAULT_FORGET_AFTER,
        route_cache_size: int = 65536,
    ) -> None:
        self._now = now
        self._forget_after = forget_after
        self._route_cache_size = route_cache_size
        self._start = now()
        self._states: dict[StateKey, _State] = {}
        self._tags_of: tuple[Reading, dict[str, str]] | None = None
        """The last reading whose tags a state copied, and the copy: the states one reading
        makes (a device's deadman, rate and range rules) share one."""
        # States a transition touched: a superset of the essential ones (snapshot()).
        self._hot: set[StateKey] = set()
        self._ids: dict[str, StateKey] = {}
        self._heap: list[tuple[float, int, StateKey]] = []
        self._seq = itertools.count()
        self._queued: list[AlertEvent] = []
        self.stats = EngineStats()
        self._install(ruleset)

    # --- rules and routing --------------------------------------------------------------

    def _install(self, ruleset: RuleSet) -> None:
        self._ruleset = ruleset
        self._by_name = ruleset.by_name()
        self._exact: dict[tuple[str, str], list[Rule]] = {}
        self._globbed: list[Rule] = []
        for rule in ruleset.rules:
            m, f = rule.measurement.literal, rule.field.literal
            if m is not None and f is not None:
                self._exact.setdefault((m, f), []).append(rule)
            else:
                self._globbed.append(rule)
        self._routes: dict[tuple[str, str], _Route] = {}

    @property
    def ruleset(self) -> RuleSet:
        return self._ruleset

    def _route(self, measurement: str, field_name: str) -> _Route:
        """The rules that can match this (measurement, field), built once and cached."""
        self.stats.routes_built += 1
        if len(self._routes) >= self._route_cache_size:
            self._routes.clear()
        rules = list(self._exact.get((measurement, field_name), ()))
        rules.extend(
            r
            for r in self._globbed
            if r.measurement.match(measurement) and r.field.match(field_name)
        )
        general: list[Rule] = []
        by_device: dict[str, list[Rule]] = {}
        site_bound: list[Rule] = []
        for rule in rules:
            if rule.device.literal is not None:
                by_device.setdefault(rule.device.literal, []).append(rule)
            elif not rule.site.matches_everything:
                site_bound.append(rule)
            else:
                general.append(rule)
        route = _Route(
            tuple(general), {k: tuple(v) for k, v in by_device.items()}, tuple(site_bound)
        )
        self._routes[(measurement, field_name)] = route
        return route

    # --- readings -----------------------------------------------------------------------

    def evaluate(self, reading: Reading) -> list[AlertEvent]:
        """Events caused by one reading (and by any timer that fell due before it)."""
        now = self._now()
        heap = self._heap
        events = self._run_due(now) if self._queued or (heap and heap[0][0] <= now) else []
        stats = self.stats
        stats.readings += 1
        device = reading.device
        tags = reading.tags
        site = tags.get("site", "")
        measurement = reading.measurement
        routes = self._routes
        examined = 0
        for field_name, raw in reading.fields.items():
            route = routes.get((measurement, field_name))
            if route is None:
                route = self._route(measurement, field_name)
            if route.empty:
                continue
            stats.route_lookups += 1
            value = _number(raw)
            # Rules reached through their site's cache matched the site already.
            site_rules = route.for_site(site, stats) if route.site_bound else ()
            for group in (
                route.general,
                route.by_device.get(device, ()) if route.by_device else (),
                site_rules,
            ):
                examined += len(group)
                by_site = group is site_rules
                for rule in group:
                    restricted = rule.restricted_beyond_site if by_site else rule.restricted
                    if restricted and not rule.matches(device, tags):
                        continue
                    if rule.deadman is not None:
                        self._heard(rule, reading, field_name, now, events)
                    elif value is not None:
                        self._observe(rule, reading, field_name, value, now, events)
        stats.rules_examined += examined
        return events

    def _new_state(self, rule: Rule, reading: Reading, field_name: str) -> _State:
        n = len(rule.levels)
        state = _State(
            rule=rule,
            device=reading.device,
            field=field_name,
            measurement=reading.measurement,
            site=reading.tags.get("site", ""),
            tags=self._tags(reading),
            latched=[None] * n,
            measured=[None] * n,
        )
        if rule.max_window:
            state.samples = array("d")
        self._states[state.key] = state
        return state

    def _tags(self, reading: Reading) -> dict[str, str]:
        """A copy of ``reading``'s tags, the same for every state it makes or changes."""
        last = self._tags_of
        if last is None or last[0] is not reading:
            last = self._tags_of = (reading, dict(reading.tags))
        return last[1]

    def _heard(
        self, rule: Rule, reading: Reading, field_name: str, now: float, events: list[AlertEvent]
    ) -> None:
        """A deadman rule's (device, field) sent something."""
        key_field = "*" if rule.per == "device" else field_name
        state = self._states.get((rule.name, reading.device, key_field))
        if state is None:
            state = self._new_state(rule, reading, key_field)
        elif reading.time_ns <= state.last_ns:
            return  # replayed, or a second field of the same reading (per: device)
        state.last_ns = reading.time_ns
        state.last_seen = now
        if state.latched[0] is not None:
            state.latched[0] = None
            state.measured[0] = 0.0
            events.extend(self._transition(state, now))
        elif state.scheduled != _INF:
            return  # its deadline only moved later: the timer in the heap re-checks
        self._settle(state, now)

    def _observe(  # noqa: PLR0917 - the hot path: positional arguments, no packing
        self,
        rule: Rule,
        reading: Reading,
        field_name: str,
        value: float,
        now: float,
        events: list[AlertEvent],
    ) -> None:
        self.stats.evaluations += 1
        state = self._states.get((rule.name, reading.device, field_name))
        if state is None:
            # Hot path: nothing latched and nothing to remember, nothing to keep.
            if not rule.max_window and not any(lvl.trigger(value) for lvl in rule.levels):
                return
            state = self._new_state(rule, reading, field_name)
        elif reading.time_ns <= state.last_ns:
            self.stats.stale += 1
            return
        state.last_ns = reading.time_ns
        state.last_value = value
        state.last_seen = now
        if state.tags != reading.tags:
            state.tags = self._tags(reading)
            state.site = reading.tags.get("site", "")
        at = reading.time_ns / 1e9
        for index, level in enumerate(rule.levels):
            measured = value if level.window is None else self._rate(state, level.window, at, value)
            state.measured[index] = measured
        if state.samples is not None:
            self._remember(state, at, value)
        # Unless a latch moved, nothing can happen now (a level's `for` elapsing is a timer,
        # run before this reading) and deadlines only moved later: no re-scheduling.
        if self._relatch(state, now):
            events.extend(self._transition(state, now))
        elif state.scheduled != _INF:
            return
        self._settle(state, now)

    @staticmethod
    def _rate(state: _State, window: float, at: float, value: float) -> float | None:
        """Change per minute from the oldest sample within ``window`` to this one; unknown
        until the samples span at least half the window (two close samples are noise)."""
        samples = state.samples
        assert samples is not None
        cutoff = at - window
        for index in range(0, len(samples), 2):
            when = samples[index]
            if when >= cutoff:
                span = at - when
                if span <= 0 or span < window / 2:
                    return None
                return (value - samples[index + 1]) / span * 60.0
        return None

    @staticmethod
    def _remember(state: _State, at: float, value: float) -> None:
        samples = state.samples
        assert samples is not None
        window = state.rule.max_window
        stale, size = 0, len(samples)
        while stale < size and samples[stale] < at - window:
            stale += 2
        if stale:
            del samples[:stale]
        if not samples or at - samples[-2] >= window / _RATE_SAMPLES:
            samples.append(at)
            samples.append(value)

    @staticmethod
    def _relatch(state: _State, now: float) -> bool:
        """Set or reset each level's latch from its measured value; whether any moved."""
        moved = False
        for index, level in enumerate(state.rule.levels):
            measured = state.measured[index]
            if measured is None:
                continue  # unknown (rate not yet computable): the latch stays as it is
            if state.latched[index] is None:
                if level.trigger(measured):
                    state.latched[index] = now
                    moved = True
            elif level.cleared(measured):
                state.latched[index] = None
                moved = True
        return moved

    # --- transitions --------------------------------------------------------------------

    def _transition(self, state: _State, now: float) -> list[AlertEvent]:
        """Move the alert to where its latches say it should be."""
        self._hot.add(state.key)  # every latch or alert change comes through here
        rule = state.rule
        levels = rule.levels
        latched = [i for i, since in enumerate(state.latched) if since is not None]
        inst = state.alert
        if not latched:
            if inst is None:
                return []
            return self._end(state, now, "cancelled" if inst.state == "pending" else "resolved")
        # The same expression as the deadline in _next_due, so a timer at exactly that
        # deadline always finds the level ready (no float rounding between the two).
        ready = [i for i in latched if (state.latched[i] or 0.0) + levels[i].for_ <= now]
        if inst is None or inst.state == "pending":
            if ready:
                target = max(ready)
                if inst is None:
                    inst = self._begin(state, now, target)
                inst.state = "firing"
                inst.level = target
                inst.since = now
                return self._emit(state, "firing", now)
            target = max(latched)
            if inst is None:
                inst = self._begin(state, now, target)
                inst.state = "pending"
                return self._emit(state, "pending", now)
            if inst.level != target:
                inst.level = target
                inst.since = now
                return self._emit(state, "pending", now)
            return []
        current = inst.level
        candidates = [i for i in latched if i in ready or i <= current]
        target = max(candidates) if candidates else min(latched)
        if target == current:
            return []
        inst.level = target
        inst.since = now
        if target > current:
            if inst.state == "acknowledged":  # a worse level needs attention again
                inst.state = "firing"
                inst.acked_by = inst.acked_at = None
            return self._emit(state, "escalated", now)
        return self._emit(state, "deescalated", now)

    def _begin(self, state: _State, now: float, level: int) -> _Instance:
        inst = _Instance(
            id=alert_id(state.rule.name, state.device, state.field, now),
            started_at=now,
            state="pending",
            level=level,
            since=now,
        )
        state.alert = inst
        self._ids[inst.id] = state.key
        return inst

    def _end(
        self,
        state: _State,
        now: float,
        kind: Literal["resolved", "cancelled"],
        reason: str | None = None,
    ) -> list[AlertEvent]:
        inst = state.alert
        assert inst is not None
        inst.state = "resolved"
        events = self._emit(state, kind, now, reason=reason)
        state.alert = None
        state.last = inst
        self._ids.pop(inst.id, None)
        return events

    def _emit(
        self, state: _State, kind: Kind, now: float, *, reason: str | None = None
    ) -> list[AlertEvent]:
        """The event for a transition of ``state``'s alert (current or just ended), and the
        flapping notice when this transition makes it flap."""
        rule = state.rule
        inst = state.alert
        assert inst is not None
        notice = False
        if kind in _COUNTED and rule.flapping.max_changes:
            changes = state.changes
            if changes is None:
                changes = state.changes = deque()
            changes.append(now)
            while changes and changes[0] < now - rule.flapping.window:
                changes.popleft()
            state.last_change = now
            if not state.flapping and len(changes) > rule.flapping.max_changes:
                state.flapping = notice = True
        notify = kind not in ("pending", "cancelled") and not state.flapping
        events = [self._event(state, inst, kind, now, notify=notify, reason=reason)]
        if notice:
            events.append(self._event(state, inst, "flapping", now, notify=True))
        return events

    def _event(
        self,
        state: _State,
        inst: _Instance,
        kind: Kind,
        now: float,
        *,
        notify: bool,
        reason: str | None = None,
    ) -> AlertEvent:
        rule = state.rule
        level = rule.levels[inst.level]
        measured = state.measured[inst.level]
        if measured is not None:
            inst.value = measured
            inst.threshold = level.threshold_for(measured)
        elif inst.threshold is None:
            inst.threshold = level.threshold_for(None)
        context = template_context(
            rule=rule.name,
            device=state.device,
            site=state.site,
            field=state.field,
            measurement=state.measurement,
            severity=level.severity,
            state=inst.state,
            kind=kind,
            value=inst.value,
            threshold=inst.threshold,
            last=state.last_value,
            started_at=inst.started_at,
            last_seen=state.last_seen,
            at=now,
            tags=state.tags,
            labels=rule.labels,
        )
        inst.annotations = rule.render(context)
        if notify:
            inst.last_notified = now
        if state.log is None:
            state.log = deque(maxlen=_LOG_SIZE)
        state.log.append((now, kind, level.severity, notify))
        self.stats.events += 1
        return AlertEvent(
            id=inst.id,
            rule=rule.name,
            device=state.device,
            site=state.site,
            field=state.field,
            measurement=state.measurement,
            severity=level.severity,
            state=inst.state,
            kind=kind,
            value=inst.value,
            threshold=inst.threshold,
            started_at=inst.started_at,
            at=now,
            labels=dict(rule.labels),
            annotations=dict(inst.annotations),
            flapping=state.flapping,
            notify=notify,
            reason=reason,
            acknowledged_by=inst.acked_by,
            tags=dict(state.tags),
        )

    # --- timers -------------------------------------------------------------------------

    def tick(self) -> list[AlertEvent]:
        """Events of every timer due by now: ``for`` elapsed, deadman silence, repeat,
        end of flapping, expiry. Call it at :meth:`next_deadline` (or any time)."""
        return self._run_due(self._now())

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do (possibly a little early), or None."""
        if self._queued:
            return self._now()
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _live(self, entry: tuple[float, int, StateKey]) -> bool:
        """Whether a heap entry is its state's current timer (others are left behind by
        re-scheduling or by dropped states, and are skipped when they surface)."""
        state = self._states.get(entry[2])
        return state is not None and state.scheduled == entry[0]

    def _run_due(self, now: float) -> list[AlertEvent]:
        events, self._queued = self._queued, []
        heap = self._heap
        due: list[tuple[float, StateKey]] = []
        # Take what is due first: whatever processing schedules goes to the next call.
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._live(entry):
                due.append((entry[0], entry[2]))
        for when, key in due:
            state = self._states.get(key)
            if state is None or state.scheduled != when:
                continue
            state.scheduled = _INF
            if self._next_due(state, now) <= now:
                self.stats.timers += 1
                events.extend(self._on_timer(state, now))
            self._settle(state, now)
        return events

    def _forget(self, rule: Rule) -> float:
        if rule.deadman is not None:
            return rule.forget or max(self._forget_after, 2 * rule.deadman)
        return self._forget_after

    def _next_due(self, state: _State, now: float) -> float:
        rule = state.rule
        due = state.last_seen + self._forget(rule)
        inst = state.alert
        if rule.deadman is not None:
            if state.latched[0] is None:
                due = min(due, max(state.last_seen + rule.deadman, self._start + rule.grace))
        else:
            for index, since in enumerate(state.latched):
                if since is None:
                    continue
                # Levels not yet in effect; after a transition their deadlines are ahead.
                if inst is None or inst.state == "pending" or index > inst.level:
                    due = min(due, since + rule.levels[index].for_)
        if (
            inst is not None
            and inst.state == "firing"
            and rule.repeat_interval
            and not state.flapping
            and inst.last_notified is not None
        ):
            due = min(due, inst.last_notified + rule.repeat_interval)
        if state.flapping:
            due = min(due, state.last_change + rule.flapping.stable)
        if inst is None and not any(s is not None for s in state.latched):
            due = min(due, self._idle_until(state))
        return due

    @staticmethod
    def _idle_until(state: _State) -> float:
        """When a state without an alert stops holding anything worth keeping."""
        rule = state.rule
        if rule.deadman is not None or state.flapping:
            return _INF
        until = -_INF
        if state.samples:
            until = max(until, state.last_seen + rule.max_window)
        if state.changes:
            until = max(until, state.last_change + rule.flapping.window)
        return until

    def _on_timer(self, state: _State, now: float) -> list[AlertEvent]:
        rule = state.rule
        events: list[AlertEvent] = []
        if state.last_seen + self._forget(rule) <= now:
            if state.alert is not None:
                kind: Literal["resolved", "cancelled"] = (
                    "cancelled" if state.alert.state == "pending" else "resolved"
                )
                events.extend(self._end(state, now, kind, reason="expired"))
            state.expired = True
            return events
        if rule.deadman is not None:
            silence = now - state.last_seen
            state.measured[0] = silence
            if (
                state.latched[0] is None
                and state.last_seen + rule.deadman <= now
                and self._start + rule.grace <= now
            ):
                state.latched[0] = now
                events.extend(self._transition(state, now))
        else:
            events.extend(self._transition(state, now))
        inst = state.alert
        if (
            inst is not None
            and inst.state == "firing"
            and rule.repeat_interval
            and not state.flapping
            and inst.last_notified is not None
            and inst.last_notified + rule.repeat_interval <= now
        ):
            events.append(self._event(state, inst, "repeat", now, notify=True))
        if state.flapping and state.last_change + rule.flapping.stable <= now:
            state.flapping = False
            state.changes = None
            shown = inst or state.last
            if shown is not None:
                events.append(self._event(state, shown, "flapping", now, notify=True))
        return events

    def _settle(self, state: _State, now: float) -> None:
        """Drop a state that holds nothing, or make sure its next timer is in the heap."""
        if state.expired or (
            state.alert is None
            and not any(s is not None for s in state.latched)
            and self._idle_until(state) <= now
        ):
            if self._states.get(state.key) is state:
                del self._states[state.key]
            return
        due = self._next_due(state, now)
        if due < state.scheduled:
            state.scheduled = due
            heapq.heappush(self._heap, (due, next(self._seq), state.key))

    # --- operators ----------------------------------------------------------------------

    def acknowledge(self, alert_id: str, by: str) -> AlertEvent | None:
        """Acknowledge a firing alert: no more repeats until it escalates or resolves.
        None when there is no such firing alert (unknown, pending, already acknowledged)."""
        key = self._ids.get(alert_id)
        state = self._states.get(key) if key is not None else None
        if state is None or state.alert is None or state.alert.id != alert_id:
            return None
        inst = state.alert
        if inst.state != "firing":
            return None
        now = self._now()
        inst.state = "acknowledged"
        inst.acked_by = by
        inst.acked_at = now
        event = self._event(state, inst, "acknowledged", now, notify=not state.flapping)
        self._settle(state, now)
        return event

    def _alerts(self, states: Iterable[State]) -> list[Alert]:
        wanted = set(states)
        alerts = []
        for key in self._ids.values():
            state = self._states[key]
            inst = state.alert
            if inst is None or inst.state not in wanted:
                continue
            level = state.rule.levels[inst.level]
            value = state.measured[inst.level]
            alerts.append(
                Alert(
                    id=inst.id,
                    rule=state.rule.name,
                    device=state.device,
                    site=state.site,
                    field=state.field,
                    measurement=state.measurement,
                    severity=level.severity,
                    state=inst.state,
                    value=value if value is not None else inst.value,
                    threshold=inst.threshold,
                    started_at=inst.started_at,
                    since=inst.since,
                    flapping=state.flapping,
                    acknowledged_by=inst.acked_by,
                    labels=dict(state.rule.labels),
                    annotations=dict(inst.annotations),
                )
            )
        alerts.sort(key=lambda a: (a.started_at, a.id))
        return alerts

    def firing(self) -> list[Alert]:
        """Alerts firing or acknowledged, oldest first."""
        return self._alerts(("firing", "acknowledged"))

    def active(self) -> list[Alert]:
        """Alerts pending, firing or acknowledged, oldest first."""
        return self._alerts(("pending", "firing", "acknowledged"))

    def counts(self) -> dict[str, int]:
        """How many alerts are in each state (for an ``alerts by state`` gauge)."""
        counts = {"pending": 0, "firing": 0, "acknowledged": 0, "flapping": 0}
        for key in self._ids.values():
            state = self._states[key]
            if state.alert is not None:
                counts[state.alert.state] += 1
                counts["flapping"] += state.flapping
        return counts

    def state_count(self) -> int:
        """States kept (for a memory gauge)."""
        return len(self._states)

    # --- reload -------------------------------------------------------------------------

    def reload(self, ruleset: RuleSet) -> list[AlertEvent]:
        """Swap in new rules. State is kept for rules whose identity (``Rule.identity``:
        name, selector and condition shape) is unchanged and re-evaluated at once with the
        last values under the new thresholds; alerts of removed or changed rules end with
        one event each (``resolved``, or ``cancelled`` if only pending)."""
        now = self._now()
        events = self._run_due(now)
        new = ruleset.by_name()
        kept: dict[StateKey, _State] = {}
        for key, state in self._states.items():
            rule = new.get(state.rule.name)
            if rule is None or rule.identity != state.rule.identity:
                if state.alert is not None:
                    kind: Literal["resolved", "cancelled"] = (
                        "cancelled" if state.alert.state == "pending" else "resolved"
                    )
                    reason = "rule removed" if rule is None else "rule changed"
                    events.extend(self._end(state, now, kind, reason=reason))
                continue
            state.rule = rule
            kept[key] = state
        self._install(ruleset)
        self._states = kept
        self._rebuild_heap()
        for state in list(kept.values()):
            if state.rule.deadman is not None:
                state.measured[0] = now - state.last_seen
                if state.latched[0] is not None and state.rule.levels[0].cleared(
                    now - state.last_seen
                ):
                    state.latched[0] = None
            else:
                self._relatch(state, now)
            events.extend(self._transition(state, now))
            self._settle(state, now)
        return events

    def _rebuild_heap(self) -> None:
        self._heap = []
        for state in self._states.values():
            state.scheduled = _INF

    # --- snapshot and restore -------------------------------------------------------------

    def snapshot(self, *, essential: bool = False) -> dict[str, Any]:
        """Everything needed to carry on after a restart, as JSON-serialisable data.

        ``essential``: only the states of alerts that are open, pending or recently
        changed: what a transition changed, cheap enough to save after every one; restored
        over the last full snapshot (``recent`` of :meth:`restore`)."""
        now = self._now()
        states: Iterable[_State] = self._states.values()
        if essential:  # the touched states only: O(alerts), not O(fleet)
            hot, found = self._hot, []
            for key in list(hot):
                state = self._states.get(key)
                if state is None or not _essential(state, now):
                    hot.discard(key)
                else:
                    found.append(state)
            states = found
        return {
            "version": SNAPSHOT_VERSION,
            "at": now,
            "essential": essential,
            "states": [_dump_state(state) for state in states],
        }

    def snapshot_in_parts(
        self, size: int = 2000
    ) -> tuple[dict[str, Any], Iterator[list[dict[str, Any]]]]:
        """:meth:`snapshot` as a header and its states in parts of ``size``, for a caller
        that yields to other work between parts (each state is dumped whole; a state that
        changes meanwhile is dumped as it is then, which an essential snapshot taken after
        ``at`` covers)."""
        header = {"version": SNAPSHOT_VERSION, "at": self._now(), "essential": False}
        states = list(self._states.values())

        def parts() -> Iterator[list[dict[str, Any]]]:
            for start in range(0, len(states), size):
                yield [_dump_state(state) for state in states[start : start + size]]

        return header, parts()

    @classmethod
    def restore(
        cls,
        ruleset: RuleSet,
        snapshot: dict[str, Any],
        now: Callable[[], float] = time.time,
        *,
        recent: dict[str, Any] | None = None,
        **options: Any,
    ) -> Engine:
        """An engine that carries on from ``snapshot``: firing alerts stay firing without a
        new announcement, timers resume (one repeat at most for time spent down), and
        deadman grace counts from now. Alerts of rules removed or changed meanwhile end
        with one event each, returned by the first :meth:`tick` or :meth:`evaluate`.
        Raises SnapshotError for a snapshot it cannot read."""
        engine = cls(ruleset, now, **options)
        if not isinstance(snapshot, dict) or snapshot.get("version") != SNAPSHOT_VERSION:
            found = snapshot.get("version") if isinstance(snapshot, dict) else snapshot
            raise SnapshotError(
                f"rules state snapshot: expected version {SNAPSHOT_VERSION}, got {found!r:.40}"
            )
        at = engine._start
        try:
            for data in _overlay(snapshot, recent):
                rule = engine._by_name.get(data["rule"])
                if rule is None or rule.identity != data["identity"]:
                    engine._queued.extend(
                        _orphan_end(data, at, "rule removed" if rule is None else "rule changed")
                    )
                    continue
                state = _load_state(rule, data)
                engine._states[state.key] = state
                if state.alert is not None:
                    engine._ids[state.alert.id] = state.key
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SnapshotError(f"rules state snapshot is corrupt: {exc!r}") from exc
        for state in list(engine._states.values()):
            engine._settle(state, at)
        engine._hot.update(k for k, state in engine._states.items() if _essential(state, at))
        return engine


# --- snapshot format ----------------------------------------------------------------------


def _essential(state: _State, now: float) -> bool:
    """Whether a state carries more than its latest values: an open or pending alert,
    flapping, or a change recent enough to count towards flapping."""
    return (
        state.alert is not None
        or state.flapping
        or any(since is not None for since in state.latched)
        or bool(state.changes and state.changes[-1] >= now - state.rule.flapping.window)
    )


def _overlay(snapshot: dict[str, Any], recent: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The states of a full snapshot with a newer essential one laid over it: a state in
    ``recent`` replaces its older self; an alert open in the full snapshot but not in the
    newer one ended in between (its end was announced then): it is closed here too."""
    states: list[dict[str, Any]] = list(snapshot.get("states", []))
    if (
        not isinstance(recent, dict)
        or recent.get("version") != SNAPSHOT_VERSION
        or float(recent.get("at", 0.0)) < float(snapshot.get("at", 0.0))
    ):
        return states
    fresh = {(d["rule"], d["device"], d["field"]): d for d in recent.get("states", [])}
    merged = []
    for data in states:
        if (data["rule"], data["device"], data["field"]) in fresh:
            continue
        if data.get("alert") is not None or data.get("latched") or data.get("flapping"):
            ended: dict[str, Any] = {
                "alert": None,
                "latched": {},
                "measured": {},
                "flapping": False,
            }
            merged.append({**data, **ended})
        else:
            merged.append(data)
    return merged + list(fresh.values())


def _dump_instance(state: _State, inst: _Instance | None) -> dict[str, Any] | None:
    if inst is None:
        return None
    return {
        "id": inst.id,
        "started_at": inst.started_at,
        "state": inst.state,
        "severity": state.rule.levels[inst.level].severity,
        "since": inst.since,
        "last_notified": inst.last_notified,
        "acked_by": inst.acked_by,
        "acked_at": inst.acked_at,
        "value": inst.value,
        "threshold": inst.threshold,
        "annotations": dict(inst.annotations),
    }


def _dump_state(state: _State) -> dict[str, Any]:
    rule = state.rule
    return {
        "rule": rule.name,
        "identity": rule.identity,
        "device": state.device,
        "field": state.field,
        "measurement": state.measurement,
        "site": state.site,
        "tags": dict(state.tags),
        "labels": dict(rule.labels),
        "latched": {
            lvl.severity: since
            for lvl, since in zip(rule.levels, state.latched, strict=True)
            if since is not None
        },
        "measured": {
            lvl.severity: value
            for lvl, value in zip(rule.levels, state.measured, strict=True)
            if value is not None and math.isfinite(value)
        },
        "alert": _dump_instance(state, state.alert),
        "last": _dump_instance(state, state.last),
        "last_value": state.last_value,
        "last_ns": state.last_ns,
        "last_seen": state.last_seen,
        "samples": _pairs(state.samples) if state.samples is not None else None,
        "changes": list(state.changes or ()),
        "last_change": state.last_change if math.isfinite(state.last_change) else None,
        "flapping": state.flapping,
        "log": [list(entry) for entry in state.log or ()],
    }


def _pairs(samples: array[float]) -> list[list[float]]:
    return [[samples[index], samples[index + 1]] for index in range(0, len(samples), 2)]


def _load_instance(rule: Rule, data: dict[str, Any] | None) -> _Instance | None:
    if data is None:
        return None
    severities = [lvl.severity for lvl in rule.levels]
    state = data["state"]
    if state not in ("pending", "firing", "acknowledged", "resolved"):
        raise ValueError(f"unknown alert state {state!r}")
    return _Instance(
        id=str(data["id"]),
        started_at=float(data["started_at"]),
        state=state,
        level=severities.index(data["severity"]),
        since=float(data["since"]),
        last_notified=data.get("last_notified"),
        acked_by=data.get("acked_by"),
        acked_at=data.get("acked_at"),
        value=data.get("value"),
        threshold=data.get("threshold"),
        annotations=dict(data.get("annotations") or {}),
    )


def _load_state(rule: Rule, data: dict[str, Any]) -> _State:
    severities = [lvl.severity for lvl in rule.levels]
    latched: list[float | None] = [None] * len(severities)
    measured: list[float | None] = [None] * len(severities)
    for severity, since in data.get("latched", {}).items():
        latched[severities.index(severity)] = float(since)
    for severity, value in data.get("measured", {}).items():
        measured[severities.index(severity)] = float(value)
    state = _State(
        rule=rule,
        device=str(data["device"]),
        field=str(data["field"]),
        measurement=str(data["measurement"]),
        site=str(data.get("site", "")),
        tags=dict(data.get("tags") or {}),
        latched=latched,
        measured=measured,
        alert=_load_instance(rule, data.get("alert")),
        last=_load_instance(rule, data.get("last")),
        last_value=data.get("last_value"),
        last_ns=int(data.get("last_ns", -1)),
        last_seen=float(data["last_seen"]),
        flapping=bool(data.get("flapping", False)),
    )
    if rule.max_window:
        state.samples = array("d", [float(x) for t, v in data.get("samples") or [] for x in (t, v)])
    if data.get("changes"):
        state.changes = deque(float(t) for t in data["changes"])
    last_change = data.get("last_change")
    state.last_change = float(last_change) if last_change is not None else -_INF
    if data.get("log"):
        state.log = deque((tuple(entry) for entry in data["log"]), maxlen=_LOG_SIZE)
    return state


def _orphan_end(data: dict[str, Any], now: float, reason: str) -> list[AlertEvent]:
    """The one closing event of an alert whose rule is gone (from its snapshot alone)."""
    inst = data.get("alert")
    if not inst or inst.get("state") not in ("pending", "firing", "acknowledged"):
        return []
    kind: Kind = "cancelled" if inst["state"] == "pending" else "resolved"
    return [
        AlertEvent(
            id=str(inst["id"]),
            rule=str(data["rule"]),
            device=str(data["device"]),
            site=str(data.get("site", "")),
            field=str(data["field"]),
            measurement=str(data["measurement"]),
            severity=str(inst["severity"]),
            state="resolved",
            kind=kind,
            value=inst.get("value"),
            threshold=inst.get("threshold"),
            started_at=float(inst["started_at"]),
            at=now,
            labels=dict(data.get("labels") or {}),
            annotations=dict(inst.get("annotations") or {}),
            flapping=bool(data.get("flapping", False)),
            notify=kind == "resolved",
            reason=reason,
            acknowledged_by=inst.get("acked_by"),
            tags=dict(data.get("tags") or {}),
        )
    ]
