"""The rules engine on an injected clock: conditions, hysteresis, for, levels, deadman,
flapping, repeat, acknowledgement, snapshot/restore, reload, and evaluation cost."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from ingestd.model import Reading
from ingestd.rules import AlertEvent, Engine, RuleSet, SnapshotError, load_rules
from ingestd.rules.engine import _essential
from ingestd.rules.model import topic_level

T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rules(tmp_path: Path, text: str, name: str = "rules.yaml") -> RuleSet:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_rules(path)


class Farm:
    """An engine, its clock, and helpers to send readings and let time pass."""

    def __init__(self, ruleset: RuleSet, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.engine = Engine(ruleset, self.clock)
        self.events: list[AlertEvent] = []

    def send(
        self,
        value: float | bool | str,
        *,
        at: float | None = None,
        device: str = "esp32-1",
        field: str = "ph",
        site: str = "gh1",
        measurement: str = "reservoir",
        tags: dict[str, str] | None = None,
    ) -> list[AlertEvent]:
        """A reading at offset ``at`` (seconds from T0; default: now), timers before it run."""
        if at is not None:
            self.run_until(at)
        all_tags = {"site": site, **(tags or {})}
        reading = Reading(measurement, device, all_tags, {field: value}, int(self.clock.now * 1e9))
        events = self.engine.evaluate(reading)
        self.events.extend(events)
        return events

    def run_until(self, offset: float) -> list[AlertEvent]:
        """Let time pass to T0 + offset, ticking at each deadline on the way."""
        target = T0 + offset
        events: list[AlertEvent] = []
        while (deadline := self.engine.next_deadline()) is not None and deadline <= target:
            self.clock.now = max(self.clock.now, deadline)
            events.extend(self.engine.tick())
            if self.engine.next_deadline() == deadline:
                break
        self.clock.now = target
        events.extend(self.engine.tick())
        self.events.extend(events)
        return events


def kinds(events: list[AlertEvent]) -> list[str]:
    return [e.kind for e in events]


# --- conditions ---------------------------------------------------------------------------


def test_above_fires_when_strictly_above_and_resolves_when_not(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
            """,
        )
    )
    assert farm.send(7.0, at=0) == []
    [fired] = farm.send(7.1, at=60)
    assert (fired.kind, fired.state, fired.severity) == ("firing", "firing", "warning")
    assert (fired.value, fired.threshold, fired.notify) == (7.1, 7.0, True)
    assert fired.started_at == T0 + 60
    assert farm.send(7.2, at=120) == []
    [resolved] = farm.send(7.0, at=180)  # default clear: no longer above
    assert (resolved.kind, resolved.state, resolved.id) == ("resolved", "resolved", fired.id)
    assert farm.engine.firing() == []


def test_below_and_outside_name_the_threshold_crossed(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: level_low
                select: {measurement: reservoir, field: level}
                below: 25
              - name: ph_range
                select: {measurement: reservoir, field: ph}
                outside: [5.5, 6.8]
            """,
        )
    )
    [low] = farm.send(20, at=0, field="level")
    assert (low.rule, low.kind, low.threshold) == ("level_low", "firing", 25)
    assert kinds(farm.send(25, at=60, field="level")) == ["resolved"]
    [high] = farm.send(6.9, at=120)
    assert (high.rule, high.threshold) == ("ph_range", 6.8)
    assert kinds(farm.send(6.0, at=180)) == ["resolved"]
    [under] = farm.send(5.4, at=240)
    assert under.threshold == 5.5


def test_rate_is_change_per_minute_over_the_window(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: warming_fast
                select: {measurement: reservoir, field: water_temp}
                rate: {above: 0.5, window: 10m}
            """,
        )
    )
    # +0.2 per minute: below the threshold however long it lasts.
    for minute in range(15):
        assert farm.send(20 + 0.2 * minute, at=minute * 60, field="water_temp") == []
    # Then +1 per minute: the rate over the last 10 minutes crosses 0.5 after a while.
    fired: list[AlertEvent] = []
    minute = 15
    base = 20 + 0.2 * 14
    while not fired and minute < 40:
        fired = farm.send(base + (minute - 14), at=minute * 60, field="water_temp")
        minute += 1
    [event] = fired
    assert event.kind == "firing"
    assert event.value is not None and event.value > 0.5
    assert event.threshold == 0.5
    # Flat again: the rate falls back to 0 within a window and the alert resolves.
    flat = base + (minute - 15)
    resolved = []
    for m in range(minute, minute + 12):
        resolved += farm.send(flat, at=m * 60, field="water_temp")
    assert kinds(resolved) == ["resolved"]


