"""Alert latency: a reading published to MQTT until its alert event arrives on the alert topic.

Run: ``.venv/bin/python bench/alerts.py [--rate 10000] [--seconds 30]``. Starts a private
Mosquitto and VictoriaMetrics, and ingestd with 1,000 per-site rules (bench/rules_micro.py's
"per-site" set) plus one probe rule. Publisher processes send a background load of
``--rate`` readings/s from 10,000 devices while a probe device flips its pH above and below
the probe rule's threshold every ``--interval`` seconds; every flip is one alert event
(firing, then resolved). Reports p50/p99/max of publish-to-event latency, the background
rate actually achieved, and whether ingestd kept up (all background readings stored).
All processes share the machine's cores, as on a farm gateway.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from daemon import DaemonProcess, daemon_config  # noqa: E402
from rules_micro import ruleset  # noqa: E402
from services import Mosquitto, VictoriaMetrics  # noqa: E402

from ingestd.simulate import Fleet  # noqa: E402

PREFIX = "bench"
PROBE_RULE = """
  - name: ph_probe
    select: {measurement: probe, field: ph}
    above: 7.0
    severity: warning
"""


def background(url: str, first: int, devices: int, rate: float, seconds: float) -> int:
    fleet = Fleet(url, devices=devices, sites=50, prefix=PREFIX, first=first)
    return fleet.run(rate, count=round(rate * seconds))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=10_000, help="background readings/s")
    parser.add_argument("--seconds", type=float, default=30, help="how long")
    parser.add_argument("--interval", type=float, default=0.1, help="probe flip interval (s)")
    parser.add_argument("--publishers", type=int, default=4)
    args = parser.parse_args()

    with Mosquitto() as broker, VictoriaMetrics() as vm:
        work = Path(os.environ.get("TMPDIR", "/tmp")) / f"ingestd-bench-alerts-{os.getpid()}"
        rules = work / "rules"
        rules.mkdir(parents=True)
        source = ruleset("per-site").files[0].read_text()
        (rules / "farm.yaml").write_text(source + PROBE_RULE)
        config = daemon_config(
            work, broker.url, PREFIX,
            {"url": vm.url, "batch_size": 5000, "flush_interval": "200ms"},
            mqtt={"receive_maximum": 10000},
            logging={"level": "warning"},
            rules={"dir": str(rules)},
        )  # fmt: skip
        daemon = DaemonProcess(work, config).start()
        try:
            # Each probe device fires once and resolves once (flipping one device would be
            # flapping, which the engine reports with events of its own).
            sent: dict[tuple[str, str], float] = {}
            received: dict[tuple[str, str], float] = {}

            def on_event(_c: object, _u: object, message: paho.MQTTMessage) -> None:
                event = orjson.loads(message.payload)
                received.setdefault((event["device"], event["kind"]), time.monotonic())

            watcher = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            watcher.on_message = on_event
            host, port = broker.url.removeprefix("mqtt://").split(":")
            watcher.connect(host, int(port))
            watcher.subscribe("alerts/warning/s1/+/ph_probe", qos=1)
            watcher.loop_start()
            prober = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2)
            prober.connect(host, int(port))
            prober.loop_start()
            time.sleep(1)

            per = args.rate / args.publishers
            with multiprocessing.Pool(args.publishers) as pool:
                started = time.monotonic()
                load = pool.starmap_async(
                    background,
                    [
                        (broker.url, i * 2500, 2500, per, args.seconds)
                        for i in range(args.publishers)
                    ],
                )
                flip = 0
                while time.monotonic() - started < args.seconds:
                    device, high = f"probe-{flip // 2}", flip % 2 == 0
                    payload = orjson.dumps({"ph": 8.0 if high else 6.0})
                    sent[(device, "firing" if high else "resolved")] = time.monotonic()
                    prober.publish(f"{PREFIX}/s1/{device}/probe", payload, qos=1)
                    flip += 1
                    time.sleep(args.interval)
                published = sum(load.get(timeout=600))
                load_seconds = time.monotonic() - started
            deadline = time.monotonic() + 60
            while len(received) < len(sent) and time.monotonic() < deadline:
                time.sleep(0.1)
            kept_up = True
            try:
                daemon.wait(
                    lambda: daemon.metric("ingestd_points_written_total") >= published,
                    "storing the background load", timeout=120,
                )  # fmt: skip
            except AssertionError:
                kept_up = False
            watcher.loop_stop()
            prober.loop_stop()
            evaluations = daemon.metric("ingestd_rule_evaluations_total")
            assert daemon.terminate() == 0
        finally:
            daemon.close()
            shutil.rmtree(work, ignore_errors=True)

    latencies = [(received[key] - at) * 1000 for key, at in sent.items() if key in received]
    report = {
        "started": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "rules": 1001,
        "background_offered_rate": args.rate,
        "background_published": published,
        "background_achieved_rate": round(published / load_seconds),
        "ingestd_kept_up": kept_up,
        "probe_flips": len(sent),
        "alert_events": len(received),
        "events_missing": len(sent) - len(latencies),
        "rule_evaluations": evaluations,
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(percentile(latencies, 0.99), 1),
            "max": round(max(latencies), 1),
        },
    }
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"alerts-{report['started'].replace(':', '').replace('-', '')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    lat = report["latency_ms"]
    print(
        f"## Alert latency under load ({report['nproc']} cores, shared with the publishers)\n\n"
        f"| background offered | achieved | ingestd kept up | rules | flips | events "
        f"| p50 ms | p99 ms | max ms |\n|---:|---:|---|---:|---:|---:|---:|---:|---:|\n"
        f"| {args.rate:,.0f} | {report['background_achieved_rate']:,} | {kept_up} | 1,001 "
        f"| {len(sent)} | {len(received)} | {lat['p50']} | {lat['p99']} | {lat['max']} |\n\n"
        f"Raw numbers: {path.relative_to(REPO)}"
    )
    return 0 if report["events_missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
