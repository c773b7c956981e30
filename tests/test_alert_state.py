"""The alert stage's state save: what a message caused is on disk before it is acked."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_spool import FilesExhausted, until

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


RATE_RULE = """
rules:
  - name: warming_fast
    select: {measurement: reservoir, field: water_temp}
    rate: {above: 0.5, window: 10m}
"""


def test_the_whole_state_written_part_by_part_restores_every_device(tmp_path: Path) -> None:
    """The full save streams the states in parts; a restart gets every one of them back
    (here 5,000 devices' rate samples: more than two parts), and a save that cannot be
    written leaves the previous file in place."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(RULE + RATE_RULE.removeprefix("\nrules:\n"))
    state = tmp_path / "state"
    state.mkdir()
    now = 1_790_000_000.0
    devices = 5000

    def stage() -> AlertStage:
        section = RulesSection(dir=rules)
        return AlertStage(section, state, Metrics(), Health(), lambda t, p, r: True)

    async def write() -> None:
        first = stage()
        for minute in range(3):
            first.evaluate(
                [
                    Reading("reservoir", f"dev{i}", {}, {"water_temp": 20.0 + minute}, t)
                    for i in range(devices)
                    for t in [int((now + minute * 60) * 1e9)]
                ]
            )
        first.evaluate([Reading("reservoir", "dev0", {}, {"ph": 7.5}, int((now + 200) * 1e9))])
        await first.close()  # a full save

    async def fail_then_keep() -> None:
        second = stage()
        kept = (state / "alerts.json").read_bytes()
        (state / "alerts.tmp").mkdir()  # the temporary file cannot be created
        await second.save_full()
        assert (state / "alerts.json").read_bytes() == kept
        (state / "alerts.tmp").rmdir()
        await second.close()

    asyncio.run(write())
    restored = stage().engine.snapshot()["states"]
    samples = {s["device"]: s["samples"] for s in restored if s["rule"] == "warming_fast"}
    assert len(samples) == devices
    assert all(len(pairs) == 3 for pairs in samples.values())
    assert [s["device"] for s in restored if s["rule"] == "ph_high"] == ["dev0"]
    asyncio.run(fail_then_keep())


def test_with_no_file_descriptor_left_the_stage_degrades_health_and_carries_on(
    tmp_path: Path,
) -> None:
    """EMFILE in the state save and in the look at the rule files (every watch_interval):
    the acks wait and health says why; the stage's task never ends (that would end the
    daemon); all is saved once descriptors are back."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(RULE)
    state = tmp_path / "state"
    state.mkdir()

    async def scenario() -> None:
        health = Health()
        section = RulesSection(dir=rules, watch_interval=0.05)
        stage = AlertStage(section, state, Metrics(), health, lambda t, p, r: True)
        running = asyncio.create_task(stage.run())  # timers, saves, the rule-file watch
        with capture_logs() as logs, FilesExhausted() as files:

            def watched() -> bool:
                return running.done() or any("rule files" in e["event"] for e in logs)

            await until(watched, "a look at the rule files without descriptors")
            assert not running.done(), running.exception() if running.done() else ""
            stage.evaluate([Reading("reservoir", "dev1", {}, {"ph": 7.5}, 1_790_000_000 * 10**9)])
            waiting = asyncio.create_task(stage.save_if_changed())  # what the spool awaits
            await until(lambda: not health.healthy, "health degraded")
            assert "cannot save alert state" in str(health.report())
            assert not waiting.done(), "acks must wait while the transition is not saved"
            assert not running.done(), running.exception() if running.done() else ""
            files.release()
        await asyncio.wait_for(waiting, 10)
        assert b"ph_high" in (state / "alerts.recent.json").read_bytes()
        assert health.healthy
        assert not running.done()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await stage.close()

    asyncio.run(scenario())


def test_the_state_files_are_renamed_durably_before_anything_is_acked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut can undo a rename the directory was not fsynced after, while the
    messages it covered are acknowledged: each rename is followed by an fsync of its
    directory, before the save returns. (A power cut cannot be made on demand: the calls
    are recorded instead.)"""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(RULE)
    state = tmp_path / "state"
    state.mkdir()
    calls: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        real_replace(source, target, *args, **kwargs)
        calls.append(("replace", str(target)))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            calls.append(("fsync dir", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)

    async def scenario() -> None:
        stage = AlertStage(RulesSection(dir=rules), state, Metrics(), Health(), lambda *_: True)
        stage.evaluate([Reading("reservoir", "dev1", {}, {"ph": 7.5}, 1_790_000_000 * 10**9)])
        await stage.save_if_changed()  # what each commit awaits before its acks
        assert calls == [
            ("replace", str(state / "alerts.recent.json")),
            ("fsync dir", str(state)),
        ]
        calls.clear()
        await stage.save_full()
        assert calls == [("replace", str(state / "alerts.json")), ("fsync dir", str(state))]
        await stage.close()

    asyncio.run(scenario())
