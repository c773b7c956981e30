"""Quotas: rule matching and checks, the memory limiter on injected clocks, and the Redis
limiter against a real redis-server (shared quotas, outages, script reloads)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from services import Redis

import ingestd.quota
from ingestd.config import QuotaLimits, QuotaRule, QuotasSection
from ingestd.errors import ConfigError
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.quota import (
    ALLOWED,
    BYTES,
    DAY,
    HOUR,
    RATE,
    REGISTRY,
    VERDICT_NAMES,
    MemoryLimiter,
    QuotaBackendUnavailable,
    QuotaRules,
    RedisLimiter,
    check_rules,
)
from ingestd.throttle import Throttle

MIB = 1024 * 1024


class Clock:
    """One settable time for both clocks: monotonic and wall (epoch seconds)."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def utc(*fields: int) -> float:
    """Epoch seconds of a UTC time given as (year, month, day[, hour[, minute[, second]]])."""
    year, month, day, hour, minute, second = (*fields, 0, 0, 0)[:6]
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def section(*rules: QuotaRule, **kwargs: Any) -> QuotasSection:
    return QuotasSection(rules=list(rules), **kwargs)


def limiter(*rules: QuotaRule, clock: Clock, **kwargs: Any) -> MemoryLimiter:
    quotas = section(*rules, **kwargs)
    return MemoryLimiter(QuotaRules(quotas), quotas, clock=clock, wallclock=clock)


def rule(name: str = "probes", topic: str = "farm/+/{device}/#", **limits: Any) -> QuotaRule:
    return QuotaRule(name=name, topic=topic, **limits)


# --- matching -------------------------------------------------------------------------------


def test_match_templates_filters_and_keys() -> None:
    rules = QuotaRules(
        section(
            rule("controllers", "farm/greenhouse/{device}/#", rate=50),
            rule("relays", "relay/{controller}/{device}", key="{controller}", rate=1),
            rule("probes", "farm/{site}/{device}/{measurement}", rate=1),
            rule("roots", "{device}/#", rate=1),
            rule("sys", "$SYS/{device}", rate=1),
        )
    )
    assert rules.match("farm/greenhouse/esp-1/ph") == (0, "esp-1")
    assert rules.match("farm/greenhouse/esp-1") == (0, "esp-1")  # a/# matches a
    assert rules.match("farm/greenhouse/esp-1/a/b/c") == (0, "esp-1")
    assert rules.match("relay/ctrl-7/pump") == (1, "ctrl-7")  # key names another variable
    assert rules.match("farm/field-2/soil-9/moisture") == (2, "soil-9")
    assert rules.match("farm/field-2/soil-9") == (3, "farm")  # too short for rule 2
    assert rules.match("pi-4") == (3, "pi-4")
    assert rules.match("farm//x/ph") == (2, "x")  # '+' and {name} match an empty level
    # As in MQTT, a variable first level does not match a topic starting with '$'.
    assert rules.match("$SYS/broker") == (4, "broker")
    assert rules.match("$SYS/a/b") is None
    # Cached answers are the same answers.
    assert rules.match("farm/greenhouse/esp-1/ph") == (0, "esp-1")
    assert rules.names == ("controllers", "relays", "probes", "roots", "sys", REGISTRY)


def test_match_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingestd.quota, "_TOPIC_CACHE_MAX", 100)
    rules = QuotaRules(section(rule(rate=1)))
    for i in range(1000):
        assert rules.match(f"farm/a/device-{i}/ph") == (0, f"device-{i}")
        assert rules.match(f"other/{i}") is None
    assert len(rules._cache) <= 100


def test_plain_filter_needs_the_key_variable() -> None:
    quotas = section(rule("all", "farm/+/+/#", rate=1))
    with pytest.raises(ConfigError) as info:
        QuotaRules(quotas)
    message = str(info.value)
    assert "quotas.rules[0] 'all'" in message
    assert "key '{device}' is not in topic 'farm/+/+/#'" in message
    assert "farm/+/{device}/#" in message


def test_check_rules_reports_every_error() -> None:
    quotas = section(
        rule("a", "farm/{site}/#", rate=1),
        rule("b", "farm/#/{device}", rate=1),
        rule("d", "x/{device}/{device}", rate=1),
        rule("e", "y/{device}", timezone="Europe/Amsterdan", rate=1),
        rule("f", "$share/g/z/{device}", rate=1),
        rule("f", "w/{device}", rate=1),
        rule("g", "v/dev{device}", rate=1),
        rule("registry", "u/{device}", rate=1),
    )
    problems = check_rules(quotas)
    text = "\n".join(problems)
    assert "quotas.rules[0] 'a': key '{device}' is not a variable" in text
    assert "(it has {site})" in text
    assert "quotas.rules[1] 'b': topic 'farm/#/{device}': '#' must be the last level" in text
    assert "variable {device} appears twice" in text
    assert "unknown timezone 'Europe/Amsterdan'" in text
    assert "drop the '$share/<group>/' prefix" in text
    assert "name 'f' is also the name of quotas.rules[4]" in text
    assert "level 'dev{device}' must be a literal" in text
    assert "quotas.rules[7] 'registry': name 'registry' is reserved" in text
    assert not [p for p in problems if p.startswith("warning: ")]
    with pytest.raises(ConfigError, match=r"invalid quota rules \(\d+ problems\)"):
        QuotaRules(quotas)


