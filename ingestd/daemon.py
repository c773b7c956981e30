"""The daemon's lifecycle: start the stages, run until SIGTERM, shut down in order."""

from __future__ import annotations

import asyncio
import signal

from prometheus_client import CollectorRegistry

from ingestd.config import Settings
from ingestd.health import Health
from ingestd.http import HttpServer
from ingestd.logs import get_logger

__all__ = ["Daemon"]

log = get_logger("daemon")


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health = Health()
        self.registry = CollectorRegistry()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> int:
        """Startup, main loop, shutdown; returns the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        http = HttpServer(self.settings.http, self.health, self.registry)
        try:
            await http.start()
            log.info("listening", http=self.settings.http.listen)
            self.health.ready = True
            await self._stop.wait()
            self.health.ready = False
            log.info("stopping")
        finally:
            await http.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("stopped")
        return 0

    def _on_signal(self, signum: int) -> None:
        log.info("signal received", signal=signal.Signals(signum).name)
        self.stop()
