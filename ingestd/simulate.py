"""The sensor fleet simulator: hydroponic readings over MQTT at a steady rate, with sequence
numbers, from one process or several, and a report of the rate really achieved.

Each device publishes one JSON reading per turn to ``<prefix>/<site>/<device>/reservoir``,
e.g. ``farm/site1/esp32-00003/reservoir`` (the ``farm/{site}/{device}/{measurement}``
subscription of config/ingestd.yaml). ``seq`` counts each device's messages from 0, so a
subscriber can prove that none went missing; the other fields come from
:mod:`ingestd.greenhouse` (diurnal cycles, noise, and anomalies the example rules catch).

    Fleet(url, devices, sites, prefix, qos)      one MQTT connection, in this process:
        .run(rate, count, duration) -> int         messages published (all acknowledged)
        .publish(...) -> Share                     the same, with its timing
    simulate(fleet, rate, count, duration,       the fleet split over processes, each with
             processes=N) -> Report                its own connection and a share of the
                                                   devices (and of the rate and the count)

A ``Fleet`` publishes :data:`~ingestd.greenhouse.BASIC_FIELDS` without anomalies unless told
otherwise (what tests and benchmarks expect); ``ingestd simulate`` publishes every field
with ``--anomalies normal``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import multiprocessing.synchronize
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from ingestd.greenhouse import BASIC_FIELDS, FIELDS, Anomalies, Device, Episode

__all__ = [
    "FIELDS",
    "PROCESS_RATE",
    "Flag",
    "Fleet",
    "Report",
    "Share",
    "check_run",
    "default_processes",
    "describe",
    "new_seed",
    "reading",
    "simulate",
    "stop_on_signals",
]

PROCESS_RATE = 5000.0
"""Messages/s per publisher process when ``processes`` is not given: one process publishes
about 5,000 msg/s at QoS 1 and 15,000 at QoS 0 to a broker on the same 2-core machine."""
WINDOW = 10_000
"""QoS 1 messages in flight per connection: publishing waits for acknowledgements beyond
it (paho's message ids wrap at 65,535, and memory stays bounded)."""
_CHECK_EVERY = 0.1  # seconds between looks at the stop flag


class Flag(Protocol):
    """A stop signal: a ``threading.Event`` or a ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def reading(device_index: int, seq: int, when: float) -> dict[str, float]:
    """The first simulator's reading (five fields and ``seq``), kept for old callers."""
    values = Device(device_index, "site1", seed=0).reading(when)
    return {"seq": float(seq), **{f: values[f] for f in BASIC_FIELDS}}


@dataclass
class Fleet:
    """Devices ``esp32-<first>`` ... on ``sites`` (device n on site n mod the number of
    sites), publishing through one MQTT connection (:meth:`run`, :meth:`publish`)."""

    url: str = "mqtt://127.0.0.1:1883"
    devices: int = 10
    sites: int | Sequence[str] = 2
    """How many generated sites (site1, site2, ...), or the sites' names."""
    prefix: str = "farm"
    qos: int = 1
    client_id: str | None = None
    first: int = 0
    """Number of the first device (esp32-<first>...): fleets with different ranges coexist."""
    fields: Sequence[str] = BASIC_FIELDS
    """The fields each reading carries (besides ``seq``); :data:`FIELDS` is all of them."""
    anomalies: Anomalies | str = Anomalies.OFF
    seed: int | None = None
    """Fixes the devices, their anomalies and their noise; None: a new one per publish."""
    utc_offset: float | None = None
    """The greenhouses' local time, seconds east of UTC; None: this machine's."""
    shift: float = 0.0
    """Seconds the devices' model runs ahead of the clock (negative: behind): their anomalies
    and day as they are then. Anomalies come in 4-hour slots and start some way into one, so
    a short run made just after a slot began would see none (the soak picks a shift)."""

    def __post_init__(self) -> None:
        if not isinstance(self.sites, int):
            self.sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
            bad = [s for s in self.sites if not s or any(c in s for c in "/+#\0")]
            if not self.sites or bad:
                raise ValueError(f"sites = {bad or '[]'}: need names without / + # (a topic level)")
        elif self.sites < 1:
            raise ValueError(f"sites = {self.sites}: must be at least 1")
        if self.devices < 1:
            raise ValueError(f"devices = {self.devices}: must be at least 1")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"qos = {self.qos}: must be 0, 1 or 2")
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown or not self.fields:
            raise ValueError(f"fields = {list(self.fields)}: choose from {', '.join(FIELDS)}")
        self.fields = tuple(self.fields)
        self.anomalies = Anomalies(self.anomalies)

    # --- what the fleet is --------------------------------------------------------------

    @staticmethod
    def device_name(number: int) -> str:
        return f"esp32-{number:05d}"

    def site(self, number: int) -> str:
        if isinstance(self.sites, int):
            return f"site{number % self.sites + 1}"
        return self.sites[number % len(self.sites)]

    def topics(self) -> Iterator[tuple[int, str]]:
        for index in range(self.devices):
            number = self.first + index
            yield index, f"{self.prefix}/{self.site(number)}/{self.device_name(number)}/reservoir"

    def models(self, seed: int) -> list[Device]:
        """The greenhouse model of each device, in :meth:`topics` order."""
        offset = _local_utc_offset() if self.utc_offset is None else self.utc_offset
        return [
            Device(
                number,
                self.site(number),
                seed=seed,
                anomalies=self.anomalies,
                utc_offset=offset,
                name=self.device_name(number),
            )
            for number in range(self.first, self.first + self.devices)
        ]

    def episodes(self, start: float, end: float, seed: int) -> list[Episode]:
        """The anomalies of this fleet that overlap ``[start, end)`` (epoch seconds)."""
        if self.anomalies == Anomalies.OFF:
            return []
        found = [e for model in self.models(seed) for e in model.episodes(start, end)]
        return sorted(found, key=lambda e: (e.start, e.device))

    # --- publishing ---------------------------------------------------------------------

    def run(
        self,
        rate: float,
        count: int | None = None,
        duration: float | None = None,
        ack_timeout: float = 120.0,
    ) -> int:
        """Publish ``rate`` messages/s in round-robin over the devices; returns how many.

        Stops after ``count`` messages, ``duration`` seconds, or never; QoS 1 messages are
        all acknowledged by the broker before this returns.
        """
        return self.publish(rate, count, duration, ack_timeout=ack_timeout).messages

    def publish(
        self,
        rate: float,
        count: int | None = None,
        duration: float | None = None,
        *,
        ack_timeout: float = 120.0,
        stop: Flag | None = None,
        process: int = 0,
    ) -> Share:
        """:meth:`run`, returning the timing too; stops early when ``stop`` is set."""
        check_run(rate, count, duration)
        link = _Link(self.url, self.qos, self.client_id)
        link.open()
        try:
            return self._publish(link, rate, count, duration, ack_timeout, stop, process)
        finally:
            link.close()

    def _publish(  # noqa: PLR0917
        self,
        link: _Link,
        rate: float,
        count: int | None,
        duration: float | None,
        ack_timeout: float,
        stop: Flag | None,
        process: int,
    ) -> Share:
        seed = new_seed() if self.seed is None else self.seed
        topics = [topic for _, topic in self.topics()]
        models = self.models(seed)
        every_field = self.fields == FIELDS
        fields = self.fields
        watch_dropouts = self.anomalies != Anomalies.OFF
        seqs = [0] * len(topics)
        sent = turns = index = silent_in_a_row = 0
        started = time.monotonic()
        deadline = math.inf if duration is None else started + duration
        look_at_stop = started + _CHECK_EVERY
        while count is None or sent < count:
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= look_at_stop:
                if stop is not None and stop.is_set():
                    break
                look_at_stop = now + _CHECK_EVERY
            at = time.time() + self.shift
            model = models[index]
            if watch_dropouts and model.silent(at):
                # A silent device's turn passes unused: the fleet's rate falls as it would.
                silent_in_a_row += 1
                if silent_in_a_row >= len(models):  # all silent: no busy loop
                    time.sleep(0.05)
                    silent_in_a_row = 0
            else:
                silent_in_a_row = 0
                values = model.reading(at)
                if not every_field:
                    values = {f: values[f] for f in fields if f in values}
                payload = orjson.dumps({"seq": float(seqs[index]), **values})
                if link.send(topics[index], payload, ack_timeout):
                    seqs[index] += 1
                    sent += 1
            index = (index + 1) % len(topics)
            turns += 1
            ahead = turns / rate - (time.monotonic() - started)
            if ahead > 0.002:
                if stop is None:
                    time.sleep(ahead)
                elif stop.wait(ahead):
                    break
        link.drain(sent, ack_timeout)
        return Share(
            process=process,
            first=self.first,
            devices=self.devices,
            first_device=self.device_name(self.first),
            last_device=self.device_name(self.first + self.devices - 1),
            messages=sent,
            refused=link.refused,
            started=started,
            finished=time.monotonic(),
        )