def test_a_key_that_is_not_a_template_variable_is_refused_by_the_config_schema() -> None:
    with pytest.raises(ValidationError, match="key"):
        QuotaRule(name="c", topic="farm/+/{device}", key="device", rate=1)


def test_check_rules_unreachable_and_overlapping() -> None:
    general = rule("general", "farm/+/{device}/#", rate=1)
    specific = rule("greenhouse", "farm/greenhouse/{device}/ph", rate=10)
    # Specific first, then general: the intended pattern, nothing to report.
    assert check_rules(section(specific, general)) == []
    # General first: the specific rule can never apply.
    problems = check_rules(section(general, specific))
    assert problems == [
        "quotas.rules[1] 'greenhouse': unreachable: quotas.rules[0] 'general' (topic "
        "'farm/+/{device}/#') comes first and matches every topic this rule matches; put the "
        "more specific rule first"
    ]
    with pytest.raises(ConfigError, match="unreachable"):
        QuotaRules(section(general, specific))
    # Same filter spelled with other variable names: unreachable too.
    assert "unreachable" in check_rules(section(general, rule("again", "farm/{x}/{device}/#")))[0]
    # Neither contains the other, yet both match farm/greenhouse/<device>/ph: a warning.
    by_site = rule("site", "farm/greenhouse/{device}/+", rate=5)
    by_field = rule("ph", "farm/+/{device}/ph", rate=2)
    problems = check_rules(section(by_site, by_field))
    assert problems == [
        "warning: quotas.rules[1] 'ph': overlaps quotas.rules[0] 'site' (topic "
        "'farm/greenhouse/{device}/+'): a topic such as 'farm/greenhouse/x/ph' matches both "
        "and counts under quotas.rules[0] 'site' only"
    ]
    rules = QuotaRules(section(by_site, by_field))  # warnings do not stop the daemon
    assert rules.warnings == [problems[0].removeprefix("warning: ")]
    # Disjoint rules, and '$' topics that wildcards never match: no overlap.
    assert check_rules(section(rule("a", "a/{device}"), rule("b", "b/{device}"))) == []
    assert check_rules(section(rule("a", "{device}/#"), rule("s", "$SYS/{device}"))) == []
    assert check_rules(section(rule("a", "a/{device}"), rule("b", "a/{device}/x"))) == []
    # a/# also matches a: a/{device}/# covers a/{device}.
    problems = check_rules(section(rule("a", "a/{device}/#"), rule("b", "a/{device}")))
    assert "unreachable" in problems[0]


def test_check_rules_warns_about_overrides_and_bursts() -> None:
    quotas = section(
        rule(
            "probes",
            "{device}/#",
            burst=5,
            overrides={
                "farm/esp-1": QuotaLimits(rate=5),
                "esp+": QuotaLimits(rate=5),
                "$SYS": QuotaLimits(rate=5),
                "esp-2": QuotaLimits(bytes_burst=10),
            },
        ),
        backend="redis",
        redis_timeout=0,
    )
    problems = check_rules(quotas)
    assert all(p.startswith("warning: ") for p in problems)
    text = "\n".join(problems)
    assert "override 'farm/esp-1' can never match: a topic level never holds '/'" in text
    assert "override 'esp+' can never match" in text
    assert "override '$SYS' can never match: a variable in the first level" in text
    assert "quotas.rules[0] 'probes': burst has no effect without rate" in text
    assert "override 'esp-2': bytes_burst has no effect without bytes_per_second" in text
    assert "quotas.redis_timeout = 0" in text
    assert len(QuotaRules(quotas).warnings) == len(problems)


# --- memory limiter -------------------------------------------------------------------------


def test_verdict_names() -> None:
    assert [VERDICT_NAMES[v] for v in (ALLOWED, RATE, BYTES, HOUR, DAY)] == [
        "allowed",
        "rate",
        "bytes_per_second",
        "per_hour",
        "per_day",
    ]


def offer(limits: MemoryLimiter, clock: Clock, rate: float, seconds: float) -> list[float]:
    """Offer messages at a steady rate; the times of those allowed."""
    start = clock.t
    allowed = []
    for i in range(round(rate * seconds)):
        clock.t = start + i / rate
        if limits.allow(0, "esp-1", 100) == ALLOWED:
            allowed.append(clock.t - start)
    return allowed


