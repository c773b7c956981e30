"""Membership: which ingestd instances of a cluster are alive, and what each is doing.

Every ``cluster.heartbeat`` an instance writes, in one pipelined round trip:

    ingestd:cluster:member:<instance>   a hash: instance, host, pid, version, started_at,
                                        beat_at, received_per_s, accepted_per_s,
                                        written_per_s (over the last heartbeat),
                                        spool_waiting, partitions ("0,5,9", the ones it
                                        owns); PEXPIRE 3 x heartbeat, so the hash of an
                                        instance that died is gone three beats later
    ingestd:cluster:members             a sorted set, instance -> beat_at: where readers
                                        find the hashes; a reader drops an instance
                                        whose hash expired

While Redis is down the instance goes on ingesting: one warning per outage, ``/healthz``
says ``degraded`` (component ``cluster``), and the next heartbeat that gets through
registers the instance again (a restarted Redis has forgotten it). A graceful stop takes
the instance out at once (:meth:`Members.leave`); a crash takes three heartbeats.

``ingestd status --cluster`` reads the same keys (:func:`list_members`,
:func:`lease_owners`); no daemon needs to answer it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import redis.asyncio
from redis.exceptions import RedisError

import ingestd
from ingestd.config import ClusterSection
from ingestd.errors import IngestdError
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics

__all__ = [
    "HEALTH_COMPONENT",
    "LEASE_PREFIX",
    "MEMBERS_KEY",
    "MEMBER_PREFIX",
    "ClusterUnavailable",
    "Member",
    "Members",
    "lease_owners",
    "list_members",
]

log = get_logger("cluster")

MEMBER_PREFIX = "ingestd:cluster:member:"
"""Redis key of an instance's hash: the prefix, then the instance's name."""
MEMBERS_KEY = "ingestd:cluster:members"
"""Sorted set of the instances, scored by their last heartbeat (Unix time)."""
LEASE_PREFIX = "ingestd:cluster:lease:"
"""Redis key of a partition's lease: the prefix, then the partition; ``<instance>:<token>``."""

HEALTH_COMPONENT = "heartbeat"
"""The ``/healthz`` component a failed heartbeat marks (ok again on the next that gets
through; Members says ok only on those changes, not at every beat)."""

_EXPIRY_BEATS = 3
"""A member's hash outlives its last heartbeat by this many heartbeats: one late beat (a
slow Redis, a busy event loop) must not make a live instance look dead."""

# Counters and the gauge a heartbeat reports, by their Prometheus sample names.
_RECEIVED = "ingestd_messages_received_total"
_ACCEPTED = "ingestd_messages_accepted_total"
_WRITTEN = "ingestd_points_written_total"
_SPOOL_WAITING = "ingestd_spool_records"

# KEYS[1]: the member's hash; KEYS[2]: the members set; ARGV[1]: the instance. Removes the
# instance from the set only if its hash is still gone, in one step: an instance that comes
# back between a reader's look and its removal stays listed.
_FORGET_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
"""


class ClusterUnavailable(IngestdError):
    """Redis failed or did not answer within redis.timeout; the cluster cannot be read."""

    retriable = True


class Member(TypedDict):
    """One live instance, as its last heartbeat described it."""

    instance: str
    host: str
    pid: int
    version: str
    started_at: float
    beat_at: float
    uptime: float
    """Seconds since the instance started (at the time of reading)."""
    since_beat: float
    """Seconds since its last heartbeat (at the time of reading)."""
    received_per_s: float
    accepted_per_s: float
    written_per_s: float
    spool_waiting: int
    partitions: list[int]
    """The partitions it says it owns (the leases in Redis are the authority)."""


def _version() -> str:
    found = getattr(ingestd, "__version__", None)
    if isinstance(found, str):
        return found
    try:
        return importlib.metadata.version("ingestd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _float(value: str | None) -> float:
    try:
        return float(value) if value is not None else 0.0
    except ValueError:
        return 0.0


class Members:
    """This instance's membership: a heartbeat with its rates every ``cluster.heartbeat``.

    ``run()`` beats until cancelled and never raises for Redis; cancel it, then ``leave()``.
    """

    def __init__(
        self,
        section: ClusterSection,
        redis: redis.asyncio.Redis,
        metrics: Metrics,
        health: Health,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._section = section
        self._redis = redis
        self._registry = metrics.registry
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self._key = MEMBER_PREFIX + section.instance
        self._ttl_ms = max(1, round(_EXPIRY_BEATS * section.heartbeat * 1000))
        self._partitions = ""
        self._started_at = clock()
        # The counters at the previous heartbeat (or at start): rates are over one beat.
        self._last_at = self._started_at
        self._last = self._counters()
        self._registered = False
        self._down: str | None = None
        self._down_since = 0.0
        self._left = False
        self._fixed = {
            "instance": section.instance,
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "version": _version(),
            "started_at": repr(self._started_at),
        }

    def set_partitions(self, partitions: Iterable[int]) -> None:
        """The partitions this instance owns now; the next heartbeat publishes them."""
        self._partitions = ",".join(str(p) for p in sorted(set(partitions)))

    def _counters(self) -> tuple[float, float, float]:
        sample = self._registry.get_sample_value
        return (
            sample(_RECEIVED) or 0.0,
            sample(_ACCEPTED) or 0.0,
            sample(_WRITTEN) or 0.0,
        )

    def _fields(self) -> tuple[float, dict[str, str]]:
        """This heartbeat's hash: the fixed fields, the rates since the last beat, the spool."""
        now = self._clock()
        counters = self._counters()
        elapsed = now - self._last_at
        rates = [
            # A counter that went back (a new registry) or a clock that did: no rate, not a
            # negative or an enormous one.
            (new - old) / elapsed if elapsed > 0 and new >= old else 0.0
            for new, old in zip(counters, self._last, strict=True)
        ]
        self._last_at, self._last = now, counters
        waiting = self._registry.get_sample_value(_SPOOL_WAITING) or 0.0
        return now, {
            **self._fixed,
            "beat_at": repr(now),
            "received_per_s": f"{rates[0]:.3f}",
            "accepted_per_s": f"{rates[1]:.3f}",
            "written_per_s": f"{rates[2]:.3f}",
            "spool_waiting": str(int(waiting)),
            "partitions": self._partitions,
        }

    async def run(self) -> None:
        """Beat now, then every ``cluster.heartbeat``, until cancelled. A beat that fails
        (Redis down or slow) is reported in the logs and ``/healthz``, never raised."""
        period = self._section.heartbeat
        while True:
            started = time.monotonic()
            await self.beat()
            # Every `period` from the start of one beat to the next, however long it took.
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    async def beat(self) -> bool:
        """One heartbeat, one round trip; False when Redis did not take it."""
        if self._left:
            return False
        now, fields = self._fields()
        try:
            self._metrics.redis_round_trips.inc()
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(self._key, mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(self._key, self._ttl_ms)
                pipe.zadd(MEMBERS_KEY, {self._section.instance: now})
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(_reason(exc))
            return False
        if self._down is not None:
            log.info(
                "cluster heartbeats get through again; this instance is registered",
                instance=self._section.instance,
                down_seconds=round(time.monotonic() - self._down_since, 1),
            )
            self._down = None
            self._healthy()
        elif not self._registered:
            self._healthy()
        self._registered = True
        return True

    def _healthy(self) -> None:
        self._health.ok(
            HEALTH_COMPONENT,
            f"member {self._section.instance}, heartbeat every {self._section.heartbeat:g}s",
        )

    def _failed(self, reason: str) -> None:
        if self._down is None:
            self._down_since = time.monotonic()
            log.warning(
                "cluster heartbeat failed: the other instances will count this one as gone"
                f" after {_EXPIRY_BEATS} heartbeats; ingestion goes on, heartbeats are retried",
                instance=self._section.instance,
                error=reason,
            )
        self._down = reason
        self._health.problem(
            HEALTH_COMPONENT,
            f"Redis unavailable ({reason}): heartbeats of {self._section.instance} do not get"
            " through; ingestion goes on",
        )

    async def leave(self) -> None:
        """Take this instance out of the cluster at once (on a graceful stop, after ``run()``
        was cancelled): its hash and its entry in the set go. Best effort, bounded by the
        client's timeout (redis.timeout): when Redis is down, the hash expires by itself."""
        self._left = True
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._key)
                pipe.zrem(MEMBERS_KEY, self._section.instance)
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "could not leave the cluster; the others will count this instance as gone"
                f" after {_EXPIRY_BEATS} heartbeats",
                instance=self._section.instance,
                error=_reason(exc),
            )
            return
        log.info("left the cluster", instance=self._section.instance)


