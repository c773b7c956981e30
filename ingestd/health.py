"""What each component says about itself, for ``/healthz``, ``/readyz`` and the logs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Health"]


@dataclass
class _State:
    ok: bool
    detail: str


@dataclass
class Health:
    """Components report ``ok`` or a problem; the daemon is healthy when all are ok."""

    ready: bool = False
    backlog: Callable[[], dict[str, float]] | None = None
    """What waits for the TSDB (the spool's readings, bytes and the oldest one's age),
    measured at each report: a component's detail says what is wrong, this how much waits."""
    _components: dict[str, _State] = field(default_factory=dict)

    def ok(self, component: str, detail: str = "ok") -> None:
        self._components[component] = _State(True, detail)

    def problem(self, component: str, detail: str) -> None:
        self._components[component] = _State(False, detail)

    @property
    def healthy(self) -> bool:
        return all(state.ok for state in self._components.values())

    def report(self) -> dict[str, object]:
        report: dict[str, object] = {
            "status": "ok" if self.healthy else "degraded",
            "ready": self.ready,
        }
        if self.backlog is not None:
            report["backlog"] = self.backlog()
        report["components"] = {
            name: {"ok": state.ok, "detail": state.detail}
            for name, state in sorted(self._components.items())
        }
        return report