@pytest.mark.parametrize("burst", [None, 1, 20])
def test_ten_times_the_rate_gets_the_rate(burst: int | None) -> None:
    clock = Clock()
    limits = limiter(rule(rate=10, burst=burst), clock=clock)
    allowed = offer(limits, clock, rate=100, seconds=30)
    effective_burst = burst or 10
    for start in (0, 5, 10, 19):
        count = sum(start <= t < start + 10 for t in allowed)
        assert count <= 10 * 10 + effective_burst
        if start > 2:  # after the initial burst: the rate, within 5 %
            assert abs(count - 100) <= 5, (start, count)
    assert abs(len(allowed) - (300 + effective_burst)) <= 5


def test_burst_passes_then_the_next_is_throttled() -> None:
    clock = Clock()
    limits = limiter(rule(rate=2, burst=7), clock=clock)
    assert [limits.allow(0, "esp-1", 10) for _ in range(8)] == [ALLOWED] * 7 + [RATE]
    assert limits.allow(0, "esp-1", 10) == RATE
    clock.t += 0.499
    assert limits.allow(0, "esp-1", 10) == RATE
    clock.t += 0.001  # one interval (1/rate) later: exactly one more
    assert [limits.allow(0, "esp-1", 10) for _ in range(2)] == [ALLOWED, RATE]
    clock.t += 3600  # a long pause refills the bucket to the burst, no further
    assert [limits.allow(0, "esp-1", 10) for _ in range(8)] == [ALLOWED] * 7 + [RATE]
    # Another device has a bucket of its own.
    assert limits.allow(0, "esp-2", 10) == ALLOWED


@pytest.mark.parametrize(("rate", "burst"), [(5.5, 5), (0.2, 1), (1000, 1000)])
def test_default_burst_is_the_rate(rate: float, burst: int) -> None:
    clock = Clock()
    limits = limiter(rule(rate=rate), clock=clock)
    verdicts = [limits.allow(0, "esp-1", 10) for _ in range(burst + 1)]
    assert verdicts == [ALLOWED] * burst + [RATE]


def test_bytes_limit() -> None:
    clock = Clock()
    limits = limiter(rule(bytes_per_second=1000, bytes_burst=3000), clock=clock)
    assert [limits.allow(0, "esp-1", 1000) for _ in range(4)] == [ALLOWED] * 3 + [BYTES]
    assert limits.allow(0, "esp-1", 0) == ALLOWED
    clock.t += 0.5
    assert [limits.allow(0, "esp-1", 250) for _ in range(3)] == [ALLOWED, ALLOWED, BYTES]
    clock.t += 3600
    assert limits.allow(0, "esp-1", 3001) == BYTES  # larger than the bucket: never
    assert limits.allow(0, "esp-1", 3000) == ALLOWED
    # Default bytes_burst: one second's worth, at least 64 KiB.
    limits = limiter(rule(bytes_per_second=100), clock=clock)
    assert limits.allow(0, "esp-1", 65536) == ALLOWED
    assert limits.allow(0, "esp-1", 1) == BYTES


def test_a_refused_message_consumes_nothing() -> None:
    clock = Clock()
    limits = limiter(rule(rate=1, burst=2, bytes_per_second=100, bytes_burst=100), clock=clock)
    assert limits.allow(0, "esp-1", 500) == BYTES  # did not take a rate token
    assert limits.allow(0, "esp-1", 50) == ALLOWED
    assert limits.allow(0, "esp-1", 50) == ALLOWED
    assert limits.allow(0, "esp-1", 0) == RATE  # rate first, bytes untouched
    clock.t += 1
    assert limits.allow(0, "esp-1", 100) == ALLOWED


def test_hour_and_day_windows_in_utc() -> None:
    clock = Clock(utc(2024, 5, 1, 10, 59, 58))
    limits = limiter(rule(per_hour=2, per_day=3), clock=clock)
    assert [limits.allow(0, "esp-1", 1) for _ in range(3)] == [ALLOWED, ALLOWED, HOUR]
    clock.t = utc(2024, 5, 1, 10, 59, 59) + 0.999999
    assert limits.allow(0, "esp-1", 1) == HOUR
    clock.t = utc(2024, 5, 1, 11)  # exactly on the boundary
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, DAY]
    clock.t = utc(2024, 5, 1, 23, 59, 59) + 0.999999
    assert limits.allow(0, "esp-1", 1) == DAY
    clock.t = utc(2024, 5, 2)
    assert limits.allow(0, "esp-1", 1) == ALLOWED


