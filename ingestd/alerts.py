"""The alert stage: readings through the rules engine, alert events out to MQTT.

Every event is published at QoS 1 to ``alerts/<severity>/<site>/<device>/<rule>`` and the
alert's current state is kept retained on ``alerts/state/<site>/<device>/<rule>/<field>``
(cleared on resolution), so ``mosquitto_sub -t 'alerts/#' -v`` shows the stream and the
picture. Operators acknowledge by publishing to ``alerts/ack/<alert id>/<their username>``
(the payload: an optional note, cut to :data:`ACK_NOTE_MAX` characters) or with ``ingestd
alerts ack ID``. Who acknowledged is the topic's last level, never the payload: the gateway
broker's ACL lets an operator write only under their own username, so the name is the
broker's word. The old form, ``alerts/ack/<alert id>`` with a name as payload, is refused
(logged): anyone could put any name there.

What a transition changed (the open, pending and recently changed alerts) is saved to
``<spool dir>/alerts.recent.json`` before the messages that caused it are acknowledged, and
the whole state (latest values, deadman clocks) to ``alerts.json`` every 30 seconds; a
restart lays the first over the second, so it neither re-fires nor forgets an alert.

Rules reload on SIGHUP and when a rule file changes: everything is validated first; an
invalid change keeps the old rules, logs the exact problems and publishes them on
``ingestd/rules/error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import unicodedata
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from ingestd import durable
from ingestd.config import RulesSection
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.model import Reading
from ingestd.rules import AlertEvent, Engine, RulesError, RuleSet, SnapshotError, load_rules
from ingestd.rules.model import topic_level

if TYPE_CHECKING:
    from ingestd.notify import Handoff

__all__ = [
    "ACK_BY_MAX",
    "ACK_FILTER",
    "ACK_NOTE_MAX",
    "AckRefused",
    "Acknowledgement",
    "AlertStage",
    "AlertView",
    "FileStore",
    "Publish",
    "StateStore",
    "ack_topic",
    "parse_ack",
    "run_writes",
]

log = get_logger("alerts")

ACK_FILTER = "alerts/ack/#"
"""Every form, so that one published the old way is heard and refused with a reason."""
_ACK_PREFIX = "alerts/ack/"
ACK_NOTE_MAX = 200
"""Characters of an acknowledgement's note kept (the rest is cut): it travels in every
event, notification and history row of the alert, and a payload may be 128 KiB."""
ACK_BY_MAX = 64
"""Characters of who acknowledged (a broker username, or what ``--by`` says over HTTP)."""
ERROR_TOPIC = "ingestd/rules/error"
_OUTGOING_MAX = 100_000
_SAVE_EVERY = 0.1  # seconds: at most this often while transitions keep coming
_SAVE_RETRY = 0.5  # seconds between attempts while the state cannot be saved
_FULL_EVERY = 30.0  # seconds: the whole state (latest values, deadman clocks, rate samples);
# 11 % of the CPU at 8k msg/s from 10k devices when it was 5 s (bench --profile)

Publish = Callable[[str, bytes, bool], bool]
"""(topic, payload, retain) -> whether the broker connection took it."""


class AckRefused(ValueError):
    """A message on ``alerts/ack/...`` that is no acknowledgement ingestd can attribute."""


@dataclasses.dataclass(frozen=True, slots=True)
class Acknowledgement:
    alert_id: str
    by: str
    """The broker username the acknowledgement was published under (the topic's last level)."""
    note: str | None


def _clean(text: str, limit: int) -> str:
    """One line of at most ``limit`` characters: control characters become spaces, runs of
    white space one space; a cut text ends with an ellipsis."""
    if any(unicodedata.category(c) == "Cc" for c in text):
        text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def parse_ack(topic: str, payload: bytes) -> Acknowledgement:
    """``alerts/ack/<alert id>/<username>`` with an optional note; AckRefused otherwise."""
    levels = topic[len(_ACK_PREFIX) :].split("/") if topic.startswith(_ACK_PREFIX) else []
    if len(levels) == 1 and levels[0]:
        raise AckRefused(
            f"{topic} names no one who acknowledged (the old form, whose payload anyone could"
            f" fill with any name): publish to {topic}/<your broker username> instead, which"
            " the gateway broker's ACL lets each operator do only under their own name"
            " (mosquitto/README.md)"
        )
    if len(levels) != 2 or not all(levels):
        raise AckRefused(f"{topic} is not alerts/ack/<alert id>/<username>")
    note = _clean(payload[: ACK_NOTE_MAX * 4].decode("utf-8", "replace"), ACK_NOTE_MAX)
    return Acknowledgement(levels[0], _clean(levels[1], ACK_BY_MAX), note or None)


def ack_topic(alert_id: str, by: str) -> str:
    """Where ``by``'s acknowledgement of ``alert_id`` is published (ingestd's own account may
    write any name: a cluster instance passes on what its HTTP API was told)."""
    return f"{_ACK_PREFIX}{topic_level(alert_id)}/{topic_level(_clean(by, ACK_BY_MAX))}"


class AlertView(Protocol):
    """What the HTTP API asks of the alerts (one stage, or a cluster's partitions)."""

    def firing(self) -> list[dict[str, Any]]: ...

    def acknowledge(
        self, alert_id: str, by: str, note: str | None = None
    ) -> dict[str, Any] | None: ...


class StateStore(Protocol):
    """Where an alert stage keeps its state: files in the spool dir (one instance), or Redis
    (a partition of a cluster, :mod:`ingestd.cluster.rules`)."""

    def load(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The last full snapshot and the last essential one (either may be missing)."""

    async def save_recent(self, data: bytes, writes: Sequence[Callable[[], bool]]) -> bool:
        """The transitions' hand-offs (outbox, history), then the essential snapshot."""

    async def save_full(self, header: dict[str, Any], parts: AsyncIterator[bytes]) -> bool:
        """The whole state: ``header`` with ``"states"``, a JSON array whose items come in
        ``parts`` (each the items of a part, comma-separated, without brackets), produced
        while the store writes them so the whole state is never held at once."""

    def close(self) -> None: ...


class FileStore:
    """``alerts.json`` (full) and ``alerts.recent.json`` (essential) in the spool dir, written
    one at a time, in order, in their own thread, so a cancelled or overlapping save can never
    put an older state in place."""

    def __init__(self, state_dir: Path) -> None:
        self.full_file = state_dir / "alerts.json"
        self.recent_file = state_dir / "alerts.recent.json"
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alert-state")
        self._full_lock = asyncio.Lock()

    def __str__(self) -> str:
        return str(self.full_file)

    def load(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        recent: dict[str, Any] | None = None
        full: dict[str, Any] | None = None
        with contextlib.suppress(FileNotFoundError):
            recent = orjson.loads(self.recent_file.read_bytes())
        with contextlib.suppress(FileNotFoundError):
            full = orjson.loads(self.full_file.read_bytes())
        return full, recent

    async def save_recent(self, data: bytes, writes: Sequence[Callable[[], bool]]) -> bool:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._saver, _save, self.recent_file, data, writes)

    async def save_full(self, header: dict[str, Any], parts: AsyncIterator[bytes]) -> bool:
        """Written part by part as they come (a part is a few MiB; the whole state of
        10,000 devices, held at once and copied twice, raised the RSS by 70 MiB every 30 s),
        each write, the fsync and the rename in the saver thread (a slow SD card holds that
        thread, not the event loop), in order with the other saves."""
        loop = asyncio.get_running_loop()
        tmp = self.full_file.with_suffix(".tmp")

        def run(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(self._saver, fn, *args)

        async with self._full_lock:
            try:
                with tmp.open("wb", buffering=0) as handle:
                    await run(handle.write, orjson.dumps(header)[:-1] + b',"states":[')
                    first = True
                    async for part in parts:
                        await run(handle.write, part if first else b"," + part)
                        first = False
                    await run(handle.write, b"]}")
                    await run(os.fsync, handle.fileno())
                await run(durable.replace, tmp, self.full_file)
            except OSError as exc:
                log.error("cannot save the alert state; will retry", file=str(tmp), error=str(exc))
                with contextlib.suppress(OSError):
                    tmp.unlink()  # a partial file would take disk space until the next try
                return False
        return True

    def close(self) -> None:
        self._saver.shutdown(wait=True)


class AlertStage:
    def __init__(
        self,
        section: RulesSection,
        state_dir: Path,
        metrics: Metrics,
        health: Health,
        publish: Publish,
        *,
        clock: Callable[[], float] = time.time,
        notifier: Handoff | None = None,
        history: Handoff | None = None,
        store: StateStore | None = None,
        ruleset: RuleSet | None = None,
    ) -> None:
        self._section = section
        self._notifier = notifier
        self._history = history
        # The alerts a transition changed, saved at every transition (cheap), laid over
        # the full state, saved every _FULL_EVERY (its cost grows with the fleet).
        self._store: StateStore = store if store is not None else FileStore(state_dir)
        self._metrics = metrics
        self._health = health
        self._publish = publish
        self._clock = clock
        self._outgoing: deque[tuple[str, bytes, bool]] = deque()
        self._dirty = False
        """A transition since the last save (of either kind)."""
        self._stale = False
        """Readings or transitions since the last full save."""
        self._saved_at = 0.0
        self._full_at = time.monotonic()
        self._save_lock = asyncio.Lock()
        self._evaluations = 0
        self._watch_failed = False
        self._signature: tuple[tuple[str, int, int], ...] = ()
        self._signature = self._files_signature()
        self.engine = Engine(ruleset if ruleset is not None else self._load_initial(), clock)
        self._restore()
        metrics.rules_loaded.set(len(self.engine.ruleset))

    # --- startup ------------------------------------------------------------------------

    def _load_initial(self) -> RuleSet:
        if not self._section.dir.exists():
            log.warning("no alert rules: rules.dir does not exist", dir=str(self._section.dir))
            return RuleSet()
        ruleset = load_rules(self._section.dir)  # invalid at start: a ConfigError, exit 2
        log.info("alert rules loaded", rules=len(ruleset), dir=str(self._section.dir))
        return ruleset

    def _restore(self) -> None:
        try:
            snapshot, recent = self._store.load()
            if snapshot is None:
                if recent is None:
                    return
                snapshot = {**recent, "at": 0.0, "states": []}  # killed before a full save
            self.engine = Engine.restore(self.engine.ruleset, snapshot, self._clock, recent=recent)
        except (SnapshotError, orjson.JSONDecodeError) as exc:
            log.error("alert state unreadable; starting without it", error=str(exc))
            return
        log.info("alert state restored", firing=len(self.engine.firing()), store=str(self._store))

    # --- input --------------------------------------------------------------------------

    def evaluate(self, readings: Sequence[Reading], *, announce: bool = True) -> None:
        """Readings through the rules; ``announce=False`` (a cluster partition replaying what
        its previous owner already announced) moves the state without any event."""
        self._stale = True
        engine = self.engine
        for reading in readings:
            try:
                events = engine.evaluate(reading)
            except Exception:  # a bug in the engine must not stop ingestion: say so
                self._metrics.rule_errors.inc()
                log.exception("internal error evaluating rules; reading skipped by the rules")
                continue
            if events and announce:
                self._emit(events)

    @staticmethod
    def is_ack(topic: str) -> bool:
        return topic.startswith(_ACK_PREFIX)

    def acknowledge(self, alert_id: str, by: str, note: str | None = None) -> dict[str, Any] | None:
        """Acknowledge a firing alert; None when there is no such firing alert. ``note``
        (cut to ACK_NOTE_MAX) is the acknowledged event's ``reason``."""
        by = _clean(by, ACK_BY_MAX) or "unknown"
        if note is not None:
            note = _clean(note, ACK_NOTE_MAX) or None
        event = self.engine.acknowledge(alert_id, by)
        if event is None:
            log.info("acknowledgement for no firing alert", alert=alert_id, by=by)
            return None
        if note is not None:
            event = dataclasses.replace(event, reason=note)
        log.info("alert acknowledged", alert=alert_id, by=by, note=note)
        self._emit([event])
        return event.to_dict()

    def acknowledge_message(self, topic: str, payload: bytes) -> None:
        try:
            ack = parse_ack(topic, payload)
        except AckRefused as exc:
            log.warning("acknowledgement refused", topic=topic[:200], why=str(exc))
            return
        self.acknowledge(ack.alert_id, ack.by, ack.note)

    def firing(self) -> list[dict[str, Any]]:
        return [alert.to_dict() for alert in self.engine.firing()]

    # --- output -------------------------------------------------------------------------

    def _emit(self, events: Sequence[AlertEvent]) -> None:
        for event in events:
            self._metrics.alert_events.labels(event.kind, event.severity).inc()
            payload = orjson.dumps(event.to_dict())
            state = b"" if event.state == "resolved" else payload
            self._queue(event.topic(), payload, False)
            self._queue(event.state_topic(), state, True)
            log.info(
                f"alert {event.kind}",
                alert=event.id,
                rule=event.rule,
                device=event.device,
                severity=event.severity,
                value=event.value,
            )
        if self._notifier is not None:
            self._notifier.submit(events)
        if self._history is not None:
            self._history.submit(events)
        self._dirty = True
        self._flush()

    def _queue(self, topic: str, payload: bytes, retain: bool) -> None:
        if len(self._outgoing) >= _OUTGOING_MAX:
            self._outgoing.popleft()
            self._metrics.alert_publish_dropped.inc()
        self._outgoing.append((topic, payload, retain))

    def _flush(self) -> None:
        """Publish what is queued, in order, while the broker connection takes it."""
        while self._outgoing:
            topic, payload, retain = self._outgoing[0]
            if not self._publish(topic, payload, retain):
                return
            self._outgoing.popleft()

    # --- the stage's own loop -------------------------------------------------------------

    async def run(self) -> None:
        """Timers (for, deadman, repeat), saving state, watching the rule files."""
        next_watch = 0.0
        while True:
            await asyncio.sleep(self.wait())
            await self.step()
            for state, count in self.engine.counts().items():
                self._metrics.alerts.labels(state).set(count)
            if time.monotonic() >= next_watch:
                next_watch = time.monotonic() + self._section.watch_interval
                if self.rules_changed():
                    await self.reload("a rule file changed")

    def wait(self) -> float:
        """Seconds until the next timer is due (at most one)."""
        deadline = self.engine.next_deadline()
        return 1.0 if deadline is None else min(1.0, max(0.0, deadline - self._clock()))

    async def step(self) -> None:
        """Run the timers that are due, publish, save what changed."""
        events = self.engine.tick()
        if events:
            self._emit(events)
        self._flush()
        if self._dirty:
            await self.save_if_changed()
        if self._stale and time.monotonic() >= self._full_at + _FULL_EVERY:
            await self.save_full()
        evaluations = self.engine.stats.evaluations
        self._metrics.rule_evaluations.inc(max(0, evaluations - self._evaluations))
        self._evaluations = evaluations

    def rules_changed(self) -> bool:
        """Whether a rule file changed since the last look (or load)."""
        signature = self._files_signature()
        if signature == self._signature:
            return False
        self._signature = signature
        return True

    def owns(self, alert_id: str) -> bool:
        """Whether this stage holds the open alert ``alert_id``."""
        return any(alert.id == alert_id for alert in self.engine.active())

    async def save_if_changed(self) -> None:
        """Return once every transition so far is saved. The spool runs this beside each
        commit, so a message is acknowledged only once what it caused is on disk; during
        a storm of transitions saves are coalesced to one per ``_SAVE_EVERY``."""
        if self._dirty:
            delay = self._saved_at + _SAVE_EVERY - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        async with self._save_lock:  # also waits for a save in flight that holds them
            while self._dirty:
                await self._save()
                if self._dirty:  # not written (a full or failing disk): the acks wait
                    self._health.problem(
                        "alerts", "cannot save alert state; messages wait unacknowledged"
                    )
                    await asyncio.sleep(_SAVE_RETRY)
                    continue
                self._health.ok("alerts")

    async def save(self) -> None:
        """Write everything now: the transitions, then the whole state."""
        await self.save_if_changed()
        await self.save_full()

    async def save_full(self) -> None:
        """Write the whole state (every state of every rule: its cost grows with the fleet).
        Dumped in parts between which the event loop runs on, encoded and written in the
        saver thread; it holds no lock, so acknowledgements never wait for it."""
        self._stale = False
        self._full_at = time.monotonic()
        header, parts = self.engine.snapshot_in_parts()

        async def encoded() -> AsyncIterator[bytes]:
            # Each part encoded at once and handed on: the loop never holds the whole state
            # as objects (they outlived young collections and set off full ones: 150 ms
            # pauses, bench) nor as one byte string.
            for part in parts:
                if part:
                    yield orjson.dumps(part)[1:-1]
                await asyncio.sleep(0)

        try:
            saved = await self._store.save_full(header, encoded())
        except BaseException:
            self._stale = True
            raise
        if not saved:
            self._stale = True  # try again at the next turn

    async def _save(self) -> None:
        """The transitions: the notification outbox, the alert history and the essential
        state, in one ordered step (see the store)."""
        self._dirty = False
        self._saved_at = time.monotonic()
        data = orjson.dumps(self.engine.snapshot(essential=True))
        writes = [
            write
            for handoff in (self._notifier, self._history)
            if handoff is not None and (write := handoff.take()) is not None
        ]
        try:
            saved = await self._store.save_recent(data, writes)
        except BaseException:
            self._dirty = True
            raise
        if not saved:
            self._dirty = True  # try again at the next turn

    async def reload(self, why: str) -> bool:
        """Validate everything, then swap; keep the old rules when anything is wrong."""
        ruleset = await self.load_rules(why)
        if ruleset is None:
            return False
        events = await self.apply(ruleset)
        self.reloaded(ruleset, why, events)
        return True

    async def load_rules(self, why: str) -> RuleSet | None:
        """The rules as the files say now; None (said loudly, on MQTT too) when invalid."""
        self._signature = self._files_signature()
        failure: RulesError | None = None
        try:
            ruleset = await asyncio.to_thread(load_rules, self._section.dir)
        except RulesError as exc:
            failure = exc
        except OSError as exc:
            failure = RulesError([f"{self._section.dir}: cannot read the rules: {exc}"])
        if failure is not None:
            self._metrics.rule_reload_errors.inc()
            self._health.problem("rules", f"reload failed, previous rules kept: {failure}")
            log.error("rule reload failed; previous rules kept", why=why, problems=failure.problems)
            notice = {
                "problems": failure.problems,
                "at": self._clock(),
                "kept_rules": len(self.engine.ruleset),
            }
            self._queue(ERROR_TOPIC, orjson.dumps(notice), False)
            self._flush()
            return None
        return ruleset

    async def apply(self, ruleset: RuleSet) -> int:
        """Swap to ``ruleset`` (valid), keeping every alert's state; the events it caused."""
        events = self.engine.reload(ruleset)
        if events:
            self._emit(events)
        await self.save()
        return len(events)

    def reloaded(self, ruleset: RuleSet, why: str, events: int) -> None:
        """Say that the rules were reloaded (metrics, health, log)."""
        self._metrics.rule_reloads.inc()
        self._metrics.rules_loaded.set(len(ruleset))
        self._health.ok("rules", f"{len(ruleset)} rules")
        log.info("rules reloaded", why=why, rules=len(ruleset), events=events)

    def _files_signature(self) -> tuple[tuple[str, int, int], ...]:
        directory = self._section.dir
        if not directory.is_dir():
            return ()
        try:
            names = sorted(directory.iterdir())
        except OSError as exc:
            # No file descriptor left (EMFILE), or the directory unreadable for a moment:
            # the rules stay as they are and the next look tries again. Raised here, it
            # would end the stage and with it the daemon.
            if not self._watch_failed:
                log.warning("cannot look at the rule files; will look again", error=str(exc))
            self._watch_failed = True
            return self._signature
        self._watch_failed = False
        entries = []
        for path in names:
            if path.suffix in {".yaml", ".yml"}:
                with contextlib.suppress(FileNotFoundError):
                    stat = path.stat()
                    entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    async def close(self) -> None:
        self._flush()
        await self.save()
        self._store.close()


def run_writes(writes: Sequence[Callable[[], bool]]) -> bool:
    """The hand-offs' writes (outbox, history); each stages its data again when it fails."""
    return all([write() for write in writes])  # every write runs, even after a failure


def _save(path: Path, data: bytes, writes: Sequence[Callable[[], bool]]) -> bool:
    """The notification outbox and the alert history first, in the same ordered step: a
    crash in between repeats a transition (it happens again after the restart), it never
    loses one."""
    return _write_atomically(path, data) if run_writes(writes) else False


def _write_atomically(path: Path, data: bytes) -> bool:
    tmp = path.with_suffix(".tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        durable.replace(tmp, path)  # the messages are acknowledged after this
    except OSError as exc:
        log.error("cannot save the alert state; will retry", file=str(path), error=str(exc))
        return False
    return True
