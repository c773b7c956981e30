"""The quota stage: admit a message, or drop it and tell the device (at most once a window).

Wraps :mod:`ingestd.quota` for the daemon: the memory backend decides each message at once;
the Redis backend decides a batch per round trip, and when Redis is unreachable or slow the
batch is decided by local limits instead (said once in the log, in ``/healthz`` and in
``ingestd_quota_shared``), until Redis answers again. Ingestion never waits on Redis longer
than ``quotas.redis_timeout``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
import redis.asyncio as aioredis

from ingestd.config import QuotasSection
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.quota import (
    ALLOWED,
    VERDICT_NAMES,
    MemoryLimiter,
    QuotaBackendUnavailable,
    QuotaRules,
    RedisLimiter,
)

__all__ = ["QuotaItem", "Throttle"]

log = get_logger("quota")

QuotaItem = tuple[int, str, int]
"""(rule index, device, payload bytes)."""

_TRACKED_DEVICES = 10_000


@dataclass(slots=True)
class _Throttled:
    rule: str
    limit: str
    dropped: int = 0
    dropped_since_notice: int = 0
    last_notice: float = float("-inf")
    last_drop: float = 0.0
    labels: set[tuple[str, str]] = field(default_factory=set)
    """Every (rule, limit) of ``ingestd_quota_dropped`` this device has samples under: all
    of them go with the device (a device can be dropped under several rules and limits)."""


class Throttle:
    def __init__(
        self,
        section: QuotasSection,
        metrics: Metrics,
        health: Health,
        publish: Callable[[str, bytes], bool],
        *,
        redis: aioredis.Redis | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``redis``: the daemon's shared client (it closes it); used by the redis backend."""
        self._section = section
        self._metrics = metrics
        self._health = health
        self._publish = publish
        self._clock = clock
        self.rules = QuotaRules(section)
        self._memory = MemoryLimiter(self.rules, section)
        self._redis: RedisLimiter | None = None
        if section.backend == "redis" and redis is not None:
            self._redis = RedisLimiter(self.rules, section, redis, retry_after=section.redis_retry)
        self._shared = self._redis is not None
        self._throttled: OrderedDict[str, _Throttled] = OrderedDict()
        for warning in self.rules.warnings:
            log.warning("quota rules", problem=warning)
        if self._redis is not None:
            metrics.quota_shared.set(1)
            health.ok("quota", "shared limits in Redis")

    def set_device_limits(self, device: str, rate: float | None, burst: int | None) -> None:
        """The device registry's quota for one device (its rate and burst replace those of
        the rule its topic matches; with no rule matching, they are its limits, rule
        ``registry``); applies at once, to its current state too."""
        if rate is not None and math.isnan(rate):  # `devices add` refuses it; SQL may not
            log.warning("device registry: quota_rate NaN ignored", device=device)
            rate = None
        self.rules.set_registry_limits(device, rate, burst)
        self._memory.relimit(device)

    @property
    def batched(self) -> bool:
        """Whether decisions are made per batch (Redis) rather than per message."""
        return self._redis is not None

    def match(self, topic: str, nbytes: int, device: str) -> QuotaItem | None:
        """What a message of ``device`` on ``topic`` counts against (None: nothing)."""
        found = self.rules.find(topic, device)
        return None if found is None else (found[0], found[1], nbytes)

    def allow(self, item: QuotaItem) -> bool:
        """Decide one message with local limits (the memory backend)."""
        verdict = self._memory.allow(*item)
        if verdict == ALLOWED:
            return True
        self._dropped(item, verdict)
        return False

    async def allow_batch(self, items: Sequence[QuotaItem]) -> list[bool]:
        """Decide a batch with shared limits, or local ones while Redis is away."""
        assert self._redis is not None
        try:
            verdicts = await self._redis.allow_batch(items)
        except QuotaBackendUnavailable as exc:
            if self._shared:
                self._shared = False
                self._metrics.quota_shared.set(0)
                detail = f"Redis unavailable ({exc}): enforcing local limits per instance"
                self._health.problem("quota", detail)
                log.error("quota falls back to local limits", error=str(exc))
            verdicts = self._memory.allow_batch(items)
        else:
            if not self._shared:
                self._shared = True
                self._metrics.quota_shared.set(1)
                self._health.ok("quota", "shared limits in Redis")
                log.warning("quota back on shared limits in Redis")
        allowed = []
        for item, verdict in zip(items, verdicts, strict=True):
            if verdict != ALLOWED:
                self._dropped(item, verdict)
            allowed.append(verdict == ALLOWED)
        return allowed

    def _dropped(self, item: QuotaItem, verdict: int) -> None:
        rule, device, _ = item
        rule_name = self.rules.names[rule]
        limit = VERDICT_NAMES[verdict]
        self._metrics.quota_dropped.labels(rule_name, device, limit).inc()
        entry = self._throttled.get(device)
        if entry is None:
            entry = self._throttled[device] = _Throttled(rule_name, limit)
            if len(self._throttled) > _TRACKED_DEVICES:
                # The metric forgets the device with the table: /metrics stays bounded.
                gone, old = self._throttled.popitem(last=False)
                for old_rule, old_limit in old.labels:
                    with contextlib.suppress(KeyError):
                        self._metrics.quota_dropped.remove(old_rule, gone, old_limit)
        else:
            self._throttled.move_to_end(device)
        now = self._clock()
        entry.rule, entry.limit = rule_name, limit
        entry.labels.add((rule_name, limit))
        entry.dropped += 1
        entry.dropped_since_notice += 1
        entry.last_drop = now
        if now - entry.last_notice >= self._section.notice_interval:
            self._notify(device, entry, now)

    def _notify(self, device: str, entry: _Throttled, now: float) -> None:
        notice = {
            "device": device,
            "rule": entry.rule,
            "limit": entry.limit,
            "dropped": entry.dropped_since_notice,
            "window_s": self._section.notice_interval,
            "at": time.time(),
        }
        topic = self._section.notice_topic.format(device=device)
        if self._publish(topic, orjson.dumps(notice)):
            self._metrics.quota_notices.inc()
        log.warning(
            "device over quota: dropping its messages",
            device=device,
            rule=entry.rule,
            limit=entry.limit,
            dropped=entry.dropped_since_notice,
        )
        entry.last_notice = now
        entry.dropped_since_notice = 0

    def top(self, count: int = 20) -> list[dict[str, object]]:
        """The devices throttled most recently dropped-from, most drops first."""
        now = self._clock()
        window = self._section.notice_interval
        recent = [(d, e) for d, e in self._throttled.items() if now - e.last_drop <= window]
        recent.sort(key=lambda pair: pair[1].dropped, reverse=True)
        return [
            {
                "device": device,
                "rule": e.rule,
                "limit": e.limit,
                "dropped": e.dropped,
                "last_drop_s_ago": round(now - e.last_drop, 1),
            }
            for device, e in recent[:count]
        ]

    def sweep(self) -> None:
        self._memory.sweep()
        self._metrics.quota_devices.set(self._memory.devices)
