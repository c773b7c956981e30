"""The daemon's HTTP endpoint: ``/healthz``, ``/readyz``, Prometheus ``/metrics``, ``/quotas``,
``/alerts`` (firing alerts) and ``POST /alerts/<id>/ack?by=NAME``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingestd.alerts import AlertStage
from ingestd.config import HttpSection
from ingestd.health import Health
from ingestd.throttle import Throttle

__all__ = ["HttpServer"]


class HttpServer:
    def __init__(
        self,
        section: HttpSection,
        health: Health,
        registry: CollectorRegistry,
        throttle: Throttle | None = None,
        alerts: AlertStage | None = None,
    ) -> None:
        self._section = section
        self._throttle = throttle
        self._alerts = alerts
        self._health = health
        self._registry = registry
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/quotas", self._quotas)
        app.router.add_get("/alerts", self._firing)
        app.router.add_post("/alerts/{id}/ack", self._ack)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._section.host, self._section.port)
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        status = 200 if self._health.healthy else 503
        return web.json_response(self._health.report(), status=status)

    async def _readyz(self, _: web.Request) -> web.Response:
        status = 200 if self._health.ready else 503
        return web.json_response(self._health.report(), status=status)

    async def _quotas(self, request: web.Request) -> web.Response:
        count = int(request.query.get("top", "20"))
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

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