def test_rate_is_unknown_until_samples_span_half_the_window(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: draining
                select: {measurement: reservoir, field: level}
                rate: {below: -1, window: 10m}
            """,
        )
    )
    # A steep fall, but over 4 minutes only: no verdict yet.
    for minute in range(5):
        assert farm.send(80 - 5 * minute, at=minute * 60, field="level") == []
    [event] = farm.send(55, at=300, field="level")
    assert event.kind == "firing"
    assert event.value == pytest.approx(-5.0)


def test_booleans_count_as_0_and_1_and_strings_are_ignored(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: float_switch
                select: {measurement: reservoir, field: low_water}
                above: 0.5
            """,
        )
    )
    assert farm.send("dry", at=0, field="low_water") == []
    assert kinds(farm.send(True, at=60, field="low_water")) == ["firing"]
    assert kinds(farm.send(False, at=120, field="low_water")) == ["resolved"]


def test_selectors_match_globs_tags_and_negation(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: temps
                select:
                  measurement: "{reservoir,air}"
                  field: "*_temp"
                  device: "esp32-*"
                  site: "!lab-*"
                  tags: {zone: "[ab]"}
                above: 30
            """,
        )
    )
    hot = 31.0
    assert farm.send(hot, at=0, field="water_temp", tags={"zone": "c"}) == []
    assert farm.send(hot, at=1, field="water_temp", site="lab-1", tags={"zone": "a"}) == []
    assert farm.send(hot, at=2, field="water_temp", device="rpi-1", tags={"zone": "a"}) == []
    assert farm.send(hot, at=3, field="humidity", tags={"zone": "a"}) == []
    assert farm.send(hot, at=4, field="water_temp") == []  # no zone tag: matched as ""
    [event] = farm.send(hot, at=5, field="air_temp", measurement="air", tags={"zone": "b"})
    assert (event.field, event.measurement, event.tags["zone"]) == ("air_temp", "air", "b")


# --- hysteresis, for, levels ----------------------------------------------------------------


def test_hysteresis_values_around_one_threshold_fire_once(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                clear: {below: 6.8}
            """,
        )
    )
    for minute in range(200):
        farm.send(7.05 if minute % 2 else 6.95, at=minute * 60)
    assert kinds(farm.events) == ["firing"]
    assert not any(e.flapping for e in farm.events)
    assert kinds(farm.send(6.79, at=200 * 60)) == ["resolved"]


def test_for_keeps_an_alert_pending_until_its_deadline(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                for: 5m
            """,
        )
    )
    [pending] = farm.send(7.2, at=0)
    assert (pending.kind, pending.state, pending.notify) == ("pending", "pending", False)
    assert farm.engine.next_deadline() == T0 + 300
    assert farm.engine.firing() == []
    assert [a.state for a in farm.engine.active()] == ["pending"]
    assert farm.run_until(299) == []
    [fired] = farm.run_until(300)
    assert (fired.kind, fired.id, fired.at) == ("firing", pending.id, T0 + 300)
    assert [a.id for a in farm.engine.firing()] == [pending.id]


def test_for_cancelled_when_the_value_clears_first(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                for: 5m
            """,
        )
    )
    [pending] = farm.send(7.2, at=0)
    [cancelled] = farm.send(6.5, at=120)
    assert (cancelled.kind, cancelled.state, cancelled.notify) == ("cancelled", "resolved", False)
    assert cancelled.id == pending.id
    assert farm.run_until(3600) == []


def test_levels_escalate_and_deescalate_one_alert(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                levels:
                  - {severity: warning, above: 6.8, clear: {below: 6.7}}
                  - {severity: critical, above: 7.2, clear: {below: 7.1}, for: 2m}
            """,
        )
    )
    [fired] = farm.send(6.9, at=0)
    assert (fired.kind, fired.severity) == ("firing", "warning")
    assert farm.send(7.3, at=60) == []  # critical latched, pending its `for`
    [escalated] = farm.run_until(180)
    assert (escalated.kind, escalated.severity, escalated.threshold) == (
        "escalated",
        "critical",
        7.2,
    )
    assert escalated.id == fired.id
    assert farm.send(7.15, at=240) == []  # inside the critical hysteresis band
    [down] = farm.send(6.9, at=300)
    assert (down.kind, down.severity, down.id) == ("deescalated", "warning", fired.id)
    [resolved] = farm.send(6.6, at=360)
    assert (resolved.kind, resolved.id) == ("resolved", fired.id)


def test_a_jump_straight_to_the_top_level_fires_once_at_that_level(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                levels:
                  - {severity: warning, above: 6.8}
                  - {severity: critical, above: 7.2}
            """,
        )
    )
    [fired] = farm.send(7.5, at=0)
    assert (fired.kind, fired.severity) == ("firing", "critical")
    [down] = farm.send(7.0, at=60)
    assert (down.kind, down.severity) == ("deescalated", "warning")


