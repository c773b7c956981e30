"""The alert stage's state save: what a message caused is on disk before it is acked."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ingestd.alerts import AlertStage
from ingestd.config import RulesSection
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.model import Reading

RULE = """
rules:
  - name: ph_high
    select: {measurement: reservoir, field: ph}
    above: 7.0
    severity: warning
"""


def test_a_failing_save_holds_the_acks_until_it_succeeds(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(RULE)
    state = tmp_path / "state"
    state.mkdir()
    blocker = state / "alerts.recent.tmp"
    blocker.mkdir()  # the atomic write's temporary file cannot be created: saves fail

    async def scenario() -> None:
        health = Health()
        stage = AlertStage(RulesSection(dir=rules), state, Metrics(), health, lambda t, p, r: True)
        stage.evaluate([Reading("reservoir", "dev1", {}, {"ph": 7.5}, 1_790_000_000 * 10**9)])
        waiting = asyncio.create_task(stage.save_if_changed())  # what the spool awaits
        await asyncio.sleep(1.5)
        assert not waiting.done(), "acks must wait while the transition is not saved"
        assert "cannot save alert state" in str(health.report())
        assert not (state / "alerts.recent.json").exists()
        blocker.rmdir()  # the disk recovers
        await asyncio.wait_for(waiting, 10)
        assert b"ph_high" in (state / "alerts.recent.json").read_bytes()
        assert health.healthy
        await stage.close()

    asyncio.run(scenario())