class _Link:
    """One MQTT connection that publishes with at most :data:`WINDOW` messages unacknowledged
    and counts the broker's refusals (an MQTT 5 PUBACK with a failure reason code, e.g.
    "Not authorized" when the ACL does not let this user publish there)."""

    def __init__(self, url: str, qos: int, client_id: str | None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.qos = qos
        self.refused = 0
        self._client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"ingestd-sim-{random.getrandbits(32):08x}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if parts.username:
            self._client.username_pw_set(parts.username, parts.password)
        if parts.scheme == "mqtts":
            self._client.tls_set()
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        # While the broker is away paho keeps QoS 1 messages and re-sends them after it
        # reconnects by itself; count the broker's acks rather than trusting publish().
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._unacked = 0
        self._acks = threading.Condition()
        self._last: paho.MQTTMessageInfo | None = None
        self._client.on_connect = self._on_connect
        self._client.on_publish = self._on_publish

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connack = reason
        self._connected.set()

    def _on_publish(self, _c: Any, _u: Any, _mid: int, reason: ReasonCode, _p: Any) -> None:
        if not self.qos:  # written to the socket; nothing to count
            return
        with self._acks:
            if reason.is_failure:
                self.refused += 1
            self._unacked -= 1
            self._acks.notify_all()

    def open(self, timeout: float = 10.0) -> None:
        try:
            self._client.connect(self.host, self.port, keepalive=30)
        except OSError as exc:
            raise ConnectionError(
                f"simulator: cannot reach {self.host}:{self.port}: {exc}"
            ) from exc
        self._client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise ConnectionError(f"simulator: no CONNACK from {self.host}:{self.port}")
        if self._connack is not None and self._connack.is_failure:
            self.close()
            raise ConnectionError(
                f"simulator: {self.host}:{self.port} refused the connection: {self._connack}"
            )

    def send(self, topic: str, payload: bytes, ack_timeout: float) -> bool:
        """Publish; False when a QoS 0 message could not be handed to a connection."""
        if self.qos:
            with self._acks:
                if not self._acks.wait_for(lambda: self._unacked < WINDOW, ack_timeout):
                    raise TimeoutError(
                        f"simulator: the broker acknowledged nothing for {ack_timeout}s "
                        f"with {WINDOW} messages waiting"
                    )
                self._unacked += 1
        info = self._client.publish(topic, payload, qos=self.qos)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._last = info
            return True
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if self.qos:  # queued by paho, sent after it reconnects
                return True
            time.sleep(0.05)  # QoS 0 is lost while disconnected: wait for the reconnect
            return False
        raise ConnectionError(f"simulator: publish failed: {paho.error_string(info.rc)}")

    def drain(self, sent: int, timeout: float) -> None:
        """Wait until the broker acknowledged every QoS 1 message, or paho wrote the last
        QoS 0 one to the socket."""
        if self.qos:
            with self._acks:
                if not self._acks.wait_for(lambda: self._unacked <= 0, timeout):
                    raise TimeoutError(
                        f"simulator: the broker did not acknowledge {self._unacked} of "
                        f"{sent} messages within {timeout}s"
                    )
        elif self._last is not None:
            self._last.wait_for_publish(timeout)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# --- several processes, and the report -------------------------------------------------


@dataclass(frozen=True)
class Share:
    """What one publisher process did with its share of the devices."""

    process: int
    first: int
    """Number of its first device; it had ``devices`` consecutive ones."""
    devices: int
    first_device: str
    last_device: str
    messages: int
    refused: int
    """Messages the broker refused (MQTT 5 PUBACK reason code), among ``messages``."""
    started: float
    """``time.monotonic()`` at its first message (system-wide on Linux)."""
    finished: float
    """When the broker had acknowledged its last message (QoS 1) or it was written (QoS 0)."""

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Report:
    """What a simulation did: messages, time and rate, in all and per process."""

    shares: tuple[Share, ...]
    offered_rate: float
    qos: int
    seed: int
    anomaly_level: Anomalies
    anomalies: tuple[Episode, ...]
    """The anomalies that overlapped the run."""

    @property
    def messages(self) -> int:
        return sum(s.messages for s in self.shares)

    @property
    def refused(self) -> int:
        return sum(s.refused for s in self.shares)

    @property
    def seconds(self) -> float:
        return max(s.finished for s in self.shares) - min(s.started for s in self.shares)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "seconds": round(self.seconds, 3),
            "rate": round(self.rate, 1),
            "offered_rate": self.offered_rate,
            "refused": self.refused,
            "qos": self.qos,
            "seed": self.seed,
            "anomaly_level": str(self.anomaly_level),
            "processes": [
                {
                    "process": s.process,
                    "first_device": s.first_device,
                    "last_device": s.last_device,
                    "devices": s.devices,
                    "messages": s.messages,
                    "refused": s.refused,
                    "seconds": round(s.seconds, 3),
                    "rate": round(s.rate, 1),
                }
                for s in self.shares
            ],
            "anomalies": [
                {
                    "device": e.device,
                    "site": e.site,
                    "kind": e.kind,
                    "field": e.field,
                    "target": None if e.target is None else round(e.target, 3),
                    "start": _iso(e.start),
                    "end": _iso(e.end),
                }
                for e in self.anomalies
            ],
        }

    def text(self, anomalies_listed: int = 20) -> str:
        lines = [
            f"ingestd simulate: {self.messages} messages in {self.seconds:.2f} s = "
            f"{self.rate:.0f} msg/s (asked {self.offered_rate:g} msg/s, QoS {self.qos}, "
            f"{len(self.shares)} process{'es' if len(self.shares) > 1 else ''}, seed {self.seed})"
        ]
        if self.refused:
            lines.append(f"  REFUSED by the broker: {self.refused} of them")
        if len(self.shares) > 1:
            for s in self.shares:
                lines.append(
                    f"  process {s.process}: {s.first_device}..{s.last_device} "
                    f"{s.messages} messages in {s.seconds:.2f} s = {s.rate:.0f} msg/s"
                    + (f", {s.refused} refused" if s.refused else "")
                )
        if self.anomaly_level != Anomalies.OFF:
            lines.append(f"  anomalies ({self.anomaly_level}): {len(self.anomalies)}")
            for e in self.anomalies[:anomalies_listed]:
                what = e.kind if e.target is None else f"{e.kind} ({e.field} -> {e.target:.4g})"
                lines.append(
                    f"    {_iso(e.start)} .. {_iso(e.end)[11:]}  {e.site}/{e.device}  {what}"
                )
            if len(self.anomalies) > anomalies_listed:
                lines.append(f"    ... {len(self.anomalies) - anomalies_listed} more (--json)")
        return "\n".join(lines) + "\n"


