"""Benchmark the ingestion pipeline against a private broker and a real VictoriaMetrics.

One run, one broker, one publisher load (several ``Fleet`` processes, 10,000 devices, QoS 1):

1. zero-loss sustained throughput at rising offered rates, for ``mosquitto_sub`` (the broker's
   own ceiling) and for ``ingestd run`` (readings that landed in VictoriaMetrics);
2. ingestd's RSS after a million messages (200k with --quick) at a rate it keeps up with.

    .venv/bin/python bench/pipeline.py [--quick]

Prints a Markdown summary and writes every raw number to bench/results/pipeline-<UTC>.json.
See bench/README.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test suite's server launchers

from daemon import DaemonProcess, daemon_config  # noqa: E402
from services import Mosquitto, VictoriaMetrics, find_binary, http_request  # noqa: E402

from ingestd import __version__  # noqa: E402
from ingestd.simulate import Fleet  # noqa: E402

DEVICES = 10_000
SITES = 10
WARM_AGE = 2 * 3600  # seconds: warm-up samples lie outside every count window
HOLD = 0.95  # achieved / offered for a rate to hold
MIB = 1024 * 1024
BROKER_CONFIG = """\
max_queued_messages 1000000
# The harness autosaves every second; Debian's broker (and mosquitto's default) every 30 min.
autosave_interval 1800
"""
SHARED_CPU = (
    "Publishers, broker, consumer and VictoriaMetrics share the machine's {cpus} cores "
    "(as on a farm gateway); consumers run one at a time."
)


@dataclass
class DeviceSlice(Fleet):
    """One publisher process's share of the fleet: devices ``first`` .. ``first+devices-1``."""

    first: int = 0

    def topics(self) -> Iterator[tuple[int, str]]:
        for index in range(self.devices):
            device = self.first + index
            yield index, f"{self.prefix}/site{device % self.sites + 1}/esp32-{device:05d}/reservoir"


@dataclass(frozen=True)
class Job:
    url: str
    prefix: str
    first: int
    devices: int
    rate: float
    count: int
    start_at: float


def publish_slice(job: Job) -> tuple[int, float, float]:
    """Pool worker: wait for the common start, publish; (sent, started, all acked)."""
    time.sleep(max(0.0, job.start_at - time.monotonic()))  # CLOCK_MONOTONIC is system-wide
    fleet = DeviceSlice(
        job.url, devices=job.devices, sites=SITES, prefix=job.prefix, first=job.first
    )
    started = time.monotonic()
    sent = fleet.run(rate=job.rate, count=job.count)
    return sent, started, time.monotonic()


