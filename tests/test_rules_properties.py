"""Properties of the alert state machine over random readings, time, acks, restarts, reloads.

Whatever happens: an alert resolves only after it fired, fires at most once, one (rule,
device, field) has at most one open alert, the event stream agrees with ``firing()`` and
``active()``, a restart announces nothing, and reloading the same rules changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import event as note
from hypothesis import strategies as st

from ingestd.model import Reading
from ingestd.rules import AlertEvent, Engine, RuleSet, load_rules
from ingestd.rules.engine import _essential

T0 = 1_700_000_000.0

RULES = """
rules:
  - name: levels
    select: {measurement: m, field: v}
    for: 2m
    levels:
      - {severity: warning, above: 6.8, clear: {below: 6.6}}
      - {severity: critical, above: 7.2, clear: {below: 7.0}, for: 1m}
    repeat_interval: 10m
    flapping: {max_changes: 3, window: 30m, stable: 5m}
  - name: range
    select: {measurement: m, field: v}
    outside: [5.5, 7.0]
    flapping: {max_changes: 4, window: 1h, stable: 10m}
  - name: rising
    select: {measurement: m, field: v}
    rate: {above: 0.5, window: 5m}
    clear: {below: 0.1}
  - name: silent
    select: {measurement: m}
    deadman: 5m
    per: device
    grace: 3m
    repeat_interval: 15m
"""

readings = st.tuples(
    st.just("read"),
    st.sampled_from(["a", "b"]),
    # Values on and around every threshold, and big jumps, so each condition gets crossed.
    st.sampled_from([5.0, 5.4, 5.6, 6.0, 6.5, 6.7, 6.9, 7.0, 7.1, 7.3, 7.6, 8.0]),
    st.sampled_from([0, 10, 30, 60, 90, 120, 200]),
)
ramps = st.tuples(  # a run of readings on a slope, so rates cross their thresholds
    st.just("ramp"),
    st.sampled_from(["a", "b"]),
    st.sampled_from([5.5, 6.5, 7.5]),
    st.sampled_from([-1.5, -0.3, 0.0, 0.3, 0.8, 1.5]),  # per minute
    st.integers(3, 10),
)
ticks = st.tuples(st.just("tick"), st.integers(1, 1500))
acks = st.tuples(st.just("ack"), st.integers(0, 3))
restarts = st.just(("restart",))
reloads = st.just(("reload",))
steps = st.lists(st.one_of(readings, readings, ramps, ticks, acks, restarts, reloads), max_size=80)


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(RULES, encoding="utf-8")
    return load_rules(path)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Ledger:
    """What the event stream says, checked event by event."""

    kinds: dict[str, list[str]] = field(default_factory=dict)
    state: dict[str, str] = field(default_factory=dict)
    open_by_key: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def record(self, event: AlertEvent) -> None:
        history = self.kinds.setdefault(event.id, [])
        fired = "firing" in history
        ended = any(k in ("resolved", "cancelled") for k in history)
        key = (event.rule, event.device, event.field)
        if ended:
            assert event.kind == "flapping", f"{event.kind} after the end of {event.id}"
        elif not history:
            assert event.kind in ("pending", "firing"), f"{event.id} starts with {event.kind}"
        if event.kind == "firing":
            assert not fired, f"{event.id} fired twice"
            assert key not in self.open_by_key, f"two open alerts for {key}"
            self.open_by_key[key] = event.id
        if event.kind == "resolved":
            assert fired, f"{event.id} resolved without firing"
            assert self.open_by_key.pop(key) == event.id
        if event.kind == "cancelled":
            assert not fired, f"{event.id} cancelled after firing"
        if event.kind in ("escalated", "deescalated", "repeat", "acknowledged"):
            assert fired and not ended, f"{event.kind} of {event.id} while not firing"
        if event.kind == "repeat":
            assert self.state[event.id] == "firing", "an acknowledged alert was repeated"
        if event.flapping and event.kind != "flapping":
            assert not event.notify, "a flapping alert notified"
        assert json.loads(json.dumps(event.to_dict()))["id"] == event.id
        history.append(event.kind)
        if event.state == "resolved":
            self.state.pop(event.id, None)
        else:
            self.state[event.id] = event.state

    def agrees_with(self, engine: Engine) -> None:
        firing = {i for i, s in self.state.items() if s in ("firing", "acknowledged")}
        assert firing == {a.id for a in engine.firing()}
        assert set(self.state) == {a.id for a in engine.active()}
        for alert in engine.active():
            assert self.state[alert.id] == alert.state


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(script=steps)
def test_state_machine_invariants(ruleset: RuleSet, script: list[tuple[object, ...]]) -> None:
    clock = Clock()
    engine = Engine(ruleset, clock)
    older: dict[str, Any] | None = None
    ledger = Ledger()
    for step in script:
        events: list[AlertEvent] = []
        if step[0] == "read":
            _, device, value, dt = step
            assert isinstance(dt, int) and isinstance(device, str)
            assert isinstance(value, float)
            clock.now += dt
            reading = Reading("m", device, {"site": "gh"}, {"v": value}, int(clock.now * 1e9))
            events = engine.evaluate(reading)
        elif step[0] == "ramp":
            _, device, start, slope, count = step
            assert isinstance(device, str) and isinstance(count, int)
            assert isinstance(start, float) and isinstance(slope, float)
            for i in range(count):
                clock.now += 60
                value = start + slope * i
                reading = Reading("m", device, {"site": "gh"}, {"v": value}, int(clock.now * 1e9))
                for event in engine.evaluate(reading):
                    ledger.record(event)
                    note(f"{event.rule}:{event.kind}")
                ledger.agrees_with(engine)
        elif step[0] == "tick":
            assert isinstance(step[1], int)
            clock.now += step[1]
            events = engine.tick()
            older = json.loads(json.dumps(engine.snapshot()))  # a full save, taken now
        elif step[0] == "ack":
            assert isinstance(step[1], int)
            firing = [a for a in engine.firing() if a.state == "firing"]
            if firing:
                ack = engine.acknowledge(firing[step[1] % len(firing)].id, "ops")
                assert ack is not None and ack.state == "acknowledged"
                events = [ack]
        elif step[0] == "restart":
            events = engine.tick()  # what was due before going down
            for event in events:
                ledger.record(event)
            # As the daemon saves: a full snapshot from a while ago, the essential one now.
            recent = json.loads(json.dumps(engine.snapshot(essential=True)))
            full = older if older is not None else {**recent, "at": 0.0, "states": []}
            before = sorted((a.id, a.state) for a in engine.firing())
            engine = Engine.restore(ruleset, full, clock, recent=recent)
            events = engine.tick()
            assert events == [], "a restart announced something"
            assert sorted((a.id, a.state) for a in engine.firing()) == before
        else:
            events = engine.reload(ruleset)
            assert events == [], "reloading the same rules changed something"
        for event in events:
            ledger.record(event)
            note(f"{event.rule}:{event.kind}")
        ledger.agrees_with(engine)
        touched = {
            (d["rule"], d["device"], d["field"]) for d in engine.snapshot(essential=True)["states"]
        }
        every = {k for k, state in engine._states.items() if _essential(state, clock.now)}
        assert touched == every, "the essential snapshot missed a state"
    target(float(sum(len(k) for k in ledger.kinds.values())), label="events")
