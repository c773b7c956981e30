"""The daemon's HTTP endpoint: ``/healthz``, ``/readyz``, Prometheus ``/metrics``, ``/quotas``,
``/alerts`` (firing alerts), ``POST /alerts/<id>/ack?by=NAME``, and ``/latest[/<device>]``
(the latest values, from Redis or memory, never from the TSDB).

With ``http.token_sha256`` set, every endpoint but ``/metrics``, ``/healthz`` and ``/readyz``
(kept open for monitoring) needs ``Authorization: Bearer <token>`` whose SHA-256 is that.

Every connection holds a file descriptor that the spool and the alert state may need
(1,500 idle sockets once took all 1,024 a service gets by default, and the spool's next
cursor write ended the daemon), and aiohttp waits about an hour for a request head that
never ends, checking the token only after it. So the endpoint bounds its connections:

- at most ``http.max_connections`` are open; a new one past that closes the connection
  idle the longest (one with no request in progress: still sending its request head, or
  kept alive between requests), so a health probe always gets in; with none idle (every
  one in a request) the new one is closed at once;
- a request head must be complete within ``http.header_timeout`` of connecting, the next
  one within ``http.idle_timeout`` of the previous response;
- ``/metrics`` is rendered in a thread, one render at a time, shared by the scrapes that
  arrive meanwhile, and spaced out (:class:`_Scrapes`): a scrape of a big registry, or
  many, no longer hold up the readings on the event loop.

``ingestd_http_connections`` and ``ingestd_http_connections_closed_total{reason}`` count them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingestd.alerts import AlertView
from ingestd.config import HttpSection
from ingestd.health import Health
from ingestd.latest import Latest, LatestUnavailable
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.throttle import Throttle

__all__ = ["OPEN_PATHS", "HttpServer", "token_sha256"]

log = get_logger("http")

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
"""Readable without the bearer token: what monitoring needs, nothing more."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CAP_LOG_EVERY = 60.0
"""Seconds between log lines saying the connection cap is being hit (the metric counts all)."""
_ACCEPT_TURNS = 8
"""Connections accepted per turn of the loop: max_connections divided by this. A new
connection's first bytes are read some 3-4 turns after its accept; fewer than
max_connections accepted meanwhile, it cannot be the idlest when one must make room."""
_SCRAPE_SHARE = 0.2
"""At most this share of the time goes to rendering /metrics, however often it is scraped:
after a render, the next waits (1 / share - 1) times as long as that one took."""


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def token_sha256(token: str) -> str:
    """What ``http.token_sha256`` holds for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol for it inside (given every event as it
    comes), the endpoint's rules around it: its place in the count, a deadline for each
    request head."""

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self._inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.requests = 0
        """Requests in progress (aiohttp serves a connection's requests one at a time)."""
        self._deadline: asyncio.TimerHandle | None = None

    # --- the transport's events, passed on -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self._pool.admit(self):
            transport.abort()
            return
        self._inner = self._pool.handler()
        self._inner.connection_made(transport)
        self._arm(self._pool.header_timeout, "header_timeout")

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._pool.forget(self)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # --- requests (from the middleware) --------------------------------------------------

    def request_started(self) -> None:
        self.requests += 1
        self._disarm()
        self._pool.touch(self)

    def request_ended(self) -> None:
        self.requests -= 1
        if not self.requests:
            self._pool.touch(self)
            self._arm(self._pool.idle_timeout, "idle")

    # --- closing ---------------------------------------------------------------------------

    def close_for(self, reason: str | None) -> None:
        """Close now (abort: a buffered response to a client that does not read would
        otherwise hold the socket), counted by ``reason`` (None: shutdown, not counted)."""
        self._disarm()
        self._pool.forget(self)
        if self.transport is not None and not self.transport.is_closing():
            if reason is not None:
                self._pool.closed(reason)
            self.transport.abort()

    def _arm(self, delay: float, reason: str) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(delay, self.close_for, reason)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class _Pool:
    """The open connections, the least recently active first."""

    def __init__(
        self, section: HttpSection, metrics: Metrics, handler: Callable[[], asyncio.Protocol]
    ) -> None:
        self.handler = handler
        """aiohttp's protocol factory (its low-level server)."""
        self.header_timeout = section.header_timeout
        self.idle_timeout = section.idle_timeout
        self._max = section.max_connections
        self._metrics = metrics
        self._open: dict[_Connection, None] = {}  # insertion order: least recently active first
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}
        self._cap_logged = -math.inf
        self._cap_hits = 0

    def protocol(self) -> _Connection:
        return _Connection(self)

    def of(self, transport: asyncio.BaseTransport | None) -> _Connection | None:
        return self._by_transport.get(transport) if transport is not None else None

    def admit(self, connection: _Connection) -> bool:
        """Whether ``connection`` may stay; past the cap the idlest one makes room for it."""
        if len(self._open) >= self._max:
            idle = next((c for c in self._open if not c.requests), None)
            self._cap_hit()
            if idle is None:
                self.closed("refused")
                return False
            idle.close_for("evicted")
        assert connection.transport is not None
        self._open[connection] = None
        self._by_transport[connection.transport] = connection
        self._metrics.http_connections.set(len(self._open))
        return True

    def touch(self, connection: _Connection) -> None:
        if connection in self._open:
            del self._open[connection]
            self._open[connection] = None  # to the end: the most recently active

    def forget(self, connection: _Connection) -> None:
        if connection in self._open:
            del self._open[connection]
            if connection.transport is not None:
                self._by_transport.pop(connection.transport, None)
            self._metrics.http_connections.set(len(self._open))

    def closed(self, reason: str) -> None:
        self._metrics.http_closed.labels(reason).inc()

    def _cap_hit(self) -> None:
        self._cap_hits += 1
        now = time.monotonic()
        if now - self._cap_logged >= _CAP_LOG_EVERY:
            log.warning(
                "HTTP connections at http.max_connections: the idlest are closed for new"
                " ones (a flood of connections, or raise the limit for more monitoring)",
                max_connections=self._max,
                times=self._cap_hits,
            )
            self._cap_logged, self._cap_hits = now, 0

    def close_all(self) -> None:
        for connection in list(self._open):
            connection.close_for(None)