def default_processes(rate: float, devices: int) -> int:
    """One process per :data:`PROCESS_RATE` msg/s, at most one per CPU and per device."""
    wanted = math.ceil(rate / PROCESS_RATE) if math.isfinite(rate) else os.cpu_count() or 1
    return max(1, min(wanted, os.cpu_count() or 1, devices))


def new_seed() -> int:
    return random.SystemRandom().getrandbits(32)


def describe(fleet: Fleet, rate: float, processes: int) -> str:
    """One line saying what is about to be published (no password)."""
    parts = urlsplit(fleet.url)
    first, last = fleet.device_name(fleet.first), fleet.device_name(fleet.first + fleet.devices - 1)
    sites = dict.fromkeys(fleet.site(fleet.first + i) for i in range(min(fleet.devices, 1000)))
    return (
        f"ingestd simulate: {fleet.devices} device{'s' if fleet.devices > 1 else ''} "
        f"({first}..{last}) on {', '.join(sites)} -> {parts.hostname}:{parts.port or 1883} "
        f"{fleet.prefix}/<site>/<device>/reservoir, {rate:g} msg/s, QoS {fleet.qos}, "
        f"{processes} process{'es' if processes > 1 else ''}, anomalies {fleet.anomalies}, "
        f"seed {fleet.seed}"
    )


