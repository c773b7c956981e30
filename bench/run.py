"""ingestd's benchmark suite: every figure next to a reference measured in the same run.

    .venv/bin/python bench/run.py [--quick]      (make bench, make bench QUICK=1)

Starts a private Mosquitto and VictoriaMetrics (the test suite's launchers), runs the
scenarios below and writes ``bench/results/<UTC time>.json`` (every raw number and the
machine), ``<UTC time>.md`` (the summary, also printed) and PNG plots beside them:

1. throughput: highest zero-loss QoS 1 rate of ``mosquitto_sub`` and of ingestd (spool,
   a quota rule and 100 alert rules on), and their ratio;
2. prototype: the audited prototype's design (one synchronous influxdb-client write per
   message) against the same TSDB, directly and behind a 50 ms round-trip proxy, and
   ingestd behind the same proxy;
3. latency at 50 % of ingestd's ceiling: publish to visible in the TSDB, reading to alert;
4. memory: ingestd's RSS over N messages from 10,000 devices, its maximum and its slope;
5. a notification channel that hangs, against a healthy one: ingest throughput in each.

bench/README.md says what each measures and how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency_proxy import LatencyProxy
from pipeline import (
    BROKER_CONFIG,
    HOLD,
    REPO,
    SITES,
    DaemonConsumer,
    IngestdSetup,
    PrototypeConsumer,
    Publisher,
    SubConsumer,
    machine,
    run_step,
)
from probes import PROBE_RULE, AlertProbe, TsdbProbe, percentiles
from profiling import py_spy
from report import goals, plots, summary
from services import Mosquitto, VictoriaMetrics, free_port
from webhook import Webhook

SCENARIOS = ("throughput", "prototype", "latency", "memory", "hang")
BARE = "ingestd (no rules, no quotas)"
PREFIXES = {"mosquitto_sub": "sub", "ingestd": "ingestd", BARE: "bare"}
PROXY_DELAY = 0.025  # seconds each way: a 50 ms round trip, a TSDB in the cloud


@dataclass
class Plan:
    """How big each scenario is; ``--quick`` and the command line change the defaults."""

    mode: str
    rates: list[int]
    step_seconds: float
    grace: float
    devices: int = 10_000
    publishers: int = 4
    prototype_seconds: float = 15.0
    prototype_rate: float | None = None
    """Rate the prototype's backlog is published at (default: the highest of ``rates``)."""
    latency_seconds: float = 60.0
    latency_fraction: float = 0.5
    alert_interval: float = 0.5
    """Seconds between the alert probe's readings, each an alert transition. Every
    transition costs ingestd a save of its whole rule state (bench/README.md)."""
    rss_messages: int = 1_000_000
    rss_fraction: float = 0.6
    rss_sample_seconds: float = 2.0
    hang_seconds: float = 60.0
    """A channel that hangs for a minute must not lower ingest throughput (ARCHITECTURE)."""
    proxy_round_trip_ms: float = 2000 * PROXY_DELAY
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))
    compare_bare: bool = True
    """Scenario 1 also climbs with ingestd without rules and quotas (their cost)."""
    profile: bool = False
    """py-spy samples every ingestd run (bench/profiling.py)."""
    ceiling: float | None = None
    """ingestd's ceiling to use when the throughput scenario does not run."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            mode="quick",
            # Steps shorter than ~8 s cannot hold 95 % of a rate: the last reading lands
            # one flush interval (200 ms) and a write after it arrived.
            rates=[5000, 10000],
            step_seconds=8.0,
            grace=4.0,
            prototype_seconds=3.0,
            latency_seconds=8.0,
            rss_messages=24_000,
            rss_sample_seconds=0.5,
            hang_seconds=5.0,
            compare_bare=False,
        )

    @classmethod
    def full(cls) -> Plan:
        return cls(
            mode="full",
            rates=[2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000, 20000],
            step_seconds=15.0,
            grace=10.0,
        )


def farm_rules(sites: int = SITES) -> str:
    """100 rules for the simulator's fleet, 10 per site, in the shape of the shipped examples
    (rules/): a range with warning and critical levels, hysteresis and ``for`` per field, two
    rate-of-change rules, a deadman, a sustained and a frost threshold."""
    ranges = {
        "ph": ("outside: [5.5, 6.8]", "{inside: [5.6, 6.7]}", "outside: [5.0, 7.2]"),
        "ec": ("outside: [1.2, 2.5]", "{inside: [1.3, 2.4]}", "outside: [0.8, 3.0]"),
        "water_temp": ("above: 24", "{below: 23.5}", "above: 27"),
        "air_temp": ("outside: [12, 32]", "{inside: [13, 31]}", "outside: [8, 36]"),
        "humidity": ("outside: [40, 85]", "{inside: [42, 83]}", "outside: [30, 95]"),
    }
    lines = ["rules:"]
    for n in range(1, sites + 1):
        site = f"site{n}"

        def rule(name: str, field: str | None, *body: str, site: str = site) -> None:
            select = "measurement: reservoir" + (f", field: {field}" if field else "")
            lines.extend(
                [
                    f"  - name: {site}-{name}",
                    f"    select: {{{select}, site: {site}}}",
                    *(f"    {line}" for line in body),
                ]
            )

        for fld, (warning, clear, critical) in ranges.items():
            rule(
                f"{fld}-range",
                fld,
                "for: 2m",
                "levels:",
                f"  - {{severity: warning, {warning}, clear: {clear}}}",
                f"  - {{severity: critical, {critical}, for: 1m}}",
            )
        rule("water_temp-rising", "water_temp", "rate: {above: 2, window: 1m}")
        rule("ph-crash", "ph", "rate: {below: -0.5, window: 1m}", "severity: critical")
        rule("silent", None, "deadman: 2m", "per: device", "severity: critical")
        rule("ec-sustained", "ec", "above: 2.8", "for: 10m", "severity: critical")
        rule("frost", "air_temp", "below: 4", "severity: critical")
    return "\n".join(lines) + "\n"


@dataclass
class Bench:
    """The servers, the publishers and the work dir every scenario shares."""

    plan: Plan
    broker: Mosquitto
    vm: VictoriaMetrics
    publisher: Publisher
    work: Path
    out: Path
    stem: str
    log: Callable[[str], None]

    def setup(self, **changes: Any) -> IngestdSetup:
        """ingestd as benchmarked: spool, a quota rule and the 100 farm rules (+ probes)."""
        values: dict[str, Any] = {
            "rules": farm_rules() + PROBE_RULE,
            "quotas": True,
            "overrides": self.plan.overrides,
        }
        return IngestdSetup(**(values | changes))

    def ingestd(self, prefix: str, name: str = "ingestd", **changes: Any) -> DaemonConsumer:
        return DaemonConsumer(
            self.broker,
            self.vm,
            prefix,
            self.work,
            self.setup(**changes),
            name=name,
            devices=self.plan.devices,
            sample_every=self.plan.rss_sample_seconds,
            profile=self.out / f"{self.stem}-profile-{prefix}.txt" if self.plan.profile else None,
        )

    def count(self, rate: float, seconds: float) -> int:
        return max(1, round(rate * seconds))

    def show(self, step: dict[str, Any]) -> None:
        holds = step.get("holds")
        stored = f" ({step['received']:,} in the TSDB)" if "consumer_count" in step else ""
        self.log(
            f"  {step['consumer']:>22} {step['offered_rate']:>7,.0f} msg/s: "
            f"{step.get('consumer_count', step['received']):,}/{step['published']:,}{stored} "
            f"in {step['seconds']:.2f} s = {step['achieved_rate']:,} msg/s"
            + ("" if holds is None else f", holds: {holds}")
        )


# --- 1. throughput ceiling ------------------------------------------------------------------


def throughput(bench: Bench) -> dict[str, Any]:
    """The consumers climb the offered rates, alternating at each rate so they see the same
    background; each stops at its first rate that does not hold."""
    plan = bench.plan
    makers: dict[str, Callable[[str], Any]] = {
        "mosquitto_sub": lambda prefix: SubConsumer(bench.broker, prefix),
        "ingestd": bench.ingestd,
    }
    if plan.compare_bare:
        makers[BARE] = lambda prefix: bench.ingestd(prefix, BARE, rules=None, quotas=False)
    best: dict[str, int | None] = dict.fromkeys(makers)
    steps = []
    for index, rate in enumerate(plan.rates):
        for name, make in makers.items():
            if best[name] != (plan.rates[index - 1] if index else None):
                continue  # stopped climbing
            prefix = f"tp-{PREFIXES.get(name, 'ingestd')}-{index}"
            step = run_step(
                bench.publisher,
                make(prefix),
                rate=rate,
                count=bench.count(rate, plan.step_seconds),
                grace=plan.grace,
            )
            bench.show(step)
            steps.append(step)
            if step["holds"]:
                best[name] = rate
    sub, ing = best["mosquitto_sub"], best["ingestd"]
    return {
        "consumers": list(makers),
        "steps": steps,
        "ceiling": best,
        "ratio": round(ing / sub, 3) if sub and ing else None,
        # A consumer that held the highest rate offered has a higher ceiling than measured.
        "at_top": {name: rate == max(plan.rates) for name, rate in best.items()},
    }


def ingestd_ceiling(bench: Bench, results: dict[str, Any]) -> tuple[float, str]:
    """The rate the later scenarios are sized from, and where it comes from."""
    if bench.plan.ceiling:
        return bench.plan.ceiling, "--ceiling"
    measured = results.get("throughput", {}).get("ceiling", {}).get("ingestd")
    if measured:
        return float(measured), "scenario 1"
    return float(bench.plan.rates[0]), "lowest offered rate (no measured ceiling)"


# --- 2. the prototype's design --------------------------------------------------------------


def drain_rate(
    bench: Bench, consumer: PrototypeConsumer, offered: float, count: int, window: float
) -> dict[str, Any]:
    """A consumer that cannot keep up, at its best: ``count`` messages are published at
    ``offered`` msg/s; once the broker acknowledged them all, the publishers are idle and
    what the consumer writes in the next ``window`` seconds, from the backlog, is its rate."""
    try:
        pending = bench.publisher.start(consumer.prefix, offered, count)
        while not pending.ready():
            consumer.progress()  # raises if it died
            time.sleep(0.05)
        results = pending.get()
        published = sum(sent for sent, _, _ in results)
        first, last = min(s for _, s, _ in results), max(e for _, _, e in results)
        began, (before, _) = time.monotonic(), consumer.progress()
        while time.monotonic() < began + window:
            time.sleep(0.05)
            consumer.progress()
        ended, (after, _) = time.monotonic(), consumer.progress()
        total, distinct = consumer.stored(after, timeout=5)
    finally:
        info = consumer.close()
    return {
        "consumer": consumer.name,
        "offered_rate": offered,
        "published": published,
        "publisher_rate": round(published / (last - first)) if last > first else 0,
        "backlog_at_start": published - before,
        "received": distinct,  # in VictoriaMetrics
        "consumer_count": after,
        "stored_samples": total,
        "seconds": round(ended - began, 3),
        "achieved_rate": round((after - before) / (ended - began)),
        "saturated": after < published,  # a backlog was left: the rate is its limit
    } | info


def prototype(bench: Bench, ceiling: float) -> dict[str, Any]:
    """The prototype drains a backlog with the publishers idle (its best case: at least its
    zero-loss rate, so ingestd's ratio over it is a lower bound). ingestd behind the proxy
    climbs down from its direct ceiling to the first rate that holds."""
    plan = bench.plan
    out: dict[str, Any] = {"proxy_round_trip_ms": plan.proxy_round_trip_ms}
    with LatencyProxy(bench.vm.url, PROXY_DELAY, free_port()) as proxy:
        # Directly, more than it could write in the window at ingestd's ceiling; behind the
        # proxy (~20/s) what it wrote directly is plenty.
        offered = plan.prototype_rate or float(max(plan.rates))
        for where, url in (("direct", bench.vm.url), ("proxy", proxy.url)):
            consumer = PrototypeConsumer(
                bench.broker,
                bench.vm,
                f"proto-{where}",
                url,
                name=f"prototype ({where})",
                devices=plan.devices,
            )
            count = bench.count(offered, max(2.0, plan.prototype_seconds))
            step = drain_rate(bench, consumer, offered, count, plan.prototype_seconds)
            bench.show(step)
            out[f"prototype_{where}"] = step
            offered = max(1.0, float(step["achieved_rate"]))
        candidates = [ceiling] + [r for r in sorted(plan.rates, reverse=True) if r < ceiling]
        steps = []
        held: float | None = None
        for index, rate in enumerate(candidates[: 2 if plan.mode == "quick" else 4]):
            step = run_step(
                bench.publisher,
                bench.ingestd(f"proto-ingestd-{index}", "ingestd (proxy)", influx_url=proxy.url),
                rate=rate,
                count=bench.count(rate, plan.step_seconds),
                grace=plan.grace,
            )
            bench.show(step)
            steps.append(step)
            if step["holds"]:
                held = rate
                break
    out["ingestd_proxy_steps"] = steps
    out["ingestd_direct_ceiling"] = ceiling
    out["ingestd_proxy_ceiling"] = held

    def ratio(ingestd: float | None, step: dict[str, Any]) -> float | None:
        rate = step["achieved_rate"]
        return round(ingestd / rate, 1) if ingestd and rate else None

    out["ratio_direct"] = ratio(ceiling, out["prototype_direct"])
    out["ratio_proxy"] = ratio(held, out["prototype_proxy"])
    return out


# --- 3. latency -----------------------------------------------------------------------------


def latency(bench: Bench, ceiling: float) -> dict[str, Any]:
    plan = bench.plan
    rate = max(1.0, round(plan.latency_fraction * ceiling))
    consumer = bench.ingestd("latency")
    tsdb = TsdbProbe(bench.broker.url, bench.vm, "latency").start()
    alert = AlertProbe(bench.broker.url, "latency", plan.alert_interval).start()
    consumer.probes += [tsdb.published, alert.published]

    def halt_probes() -> None:
        tsdb.halt()
        alert.halt()

    def stop_probes() -> None:
        tsdb.stop()
        alert.stop()

    background = run_step(
        bench.publisher,
        consumer,
        rate=rate,
        count=bench.count(rate, plan.latency_seconds),
        grace=plan.grace,
        # Probes stop with the load: the load's readings are ingestd's count minus theirs.
        on_load_done=halt_probes,
        before_close=stop_probes,
    )
    bench.show(background)
    lag_ms = [x * 1000 for x in consumer.lag]
    return {
        "offered_rate": rate,
        "fraction_of_ceiling": plan.latency_fraction,
        "background": background,
        "kept_up": background["holds"],
        "tsdb": tsdb.result(),
        "alert": alert.result(),
        "daemon_lag_ms": percentiles(lag_ms) | {"samples": [round(x, 1) for x in lag_ms]},
    }


# --- 4. memory ------------------------------------------------------------------------------


def memory(bench: Bench, ceiling: float) -> dict[str, Any]:
    plan = bench.plan
    rate = max(1.0, round(plan.rss_fraction * ceiling))
    consumer = bench.ingestd("memory")
    step = run_step(
        bench.publisher,
        consumer,
        rate=rate,
        count=plan.rss_messages,
        grace=max(plan.grace, 120.0),
        before_close=lambda: time.sleep(2),  # the last batch's buffers go
    )
    bench.show(step)
    curve = step.pop("rss_curve")
    return {"offered_rate": rate, "devices": plan.devices, "run": step} | rss_shape(curve)


def rss_shape(curve: list[tuple[float, int, float]]) -> dict[str, Any]:
    """The curve, its maximum and a least-squares slope of RSS over readings written in the
    second half of the run (by readings): flat means bounded."""
    final = curve[-1][1] if curve else 0
    half = [(n, rss) for _, n, rss in curve if n >= final / 2 and final]
    slope = None
    if len({n for n, _ in half}) >= 2:
        mean_n = sum(n for n, _ in half) / len(half)
        mean_r = sum(r for _, r in half) / len(half)
        var = sum((n - mean_n) ** 2 for n, _ in half)
        slope = sum((n - mean_n) * (r - mean_r) for n, r in half) / var
    return {
        "curve": curve,
        "rss_max_mib": max((rss for *_, rss in curve), default=None),
        "rss_start_mib": curve[0][2] if curve else None,
        "readings": final,
        "slope_mib_per_100k": None if slope is None else round(slope * 100_000, 3),
        "last_half_growth_mib": None if slope is None else round(slope * final / 2, 2),
        "last_half_samples": len(half),
    }


# --- 5. a neighbour that hangs --------------------------------------------------------------


def hang(bench: Bench, ceiling: float) -> dict[str, Any]:
    """The same load at ingestd's ceiling twice, with alert events flowing to one
    notification channel (``json://``, every event a call): healthy, then hanging."""
    plan = bench.plan
    out: dict[str, Any] = {"offered_rate": ceiling}
    for state in ("healthy", "hung"):
        with Webhook(hang=state == "hung") as hook:
            notify = {
                "channels": {"hook": hook.url()},
                "routes": [{"name": "ops", "channels": ["hook"], "group_window": "0s"}],
            }
            consumer = bench.ingestd(f"hang-{state}", f"ingestd ({state} channel)", notify=notify)
            alert = AlertProbe(bench.broker.url, f"hang-{state}", plan.alert_interval).start()
            consumer.probes.append(alert.published)
            step = run_step(
                bench.publisher,
                consumer,
                rate=ceiling,
                count=bench.count(ceiling, plan.hang_seconds),
                grace=plan.grace,
                on_load_done=alert.halt,
                before_close=alert.stop,
            )
            bench.show(step)
            metrics = step.get("metrics", {})
            out[state] = {
                "step": step,
                "webhook": hook.counts(),
                "alert": alert.result(),
                "notifications": {
                    k.removeprefix("ingestd_"): v
                    for k, v in metrics.items()
                    if k.startswith(("ingestd_notif", "ingestd_notify_calls"))
                    and "_created" not in k
                },
            }
    healthy, hung = out["healthy"]["step"], out["hung"]["step"]
    out["ratio"] = (
        round(hung["achieved_rate"] / healthy["achieved_rate"], 3)
        if healthy["achieved_rate"]
        else None
    )
    return out


# --- the run --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[Plan, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about two minutes, smaller runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--rates", help="offered rates of scenario 1 (msg/s), comma-separated")
    parser.add_argument("--seconds", type=float, help="publishing time of a throughput step")
    parser.add_argument("--grace", type=float, help="a step's wait after the last publish")
    parser.add_argument("--devices", type=int, help="simulated devices (default 10,000)")
    parser.add_argument("--publishers", type=int, help="publisher processes (default 4)")
    parser.add_argument("--prototype-seconds", type=float, help="prototype measuring window")
    parser.add_argument("--prototype-rate", type=float, help="its backlog's publishing rate")
    parser.add_argument("--latency-seconds", type=float, help="load time of scenario 3")
    parser.add_argument("--rss-messages", type=int, help="messages of scenario 4")
    parser.add_argument("--hang-seconds", type=float, help="load time of each scenario 5 run")
    parser.add_argument(
        "--alert-interval", type=float, help="seconds between alert transitions (default 0.5)"
    )
    parser.add_argument("--ceiling", type=float, help="ingestd's ceiling, when 1 is not run")
    parser.add_argument(
        "--bare",
        action=argparse.BooleanOptionalAction,
        help="scenario 1 also without rules and quotas (default: in the full run)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy samples every ingestd run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an ingestd setting for every run (YAML value), e.g. mqtt.receive_maximum=10000",
    )
    args = parser.parse_args(argv)
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    plan = Plan.quick() if args.quick else Plan.full()
    if args.rates:
        plan.rates = [int(r) for r in args.rates.split(",")]
    if args.scenarios:
        plan.scenarios = [s.strip() for s in args.scenarios.split(",")]
        unknown = set(plan.scenarios) - set(SCENARIOS)
        if unknown:
            parser.error(f"--scenarios: unknown {sorted(unknown)}; choose from {SCENARIOS}")
    for option, name in [
        ("seconds", "step_seconds"),
        ("grace", "grace"),
        ("devices", "devices"),
        ("publishers", "publishers"),
        ("prototype_seconds", "prototype_seconds"),
        ("prototype_rate", "prototype_rate"),
        ("latency_seconds", "latency_seconds"),
        ("rss_messages", "rss_messages"),
        ("hang_seconds", "hang_seconds"),
        ("alert_interval", "alert_interval"),
        ("ceiling", "ceiling"),
        ("bare", "compare_bare"),
        ("profile", "profile"),
    ]:
        if getattr(args, option) is not None:
            setattr(plan, name, getattr(args, option))
    for item in args.set:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            parser.error(f"--set {item!r}: expected SECTION.KEY=VALUE")
        plan.overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    return plan, args.out


def run(plan: Plan, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Every scenario asked for; one that fails is recorded under ``errors`` and the others
    still run. Writes nothing but profiles (``--profile``) to ``out``."""
    started, began = datetime.now(UTC), time.monotonic()
    report: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": plan.mode,
        "machine": machine(),
        "plan": asdict(plan),
        "hold_fraction": HOLD,
        "scenarios": {},
        "errors": {},
    }
    stem = started.strftime("%Y%m%dT%H%M%SZ")
    report["stem"] = stem
    results: dict[str, Any] = report["scenarios"]
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(extra_config=BROKER_CONFIG))
        vm = stack.enter_context(VictoriaMetrics())
        work = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))  # spools, on local disk
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        publisher = Publisher(broker.url, plan.publishers, plan.devices)
        stack.callback(publisher.close)
        bench = Bench(plan, broker, vm, publisher, work, out, stem, log)
        report["ingestd_config"] = bench.setup().config(work / "example", broker, vm, "example")
        report["ingestd_config"]["rules"]["file"] = "farm_rules() + PROBE_RULE: 100 + 1 rules"
        scenarios: dict[str, Callable[[float], dict[str, Any]]] = {
            "throughput": lambda _: throughput(bench),
            "prototype": lambda ceiling: prototype(bench, ceiling),
            "latency": lambda ceiling: latency(bench, ceiling),
            "memory": lambda ceiling: memory(bench, ceiling),
            "hang": lambda ceiling: hang(bench, ceiling),
        }
        for name in SCENARIOS:
            if name not in plan.scenarios:
                continue
            ceiling, source = ingestd_ceiling(bench, results)
            if name != "throughput":
                report.setdefault("ceiling_used", {"rate": ceiling, "from": source})
            log(f"{name} ({time.monotonic() - began:.0f} s)")
            try:
                results[name] = scenarios[name](ceiling)
            except Exception as exc:  # recorded; the other scenarios still run
                report["errors"][name] = "".join(traceback.format_exception(exc))[-4000:]
                log(f"  {name} failed: {exc!r}")
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = round(time.monotonic() - began, 1)
    report["goals"] = goals(report)
    return report


def main(argv: list[str] | None = None) -> int:
    plan, out = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    report = run(plan, out, log)
    stem = report["stem"]
    report["files"] = {"json": f"{stem}.json", "summary": f"{stem}.md"}
    report["files"] |= plots(report, out, stem)
    text = summary(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)
    print(f"\nResults: {out / stem}.json, .md and -*.png")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process the benchmark started is stopped", file=sys.stderr)
        sys.exit(130)