# --- deadman ------------------------------------------------------------------------------


DEADMAN = """
rules:
  - name: silent
    select: {measurement: reservoir}
    deadman: 10m
    per: device
    grace: 30m
    severity: critical
"""


def test_deadman_waits_for_the_startup_grace_then_fires_and_resolves(tmp_path: Path) -> None:
    farm = Farm(rules(tmp_path, DEADMAN))
    farm.send(6.0, at=60)
    # Silent since 1m: 10m later is 11m, but the grace after startup runs to 30m.
    assert farm.run_until(29 * 60) == []
    [fired] = farm.run_until(30 * 60)
    assert (fired.rule, fired.kind, fired.field, fired.severity) == (
        "silent",
        "firing",
        "*",
        "critical",
    )
    assert fired.value == pytest.approx(29 * 60)  # seconds of silence
    [resolved] = farm.send(6.0, at=31 * 60)
    assert (resolved.kind, resolved.id) == ("resolved", fired.id)
    # After the grace, plain `deadman` applies.
    assert farm.run_until(40 * 60) == []
    [again] = farm.run_until(41 * 60)
    assert again.kind == "firing" and again.id != fired.id


def test_deadman_never_reports_a_device_never_seen(tmp_path: Path) -> None:
    farm = Farm(rules(tmp_path, DEADMAN))
    assert farm.run_until(86400) == []
    assert farm.engine.state_count() == 0


def test_deadman_per_field_tracks_each_field(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: probe_silent
                select: {measurement: reservoir, field: "{ph,ec}"}
                deadman: 5m
            """,
        )
    )
    farm.send(6.0, at=0, field="ph")
    for minute in range(0, 20):
        farm.send(1.8, at=minute * 60 + 1, field="ec")
    [fired] = [e for e in farm.events if e.kind == "firing"]
    assert (fired.field, fired.at) == ("ph", T0 + 300)


def test_deadman_state_is_forgotten_after_the_bound(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: silent
                select: {measurement: reservoir}
                deadman: 10m
                per: device
                forget: 1d
            """,
        )
    )
    for device in ("a", "b", "c"):
        farm.send(6.0, at=0, device=device)
    assert farm.engine.state_count() == 3
    assert len([e for e in farm.run_until(700) if e.kind == "firing"]) == 3
    expired = farm.run_until(86400 + 1)
    assert [(e.kind, e.reason) for e in expired] == [("resolved", "expired")] * 3
    assert farm.engine.state_count() == 0
    assert farm.engine.next_deadline() is None


def test_a_restored_deadman_waits_for_the_grace_after_restart(tmp_path: Path) -> None:
    ruleset = rules(tmp_path, DEADMAN)
    farm = Farm(ruleset)
    farm.send(6.0, at=60)
    snapshot = json.loads(json.dumps(farm.engine.snapshot()))
    # Down for 2 hours: the device may have been silent all along, or just the daemon.
    clock = Clock(T0 + 2 * 3600)
    restored = Farm.__new__(Farm)
    restored.clock, restored.events = clock, []
    restored.engine = Engine.restore(ruleset, snapshot, clock)
    assert restored.run_until(2 * 3600 + 29 * 60) == []
    [fired] = restored.run_until(2 * 3600 + 30 * 60)
    assert fired.kind == "firing"


# --- flapping, repeat, acknowledge ------------------------------------------------------------


