"""The daemon's HTTP endpoint: ``/healthz``, ``/readyz``, Prometheus ``/metrics``, ``/quotas``,
``/alerts`` (firing alerts), ``POST /alerts/<id>/ack?by=NAME``, and ``/latest[/<device>]``
(the latest values, from Redis or memory, never from the TSDB).

With ``http.token_sha256`` set, every endpoint but ``/metrics``, ``/healthz`` and ``/readyz``
(kept open for monitoring) needs ``Authorization: Bearer <token>`` whose SHA-256 is that.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingestd.alerts import AlertView
from ingestd.config import HttpSection
from ingestd.health import Health
from ingestd.latest import Latest, LatestUnavailable
from ingestd.throttle import Throttle

__all__ = ["OPEN_PATHS", "HttpServer", "token_sha256"]

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
"""Readable without the bearer token: what monitoring needs, nothing more."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _dumps(value: object) -> str:
    return orjson.dumps(value).decode()


def token_sha256(token: str) -> str:
    """What ``http.token_sha256`` holds for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class HttpServer:
    def __init__(
        self,
        section: HttpSection,
        health: Health,
        registry: CollectorRegistry,
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
        self._registry = registry
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        middlewares = [self._authorize] if self._section.token_sha256 else []
        app = web.Application(middlewares=middlewares)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/quotas", self._quotas)
        app.router.add_get("/alerts", self._firing)
        app.router.add_post("/alerts/{id}/ack", self._ack)
        app.router.add_get("/latest", self._latest_all)
        app.router.add_get("/latest/{device}", self._latest_device)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._section.host, self._section.port)
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