def simulate(
    fleet: Fleet,
    rate: float,
    count: int | None = None,
    duration: float | None = None,
    *,
    processes: int | None = None,
    ack_timeout: float = 120.0,
    stop: Flag | None = None,
) -> Report:
    """Publish from ``processes`` processes (default: :func:`default_processes`), each with
    its own connection, a consecutive share of the devices and the same share of the rate
    and of the count; every device stays in one process, so its ``seq`` has no gaps.

    Returns when all are done (``count``, ``duration``, or ``stop`` set); raises
    ConnectionError (or TimeoutError) when a process could not connect or publish.
    """
    check_run(rate, count, duration, processes)
    n = min(processes or default_processes(rate, fleet.devices), fleet.devices)
    if fleet.seed is None:
        fleet = dataclasses.replace(fleet, seed=new_seed())
    assert fleet.seed is not None
    began = time.time()
    if n == 1:
        shares = [fleet.publish(rate, count, duration, ack_timeout=ack_timeout, stop=stop)]
    else:
        shares = _in_processes(fleet, n, rate, count, duration, ack_timeout, stop)
    return Report(
        shares=tuple(shares),
        offered_rate=rate,
        qos=fleet.qos,
        seed=fleet.seed,
        anomaly_level=Anomalies(fleet.anomalies),
        anomalies=tuple(
            dataclasses.replace(e, start=e.start - fleet.shift, end=e.end - fleet.shift)
            for e in fleet.episodes(began + fleet.shift, time.time() + fleet.shift, fleet.seed)
        ),
    )