def test_flapping_is_announced_once_suppresses_notifications_and_ends(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                flapping: {max_changes: 4, window: 1h, stable: 10m}
            """,
        )
    )
    for minute in range(20):
        farm.send(7.1 if minute % 2 == 0 else 6.9, at=minute * 60)
    transitions = [e for e in farm.events if e.kind != "flapping"]
    notices = [e for e in farm.events if e.kind == "flapping"]
    assert kinds(transitions[:4]) == ["firing", "resolved", "firing", "resolved"]
    assert all(e.notify and not e.flapping for e in transitions[:4])
    # The fifth change makes it flap: itself suppressed, followed by one notice.
    assert transitions[4].flapping and not transitions[4].notify
    assert len(notices) == 1
    assert (notices[0].flapping, notices[0].notify) == (True, True)
    assert farm.events.index(notices[0]) == farm.events.index(transitions[4]) + 1
    assert all(e.flapping and not e.notify for e in transitions[4:])
    # Stable (firing) for 10 minutes: flapping ends with one notice saying where it is.
    farm.send(7.1, at=20 * 60)
    [end] = farm.run_until(31 * 60)
    assert (end.kind, end.flapping, end.notify, end.state) == ("flapping", False, True, "firing")
    [resolved] = farm.send(6.9, at=32 * 60)
    assert (resolved.kind, resolved.notify, resolved.flapping) == ("resolved", True, False)


def test_repeat_interval_reannounces_until_acknowledged(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                repeat_interval: 1h
            """,
        )
    )
    [fired] = farm.send(7.5, at=0)
    assert farm.engine.next_deadline() == T0 + 3600
    [repeat] = farm.run_until(3600)
    assert (repeat.kind, repeat.state, repeat.notify, repeat.id) == (
        "repeat",
        "firing",
        True,
        fired.id,
    )
    assert kinds(farm.run_until(2 * 3600)) == ["repeat"]
    ack = farm.engine.acknowledge(fired.id, "alice")
    assert ack is not None
    assert (ack.kind, ack.state, ack.acknowledged_by) == ("acknowledged", "acknowledged", "alice")
    assert farm.run_until(10 * 3600) == []


def test_acknowledge_only_a_firing_alert_once(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                levels:
                  - {severity: warning, above: 6.8}
                  - {severity: critical, above: 7.2}
                for: 1m
            """,
        )
    )
    assert farm.engine.acknowledge("nope", "alice") is None
    [pending] = farm.send(7.0, at=0)
    assert farm.engine.acknowledge(pending.id, "alice") is None  # pending: nothing to ack
    farm.run_until(60)
    event = farm.engine.acknowledge(pending.id, "alice")
    assert event is not None and event.kind == "acknowledged"
    assert farm.engine.acknowledge(pending.id, "bob") is None
    [alert] = farm.engine.firing()
    assert (alert.state, alert.acknowledged_by) == ("acknowledged", "alice")
    # A worse level needs attention again: the acknowledgement is dropped.
    farm.send(7.5, at=120)
    [escalated] = farm.run_until(180)
    assert (escalated.kind, escalated.state, escalated.acknowledged_by) == (
        "escalated",
        "firing",
        None,
    )


# --- restart and reload -------------------------------------------------------------------


def test_restart_mid_alert_neither_refires_nor_forgets(tmp_path: Path) -> None:
    ruleset = rules(
        tmp_path,
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            clear: {below: 6.8}
            repeat_interval: 4h
            annotations:
              summary: "pH {{ value }} on {{ device }} since {{ since }}"
        """,
    )
    farm = Farm(ruleset)
    [fired] = farm.send(7.3, at=0)
    snapshot = json.loads(json.dumps(farm.engine.snapshot()))  # survives JSON

    clock = Clock(T0 + 600)
    engine = Engine.restore(ruleset, snapshot, clock)
    assert engine.tick() == []
    [alert] = engine.firing()
    assert (alert.id, alert.state, alert.started_at) == (fired.id, "firing", fired.started_at)
    assert alert.annotations["summary"].startswith("pH 7.3 on esp32-1")
    still = Reading("reservoir", "esp32-1", {"site": "gh1"}, {"ph": 7.1}, int(clock.now * 1e9))
    assert engine.evaluate(still) == []
    clock.now += 60
    clear = Reading("reservoir", "esp32-1", {"site": "gh1"}, {"ph": 6.5}, int(clock.now * 1e9))
    [resolved] = engine.evaluate(clear)
    assert (resolved.kind, resolved.id) == ("resolved", fired.id)
    clock.now += 60
    again = Reading("reservoir", "esp32-1", {"site": "gh1"}, {"ph": 6.4}, int(clock.now * 1e9))
    assert engine.evaluate(again) == []
    assert engine.tick() == []
    assert engine.firing() == []


