"""The rules of a cluster: every device's readings evaluated once, by one instance.

The broker hands each reading to any instance of the shared subscription. That instance
stores it as always (spool, TSDB) and forwards it, before acknowledging it, to its
partition's stream in Redis (``ingestd:cluster:readings:<p>``, one pipelined round trip per
spool commit). The partition's owner (:mod:`ingestd.cluster.leases`) reads the stream and
runs the readings through its own :class:`~ingestd.alerts.AlertStage` for that partition:
the same engine, timers (``for``, deadman, repeat), MQTT alert topics, outbox and history as
a single instance, so two instances can never both fire or resolve one alert.

A partition's state lives in Redis (``ingestd:cluster:state:<p>:recent`` at every
transition, ``:full`` every 30 s), each written by a fenced script only while the writer
holds the lease, with the stream position it covers. A new owner (the old one died, or the
partitions were rebalanced) restores it and replays the stream from the full state's
position: readings older than what a state already saw are ignored, so the replay catches
up the rest without repeating a transition.

What Redis down means: readings wait in memory (``cluster.forward_max``), owners stop
evaluating once their leases are no longer sure (0.8 x lease), and everything resumes
when Redis is back. Redis restarted *without its data*: each owner keeps its partitions'
state from memory and writes it back; the readings that were in the streams at that moment
(normally well under a second of them) are stored but never evaluated.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio
from redis.exceptions import RedisError

from ingestd.alerts import AckRefused, AlertStage, Publish, ack_topic, parse_ack, run_writes
from ingestd.cluster.leases import FENCED_SET, PREFIX, Leases, lease_key, partition_of
from ingestd.config import Settings
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.model import Reading
from ingestd.rules import RuleSet

if TYPE_CHECKING:
    from ingestd.cluster.members import Members
    from ingestd.notify import Handoff

__all__ = ["ClusterRules", "PartitionUnavailable", "RedisStore"]

log = get_logger("cluster")

_READ_COUNT = 200  # stream entries per partition per read (each a batch of readings)
_READ_BLOCK = 0.1  # seconds: the longest a read waits for new entries
_STREAM_MAX = 1_000_000  # entries a partition's stream keeps at most (no owner for long)
_RETRY = 1.0  # seconds between forwarding attempts while Redis is down


def stream_key(partition: int) -> str:
    return f"{PREFIX}readings:{partition}"


def state_key(partition: int, kind: str) -> str:
    return f"{PREFIX}state:{partition}:{kind}"


class PartitionUnavailable(Exception):
    """This instance may no longer write a partition's state (lost, or unsure)."""

    def __init__(self, partition: int, lost: bool) -> None:
        super().__init__(f"partition {partition} {'lost' if lost else 'unsure'}")
        self.partition = partition
        self.lost = lost