def test_day_window_on_amsterdam_dst_days() -> None:
    # 2024-03-31 has 23 hours in Amsterdam: from 2024-03-30T23:00Z to 2024-03-31T22:00Z.
    clock = Clock(utc(2024, 3, 30, 22, 59, 59))
    limits = limiter(rule(per_day=2, timezone="Europe/Amsterdam"), clock=clock)
    assert [limits.allow(0, "esp-1", 1) for _ in range(3)] == [ALLOWED, ALLOWED, DAY]
    clock.t = utc(2024, 3, 30, 23)  # local midnight (CET)
    assert [limits.allow(0, "esp-1", 1) for _ in range(3)] == [ALLOWED, ALLOWED, DAY]
    clock.t = utc(2024, 3, 31, 1)  # 02:00 CET becomes 03:00 CEST: same day
    assert limits.allow(0, "esp-1", 1) == DAY
    clock.t = utc(2024, 3, 31, 21, 59, 59)
    assert limits.allow(0, "esp-1", 1) == DAY
    clock.t = utc(2024, 3, 31, 22)  # local midnight (CEST), 23 hours later
    assert [limits.allow(0, "esp-1", 1) for _ in range(3)] == [ALLOWED, ALLOWED, DAY]
    # 2024-10-27 has 25 hours: from 2024-10-26T22:00Z to 2024-10-27T23:00Z.
    clock.t = utc(2024, 10, 26, 22)
    assert [limits.allow(0, "esp-1", 1) for _ in range(3)] == [ALLOWED, ALLOWED, DAY]
    clock.t = utc(2024, 10, 27, 22, 59, 59)  # 23:59:59 CET
    assert limits.allow(0, "esp-1", 1) == DAY
    clock.t = utc(2024, 10, 27, 23)
    assert limits.allow(0, "esp-1", 1) == ALLOWED


def test_hour_window_on_amsterdam_dst_days() -> None:
    # 2024-10-27: 02:00-03:00 local happens twice (CEST, then CET); each is an hour of its own.
    clock = Clock(utc(2024, 10, 27, 0, 30))  # 02:30 CEST
    limits = limiter(rule(per_hour=1, timezone="Europe/Amsterdam"), clock=clock)
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, HOUR]
    clock.t = utc(2024, 10, 27, 0, 59, 59)
    assert limits.allow(0, "esp-1", 1) == HOUR
    clock.t = utc(2024, 10, 27, 1)  # 02:00 CET
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, HOUR]
    clock.t = utc(2024, 10, 27, 1, 59, 59)
    assert limits.allow(0, "esp-1", 1) == HOUR
    clock.t = utc(2024, 10, 27, 2)  # 03:00 CET
    assert limits.allow(0, "esp-1", 1) == ALLOWED
    # 2024-03-31: 01:59:59 CET is followed by 03:00:00 CEST.
    clock.t = utc(2024, 3, 31, 0, 59, 59)
    assert [limits.allow(0, "esp-2", 1) for _ in range(2)] == [ALLOWED, HOUR]
    clock.t = utc(2024, 3, 31, 1)
    assert limits.allow(0, "esp-2", 1) == ALLOWED
    # A wall clock stepped back does not reset a count: esp-1 counts on in its newer hour.
    assert limits.allow(0, "esp-1", 1) == HOUR


def test_hour_window_in_a_half_hour_zone() -> None:
    clock = Clock(utc(2024, 5, 1, 10, 29, 59))  # 15:59:59 in Kolkata (UTC+05:30)
    limits = limiter(rule(per_hour=1, timezone="Asia/Kolkata"), clock=clock)
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, HOUR]
    clock.t = utc(2024, 5, 1, 10, 30)
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, HOUR]


def test_overrides_replace_the_rule_limits() -> None:
    clock = Clock()
    limits = limiter(
        rule(
            rate=1,
            burst=1,
            per_day=2,
            overrides={"controller": QuotaLimits(rate=10), "gateway": QuotaLimits()},
        ),
        clock=clock,
    )
    assert [limits.allow(0, "probe", 1) for _ in range(2)] == [ALLOWED, RATE]
    assert [limits.allow(0, "controller", 1) for _ in range(11)] == [ALLOWED] * 10 + [RATE]
    clock.t += 1
    # The override sets no per_day: the rule's does not apply to the controller.
    assert [limits.allow(0, "controller", 1) for _ in range(11)] == [ALLOWED] * 10 + [RATE]
    assert limits.allow(0, "probe", 1) == ALLOWED
    clock.t += 1
    assert limits.allow(0, "probe", 1) == DAY
    # An override without limits exempts the device, and keeps no state for it.
    devices = limits.devices
    assert all(limits.allow(0, "gateway", 10**6) == ALLOWED for _ in range(100))
    assert limits.devices == devices


def test_registry_limits_replace_rate_and_burst_at_once_and_can_be_removed() -> None:
    """The device registry's quota (PostgreSQL) for one device: its rate and burst replace
    the matching rule's, other limits stay, state already held takes the new limits."""
    clock = Clock()
    limits = limiter(rule(rate=100, burst=100, per_day=5), clock=clock)
    assert limits.allow(0, "esp-1", 1) == ALLOWED  # state held under the rule's limits
    limits._rules.set_registry_limits("esp-1", 1.0, 1)
    limits.relimit("esp-1")
    clock.t += 1
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, RATE]
    assert [limits.allow(0, "esp-2", 1) for _ in range(3)] == [ALLOWED] * 3  # others: the rule
    clock.t += 1
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED, RATE]  # 3 today
    limits._rules.set_registry_limits("esp-1", None, None)
    limits.relimit("esp-1")
    assert [limits.allow(0, "esp-1", 1) for _ in range(2)] == [ALLOWED] * 2  # the rule's rate
    assert limits.allow(0, "esp-1", 1) == DAY  # and the rule's per_day held throughout


