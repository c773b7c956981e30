"""The benchmark's moving parts: the publisher processes, the consumers under test
(``mosquitto_sub``, ``ingestd run``, the prototype's design) and the measurement of one step.

bench/run.py puts them together into the scenarios (see bench/README.md). Every consumer
reads the same kind of subscription on the same private broker, fed by the same publishers:
``Fleet`` processes (ingestd.simulate) that split the devices, the rate and the count, QoS 1,
JSON readings with 5 fields and ``seq``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from multiprocessing.pool import AsyncResult
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test suite's server launchers

from daemon import DaemonProcess, daemon_config  # noqa: E402
from profiling import Profiler  # noqa: E402
from services import Mosquitto, VictoriaMetrics, find_binary, http_request  # noqa: E402

from ingestd import __version__  # noqa: E402
from ingestd.simulate import Fleet  # noqa: E402

SITES = 10
WARM_AGE = 2 * 3600  # seconds: warm-up samples lie outside every count window
HOLD = 0.95  # achieved / offered for a rate to hold
MIB = 1024 * 1024
BROKER_CONFIG = """\
max_queued_messages 1000000
# The harness autosaves every second; Debian's broker (and mosquitto's default) every 30 min.
autosave_interval 1800
"""
FIELDS = ("ph", "ec", "water_temp", "air_temp", "humidity")  # the simulator's basic fields
PACKAGES = (
    "paho-mqtt",
    "aiomqtt",
    "influxdb-client",
    "orjson",
    "pydantic",
    "apprise",
    "aiohttp",
    "prometheus-client",
    "structlog",
    "matplotlib",
)


# --- load -----------------------------------------------------------------------------------


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
    fleet = Fleet(job.url, devices=job.devices, sites=SITES, prefix=job.prefix, first=job.first)
    started = time.monotonic()
    sent = fleet.run(rate=job.rate, count=job.count)
    return sent, started, time.monotonic()


_IGNORE_SIGINT = (signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


class Publisher:
    """A pool of publisher processes that split the devices, the rate and the count."""

    def __init__(self, url: str, processes: int, devices: int) -> None:
        self.url = url
        self.processes = min(processes, devices)
        self.devices = devices
        context = multiprocessing.get_context("spawn")
        self.pool = context.Pool(self.processes, initializer=signal.signal, initargs=_IGNORE_SIGINT)
        try:
            self.pool.map(time.sleep, [0.5] * self.processes)  # every worker imported and idle
        except BaseException:
            self.close()
            raise

    def start(self, prefix: str, rate: float, count: int) -> AsyncResult[Any]:
        n = self.processes
        per, start_at = self.devices // n, time.monotonic() + 0.3
        jobs = [
            Job(self.url, prefix, i * per, per, rate / n, count // n + (i < count % n), start_at)
            for i in range(n)
        ]
        return self.pool.map_async(publish_slice, jobs)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def warm_series(vm: VictoriaMetrics, farm: str, devices: int) -> None:
    """Create the fleet's series in VictoriaMetrics, as a fleet that has been reporting for a
    while would have: a first write of 10,000 new devices costs VM ~15x a warm one here."""
    stamp = time.time_ns() - WARM_AGE * 10**9
    fields = ",".join(f"{f}=0" for f in ("seq", *FIELDS)).replace("seq=0", "seq=-1")
    vm.write(
        "\n".join(
            f"reservoir,device=esp32-{d:05d},farm={farm},site=site{d % SITES + 1} {fields} {stamp}"
            for d in range(devices)
        )
    )


def count_stored(vm: VictoriaMetrics, farm: str, since: float, function: str) -> int:
    """``count_over_time`` (samples) or ``distinct_over_time`` (distinct device+seq) of the
    readings of ``farm`` that VictoriaMetrics holds, written after ``since`` (epoch s)."""
    window = round(time.time() - since) + 60  # this run's readings, not the warm-up
    assert window < WARM_AGE, "the run outlasted the warm-up's age"
    selector = f'reservoir_seq{{farm="{farm}"}}[{window}s]'
    query = urllib.parse.urlencode(
        # nocache and a time just ahead of now, or VM answers from before the newest rows.
        {"query": f"sum({function}({selector}))", "time": time.time() + 1, "nocache": 1}
    )
    response = http_request("GET", f"{vm.url}/api/v1/query?{query}")
    result = response.json()["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def stored(
    vm: VictoriaMetrics, farm: str, since: float, expected: int, timeout: float = 20
) -> tuple[int, int]:
    """(samples, distinct readings) of ``farm`` in VictoriaMetrics, once ``expected`` are
    there or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        vm.flush()
        total = count_stored(vm, farm, since, "count_over_time")
        distinct = count_stored(vm, farm, since, "distinct_over_time")
        if total >= expected or time.monotonic() > deadline:
            return total, distinct
        time.sleep(0.2)