_IGNORE_SIGINT = (signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


class Publisher:
    """A pool of publisher processes that split the devices, the rate and the count."""

    def __init__(self, url: str, processes: int) -> None:
        self.url = url
        self.processes = processes
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(processes, initializer=signal.signal, initargs=_IGNORE_SIGINT)
        try:
            self.pool.map(time.sleep, [0.5] * processes)  # every worker imported and idle
        except BaseException:
            self.close()
            raise

    def start(self, prefix: str, rate: float, count: int) -> AsyncResult[Any]:
        n = self.processes
        per, start_at = DEVICES // n, time.monotonic() + 0.3
        jobs = [
            Job(self.url, prefix, i * per, per, rate / n, count // n + (i < count % n), start_at)
            for i in range(n)
        ]
        return self.pool.map_async(publish_slice, jobs)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class SubConsumer:
    """``mosquitto_sub -q 1 -c``: counts lines on a reader thread, with the time of the last."""

    name = "mosquitto_sub"

    def __init__(self, broker: Mosquitto, prefix: str) -> None:
        command = f"-h {broker.host} -p {broker.port} -q 1 -c -i bench-{prefix} -t {prefix}/#"
        self.process = subprocess.Popen(
            [find_binary("mosquitto_sub"), *command.split()],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.state = (0, time.monotonic())
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.base = self._wait_subscribed(broker.url, prefix)
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd, lines = self.process.stdout.fileno(), 0
        while chunk := os.read(fd, 1 << 16):
            lines += chunk.count(b"\n")
            self.state = (lines, time.monotonic())

    def _wait_subscribed(self, url: str, prefix: str) -> int:
        """Publish a probe until one arrives: from then on, nothing published is missed."""
        deadline = time.monotonic() + 15
        while self.state[0] == 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("mosquitto_sub did not receive its probe message")
            Fleet(url, devices=1, prefix=f"{prefix}/probe").run(rate=100, count=1)
            time.sleep(0.1)
        time.sleep(0.3)  # any later probe lands too
        return self.state[0]

    def progress(self) -> tuple[int, float]:
        lines, at = self.state
        return lines - self.base, at

    def close(self) -> dict[str, Any]:
        self.process.kill()
        self.process.wait()
        return {}


def warm_series(vm: VictoriaMetrics, farm: str) -> None:
    """Create the fleet's series in VictoriaMetrics, as a fleet that has been reporting for a
    while would have: a first write of 10,000 new devices costs VM ~15x a warm one here."""
    stamp = time.time_ns() - WARM_AGE * 10**9
    fields = "seq=-1,ph=0,ec=0,water_temp=0,air_temp=0,humidity=0"
    vm.write(
        "\n".join(
            f"reservoir,device=esp32-{d:05d},farm={farm},site=site{d % SITES + 1} {fields} {stamp}"
            for d in range(DEVICES)
        )
    )


class DaemonConsumer:
    """``ingestd run`` as a subprocess; progress is its count of readings the TSDB accepted."""

    def __init__(
        self, broker: Mosquitto, vm: VictoriaMetrics, prefix: str, work: Path, quotas: bool = False
    ) -> None:
        # With quotas, every message is checked against a per-device rule that no device
        # exceeds: the cost of the check, not of dropping.
        self.name = "ingestd+quotas" if quotas else "ingestd"
        rules = [
            {"name": "bench", "topic": f"{prefix}/+/{{device}}/#", "rate": 1000, "burst": 1000}
        ]
        config = daemon_config(
            work / prefix,
            broker.url,
            prefix,
            {"url": vm.url, "batch_size": 5000, "flush_interval": "200ms"},
            mqtt={"receive_maximum": 10000},
            logging={"level": "warning"},
            quotas={"rules": rules if quotas else []},
        )
        self.vm, self.prefix = vm, prefix
        warm_series(vm, prefix)
        self.since = time.time()
        self.daemon = DaemonProcess(work / prefix, config)
        try:
            self.daemon.start()
        except BaseException:
            self.daemon.close()
            raise
        assert self.daemon.process is not None
        self.pid = self.daemon.process.pid
        self.rss_start = self.memory()["VmRSS"]
        self.rss_peak = self.rss_start
        self.state = (0, time.monotonic())

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in bytes, from /proc/<pid>/status."""
        values = {"VmRSS": 0, "VmHWM": 0}  # once it has exited
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def progress(self) -> tuple[int, float]:
        assert self.daemon.process is not None
        if self.daemon.process.poll() is not None:
            code = self.daemon.process.returncode
            raise RuntimeError(f"ingestd exited ({code}) during the run:\n{self.daemon.log()}")
        self.rss_peak = max(self.rss_peak, self.memory()["VmRSS"])
        with contextlib.suppress(OSError):
            written = int(self.daemon.metric("ingestd_points_written_total"))
            if written != self.state[0]:
                self.state = (written, time.monotonic())
        return self.state

    def stored(self, expected: int, timeout: float = 20) -> tuple[int, int]:
        """(samples, distinct device+seq) of this run's readings that VictoriaMetrics holds."""
        deadline = time.monotonic() + timeout
        while True:
            self.vm.flush()
            total = self._query("count_over_time")
            distinct = self._query("distinct_over_time")
            if total >= expected or time.monotonic() > deadline:
                return total, distinct
            time.sleep(0.2)

    def _query(self, function: str) -> int:
        window = round(time.time() - self.since) + 60  # this run's readings, not the warm-up
        assert window < WARM_AGE, "the run outlasted the warm-up's age"
        selector = f'reservoir_seq{{farm="{self.prefix}"}}[{window}s]'
        query = urllib.parse.urlencode(
            # nocache and a time just ahead of now, or VM answers from before the newest rows.
            {"query": f"sum({function}({selector}))", "time": time.time() + 1, "nocache": 1}
        )
        response = http_request("GET", f"{self.vm.url}/api/v1/query?{query}")
        result = response.json()["data"]["result"]
        return int(float(result[0]["value"][1])) if result else 0

    def close(self) -> dict[str, Any]:
        """Stop (SIGTERM, as systemd would) and report what the daemon said about the run."""
        info: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            samples = self.daemon.metrics()
            info["metrics"] = {
                k: v for k, v in samples.items() if k.startswith("ingestd_") and "_bucket" not in k
            }
        memory = self.memory()
        info |= {
            "rss_start_mib": self.rss_start / MIB,
            "rss_peak_mib": max(self.rss_peak, memory["VmRSS"]) / MIB,
            "hwm_mib": memory["VmHWM"] / MIB,
            "rss_final_mib": memory["VmRSS"] / MIB,
        }
        started = time.monotonic()
        try:
            info["exit_code"] = self.daemon.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            info["exit_code"] = "killed after 30 s"
        finally:
            self.daemon.close()
        info["stop_seconds"] = round(time.monotonic() - started, 2)
        lines = self.daemon.log_path.read_text(errors="replace").splitlines()
        info["log_lines"] = len(lines)  # logging.level is warning: every line is a problem
        info["log_sample"] = lines[:5] + (["...", *lines[-3:]] if len(lines) > 8 else lines[5:])
        return info


Consumer = SubConsumer | DaemonConsumer


def measure(
    publisher: Publisher, consumer: Consumer, *, prefix: str, rate: float, count: int, grace: float
) -> dict[str, Any]:
    """Publish ``count`` messages at ``rate`` and wait (at most ``grace`` after the last
    broker ack) until the consumer has them all."""
    pending = publisher.start(prefix, rate, count)
    done: float | None = None
    published_end = None
    while True:
        received, at = consumer.progress()
        if received >= count and done is None:
            done = at
        if pending.ready():
            if published_end is None:
                results = pending.get()  # re-raises a publisher's error
                published_end = max(end for _, _, end in results)
            if done is not None or time.monotonic() > published_end + grace:
                break
        time.sleep(0.05)
    published = sum(sent for sent, _, _ in results)
    first = min(start for _, start, _ in results)
    seconds = (done if done is not None else at) - first
    return {
        "consumer": consumer.name,
        "offered_rate": rate,
        "published": published,
        "publish_seconds": round(published_end - first, 3),
        "publisher_rate": round(published / (published_end - first)),
        "received": received,
        "seconds": round(seconds, 3),
        "achieved_rate": round(received / seconds) if seconds > 0 else 0,
        "complete_within_grace": done is not None,
    }


def throughput_step(
    publisher: Publisher,
    make: Callable[[str], Consumer],
    *,
    prefix: str,
    rate: float,
    seconds: float,
    grace: float,
) -> dict[str, Any]:
    consumer = make(prefix)
    try:
        step = measure(
            publisher, consumer, prefix=prefix, rate=rate, count=round(rate * seconds), grace=grace
        )
        if isinstance(consumer, DaemonConsumer):
            stored, distinct = consumer.stored(step["published"])
            step |= {"ingestd_written": step["received"], "received": distinct}
            step |= {"stored_samples": stored, "duplicates": stored - distinct}
    finally:
        step_info = consumer.close()
    step["lost"] = max(0, step["published"] - step["received"])
    step["holds"] = (
        step["complete_within_grace"] and step["lost"] == 0 and step["achieved_rate"] >= HOLD * rate
    )
    return step | step_info


def rss_run(
    publisher: Publisher, consumer: DaemonConsumer, rate: float, count: int
) -> dict[str, Any]:
    try:
        step = measure(
            publisher, consumer, prefix=consumer.prefix, rate=rate, count=count, grace=120
        )
        stored, distinct = consumer.stored(step["published"])
        step |= {"stored_samples": stored, "received": distinct, "duplicates": stored - distinct}
        time.sleep(2)  # let the last batch's buffers go
    finally:
        info = consumer.close()
    step["lost"] = max(0, step["published"] - step["received"])
    step["kept_up"] = step["lost"] == 0 and step["achieved_rate"] >= HOLD * rate
    return step | info


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "python": platform.python_version(),
        "ingestd_version": __version__,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
    }


def summary(report: dict[str, Any]) -> str:
    info, best = report["machine"], report["highest_holding_rate"]
    out = [
        f"## ingestd pipeline benchmark, {report['started']} ({report['mode']})",
        "",
        f"{info['nproc']} x {info['cpu_model']}, Python {info['python']}, "
        f"ingestd {info['ingestd_version']}, load average at start "
        f"{info['loadavg_at_start'][0]:.2f}, at end {report['loadavg_at_end'][0]:.2f}.",
        f"Load: {report['publishers']} publisher processes, {DEVICES:,} devices, QoS 1, JSON "
        "(5 fields + seq). " + SHARED_CPU.format(cpus=info["nproc"]),
        "",
        "| offered msg/s | consumer | published | received/stored | lost | seconds "
        "| achieved msg/s | publisher msg/s | holds |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in report["steps"]:
        out.append(
            f"| {s['offered_rate']:,.0f} | {s['consumer']} | {s['published']:,} "
            f"| {s['received']:,} | {s['lost']:,} | {s['seconds']:.2f} "
            f"| {s['achieved_rate']:,} | {s['publisher_rate']:,} "
            f"| {'yes' if s['holds'] else 'NO'} |"
        )
    sub, ing, quo = best["mosquitto_sub"], best["ingestd"], best.get("ingestd+quotas")
    ratio = f"{ing / sub:.2f}" if sub and ing else "n/a"
    quota_ratio = f"{quo / ing:.2f}" if quo and ing else "n/a"
    out += [
        "",
        "| highest zero-loss rate (msg/s) | mosquitto_sub | ingestd | ingestd / mosquitto_sub "
        "| ingestd+quotas | quotas on / off |",
        "|---|---:|---:|---:|---:|---:|",
        f"| QoS 1, offered rates {report['rates']} | {sub or 'none'} | {ing or 'none'} | {ratio} "
        f"| {quo or 'none'} | {quota_ratio} |",
    ]
    top = max(report["rates"])
    if sub == top:
        out.append(
            f"\nmosquitto_sub held the highest rate offered ({top:,}): the broker's ceiling is"
            " higher, so the ratio is an upper bound"
            + (" (and ingestd's too)." if ing == top else ".")
        )
    short = [s for s in report["steps"] if s["publisher_rate"] < HOLD * s["offered_rate"]]
    for s in short:
        out.append(
            f"\nAt {s['offered_rate']:,.0f} msg/s ({s['consumer']}) the publishers reached only "
            f"{s['publisher_rate']:,} msg/s (they share the cores with the consumer): that rate "
            "was not really offered."
        )
    rss = report.get("rss")
    if rss:
        out += [
            "",
            f"RSS of ingestd, {rss['published']:,} messages from {DEVICES:,} devices at "
            f"{rss['offered_rate']:,.0f} msg/s ({rss['lost']:,} lost, "
            f"{rss['duplicates']:,} duplicates): start {rss['rss_start_mib']:.1f} MiB, "
            f"peak {rss['hwm_mib']:.1f} MiB (VmHWM), final {rss['rss_final_mib']:.1f} MiB.",
            f"Kept up over the {rss['publish_seconds']:.0f} s: "
            f"{'yes' if rss['kept_up'] else 'NO'}, {rss['achieved_rate']:,} msg/s achieved, "
            f"last reading stored {max(0, rss['seconds'] - rss['publish_seconds']):.2f} s "
            "after the publishers' last ack.",
        ]
    for s in [*report["steps"], rss or {}]:
        if s.get("duplicates"):
            out.append(
                f"\nVictoriaMetrics holds {s['duplicates']:,} readings twice from the ingestd run "
                f"at {s['offered_rate']:,.0f} msg/s (a retried write; InfluxDB would overwrite)."
            )
    problems = [s for s in [*report["steps"], rss or {}] if s.get("log_lines")]
    for s in problems:
        out.append(
            f"\ningestd logged {s['log_lines']} warning/error line(s) at "
            f"{s['offered_rate']:,.0f} msg/s, e.g. {s['log_sample'][0][:300]}"
        )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter steps; 200k for RSS")
    parser.add_argument("--rates", help="comma-separated offered rates (msg/s)")
    parser.add_argument("--seconds", type=float, help="publishing time per step")
    parser.add_argument("--publishers", type=int, default=4, help="publisher processes")
    parser.add_argument("--rss-messages", type=int, help="messages for the RSS run")
    parser.add_argument("--rss-rate", type=float, help="default: 60 %% of ingestd's best rate")
    args = parser.parse_args()
    rates = [4000, 7000, 10000, 13000] if args.quick else [2000, 4000, 8000, 12000, 16000, 20000]
    if args.rates:
        rates = [int(r) for r in args.rates.split(",")]
    seconds = args.seconds or (8.0 if args.quick else 15.0)
    grace = 5.0 if args.quick else 10.0
    rss_messages = args.rss_messages or (200_000 if args.quick else 1_000_000)
    # SIGTERM unwinds like Ctrl-C, so every process started below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "note": SHARED_CPU.format(cpus=os.cpu_count()),
        "publishers": args.publishers,
        "devices": DEVICES,
        "rates": rates,
        "step_seconds": seconds,
        "grace_seconds": grace,
        "hold_fraction": HOLD,
        "ingestd_config": {
            "influx.batch_size": 5000,
            "influx.flush_interval": "200ms",
            "mqtt.receive_maximum": 10000,
            "logging.level": "warning",
        },
        "steps": [],
    }
    best: dict[str, float | None] = {"mosquitto_sub": None, "ingestd": None, "ingestd+quotas": None}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Mosquitto(extra_config=BROKER_CONFIG))
        vm = stack.enter_context(VictoriaMetrics())
        work = Path(tempfile.mkdtemp(prefix="ingestd-bench-"))  # spools, on local disk
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        publisher = Publisher(broker.url, args.publishers)
        stack.callback(publisher.close)
        makers: dict[str, Callable[[str], Consumer]] = {
            "mosquitto_sub": lambda prefix: SubConsumer(broker, prefix),
            "ingestd": lambda prefix: DaemonConsumer(broker, vm, prefix, work),
            "ingestd+quotas": lambda prefix: DaemonConsumer(broker, vm, prefix, work, quotas=True),
        }
        for index, rate in enumerate(rates):
            # Consumers alternate at each rate, so both see the same background load;
            # one stops climbing at its first rate that does not hold.
            for name, make in makers.items():
                if best[name] != (rates[index - 1] if index else None):
                    continue
                prefix = f"{name.split('_')[0].replace('+', '')}{index}"
                step = throughput_step(
                    publisher, make, prefix=prefix, rate=rate, seconds=seconds, grace=grace
                )
                report["steps"].append(step)
                print(
                    f"{name:>13} {rate:>7,.0f} msg/s: {step['received']:,}/{step['published']:,}"
                    f" in {step['seconds']:.2f} s = {step['achieved_rate']:,} msg/s,"
                    f" holds: {step['holds']}",
                    file=sys.stderr,
                )
                if step["holds"]:
                    best[name] = rate
        report["highest_holding_rate"] = best
        rss_rate = args.rss_rate or (0.6 * best["ingestd"] if best["ingestd"] else rates[0])
        print(f"RSS run: {rss_messages:,} messages at {rss_rate:,.0f} msg/s", file=sys.stderr)
        consumer = DaemonConsumer(broker, vm, "rss", work)
        report["rss"] = rss_run(publisher, consumer, rss_rate, rss_messages)
    report["loadavg_at_end"] = os.getloadavg()
    report["wall_seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"pipeline-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    print(f"\nRaw numbers: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process the benchmark started is stopped", file=sys.stderr)
        sys.exit(130)
