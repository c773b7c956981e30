"""The notifier: alert events in (from the alert stage), notifications out through Apprise.

    AlertStage._emit --submit()--> staged entries --persist()--> outbox (durable, before
    the alert state is saved)  --run(): per channel, due entries of one route--> worker pool
    --Apprise--> channel  --> delivered | retried later | failed at max_age (+ fallback)

- Nothing here runs on the event loop for long: outbox I/O runs in one outbox thread,
  Apprise calls in a bounded pool of worker threads of their own.
- A channel has at most ``channel_concurrency`` calls in flight, so a hung channel holds at
  most that many workers; the others keep serving the other channels.
- A call past ``call_timeout`` counts as a failure for the channel's breaker at once, but
  its entries stay in flight until the call really returns: a late success is recorded
  as delivered instead of being sent a second time.
- Retries are per channel: after a failure the channel waits a capped exponential
  backoff with full jitter; ``breaker_failures`` consecutive failures open its circuit
  breaker; after ``breaker_cooldown`` one entry goes through as a probe; a success closes
  the breaker. While the breaker is open (and when an entry reaches ``max_age``) the
  route's ``fallback`` gets the notification too.
- Escalation: a firing alert still unacknowledged ``escalate_after`` later is sent to the
  route's ``escalate_to`` route (the timer is in the outbox, so it survives restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import random
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar
from zoneinfo import ZoneInfo

from ingestd.config import NotifySection
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.notify.channels import Channel, SendResult, open_channels
from ingestd.notify.messages import Templates, message_ref, render
from ingestd.notify.outbox import (
    FILENAME,
    ChannelRecord,
    CloseAlert,
    Entry,
    MarkFailed,
    MarkFellBack,
    NewEntry,
    NewTimer,
    Op,
    Outbox,
    SqliteOutbox,
    Timer,
    TimerFired,
)
from ingestd.notify.routes import Route, Router
from ingestd.rules import AlertEvent

__all__ = ["Breaker", "Notifier", "RetryPolicy"]

log = get_logger("notify")

P = ParamSpec("P")
T = TypeVar("T")

_CLOSING = frozenset({"acknowledged", "resolved", "cancelled"})
_ESCALATING = frozenset({"firing", "escalated"})
_STAGED_MAX = 100_000
_BATCH = 500
_PURGE_EVERY = 600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_min: float
    retry_max: float
    breaker_failures: int
    breaker_cooldown: float

    @classmethod
    def of(cls, section: NotifySection) -> RetryPolicy:
        return cls(
            section.retry_min,
            section.retry_max,
            section.breaker_failures,
            section.breaker_cooldown,
        )

    def backoff(self, failures: int, rng: Callable[[], float]) -> float:
        """Full jitter: uniform in [0, min(retry_max, retry_min * 2^(failures-1)))."""
        ceiling = min(self.retry_max, self.retry_min * 2.0 ** min(failures - 1, 60))
        return rng() * ceiling


@dataclass(slots=True)
class Breaker:
    """One channel's retry backoff and circuit breaker, over its stored record."""

    record: ChannelRecord
    policy: RetryPolicy
    rng: Callable[[], float]
    probing: bool = False

    def allowance(self, now: float) -> int:
        """How many entries may go out now: 0 (backing off, open, probe in flight), 1 (the
        probe of a half-open breaker) or any number (closed)."""
        record = self.record
        if record.breaker == "open":
            if now < record.opened_at + self.policy.breaker_cooldown:
                return 0
            record.breaker = "half_open"
        if record.breaker == "half_open":
            return 0 if self.probing else 1
        return _BATCH if now >= record.retry_at else 0

    @property
    def half_open(self) -> bool:
        return self.record.breaker == "half_open"

    def next_chance(self) -> float:
        record = self.record
        if record.breaker == "open":
            return record.opened_at + self.policy.breaker_cooldown
        return record.retry_at

    def succeeded(self, now: float) -> bool:
        """Record a success; True when the channel was failing before."""
        record = self.record
        was_failing = record.failures > 0 or record.breaker != "closed"
        record.breaker, record.failures, record.retry_at = "closed", 0, 0.0
        record.last_ok = record.updated_at = now
        return was_failing

    def failed(self, now: float, error: str) -> bool:
        """Record a failure; True when it opened the breaker."""
        record = self.record
        record.failures += 1
        record.last_error = error
        record.updated_at = now
        if record.breaker == "half_open" or record.failures >= self.policy.breaker_failures:
            opened = record.breaker == "closed"  # a failed probe re-opens quietly
            record.breaker, record.opened_at = "open", now
            return opened
        record.retry_at = now + self.policy.backoff(record.failures, self.rng)
        return False


