"""The series cap (ingestd.series): counting per device, refusing whole messages past a
cap, the capped gauge and its one warning, expiry of silent devices, and its memory bound.
End to end (a daemon, the broker, VictoriaMetrics): tests/test_guards_e2e.py."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
import structlog

from ingestd.config import GuardSection
from ingestd.decode import REASONS, TOO_MANY_SERIES
from ingestd.metrics import Metrics
from ingestd.model import Reading, Reject
from ingestd.series import SeriesGuard


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def guard(
    series: int = 5,
    tag_sets: int = 3,
    *,
    expiry: float = 3600,
    clock: Clock | None = None,
    **kw: Any,
) -> tuple[SeriesGuard, Metrics]:
    metrics = Metrics()
    section = GuardSection(max_series_per_device=series, max_tag_sets_per_device=tag_sets)
    return SeriesGuard(section, expiry, metrics, clock=clock or Clock(), **kw), metrics


def reading(device: str, *fields: str, measurement: str = "reservoir", **tags: str) -> Reading:
    return Reading(measurement, device, tags or {"site": "gh1"}, dict.fromkeys(fields, 1.0), 0)


def refused(check: SeriesGuard, *readings: Reading) -> str:
    with pytest.raises(Reject) as caught:
        check.admit(list(readings))
    assert caught.value.reason == TOO_MANY_SERIES
    return caught.value.detail


def test_the_reason_is_a_declared_label_of_the_rejection_metric() -> None:
    assert TOO_MANY_SERIES == "too_many_series"
    assert TOO_MANY_SERIES in REASONS


def test_a_device_writes_at_most_its_cap_of_measurement_and_field_pairs() -> None:
    check, metrics = guard(series=5)
    check.admit([reading("esp-1", "ph", "ec", "temp")])
    check.admit([reading("esp-1", "ph", "ec", "temp")])  # the same series: nothing new
    check.admit([reading("esp-1", "ph", measurement="climate")])  # 4: another measurement
    check.admit([reading("esp-1", "co2")])  # 5
    detail = refused(check, reading("esp-1", "x1"))
    assert "esp-1" in detail and "6 series" in detail
    assert "guard.max_series_per_device (5)" in detail and "'x1'" in detail
    # known series go on; other devices have their own count
    check.admit([reading("esp-1", "ph", "co2")])
    check.admit([reading("esp-2", "a", "b", "c", "d", "e")])
    refused(check, reading("esp-2", "f"))
    assert metrics.registry.get_sample_value("ingestd_series_capped_devices") == 2


def test_a_refused_message_counts_nothing_of_its_readings() -> None:
    """Two lines of one message (line protocol): refused whole when the second passes the
    cap, and the first one's new series is not counted either."""
    check, _ = guard(series=3)
    check.admit([reading("pi-1", "t")])
    refused(check, reading("pi-1", "h"), reading("pi-1", "a", "b"))
    check.admit([reading("pi-1", "h"), reading("pi-1", "a")])  # 3: fits


def test_tag_sets_are_counted_whatever_their_order_and_apart_from_fields() -> None:
    check, _ = guard(series=100, tag_sets=3)
    check.admit([reading("pi-1", "t", site="gh1", sensor="a")])
    check.admit([Reading("env", "pi-1", {"sensor": "a", "site": "gh1"}, {"t": 1.0}, 0)])
    check.admit([reading("pi-1", "t", site="gh1", sensor="b")])
    check.admit([reading("pi-1", "t", site="gh1", sensor="c")])
    detail = refused(check, reading("pi-1", "t", site="gh1", sensor="d"))
    assert "4 tag sets" in detail and "guard.max_tag_sets_per_device (3)" in detail
    assert "sensor=d,site=gh1" in detail
    # a tag key is part of the set: the same value under another key is another set
    refused(check, reading("pi-1", "t", site="gh1", probe="a"))
    # another site is another tag set too: a device claiming sites is capped as well
    refused(check, reading("pi-1", "t", site="gh2", sensor="a"))


def test_one_warning_per_device_and_a_gauge_of_devices_at_their_cap() -> None:
    check, metrics = guard(series=1)
    check.admit([reading("esp-1", "ph")])
    with structlog.testing.capture_logs() as logs:
        for n in range(5):
            refused(check, reading("esp-1", f"f{n}"))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, logs
    assert warnings[0]["device"] == "esp-1"
    assert "too_many_series" in warnings[0]["event"]
    assert metrics.registry.get_sample_value("ingestd_series_capped_devices") == 1
    assert check.capped == 1