def test_a_registry_quota_limits_its_device_where_no_rule_matches() -> None:
    """The audit's case: no quota rule for the device's topic (here, no rules at all), a
    registry quota of rate 1 burst 3: the device is limited by it alone, under the rule
    'registry'; an unregistered neighbour is not limited."""
    clock = Clock()
    quotas = section()
    rules = QuotaRules(quotas)
    limits = MemoryLimiter(rules, quotas, clock=clock, wallclock=clock)
    assert rules.find("farm/gh1/esp-q/reservoir", "esp-q") is None
    rules.set_registry_limits("esp-q", 1.0, 3)
    found = rules.find("farm/gh1/esp-q/reservoir", "esp-q")
    assert found == (rules.registry, "esp-q") and rules.names[rules.registry] == REGISTRY
    assert rules.find("farm/gh1/esp-n/reservoir", "esp-n") is None
    assert [limits.allow(*found, 1) for _ in range(5)] == [ALLOWED] * 3 + [RATE] * 2
    clock.t += 1
    assert [limits.allow(*found, 1) for _ in range(2)] == [ALLOWED, RATE]
    # Removed from the registry: no limit, at once (its held state included).
    rules.set_registry_limits("esp-q", None, None)
    limits.relimit("esp-q")
    assert rules.find("farm/gh1/esp-q/reservoir", "esp-q") is None
    assert [limits.allow(*found, 1) for _ in range(5)] == [ALLOWED] * 5


def test_a_rule_matching_the_topic_comes_before_the_registry_rule() -> None:
    rules = QuotaRules(section(rule("probes", "farm/+/{device}/#", rate=100, per_day=2)))
    rules.set_registry_limits("esp-q", 1.0, None)
    assert rules.find("farm/gh1/esp-q/ph", "esp-q") == (0, "esp-q")
    assert rules.find("lab/esp-q/ph", "esp-q") == (rules.registry, "esp-q")
    assert rules.find("lab/esp-n/ph", "esp-n") is None
    under_rule = rules.limits_for(0, "esp-q")
    assert (under_rule.interval, under_rule.per_day) == (1.0, 2)  # the rule's per_day stays
    alone = rules.limits_for(rules.registry, "esp-q")
    assert (alone.interval, alone.per_day, alone.unlimited) == (1.0, 0, False)


def test_throttle_drops_and_notices_under_the_registry_rule() -> None:
    """The quota stage as the daemon drives it, no rules configured: drops are counted,
    noticed and listed under rule 'registry'; a NaN rate (SQL, not the CLI) is ignored."""
    clock = Clock()
    metrics = Metrics()
    published: list[tuple[str, bytes]] = []

    def publish(topic: str, payload: bytes) -> bool:
        published.append((topic, payload))
        return True

    throttle = Throttle(section(notice_interval=60), metrics, Health(), publish, clock=clock)
    throttle.set_device_limits("esp-q", 1.0, 2)
    item = throttle.match("farm/gh1/esp-q/reservoir", 10, "esp-q")
    assert item is not None
    assert [throttle.allow(item) for _ in range(5)] == [True, True, False, False, False]
    assert throttle.match("farm/gh1/esp-n/reservoir", 10, "esp-n") is None
    labels = {"rule": REGISTRY, "device": "esp-q", "limit": "rate"}
    assert metrics.registry.get_sample_value("ingestd_quota_dropped_total", labels) == 3
    ((topic, payload),) = published
    notice = orjson.loads(payload)
    assert topic == "ingestd/quota/esp-q"
    assert (notice["rule"], notice["limit"], notice["dropped"]) == (REGISTRY, "rate", 1)
    assert [(t["device"], t["rule"]) for t in throttle.top()] == [("esp-q", REGISTRY)]
    throttle.set_device_limits("esp-n", float("nan"), None)
    assert throttle.match("farm/gh1/esp-n/reservoir", 10, "esp-n") is None


def test_a_device_leaving_the_throttled_table_takes_all_its_metric_labels() -> None:
    """Dropped under two rules and two limits, then pushed out of the table by 10,000 other
    throttled devices: none of its ingestd_quota_dropped samples stays in /metrics."""
    metrics = Metrics()
    quotas = section(
        rule("ph", "farm/+/{device}/ph", rate=1, burst=1),
        rule("all", "farm/+/{device}/#", bytes_per_second=10, bytes_burst=10),
    )
    throttle = Throttle(quotas, metrics, Health(), lambda _t, _p: True)

    def drop(topic: str, device: str) -> None:
        item = throttle.match(topic, 10, device)
        assert item is not None
        assert [throttle.allow(item) for _ in range(2)] == [True, False]

    drop("farm/gh1/esp-0/ph", "esp-0")  # ph, rate
    drop("farm/gh1/esp-0/ec", "esp-0")  # all, bytes_per_second

    def samples(device: str) -> set[tuple[str, str]]:
        return {
            (sample.labels["rule"], sample.labels["limit"])
            for metric in metrics.quota_dropped.collect()
            for sample in metric.samples
            if sample.labels.get("device") == device and sample.name.endswith("_total")
        }

    assert samples("esp-0") == {("ph", "rate"), ("all", "bytes_per_second")}
    for n in range(1, 10_001):
        drop(f"farm/gh1/esp-{n}/ph", f"esp-{n}")
    assert samples("esp-0") == set()
    assert samples("esp-1") == {("ph", "rate")}