class _Scrapes:
    """``/metrics`` bodies, rendered off the event loop: in a thread of their own, one
    render at a time. Scrapes that arrive during a render get its body; a scrape after it
    waits, if need be, until renders have taken at most :data:`_SCRAPE_SHARE` of the time,
    then gets a new one (no body finished before a scrape arrived is ever served: whoever
    reads a value after an event sees the event). However many scrape and however often,
    rendering neither holds the loop nor keeps the interpreter busy. (A render in a thread
    is safe beside the GC callback, which takes no lock a render holds: ingestd/loopwatch.py.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._render: asyncio.Future[tuple[bytes, float]] | None = None
        self._next_at = -math.inf

    async def body(self) -> bytes:
        loop = asyncio.get_running_loop()
        pause = self._next_at - loop.time()
        if self._render is None and pause > 0:
            await asyncio.sleep(pause)  # scrapes pausing together share the next render
        if self._render is None:
            self._render = loop.run_in_executor(self._thread, self._generate)
            self._render.add_done_callback(self._rendered)
        body, _ = await asyncio.shield(self._render)
        return body

    def _generate(self) -> tuple[bytes, float]:
        started = time.perf_counter()
        body = generate_latest(self._registry)
        return body, time.perf_counter() - started

    def _rendered(self, render: asyncio.Future[tuple[bytes, float]]) -> None:
        self._render = None
        took = 0.0
        if not render.cancelled() and render.exception() is None:
            _, took = render.result()
        self._next_at = asyncio.get_running_loop().time() + took * (1 / _SCRAPE_SHARE - 1)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


class HttpServer:
    def __init__(
        self,
        section: HttpSection,
        health: Health,
        metrics: Metrics,
        throttle: Throttle | None = None,
        alerts: AlertView | None = None,
        *,
        latest: Latest | None = None,
    ) -> None:
        self._section = section
        self._throttle = throttle
        self._alerts = alerts
        self._latest = latest
        self._health = health
        self._metrics = metrics
        self._scrapes = _Scrapes(metrics.registry)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._pool: _Pool | None = None

    def app(self) -> web.Application:
        middlewares: list[Middleware] = [self._in_progress]
        if self._section.token_sha256:
            middlewares.append(self._authorize)
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_body)
        app.router.add_get("/quotas", self._quotas)
        app.router.add_get("/alerts", self._firing)
        app.router.add_post("/alerts/{id}/ack", self._ack)
        app.router.add_get("/latest", self._latest_all)
        app.router.add_get("/latest/{device}", self._latest_device)
        return app

    async def start(self) -> None:
        section = self._section
        self._runner = web.AppRunner(
            self.app(),
            access_log=None,
            handle_signals=False,
            # aiohttp's own idle close, a backstop behind the connections' deadlines (which
            # come first, and are counted)
            keepalive_timeout=2 * max(section.idle_timeout, section.header_timeout),
        )
        await self._runner.setup()
        handler = self._runner.server  # aiohttp's protocol factory, made by setup()
        assert handler is not None
        self._pool = _Pool(section, self._metrics, handler)
        # Our own listener (aiohttp's sites take no protocol of ours): each connection is a
        # _Connection holding aiohttp's protocol. The backlog is also how many connections
        # asyncio accepts per turn of the loop; a new one's first bytes are read a few turns
        # after its accept, so with more than max_connections accepted in those turns a
        # flood would close (as the idlest) a health probe that had not been read yet.
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._pool.protocol,
            section.host,
            section.port,
            backlog=max(1, section.max_connections // _ACCEPT_TURNS),
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()  # requests in progress finish, the rest close
            self._runner = None
        if self._pool is not None:
            self._pool.close_all()  # what aiohttp never saw a request on
        self._scrapes.close()

    @web.middleware
    async def _in_progress(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """A request head is complete: the connection is in a request (not idle, no
        deadline) until its handler returns; then idle, with ``http.idle_timeout``."""
        connection = self._pool.of(request.transport) if self._pool is not None else None
        if connection is None:
            return await handler(request)
        connection.request_started()
        try:
            return await handler(request)
        finally:
            connection.request_ended()

    @web.middleware
    async def _authorize(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        expected = self._section.token_sha256 or ""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        # Compare digests of equal length in constant time: nothing to learn from timing.
        if (
            scheme.lower() == "bearer"
            and token
            and hmac.compare_digest(token_sha256(token), expected)
        ):
            return await handler(request)
        return web.json_response(
            {
                "error": "this endpoint needs a bearer token: send the header"
                " 'Authorization: Bearer <token>' (ingestd commands: --token-file FILE or"
                " $INGESTD_HTTP_TOKEN); `ingestd http token` makes a token and its"
                " http.token_sha256. /metrics, /healthz and /readyz need none."
            },
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="ingestd"'},
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        status = 200 if self._health.healthy else 503
        return web.json_response(self._health.report(), status=status)

    async def _readyz(self, _: web.Request) -> web.Response:
        status = 200 if self._health.ready else 503
        return web.json_response(self._health.report(), status=status)

    async def _quotas(self, request: web.Request) -> web.Response:
        try:
            count = max(0, min(10_000, int(request.query.get("top", "20"))))
        except ValueError:
            return web.json_response({"error": "top must be a whole number"}, status=400)
        top = self._throttle.top(count) if self._throttle else []
        return web.json_response({"throttled": top})

    async def _firing(self, _: web.Request) -> web.Response:
        return web.json_response({"firing": self._alerts.firing() if self._alerts else []})

    async def _ack(self, request: web.Request) -> web.Response:
        if self._alerts is None:
            return web.json_response({"error": "no alert rules"}, status=404)
        alert_id = request.match_info["id"]
        event = self._alerts.acknowledge(alert_id, request.query.get("by", "http"))
        if event is None:
            return web.json_response(
                {"error": f"no firing alert {alert_id} (see GET /alerts)"}, status=404
            )
        return web.json_response(event)

    async def _latest_all(self, _: web.Request) -> web.Response:
        return await self._read_latest(None)

    async def _latest_device(self, request: web.Request) -> web.Response:
        return await self._read_latest(request.match_info["device"])

    async def _read_latest(self, device: str | None) -> web.Response:
        if self._latest is None:
            return web.json_response(
                {"error": "latest values are off (latest.enabled: false)"}, status=404
            )
        try:
            values = await self._latest.read(device)
        except LatestUnavailable as exc:
            return web.json_response(
                {"error": f"latest values unavailable: {exc}; ingestion goes on"}, status=503
            )
        if device is None:
            return web.json_response({"devices": values}, dumps=_dumps)
        if device not in values:
            return web.json_response(
                {
                    "error": f"no latest values for device {device!r}: unknown, or silent"
                    " longer than latest.ttl (see GET /latest for the devices known)"
                },
                status=404,
            )
        return web.json_response({"device": device, "values": values[device]}, dumps=_dumps)

    async def _metrics_body(self, _: web.Request) -> web.Response:
        body = await self._scrapes.body()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
