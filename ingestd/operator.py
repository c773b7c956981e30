"""Operator tools: ``ingestd status`` (a one-screen summary from the daemon's HTTP endpoint),
``ingestd status --cluster`` (the instances of a cluster, from Redis) and ``ingestd tail``
(a live view of the alert topics). Plain text that works over SSH;
ANSI colour only when the output is a terminal and ``NO_COLOR`` is not set."""

from __future__ import annotations

import asyncio
import os
import queue
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client.parser import text_string_to_metric_families

from ingestd.cluster.members import ClusterUnavailable, Member, lease_owners, list_members
from ingestd.config import MqttSection, RedisSection, Settings, mask_url
from ingestd.store.redis import connect as connect_redis

__all__ = [
    "Metrics",
    "Tail",
    "cluster_status",
    "format_event",
    "parse_metrics",
    "status",
    "tail",
    "use_colour",
]

EXIT_OK, EXIT_FAILURE = 0, 1

RED, YELLOW, GREEN, DIM, BOLD, RESET = (
    "\033[31m",
    "\033[33m",
    "\033[32m",
    "\033[2m",
    "\033[1m",
    "\033[0m",
)
STATE_COLOURS = {"firing": RED, "acknowledged": YELLOW, "resolved": GREEN, "pending": DIM}