def test_rules_count_separately_and_exempt_rules_keep_no_state() -> None:
    clock = Clock()
    limits = limiter(
        rule("ph", "farm/+/{device}/ph", rate=1),
        rule("all", "farm/+/{device}/#", rate=2),
        rule("debug", "debug/{device}"),
        clock=clock,
    )
    assert limits.allow_batch([(0, "esp-1", 1)] * 2 + [(1, "esp-1", 1)] * 3) == [
        ALLOWED,
        RATE,
        ALLOWED,
        ALLOWED,
        RATE,
    ]
    assert limits.allow_batch([(2, "esp-1", 1)] * 100) == [ALLOWED] * 100
    assert limits.devices == 2


def fill(limits: MemoryLimiter, count: int, prefix: str) -> None:
    for i in range(count):
        assert limits.allow(0, f"{prefix}-{i:05d}", 120) == ALLOWED


def test_ten_thousand_devices_cost_a_few_mib_and_expired_slots_are_reused() -> None:
    clock = Clock()
    quotas = section(rule(rate=1, bytes_per_second=1000, per_hour=1000, per_day=10000))
    rules = QuotaRules(quotas)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        limits = MemoryLimiter(rules, quotas, clock=clock, wallclock=clock)
        fill(limits, 10_000, "greenhouse-esp32")  # device names are part of the cost
        used = tracemalloc.get_traced_memory()[0] - before
        # Steady state: checking known devices allocates nothing that stays.
        steady = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            clock.t += 1
            fill(limits, 10_000, "greenhouse-esp32")
        grown = tracemalloc.get_traced_memory()[0] - steady
    finally:
        tracemalloc.stop()
    assert limits.devices == 10_000
    assert used < 3 * MIB, f"10,000 devices cost {used / MIB:.2f} MiB"
    assert grown < 16 * 1024, f"steady state grew by {grown} bytes"

    # Idle past idle_expiry (and into the next day, so the counts no longer matter).
    capacity = limits.capacity
    clock.t += 2 * 86400
    assert limits.sweep() == 10_000
    assert limits.devices == 0
    fill(limits, 10_000, "field-probe")
    assert limits.devices == 10_000
    assert limits.capacity == capacity


def test_expiry_waits_until_forgetting_changes_nothing() -> None:
    clock = Clock(utc(2024, 5, 1, 6))
    limits = limiter(
        rule("slow", "slow/{device}", rate=0.001, burst=2),
        rule("daily", "daily/{device}", per_day=5),
        rule("fast", "fast/{device}", rate=10),
        clock=clock,
        idle_expiry=60,
    )
    limits.allow_batch([(0, "a", 1), (1, "b", 1), (2, "c", 1)])
    assert limits.devices == 3
    clock.t += 121  # past idle_expiry (a device is looked at again each idle_expiry)
    assert limits.sweep() == 1  # only "fast/c": its bucket is full again
    # "slow/a" owes 1000 s of its bucket, "daily/b" has used one of today's five.
    clock.t = utc(2024, 5, 1, 23, 59)
    assert limits.sweep() == 1
    clock.t = utc(2024, 5, 2, 0, 1)
    assert limits.sweep() == 1
    assert limits.devices == 0
    # New devices run the sweep by themselves once one is due.
    limits.allow(2, "c", 1)
    clock.t += 121
    limits.allow(2, "d", 1)
    assert limits.devices == 1


def test_a_zero_idle_expiry_looks_at_each_device_once_per_sweep() -> None:
    clock = Clock(utc(2024, 5, 1, 6))
    limits = limiter(rule(per_day=5), clock=clock, idle_expiry=0)
    for i in range(100):
        limits.allow(0, f"esp-{i}", 1)
    clock.t += 5
    assert limits.sweep() == 0  # all kept by today's counts, each looked at once
    clock.t = utc(2024, 5, 2, 0, 0, 1)
    assert limits.sweep() == 100


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.2, 50),
    burst=st.integers(1, 20),
    bytes_per_second=st.floats(100, 10_000),
    bytes_burst=st.integers(100, 20_000),
    arrivals=st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 2000)), min_size=1, max_size=150),
)
def test_no_window_ever_gets_more_than_rate_times_window_plus_burst(
    rate: float,
    burst: int,
    bytes_per_second: float,
    bytes_burst: int,
    arrivals: list[tuple[float, int]],
) -> None:
    clock = Clock(1000.0)
    limits = limiter(
        rule(rate=rate, burst=burst, bytes_per_second=bytes_per_second, bytes_burst=bytes_burst),
        clock=clock,
    )
    allowed: list[tuple[float, int]] = []
    for gap, nbytes in arrivals:
        clock.t += gap
        if limits.allow(0, "esp-1", nbytes) == ALLOWED:
            allowed.append((clock.t, nbytes))
    for i, (start, _) in enumerate(allowed):
        total_bytes = 0
        for j in range(i, len(allowed)):
            end, nbytes = allowed[j]
            total_bytes += nbytes
            window = end - start
            assert j - i + 1 <= burst + rate * window + 1e-6
            assert total_bytes <= bytes_burst + bytes_per_second * window + 1e-3