def test_restart_resumes_timers_pending_and_repeat(tmp_path: Path) -> None:
    ruleset = rules(
        tmp_path,
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            for: 5m
            repeat_interval: 1h
        """,
    )
    farm = Farm(ruleset)
    [pending] = farm.send(7.3, at=0)
    snapshot = farm.engine.snapshot()
    # Down for 3 hours: the pending alert fires on the first tick, with at most one repeat
    # owed for the time spent down (the firing itself counts as the announcement).
    clock = Clock(T0 + 3 * 3600)
    engine = Engine.restore(ruleset, json.loads(json.dumps(snapshot)), clock)
    assert engine.next_deadline() == T0 + 300
    events = engine.tick()
    assert kinds(events) == ["firing"]
    assert events[0].id == pending.id
    assert engine.tick() == []


def test_restore_ends_alerts_of_removed_rules_once(tmp_path: Path) -> None:
    ruleset = rules(
        tmp_path,
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            labels: {team: growers}
        """,
    )
    farm = Farm(ruleset)
    [fired] = farm.send(7.3, at=0)
    snapshot = json.loads(json.dumps(farm.engine.snapshot()))
    engine = Engine.restore(RuleSet(), snapshot, Clock(T0 + 60))
    [ended] = engine.tick()
    assert (ended.kind, ended.id, ended.reason, ended.labels) == (
        "resolved",
        fired.id,
        "rule removed",
        {"team": "growers"},
    )
    assert engine.tick() == []


def test_restore_refuses_a_snapshot_of_another_version(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="version"):
        Engine.restore(RuleSet(), {"version": 99, "states": []}, Clock())
    with pytest.raises(SnapshotError, match="corrupt"):
        Engine.restore(
            rules(tmp_path, DEADMAN), {"version": 1, "states": [{"rule": "silent"}]}, Clock()
        )


RELOAD_BEFORE = """
rules:
  - name: ph_high
    select: {measurement: reservoir, field: ph}
    above: 7.0
  - name: ec_high
    select: {measurement: reservoir, field: ec}
    above: 2.5
  - name: temp_high
    select: {measurement: reservoir, field: water_temp}
    above: 24
"""


def test_reload_keeps_unrelated_state_and_resolves_removed_or_changed(tmp_path: Path) -> None:
    farm = Farm(rules(tmp_path, RELOAD_BEFORE))
    [ph] = farm.send(7.3, at=0)
    [ec] = farm.send(2.8, at=1, field="ec")
    [temp] = farm.send(25, at=2, field="water_temp")
    changed = rules(
        tmp_path,
        """
        rules:
          - name: ph_high                 # same identity: labels and annotations are not
            select: {measurement: reservoir, field: ph}
            above: 7.0
            labels: {team: growers}
            annotations: {summary: "pH {{ value }}"}
          - name: temp_high               # selector changed: a new rule
            select: {measurement: reservoir, field: water_temp, site: "gh*"}
            above: 24
          - name: co2_high                # new
            select: {field: co2}
            above: 1500
        """,
        name="changed.yaml",
    )
    farm.clock.now = T0 + 60
    events = farm.engine.reload(changed)
    assert sorted((e.rule, e.kind, e.reason, e.id) for e in events) == [
        ("ec_high", "resolved", "rule removed", ec.id),
        ("temp_high", "resolved", "rule changed", temp.id),
    ]
    [alert] = farm.engine.firing()
    assert (alert.id, alert.rule) == (ph.id, "ph_high")
    assert farm.send(7.4, at=120) == []  # still firing, not re-announced
    [resolved] = farm.send(6.5, at=180)
    assert (resolved.id, resolved.labels, resolved.annotations) == (
        ph.id,
        {"team": "growers"},
        {"summary": "pH 6.5"},
    )
    # The changed rule starts afresh.
    [fresh] = farm.send(25, at=240, field="water_temp")
    assert fresh.kind == "firing" and fresh.id != temp.id


def test_reload_with_a_tuned_threshold_reevaluates_the_last_value(tmp_path: Path) -> None:
    farm = Farm(rules(tmp_path, RELOAD_BEFORE))
    [ph] = farm.send(7.3, at=0)
    [temp] = farm.send(25, at=1, field="water_temp")
    tuned = rules(tmp_path, RELOAD_BEFORE.replace("above: 7.0", "above: 7.5"), "tuned.yaml")
    farm.clock.now = T0 + 60
    [resolved] = farm.engine.reload(tuned)
    assert (resolved.rule, resolved.kind, resolved.reason, resolved.id) == (
        "ph_high",
        "resolved",
        None,
        ph.id,
    )
    assert [a.id for a in farm.engine.firing()] == [temp.id]