@dataclass(slots=True)
class _Found:
    expired: list[Entry] = field(default_factory=list)
    over_budget: list[Entry] = field(default_factory=list)
    unfallen: list[Entry] = field(default_factory=list)
    timers: list[Timer] = field(default_factory=list)


def _key(*parts: object) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:32]


class Notifier:
    """Owns the outbox, the worker pool and the channels. Its methods are called from the
    event loop only (the write :meth:`take` returns runs in any one thread)."""

    def __init__(
        self,
        section: NotifySection,
        state_dir: Path,
        metrics: Metrics,
        health: Health,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        outbox: Outbox | None = None,
    ) -> None:
        self._section = section
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self._router = Router(section)
        self._channels = {channel.name: channel for channel in open_channels(section)}
        self._outbox: Outbox = outbox or SqliteOutbox(state_dir / FILENAME)
        self._db = ThreadPoolExecutor(1, thread_name_prefix="ingestd-outbox")
        self._pool = ThreadPoolExecutor(section.workers, thread_name_prefix="ingestd-notify")
        policy = RetryPolicy.of(section)
        records = {r.name: r for r in self._outbox.channel_records()}
        self._breakers = {
            name: Breaker(records.get(name) or ChannelRecord(name), policy, rng)
            for name in self._channels
        }
        self._escalating = any(r.escalate_to for r in self._router.routes.values())
        self._escalated: dict[str, set[str]] = {}
        for alert, route in self._outbox.escalated():
            target = self._router.routes.get(route)
            if target is not None and target.escalate_to:
                self._escalated.setdefault(alert, set()).add(target.escalate_to)
        self._staged: list[Op] = []
        self._groups: dict[str, float] = {}
        self._busy = dict.fromkeys(self._channels, 0)
        self._inflight: dict[str, set[int]] = {name: set() for name in self._channels}
        self._sends: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._next_due: float | None = None
        self._next_purge = 0.0
        self._closing = False
        self._closed = False
        for name in self._channels:
            for counter in (
                metrics.notifications_sent,
                metrics.notifications_failed,
                metrics.notifications_retried,
            ):
                counter.labels(name)
            metrics.notify_breaker_open.labels(name).set(
                0 if self._breakers[name].record.breaker == "closed" else 1
            )
        if self._channels:
            health.ok("notify", f"{len(self._channels)} channels, {len(self._router)} routes")

    # --- hand-off from the alert stage (event loop) -------------------------------------

    def submit(self, events: Sequence[AlertEvent]) -> None:
        """Stage the notifications of ``events``; :meth:`persist` makes them durable."""
        if not self._router:
            return
        now = self._clock()
        for event in events:
            closing = event.kind in _CLOSING
            if closing and self._escalating:
                self._stage(CloseAlert(event.id))
            if not event.notify:
                continue
            data = event.to_dict()
            routes = self._router.routes_for(data)
            if closing:
                # A route an alert was escalated to hears how it ends, too.
                escalated = (
                    self._escalated.get(event.id, set())
                    if event.kind == "acknowledged"
                    else self._escalated.pop(event.id, set())
                )
                for name in sorted(escalated):
                    target = self._router.routes.get(name)
                    if target is not None and target not in routes and event.kind in target.kinds:
                        routes.append(target)
            base = f"{event.id}|{event.kind}|{event.at!r}"
            for route in routes:
                self._stage_entries(route, data, now, base)
                if route.escalate_after is not None and event.kind in _ESCALATING:
                    self._stage(
                        NewTimer(
                            key=_key(event.id, route.name),
                            alert=event.id,
                            route=route.name,
                            due_at=event.at + route.escalate_after,
                            event=data,
                        )
                    )

    def _stage(self, op: Op) -> None:
        if len(self._staged) >= _STAGED_MAX:
            self._staged.pop(0)
            log.error("notification hand-off full (the outbox cannot be written); oldest dropped")
        self._staged.append(op)

    def _stage_entries(self, route: Route, data: Mapping[str, Any], now: float, base: str) -> None:
        for op in self._entries(route, data, now, base):
            self._stage(op)

    def _entries(
        self, route: Route, data: Mapping[str, Any], now: float, base: str
    ) -> list[NewEntry]:
        """One entry per channel of ``route``, due at the end of the route's open group
        (or of its quiet hours); none when quiet hours drop it."""
        due = self._groups.get(route.name)
        if due is None or due <= now:
            due = now + route.group_window
            self._groups[route.name] = due
        quiet = route.quiet_until(due, str(data["severity"]))
        if quiet is not None:
            if route.quiet_action == "drop":
                self._metrics.notify_muted.labels(route.name).inc()
                log.info(
                    "notification dropped in quiet hours",
                    route=route.name,
                    alert=data["id"],
                    kind=data["kind"],
                )
                return []
            due = quiet
        return [
            NewEntry(
                key=_key(base, route.name, channel),
                route=route.name,
                channel=channel,
                alert=str(data["id"]),
                kind=str(data["kind"]),
                severity=str(data["severity"]),
                event=dict(data),
                created_at=now,
                not_before=due,
            )
            for channel in route.channels
        ]

    def take(self) -> Callable[[], bool] | None:
        """Hand over what is staged as a blocking write (None: nothing staged). The alert
        stage runs it in its saver thread just before it writes its state, so the outbox
        and the state are written in one ordered step. The write returns False when the
        outbox cannot be written; what it carried is staged again."""
        if not self._staged:
            return None
        ops, self._staged = self._staged, []
        loop = asyncio.get_running_loop()

        def write() -> bool:
            try:
                added = self._db.submit(self._outbox.apply, ops).result()
            except (sqlite3.Error, OSError) as exc:
                loop.call_soon_threadsafe(self._restage, ops, str(exc))
                return False
            if added:
                loop.call_soon_threadsafe(self._wake.set)
            return True

        return write

    def _restage(self, ops: list[Op], error: str) -> None:
        self._staged[:0] = ops
        self._health.problem("notify", f"the outbox cannot be written: {error}")
        log.error("the outbox cannot be written; notifications wait in memory", error=error)

    async def persist(self) -> bool:
        """Write what is staged to the outbox now (one durable transaction)."""
        write = self.take()
        return True if write is None else await asyncio.to_thread(write)

    # --- the dispatcher (event loop) ----------------------------------------------------

    async def run(self) -> None:
        """Send what is due, expire, fall back, escalate; until cancelled."""
        if not self._channels:
            await asyncio.Event().wait()  # nothing to send; a stage that ends is a failure
        while not self._closing:
            self._wake.clear()
            try:
                await self.cycle()
            except (sqlite3.Error, OSError) as exc:
                self._health.problem("notify", f"the outbox cannot be read: {exc}")
                log.error("the outbox cannot be read", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._wait())

    def _wait(self) -> float:
        now = self._clock()
        times = [b.next_chance() for b in self._breakers.values() if b.next_chance() > now]
        if self._next_due is not None and self._next_due > now:
            times.append(self._next_due)
        return min(1.0, max(0.02, min(times, default=now + 1.0) - now))

    async def cycle(self) -> None:
        """One round: maintenance, then dispatch of every channel, then gauges."""
        now = self._clock()
        await self._maintain(now)
        for name in self._channels:
            await self._dispatch(name, now)
        await self._gauges(now)

    async def _maintain(self, now: float) -> None:
        section = self._section
        fallback_routes = [r.name for r in self._router.routes.values() if r.fallback]
        failing = [n for n, b in self._breakers.items() if b.record.breaker != "closed"]
        found = await self._call(self._find, now, fallback_routes if failing else [], failing)
        inflight = set().union(*self._inflight.values())
        ops: list[Op] = []
        given_up: dict[tuple[str, str], list[Entry]] = {}
        failed: set[int] = set()
        for entries, why in (
            (found.expired, f"undelivered after {section.max_age:g}s (notify.max_age)"),
            (found.over_budget, f"outbox over budget ({section.max_pending} undelivered)"),
        ):
            for entry in entries:
                if entry.id in inflight or entry.id in failed:
                    continue
                failed.add(entry.id)
                given_up.setdefault((entry.channel, why), []).append(entry)
                ops.append(MarkFailed((entry.id,), why, now))
                if not entry.fell_back:
                    ops.extend(self._fall_back(entry, now, why))
        for (channel, why), entries in given_up.items():
            self._metrics.notifications_failed.labels(channel).inc(len(entries))
            log.error(
                "notifications failed: given up",
                channel=channel,
                why=why,
                count=len(entries),
                alerts=[f"{e.alert} {e.kind}" for e in entries[:5]],
                last_error=entries[-1].last_error,
            )
        for entry in found.unfallen:
            why = f"channel {entry.channel} keeps failing (circuit breaker open)"
            ops.extend(self._fall_back(entry, now, why))
        closing = {op.alert for op in self._staged if isinstance(op, CloseAlert)}
        for timer in found.timers:
            ops.append(
                TimerFired(timer.id) if timer.alert in closing else self._escalate(timer, now)
            )
        if ops:
            await self._call(self._outbox.apply, ops)
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY
            gone = await self._call(self._outbox.purge, now - section.keep_done)
            if gone:
                log.info("old notifications forgotten", entries=gone)

    def _find(self, now: float, fallback_routes: list[str], failing: list[str]) -> _Found:
        """Outbox thread: everything maintenance needs, in one hop."""
        outbox = self._outbox
        return _Found(
            expired=outbox.expired(now - self._section.max_age, _BATCH),
            over_budget=outbox.beyond_budget(self._section.max_pending, _BATCH),
            unfallen=outbox.unfallen(failing, fallback_routes, _BATCH),
            timers=outbox.due_timers(now, _BATCH),
        )

    def _fall_back(self, entry: Entry, now: float, why: str) -> list[Op]:
        route = self._router.routes.get(entry.route)
        target = self._router.routes.get(route.fallback) if route and route.fallback else None
        if target is None:
            return []
        data = dict(entry.event)
        data["fallback_from"] = {"route": entry.route, "channel": entry.channel, "why": why}
        # Keyed by event and failing route, not channel: two failing channels of one route
        # hand the fallback one notification.
        base = f"{data['id']}|{data['kind']}|{data['at']!r}|fallback:{entry.route}"
        self._metrics.notify_fallbacks.labels(entry.route).inc()
        log.warning(
            "notification handed to the fallback route",
            route=entry.route,
            fallback=target.name,
            channel=entry.channel,
            alert=entry.alert,
            kind=entry.kind,
            why=why,
        )
        return [*self._entries(target, data, now, base), MarkFellBack((entry.id,))]

    def _escalate(self, timer: Timer, now: float) -> TimerFired:
        route = self._router.routes.get(timer.route)
        target = self._router.routes.get(route.escalate_to) if route and route.escalate_to else None
        if route is None or target is None:
            return TimerFired(timer.id)
        data = dict(timer.event)
        data["original_kind"] = data["kind"]
        data["kind"] = "unacknowledged"
        data["escalated_from"] = route.name
        data["unacknowledged_for"] = route.escalate_after
        self._escalated.setdefault(timer.alert, set()).add(target.name)
        self._metrics.notify_escalations.labels(route.name).inc()
        log.warning(
            "alert not acknowledged: escalated",
            alert=timer.alert,
            rule=data.get("rule"),
            device=data.get("device"),
            route=route.name,
            escalate_to=target.name,
        )
        entries = self._entries(target, data, now, f"{timer.alert}|unack|{route.name}")
        chained: tuple[NewTimer, ...] = ()
        if target.escalate_after is not None:
            chained = (
                NewTimer(
                    key=_key(timer.alert, target.name),
                    alert=timer.alert,
                    route=target.name,
                    due_at=now + target.escalate_after,
                    event=timer.event,
                ),
            )
        return TimerFired(timer.id, tuple(entries), chained)

    async def _dispatch(self, name: str, now: float) -> None:
        breaker = self._breakers[name]
        while self._busy[name] < self._section.channel_concurrency and not self._closing:
            limit = breaker.allowance(now)
            if not limit:
                return
            entries = await self._call(
                self._outbox.due, name, now, limit, frozenset(self._inflight[name])
            )
            if not entries:
                return
            route = self._router.routes.get(entries[0].route)
            entries = entries[: route.group_max if route else 20]
            probe = breaker.half_open
            if probe:
                breaker.probing = True
                log.info("probing a failing channel with one notification", channel=name)
            self._busy[name] += 1
            self._inflight[name].update(e.id for e in entries)
            task = asyncio.create_task(self._send(name, route, entries), name=f"notify-{name}")
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _send(self, name: str, route: Route | None, entries: list[Entry]) -> None:
        channel, breaker = self._channels[name], self._breakers[name]
        ids = [e.id for e in entries]
        timeout = self._section.call_timeout
        ref = message_ref([e.key for e in entries])
        route_name = entries[0].route
        templates = route.templates if route else Templates.build(None, None)
        zone = route.zone if route else ZoneInfo("UTC")
        events = [e.event for e in entries]
        future = self._pool.submit(
            functools.partial(
                self._deliver,
                channel,
                templates,
                events,
                route=route_name,
                ref=ref,
                now=self._clock(),
                zone=zone,
            )
        )
        waiter = asyncio.wrap_future(future)
        late = False
        try:
            try:
                result = await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                # Counted against the channel now; the entries stay in flight until the
                # call returns, so a late success is not sent a second time.
                late = True
                self._metrics.notify_calls.labels(name, "timeout").inc()
                opened = breaker.failed(self._clock(), f"no answer within {timeout:g}s")
                log.warning(
                    "channel call past its deadline; waiting for its answer in the background",
                    channel=name,
                    target=channel.target,
                    call_timeout=timeout,
                    breaker=breaker.record.breaker,
                )
                if opened:
                    self._breaker_opened(name)
                await self._call(self._outbox.save_channel, dataclasses.replace(breaker.record))
                result = await waiter
            await self._record(name, route_name, entries, ref, result=result, late=late)
        finally:
            self._busy[name] -= 1
            self._inflight[name].difference_update(ids)
            breaker.probing = False
            self._wake.set()

    @staticmethod
    def _deliver(
        channel: Channel,
        templates: Templates,
        events: list[dict[str, Any]],
        *,
        route: str,
        ref: str,
        now: float,
        zone: ZoneInfo,
    ) -> SendResult:
        """Worker thread: render the message, make the one call."""
        message = render(templates, events, route=route, ref=ref, now=now, zone=zone)
        return channel.send(message)

    async def _record(
        self,
        name: str,
        route: str,
        entries: list[Entry],
        ref: str,
        *,
        result: SendResult,
        late: bool,
    ) -> None:
        breaker = self._breakers[name]
        ids = [e.id for e in entries]
        now = self._clock()
        kinds = sorted({e.kind for e in entries})
        if result.ok:
            await self._call(self._outbox.delivered, ids, now, ref)
            self._metrics.notifications_sent.labels(name).inc(len(ids))
            if not late:
                self._metrics.notify_calls.labels(name, "ok").inc()
            if breaker.succeeded(now):
                self._metrics.notify_breaker_open.labels(name).set(0)
                log.info("channel delivers again", channel=name, target=self._channels[name].target)
            log.info(
                "notification sent",
                channel=name,
                route=route,
                alerts=len(ids),
                kinds=kinds,
                ref=ref,
                seconds=round(result.seconds, 3),
                retried=any(e.attempts for e in entries),
            )
        else:
            await self._call(self._outbox.attempt_failed, ids, result.error, ref)
            self._metrics.notifications_retried.labels(name).inc(len(ids))
            if not late:
                self._metrics.notify_calls.labels(name, "error").inc()
                if breaker.failed(now, result.error):
                    self._breaker_opened(name)
            log.warning(
                "notification failed; will retry",
                channel=name,
                target=self._channels[name].target,
                route=route,
                alerts=len(ids),
                kinds=kinds,
                error=result.error,
                failures=breaker.record.failures,
                breaker=breaker.record.breaker,
                retry_in=round(max(0.0, breaker.next_chance() - now), 1),
            )
        await self._call(self._outbox.save_channel, dataclasses.replace(breaker.record))

    def _breaker_opened(self, name: str) -> None:
        breaker = self._breakers[name]
        self._metrics.notify_breaker_open.labels(name).set(1)
        log.error(
            "channel keeps failing: circuit breaker open",
            channel=name,
            target=self._channels[name].target,
            failures=breaker.record.failures,
            probe_in=self._section.breaker_cooldown,
            error=breaker.record.last_error,
        )
        self._wake.set()  # its entries go to the fallback route now

    async def _gauges(self, now: float) -> None:
        pending = await self._call(self._outbox.pending, now)
        total = 0
        open_channels = []
        upcoming = []
        for name in self._channels:
            found = pending.get(name)
            count = found.count if found else 0
            total += count
            self._metrics.notifications_pending.labels(name).set(count)
            self._metrics.notifications_oldest.labels(name).set(
                max(0.0, now - found.oldest) if found else 0.0
            )
            if found and found.next_due is not None:
                upcoming.append(found.next_due)
            if self._breakers[name].record.breaker != "closed":
                open_channels.append(name)
        self._next_due = min(upcoming, default=None)
        if open_channels:
            self._health.problem(
                "notify",
                f"channel {', '.join(open_channels)} failing (circuit breaker open); "
                f"{total} notifications pending",
            )
        else:
            self._health.ok("notify", f"{len(self._channels)} channels, {total} pending")

    # --- lifecycle ----------------------------------------------------------------------

    async def idle(self) -> None:
        """Wait until no call is in flight (tests, shutdown)."""
        while self._sends:
            await asyncio.gather(*list(self._sends), return_exceptions=True)

    async def close(self, grace: float = 5.0) -> None:
        """Stop sending; wait up to ``grace`` for calls in flight (what does not finish is
        sent again after the next start); write what is staged; close the outbox."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        if self._sends:
            _, unfinished = await asyncio.wait(list(self._sends), timeout=grace)
            for task in unfinished:
                task.cancel()
            if unfinished:
                log.warning(
                    "notification calls still running at shutdown; they are sent again after"
                    " the next start",
                    calls=len(unfinished),
                )
                await asyncio.gather(*unfinished, return_exceptions=True)
        await self.persist()
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self._call(self._outbox.close)
        self._db.shutdown(wait=True)

    def abandon(self) -> None:
        """Synchronous last resort when the daemon fails: stop threads, close the store."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._db.submit(self._outbox.close)
        self._db.shutdown(wait=True)

    async def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))
