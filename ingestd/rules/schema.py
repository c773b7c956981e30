"""The shape of a rule file, as pydantic models: what keys exist and what type each value has.

Only structure and types live here (``extra="forbid"`` rejects unknown keys); the rules that
relate keys to each other (one condition per level, a clear condition on the right side of
its threshold, ...) are checked by ``loader.py``, which knows where each key was written.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ingestd.config import Duration, parse_duration

__all__ = [
    "ClearSpec",
    "Duration",
    "FlappingSpec",
    "LevelSpec",
    "RateSpec",
    "RuleFileSpec",
    "RuleSpec",
    "SelectSpec",
    "parse_duration",
]


class Spec(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, coerce_numbers_to_str=True
    )


class SelectSpec(Spec):
    """Which readings a rule looks at; every value is a glob (see ``glob.py``)."""

    measurement: str = "*"
    field: str | None = None
    """The field(s) tested; required for condition rules, ``*`` by default for deadman."""
    device: str = "*"
    site: str = "*"
    tags: dict[str, str] = {}


class RateSpec(Spec):
    """Change per minute over ``window``: (newest - oldest in window) / minutes between them."""

    above: float | None = None
    below: float | None = None
    window: Duration


class ClearSpec(Spec):
    """When a latched level clears; the opposite side of its condition (hysteresis)."""

    above: float | None = None
    below: float | None = None
    inside: tuple[float, float] | None = None


class ConditionSpec(Spec):
    above: float | None = None
    below: float | None = None
    outside: tuple[float, float] | None = None
    rate: RateSpec | None = None
    clear: ClearSpec | None = None
    for_: Duration | None = Field(default=None, alias="for")


class LevelSpec(ConditionSpec):
    severity: str


class FlappingSpec(Spec):
    """An alert changing state more than ``max_changes`` times in ``window`` is flapping
    until it has not changed for ``stable``; ``max_changes: 0`` turns detection off."""

    max_changes: int = Field(default=6, ge=0)
    window: Duration = 3600.0
    stable: Duration = 900.0


class RuleSpec(ConditionSpec):
    name: str
    select: SelectSpec
    severity: str | None = None
    levels: list[LevelSpec] | None = None
    deadman: Duration | None = None
    per: Literal["field", "device"] | None = None
    grace: Duration | None = None
    forget: Duration | None = None
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    repeat_interval: Duration | None = None
    flapping: FlappingSpec = FlappingSpec()


class RuleFileSpec(Spec):
    rules: list[RuleSpec] = []
