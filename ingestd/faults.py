"""Internal errors on the message path: a bug of ours, never the sender's fault.

Each one gets an error id, written in its log line (with the traceback) and in the detail of
the dead letter the message becomes, so an operator can match the two and report them. One
now and then costs one message; several within ``window`` seconds say something is broken:
``/healthz`` is degraded (component ``intake``) until ``quiet`` seconds pass without one.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable

from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics

__all__ = ["InternalErrors"]

log = get_logger("intake")

COMPONENT = "intake"
"""The /healthz component internal errors degrade."""


class InternalErrors:
    """Counts, logs and remembers internal errors; degrades health when they repeat."""

    def __init__(
        self,
        metrics: Metrics,
        health: Health,
        *,
        threshold: int = 3,
        window: float = 60.0,
        quiet: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._health = health
        self.threshold = threshold
        self.window = window
        self.quiet = quiet
        self._clock = clock
        self._recent: deque[float] = deque()
        self._last = 0.0
        self._degraded = False
        health.ok(COMPONENT)

    def record(self, stage: str, exc: BaseException, what: str, **context: object) -> str:
        """Log ``exc`` (with its traceback) and count it; returns its error id.

        ``what`` says what became of the message, for the operator reading the log."""
        error_id = secrets.token_hex(6)
        self._metrics.internal_errors.labels(stage).inc()
        log.error(
            f"internal error ({stage}): {what}; please report it with the error id",
            error_id=error_id,
            stage=stage,
            error=f"{type(exc).__name__}: {exc}",
            exc_info=exc,
            **context,
        )
        now = self._clock()
        self._last = now
        recent = self._recent
        recent.append(now)
        while recent and recent[0] <= now - self.window:
            recent.popleft()
        if len(recent) >= self.threshold:
            self._degraded = True
            self._health.problem(
                COMPONENT,
                f"{len(recent)} internal errors within {self.window:g}s (the last: error"
                f" {error_id} in {stage}); the messages hit are dead letters with reason"
                " internal_error: see the log lines with these error ids and report them",
            )
        return error_id

    def sweep(self) -> None:
        """Healthy again after ``quiet`` seconds without an internal error."""
        if self._degraded and self._clock() - self._last >= self.quiet:
            self._degraded = False
            self._recent.clear()
            self._health.ok(COMPONENT)
            log.info("no internal error for a while: intake healthy again", quiet_s=self.quiet)