# --- bookkeeping, output --------------------------------------------------------------------


def test_a_reading_not_newer_than_the_last_is_ignored(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
            """,
        )
    )
    farm.send(7.3, at=60)
    replay = Reading("reservoir", "esp32-1", {"site": "gh1"}, {"ph": 6.0}, int((T0 + 30) * 1e9))
    assert farm.engine.evaluate(replay) == []
    assert farm.engine.stats.stale == 1
    assert len(farm.engine.firing()) == 1


def test_quiet_readings_keep_no_state(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                flapping: {max_changes: 0}
            """,
        )
    )
    for device in range(1000):
        farm.send(6.0, device=f"esp32-{device}")
    assert farm.engine.state_count() == 0
    farm.send(7.5, at=1)
    farm.send(6.0, at=2)
    assert farm.engine.state_count() == 0  # resolved, nothing to remember
    assert farm.engine.next_deadline() is None


def test_template_failing_on_real_values_does_not_stop_the_engine(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                annotations:
                  summary: "{{ 1 / (value - 7.5) }}"
            """,
        )
    )
    [event] = farm.send(7.5, at=0)
    assert event.annotations["summary"].startswith("<template error:")


def test_events_are_json_and_topics_are_safe(tmp_path: Path) -> None:
    farm = Farm(
        rules(
            tmp_path,
            """
            rules:
              - name: ph_high
                select: {measurement: reservoir, field: ph}
                above: 7.0
                labels: {team: growers}
            """,
        )
    )
    [event] = farm.send(7.3, at=0, device="probe/1+#", site="")
    data = json.loads(json.dumps(event.to_dict()))
    assert data["kind"] == "firing" and data["labels"] == {"team": "growers"}
    assert event.topic() == "alerts/warning/_/probe%2F1%2B%23/ph_high"
    assert event.topic_parts() == ("alerts", "warning", "_", "probe%2F1%2B%23", "ph_high")
    assert event.state_topic() == "alerts/state/_/probe%2F1%2B%23/ph_high/ph"
    assert topic_level("50%/x") == "50%25%2Fx"
    assert json.loads(json.dumps([a.to_dict() for a in farm.engine.firing()]))[0]["id"] == event.id


def test_evaluation_cost_does_not_grow_with_unrelated_rules(tmp_path: Path) -> None:
    target = """
      - name: ph_high
        select: {measurement: reservoir, field: ph}
        above: 7.0
    """
    selectors = [
        "{measurement: air, field: ph}",  # other measurement
        "{measurement: reservoir, field: ec}",  # other field
        "{measurement: reservoir, field: ph, device: esp32-{i}}",  # same field, other device
        "{measurement: reservoir, field: ph, site: site-{i}}",  # other site
        "{measurement: reservoir, field: ph, site: 'site-{i}*'}",  # other sites, by glob
        "{measurement: 'soil*', field: '*_temp'}",  # globs that do not match
    ]
    unrelated = "".join(
        f"""
      - name: other_{i}
        select: {selectors[i % len(selectors)].replace("{i}", str(i))}
        above: 7.0
    """
        for i in range(3000)
    )
    small = Farm(rules(tmp_path, "rules:" + target, "small.yaml"))
    big = Farm(rules(tmp_path, "rules:" + target + unrelated, "big.yaml"))
    assert len(big.engine.ruleset) == 3001
    for farm in (small, big):
        for minute in range(50):
            farm.send(6.0 + minute * 0.05, at=minute * 60, device="esp32-x", site="gh1")
    assert kinds(small.events) == kinds(big.events) == ["firing"]
    assert big.engine.stats.rules_examined == small.engine.stats.rules_examined == 50
    assert big.engine.stats.route_lookups == small.engine.stats.route_lookups == 50
    # The index is built once per (measurement, field), and once per site value seen.
    assert small.engine.stats.routes_built == 1
    assert big.engine.stats.routes_built == 2


def test_timers_are_not_polled(tmp_path: Path) -> None:
    farm = Farm(rules(tmp_path, DEADMAN))
    for device in range(500):
        farm.send(6.0, at=0, device=f"esp32-{device}")
    timers = farm.engine.stats.timers
    for second in range(1, 100):
        farm.clock.now = T0 + second
        assert farm.engine.tick() == []
    assert farm.engine.stats.timers == timers  # nothing due, nothing visited


def test_an_essential_snapshot_laid_over_an_older_full_one(tmp_path: Path) -> None:
    """Saved at every transition: only the alerts that matter, laid over the last full
    snapshot at restore; an alert that ended in between stays ended."""
    ruleset = rules(
        tmp_path,
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
        """,
    )
    farm = Farm(ruleset)
    farm.send(7.5, at=0, device="a")
    farm.send(7.5, at=0, device="b")
    full = farm.engine.snapshot()
    farm.send(6.5, at=10, device="b")  # b ends
    farm.send(7.5, at=10, device="c")  # c starts
    recent = farm.engine.snapshot(essential=True)
    assert {s["device"] for s in recent["states"]} == {"a", "b", "c"}  # b: a recent change
    every = [s for s in farm.engine._states.values() if _essential(s, farm.clock.now)]
    assert {s.device for s in every} == {"a", "b", "c"}  # the touched set misses none

    restored = Engine.restore(ruleset, full, farm.clock, recent=recent)
    assert sorted(a.device for a in restored.firing()) == ["a", "c"]
    assert restored.tick() == []  # nothing announced again, nothing ended twice

    # an essential snapshot older than the full one is ignored
    farm.send(6.5, at=20, device="c")
    newer_full = farm.engine.snapshot()
    restored = Engine.restore(ruleset, newer_full, farm.clock, recent=recent)
    assert sorted(a.device for a in restored.firing()) == ["a"]
    # no alert in a newer essential snapshot: every alert of the full one ended meanwhile
    nothing = {**recent, "at": newer_full["at"] + 1, "states": []}
    restored = Engine.restore(ruleset, newer_full, farm.clock, recent=nothing)
    assert restored.firing() == []
    assert restored.tick() == []  # their ends were announced before: not again