# --- consumers ------------------------------------------------------------------------------


class Consumer(Protocol):
    name: str
    prefix: str

    def progress(self) -> tuple[int, float]:
        """(messages received or stored so far, CLOCK_MONOTONIC of the last one)."""
        ...

    def close(self) -> dict[str, Any]:
        """Stop; what the consumer said about the run."""
        ...


class SubConsumer:
    """``mosquitto_sub -q 1 -c``: counts lines on a reader thread, with the time of the last."""

    def __init__(self, broker: Mosquitto, prefix: str, name: str = "mosquitto_sub") -> None:
        self.name, self.prefix = name, prefix
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


class PrototypeConsumer:
    """bench/prototype.py (one synchronous influxdb-client write per message) as a
    subprocess; progress is its own count of successful writes."""

    def __init__(
        self,
        broker: Mosquitto,
        vm: VictoriaMetrics,
        prefix: str,
        influx_url: str,
        *,
        name: str,
        devices: int = 10_000,
    ) -> None:
        self.name, self.vm, self.prefix = name, vm, prefix
        warm_series(vm, prefix, devices)  # as for ingestd: VM's cost of new series is not its
        self.since = time.time()
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / "prototype.py"),
                f"--mqtt={broker.url}",
                f"--topic={prefix}/#",
                f"--influx={influx_url}",
                f"--client-id=prototype-{prefix}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=REPO,
        )
        self.state = (0, time.monotonic())
        self.errors: list[str] = []
        self.subscribed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_errors, daemon=True).start()
        if not self.subscribed.wait(20):
            self.close()
            raise RuntimeError(f"the prototype did not subscribe: {self.errors[-5:]}")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(b"subscribed"):
                self.subscribed.set()
            else:
                written, at = line.split()
                self.state = (int(written), float(at))

    def _read_errors(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if len(self.errors) < 1000:
                self.errors.append(line.decode(errors="replace").rstrip())

    def progress(self) -> tuple[int, float]:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the prototype exited ({self.process.returncode}): {self.errors[-5:]}"
            )
        return self.state

    def stored(self, expected: int, timeout: float = 20) -> tuple[int, int]:
        return stored(self.vm, self.prefix, self.since, expected, timeout)

    def close(self) -> dict[str, Any]:
        self.process.kill()
        self.process.wait()
        return {"write_errors": len(self.errors), "error_sample": self.errors[:3]}


@dataclass
class IngestdSetup:
    """What an ``ingestd run`` under test is configured with, besides the harness's own
    (its topic prefix, spool, HTTP port: tests/daemon.py ``daemon_config``)."""

    rules: str | None = None
    """The text of a rule file, or None for no rules."""
    quotas: bool = False
    """A quota rule every device matches and none exceeds: the cost of checking."""
    notify: dict[str, Any] | None = None
    influx_url: str | None = None
    """Where ingestd writes (default: the VictoriaMetrics itself, e.g. a proxy in front)."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings by section, applied last (``--set``)."""

    def config(
        self, work: Path, broker: Mosquitto, vm: VictoriaMetrics, prefix: str
    ) -> dict[str, Any]:
        sections: dict[str, dict[str, Any]] = {
            # The shipped defaults (config/ingestd.yaml) where the harness has test values.
            "mqtt": {"receive_maximum": 1000},
            "spool": {"commit_interval": "5ms"},
            "logging": {"level": "warning"},
        }
        rules = work / "rules"  # empty for no rules (not the default /etc/ingestd/rules)
        rules.mkdir(parents=True, exist_ok=True)
        if self.rules is not None:
            (rules / "bench.yaml").write_text(self.rules)
        sections["rules"] = {"dir": str(rules)}
        if self.quotas:
            quota = {
                "name": "bench",
                "topic": f"{prefix}/+/{{device}}/#",
                "rate": 1000,
                "burst": 1000,
            }
            sections["quotas"] = {"rules": [quota]}
        if self.notify is not None:
            sections["notify"] = self.notify
        influx = {
            "url": self.influx_url or vm.url,
            "batch_size": 5000,
            "flush_interval": "200ms",
            "backoff_max": "30s",
        }
        for section, values in self.overrides.items():
            target = influx if section == "influx" else sections.setdefault(section, {})
            target.update(values)
        return daemon_config(work, broker.url, prefix, influx, **sections)


