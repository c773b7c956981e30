"""The daemon's lifecycle: start the stages, run until SIGTERM, shut down in order.

    MQTT source --(topic, payload)--> intake: decode + guard --> quota --> spool (group commit)
        ^                                                                      |
        +-------------------- acks, after the commit that holds them ---------+
                                                                               v
                                                 drainer: batches --> TSDB sink --> release

Every message ends as exactly one spool entry (readings, a dead letter, or nothing to keep:
an ignored or throttled message, a skipped retained replay), queued in receive order, so
acks go out in that order. With the Redis quota backend, entries wait in a small gate for
the batch's verdicts. What waits for its commit is bounded in messages and in bytes
(``mqtt.max_unacked``, ``mqtt.max_unacked_bytes``): above either the source pauses (the
broker holds the rest), below half of both it resumes. An exception of ours on the way
(an internal error) turns the message into a dead letter, acknowledged in its turn.

Shutdown (SIGTERM): stop reading from the broker, commit and acknowledge what arrived,
disconnect (the broker keeps queueing for our session), drain to the TSDB for at most
``spool.shutdown_grace``, and exit 0; whatever is left waits in the spool for next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import time
import zlib
from typing import Any

from psycopg_pool import AsyncConnectionPool

from ingestd.alerts import ACK_FILTER, AlertStage
from ingestd.cluster.members import Members
from ingestd.cluster.rules import ClusterRules
from ingestd.config import Settings
from ingestd.deadletters import DeadLetter, DeadLetters
from ingestd.decode import Decoder
from ingestd.faults import InternalErrors
from ingestd.health import Health
from ingestd.http import HttpServer
from ingestd.latest import Latest
from ingestd.lineproto import format_reading
from ingestd.logs import get_logger
from ingestd.loopwatch import LoopWatch
from ingestd.metrics import Metrics
from ingestd.model import Reading, Reject
from ingestd.notify import Notifier, Outbox, SqliteOutbox
from ingestd.notify.outbox import FILENAME as OUTBOX_FILE
from ingestd.notify.pg_outbox import PostgresOutbox
from ingestd.series import SeriesGuard
from ingestd.sink import Sink, build_sink
from ingestd.source import Ack, MqttSource
from ingestd.spool import Spool
from ingestd.store.history import History
from ingestd.store.postgres import open_pool
from ingestd.store.redis import connect as connect_redis
from ingestd.store.registry import Device, Registry
from ingestd.systemd import SystemdNotify
from ingestd.throttle import QuotaItem, Throttle

__all__ = ["Daemon", "raise_open_files_limit"]

log = get_logger("daemon")

_APPEND, _REJECT, _SKIP = 0, 1, 2

_Held = tuple[Ack, int]
"""What the spool holds for a message until its commit: its ack and the bytes it costs."""
_MESSAGE_BYTES = 384
"""A message's cost beyond its lines while it awaits its commit: its ack, its receipt, list
slots. Measured with tracemalloc, 50,000 one-line messages queued in the spool: 409 bytes
each beyond the lines' text, of which _LINE_BYTES for the line."""
_LINE_BYTES = 48
"""A line's cost beyond its text: the bytes object's header and its list slot."""
_READING_BYTES = 768
_FIELD_BYTES = 48
"""A decoded reading, and each of its fields beyond the first, while they wait in the Redis
quota gate (tracemalloc, JSON readings of 1, 5 and 20 fields: 752, 849, 1,488 bytes)."""
_RETAINED_KEPT = 65_536
"""Retained messages remembered as stored, so a replay (each MQTT 3.1.1 reconnect) is not
written again; a fleet's retained topics, bounded."""


_GC_THRESHOLDS = (10_000, 20, 10)
"""Young collections every 10,000 allocations, not 700: readings wait in queues for a few
hundred ms, outlived two young collections at the default and reached the old generation,
whose growth set off a full collection every 4 s (100-450 ms pauses with 10,000 devices'
rule state: bench latency scenario, ``ingestd_gc_pause_seconds``). Alert p99 there: 218 ms at
the default, 40 ms at these, 558 ms with (10_000, 5, 10) (more objects reach the old
generation: more full collections)."""


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one. Cheap insurance: systemd's
    default soft limit is 1024 (the shipped unit sets LimitNOFILE), and a daemon out of
    file descriptors cannot write its spool. Not raised (refused, or already there): the
    HTTP endpoint's connection cap still keeps what it holds bounded."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if resource.RLIM_INFINITY in (soft, hard) or soft >= hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open files limit", soft=soft, hard=hard, error=str(exc))
        return
    log.info("open files limit raised to the hard limit", soft=hard, was=soft)