@dataclass(frozen=True)
class _Job:
    process: int
    fleet: Fleet
    rate: float
    count: int | None
    duration: float | None
    ack_timeout: float


def _split(fleet: Fleet, n: int, rate: float, count: int | None) -> list[_Job]:
    """Consecutive device ranges; rate and count in proportion (the count exactly)."""
    sizes = [fleet.devices // n + (i < fleet.devices % n) for i in range(n)]
    counts: list[int | None] = [None] * n
    if count is not None:
        exact = [count * size / fleet.devices for size in sizes]
        floors = [math.floor(x) for x in exact]
        by_remainder = sorted(range(n), key=lambda i: floors[i] - exact[i])
        for i in by_remainder[: count - sum(floors)]:
            floors[i] += 1
        counts = list(floors)
    jobs, first = [], fleet.first
    for i, size in enumerate(sizes):
        client_id = f"{fleet.client_id}-{i}" if fleet.client_id else None
        share = dataclasses.replace(fleet, devices=size, first=first, client_id=client_id)
        jobs.append(_Job(i, share, rate * size / fleet.devices, counts[i], None, 0.0))
        first += size
    return jobs


def _in_processes(  # noqa: PLR0917
    fleet: Fleet,
    n: int,
    rate: float,
    count: int | None,
    duration: float | None,
    ack_timeout: float,
    stop: Flag | None,
) -> list[Share]:
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads
    events: multiprocessing.queues.Queue[tuple[str, int, Any]] = context.Queue()
    go, halt = context.Event(), context.Event()
    jobs = [
        dataclasses.replace(job, duration=duration, ack_timeout=ack_timeout)
        for job in _split(fleet, n, rate, count)
    ]
    workers = [
        context.Process(
            target=_worker,
            args=(job, go, halt, events, os.getpid()),
            name=f"ingestd-simulate-{job.process}",
            daemon=True,
        )
        for job in jobs
    ]
    for worker in workers:
        worker.start()
    try:
        ready = 0
        while ready < n:  # everyone connected before anyone publishes
            if stop is not None and stop.is_set():
                raise InterruptedError("simulator: stopped before it started")
            kind, index, detail = _next_event(events, workers, stop, halt, 60.0)
            if kind != "ready":
                raise ConnectionError(f"simulator process {index}: {detail}")
            ready += 1
        go.set()
        shares: dict[int, Share] = {}
        while len(shares) < n:
            kind, index, detail = _next_event(events, workers, stop, halt, None)
            if kind != "done":
                raise ConnectionError(f"simulator process {index}: {detail}")
            shares[index] = detail
        return [shares[i] for i in range(n)]
    finally:
        halt.set()
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.terminate()
                worker.join()
        events.close()
        events.join_thread()


def _next_event(
    events: multiprocessing.queues.Queue[tuple[str, int, Any]],
    workers: Sequence[multiprocessing.process.BaseProcess],
    stop: Flag | None,
    halt: multiprocessing.synchronize.Event,
    timeout: float | None,
) -> tuple[str, int, Any]:
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while True:
        if stop is not None and stop.is_set():
            halt.set()  # the workers finish what is in flight and report
        try:
            return events.get(timeout=0.2)
        except queue.Empty:
            pass
        for i, worker in enumerate(workers):
            if worker.exitcode is not None and worker.exitcode != 0:
                raise ConnectionError(
                    f"simulator process {i} exited with code {worker.exitcode} without a report"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"simulator: processes not ready within {timeout}s")


class _WorkerStop:
    """The parent's halt event, or the parent gone (so a worker never outlives it)."""

    def __init__(self, halt: Flag, parent: int) -> None:
        self.halt, self.parent = halt, parent

    def is_set(self) -> bool:
        return self.halt.is_set() or os.getppid() != self.parent

    def wait(self, timeout: float | None = None) -> bool:
        return self.halt.wait(timeout) or os.getppid() != self.parent


def _worker(
    job: _Job,
    go: Flag,
    halt: Flag,
    events: multiprocessing.queues.Queue[tuple[str, int, Any]],
    parent: int,
) -> None:
    """One publisher process: connect, say so, wait for the common start, publish, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it sets `halt`
    stop = _WorkerStop(halt, parent)
    fleet = job.fleet
    try:
        link = _Link(fleet.url, fleet.qos, fleet.client_id)
        link.open()
    except OSError as exc:
        events.put(("error", job.process, str(exc)))
        return
    try:
        events.put(("ready", job.process, None))
        while not go.wait(0.5):
            if stop.is_set():
                return
        share = fleet._publish(  # the same fleet, on the link opened above
            link, job.rate, job.count, job.duration, job.ack_timeout, stop, job.process
        )
        events.put(("done", job.process, share))
    except OSError as exc:
        events.put(("error", job.process, str(exc)))
    finally:
        link.close()


@contextlib.contextmanager
def stop_on_signals(*signums: signal.Signals) -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM (or ``signums``) while the block runs; the previous
    handlers are restored after it."""
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    chosen = signums or (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, handler) for s in chosen}
    try:
        yield stop
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def check_run(
    rate: float, count: int | None, duration: float | None, processes: int | None = None
) -> None:
    """Raise ValueError naming the first bad argument of :func:`simulate`."""
    if not rate > 0:
        raise ValueError(f"rate = {rate}: must be above 0 (messages per second)")
    if count is not None and count < 0:
        raise ValueError(f"count = {count}: must be 0 or more")
    if duration is not None and not duration > 0:
        raise ValueError(f"duration = {duration}: must be above 0 (seconds)")
    if processes is not None and processes < 1:
        raise ValueError(f"processes = {processes}: must be at least 1")


def _local_utc_offset() -> float:
    offset = datetime.now().astimezone().utcoffset()
    return offset.total_seconds() if offset is not None else 0.0


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
