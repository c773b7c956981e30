"""The soak (soak/run.py) in its short form: about 90 seconds of a simulated farm with the
example rules and anomalies on, VictoriaMetrics restarted three times and the broker once, a
notification channel failing a third of its requests. Every reading sent is stored, every
alert transition that should notify was notified, RSS and fds stay flat, the spool empties.
``make soak DURATION=1h`` is the long one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from daemon import REPO

from ingestd.greenhouse import SLOT


def test_a_short_soak_loses_nothing_and_stays_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "soak" / "run.py"), "--duration", "90s", "--tsdb-every",
         "25s", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=REPO,
        check=False,
    )  # fmt: skip
    assert out.exists(), run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["checks"] == dict.fromkeys(result["checks"], True), run.stdout
    assert run.returncode == 0, run.stdout + run.stderr
    readings, alerts = result["readings"], result["alerts"]
    assert readings["stored"] == readings["sent"] == result["simulator"]["messages"] > 5000
    assert alerts["notified"] == alerts["should_notify"] > 0
    assert alerts["endpoint_failed"] > 0  # the channel did fail, and nothing was lost to it
    assert len(result["chaos"]["tsdb_restarts"]) == 3
    assert len(result["chaos"]["broker_restarts"]) == 1
    assert result["spool"]["records_at_end"] == 0
    assert result["memory"]["samples"] >= 20


def test_a_soak_started_just_after_an_anomaly_slot_began_still_has_alarming_devices() -> None:
    """Anomalies come in 4-hour slots (08:00 UTC began one) and start some way into one: a
    soak started at 08:10 found no seed with alarming devices and failed. The seed comes
    with a shift of the simulated fleet's clock that has some."""
    # soak/run.py by its path: "run" is bench/run.py in this session (tests/test_bench.py)
    spec = importlib.util.spec_from_file_location("soak_run", REPO / "soak" / "run.py")
    assert spec is not None and spec.loader is not None
    soak = sys.modules["soak_run"] = importlib.util.module_from_spec(spec)  # for dataclasses
    spec.loader.exec_module(soak)
    alarming, choose_seed = soak.alarming, soak.choose_seed

    slot_start = 1_795_939_200.0  # 2026-11-29T08:00:00Z
    assert slot_start % SLOT == 0
    start = slot_start + 10
    seed, shift = choose_seed(300, start, 90.0)
    assert shift < 0
    assert alarming(300, seed, start + shift, 90.0) >= 4