class DaemonConsumer:
    """``ingestd run`` as a subprocess; progress is its count of readings the TSDB accepted.

    Its RSS is read from /proc every time progress is asked for (peak), and kept as a curve
    (seconds, readings written, RSS) every ``sample_every`` seconds."""

    def __init__(
        self,
        broker: Mosquitto,
        vm: VictoriaMetrics,
        prefix: str,
        work: Path,
        setup: IngestdSetup,
        *,
        name: str = "ingestd",
        devices: int = 10_000,
        sample_every: float = 1.0,
        profile: Path | None = None,
    ) -> None:
        """``profile``: py-spy samples the daemon from ready to close, into that file."""
        self.name = name
        self.vm, self.prefix = vm, prefix
        self.config = setup.config(work / prefix, broker, vm, prefix)
        warm_series(vm, prefix, devices)
        self.since = time.time()
        self.daemon = DaemonProcess(work / prefix, self.config)
        try:
            self.daemon.start()
        except BaseException:
            self.daemon.close()
            raise
        assert self.daemon.process is not None
        self.pid = self.daemon.process.pid
        self.profiler = None if profile is None else Profiler(self.pid, profile)
        self.started = time.monotonic()
        self.rss_start = self.memory()["VmRSS"]
        self.rss_peak = self.rss_start
        self.state = (0, time.monotonic())
        self.sample_every = sample_every
        self.curve: list[tuple[float, int, float]] = [(0.0, 0, round(self.rss_start / MIB, 2))]
        self.lag: list[float] = []
        self.probes: list[Callable[[], int]] = []
        """Counts of readings that probes published beside the load: not the load's."""

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
        rss = self.memory()["VmRSS"]
        self.rss_peak = max(self.rss_peak, rss)
        with contextlib.suppress(OSError):
            samples = self.daemon.metrics()
            # Probe readings written are at most those published: never a premature "done".
            written = int(samples.get("ingestd_points_written_total", 0))
            written -= sum(published() for published in self.probes)
            if written != self.state[0]:
                self.state = (written, time.monotonic())
                # Receipt (group commit) to TSDB-accepted of the newest reading written.
                self.lag.append(samples.get("ingestd_lag_seconds", 0.0))
        elapsed = time.monotonic() - self.started
        if elapsed - self.curve[-1][0] >= self.sample_every:
            self.curve.append((round(elapsed, 2), self.state[0], round(rss / MIB, 2)))
        return self.state

    def stored(self, expected: int, timeout: float = 20) -> tuple[int, int]:
        """(samples, distinct device+seq) of this run's readings that VictoriaMetrics holds."""
        return stored(self.vm, self.prefix, self.since, expected, timeout)

    def close(self) -> dict[str, Any]:
        """Stop (SIGTERM, as systemd would) and report what the daemon said about the run."""
        info: dict[str, Any] = {}
        if self.profiler is not None:
            info["profile"] = self.profiler.stop()
        memory = self.memory()
        with contextlib.suppress(OSError):
            samples = self.daemon.metrics()
            info["metrics"] = {
                k: v
                for k, v in samples.items()
                if k.startswith("ingestd_") and ("_bucket" not in k or k.startswith(_STALLS))
            }
            # The curve ends with everything written, however long since its last sample.
            written = int(samples.get("ingestd_points_written_total", 0))
            written -= sum(published() for published in self.probes)
            elapsed = round(time.monotonic() - self.started, 2)
            self.curve.append((elapsed, written, round(memory["VmRSS"] / MIB, 2)))
        info |= {
            "rss_start_mib": round(self.rss_start / MIB, 2),
            "rss_peak_mib": round(max(self.rss_peak, memory["VmRSS"]) / MIB, 2),
            "hwm_mib": round(memory["VmHWM"] / MIB, 2),
            "rss_final_mib": round(memory["VmRSS"] / MIB, 2),
            "rss_curve": self.curve,  # (seconds since ready, readings written, RSS MiB)
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


_STALLS = ("ingestd_loop_lag_seconds", "ingestd_gc_pause_seconds")
"""Histograms kept whole: where the event loop was held, and how much of it was the GC."""


# --- one step -------------------------------------------------------------------------------


def measure(
    publisher: Publisher,
    consumer: Consumer,
    *,
    rate: float,
    count: int,
    grace: float,
    on_load_done: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Publish ``count`` messages at ``rate`` and wait (at most ``grace`` after the last
    broker ack) until the consumer has them all. ``on_load_done`` is called once the broker
    acknowledged the last message."""
    pending = publisher.start(consumer.prefix, rate, count)
    done: float | None = None
    published_end: float | None = None
    while True:
        received, at = consumer.progress()
        if received >= count and done is None:
            done = at
        if pending.ready():
            if published_end is None:
                published_end = max(end for _, _, end in pending.get())  # re-raises errors
                if on_load_done is not None:
                    on_load_done()
            if done is not None or time.monotonic() > published_end + grace:
                break
        time.sleep(0.05)
    results = pending.get()
    published_end = max(end for _, _, end in results)
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


def run_step(
    publisher: Publisher,
    consumer: Consumer,
    *,
    rate: float,
    count: int,
    grace: float,
    on_load_done: Callable[[], None] | None = None,
    before_close: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One step, then the consumer stopped. A step **holds** its rate when everything was
    received (stored) within the grace, nothing is missing, and the achieved rate is at least
    95 % of the offered one. For a consumer that writes to the TSDB, ``received`` is what
    VictoriaMetrics holds (distinct readings; ``consumer_count`` is the consumer's own).
    ``missing`` is published minus received when the step ended: for ingestd, readings
    still in its spool count there too (a slow step is not a lossy one)."""
    try:
        try:
            step = measure(
                publisher,
                consumer,
                rate=rate,
                count=count,
                grace=grace,
                on_load_done=on_load_done,
            )
        finally:
            if before_close is not None:
                before_close()  # e.g. probes that use the consumer
        if isinstance(consumer, DaemonConsumer | PrototypeConsumer):
            # ingestd's count includes readings of probes, the prototype's only what it took.
            expected = min(step["published"], step["received"])
            timeout = 20 if step["complete_within_grace"] else 2  # a failed step stays failed
            total, distinct = consumer.stored(expected, timeout)
            step |= {"consumer_count": step["received"], "received": distinct}
            # Counted while a failed step's readings still arrive, the two would not match.
            duplicates = total - distinct if step["complete_within_grace"] else None
            step |= {"stored_samples": total, "duplicates": duplicates}
    finally:
        info = consumer.close()
    step["missing"] = max(0, step["published"] - step["received"])
    step["holds"] = bool(
        step["complete_within_grace"]
        and step["missing"] == 0
        and step["achieved_rate"] >= HOLD * rate
    )
    return step | info


# --- the machine ----------------------------------------------------------------------------


def _command_output(*command: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total = next((int(line.split()[1]) for line in meminfo if line.startswith("MemTotal")), 0)
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "cores": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "memory_mib": round(total / 1024),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "ingestd": __version__,
        "packages": packages,
        "mosquitto": _command_output(find_binary("mosquitto"), "-h").removeprefix(
            "mosquitto version "
        ),
        "victoria_metrics": _command_output(
            "dpkg-query", "-W", "-f=${Version}", "victoria-metrics"
        ),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.partition("=")[2].strip('"')
    return platform.system()