def _member(found: dict[Any, Any], now: float) -> Member:
    fields = {_text(k): _text(v) for k, v in found.items()}
    started_at, beat_at = _float(fields.get("started_at")), _float(fields.get("beat_at"))
    listed = fields.get("partitions", "")
    return Member(
        instance=fields.get("instance", ""),
        host=fields.get("host", ""),
        pid=int(_float(fields.get("pid"))),
        version=fields.get("version", ""),
        started_at=started_at,
        beat_at=beat_at,
        uptime=max(0.0, now - started_at),
        since_beat=max(0.0, now - beat_at),
        received_per_s=_float(fields.get("received_per_s")),
        accepted_per_s=_float(fields.get("accepted_per_s")),
        written_per_s=_float(fields.get("written_per_s")),
        spool_waiting=int(_float(fields.get("spool_waiting"))),
        partitions=[int(p) for p in listed.split(",") if p.strip().isdigit()],
    )


async def list_members(redis: redis.asyncio.Redis, *, now: float | None = None) -> list[Member]:
    """The live instances, sorted by name. An instance whose hash expired (it stopped
    beating) is removed from the members set on the way. Raises ClusterUnavailable."""
    now = time.time() if now is None else now
    try:
        names = [_text(n) for n in await redis.zrange(MEMBERS_KEY, 0, -1)]
        if not names:
            return []
        async with redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(MEMBER_PREFIX + name)
            hashes = await pipe.execute()
        dead = [name for name, found in zip(names, hashes, strict=True) if not found]
        if dead:
            async with redis.pipeline(transaction=False) as pipe:
                for name in dead:
                    pipe.eval(_FORGET_SCRIPT, 2, MEMBER_PREFIX + name, MEMBERS_KEY, name)
                await pipe.execute()
    except (RedisError, OSError, TimeoutError) as exc:
        raise ClusterUnavailable(f"Redis: {_reason(exc)}") from exc
    members = [_member(found, now) for name, found in zip(names, hashes, strict=True) if found]
    return sorted(members, key=lambda m: m["instance"])


def _owner(value: Any) -> str | None:
    if value is None:
        return None
    instance, colon, _token = _text(value).rpartition(":")
    return instance if colon else _text(value)


async def lease_owners(redis: redis.asyncio.Redis, partitions: int) -> dict[int, str | None]:
    """Partition -> the instance holding its lease, None when free; one MGET. Raises
    ClusterUnavailable."""
    if partitions <= 0:
        return {}
    try:
        values = await redis.mget([LEASE_PREFIX + str(p) for p in range(partitions)])
    except (RedisError, OSError, TimeoutError) as exc:
        raise ClusterUnavailable(f"Redis: {_reason(exc)}") from exc
    return {p: _owner(value) for p, value in enumerate(values)}
