"""The MQTT source: paho-mqtt 2.x driven by the asyncio loop, with manual acknowledgement.

paho does the protocol; this adapter owns its socket on the event loop (``add_reader``:
measured fastest, no paho thread), reads every buffered packet per wake-up, and
acknowledges a message only when the pipeline says what it became is durable. aiomqtt
2.x would ack on arrival, which breaks "no acknowledged reading is ever lost".

A connection *generation* tags each message: an ack for a message of an earlier
connection is never sent on a later one (the broker redelivers that message instead).

Retained messages: the broker sets the retain flag only on a message it sends because a
subscription was made (its retained store, replayed); a retained message published while we
are subscribed, or queued for our session while we were away, arrives with the flag clear
(MQTT 3.1.1 3.3.1.3; MQTT 5 with Retain As Published off, as here). So the flag we pass on
means "an old value, replayed", never "a new reading". With MQTT 5 the subscription asks for
fewer replays: Retain Handling 1 (only when the subscription is new, not at each reconnect
of our persistent session) for ``mqtt.retained: once``, 2 (never) for ``ignore`` and for
commands (alert acknowledgements). MQTT 3.1.1 has no such option: each reconnect replays.

The broker's session is where readings wait while ingestd is away, already acknowledged to
their devices; losing it loses them. So the source remembers its session
(``mqtt_session.json`` in the state dir: who it was, the expiry it asked for, when it was
last connected) and says loudly - error log, ``/healthz`` component ``mqtt_session``,
``ingestd_mqtt_session_lost_total{cause}`` - when another client takes the session over
(MQTT 5 reason 0x8E) or a reconnect finds it gone before its expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ingestd.config import MqttSection
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics

__all__ = ["SESSION_ALARM_HOLD", "Ack", "MqttSource", "OnMessage", "SessionRecord"]

log = get_logger("mqtt")

Ack = tuple[int, int, int]
"""(connection generation, message id, QoS) - what ``MqttSource.ack`` needs."""
OnMessage = Callable[[str, bytes, bool, bool, Ack], None]
"""Called on the event loop for each message: (topic, payload, redelivered, retained, ack);
``retained``: the broker replayed it from its retained store (see the module's docstring)."""

_READS_PER_WAKEUP = 4096
_READ_BUDGET = 0.01
"""Seconds of reading per wakeup at most. Each message is decoded, checked and spooled in its
read (~0.15 ms); 4,096 in one go held the loop 0.6 s under a backlog, and the TSDB writes,
commits and alert timers waited: stored throughput fell to a quarter (bench at 10k msg/s)."""


SESSION_ALARM_HOLD = 3600.0
"""Seconds ``/healthz`` keeps saying degraded (``mqtt_session``) after a lost session: the
loss is over in an instant, and an operator looks later (the metric keeps the count)."""
_SEEN_EVERY = 60.0
"""Seconds between updates of the session record while connected: a kill -9 makes ingestd
believe it left up to this much earlier than it did, never later (so never a false alarm)."""
_TAKEN_OVER = 0x8E
"""MQTT 5 DISCONNECT reason "Session taken over" (Mosquitto sends it from 2.0.15 on; 2.0.11
only closes the socket, and the reconnect then finds the session gone)."""


class BrokerRefused(ConnectionError):
    """The broker answered CONNECT with a failure reason code (credentials, ACL, ...)."""


class SessionRecord:
    """What ingestd knows of its broker session across restarts, in one small JSON file.

    A session is ingestd's when the broker, client id, username and protocol are the ones it
    last connected with; MQTT 5 sessions end ``expiry`` seconds after the last connection
    (ingestd asks for ``mqtt.session_expiry``); MQTT 3.1.1 sessions have no expiry ingestd
    knows of (Mosquitto: ``persistent_client_expiration``, off by default).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._written = 0.0
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            data = None
        except OSError as exc:
            log.warning("cannot read the session record", file=str(path), error=str(exc))
            data = None
        self._data: dict[str, Any] | None = data if isinstance(data, dict) else None

    def expectation(self, identity: dict[str, Any], now: float) -> tuple[str, float | None]:
        """``("present" | "expired" | "unknown", seconds since last connected)``:
        whether the broker should still hold the session ``identity`` names."""
        data = self._data
        if data is None or data.get("identity") != identity:
            return "unknown", None  # never connected as this: no session to expect
        try:
            seen = float(data["seen_at"])
            expiry = None if data.get("expiry") is None else float(data["expiry"])
        except (KeyError, TypeError, ValueError):
            return "unknown", None
        away = max(0.0, now - seen)
        if expiry is None:
            return "present", away
        if expiry <= 0:
            return "unknown", away  # a session that ends with its connection
        return ("present" if away < expiry else "expired"), away

    def seen(self, identity: dict[str, Any], expiry: float | None, now: float) -> None:
        """Connected as ``identity`` at ``now``: the broker keeps the session from here."""
        self._data = {"identity": identity, "expiry": expiry, "seen_at": now}
        self._written = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self._data))
            tmp.replace(self.path)
        except OSError as exc:  # only costs the detection of a lost session: go on
            log.error("cannot save the session record", file=str(self.path), error=str(exc))

    def due(self) -> bool:
        return time.monotonic() - self._written >= _SEEN_EVERY


class MqttSource:
    def __init__(
        self,
        section: MqttSection,
        on_message: OnMessage,
        metrics: Metrics,
        health: Health,
        state_dir: Path,
        *,
        extra_filters: Sequence[str] = (),
    ) -> None:
        self._section = section
        self._extra_filters = list(extra_filters)
        self._on_message = on_message
        self._metrics = metrics
        self._health = health
        self._state_file = state_dir / "subscriptions.json"
        self._session = SessionRecord(state_dir / "mqtt_session.json")
        self._session_trouble = False
        """This connection lost the session: pause before the next, so that ingestd and
        the client holding its id do not throw each other out once a second (cleared once
        the connection has lasted a while: then it was no such fight)."""
        self._connected_at = 0.0
        self._taken_over_at: float | None = None
        self._alarm: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._client: paho.Client | None = None
        self._sock: socket.socket | None = None
        self._generation = 0
        self._received = 0
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._closing = False
        self._reading = True
        self._sub_mids: set[int] = set()
        self._refusal: str | None = None

    @property
    def filters(self) -> list[str]:
        share = self._section.share_group
        readings = [
            f"$share/{share}/{s.filter}" if share else s.filter for s in self._section.subscriptions
        ]
        return readings + self._extra_filters

    async def wait_subscribed(self) -> None:
        await self._subscribed.wait()

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, and reconnect with capped exponential backoff and jitter, forever."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        delay = self._section.reconnect_min
        first = True
        while not self._closing:
            try:
                await self._connect()
                await self._wait_connack()
            except BrokerRefused as exc:
                # Already logged (with the reason) by _on_connect; keep that as the health.
                self._drop_socket()
                self._health.problem("mqtt", f"broker refused the connection: {exc}")
                log.info(
                    "will retry the connection", broker=self._where(), retry_in=round(delay, 2)
                )
            except (OSError, ConnectionError, ssl.SSLError, TimeoutError) as exc:
                self._drop_socket()
                self._health.problem("mqtt", f"cannot connect to {self._where()}: {exc}")
                log.warning(
                    "broker unreachable",
                    broker=self._where(),
                    error=str(exc),
                    retry_in=round(delay, 2),
                )
            else:
                if not first:
                    self._metrics.reconnects.inc()
                first = False
                delay = self._section.reconnect_min
                misc = asyncio.create_task(self._misc_loop())
                try:
                    await self._disconnected.wait()
                finally:
                    misc.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await misc
                if self._closing:
                    return
            if self._session_trouble:
                self._session_trouble = False
                pause = self._section.reconnect_max
                log.warning(
                    "pausing before reconnecting: the session was lost on this connection,"
                    " and reconnecting at once would take it back from the other client"
                    " (which, if it reconnects too, throws ingestd out again)",
                    broker=self._where(),
                    retry_in=round(pause, 2),
                )
                await asyncio.sleep(random.uniform(pause / 2, pause))
                continue
            await asyncio.sleep(random.uniform(0, delay))  # full jitter
            delay = min(delay * 2, self._section.reconnect_max)

    async def _wait_connack(self) -> None:
        connected = asyncio.ensure_future(self._connected.wait())
        disconnected = asyncio.ensure_future(self._disconnected.wait())
        try:
            await asyncio.wait(
                {connected, disconnected},
                timeout=max(10.0, self._section.keepalive),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            connected.cancel()
            disconnected.cancel()
        if not self._connected.is_set():
            if self._refusal is not None:
                raise BrokerRefused(self._refusal)
            raise ConnectionError("no CONNACK from the broker")

    def pause(self) -> None:
        """Stop reading new messages; acks still go out. Unacked, the broker holds the rest."""
        if self._reading:
            self._reading = False
            if self._loop is not None and self._sock is not None:
                self._loop.remove_reader(self._sock)

    def resume(self) -> None:
        if not self._reading:
            self._reading = True
            if self._loop is not None and self._sock is not None:
                self._loop.add_reader(self._sock, self._readable)
                self._loop.call_soon(self._readable)  # TLS may hold what the socket won't signal

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """Publish at QoS 1 on the live connection; False when there is none (not queued)."""
        client = self._client
        if client is None or self._sock is None or not self._connected.is_set():
            return False
        info = client.publish(topic, payload, qos=1, retain=retain)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    async def close(self) -> None:
        """Disconnect cleanly; the broker keeps our session and queues for us."""
        self._closing = True
        if self._alarm is not None:
            self._alarm.cancel()
        client = self._client
        if client is not None and self._sock is not None:
            if self._connected.is_set():
                self._session.seen(self._identity(), self._expiry(), time.time())
            client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._disconnected.wait(), 2)
        self._drop_socket()

    def _where(self) -> str:
        return f"{self._section.host}:{self._section.port}"

    def _new_client(self) -> paho.Client:
        section = self._section
        v5 = section.protocol == "5"
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=section.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        username, password = section.credentials()
        if username is not None:
            client.username_pw_set(username, password)
        if section.tls:
            client.tls_set(
                ca_certs=str(section.ca_file) if section.ca_file else None,
                certfile=str(section.cert_file) if section.cert_file else None,
                keyfile=str(section.key_file) if section.key_file else None,
            )
        # A callback that raises must not make paho replay the packet forever.
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_paho_message
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    async def _connect(self) -> None:
        assert self._loop is not None
        self._connected.clear()
        self._disconnected.clear()
        self._refusal = None
        # One paho client for the daemon's life: what it has queued (alert events at QoS 1
        # not yet confirmed by the broker) is re-sent after a reconnect, not dropped.
        if self._client is None:
            self._client = self._new_client()
        client = self._client
        self._generation += 1
        self._reading = True  # a new connection must read its CONNACK, even if we paused
        properties = None
        kwargs: dict[str, Any] = {}
        if self._section.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = int(self._section.session_expiry)
            # Enough in flight that acks held until a group commit never throttle intake.
            properties.ReceiveMaximum = self._section.receive_maximum
            kwargs = {"clean_start": False, "properties": properties}
        # connect() resolves and opens the TCP connection synchronously: keep it off the loop.
        await self._loop.run_in_executor(
            None,
            lambda: client.connect(
                self._section.host, self._section.port, int(self._section.keepalive), **kwargs
            ),
        )

    async def _misc_loop(self) -> None:
        """paho's keepalive pings and timeouts; the session record kept current."""
        while True:
            await asyncio.sleep(1)
            if self._client is not None:
                self._client.loop_misc()
            if self._connected.is_set() and self._session.due():
                self._session.seen(self._identity(), self._expiry(), time.time())
                if time.monotonic() - self._connected_at >= _SEEN_EVERY:
                    self._session_trouble = False

    # --- the broker session ---------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {
            "broker": self._where(),
            "client_id": self._section.client_id,
            "username": self._section.credentials()[0],
            "protocol": self._section.protocol,
        }

    def _expiry(self) -> float | None:
        return float(self._section.session_expiry) if self._section.protocol == "5" else None

    def _check_session(self, present: bool) -> None:
        """After a CONNACK: was the session there if it should have been?"""
        now = time.time()
        identity = self._identity()
        expected, away = self._session.expectation(identity, now)
        self._session.seen(identity, self._expiry(), now)
        if present or expected == "unknown" or away is None:
            return
        if expected == "expired":
            self._metrics.session_lost.labels("expired").inc()
            log.warning(
                "the broker no longer had ingestd's session: ingestd was away longer than"
                " its session expiry, so the readings the broker had queued for it are gone;"
                " raise mqtt.session_expiry above the longest time ingestd may be stopped",
                client_id=self._section.client_id,
                away_s=round(away),
                session_expiry_s=self._expiry(),
            )
            return
        taken = self._taken_over_at
        after = "" if taken is None else " (the session was taken over before this)"
        self._lost(
            "not_present",
            f"the broker had no session for client id {self._section.client_id} when ingestd"
            f" reconnected after {round(away)} s{after}",
            "the broker had no session for ingestd, although it should have kept it: the"
            " readings it had queued for ingestd and those in flight are lost, every one of"
            " them already acknowledged to its device. Likely causes: another client"
            " connected with ingestd's client id and a clean start (look for 'already"
            " connected, closing old connection' with this client id in the broker's log),"
            " or the broker lost its state (restarted without persistence). On Mosquitto,"
            " give ingestd a broker account of its own and set use_username_as_clientid"
            " (mosquitto/README.md)",
            away_s=round(away),
        )

    def _lost(self, cause: str, detail: str, message: str, **fields: Any) -> None:
        """Say loudly that the session, and what it held, is gone."""
        self._metrics.session_lost.labels(cause).inc()
        self._session_trouble = True
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._health.problem(
            "mqtt_session", f"session lost at {at} ({cause}): {detail}; see the log"
        )
        log.error(
            message,
            cause=cause,
            broker=self._where(),
            client_id=self._section.client_id,
            username=self._section.credentials()[0],
            **fields,
        )
        if self._alarm is not None:
            self._alarm.cancel()
        if self._loop is not None:
            self._alarm = self._loop.call_later(SESSION_ALARM_HOLD, self._alarm_over, at)

    def _alarm_over(self, at: str) -> None:
        self._alarm = None
        self._health.ok("mqtt_session", f"last lost at {at}")

    # --- paho callbacks (event loop thread unless noted) --------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            self._health.problem("mqtt", f"broker refused the connection: {reason}")
            log.error("broker refused the connection", broker=self._where(), reason=str(reason))
            client.disconnect()
            return
        self._metrics.connected.set(1)
        self._health.ok("mqtt", f"connected to {self._where()}")
        log.info("connected", broker=self._where(), session_present=flags.session_present)
        self._connected_at = time.monotonic()
        self._check_session(bool(flags.session_present))
        self._taken_over_at = None
        self._reconcile_subscriptions(client)
        self._connected.set()

    def _reconcile_subscriptions(self, client: paho.Client) -> None:
        """Subscribe to the configured filters; drop those an earlier config had."""
        wanted = self.filters
        previous = self._load_previous_filters()
        stale = [f for f in previous if f not in wanted]
        if stale:
            client.unsubscribe(stale)
            log.info("unsubscribed topics no longer configured", filters=stale)
        self._subscribed.clear()
        result, mid = client.subscribe(self._subscription_options(wanted))
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._sub_mids.add(mid)
        self._save_filters(wanted)

    def _subscription_options(self, filters: Sequence[str]) -> list[tuple[str, Any]]:
        """QoS 1; for MQTT 5 also how many retained messages the broker replays."""
        if self._section.protocol != "5":
            return [(f, 1) for f in filters]
        readings = 2 if self._section.retained == "ignore" else 1
        # Retain As Published off: a live retained publish reaches us with the flag clear.
        return [
            (
                f,
                SubscribeOptions(
                    qos=1,
                    retainAsPublished=False,
                    retainHandling=2 if f in self._extra_filters else readings,
                ),
            )
            for f in filters
        ]

    def _load_previous_filters(self) -> list[str]:
        try:
            value = json.loads(self._state_file.read_text())
        except (FileNotFoundError, ValueError):
            return []
        return [str(v) for v in value] if isinstance(value, list) else []

    def _save_filters(self, filters: Sequence[str]) -> None:
        tmp = self._state_file.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(list(filters)))
            tmp.replace(self._state_file)
        except OSError as exc:  # only costs a stale unsubscribe later: go on
            log.error(
                "cannot save the subscribed topics", file=str(self._state_file), error=str(exc)
            )

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if mid not in self._sub_mids:
            return
        self._sub_mids.discard(mid)
        refused = [f for f, r in zip(self.filters, reasons, strict=False) if r.is_failure]
        if refused:
            self._health.problem("mqtt", f"broker refused subscriptions: {', '.join(refused)}")
            log.error("subscription refused (check the broker ACL)", filters=refused)
        else:
            log.info("subscribed", filters=self.filters)
        self._subscribed.set()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: Any,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._metrics.connected.set(0)
        self._subscribed.clear()
        if self._connected.is_set():
            self._session.seen(self._identity(), self._expiry(), time.time())
        if not self._closing and self._refusal is None:
            self._health.problem("mqtt", f"disconnected from {self._where()}: {reason}")
            if self._section.protocol == "5" and reason.value == _TAKEN_OVER:
                self._taken_over_at = time.time()
                self._lost(
                    "taken_over",
                    f"another client connected with client id {self._section.client_id}",
                    "another client connected to the broker with ingestd's client id, and"
                    " the broker handed it ingestd's session (reason: session taken over)."
                    " With a clean start it discarded the readings queued for ingestd, and"
                    " they are lost; without, it receives them instead of ingestd. Find it"
                    " in the broker's log (the client id, 'already connected'); on Mosquitto,"
                    " give ingestd a broker account of its own and set"
                    " use_username_as_clientid (mosquitto/README.md)",
                    retry_in=round(self._section.reconnect_max, 2),
                )
            else:
                log.warning("disconnected", broker=self._where(), reason=str(reason))
        self._disconnected.set()

    def _on_paho_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        self._received += 1
        try:
            self._on_message(
                msg.topic,
                bytes(msg.payload),
                msg.dup,
                msg.retain,
                (self._generation, msg.mid, msg.qos),
            )
        except Exception:
            # paho would re-raise and then replay this packet forever, stopping all intake.
            # The pipeline turns its own errors into dead letters: reaching here means even
            # that failed. The message stays unacknowledged until the next reconnect.
            log.exception(
                "internal error handling a message, left unacknowledged; please report",
                topic=msg.topic,
            )

    # --- acknowledgement ----------------------------------------------------------------

    def ack(self, acks: Sequence[Ack]) -> int:
        """Send PUBACKs, in order; returns how many went to the current connection. One
        that cannot be sent is raised after the others went out."""
        client = self._client
        if client is None:
            return 0
        generation = self._generation
        sent = 0
        failed: Exception | None = None
        for gen, mid, qos in acks:
            if gen == generation and qos:
                # One failing must not hold back the acks after it (each is an in-flight
                # slot of the broker's): send the rest, then raise the first failure.
                try:
                    client.ack(mid, qos)
                except Exception as exc:
                    failed = failed or exc
                    continue
                sent += 1
        if failed is not None:
            raise failed
        return sent

    # --- socket plumbing: paho's socket on our event loop ------------------------------

    def _call_in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:  # connect() runs in an executor thread
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._add_socket, sock)

    def _add_socket(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._sock = sock
        if self._reading:
            self._loop.add_reader(sock, self._readable)

    def _on_socket_close(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._remove_socket, sock)

    def _remove_socket(self, sock: socket.socket) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        if self._sock is sock:
            self._sock = None
            if not self._disconnected.is_set():
                self._disconnected.set()

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._remove_socket(self._sock)

    def _on_register_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._add_writer, sock)

    def _add_writer(self, sock: socket.socket) -> None:
        assert self._loop is not None
        if self._client is not None:
            self._loop.add_writer(sock, self._client.loop_write)

    def _on_unregister_write(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._call_in_loop(self._remove_writer, sock)

    def _remove_writer(self, sock: socket.socket) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _readable(self) -> None:
        """Read the complete packets the socket holds (one paho read is one packet), for
        ``_READ_BUDGET`` at most: what is left signals the loop again after its other work."""
        client = self._client
        if client is None or not self._reading:  # a call_soon that came after pause()
            return
        # One loop_read is one packet, or more while our own QoS 1 publishes (alert events)
        # await their PUBACKs (paho reads as many as are in flight): the budget is checked
        # between calls, so a storm of alert events can overrun it by that many packets.
        deadline = time.monotonic() + _READ_BUDGET
        for _ in range(_READS_PER_WAKEUP):
            before = self._received
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._reading:
                return
            if self._received == before or time.monotonic() >= deadline:
                break
        # TLS may hold decrypted packets the socket no longer signals: read them now.
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending() and self._loop is not None:
            self._loop.call_soon(self._readable)