def test_a_snapshot_in_parts_is_the_snapshot(tmp_path: Path) -> None:
    ruleset = rules(
        tmp_path,
        """
        rules:
          - name: ph_rising
            select: {measurement: reservoir, field: ph}
            rate: {above: 1, window: 1m}
        """,
    )
    farm = Farm(ruleset)
    for n in range(25):
        farm.send(6.0 + n / 100, at=n, device=f"d{n}")
    header, parts = farm.engine.snapshot_in_parts(size=4)
    chunks = list(parts)
    assert [len(c) for c in chunks] == [4] * 6 + [1]
    whole = farm.engine.snapshot()
    assert {**header, "states": [s for c in chunks for s in c]} == {**whole, "at": header["at"]}
    parted = {**header, "states": [s for c in chunks for s in c]}
    restored = Engine.restore(ruleset, parted, farm.clock)
    assert len(restored.snapshot()["states"]) == 25


def test_rate_samples_survive_a_restart(tmp_path: Path) -> None:
    """The samples a rate rule holds are in the snapshot: after a restart the rate is known
    at once, from the readings before it, and the old ones still leave the window."""
    ruleset = rules(
        tmp_path,
        """
        rules:
          - name: warming_fast
            select: {measurement: reservoir, field: water_temp}
            rate: {above: 0.5, window: 10m}
        """,
    )
    farm = Farm(ruleset)
    for minute in range(8):  # +0.1 per minute for 8 minutes
        assert farm.send(20 + 0.1 * minute, at=minute * 60, field="water_temp") == []
    snapshot = json.loads(json.dumps(farm.engine.snapshot()))
    restored = Farm(ruleset, farm.clock)
    restored.engine = Engine.restore(ruleset, snapshot, farm.clock)
    # +4.3 in one more minute: (25.0 - 20.0) / 8 min > 0.5, known from the old samples.
    [event] = restored.send(25.0, at=8 * 60, field="water_temp")
    assert event.kind == "firing"
    assert event.value == pytest.approx(5.0 / 8)
    # 20 minutes later, flat: the samples of before the restart have left the window.
    for minute in range(9, 30):
        restored.send(25.0, at=minute * 60, field="water_temp")
    assert kinds(restored.events)[-1] == "resolved"
    [state] = restored.engine.snapshot()["states"]
    assert all(when >= T0 + 19 * 60 for when, _ in state["samples"])
