"""Scale-out on this machine: 1, 2 and 3 ingestd instances in one cluster (make bench-cluster).

Each run drains the same backlog: the instances subscribe once (their persistent sessions in
one MQTT 5 shared subscription), stop, the publishers put ``--messages`` readings into the
broker (which shares them out among the sessions), and the instances start together. The
rate is the readings stored per second between 10 % and 90 % of the backlog, over all
the instances, read from the receipt times the readings carry into the TSDB (10th to 90th
percentile); the reference is one instance in the same run, so the figures are ratios.
Also measured: Redis round trips per reading (the cluster's own count, and the commands
Redis processed per reading, which include quotas and latest values), and where the CPU went
(cores each process used between 10 % and 90 % of the drain).

    .venv/bin/python bench/cluster.py [--messages 150000] [--instances 1,2,3] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from daemon import DaemonProcess, daemon_config
from pipeline import BROKER_CONFIG, REPO, Publisher, machine, warm_series
from run import farm_rules
from services import Mosquitto, Postgres, Redis, VictoriaMetrics

from ingestd.store.postgres import migrate

DEVICES = 2000
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_commands(redis: Redis) -> int:
    with redis.client() as client:
        return int(client.info("stats")["total_commands_processed"])


class Run:
    def __init__(  # noqa: PLR0917
        self, work: Path, broker: Mosquitto, vm: VictoriaMetrics, redis: Redis,
        pg_url: str, count: int, cluster: bool,
    ) -> None:  # fmt: skip
        self.prefix = f"k{count}{'c' if cluster else 's'}{int(time.time()) % 100000}"
        rules = work / self.prefix / "rules"
        rules.mkdir(parents=True)
        (rules / "farm.yaml").write_text(farm_rules())
        self.instances = []
        for n in range(count):
            name = f"i{n}"
            sections: dict[str, Any] = {
                "mqtt": {
                    "receive_maximum": 1000,
                    "share_group": f"g{self.prefix}",
                    "client_id": f"bench-{self.prefix}-{name}",
                },
                "spool": {"commit_interval": "5ms"},
                "logging": {"level": "warning"},
                "rules": {"dir": str(rules)},
                "redis": {"url": redis.url},
                "quotas": {
                    "backend": "redis",
                    "rules": [
                        {"name": "b", "topic": f"{self.prefix}/+/{{device}}/#", "rate": 1000}
                    ],
                },
            }
            if cluster:
                sections["cluster"] = {"enabled": True, "instance": name, "partitions": 32}
                sections["postgres"] = {"url": pg_url}
                sections["notify"] = {"outbox": "postgres"}
            influx = {"url": vm.url, "batch_size": 5000, "flush_interval": "200ms"}
            config = daemon_config(work / self.prefix / name, broker.url, self.prefix, influx,
                                   **sections)  # fmt: skip
            config["mqtt"]["subscriptions"][0]["topic"] = f"{self.prefix}/#"
            config["mqtt"]["subscriptions"][0]["template"] = "{farm}/{site}/{device}/{measurement}"
            self.instances.append(DaemonProcess(work / self.prefix / name, config))

    def accepted(self) -> float:
        total = 0.0
        for daemon in self.instances:
            with contextlib.suppress(Exception):
                total += daemon.metric("ingestd_messages_accepted_total")
        return total

    def metric(self, name: str) -> float:
        return sum(daemon.metric(name) for daemon in self.instances)


def measure(  # noqa: PLR0917
    work: Path, services: dict[str, Any], pg_url: str, count: int, cluster: bool,
    messages: int, publisher: Publisher, log: Any,
) -> dict[str, Any]:  # fmt: skip
    broker, vm, redis = services["broker"], services["vm"], services["redis"]
    run = Run(work, broker, vm, redis, pg_url, count, cluster)
    warm_series(vm, run.prefix, DEVICES)
    for daemon in run.instances:  # the sessions and the shared subscription exist
        daemon.start()
    for daemon in run.instances:
        assert daemon.terminate() == 0, daemon.log()
    pending = publisher.start(run.prefix, 50_000, messages)
    published = sum(sent for sent, _, _ in pending.get())
    commands_before = redis_commands(redis)
    servers = {
        "mosquitto": broker.pid,
        "redis": redis.pid,
        "victoria-metrics": vm.pid,
        "postgres": services["postgres"].pid,
    }
    for daemon in run.instances:
        daemon.start(wait_ready=False)
    pids = {f"ingestd {i}": d.process.pid for i, d in enumerate(run.instances) if d.process}
    started = time.time()
    deadline = time.monotonic() + 600
    # CPU between 10 % and 90 % accepted (polled: startup and imports are left out)
    snapshots: list[tuple[float, dict[str, float]]] = []
    procs = {**servers, **pids}
    while (done := run.accepted()) < published and time.monotonic() < deadline:
        if len(snapshots) < 2 and done >= (0.1 if not snapshots else 0.9) * published:
            snapshots.append((time.monotonic(), {n: cpu_seconds(p) for n, p in procs.items()}))
        time.sleep(0.1)
    while cluster and run.metric("ingestd_cluster_forwarded_total") < published:
        assert time.monotonic() < deadline, "readings accepted but never forwarded to the rules"
        time.sleep(0.5)
    if len(snapshots) == 2:
        (t0, first), (t1, last) = snapshots
        cpu = {name: round((last[name] - first[name]) / (t1 - t0), 2) for name in procs}
    else:  # drained between two polls
        cpu = {}
    commands = redis_commands(redis) - commands_before
    # Each reading carries the time ingestd received it (ns): the drain rate is read from
    # the TSDB, between the 10th and the 90th percentile of those times (no polling bias).
    series = vm.export_until(
        f'reservoir_seq{{farm="{run.prefix}"}}',
        lambda found: sum(len(s["timestamps"]) for s in found) >= published + DEVICES,
        timeout=120,
    )
    stamps = sorted(t for s in series for t in s["timestamps"] if t >= started * 1000 - 5000)
    low, high = stamps[len(stamps) // 10], stamps[len(stamps) * 9 // 10]
    rate = (len(stamps) * 0.8) / ((high - low) / 1000)
    result = {
        "instances": count,
        "cluster": cluster,
        "published": published,
        "accepted": run.accepted(),
        "rate": round(rate),
        "cluster_round_trips_per_reading": round(
            run.metric("ingestd_cluster_redis_round_trips_total") / published, 4
        )
        if cluster
        else None,
        "redis_commands_per_reading": round(commands / published, 3),
        "forwarded": run.metric("ingestd_cluster_forwarded_total") if cluster else None,
        "cores_used_10_to_90": cpu,
    }
    for daemon in run.instances:
        daemon.terminate()
    log(
        f"  {count} instance(s){' cluster' if cluster else ''}: {result['rate']:,} msg/s, "
        f"redis commands/reading {result['redis_commands_per_reading']}, "
        f"cluster round trips/reading {result['cluster_round_trips_per_reading']}, cores {cpu}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=150_000)
    parser.add_argument("--instances", default="1,2,3")
    parser.add_argument("--quick", action="store_true", help="40,000 readings")
    args = parser.parse_args(argv)
    messages = 40_000 if args.quick else args.messages
    counts = [int(n) for n in args.instances.split(",")]
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    report: dict[str, Any] = {"machine": machine(), "messages": messages, "runs": []}
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-cluster-") as tmp:
        work = Path(tmp)
        services = {
            "broker": Mosquitto(extra_config=BROKER_CONFIG).start(),
            "vm": VictoriaMetrics().start(),
            "redis": Redis().start(),
            "postgres": Postgres().start(),
        }
        publisher = Publisher(services["broker"].url, 2, DEVICES)
        try:
            pg_url = services["postgres"].create_database("bench_cluster")
            with psycopg.connect(pg_url, autocommit=True) as conn:
                migrate(conn)
            print(f"cluster bench: {messages:,} readings from {DEVICES:,} devices per run")
            report["runs"].append(
                measure(work, services, pg_url, 1, False, messages, publisher, print)
            )
            for count in counts:
                report["runs"].append(
                    measure(work, services, pg_url, count, True, messages, publisher, print)
                )
        finally:
            publisher.close()
            for service in services.values():
                service.close()
    runs = report["runs"]
    single = runs[0]["rate"]
    one = next((r["rate"] for r in runs[1:] if r["instances"] == 1), None)
    report["ratios"] = {
        "cluster_1_vs_single": round(one / single, 3) if one else None,
        **{f"{r['instances']}_vs_1": round(r["rate"] / one, 3) for r in runs[1:] if one},
    }
    path = out / f"{stamp}-cluster.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"ratios: {report['ratios']}\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