class Daemon:
    def __init__(self, settings: Settings, sink: Sink | None = None) -> None:
        self.settings = settings
        self.health = Health()
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._sink = sink
        self._last_ns = 0
        self._sample_bytes = settings.guard.sample_bytes
        self._max_unacked = settings.mqtt.max_unacked
        self._max_bytes = int(settings.mqtt.max_unacked_bytes)
        self._held_bytes = 0
        """Bytes of the messages awaiting their commit, and of what waits in the gate."""
        self._paused = False
        self._retained = settings.mqtt.retained
        self._retained_stored: dict[int, None] = {}
        self._errors = InternalErrors(self.metrics, self.health)
        self._gate: list[tuple[int, tuple[Any, ...], QuotaItem | None, int]] = []
        self._gate_ready = asyncio.Event()
        self._reloading: asyncio.Task[bool] | None = None
        self._registry: Registry | None = None
        self._stopping = False
        self.systemd = SystemdNotify()  # sd_notify: no-op unless run by systemd (Type=notify)

    def stop(self) -> None:
        self._stop.set()

    def _clock(self) -> int:
        """Receipt time in ns, strictly increasing: two readings never share a timestamp."""
        now = time.time_ns()
        if now <= self._last_ns:
            now = self._last_ns + 1
        self._last_ns = now
        return now

    async def serve(self) -> int:
        """Startup, main loop, shutdown; returns the exit code."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        # Everything that can refuse the configuration first, before anything is opened.
        self._decoder = Decoder(settings.mqtt.subscriptions, settings.guard)
        self._series = SeriesGuard(settings.guard, settings.latest.ttl, self.metrics)
        self.source = MqttSource(
            settings.mqtt,
            self._intake,
            self.metrics,
            self.health,
            settings.spool.dir,
            extra_filters=[ACK_FILTER],
        )
        settings.spool.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.notifier = Notifier(
            settings.notify,
            settings.spool.dir,
            self.metrics,
            self.health,
            outbox=self._outbox(),
        )
        self.pool: AsyncConnectionPool | None = None
        self.history: History | None = None
        self.registry: Registry | None = None
        if settings.postgres.url:
            self.pool = open_pool(settings.postgres)
            self.history = History(
                settings.postgres, self.pool, settings.spool.dir, self.metrics, self.health
            )
        # One Redis client (one connection pool) for every stage that uses Redis.
        self.redis = connect_redis(settings.redis) if settings.redis.url else None
        self.members: Members | None = None
        self.alerts: AlertStage | ClusterRules
        if settings.cluster.enabled and self.redis is not None:
            self.members = Members(settings.cluster, self.redis, self.metrics, self.health)
            self.alerts = ClusterRules(
                settings,
                self.redis,
                self.metrics,
                self.health,
                self.source.publish,
                notifier=self.notifier,
                history=self.history,
                members=self.members,
            )
            if settings.quotas.backend != "redis":
                log.warning(
                    "cluster with quotas.backend memory: every instance allows a device its"
                    " whole quota; set quotas.backend: redis for one quota across the cluster"
                )
        else:
            self.alerts = AlertStage(
                settings.rules,
                settings.spool.dir,
                self.metrics,
                self.health,
                self.source.publish,
                notifier=self.notifier,
                history=self.history,
            )
        self.throttle = Throttle(
            settings.quotas, self.metrics, self.health, self.source.publish, redis=self.redis
        )
        self.latest: Latest | None = None
        if settings.latest.enabled:
            self.latest = Latest(settings.latest, self.metrics, self.health, self.redis)
        if settings.postgres.url:
            self.registry = Registry(
                settings.registry,
                settings.postgres,
                settings.spool.dir,
                self.metrics,
                self.health,
                on_change=self._device_changed,
            )
            # Refuses an old schema (exit 2); PostgreSQL down: the registry's copy, degraded.
            await self.registry.start()
        self._registry = self.registry
        sink = self._sink or build_sink(settings.influx, self.metrics, self.health)
        self.deadletters = DeadLetters(settings.spool.dir, settings.guard.deadletters_max)
        self.spool = Spool(settings.spool, self.metrics, self.health, self.deadletters)
        recovery = self.spool.open()
        if recovery.torn_bytes:
            log.warning(
                "spool had a torn tail (a commit cut short by a crash, never acknowledged);"
                " truncated",
                bytes=recovery.torn_bytes,
            )
        for problem in recovery.corrupt_segments:
            log.error("spool segment corrupt; readings after the damage are lost", detail=problem)
        if recovery.pending_lines:
            log.info("spool has readings to deliver", readings=recovery.pending_lines)
        self.health.ok("spool")
        self.health.backlog = self.spool.backlog
        # Everything built so far lives as long as the daemon: out of the cyclic GC's sight,
        # so its full collections stop walking it (measured: 46-144 ms pauses at 7k msg/s).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*_GC_THRESHOLDS)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        http = HttpServer(
            settings.http,
            self.health,
            self.metrics,
            self.throttle,
            self.alerts,
            latest=self.latest,
        )
        tasks: list[asyncio.Task[Any]] = []
        # Watchdog pings from this loop until the very end (a stalled loop stops them).
        keepalive = asyncio.create_task(self.systemd.keepalive(self._systemd_status))
        try:
            await http.start()
            log.info("listening", http=settings.http.listen)
            tasks = [
                asyncio.create_task(self.source.run(), name="source"),
                asyncio.create_task(
                    self.spool.commit_loop(self._durable, self.alerts.save_if_changed),
                    name="commit",
                ),
                asyncio.create_task(self._sweep(), name="sweep"),
                asyncio.create_task(self.alerts.run(), name="alerts"),
                asyncio.create_task(self.notifier.run(), name="notify"),
            ]
            if self.throttle.batched:
                tasks.append(asyncio.create_task(self._gate_loop(), name="quota-gate"))
            if self.latest is not None:
                tasks.append(asyncio.create_task(self.latest.run(), name="latest"))
            if self.members is not None:
                tasks.append(asyncio.create_task(self.members.run(), name="members"))
            if self.registry is not None and self.pool is not None and self.history is not None:
                await self.pool.open(wait=False)  # connects (and reconnects) in the background
                tasks.append(asyncio.create_task(self.registry.run(), name="registry"))
                tasks.append(asyncio.create_task(self.history.run(), name="history"))
            drainer = asyncio.create_task(self._drain(sink), name="drain")
            helpers = [
                asyncio.create_task(self._ready()),
                asyncio.create_task(self._stats()),
                asyncio.create_task(LoopWatch(self.metrics).run(), name="loopwatch"),
            ]
            stop = asyncio.create_task(self._stop.wait())
            # The stages run until stopped; one ending early is a bug: raise it.
            done, _ = await asyncio.wait(
                [*tasks, drainer, stop], return_when=asyncio.FIRST_COMPLETED
            )
            for helper in helpers:
                helper.cancel()
            for task in done:
                if task is not stop and task.exception():
                    raise task.exception()  # type: ignore[misc]
            log.info("stopping: no new messages; committing, then draining to the TSDB")
            self.health.ready = False
            await self._shutdown(tasks, drainer)
        finally:
            for task in tasks:
                task.cancel()
            await http.close()
            await sink.close()
            if self.latest is not None:
                await self.latest.close(settings.redis.timeout)  # the last values, briefly
            if self.redis is not None:
                await self.redis.aclose()
            if self.registry is not None:
                await self.registry.close()
            if self.pool is not None:
                await self.pool.close()
            self.notifier.abandon()
            self.spool.close()
            self.deadletters.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            keepalive.cancel()
            self.systemd.close()
        log.info("stopped", readings_left_in_spool=self.spool.pending_lines)
        return 0

    async def _ready(self) -> None:
        await self.source.wait_subscribed()
        self.health.ready = True
        log.info("ready: subscribed, spool open", filters=self.source.filters)
        self.systemd.ready(self._systemd_status())

    def _systemd_status(self) -> str:
        """The line ``systemctl status`` shows."""
        if self._stop.is_set():
            return f"stopping: committing and draining, spool {self.spool.pending_lines} readings"
        if not self.health.ready:
            return "starting: waiting for the broker subscription"
        status = (
            f"ready: {len(self.source.filters)} filters, spool {self.spool.pending_lines} readings"
        )
        return status if self.health.healthy else status + "; degraded, see /healthz"

    async def _shutdown(self, tasks: list[asyncio.Task[Any]], drainer: asyncio.Task[Any]) -> None:
        self._stopping = True  # no resume: what arrives now stays unacked for next start
        self.source.pause()
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._pass_gate()
        grace = self.settings.spool.shutdown_grace
        try:
            # A full spool (the TSDB down) would wait for room forever, a failing disk retry
            # forever: bound it.
            await asyncio.wait_for(
                self.spool.commit(self._durable, self.alerts.save_if_changed), grace
            )
        except TimeoutError:
            log.warning(
                "the last commit did not finish within spool.shutdown_grace (the spool full,"
                " or its files not writable: see the errors before): the last messages stay"
                " unacknowledged; the broker redelivers them at the next start"
            )
        await self.alerts.close()
        if self.members is not None:
            await self.members.leave()
        if self.history is not None:
            await self.history.close()  # a brief try; what is left goes out at next start
        await self.notifier.close()
        await self.source.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.spool.drained(), grace)
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer

    async def _stats(self) -> None:
        """A summary line every ``logging.stats_interval``: what an operator tails first."""
        interval = self.settings.logging.stats_interval
        if not interval:
            return
        names = {
            "received": "ingestd_messages_received_total",
            "accepted": "ingestd_messages_accepted_total",
            "written": "ingestd_points_written_total",
        }
        get = self.metrics.registry.get_sample_value
        before = dict.fromkeys([*names, "rejected"], 0.0)
        while True:
            await asyncio.sleep(interval)
            now = {key: get(name) or 0.0 for key, name in names.items()}
            now["rejected"] = sum(
                sample.value
                for metric in self.metrics.rejected.collect()
                for sample in metric.samples
                if sample.name.endswith("_total")
            )
            log.info(
                f"last {interval:g}s",
                **{key: int(now[key] - before[key]) for key in now},
                spool_readings=self.spool.pending_lines,
                lag_s=round(get("ingestd_lag_seconds") or 0.0, 3),
            )
            before = now

    def _on_reload(self) -> None:
        log.info("signal received", signal="SIGHUP")
        self._reloading = asyncio.create_task(self.alerts.reload("SIGHUP"))
        if self.health.ready:  # systemd: RELOADING=1 now, READY=1 once the reload is done
            self.systemd.reloading("reloading rules (SIGHUP)")
            self._reloading.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Task[bool]) -> None:
        if self._stop.is_set():
            return
        ok = not task.cancelled() and task.exception() is None and task.result()
        self.systemd.ready(
            self._systemd_status() + ("" if ok else "; rule reload failed, previous rules kept")
        )

    def _on_signal(self, signum: int) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        self.systemd.stopping("stopping: committing, then draining to the TSDB")
        self.stop()

    # --- the hot path ------------------------------------------------------------------

    def _intake(
        self, topic: str, payload: bytes, redelivered: bool, retained: bool, ack: Ack
    ) -> None:
        metrics = self.metrics
        metrics.received.inc()
        if self.alerts.is_ack(topic):
            self._alert_ack(topic, payload, retained, ack)
        elif retained:
            self._replayed(topic, payload, ack)
        else:
            key = zlib.crc32(topic.encode()) << 32 | zlib.crc32(payload)
            received = self.spool.receipt_of(key) if redelivered else None
            if received is None:
                received = self._clock()
            reject: Reject | None = None
            try:
                readings = self._decoder.decode(topic, payload, received)
                if self._registry is not None:
                    self._registry.admit(readings)  # unknown/disabled devices; calibration
                self._series.admit(readings)  # too many series for one device
                lines = [format_reading(r) for r in readings]
            except Reject as exc:
                # Without its traceback: kept, it would hold this frame and the callers' (the
                # whole packet, up to the 256 MB MQTT allows) in a cycle until the GC runs.
                reject = exc.with_traceback(None)
            except ValueError as exc:  # decode is tested never to get here; a last defence
                reject = Reject("bad_characters", str(exc))
            except Exception as exc:  # a bug of ours must cost one message, never the intake
                reject = self._internal("decode", exc, topic)
            if reject is not None:
                self._reject(reject, received, topic, payload, ack)
            elif not lines:
                metrics.ignored.inc()
                self._admit(_SKIP, (self._hold(ack, 0),), None)
            else:
                self._append(
                    topic,
                    payload,
                    ack,
                    key,
                    received,
                    readings=readings,
                    lines=lines,
                    live=True,
                )
        if (
            self._held_bytes > self._max_bytes
            or self.spool.unacked + len(self._gate) > self._max_unacked
        ):
            self._pause()  # the broker holds the rest; resumed after a commit

    def _append(
        self,
        topic: str,
        payload: bytes,
        ack: Ack,
        key: int,
        received: int,
        *,
        readings: list[Reading],
        lines: list[bytes],
        live: bool,
    ) -> None:
        """Readings to the quota check, the rules and the latest values, then the spool.
        Not ``live`` (a retained replay): the spool only; it is an old value, re-sent by
        the broker, not by the device."""
        held = self._hold(ack, sum(map(len, lines)) + _LINE_BYTES * len(lines))
        args = (lines, held, key, received, readings, live, topic, payload)
        try:
            quota = self.throttle.match(topic, len(payload), readings[0].device) if live else None
        except Exception as exc:
            self._failed(self._internal("quota", exc, topic), args)
            return
        self._admit(_APPEND, args, quota)

    def _reject(self, reject: Reject, received: int, topic: str, payload: bytes, ack: Ack) -> None:
        self.metrics.rejected.labels(reject.reason).inc()
        log.debug("rejected", topic=topic, reason=reject.reason, detail=reject.detail)
        sample = payload[: self._sample_bytes]
        letter = DeadLetter(received, topic, reject.reason, reject.detail, len(payload), sample)
        cost = len(sample) + len(topic) + len(reject.detail)
        self._admit(_REJECT, (letter, self._hold(ack, cost)), None)

    def _hold(self, ack: Ack, cost: int) -> _Held:
        """The message's ack with the bytes it holds until its commit (freed by _durable)."""
        cost += _MESSAGE_BYTES
        self._held_bytes += cost
        return ack, cost

    def _internal(
        self, stage: str, exc: Exception, topic: str, what: str = "the message is a dead letter"
    ) -> Reject:
        """An internal error: logged with an error id, counted; the message's dead letter."""
        error_id = self._errors.record(stage, exc, what, topic=topic)
        return Reject(
            "internal_error", f"error {error_id} in {stage}: {type(exc).__name__}: {exc}"[:500]
        )

    def _failed(self, reject: Reject, args: tuple[Any, ...]) -> None:
        """A message that failed on its way to the spool (``_APPEND`` args): a dead letter,
        acknowledged in its turn; its lines are dropped."""
        _, held, _, received, _, _, topic, payload = args
        ack, cost = held
        self._held_bytes -= cost
        sample = payload[: self._sample_bytes]
        letter = DeadLetter(received, topic, reject.reason, reject.detail, len(payload), sample)
        self.metrics.rejected.labels(reject.reason).inc()
        self.spool.reject(letter, self._hold(ack, len(sample) + len(topic) + len(reject.detail)))

    def _alert_ack(self, topic: str, payload: bytes, retained: bool, ack: Ack) -> None:
        if retained:
            # A command replayed from the retained store is stale: it could acknowledge an
            # alert that fired after it was sent.
            self.metrics.retained.labels("alert_ack").inc()
            log.debug("retained alert acknowledgement replayed; ignored", topic=topic)
        else:
            try:
                self.alerts.acknowledge_message(topic, payload)
            except Exception as exc:
                self._reject(
                    self._internal("alerts", exc, topic), time.time_ns(), topic, payload, ack
                )
                return
        self._admit(_SKIP, (self._hold(ack, 0),), None)

    def _replayed(self, topic: str, payload: bytes, ack: Ack) -> None:
        """A retained message the broker replayed at subscribe: an old value, not a new
        reading. Stored (never evaluated) only with the device's own timestamp."""
        outcome = "ignored"
        if self._retained == "once":
            key = zlib.crc32(topic.encode()) << 32 | zlib.crc32(payload)
            outcome = "replayed"  # stored already by this process
            if key not in self._retained_stored:
                received = self._clock()
                try:
                    readings = self._decoder.decode(topic, payload, received)
                    outcome = "no_reading" if not readings else "no_timestamp"
                    readings = [r for r in readings if r.device_time]
                    if readings and self._registry is not None:
                        self._registry.admit(readings)
                    self._series.admit(readings)
                    lines = [format_reading(r) for r in readings]
                except (Reject, ValueError) as exc:
                    # Not a dead letter at every replay: it was one when it was published.
                    outcome = "refused"
                    log.debug("retained message refused; skipped", topic=topic, error=str(exc))
                except Exception as exc:
                    self._reject(
                        self._internal("decode", exc, topic), received, topic, payload, ack
                    )
                    return
                else:
                    if lines:
                        stored = self._retained_stored
                        if len(stored) >= _RETAINED_KEPT:
                            del stored[next(iter(stored))]
                        stored[key] = None
                        self.metrics.retained.labels("stored").inc()
                        self._append(
                            topic,
                            payload,
                            ack,
                            key,
                            received,
                            readings=readings,
                            lines=lines,
                            live=False,
                        )
                        return
        self.metrics.retained.labels(outcome).inc()
        log.debug("retained message replayed by the broker; skipped", topic=topic, outcome=outcome)
        self._admit(_SKIP, (self._hold(ack, 0),), None)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.metrics.intake_paused.set(1)
            self.metrics.unacked_bytes.set(self._held_bytes)
            log.debug(
                "intake paused: too much awaits its commit",
                bytes=self._held_bytes,
                messages=self.spool.unacked + len(self._gate),
            )
        self.source.pause()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.metrics.intake_paused.set(0)
            log.debug("intake resumed", bytes=self._held_bytes)
        self.source.resume()

    def _outbox(self) -> Outbox | None:
        """The shared outbox in PostgreSQL when configured; None: the local one. Without
        channels nothing is ever queued or sent (and nothing would reconnect to PostgreSQL
        after an outage, leaving /healthz degraded): no connection then."""
        settings = self.settings
        if settings.notify_outbox != "postgres" or not settings.notify.channels:
            return None
        health = self.health

        def state(problem: str | None) -> None:
            if problem is None:
                health.ok("notify_outbox", "in PostgreSQL")
            else:
                health.problem("notify_outbox", problem)

        local = SqliteOutbox(settings.spool.dir / OUTBOX_FILE)
        return PostgresOutbox(settings.postgres, local, on_state=state)

    def _device_changed(self, before: Device | None, after: Device | None) -> None:
        """A registry change: the device's quota from the registry applies at once."""
        old = (before.quota_rate, before.quota_burst) if before else (None, None)
        new = (after.quota_rate, after.quota_burst) if after else (None, None)
        if old != new:
            device = (after or before).id  # type: ignore[union-attr] # one is set
            self.throttle.set_device_limits(device, *new)

    def _admit(self, op: int, args: tuple[Any, ...], quota: QuotaItem | None) -> None:
        if self.throttle.batched:
            cost = 0
            if op == _APPEND:  # the decoded readings and the payload wait in the gate too
                held, readings, payload = args[1], args[4], args[7]
                fields = sum(len(r.fields) for r in readings)
                # The readings' names and values take about what their lines do.
                cost = held[1] + len(payload) + _READING_BYTES * len(readings)
                cost += _FIELD_BYTES * fields
                self._held_bytes += cost
            self._gate.append((op, args, quota, cost))
            self._gate_ready.set()
        elif quota is None:
            self._to_spool(op, args)
        else:  # only readings (_APPEND) have a quota
            try:
                allowed = self.throttle.allow(quota)
            except Exception as exc:
                self._failed(self._internal("quota", exc, args[6]), args)
                return
            if allowed:
                self._to_spool(op, args)
            else:
                self._throttled(args)

    def _to_spool(self, op: int, args: tuple[Any, ...]) -> None:
        if op == _APPEND:
            lines, held, key, received, readings, live, topic, _ = args
            # The ack goes to the spool last: whatever fails before makes a dead letter.
            stage = "rules"
            try:
                if live:
                    self.alerts.evaluate(readings)
                    stage = "latest"
                    if self.latest is not None:
                        self.latest.observe(readings)
                stage = "spool"
                self.spool.append(lines, held, key, received)
            except Exception as exc:
                self._failed(self._internal(stage, exc, topic), args)
                return
            self.metrics.accepted.inc()
        elif op == _REJECT:
            self.spool.reject(*args)
        else:
            self.spool.skip(*args)

    def _throttled(self, args: tuple[Any, ...]) -> None:
        self.spool.skip(args[1])  # valid, so not a dead letter; acknowledged in order

    async def _gate_loop(self) -> None:
        while True:
            await self._gate_ready.wait()
            await self._pass_gate()

    async def _pass_gate(self) -> None:
        """Decide everything waiting in one Redis round trip, then spool it in order."""
        self._gate_ready.clear()
        batch, self._gate = self._gate, []
        items = [quota for _, _, quota, _ in batch if quota is not None]
        failure: Reject | None = None
        try:
            verdicts = iter(await self.throttle.allow_batch(items) if items else ())
        except asyncio.CancelledError:
            self._gate[:0] = batch  # back in front, in order, for the final pass
            raise
        except Exception as exc:  # one error id for the batch: its messages are dead letters
            topic = next(args[6] for _, args, quota, _ in batch if quota is not None)
            failure = self._internal(
                "quota",
                exc,
                topic,
                f"the {len(items)} messages of this quota check are dead letters",
            )
            verdicts = iter(())
        for op, args, quota, cost in batch:
            self._held_bytes -= cost
            if quota is None:
                self._to_spool(op, args)
            elif failure is not None:
                self._failed(failure, args)
            elif next(verdicts):
                self._to_spool(op, args)
            else:
                self._throttled(args)

    def _durable(self, acks: list[_Held]) -> None:
        freed = 0
        plain: list[Ack] = []
        for ack, cost in acks:
            plain.append(ack)
            freed += cost
        self._held_bytes -= freed
        self.metrics.unacked_bytes.set(self._held_bytes)
        try:
            self.source.ack(plain)
        except Exception as exc:
            self._errors.record(
                "acknowledgement",
                exc,
                "a message durable here stays unacknowledged until the next reconnect (the"
                " broker then redelivers it: its readings overwrite themselves)",
            )
        if self._stopping:
            return
        if (
            self._held_bytes < self._max_bytes // 2
            and self.spool.unacked + len(self._gate) < self._max_unacked // 2
        ):
            self._resume()

    async def _sweep(self) -> None:
        """Expire idle quota state and the series of silent devices; internal errors long
        past stop degrading health."""
        while True:
            await asyncio.sleep(5)
            self.throttle.sweep()
            self._series.sweep()
            self._errors.sweep()

    async def _drain(self, sink: Sink) -> None:
        influx = self.settings.influx
        while True:
            batch = await self.spool.read_batch(influx.batch_size, influx.flush_interval)
            refused = await sink.write(batch.lines)
            if refused:
                now = time.time_ns()
                letters = [
                    DeadLetter(
                        now,
                        "",
                        "tsdb_refused",
                        f"{r.status}: {r.reason}"[:500],
                        len(r.line),
                        r.line[: self._sample_bytes],
                    )
                    for r in refused
                ]
                self.metrics.rejected.labels("tsdb_refused").inc(len(letters))
                await self.spool.add_deadletters(letters)
            self.spool.release(batch)
            if batch.committed_ns:
                self.metrics.lag.set(max(0.0, (time.time_ns() - batch.committed_ns) / 1e9))