def use_colour(stream: TextIO) -> bool:
    """ANSI only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ


def _paint(text: str, colour: str, enabled: bool) -> str:
    return f"{colour}{text}{RESET}" if enabled and colour else text


# --- status -----------------------------------------------------------------------------


@dataclass
class Metrics:
    """Samples of one /metrics scrape: sample name -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.samples

    def total(self, name: str, **labels: str) -> float:
        return sum(
            value
            for found, value in self.samples.get(name, [])
            if all(found.get(k) == v for k, v in labels.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        result: dict[str, float] = {}
        for found, value in self.samples.get(name, []):
            key = found.get(label, "")
            result[key] = result.get(key, 0.0) + value
        return result


def parse_metrics(text: str) -> Metrics:
    metrics = Metrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            metrics.samples.setdefault(sample.name, []).append(
                (dict(sample.labels), float(sample.value))
            )
    return metrics


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, body); an HTTP error status is an answer too. OSError when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, bytes(exc.read())


def _bytes(n: float) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop returns


def _num(value: float) -> str:
    return f"{value:.0f}" if value == int(value) else f"{value:.6g}"


def status(
    settings: Settings,
    out: TextIO,
    *,
    interval: float = 1.0,
    timeout: float = 5.0,
    colour: bool | None = None,
) -> int:
    """Print the summary; 0 when the daemon is healthy, 1 when degraded or unreachable."""
    painted = use_colour(out) if colour is None else colour
    base = f"http://{settings.http.listen}"
    try:
        code, body = _get(base + "/healthz", timeout)
        health: dict[str, Any] = orjson.loads(body)
        _, first_text = _get(base + "/metrics", timeout)
        first_at = time.monotonic()
        time.sleep(interval)
        _, second_text = _get(base + "/metrics", timeout)
        elapsed = time.monotonic() - first_at
    except (OSError, orjson.JSONDecodeError) as exc:
        print(f"ingestd status: UNREACHABLE: cannot reach the daemon at {base}: {exc}", file=out)
        print("  is it running? (systemctl status ingestd)", file=out)
        return EXIT_FAILURE
    first = parse_metrics(first_text.decode("utf-8", "replace"))
    now = parse_metrics(second_text.decode("utf-8", "replace"))

    healthy = health.get("status") == "ok" and code == 200
    components: dict[str, dict[str, Any]] = health.get("components", {})
    verdict = _paint("OK", GREEN, painted) if healthy else _paint("DEGRADED", RED + BOLD, painted)
    ready = "ready" if health.get("ready") else "NOT READY"
    lines = [f"ingestd at {settings.http.listen}: {verdict} ({ready})", "health:"]
    width = max((len(name) for name in components), default=4)
    problems = []
    for name, state in components.items():
        ok = bool(state.get("ok"))
        detail = str(state.get("detail", ""))
        mark = "ok" if ok else _paint("PROBLEM", RED + BOLD, painted)
        lines.append(f"  {name:<{width}}  {mark:<7}  {detail}")
        if not ok:
            problems.append(f"{name}: {detail}")

    def rate(name: str) -> str:
        delta = now.total(name) - first.total(name)
        total = _num(now.total(name))
        if delta < 0 or elapsed <= 0:
            return f"n/a (total {total})"
        return f"{delta / elapsed:.1f}/s (total {total})"

    lines.append(f"rates over {elapsed:.1f}s:")
    lines.append(f"  messages received  {rate('ingestd_messages_received_total')}")
    lines.append(f"  messages accepted  {rate('ingestd_messages_accepted_total')}")
    lines.append(f"  messages rejected  {rate('ingestd_messages_rejected_total')}")
    lines.append(f"  points written     {rate('ingestd_points_written_total')}")

    full = now.total("ingestd_spool_full") > 0
    spool_state = _paint("FULL: acks stopped", RED + BOLD, painted) if full else "not full"
    # The backlog as /healthz measured it (what waits for the TSDB, and for how long).
    backlog: dict[str, float] = health.get("backlog") or {
        "readings": now.total("ingestd_spool_records"),
        "bytes": now.total("ingestd_spool_bytes"),
        "oldest_seconds": now.total("ingestd_spool_oldest_seconds"),
    }
    waiting = backlog.get("readings", 0.0)
    oldest = f" (the oldest for {_duration(backlog.get('oldest_seconds', 0.0))})"
    lines.append(
        f"spool: {_num(waiting)} readings waiting{oldest if waiting else ''}, "
        f"{_bytes(backlog.get('bytes', 0.0))} on disk, {spool_state}"
    )
    errors = now.by("ingestd_write_errors_total", "status")
    error_text = _num(sum(errors.values()))
    if errors:
        error_text += " (" + ", ".join(f"{k}={_num(v)}" for k, v in sorted(errors.items())) + ")"
    lines.append(
        f"sink: lag {now.total('ingestd_lag_seconds'):.2f}s, write errors {error_text}, "
        f"batches written {_num(now.total('ingestd_batches_written_total'))}"
    )
    connected = now.total("ingestd_mqtt_connected") > 0
    mqtt_state = "connected" if connected else _paint("DISCONNECTED", RED + BOLD, painted)
    lines.append(
        f"mqtt: {mqtt_state}, {_num(now.total('ingestd_mqtt_reconnects_total'))} reconnects"
    )

    by_state = now.by("ingestd_alerts", "state")
    firing = by_state.get("firing", 0.0)
    firing_text = _paint(f"{_num(firing)} firing", RED, painted and firing > 0)
    others = ", ".join(f"{_num(by_state.get(s, 0.0))} {s}" for s in ("acknowledged", "pending"))
    lines.append(
        f"alerts: {firing_text}, {others} ({_num(now.total('ingestd_rules_loaded'))} rules loaded)"
    )
    dropped = now.by("ingestd_quota_dropped_total", "device")
    quota = f"quota: {_num(sum(dropped.values()))} messages dropped"
    if dropped:
        quota += f" from {len(dropped)} devices (see: ingestd quotas)"
    lines.append(quota)
    if now.has("ingestd_notifications_pending") or now.has("ingestd_notifications_failed_total"):
        breakers = sum(1 for v in now.by("ingestd_notify_breaker_open", "channel").values() if v)
        lines.append(
            f"notifications: {_num(now.total('ingestd_notifications_pending'))} pending, "
            f"{_num(now.total('ingestd_notifications_failed_total'))} failed, "
            f"{breakers} breakers open"
        )
    if problems:
        lines.append(_paint("degraded: " + "; ".join(problems), RED, painted))
    elif not healthy:
        lines.append(_paint(f"degraded: /healthz answered {code}", RED, painted))
    out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_OK if healthy else EXIT_FAILURE


# --- status --cluster -------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def _ranges(partitions: Iterable[int]) -> str:
    """``0, 3-5, 9``: a long list of partitions stays on one readable line."""
    spans: list[list[int]] = []
    for p in sorted(partitions):
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


async def _read_cluster(
    section: RedisSection, partitions: int
) -> tuple[list[Member], dict[int, str | None]]:
    client = connect_redis(section)
    try:
        return await list_members(client), await lease_owners(client, partitions)
    finally:
        await client.aclose()


def cluster_status(settings: Settings, out: TextIO, *, colour: bool | None = None) -> int:
    """Print every live instance of the cluster (heartbeat, rates, spool, partitions held)
    and the partitions nobody holds, straight from Redis (no daemon has to answer). 0 when
    at least one instance is live and every partition has an owner, else 1 with the
    reason."""
    painted = use_colour(out) if colour is None else colour
    prefix = "ingestd status --cluster"
    if not settings.cluster.enabled:
        print(
            f"{prefix}: cluster.enabled is false in this configuration; the cluster is read"
            " with the configuration of one of its instances (--config)",
            file=out,
        )
        return EXIT_FAILURE
    if not settings.redis.url:
        print(f"{prefix}: redis.url is not set; the instances of a cluster meet in Redis", file=out)
        return EXIT_FAILURE
    where = mask_url(settings.redis.url)
    count = settings.cluster.partitions
    try:
        members, owners = asyncio.run(_read_cluster(settings.redis, count))
    except ClusterUnavailable as exc:
        print(f"{prefix}: UNREACHABLE: cannot read the cluster from {where}: {exc}", file=out)
        print("  is Redis running, and is redis.url the one the instances use?", file=out)
        return EXIT_FAILURE

    held: dict[str, int] = {}
    for owner in owners.values():
        if owner is not None:
            held[owner] = held.get(owner, 0) + 1
    unowned = [p for p, owner in owners.items() if owner is None]
    live = {m["instance"] for m in members}
    problems = []
    if not members:
        problems.append(
            "no live instance: none sent a heartbeat within 3 heartbeats (is ingestd running"
            " with cluster.enabled, and are the instances reaching this Redis?)"
        )
    if unowned:
        problems.append(
            f"{len(unowned)} of {_count(count, 'partition')} without an owner: their devices' rules"
            " are not evaluated"
        )

    verdict = _paint("DEGRADED", RED + BOLD, painted) if problems else _paint("OK", GREEN, painted)
    lines = [
        f"cluster at {where}: {verdict}, {_count(len(members), 'live instance')},"
        f" {_count(count, 'partition')}"
    ]
    if members:
        header = ("INSTANCE", "HOST", "PID", "UPTIME", "LAST BEAT", "RECV/S", "WRITTEN/S")
        rows = [(*header, "SPOOL", "PARTITIONS")]
        rows += [
            (
                m["instance"],
                m["host"],
                str(m["pid"]),
                _duration(m["uptime"]),
                f"{_duration(m['since_beat'])} ago",
                f"{m['received_per_s']:.1f}",
                f"{m['written_per_s']:.1f}",
                str(m["spool_waiting"]),
                str(held.get(m["instance"], 0)),  # the leases are the authority
            )
            for m in members
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            # names to the left, numbers to the right
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
            lines.append("  " + "  ".join(cells))
    if unowned:
        lines.append(_paint(f"partitions without an owner: {_ranges(unowned)}", RED, painted))
    else:
        lines.append(f"all {count} partitions owned")
    for instance in sorted(set(held) - live):
        lines.append(
            f"note: {instance} holds {_count(held[instance], 'partition')} but sends no heartbeat;"
            " another instance takes them when its leases run out (cluster.lease)"
        )
    if problems:
        lines.append(_paint("degraded: " + "; ".join(problems), RED, painted))
    out.write("\n".join(lines) + "\n")
    out.flush()
    return EXIT_FAILURE if problems else EXIT_OK


# --- tail -------------------------------------------------------------------------------

ACK_PREFIX = "alerts/ack/"
STATE_PREFIX = "alerts/state/"


def _when(stamp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(stamp)).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


def _value(event: dict[str, Any]) -> str:
    value, threshold = event.get("value"), event.get("threshold")
    text = f"{event.get('field', '?')}={'-' if value is None else _num(float(value))}"
    if threshold is not None:
        text += f" (threshold {_num(float(threshold))})"
    return text


def format_event(event: dict[str, Any], colour: bool) -> str:
    """One line per alert event: time, state, severity, site/device, rule, value vs
    threshold, id, who acknowledged."""
    state = str(event.get("state", "?"))
    kind = str(event.get("kind", state))
    label = state if kind == state else f"{state}/{kind}"
    painted = _paint(f"{label.upper():<22}", STATE_COLOURS.get(state, ""), colour)
    parts = [
        _when(event.get("at", event.get("since"))),
        painted,
        f"{event.get('severity', '?'):<9}",
        f"{event.get('site', '?')}/{event.get('device', '?')}",
        str(event.get("rule", "?")),
        _value(event),
        f"id={event.get('id', '?')}",
    ]
    if event.get("acknowledged_by"):
        parts.append(f"ack by {event['acknowledged_by']}")
    if event.get("reason"):
        parts.append(f"({event['reason']})")
    return "  ".join(parts)


@dataclass
class _Note:
    text: str
    fatal: bool = False


class Tail:
    """Follow ``alerts/#`` with paho; messages go through a queue to the printing thread."""

    def __init__(
        self,
        section: MqttSection,
        url: str | None,
        out: TextIO,
        err: TextIO,
        *,
        severities: Iterable[str] = (),
        colour: bool | None = None,
        settle: float = 0.5,
    ) -> None:
        self._url = url or section.url
        self._section = section
        self._out, self._err = out, err
        self._severities = {s for s in severities if s}
        self._colour = use_colour(out) if colour is None else colour
        self._settle = settle
        self._queue: queue.Queue[paho.MQTTMessage | _Note | str] = queue.Queue()

    def _client(self) -> paho.Client:
        parts = urlsplit(self._url)
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"ingestd-tail-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=True,
        )
        username, password = self._section.credentials()
        if parts.username:  # credentials in --url win
            username, password = parts.username, parts.password
        if username is not None:
            client.username_pw_set(username, password)
        if parts.scheme == "mqtts":
            section = self._section
            client.tls_set(
                ca_certs=str(section.ca_file) if section.ca_file else None,
                certfile=str(section.cert_file) if section.cert_file else None,
                keyfile=str(section.key_file) if section.key_file else None,
            )
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = lambda _c, _u, msg: self._queue.put(msg)
        return client

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._queue.put(_Note(f"broker refused the connection: {reason}", fatal=True))
            return
        client.subscribe("alerts/#", qos=1)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._queue.put(_Note(f"disconnected from {self._where()}: {reason}; reconnecting"))

    def _on_subscribe(self, _c: Any, _u: Any, _m: Any, codes: Any, _p: Any) -> None:
        if any(code.is_failure for code in codes):
            self._queue.put(_Note("broker refused the subscription to alerts/#", fatal=True))
        else:
            self._queue.put("subscribed")

    def _where(self) -> str:
        parts = urlsplit(self._url)
        return f"{parts.hostname}:{parts.port or (8883 if parts.scheme == 'mqtts' else 1883)}"

    def _wanted(self, event: dict[str, Any]) -> bool:
        return not self._severities or str(event.get("severity")) in self._severities

    def _print(self, line: str) -> None:
        self._out.write(line + "\n")
        self._out.flush()

    def run(self, count: int | None = None, timeout: float | None = None) -> int:
        """Print until ``count`` live events (or ``timeout`` seconds, or Ctrl-C)."""
        parts = urlsplit(self._url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            print(f"ingestd tail: not a broker URL: {self._url}", file=self._err)
            return 2
        client = self._client()
        client.reconnect_delay_set(1, 30)
        try:
            client.connect(
                parts.hostname, parts.port or (8883 if parts.scheme == "mqtts" else 1883)
            )
        except OSError as exc:
            print(f"ingestd tail: cannot connect to {self._where()}: {exc}", file=self._err)
            return EXIT_FAILURE
        client.loop_start()
        try:
            return self._loop(count, timeout)
        except KeyboardInterrupt:
            return EXIT_OK
        finally:
            client.loop_stop()
            client.disconnect()

    def _loop(self, count: int | None, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        picture: dict[str, dict[str, Any]] = {}
        pending: list[dict[str, Any]] = []
        settle_until: float | None = None  # while gathering the retained picture
        shown_picture = False
        printed = 0

        def next_item(wait: float) -> paho.MQTTMessage | _Note | str | None:
            try:
                return self._queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                return None

        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return EXIT_OK if count is None else EXIT_FAILURE
            if settle_until is not None and not shown_picture and now >= settle_until:
                shown_picture = True
                self._show_picture(picture)
                for event in pending:
                    self._print(format_event(event, self._colour))
                    printed += 1
                    if count is not None and printed >= count:
                        return EXIT_OK
                pending.clear()
            waits = [0.2]
            if settle_until is not None and not shown_picture:
                waits.append(settle_until - now)
            item = next_item(min(waits))
            if item is None:
                continue
            if isinstance(item, _Note):
                print(f"ingestd tail: {item.text}", file=self._err)
                if item.fatal:
                    return EXIT_FAILURE
                continue
            if isinstance(item, str):  # subscribed: retained messages follow at once
                if not shown_picture:
                    settle_until = time.monotonic() + self._settle
                continue
            topic = item.topic
            if topic.startswith(ACK_PREFIX) or not item.payload:
                continue
            try:
                event = orjson.loads(item.payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(event, dict):
                continue
            if topic.startswith(STATE_PREFIX):
                if item.retain and not shown_picture:
                    picture[topic] = event
                    if settle_until is not None:  # wait for the rest of the burst
                        settle_until = time.monotonic() + self._settle
                continue  # live state updates repeat the events
            if topic.count("/") != 4 or "kind" not in event or not self._wanted(event):
                continue
            if not shown_picture:
                pending.append(event)
                continue
            self._print(format_event(event, self._colour))
            printed += 1
            if count is not None and printed >= count:
                return EXIT_OK

    def _show_picture(self, picture: dict[str, dict[str, Any]]) -> None:
        alerts = sorted(
            (e for e in picture.values() if self._wanted(e)),
            key=lambda e: float(e.get("started_at") or 0),
        )
        by_state: dict[str, int] = {}
        for event in alerts:
            by_state[str(event.get("state"))] = by_state.get(str(event.get("state")), 0) + 1
        if not alerts:
            self._print("currently firing: none")
        else:
            summary = ", ".join(f"{n} {s}" for s, n in sorted(by_state.items()))
            self._print(f"currently firing: {summary}")
            for event in alerts:
                self._print("  " + format_event(event, self._colour))
        self._print(f"following alerts/# on {self._where()} (Ctrl-C to stop)")


def tail(
    settings: Settings,
    out: TextIO,
    err: TextIO,
    *,
    url: str | None = None,
    severities: Iterable[str] = (),
    count: int | None = None,
    timeout: float | None = None,
) -> int:
    return Tail(settings.mqtt, url, out, err, severities=severities).run(count, timeout)
