"""The soak (soak/run.py) in its short form: about 90 seconds of a simulated farm with the
example rules and anomalies on, VictoriaMetrics restarted three times and the broker once, a
notification channel failing a third of its requests. Every reading sent is stored, every
alert transition that should notify was notified, RSS and fds stay flat, the spool empties.
``make soak DURATION=1h`` is the long one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon import REPO


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