def test_a_silent_device_is_forgotten_after_the_expiry_an_active_one_is_not() -> None:
    clock = Clock()
    check, metrics = guard(series=1, expiry=100, clock=clock)
    check.admit([reading("quiet", "ph")])
    check.admit([reading("busy", "ph")])
    refused(check, reading("busy", "ec"))
    for _ in range(6):  # 300 s, a message from busy every 50 s
        clock.now += 50
        check.sweep()
        check.admit([reading("busy", "ph")])
    assert metrics.registry.get_sample_value("ingestd_series_devices") == 1
    assert check.devices == 1
    check.admit([reading("quiet", "ec")])  # forgotten: a fresh count
    refused(check, reading("busy", "ec"))  # remembered all along: still at its cap
    assert check.capped == 1


def test_a_device_is_never_forgotten_before_the_expiry() -> None:
    clock = Clock()
    check, _ = guard(series=1, expiry=100, clock=clock)
    clock.now += 99  # just before a swap
    check.sweep()
    check.admit([reading("esp-1", "ph")])
    for _ in range(20):  # 99.5 s of silence, swept every 5 s
        clock.now += 5
        check.sweep()
    refused(check, reading("esp-1", "ec"))
    for _ in range(40):  # forgotten within twice the expiry of silence
        clock.now += 5
        check.sweep()
    check.admit([reading("esp-1", "ec")])


def test_memory_stays_bounded_past_the_devices_and_series_remembered() -> None:
    check, _ = guard(series=1000, max_devices=1000, max_entries=20_000)
    with structlog.testing.capture_logs() as logs:
        for n in range(5000):
            check.admit([reading(f"dev-{n}", "ph", "ec")])
    assert check.devices <= 1000
    assert any("forgotten early" in e["event"] for e in logs)
    check, _ = guard(series=1000, max_devices=1000, max_entries=2000)
    for n in range(3000):
        check.admit([reading("flood", f"f{n}")])
        assert check.entries <= 2000 + 1


def test_a_device_varying_its_fields_does_not_grow_the_shapes_remembered() -> None:
    """Every subset of 12 fields is another shape (4,095 of them): counted, not kept."""
    check, _ = guard(series=20, tag_sets=5)
    names = [f"f{i}" for i in range(12)]
    for mask in range(1, 1 << 12):
        check.admit([reading("esp-1", *(n for i, n in enumerate(names) if mask >> i & 1))])
    assert check.entries <= 20 + 5 + 25  # series + tag sets + shapes
    refused(check, reading("esp-1", *[f"g{i}" for i in range(9)]))


def test_a_repeated_shape_costs_one_lookup_and_a_new_one_is_counted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The hot path: a shape seen in this generation never reaches the count (one set
    lookup per reading); after a swap, its first message brings it (and its device) over."""
    clock = Clock()
    check, _ = guard(series=10, expiry=100, clock=clock)
    misses: list[str] = []
    miss = check._miss

    def counted(readings: list[Reading]) -> None:
        misses.append(readings[0].device)
        miss(readings)

    monkeypatch.setattr(check, "_miss", counted)
    for _ in range(1000):  # new dicts each time, as the decoder makes them
        check.admit([reading("esp-1", "ph", "ec"), reading("esp-1", "ph", site="gh2")])
    assert misses == ["esp-1"]
    check.admit([reading("esp-1", "ph", site="gh3")])
    assert len(misses) == 2
    clock.now += 100
    check.sweep()
    for _ in range(10):
        check.admit([reading("esp-1", "ph", "ec")])
    assert len(misses) == 3


def test_ten_thousand_typical_devices_cost_under_four_mib() -> None:
    """One 7-field reading per device, as the simulator's greenhouse sends (measured:
    about 325 bytes a device), and nothing more for the next 10,000 messages."""
    check, _ = guard(series=200, tag_sets=100)
    fields = ("ph", "ec", "water_temp", "air_temp", "humidity", "co2", "light")
    messages = [
        [Reading("reservoir", f"esp32-{n:05d}", {"farm": "f", "site": "gh1"}, {}, 0)]
        for n in range(10_000)
    ]
    for (message,) in messages:
        message.fields = dict.fromkeys(fields, 6.5)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for message in messages:
            check.admit(message)
        grown = tracemalloc.get_traced_memory()[0] - before
        for message in messages:  # again: nothing more
            check.admit(message)
        again = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4 * 1024 * 1024, grown
    assert again - grown < 64 * 1024, again - grown
