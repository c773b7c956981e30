"""The benchmark suite (bench/run.py) keeps working: its quick mode with tiny numbers runs
against real servers and writes a result of the right shape. No figure is judged here: a
test on a shared machine cannot time anything; ``make bench`` on an idle one does."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from daemon import REPO

from ingestd.rules import load_rules

sys.path.insert(0, str(REPO / "bench"))

from profiling import summarise
from run import farm_rules, rss_shape

TINY = [
    "--quick",
    "--rates=200",
    "--seconds=1.5",
    "--grace=2",
    "--devices=50",
    "--publishers=2",
    "--bare",
    "--prototype-seconds=1.5",
    "--prototype-rate=3000",
    "--latency-seconds=2",
    "--rss-messages=300",
    "--hang-seconds=1.5",
]
STEP_KEYS = {
    "consumer",
    "offered_rate",
    "published",
    "publisher_rate",
    "received",
    "missing",
    "seconds",
    "achieved_rate",
    "holds",
}


def test_the_generated_rules_are_100_valid_rules() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(farm_rules())
        assert len(load_rules(path)) == 100


def test_rss_shape_fits_the_second_half() -> None:
    curve = [(float(i), i * 1000, 100.0 + (0.5 * i if i < 5 else 2.5)) for i in range(11)]
    shape = rss_shape(curve)
    assert shape["rss_max_mib"] == 102.5
    assert shape["slope_mib_per_100k"] == 0.0  # flat once warm
    assert shape["last_half_growth_mib"] == 0.0


def test_profile_summary_by_stage_library_and_function() -> None:
    folded = "\n".join(
        [
            "main (ingestd/cli.py:1);_readable (ingestd/source.py:9);"
            "loop_read (paho/mqtt/client.py:2) 6",
            "main (ingestd/cli.py:1);evaluate (ingestd/rules/engine.py:5) 3",
            "main (ingestd/cli.py:1);select (selectors.py:4) 1",
        ]
    )
    profile = summarise(folded)
    assert profile["samples"] == 10
    assert profile["by_ingestd_module_percent"][:2] == [
        ("ingestd/source.py", 60.0),
        ("ingestd/rules/engine.py", 30.0),
    ]
    assert ("paho", 60.0) in profile["by_library_percent"]
    assert profile["top_functions_percent"][0] == ("loop_read (client.py)", 60.0)


@pytest.mark.services
@pytest.mark.timeout(240)
def test_quick_mode_with_tiny_numbers_writes_every_scenario(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), *TINY, f"--out={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    [path] = tmp_path.glob("*.json")
    report = json.loads(path.read_text())
    assert report["errors"] == {}
    assert report["mode"] == "quick"

    machine = report["machine"]
    for key in ("cores", "cpu_model", "kernel", "python", "ingestd", "mosquitto"):
        assert machine[key], key
    assert machine["victoria_metrics"]
    assert machine["packages"]["paho-mqtt"]
    assert machine["packages"]["influxdb-client"]

    scenarios = report["scenarios"]
    assert set(scenarios) == {"throughput", "prototype", "latency", "memory", "hang"}
    check_throughput(scenarios["throughput"])
    check_prototype(scenarios["prototype"])
    check_latency(scenarios["latency"])
    check_memory(scenarios["memory"])
    check_hang(scenarios["hang"])

    assert len(report["goals"]) == 7
    for goal in report["goals"]:
        assert set(goal) == {"goal", "target", "measured", "met", "note"}

    files = report["files"]
    summary = (tmp_path / files["summary"]).read_text()
    assert result.stdout.startswith(summary)  # printed too
    for heading in ("## Goals", "## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in summary
    for plot in ("throughput_png", "rss_png", "latency_png"):
        assert (tmp_path / files[plot]).read_bytes().startswith(b"\x89PNG"), plot


def check_throughput(tp: dict[str, Any]) -> None:
    assert tp["consumers"] == ["mosquitto_sub", "ingestd", "ingestd (no rules, no quotas)"]
    assert {s["consumer"] for s in tp["steps"]} == set(tp["consumers"])
    for step in tp["steps"]:
        assert set(step) >= STEP_KEYS
        assert step["published"] == 300
        assert step["missing"] == 0  # slow is allowed here; lossy is not
    ingestd = next(s for s in tp["steps"] if s["consumer"] == "ingestd")
    assert ingestd["metrics"]["ingestd_rules_loaded"] == 101  # 100 + the alert probe's
    assert ingestd["exit_code"] == 0
    assert set(tp["ceiling"]) == set(tp["consumers"])
    assert "ratio" in tp


def check_prototype(proto: dict[str, Any]) -> None:
    assert proto["proxy_round_trip_ms"] == 50
    for where in ("direct", "proxy"):
        step = proto[f"prototype_{where}"]
        assert step["achieved_rate"] > 0
        assert step["received"] > 0  # counted in VictoriaMetrics
        assert {"saturated", "backlog_at_start"} <= set(step)
    assert proto["prototype_proxy"]["achieved_rate"] < proto["prototype_direct"]["achieved_rate"]
    assert proto["ingestd_proxy_steps"]
    assert set(proto["ingestd_proxy_steps"][0]) >= STEP_KEYS
    assert {"ratio_direct", "ratio_proxy", "ingestd_proxy_ceiling"} <= set(proto)


def check_latency(lat: dict[str, Any]) -> None:
    for measured in (
        lat["tsdb"]["mqtt_via_ingestd_ms"],
        lat["tsdb"]["direct_write_ms"],
        lat["alert"]["ms"],
    ):
        assert measured["count"] > 0
        assert measured["p50"] is not None
        assert measured["p99"] >= measured["p50"]
    assert lat["alert"]["missing"] == 0
    assert lat["background"]["missing"] == 0
    assert "p99" in lat["daemon_lag_ms"]


def check_memory(mem: dict[str, Any]) -> None:
    assert len(mem["curve"]) >= 2
    assert mem["rss_max_mib"] > 0
    assert mem["readings"] >= 300
    assert {"slope_mib_per_100k", "last_half_growth_mib"} <= set(mem)
    assert mem["run"]["missing"] == 0


def check_hang(hang: dict[str, Any]) -> None:
    healthy, hung = hang["healthy"], hang["hung"]
    assert healthy["webhook"]["answered"] >= 1
    assert hung["webhook"]["requests"] >= 1
    assert hung["webhook"]["answered"] == 0  # it really hung
    for run in (healthy, hung):
        assert run["step"]["missing"] == 0
        assert run["alert"]["events"] > 0
    assert "ratio" in hang
