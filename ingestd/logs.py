"""Logging: JSON lines for journald and files, a readable console on a terminal.

Every event carries ``component`` (the stage that logged it); get a logger with
``get_logger("spool")``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import structlog

from ingestd.config import LoggingSection

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (a test harness swaps it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure_logging(section: LoggingSection, stream: TextIO | None = None) -> None:
    """Log lines to ``stream`` (default: standard error) as ``section`` says."""
    stream = stream or cast(TextIO, _Stderr())
    fmt = section.format
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[section.level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    """A logger whose every event names its component."""
    # Lazy: the configuration is read at the first log call, not at import.
    return structlog.get_logger(component=component)
