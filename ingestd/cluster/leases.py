"""Partition leases: which instance evaluates the rules of which devices, one at a time.

A lease is a Redis key ``ingestd:cluster:lease:<partition>`` holding ``<instance>:<token>``
with a time to live of ``cluster.lease``. Its owner renews it every lease/5; an instance
takes free partitions until it holds its share (``ceil(partitions / live instances)``) and
gives up the ones beyond it, so the partitions spread evenly and move when an instance
joins, leaves or dies. Everything an owner writes for a partition is fenced: a Lua script
writes only while the lease still holds the owner's value (:data:`FENCED_SET`), so an owner
that stalled past its lease can never overwrite its successor's state.

An owner also stops on its own clock: without a successful renewal for 0.8 x lease it
treats the partition as suspended (Redis unreachable) until it knows more.

Redis restarted without its data (every lease, snapshot and stream gone) shows as a new
*epoch* (``ingestd:cluster:epoch`` missing or changed). For one lease time after an epoch
is made (``ingestd:cluster:fresh`` exists), owners re-assert the partitions they held
(their rule state is intact in memory) and nobody takes a free partition, so no partition
restarts from nothing while its owner lives; an instance started in that time waits too.
A new cluster therefore evaluates its first readings one lease time after it starts (they
wait in the streams, nothing is missed).
"""

from __future__ import annotations

import math
import secrets
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis.asyncio
from redis.exceptions import RedisError

from ingestd.config import ClusterSection
from ingestd.logs import get_logger

__all__ = [
    "FENCED_SET",
    "PREFIX",
    "Leases",
    "Outcome",
    "lease_key",
    "partition_of",
]

log = get_logger("cluster")

PREFIX = "ingestd:cluster:"
_EPOCH = PREFIX + "epoch"
_FRESH = PREFIX + "fresh"  # exists for one lease time after the epoch was made
_FENCE = PREFIX + "fence"
_LOCAL_SHARE = 0.8  # of the lease: how long an owner trusts a renewal on its own clock

_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if held == ARGV[i + 2] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  elseif not held and ARGV[2] == '1' then
    redis.call('SET', key, ARGV[i + 2], 'PX', ARGV[1])
    out[i] = 2
  else
    out[i] = 0
  end
end
return out
"""

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local value = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

FENCED_SET = """
-- KEYS: lease, target[, stream]; ARGV: lease value, data[, trim the stream to this id]
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
if KEYS[3] and ARGV[3] and ARGV[3] ~= '' then
  redis.call('XTRIM', KEYS[3], 'MINID', ARGV[3])
end
return 1
"""
"""Write a partition's state only while the lease holds the writer's value."""


def lease_key(partition: int) -> str:
    return f"{PREFIX}lease:{partition}"


def partition_of(device: str, partitions: int) -> int:
    """The partition of a device: the same on every instance, run after run."""
    return zlib.crc32(device.encode("utf-8", "surrogatepass")) % partitions


@dataclass
class Outcome:
    """What one cycle changed; the caller starts, stops or suspends partitions."""

    gained: list[tuple[int, str]] = field(default_factory=list)
    """(partition, lease value) newly taken."""
    lost: list[int] = field(default_factory=list)
    """Held by another instance now (or expired): stop at once, write nothing."""
    reasserted: list[int] = field(default_factory=list)
    """Taken back after Redis lost its data: the state in memory is the one to keep."""
    surplus: list[int] = field(default_factory=list)
    """Beyond this instance's share: save, then :meth:`Leases.release`."""
    epoch_changed: bool = False


