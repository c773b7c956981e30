"""How late the event loop runs, and how long the garbage collector holds it.

Every reading, ack and alert event goes through the one event loop: a callback that holds it
delays all of them. ``ingestd_loop_lag_seconds`` is how late a timer that should have woken
every ``interval`` woke (the time something else held the loop); ``ingestd_gc_pause_seconds``
is each cyclic-GC collection by generation, the part of that lag the collector caused.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from ingestd.metrics import Metrics

__all__ = ["LoopWatch"]


class LoopWatch:
    def __init__(self, metrics: Metrics, interval: float = 0.05) -> None:
        self._metrics = metrics
        self._interval = interval
        self._gc_started: float | None = None
        # Made here: labels() takes the metric's lock, which a scrape holds while it copies
        # a dict - a copy that can start a collection, whose callback would wait forever.
        self._gc_pause = {g: metrics.gc_pause.labels(str(g)) for g in range(3)}

    async def run(self) -> None:
        """Sample the loop's lag until cancelled; time GC collections meanwhile."""
        gc.callbacks.append(self._on_gc)
        try:
            loop = asyncio.get_running_loop()
            while True:
                due = loop.time() + self._interval
                await asyncio.sleep(self._interval)
                self._metrics.loop_lag.observe(max(0.0, loop.time() - due))
        finally:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            pause = time.perf_counter() - self._gc_started
            self._gc_started = None
            child = self._gc_pause.get(info.get("generation", -1))
            if child is not None:
                child.observe(pause)