# --- redis limiter --------------------------------------------------------------------------


def mixed_rules(unique: str) -> QuotasSection:
    return section(
        rule(f"rate-{unique}", "rate/{device}", rate=10, burst=3),
        rule(f"bytes-{unique}", "bytes/{device}", bytes_per_second=1000, bytes_burst=2500),
        rule(f"hour-{unique}", "hour/{device}", per_hour=3),
        rule(
            f"over-{unique}",
            "over/{device}",
            rate=1,
            burst=1,
            overrides={"big": QuotaLimits(rate=100, burst=5), "free": QuotaLimits()},
        ),
        rule(f"day-{unique}", "day/{device}", per_day=2, timezone="Europe/Amsterdam"),
        redis_timeout=2.0,
    )


A, R, B, H, D = ALLOWED, RATE, BYTES, HOUR, DAY
MIXED = [
    ([(0, "a", 10)] * 5, [A, A, A, R, R]),
    ([(0, "b", 10)] * 2, [A, A]),
    ([(1, "a", n) for n in (1000, 1000, 1000, 400, 100)], [A, A, B, A, A]),
    ([(2, "a", 1)] * 5, [A, A, A, H, H]),
    ([(3, "small", 1)] * 3, [A, R, R]),
    ([(3, "big", 1)] * 7, [A, A, A, A, A, R, R]),
    ([(3, "free", 1)] * 3, [A, A, A]),
    ([(4, "a", 1)] * 3, [A, A, D]),
]
MIXED_BATCH = [item for items, _ in MIXED for item in items]
MIXED_VERDICTS = [verdict for _, verdicts in MIXED for verdict in verdicts]


def test_redis_gives_the_memory_verdicts(redis_server: Redis, unique: str) -> None:
    quotas = mixed_rules(unique)
    clock = Clock()
    wall = time.time()  # one wall time for both: the test may not straddle an hour
    memory = MemoryLimiter(QuotaRules(quotas), quotas, clock=clock, wallclock=lambda: wall)
    assert memory.allow_batch(MIXED_BATCH) == MIXED_VERDICTS

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            limits = RedisLimiter(QuotaRules(quotas), quotas, client, wallclock=lambda: wall)
            assert await limits.allow_batch(MIXED_BATCH) == MIXED_VERDICTS
            started = time.monotonic()
            await asyncio.sleep(0.5)  # refills the buckets of rate >= 10/s
            clock.t += time.monotonic() - started
            # Generous: anything from 0.5 s to many seconds gives the same verdicts.
            again = [(0, "a", 10)] * 4 + [(2, "a", 1)] * 2 + [(4, "a", 1)] + [(3, "big", 1)] * 6
            expected = [A, A, A, R, H, H, D, A, A, A, A, A, R]
            assert memory.allow_batch(again) == expected
            assert await limits.allow_batch(again) == expected
            key = f"ingestd:quota:rate-{unique}:a"
            assert await client.exists(key) == 1
            assert 0 < await client.pttl(key) <= quotas.idle_expiry * 1000 + 1
            assert await limits.allow_batch([]) == []
        finally:
            await client.aclose()

    asyncio.run(run())


def test_redis_period_state_outlives_idle_expiry(redis_server: Redis, unique: str) -> None:
    quotas = section(rule(f"daily-{unique}", "d/{device}", per_day=1), idle_expiry=1)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            # A wall clock a month ahead: today's end is far from Redis's now.
            wall = time.time() + 30 * 86400
            limits = RedisLimiter(QuotaRules(quotas), quotas, client, wallclock=lambda: wall)
            assert await limits.allow_batch([(0, "a", 1), (0, "a", 1)]) == [ALLOWED, DAY]
            ttl = await client.pttl(f"ingestd:quota:daily-{unique}:a")
            assert (
                ttl > 29 * 86400 * 1000
            )  # kept until the day ends, not forgotten after idle_expiry
        finally:
            await client.aclose()

    asyncio.run(run())


