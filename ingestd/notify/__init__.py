"""Notifications of alert events through Apprise: durable outbox, separate worker pool.

    routes.py    Router / Route: match events to routes; grouping window; quiet hours
    messages.py  title and body from sandboxed Jinja2 templates (a 3 a.m. default)
    outbox.py    Outbox (the interface) and SqliteOutbox (``<spool dir>/notify.sqlite``)
    channels.py  Channel: one Apprise target, called in a worker thread, secrets masked
    worker.py    Notifier: hand-off from the alert stage, dispatch, retries, breakers,
                 fallback, escalation, metrics
    commands.py  ``ingestd notify test ROUTE`` and ``ingestd notify status``

The alert stage hands every event to :meth:`Notifier.submit`, and writes what
:meth:`Notifier.take` returns just before it writes its own state, in the same ordered
step: an entry is durable before the transition that produced it is, so a crash repeats
a notification, never loses one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from ingestd.notify.outbox import Outbox, SqliteOutbox
from ingestd.notify.worker import Notifier
from ingestd.rules import AlertEvent

__all__ = ["Handoff", "Notifier", "Outbox", "SqliteOutbox"]


class Handoff(Protocol):
    """What the alert stage needs of the notifier."""

    def submit(self, events: Sequence[AlertEvent]) -> None: ...

    def take(self) -> Callable[[], bool] | None:
        """What was submitted, as a blocking durable write (False: not written)."""
        ...
