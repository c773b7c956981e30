"""Per-device quotas: which rule a topic falls under, and whether a message fits its limits.

Three parts, none of which touches MQTT:

:class:`QuotaRules`
    The compiled ``quotas.rules``. :meth:`QuotaRules.match` maps a topic to ``(rule index,
    device key)`` for the first rule whose ``topic`` matches, or ``None``;
    :meth:`QuotaRules.find` adds the device registry's quotas (below).
:class:`MemoryLimiter`
    Limits kept in this process (``quotas.backend: memory``): fresh after a restart.
:class:`RedisLimiter`
    Limits kept in Redis (``quotas.backend: redis``), shared by every instance and kept
    across restarts: one atomic Lua script per batch. Any failure raises
    :class:`QuotaBackendUnavailable`; the caller then decides the batch with a
    :class:`MemoryLimiter` (local limits) and tries Redis again later.

Both limiters answer with a verdict code: :data:`ALLOWED`, or the limit the message would
exceed (:data:`RATE`, :data:`BYTES`, :data:`HOUR`, :data:`DAY`, checked in that order);
:data:`VERDICT_NAMES` names them for metrics and logs. A refused message consumes nothing.

Rule topics
    An MQTT filter whose levels are literals, ``+``, a final ``#``, or ``{name}`` variables
    (each matches one level, like ``+``). The device is the level of the variable named by
    the rule's ``key`` (``{device}`` by default), so that variable must be in the topic: a
    plain filter such as ``farm/+/+/#`` is refused with a hint to name the device's level
    (``farm/+/{device}/#``). Identity comes from the topic, and guessing which ``+`` is the
    device would silently count quotas for the wrong thing. As in MQTT, a wildcard or
    variable first level does not match topics starting with ``$``.

Limits (see :class:`ingestd.config.QuotaLimits`)
    ``rate`` + ``burst``: GCRA, i.e. a bucket of ``burst`` messages refilled at ``rate`` per
    second (``burst`` defaults to ``max(1, floor(rate))``); exactly ``burst`` messages pass
    at once, and in any interval of ``w`` seconds at most ``burst + rate * w`` pass.
    ``bytes_per_second`` + ``bytes_burst``: the same, counting payload bytes (``bytes_burst``
    defaults to ``max(65536, bytes_per_second)``); a message larger than ``bytes_burst``
    never passes. ``per_hour`` / ``per_day``: messages allowed per local hour and local day
    of the rule's ``timezone`` (a DST day has 23 or 25 hours; the repeated hour of a DST
    change is a window of its own). An override replaces all of the rule's limits for that
    device; limits it leaves unset do not apply. A rule (or override) without any limit
    exempts its topics (no state is kept).

Device registry quotas (``ingestd devices add NAME --quota-rate R --quota-burst B``)
    A device with a quota in the registry always gets it. Where a rule matches its topic,
    the registry's rate and burst replace that rule's (its other limits stay); where none
    does, the device counts under the rule :data:`REGISTRY` (its last index, after the
    configured rules), whose only limits are the registry's rate and burst. Its drops,
    notices and metrics say ``rule: registry``, so a rule of that name cannot be configured.

Memory backend
    Per-device state lives in flat arrays indexed by a slot (64 bytes per device, plus a
    dict entry and the device's name: about 200 bytes in all); checking a known device
    allocates nothing that outlives the call. A slot is freed once its device has been idle
    for ``quotas.idle_expiry`` (noticed within twice that, or a second) *and* forgetting it
    changes nothing: its buckets are full again and its hour/day counts belong to past
    windows. So a device that used up its daily quota is kept until local midnight: pausing
    cannot reset a quota. Freed slots are reused. Expiry runs when a new device arrives (the
    only way memory grows) and whenever :meth:`MemoryLimiter.sweep` is called.

Redis backend
    One string per rule and device, ``ingestd:quota:<rule name>:<device>``, with a PEXPIRE
    that follows the same rule as the memory backend's expiry (idle_expiry after the last
    allowed message, longer while its state still matters). Buckets run on Redis's clock
    (``TIME`` inside the script, so instances need not agree); hour and day window ids come
    from the caller's wall clock, and a count never goes back to an older window.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import redis.asyncio
from redis.exceptions import NoScriptError, RedisError

from ingestd.config import TEMPLATE_VAR, QuotaLimits, QuotaRule, QuotasSection
from ingestd.errors import ConfigError, IngestdError

__all__ = [
    "ALLOWED",
    "BYTES",
    "DAY",
    "HOUR",
    "RATE",
    "REGISTRY",
    "VERDICT_NAMES",
    "WARNING",
    "MemoryLimiter",
    "QuotaBackendUnavailable",
    "QuotaRules",
    "RedisLimiter",
    "check_rules",
]

ALLOWED: Final = 0
"""Within every limit: the message goes on (and was counted)."""
RATE: Final = 1
"""Over ``rate`` (with ``burst``)."""
BYTES: Final = 2
"""Over ``bytes_per_second`` (with ``bytes_burst``)."""
HOUR: Final = 3
"""Over ``per_hour`` in the current local hour."""
DAY: Final = 4
"""Over ``per_day`` in the current local day."""
VERDICT_NAMES: Final = ("allowed", "rate", "bytes_per_second", "per_hour", "per_day")
"""``VERDICT_NAMES[verdict]``: a label for metrics and logs (the limit's config key)."""

REGISTRY: Final = "registry"
"""The name of the rule a device counts under by its registry quota alone (no rule matches
its topic): in metrics, notices, ``ingestd quotas`` and the Redis keys."""

WARNING = "warning: "
"""Prefix of the problems :func:`check_rules` reports that do not stop the daemon."""

# Slack on the GCRA comparisons, relative to the burst: float rounding must not turn the
# burst-th message of an instant away. It admits nothing extra below a burst of ~10**9.
_SLACK = 1 + 1e-9
_TOPIC_CACHE_MAX = 4096  # about 1 MiB when full (~240 B a topic)


class QuotaBackendUnavailable(IngestdError):
    """The Redis quota backend failed or answered too late; decide this batch locally."""

    retriable = True


# --- rules ----------------------------------------------------------------------------------


class _Limits:
    """One set of limits, compiled: intervals in seconds, ``0`` where a limit is unset."""

    __slots__ = (
        "byte_interval",
        "bytes_limit",
        "interval",
        "per_day",
        "per_hour",
        "rate_limit",
        "rule",
        "unlimited",
    )

    def __init__(self, rule: int, limits: QuotaLimits) -> None:
        self.rule = rule
        self.interval = 0.0
        self.rate_limit = 0.0
        if limits.rate is not None:
            burst = limits.burst if limits.burst is not None else max(1, math.floor(limits.rate))
            self.interval = 1.0 / limits.rate
            self.rate_limit = burst * self.interval * _SLACK
        self.byte_interval = 0.0
        self.bytes_limit = 0.0
        if limits.bytes_per_second is not None:
            bps = limits.bytes_per_second
            burst_bytes = limits.bytes_burst if limits.bytes_burst is not None else max(65536, bps)
            self.byte_interval = 1.0 / bps
            self.bytes_limit = burst_bytes * self.byte_interval * _SLACK
        self.per_hour = limits.per_hour or 0
        self.per_day = limits.per_day or 0
        self.unlimited = not (self.interval or self.byte_interval or self.per_hour or self.per_day)


class _Pattern:
    """A rule's topic: MQTT levels (variables as ``+``) and where its variables sit."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.levels: list[str] = []
        self.variables: dict[str, int] = {}
        self.problems: list[str] = []
        parts = topic.split("/")
        for i, level in enumerate(parts):
            match = TEMPLATE_VAR.match(level)
            if match:
                name = match.group(1)
                if name in self.variables:
                    self.problems.append(f"topic {topic!r}: variable {{{name}}} appears twice")
                self.variables[name] = i
                self.levels.append("+")
            elif level == "#" and i < len(parts) - 1:
                self.problems.append(f"topic {topic!r}: '#' must be the last level")
            elif level in ("+", "#"):
                self.levels.append(level)
            elif any(c in level for c in "+#{}") or "\0" in level:
                self.problems.append(
                    f"topic {topic!r}: level {level!r} must be a literal, '+', '#' or a whole "
                    "{name} (lowercase letters, digits, _)"
                )
            else:
                self.levels.append(level)
        if parts[0] == "$share":
            self.problems.append(
                f"topic {topic!r}: a rule matches the topics of messages, which never start "
                "with $share; drop the '$share/<group>/' prefix"
            )


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: ZoneInfo('America')
        return None


def _covers(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether filter ``a`` matches every topic filter ``b`` matches."""
    for i, want in enumerate(a):
        if want == "#":
            return not (i == 0 and b[0].startswith("$"))
        if i >= len(b) or b[i] == "#":
            return False
        if want == "+":
            if i == 0 and b[0].startswith("$"):
                return False
        elif want != b[i]:
            return False
    return len(a) == len(b)


def _overlap(a: Sequence[str], b: Sequence[str]) -> str | None:
    """A topic both filters match (``x`` for any level), or None when there is none."""
    topic: list[str] = []
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x == "#" or y == "#":
            other = b if x == "#" else a
            if i == 0 and other[0] not in ("+", "#") and other[0].startswith("$"):
                return None
            topic += ["x" if lvl == "+" else lvl for lvl in other[i:] if lvl != "#"]
            break
        if x is None or y is None:
            return None
        if x == "+" or y == "+":
            literal = y if x == "+" else x
            if i == 0 and literal.startswith("$"):
                return None
            topic.append("x" if literal == "+" else literal)
        elif x != y:
            return None
        else:
            topic.append(x)
    return "/".join(topic) or "x"


def check_rules(section: QuotasSection) -> list[str]:
    """Every problem with ``quotas.rules``, for ``ingestd check``.

    Errors stop the daemon (:class:`QuotaRules` raises :class:`ConfigError` with them): a
    topic that is not a filter, a ``key`` that is not a variable of the topic, an unknown
    timezone, a duplicate name (names key the Redis state), and an unreachable rule (an
    earlier rule matches every topic it matches). Warnings start with :data:`WARNING`:
    rules that overlap partially (the first match wins for topics both match; a general
    rule after a more specific one is the intended pattern and not reported), override
    keys that no topic level can hold, a burst without its rate.
    """
    problems: list[str] = []
    patterns: list[_Pattern | None] = []
    names: dict[str, int] = {}
    for index, rule in enumerate(section.rules):
        where = f"quotas.rules[{index}] {rule.name!r}"
        errors: list[str] = []
        warnings: list[str] = []
        pattern = _Pattern(rule.topic)
        errors += pattern.problems
        if rule.name in names:
            errors.append(
                f"name {rule.name!r} is also the name of quotas.rules[{names[rule.name]}]; "
                "names must be unique (they key the shared Redis state)"
            )
        names.setdefault(rule.name, index)
        if rule.name == REGISTRY:
            errors.append(
                f"name {REGISTRY!r} is reserved: it is the rule of devices limited by their"
                " quota in the device registry alone (ingestd devices add --quota-rate)"
            )
        key = TEMPLATE_VAR.match(rule.key)
        if key is None:
            errors.append(f"key {rule.key!r} must be a template variable such as '{{device}}'")
        elif key.group(1) not in pattern.variables:
            if pattern.variables:
                listed = ", ".join(f"{{{v}}}" for v in pattern.variables)
                errors.append(
                    f"key {rule.key!r} is not a variable of topic {rule.topic!r} (it has {listed})"
                )
            else:
                errors.append(
                    f"key {rule.key!r} is not in topic {rule.topic!r}: write the level that "
                    f"holds the device as {rule.key} (e.g. 'farm/+/{{device}}/#'); a plain "
                    "MQTT filter does not say which level that is"
                )
        if _zone(rule.timezone) is None:
            errors.append(
                f"unknown timezone {rule.timezone!r} (an IANA name like Europe/Amsterdam)"
            )
        if key is not None and key.group(1) in pattern.variables:
            at_root = pattern.variables[key.group(1)] == 0
            for device in rule.overrides:
                why = _unmatchable(device, at_root)
                if why:
                    warnings.append(f"override {device!r} can never match: {why}")
        labelled: list[tuple[str, QuotaLimits]] = [("", rule)]
        labelled += [(f"override {d!r}: ", o) for d, o in rule.overrides.items()]
        for label, limits in labelled:
            if limits.burst is not None and limits.rate is None:
                warnings.append(f"{label}burst has no effect without rate")
            if limits.bytes_burst is not None and limits.bytes_per_second is None:
                warnings.append(f"{label}bytes_burst has no effect without bytes_per_second")
        if not errors:
            for earlier, other in enumerate(patterns):
                if other is None:
                    continue
                them = f"quotas.rules[{earlier}] {section.rules[earlier].name!r}"
                if _covers(other.levels, pattern.levels):
                    errors.append(
                        f"unreachable: {them} (topic {other.topic!r}) comes first and matches "
                        "every topic this rule matches; put the more specific rule first"
                    )
                elif not _covers(pattern.levels, other.levels):
                    example = _overlap(other.levels, pattern.levels)
                    if example is not None:
                        warnings.append(
                            f"overlaps {them} (topic {other.topic!r}): a topic such as "
                            f"{example!r} matches both and counts under {them} only"
                        )
        patterns.append(None if errors else pattern)
        problems += [f"{where}: {e}" for e in errors]
        problems += [f"{WARNING}{where}: {w}" for w in warnings]
    if section.backend == "redis" and section.redis_timeout == 0 and section.rules:
        problems.append(
            f"{WARNING}quotas.redis_timeout = 0: every Redis check times out and falls back "
            "to local limits"
        )
    return problems


def _unmatchable(device: str, at_root: bool) -> str | None:
    if "/" in device:
        return "a topic level never holds '/'"
    if "+" in device or "#" in device:
        return "a topic level never holds '+' or '#'"
    if "\0" in device:
        return "a topic never holds NUL"
    if at_root and device.startswith("$"):
        return "a variable in the first level never matches a level starting with '$'"
    return None


class QuotaRules:
    """``quotas.rules`` compiled for :meth:`match`; raises ConfigError on a bad rule.

    Rule indexes run over the configured rules, then :attr:`registry` (named
    :data:`REGISTRY`): ``names`` and ``zones`` cover all of them, ``len()`` counts the
    configured ones. ``warnings`` holds what :func:`check_rules` warns about (for the
    daemon's start log).
    """

    def __init__(self, section: QuotasSection) -> None:
        problems = check_rules(section)
        errors = [p for p in problems if not p.startswith(WARNING)]
        if errors:
            count = len(errors)
            raise ConfigError(
                f"invalid quota rules ({count} problem{'s' if count > 1 else ''}):"
                + "".join(f"\n  {e}" for e in errors)
            )
        self.warnings = [p.removeprefix(WARNING) for p in problems if p.startswith(WARNING)]
        self.rules: tuple[QuotaRule, ...] = tuple(section.rules)
        self.registry = len(self.rules)
        """The index of the rule :data:`REGISTRY`."""
        self.names: tuple[str, ...] = (*(rule.name for rule in section.rules), REGISTRY)
        self.zones: tuple[ZoneInfo, ...] = (
            *(ZoneInfo(rule.timezone) for rule in self.rules),
            ZoneInfo("UTC"),  # never used: the registry sets no hour or day limits
        )
        self.limits: tuple[_Limits, ...] = (
            *(_Limits(i, r) for i, r in enumerate(self.rules)),
            _Limits(self.registry, QuotaLimits()),  # a device without a registry quota
        )
        self.overrides: tuple[dict[str, _Limits], ...] = (
            *(
                {device: _Limits(i, limits) for device, limits in rule.overrides.items()}
                for i, rule in enumerate(self.rules)
            ),
            {},
        )
        # Per rule: its index, the exact level count (-1 with '#'), the least level count,
        # the literal levels to compare, where the key sits, whether '$' topics are excluded.
        self._compiled: list[tuple[int, int, int, tuple[tuple[int, str], ...], int, bool]] = []
        for index, rule in enumerate(self.rules):
            pattern = _Pattern(rule.topic)
            levels = pattern.levels
            name = TEMPLATE_VAR.match(rule.key).group(1)  # type: ignore[union-attr] # checked
            wild = levels[-1] == "#"
            checks = tuple((i, lvl) for i, lvl in enumerate(levels) if lvl not in ("+", "#"))
            self._compiled.append(
                (
                    index,
                    -1 if wild else len(levels),
                    len(levels) - 1 if wild else len(levels),  # a/# also matches a
                    checks,
                    pattern.variables[name],
                    levels[0] in ("+", "#"),
                )
            )
        self._cache: dict[str, tuple[int, str] | None] = {}
        # Per-device rate and burst from the device registry (PostgreSQL), compiled per rule.
        self._registry: dict[str, tuple[float, int | None]] = {}
        self._registry_limits: dict[tuple[int, str], _Limits] = {}

    def __len__(self) -> int:
        """The configured rules (without :attr:`registry`)."""
        return len(self.rules)

    def find(self, topic: str, device: str) -> tuple[int, str] | None:
        """:meth:`match`, else ``(registry, device)`` when the registry gives ``device`` (the
        device its message came from) a quota of its own, else None."""
        found = self.match(topic) if self.rules else None
        if found is None and device in self._registry:
            return self.registry, device
        return found

    def match(self, topic: str) -> tuple[int, str] | None:
        """``(rule index, device key)`` of the first rule matching ``topic``, or None."""
        cache = self._cache
        try:
            return cache[topic]
        except KeyError:
            pass
        # Not decode's _filter_matches: comparing only the literal levels is 2.5x faster.
        levels = topic.split("/")
        count = len(levels)
        found: tuple[int, str] | None = None
        for index, size, least, checks, key_at, no_dollar in self._compiled:
            if count == size or (size < 0 and count >= least):
                for i, literal in checks:
                    if levels[i] != literal:
                        break
                else:
                    if not (no_dollar and topic[:1] == "$"):
                        found = (index, levels[key_at])
                        break
        # A fleet has a bounded set of topics; clearing when full keeps memory bounded
        # against a flood of new ones (the cache only saves the split and the compares).
        if len(cache) >= _TOPIC_CACHE_MAX:
            cache.clear()
        cache[topic] = found
        return found

    def limits_for(self, rule: int, device: str) -> _Limits:
        """The limits a device counts against: the registry's rate and burst for it (on
        the rule's other limits; under :attr:`registry`, alone), else its override in the
        rule, else the rule's (under :attr:`registry`: none, once its quota is removed)."""
        if device in self._registry:
            found = self._registry_limits.get((rule, device))
            if found is None:
                rate, burst = self._registry[device]
                base = self.rules[rule] if rule < self.registry else QuotaLimits()
                found = _Limits(rule, base.model_copy(update={"rate": rate, "burst": burst}))
                self._registry_limits[(rule, device)] = found
            return found
        return self.overrides[rule].get(device) or self.limits[rule]

    def set_registry_limits(self, device: str, rate: float | None, burst: int | None) -> None:
        """The device registry's quota for ``device`` (None: none; the rules apply)."""
        if rate is None:
            self._registry.pop(device, None)
        else:
            self._registry[device] = (rate, burst)
        for rule in range(len(self.names)):
            self._registry_limits.pop((rule, device), None)


# --- period windows -------------------------------------------------------------------------


class _Windows:
    """The current local hour and day of one time zone, recomputed when the clock leaves them.

    An hour is identified by the epoch second it starts at (so the repeated hour of a DST
    change is a window of its own), a day by its local date's ordinal.
    """

    __slots__ = ("day_end", "day_id", "hour_end", "hour_id", "valid_from", "valid_until", "zone")

    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self.valid_from = self.valid_until = 0.0
        self.hour_id = self.hour_end = self.day_id = self.day_end = 0

    def at(self, wall: float) -> None:
        if self.valid_from <= wall < self.valid_until:
            return
        second = math.floor(wall)
        local = datetime.fromtimestamp(second, self.zone)
        # Offsets change on local hour boundaries (whole or half hours), so the local hour
        # began minute:second ago, in real seconds.
        hour_start = second - local.minute * 60 - local.second
        today = local.date()
        day_start = self._midnight(today)
        day_end = self._midnight(today + timedelta(days=1))
        self.hour_id = hour_start
        self.hour_end = hour_start + 3600
        self.day_id = today.toordinal()
        self.day_end = day_end
        self.valid_from = max(hour_start, day_start)
        self.valid_until = min(self.hour_end, day_end)
        if not self.valid_from <= wall < self.valid_until:  # a zone stranger than assumed
            self.valid_from, self.valid_until = second, second + 1

    def _midnight(self, day: date) -> int:
        # fold=0: a midnight skipped by a DST change maps to the instant of the change.
        return int(datetime(day.year, day.month, day.day, tzinfo=self.zone).timestamp())


# --- memory backend -------------------------------------------------------------------------


class MemoryLimiter:
    """Quotas kept in this process: O(1) per message, state bounded by idle expiry.

    ``clock`` (monotonic seconds) drives the buckets and expiry; ``wallclock`` (epoch
    seconds) places messages in local hours and days.
    """

    def __init__(
        self,
        rules: QuotaRules,
        section: QuotasSection,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self._rules = rules
        self._clock = clock
        self._wallclock = wallclock
        self._idle = section.idle_expiry
        # How long a slot waits in the queue before the sweep looks at it (again): at least
        # a second, so that a tiny idle_expiry cannot make every new device sweep them all.
        self._recheck = max(section.idle_expiry, 1.0)
        self._windows = [_Windows(zone) for zone in rules.zones]
        self._slots: list[dict[str, int]] = [{} for _ in rules.names]
        # One entry per slot: when the device was last allowed a message (and its buckets'
        # debts, in seconds, as of then), its hour and day windows and counts.
        self._at = array("d")
        self._rate_debt = array("d")
        self._bytes_debt = array("d")
        self._hour = array("q")
        self._hour_count = array("q")
        self._day = array("q")
        self._day_count = array("q")
        self._queued_at = array("d")
        self._keys: list[str | None] = []
        self._limits: list[_Limits | None] = []
        self._free: list[int] = []
        # Slots in the order they were last looked at by the sweep: each is looked at again
        # idle_expiry later, so a sweep touches only slots that may be due.
        self._queue: deque[int] = deque()

    @property
    def devices(self) -> int:
        """Devices with state now."""
        return len(self._keys) - len(self._free)

    @property
    def capacity(self) -> int:
        """Slots allocated (in use or free for reuse)."""
        return len(self._keys)

    def allow(self, rule: int, device: str, nbytes: int) -> int:
        """Count one message of ``nbytes`` payload bytes; its verdict (ALLOWED, RATE, ...)."""
        slot = self._slots[rule].get(device)
        now = self._clock()
        if slot is None:
            limits = self._rules.limits_for(rule, device)
            if limits.unlimited:
                return ALLOWED
            slot = self._open(rule, device, limits, now)
        else:
            limits = self._limits[slot]  # type: ignore[assignment] # set while in use
        elapsed = now - self._at[slot]
        rate_debt = 0.0
        interval = limits.interval
        if interval:
            rate_debt = self._rate_debt[slot] - elapsed
            # max() would be a call on the hot path
            rate_debt = rate_debt + interval if rate_debt > 0.0 else interval
            if rate_debt > limits.rate_limit:
                return RATE
        bytes_debt = 0.0
        byte_interval = limits.byte_interval
        if byte_interval:
            bytes_debt = self._bytes_debt[slot] - elapsed
            cost = nbytes * byte_interval
            bytes_debt = bytes_debt + cost if bytes_debt > 0.0 else cost
            if bytes_debt > limits.bytes_limit:
                return BYTES
        if limits.per_hour or limits.per_day:
            windows = self._windows[rule]
            wall = self._wallclock()
            if not windows.valid_from <= wall < windows.valid_until:  # a new hour (or day)
                windows.at(wall)
            hour = self._hour[slot]
            hour_count = 0
            if limits.per_hour:
                if hour >= windows.hour_id:
                    hour_count = self._hour_count[slot] + 1
                else:
                    hour, hour_count = windows.hour_id, 1
                if hour_count > limits.per_hour:
                    return HOUR
            day = self._day[slot]
            day_count = 0
            if limits.per_day:
                if day >= windows.day_id:
                    day_count = self._day_count[slot] + 1
                else:
                    day, day_count = windows.day_id, 1
                if day_count > limits.per_day:
                    return DAY
            self._hour[slot] = hour
            self._hour_count[slot] = hour_count
            self._day[slot] = day
            self._day_count[slot] = day_count
        self._at[slot] = now
        self._rate_debt[slot] = rate_debt
        self._bytes_debt[slot] = bytes_debt
        return ALLOWED

    def allow_batch(self, items: Sequence[tuple[int, str, int]]) -> list[int]:
        """``allow`` for each ``(rule, device, nbytes)`` in order (RedisLimiter's shape)."""
        allow = self.allow
        return [allow(rule, device, nbytes) for rule, device, nbytes in items]

    def _open(self, rule: int, device: str, limits: _Limits, now: float) -> int:
        queue = self._queue
        # New devices are the only way memory grows, so they pay for the expiry that is due.
        if queue and self._queued_at[queue[0]] + self._recheck <= now:
            self.sweep(now)
        if self._free:
            slot = self._free.pop()
            self._at[slot] = now
            self._rate_debt[slot] = self._bytes_debt[slot] = 0.0
            self._hour[slot] = self._hour_count[slot] = 0
            self._day[slot] = self._day_count[slot] = 0
            self._queued_at[slot] = now
            self._keys[slot] = device
            self._limits[slot] = limits
        else:
            slot = len(self._keys)
            self._at.append(now)
            self._rate_debt.append(0.0)
            self._bytes_debt.append(0.0)
            self._hour.append(0)
            self._hour_count.append(0)
            self._day.append(0)
            self._day_count.append(0)
            self._queued_at.append(now)
            self._keys.append(device)
            self._limits.append(limits)
        queue.append(slot)
        self._slots[rule][device] = slot
        return slot

    def relimit(self, device: str) -> None:
        """Apply ``device``'s current limits to its state now (after a registry change): its
        buckets start full under the new rate (a debt is measured in the old rate's time),
        its hour and day counts go on."""
        for rule, slots in enumerate(self._slots):
            slot = slots.get(device)
            if slot is not None:
                self._limits[slot] = self._rules.limits_for(rule, device)
                self._rate_debt[slot] = 0.0
                self._bytes_debt[slot] = 0.0

    def sweep(self, now: float | None = None) -> int:
        """Forget devices idle for ``idle_expiry`` whose state no longer matters; how many.

        Runs by itself when a new device arrives; call it every few seconds to give memory
        back sooner. Each call costs O(slots that came due), amortised O(1) per device per
        ``idle_expiry``.
        """
        if now is None:
            now = self._clock()
        queue = self._queue
        queued_at = self._queued_at
        idle = self._idle
        recheck = self._recheck
        freed = 0
        wall: float | None = None
        for _ in range(len(queue)):  # each slot at most once, even with idle_expiry 0
            if queued_at[queue[0]] + recheck > now:
                break
            slot = queue.popleft()
            limits = self._limits[slot]
            assert limits is not None
            elapsed = now - self._at[slot]
            keep = (
                elapsed < idle
                or self._rate_debt[slot] > elapsed
                or self._bytes_debt[slot] > elapsed
            )
            if not keep and (limits.per_hour or limits.per_day):
                if wall is None:
                    wall = self._wallclock()
                windows = self._windows[limits.rule]
                windows.at(wall)
                keep = bool(
                    (self._hour_count[slot] and self._hour[slot] >= windows.hour_id)
                    or (self._day_count[slot] and self._day[slot] >= windows.day_id)
                )
            if keep:
                queued_at[slot] = now
                queue.append(slot)
                continue
            del self._slots[limits.rule][self._keys[slot]]  # type: ignore[arg-type]
            self._keys[slot] = None
            self._limits[slot] = None
            self._free.append(slot)
            freed += 1
        return freed


# --- redis backend --------------------------------------------------------------------------

# KEYS[i]: the state of item i. ARGV[1]: idle expiry (ms); ARGV[2]: the number of limit
# sets; then the limit sets (10 values each, see RedisLimiter._limit_set); last, the items
# packed as little-endian uint32 pairs (limit set, payload bytes): one argument instead of
# two per item halves the client's encoding work. Times are microseconds of Redis TIME.
# A state is 7 packed doubles (GET + SET PX: two calls per item, where a hash took three):
# when the device was last allowed a message, its rate and bytes debts as of then (relative,
# so that rounding stays tiny next to an interval: absolute microseconds would round to
# 0.25 us), its hour window id and count, its day window id and count. The verdicts come
# back as one string of digits: one reply to parse, not one per item.
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local now_ms = now / 1000
local idle = tonumber(ARGV[1])
local nsets = tonumber(ARGV[2])
local sets = {}
for k = 0, nsets - 1 do
  local set = {}
  for j = 1, 10 do set[j] = tonumber(ARGV[2 + k * 10 + j]) end
  sets[k] = set
end
local items = ARGV[3 + nsets * 10]
local pos = 1
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local index, nbytes
  index, nbytes, pos = struct.unpack('<I4I4', items, pos)
  local lim = sets[index]
  local at, rd, bd, h, hn, d, dn = now, 0, 0, 0, 0, 0, 0
  local blob = redis.call('GET', key)
  if blob then at, rd, bd, h, hn, d, dn = struct.unpack('<ddddddd', blob) end
  local elapsed = now - at
  if elapsed < 0 then elapsed = 0 end
  local verdict = 0
  if lim[1] > 0 then
    rd = rd - elapsed
    if rd < 0 then rd = 0 end
    rd = rd + lim[1]
    if rd > lim[2] then verdict = 1 end
  else
    rd = 0
  end
  if verdict == 0 then
    if lim[3] > 0 then
      bd = bd - elapsed
      if bd < 0 then bd = 0 end
      bd = bd + nbytes * lim[3]
      if bd > lim[4] then verdict = 2 end
    else
      bd = 0
    end
  end
  if verdict == 0 and lim[5] > 0 then
    if h >= lim[7] then hn = hn + 1 else h = lim[7]; hn = 1 end
    if hn > lim[5] then verdict = 3 end
  end
  if verdict == 0 and lim[6] > 0 then
    if d >= lim[9] then dn = dn + 1 else d = lim[9]; dn = 1 end
    if dn > lim[6] then verdict = 4 end
  end
  if verdict == 0 then
    if lim[5] == 0 then hn = 0 end
    if lim[6] == 0 then dn = 0 end
    local ttl = idle
    if rd / 1000 > ttl then ttl = rd / 1000 end
    if bd / 1000 > ttl then ttl = bd / 1000 end
    if hn > 0 and lim[8] - now_ms > ttl then ttl = lim[8] - now_ms end
    if dn > 0 and lim[10] - now_ms > ttl then ttl = lim[10] - now_ms end
    redis.call('SET', key, struct.pack('<ddddddd', now, rd, bd, h, hn, d, dn),
      'PX', math.ceil(ttl) + 1)
  end
  out[i] = verdict
end
return table.concat(out)
"""


class RedisLimiter:
    """Quotas kept in Redis, shared by every instance: one script call per batch.

    Keys are ``<prefix><rule name>:<device>`` (a 56-byte string per device and rule),
    expiring like the memory backend's state. Redis's own clock drives the buckets, so
    instances need not agree on time; hour and day windows come from ``wallclock`` in the
    rule's timezone (an instance whose clock lags counts on in the newer window). Any Redis
    error, or no answer within ``quotas.redis_timeout``, raises
    :class:`QuotaBackendUnavailable`; after one, calls fail at once for ``retry_after``
    seconds (a dead Redis must not cost every batch a timeout), then Redis is tried again.
    Topics of exempt rules and devices never need Redis.
    """

    def __init__(
        self,
        rules: QuotaRules,
        section: QuotasSection,
        client: redis.asyncio.Redis,
        *,
        wallclock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        retry_after: float = 1.0,
        prefix: str = "ingestd:quota:",
    ) -> None:
        self._rules = rules
        self._client = client
        self._timeout = section.redis_timeout
        self._idle_ms = max(1, math.ceil(section.idle_expiry * 1000))
        self._wallclock = wallclock
        self._clock = clock
        self._retry_after = retry_after
        self._windows = [_Windows(zone) for zone in rules.zones]
        self._prefixes = [f"{prefix}{name}:" for name in rules.names]
        self._sha: str | None = None
        self._down_until = -math.inf
        self.last_error: str | None = None
        """Why the last call failed, or None when it succeeded."""

    @property
    def available(self) -> bool:
        """False from a failure until the next call that reaches Redis succeeds."""
        return self.last_error is None

    async def allow_batch(self, items: Sequence[tuple[int, str, int]]) -> list[int]:
        """The verdict of each ``(rule, device, nbytes)``, applied in order, atomically."""
        verdicts = [ALLOWED] * len(items)
        keys: list[str] = []
        items_args: list[int] = []
        positions: list[int] = []
        sets: dict[int, int] = {}
        set_args: list[Any] = []
        wall = self._wallclock()
        for position, (rule, device, nbytes) in enumerate(items):
            limits = self._rules.limits_for(rule, device)
            if limits.unlimited:
                continue
            index = sets.get(id(limits))
            if index is None:
                index = sets[id(limits)] = len(sets)
                set_args += self._limit_set(limits, wall)
            keys.append(self._prefixes[rule] + device)
            items_args += (index, nbytes)
            positions.append(position)
        if not keys:
            return verdicts
        packed = struct.pack(f"<{len(items_args)}I", *items_args)
        if self._clock() < self._down_until:
            raise QuotaBackendUnavailable(f"Redis quota backend unavailable: {self.last_error}")
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._run(keys, [self._idle_ms, len(sets), *set_args, packed])
        except (RedisError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
                reason = f"no answer within {self._timeout * 1000:g} ms"
            self.last_error = reason
            self._down_until = self._clock() + self._retry_after
            raise QuotaBackendUnavailable(f"Redis quota backend unavailable: {reason}") from exc
        self.last_error = None
        zero = ord("0")
        for position, digit in zip(positions, result, strict=True):
            verdicts[position] = digit - zero
        return verdicts

    def _limit_set(self, limits: _Limits, wall: float) -> list[Any]:
        windows = self._windows[limits.rule]
        windows.at(wall)
        us = 1_000_000
        return [
            limits.interval * us,
            limits.rate_limit * us,
            limits.byte_interval * us,
            limits.bytes_limit * us,
            limits.per_hour,
            limits.per_day,
            windows.hour_id,
            windows.hour_end * 1000,
            windows.day_id,
            windows.day_end * 1000,
        ]

    async def _run(self, keys: list[str], args: list[Any]) -> bytes:
        client = self._client
        if self._sha is None:
            self._sha = await client.script_load(_SCRIPT)
        try:
            result = await client.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load it again
            self._sha = await client.script_load(_SCRIPT)
            result = await client.evalsha(self._sha, len(keys), *keys, *args)
        if isinstance(result, str):  # a client made with decode_responses=True
            result = result.encode()
        if not isinstance(result, bytes) or len(result) != len(keys):
            raise RedisError(f"the quota script answered {result!r:.80}")
        return result