def test_two_instances_share_one_quota(redis_server: Redis, unique: str) -> None:
    quotas = section(rule(f"shared-{unique}", "s/{device}", rate=0.01, burst=5), redis_timeout=2)

    async def run() -> list[int]:
        first = redis.asyncio.Redis.from_url(redis_server.url)
        second = redis.asyncio.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            one = RedisLimiter(QuotaRules(quotas), quotas, first)
            two = RedisLimiter(QuotaRules(quotas), quotas, second)
            verdicts = []
            for i in range(10):
                instance = one if i % 2 else two
                verdicts += await instance.allow_batch([(0, "esp-1", 1)])
            return verdicts
        finally:
            await first.aclose()
            await second.aclose()

    assert asyncio.run(run()) == [ALLOWED] * 5 + [RATE] * 5


def test_redis_limits_a_device_by_its_registry_quota_alone(
    redis_server: Redis, unique: str
) -> None:
    quotas = section(redis_timeout=2)
    rules = QuotaRules(quotas)
    prefix = f"ingestd:quota:{unique}:"

    async def run() -> tuple[list[int], list[int], int]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            limits = RedisLimiter(rules, quotas, client, prefix=prefix)
            rules.set_registry_limits("esp-q", 0.01, 2)
            item = rules.find("farm/gh1/esp-q/reservoir", "esp-q")
            assert item == (rules.registry, "esp-q")
            limited = await limits.allow_batch([(*item, 1)] * 4)
            stored = await client.exists(f"{prefix}{REGISTRY}:esp-q")
            rules.set_registry_limits("esp-q", None, None)
            return limited, await limits.allow_batch([(*item, 1)] * 4), stored
        finally:
            await client.aclose()

    limited, removed, stored = asyncio.run(run())
    assert limited == [ALLOWED, ALLOWED, RATE, RATE]
    assert stored == 1
    assert removed == [ALLOWED] * 4


def test_script_is_loaded_again_after_a_flush(redis_server: Redis, unique: str) -> None:
    quotas = section(rule(f"flush-{unique}", "f/{device}", rate=0.01, burst=2), redis_timeout=2)

    async def run() -> list[int]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            limits = RedisLimiter(QuotaRules(quotas), quotas, client)
            verdicts = await limits.allow_batch([(0, "esp-1", 1)])
            await client.script_flush()
            verdicts += await limits.allow_batch([(0, "esp-1", 1), (0, "esp-1", 1)])
            return verdicts
        finally:
            await client.aclose()

    assert asyncio.run(run()) == [ALLOWED, ALLOWED, RATE]


def test_redis_down_raises_unavailable_and_recovers(services: Any, unique: str) -> None:
    server: Redis = services.redis()
    timeout = 0.5
    quotas = section(
        rule(f"r-{unique}", "r/{device}", rate=0.01, burst=3),
        rule(f"free-{unique}", "free/{device}"),
        redis_timeout=timeout,
    )

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url)
        try:
            limits = RedisLimiter(QuotaRules(quotas), quotas, client, retry_after=0)
            assert await limits.allow_batch([(0, "esp-1", 1)] * 2) == [ALLOWED] * 2
            assert limits.available
            server.stop()
            started = time.monotonic()
            with pytest.raises(QuotaBackendUnavailable, match="Redis quota backend unavailable"):
                await limits.allow_batch([(0, "esp-1", 1)])
            assert time.monotonic() - started < timeout + 5  # bounded, not the client's retries
            assert not limits.available
            # Exempt topics never need Redis.
            assert await limits.allow_batch([(1, "esp-1", 1)]) == [ALLOWED]
            server.start()  # same port, empty: no script, no state
            deadline = time.monotonic() + 10
            while True:
                try:
                    verdicts = await limits.allow_batch([(0, "esp-1", 1)] * 4)
                    break
                except QuotaBackendUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            assert verdicts == [ALLOWED] * 3 + [RATE]
            assert limits.available
        finally:
            await client.aclose()

    asyncio.run(run())


def test_redis_too_slow_raises_unavailable_and_fails_fast_for_a_while(
    services: Any, unique: str
) -> None:
    server: Redis = services.redis()
    quotas = section(rule(f"slow-{unique}", "s/{device}", rate=1), redis_timeout=0.1)
    clock = Clock(0.0)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url)
        admin = redis.asyncio.Redis.from_url(server.url)
        try:
            limits = RedisLimiter(QuotaRules(quotas), quotas, client, clock=clock, retry_after=5)
            assert await limits.allow_batch([(0, "esp-1", 1)]) == [ALLOWED]
            await admin.client_pause(600)
            with pytest.raises(QuotaBackendUnavailable, match="no answer within 100 ms"):
                await limits.allow_batch([(0, "esp-2", 1)])
            clock.t += 4.9  # within retry_after: fail at once, without asking Redis
            started = time.monotonic()
            with pytest.raises(QuotaBackendUnavailable):
                await limits.allow_batch([(0, "esp-2", 1)])
            assert time.monotonic() - started < 0.1
            await admin.client_unpause()
            clock.t += 0.2
            await client.connection_pool.disconnect()  # drop the connection cut mid-reply
            assert await limits.allow_batch([(0, "esp-2", 1)]) == [ALLOWED]
        finally:
            await client.aclose()
            await admin.aclose()

    asyncio.run(run())
