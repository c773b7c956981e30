"""The one record type that flows through the pipeline, and the one way to refuse input."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FieldValue", "Reading", "Reject"]

FieldValue = float | bool | str


@dataclass(slots=True)
class Reading:
    """One point: a device's values of one measurement at one instant.

    ``device`` comes from the topic, never from the payload; ``tags`` hold the other
    topic levels (site, node, ...) and never contain ``device``. ``time_ns`` is the
    device's own timestamp when it sent one (``device_time``), else the time of first
    receipt, so a replayed reading overwrites itself in the TSDB instead of duplicating.
    A retained message replayed by the broker is a reading only when ``device_time``: the
    receipt time of a replay would date an old value now.
    """

    measurement: str
    device: str
    tags: dict[str, str]
    fields: dict[str, FieldValue]
    time_ns: int
    device_time: bool = False


class Reject(Exception):
    """Input that cannot become a reading; ``reason`` is a short stable label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