class RedisStore:
    """A partition's alert state in Redis, written only under its lease (fenced)."""

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        partition: int,
        lease: str,
        leases: Leases,
        *,
        count: Callable[[], None],
        clock: Callable[[], float],
        loaded: tuple[dict[str, Any] | None, dict[str, Any] | None],
    ) -> None:
        self._redis = redis
        self._partition = partition
        self._lease = lease
        self._leases = leases
        self._count = count
        self._loaded = loaded
        self._set = redis.register_script(FENCED_SET)
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"partition-{partition}")
        self.position = "0-0"
        """The last stream entry the engine has seen."""
        self.replay_until: tuple[int, int] | None = None
        """Entries up to here were evaluated and announced by the previous owner."""
        self.clock = _ReplayClock(clock)
        """The partition's engine clock (see :class:`_ReplayClock`)."""

    def __str__(self) -> str:
        return f"redis partition {self._partition}"

    def load(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        return self._loaded

    async def save_recent(self, data: bytes, writes: Sequence[Callable[[], bool]]) -> bool:
        if not self._leases.valid(self._partition):
            raise PartitionUnavailable(self._partition, lost=False)
        position = self.position
        loop = asyncio.get_running_loop()
        if writes and not await loop.run_in_executor(self._saver, run_writes, writes):
            return False
        value = b'{"position":"%s","snapshot":%s}' % (position.encode(), data)
        return await self._write("recent", value, None)

    async def save_full(self, header: dict[str, Any], parts: AsyncIterator[bytes]) -> bool:
        # The position before the parts are dumped: a state dumped later may hold entries
        # after it, which a replay from here ignores as stale; the other way round, a state
        # dumped before entries the position covers would lose them.
        position = self.position
        states = b",".join([part async for part in parts])
        snapshot = orjson.dumps(header)[:-1] + b',"states":[' + states + b"]}"
        value = b'{"position":"%s","snapshot":%s}' % (position.encode(), snapshot)
        return await self._write("full", value, position)

    async def _write(self, kind: str, value: bytes, trim_to: str | None) -> bool:
        if not self._leases.valid(self._partition):
            raise PartitionUnavailable(self._partition, lost=False)
        keys = [lease_key(self._partition), state_key(self._partition, kind)]
        args: list[Any] = [self._lease, value]
        if trim_to is not None:
            keys.append(stream_key(self._partition))
            args.append(trim_to)
        try:
            self._count()
            written = await self._set(keys=keys, args=args)
        except RedisError as exc:
            log.warning("cannot save a partition's alert state; will retry", error=str(exc))
            return False
        if not written:
            raise PartitionUnavailable(self._partition, lost=True)
        return True

    def close(self) -> None:
        self._saver.shutdown(wait=True)


class _NoStore:
    """The state of the stage that only loads and watches the rule files: none."""

    def load(self) -> tuple[None, None]:
        return None, None

    async def save_recent(self, data: bytes, writes: Sequence[Callable[[], bool]]) -> bool:
        return True

    async def save_full(self, header: dict[str, Any], parts: AsyncIterator[bytes]) -> bool:
        return True

    def close(self) -> None:
        pass


class _ReplayClock:
    """Wall-clock time, except while a new owner replays what its predecessor already
    evaluated: then the time the reading reached Redis, so timers fall due as they did."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.fixed: float | None = None

    def __call__(self) -> float:
        return self._clock() if self.fixed is None else self.fixed


def _position(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _encode(reading: Reading) -> list[Any]:
    return [reading.measurement, reading.device, reading.tags, reading.fields, reading.time_ns]


class ClusterRules:
    """What :class:`~ingestd.alerts.AlertStage` is to one instance, for a cluster."""

    def __init__(
        self,
        settings: Settings,
        redis: redis.asyncio.Redis,
        metrics: Metrics,
        health: Health,
        publish: Publish,
        *,
        notifier: Handoff | None = None,
        history: Handoff | None = None,
        members: Members | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._section = settings.cluster
        self._redis = redis
        self._metrics = metrics
        self._health = health
        self._publish = publish
        self._notifier = notifier
        self._history = history
        self._members = members
        self._clock = clock
        # Loads, validates and watches the rule files; holds no alerts itself.
        self._control = AlertStage(
            settings.rules, Path("."), metrics, health, publish, clock=clock, store=_NoStore()
        )
        self._ruleset: RuleSet = self._control.engine.ruleset
        self._measurements: dict[str, bool] = {}
        self.leases = Leases(self._section, redis, count=metrics.redis_round_trips.inc)
        self.stages: dict[int, AlertStage] = {}
        self._stores: dict[int, RedisStore] = {}
        self._queued: deque[tuple[int, list[Any]]] = deque()
        self._queued_count = 0
        self._forward_lock = asyncio.Lock()
        self._reloads: list[tuple[str, asyncio.Future[bool]]] = []
        self._retry_at = 0.0
        self._redis_ok = True

    # --- intake: every instance forwards ---------------------------------------------------

    def evaluate(self, readings: Sequence[Reading]) -> None:
        """Queue readings for their partitions' owners (sent before the acks)."""
        if not self._ruleset.rules:
            return
        partitions = self._section.partitions
        relevant = self._measurements
        for reading in readings:
            wanted = relevant.get(reading.measurement)
            if wanted is None:
                wanted = relevant[reading.measurement] = any(
                    rule.measurement.match(reading.measurement) for rule in self._ruleset
                )
            if wanted:
                self._queued.append((partition_of(reading.device, partitions), _encode(reading)))
                self._queued_count += 1
        excess = self._queued_count - self._section.forward_max
        if excess > 0:
            for _ in range(excess):
                self._queued.popleft()
            self._queued_count -= excess
            self._metrics.cluster_forward_dropped.inc(excess)

    async def save_if_changed(self) -> None:
        """Beside each spool commit: the readings go to Redis before they are acknowledged.
        Once Redis failed, the acks stop waiting for it (the readings wait in memory and the
        owners' loop retries every second) until a forward gets through again: one stall of
        at most the client's timeout per outage, not one per commit."""
        if self._queued and self._redis_ok:
            await self._forward()

    async def _forward(self) -> None:
        async with self._forward_lock:
            if not self._queued:
                return
            batch = self._queued
            count = self._queued_count
            self._queued = deque()
            self._queued_count = 0
            by_partition: dict[int, list[Any]] = {}
            for partition, encoded in batch:
                by_partition.setdefault(partition, []).append(encoded)
            pipe = self._redis.pipeline(transaction=False)
            for partition, items in by_partition.items():
                pipe.xadd(
                    stream_key(partition),
                    {"r": orjson.dumps(items)},
                    maxlen=_STREAM_MAX,
                    approximate=True,
                )
            try:
                self._metrics.redis_round_trips.inc()
                await pipe.execute()
            except BaseException as exc:  # cancelled too: the batch waits, never vanishes
                batch.extend(self._queued)  # newer ones after the older ones
                self._queued = batch
                self._queued_count += count
                self._retry_at = time.monotonic() + _RETRY
                self._metrics.cluster_forward_waiting.set(self._queued_count)
                if not isinstance(exc, RedisError):
                    raise
                self._down(f"Redis unreachable; {self._queued_count} readings wait: {exc}")
                return
            self._metrics.cluster_forwarded.inc(count)
            self._metrics.cluster_forward_waiting.set(self._queued_count)
            self._up()

    def _down(self, detail: str) -> None:
        if self._redis_ok:
            log.warning("cluster: " + detail + "; the rules wait, ingestion goes on")
        self._redis_ok = False
        self._health.problem("cluster", detail)

    def _up(self) -> None:
        if not self._redis_ok:
            log.info("cluster: Redis is back")
        self._redis_ok = True
        self._health.ok("cluster", f"{len(self.stages)} partitions owned")

    # --- the owner's loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Leases, reading the owned partitions' streams, timers, saves, rule files."""
        next_cycle = 0.0
        next_watch = time.monotonic() + self._settings.rules.watch_interval
        while True:
            try:
                if time.monotonic() >= next_cycle:
                    next_cycle = time.monotonic() + self._section.lease / 5
                    await self._cycle()
                if self._queued and time.monotonic() >= self._retry_at:
                    await self._forward()
                await self._read()
                await self._step()
                while self._reloads:  # between steps: no partition is half-way anywhere
                    why, done = self._reloads.pop(0)
                    result = await self._reload(why)
                    if not done.done():
                        done.set_result(result)
            except RedisError as exc:
                self._down(f"Redis unreachable: {exc}")
                await asyncio.sleep(min(_RETRY, self._section.lease / 5))
            self._gauges()
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + self._settings.rules.watch_interval
                if self._control.rules_changed():
                    await self._reload("a rule file changed")

    async def _cycle(self) -> None:
        live = 1
        heartbeat = self._section.heartbeat
        with contextlib.suppress(RedisError):
            self._metrics.redis_round_trips.inc()
            live = max(1, await self._redis.zcount(
                PREFIX + "members", self._clock() - 3 * heartbeat, "+inf"
            ))  # fmt: skip
        try:
            outcome = await self.leases.cycle(live)
            for partition in outcome.surplus:
                await self._give_up(partition)
            for partition in outcome.reasserted:
                stage = self.stages.get(partition)
                if stage is not None:  # Redis lost it: write the state from memory back
                    await self._guarded(partition, stage.save())
        finally:
            await self._reconcile()
        if self._members is not None:
            self._members.set_partitions(sorted(self.stages))
        self._up()

    async def _reconcile(self) -> None:
        """A stage for every partition held, none for one that is not (whatever a cycle
        cut short by Redis left behind)."""
        for partition in [p for p in self.stages if p not in self.leases.held]:
            self._abandon(partition, "its lease was lost (another instance holds it now)")
        for partition, value in list(self.leases.held.items()):
            if partition not in self.stages:
                await self._take(partition, value)

    async def _take(self, partition: int, value: str) -> None:
        self._metrics.redis_round_trips.inc()
        full_raw, recent_raw = await self._redis.mget(
            [state_key(partition, "full"), state_key(partition, "recent")]
        )
        try:
            full = orjson.loads(full_raw) if full_raw else None
            recent = orjson.loads(recent_raw) if recent_raw else None
        except orjson.JSONDecodeError as exc:
            log.error(
                "partition state unreadable; starting it empty", partition=partition, error=str(exc)
            )
            full = recent = None
        if full and recent:
            if _position(recent["position"]) < _position(full["position"]):
                recent = None  # older than the full state: already in it
            else:  # written by two instances: their clocks may differ, positions do not
                recent["snapshot"]["at"] = max(
                    float(recent["snapshot"].get("at", 0.0)), float(full["snapshot"]["at"])
                )
        store = RedisStore(
            self._redis,
            partition,
            value,
            self.leases,
            count=self._metrics.redis_round_trips.inc,
            clock=self._clock,
            loaded=(full["snapshot"] if full else None, recent["snapshot"] if recent else None),
        )
        # Replay the stream from the full state's position (from its start when there is
        # none: nothing was trimmed yet). What the previous owner had evaluated (up to the
        # recent state's position) moves the states again silently, on the clock of then.
        store.position = str(full["position"]) if full else "0-0"
        if recent is not None:
            store.replay_until = _position(str(recent["position"]))
        stage = AlertStage(
            self._settings.rules,
            Path("."),
            self._metrics,
            self._health,
            self._publish,
            clock=store.clock,
            notifier=self._notifier,
            history=self._history,
            store=store,
            ruleset=self._ruleset,
        )
        self.stages[partition] = stage
        self._stores[partition] = store
        self._metrics.cluster_handovers.labels("gained").inc()
        log.info(
            "partition taken",
            partition=partition,
            lease=value,
            firing=len(stage.engine.firing()),
            replay_from=store.position,
        )

    async def _give_up(self, partition: int) -> None:
        stage = self.stages.get(partition)
        if stage is not None:
            saved = await self._guarded(partition, stage.save())
            if not saved:
                return  # try again at the next cycle
            self._drop(partition)
        await self.leases.release([partition])
        self._metrics.cluster_handovers.labels("released").inc()
        log.info("partition released to another instance", partition=partition)

    def _abandon(self, partition: int, why: str) -> None:
        """Stop at once, writing nothing: someone else owns it now."""
        self.leases.drop(partition)
        if partition in self.stages:
            self._drop(partition)
            self._metrics.cluster_handovers.labels("lost").inc()
            log.warning("partition stopped: " + why, partition=partition)

    def _drop(self, partition: int) -> None:
        self.stages.pop(partition)
        store = self._stores.pop(partition)
        store.close()

    async def _guarded(self, partition: int, work: Any) -> bool:
        """Run a stage's save; False when the partition went away meanwhile."""
        try:
            await work
        except PartitionUnavailable as exc:
            if exc.lost:
                self._abandon(partition, "another instance holds its lease")
            return False
        return True

    async def _read(self) -> None:
        streams: dict[Any, Any] = {
            stream_key(p): self._stores[p].position for p in self.stages if self.leases.valid(p)
        }
        if not streams:
            await asyncio.sleep(_READ_BLOCK)
            return
        block = _READ_BLOCK
        for partition, owned in self.stages.items():
            if self.leases.valid(partition):
                block = min(block, owned.wait())
        self._metrics.redis_round_trips.inc()
        answer: Any = await self._redis.xread(
            streams, count=_READ_COUNT, block=max(1, int(block * 1000))
        )
        for key, entries in answer or ():
            name = key.decode() if isinstance(key, bytes) else str(key)
            partition = int(name.rsplit(":", 1)[1])
            target = self.stages.get(partition)
            # Sure of the lease still (the read may have waited): else not a reading more.
            if target is None or not self.leases.valid(partition):
                continue
            self._evaluate(target, self._stores[partition], entries)

    @staticmethod
    def _evaluate(stage: AlertStage, store: RedisStore, entries: list[Any]) -> None:
        live: list[Reading] = []
        for raw_id, data in entries:
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            readings = [Reading(m, d, t, f, n) for m, d, t, f, n in orjson.loads(data[b"r"])]
            position = _position(entry_id)
            if store.replay_until is not None and position <= store.replay_until:
                store.clock.fixed = position[0] / 1000
                try:
                    stage.evaluate(readings, announce=False)
                finally:
                    store.clock.fixed = None
            else:
                store.replay_until = None
                live.extend(readings)
            store.position = entry_id
        if live:
            stage.evaluate(live)

    async def _step(self) -> None:
        for partition in list(self.stages):
            stage = self.stages.get(partition)
            if stage is None or not self.leases.valid(partition):
                continue  # unsure of the lease (Redis down): no timers, no saves
            await self._guarded(partition, stage.step())

    def _gauges(self) -> None:
        totals: dict[str, int] = {}
        for stage in self.stages.values():
            for state, count in stage.engine.counts().items():
                totals[state] = totals.get(state, 0) + count
        for state, count in totals.items():
            self._metrics.alerts.labels(state).set(count)
        self._metrics.cluster_partitions.set(len(self.stages))

    # --- operators ----------------------------------------------------------------------------

    @staticmethod
    def is_ack(topic: str) -> bool:
        return AlertStage.is_ack(topic)

    def acknowledge_message(self, topic: str, payload: bytes) -> None:
        """Every instance hears an acknowledgement; the alert's owner acts on it (each
        instance says why it refuses a malformed one: the log of any will do)."""
        try:
            alert_id = parse_ack(topic, payload).alert_id
        except AckRefused:
            alert_id = None
        for stage in self.stages.values():
            if alert_id is None or stage.owns(alert_id):
                stage.acknowledge_message(topic, payload)
                return

    def acknowledge(self, alert_id: str, by: str, note: str | None = None) -> dict[str, Any] | None:
        """Acknowledge here when this instance owns the alert; else pass it to the owner
        over MQTT (the acknowledgement topic every instance hears)."""
        for stage in self.stages.values():
            if stage.owns(alert_id):
                return stage.acknowledge(alert_id, by, note)
        payload = (note or "").encode()
        if not self._publish(ack_topic(alert_id, by or "unknown"), payload, False):
            return None
        return {"id": alert_id, "forwarded": True, "by": by}

    def firing(self) -> list[dict[str, Any]]:
        """The firing alerts of the partitions this instance owns."""
        return [alert for stage in self.stages.values() for alert in stage.firing()]

    async def reload(self, why: str) -> bool:
        """Reload the rules (SIGHUP): done by the owners' loop, between two steps."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._reloads.append((why, done))
        return await done

    async def _reload(self, why: str) -> bool:
        ruleset = await self._control.load_rules(why)
        if ruleset is None:
            return False
        self._ruleset = ruleset
        self._measurements = {}
        events = self._control.engine.reload(ruleset)
        changed = len(events)
        for partition, stage in list(self.stages.items()):
            try:
                changed += await stage.apply(ruleset)
            except PartitionUnavailable as exc:
                if exc.lost:
                    self._abandon(partition, "another instance holds its lease")
        self._control.reloaded(ruleset, why, changed)
        return True

    async def close(self) -> None:
        """Forward what waits, save every partition and give it up: the others take over
        at once instead of after a lease time."""
        with contextlib.suppress(RedisError):
            await self._forward()
        for partition in list(self.stages):
            stage = self.stages[partition]
            if self.leases.valid(partition) and await self._guarded(partition, stage.close()):
                with contextlib.suppress(RedisError):
                    await self.leases.release([partition])
            self._drop(partition)
        if self._queued_count:
            log.warning(
                "stopping with readings the rules have not seen (Redis down)",
                readings=self._queued_count,
            )