class Leases:
    def __init__(
        self,
        section: ClusterSection,
        redis: redis.asyncio.Redis,
        *,
        count: Callable[[], None] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._section = section
        self._redis = redis
        self._count = count  # one call per round trip (the metric)
        self._monotonic = monotonic
        self._ttl_ms = max(1, int(section.lease * 1000))
        self.held: dict[int, str] = {}
        """partition -> lease value, for the partitions this instance owns."""
        self._trusted_until: dict[int, float] = {}
        self._epoch: str | None = None
        self._in_grace = False
        self._renew = redis.register_script(_RENEW)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    def valid(self, partition: int) -> bool:
        """Whether this instance may still act for ``partition`` on its own clock."""
        return self._monotonic() < self._trusted_until.get(partition, 0.0)

    async def cycle(self, live: int) -> Outcome:
        """Renew, then take or give up partitions towards this instance's share of
        ``live`` instances. Raises RedisError when Redis cannot be reached."""
        out = Outcome()
        out.epoch_changed = await self._check_epoch()
        await self._renew_held(out)
        share = math.ceil(self._section.partitions / max(1, live))
        if len(self.held) > share:
            # Give up the highest numbers: every instance agrees which go, no ping-pong.
            out.surplus = sorted(self.held)[share:]
        elif len(self.held) < share and not self._in_grace:
            await self._take(share - len(self.held), out)
        return out

    async def _check_epoch(self) -> bool:
        self._count()
        epoch, fresh = await self._redis.mget([_EPOCH, _FRESH])
        if epoch is None:
            self._count()
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(_EPOCH, secrets.token_hex(8), nx=True)
                pipe.set(_FRESH, b"1", px=self._ttl_ms, nx=True)
                pipe.mget([_EPOCH, _FRESH])
                *_, (epoch, fresh) = await pipe.execute()
        self._in_grace = fresh is not None
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        changed = self._epoch is not None and epoch != self._epoch
        if changed:
            log.warning(
                "Redis lost the cluster's data (restarted without persistence?): partitions"
                " this instance held are taken back from memory; free ones wait a lease time",
                held=len(self.held),
            )
        self._epoch = epoch
        return changed

    async def _renew_held(self, out: Outcome) -> None:
        if not self.held:
            return
        parts = sorted(self.held)
        sent = self._monotonic()
        reassert = "1" if self._in_grace else "0"
        self._count()
        results = await self._renew(
            keys=[lease_key(p) for p in parts],
            args=[self._ttl_ms, reassert, *(self.held[p] for p in parts)],
        )
        for partition, kept in zip(parts, results, strict=True):
            if kept:
                self._trusted_until[partition] = sent + self._section.lease * _LOCAL_SHARE
                if kept == 2:  # Redis had lost it: taken back
                    out.reasserted.append(partition)
            else:
                self._forget(partition)
                out.lost.append(partition)

    async def _take(self, wanted: int, out: Outcome) -> None:
        partitions = self._section.partitions
        self._count()
        owners = await self._redis.mget([lease_key(p) for p in range(partitions)])
        free = [p for p, owner in enumerate(owners) if owner is None and p not in self.held]
        if not free:
            return
        # Start somewhere of our own, so instances starting together spread out.
        start = partition_of(self._section.instance, partitions)
        free.sort(key=lambda p: (p - start) % partitions)
        for partition in free[:wanted]:
            sent = self._monotonic()
            self._count()
            value = await self._acquire(
                keys=[lease_key(partition), _FENCE], args=[self._section.instance, self._ttl_ms]
            )
            if value is None:
                continue  # someone was quicker
            value = value.decode() if isinstance(value, bytes) else str(value)
            self.held[partition] = value
            self._trusted_until[partition] = sent + self._section.lease * _LOCAL_SHARE
            out.gained.append((partition, value))

    async def release(self, partitions: Iterable[int]) -> None:
        """Give partitions up (after their state is saved): others take them at once."""
        for partition in list(partitions):
            value = self.held.get(partition)
            self._forget(partition)
            if value is None:
                continue
            try:
                self._count()
                await self._release(keys=[lease_key(partition)], args=[value])
            except RedisError as exc:  # it expires by itself
                log.warning("could not release a partition", partition=partition, error=str(exc))

    def drop(self, partition: int) -> None:
        """Forget a partition without touching Redis (its lease lapsed)."""
        self._forget(partition)

    def _forget(self, partition: int) -> None:
        self.held.pop(partition, None)
        self._trusted_until.pop(partition, None)
