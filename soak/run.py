"""The soak: ingestd under a steady simulated farm while its neighbours fail, then proof that
nothing was lost.

    .venv/bin/python soak/run.py --duration 10m          (make soak DURATION=10m)

Starts a private Mosquitto and VictoriaMetrics (the test suite's launchers), ``ingestd run``
with the example rules (rules/*.yaml) and one notification route to a flaky local HTTP
endpoint through real Apprise (``json://``), and ``ingestd simulate --anomalies high`` (with
a seed whose anomalies alarm from the start, unless ``--seed``). While
it runs: VictoriaMetrics is restarted every ``--tsdb-every``, the broker once, half way; the
endpoint fails every third request and lets every eleventh time out. At the end it checks:

- every reading sent is stored: each device's ``seq`` values in VictoriaMetrics are 0..n-1,
  as many in all as the simulator sent, none stored under two timestamps;
- every alert transition that should notify was notified: the alert events the daemon
  published on MQTT (``notify: true``) against what the endpoint received, no more no less;
- RSS and open file descriptors are flat (sampled from /proc every ``--sample-every``);
- the spool is back to empty, and ingestd stops cleanly (exit 0).

It prints a summary and writes every figure, the samples included, to a JSON file
(``soak/results/soak-<UTC time>.json`` unless ``--out``); the exit code is 0 when every
check passed. tests/test_soak.py runs a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from daemon import DaemonProcess, daemon_config  # noqa: E402
from services import Mosquitto, VictoriaMetrics, free_port  # noqa: E402

from ingestd.config import parse_duration  # noqa: E402
from ingestd.simulate import FIELDS, Fleet  # noqa: E402

# One line per alert event: what the comparison with the MQTT events needs, exactly.
BODY = "{% for e in events %}{{ e.id }} {{ e.kind }} {{ '%.6f' | format(e.at) }}\n{% endfor %}"


@dataclass(frozen=True)
class Plan:
    duration: float
    devices: int
    rate: float
    seed: int
    shift: float
    """Seconds the simulated fleet's model runs ahead of the clock (``choose_seed``)."""
    tsdb_every: float
    broker_at: float
    """Seconds into the run when the broker is restarted."""
    sample_every: float
    settle: float
    """Longest wait, after the simulator stops, for the spool and the outbox to empty."""


# --- a flaky notification channel ---------------------------------------------------------


class FlakyHook:
    """An HTTP endpoint for Apprise ``json://`` that answers 500 to every ``fail_every``-th
    request and holds every ``hang_every``-th one for ``hang`` seconds (past the daemon's call
    timeout). A message counts as delivered only when answered 200 to a client still waiting."""

    def __init__(self, fail_every: int = 3, hang_every: int = 11, hang: float = 3.0) -> None:
        self.port = free_port()
        self.fail_every, self.hang_every, self.hang = fail_every, hang_every, hang
        self.requests = 0
        self.failed = 0
        self.hung = 0
        self.delivered: list[str] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="flaky-hook", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the notification endpoint did not start")

    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        if self._runner is not None:
            self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        with self._lock:
            self.requests += 1
            n = self.requests
        if n % self.hang_every == 0:
            with self._lock:
                self.hung += 1
            await asyncio.sleep(self.hang)
        if n % self.fail_every == 0:
            with self._lock:
                self.failed += 1
            return web.json_response({"ok": False}, status=500)
        waiting = request.transport is not None and not request.transport.is_closing()
        if waiting:
            with self._lock:
                self.delivered.append(str(body.get("message", "")))
        return web.json_response({"ok": True})

    def lines(self) -> list[str]:
        with self._lock:
            return [line for message in self.delivered for line in message.splitlines() if line]

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --- what the daemon says on MQTT ----------------------------------------------------------


class AlertWatcher:
    """Every alert event published under alerts/#, through broker restarts: a persistent
    MQTT 5 session (the broker keeps it and queues for it while the watcher is away)."""

    def __init__(self, broker: Mosquitto, client_id: str) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 86400
        self.client.connect(broker.host, broker.port, clean_start=False, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the alert watcher could not subscribe")

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        client.subscribe("alerts/#", qos=1)
        self._subscribed.set()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        if not msg.payload or topic.startswith(("alerts/state/", "alerts/ack/")):
            return
        with self._lock:
            self.events.append(orjson.loads(msg.payload))

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# --- sampling /proc ------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    """Seconds since the simulator started."""
    rss_mib: float
    fds: int
    received: float
    written: float
    spool: float
    pending_notifications: float


class Sampler:
    def __init__(self, daemon: DaemonProcess, every: float) -> None:
        self.daemon, self.every = daemon, every
        self.samples: list[Sample] = []
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def begin(self) -> None:
        self.start = time.monotonic()
        self._thread.start()

    def take(self) -> Sample | None:
        process = self.daemon.process
        if process is None or process.poll() is not None:
            return None
        pid = process.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            metrics = self.daemon.metrics()
        except OSError:
            return None
        rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
        pending = sum(v for k, v in metrics.items() if "notifications_pending" in k)
        sample = Sample(
            round(time.monotonic() - self.start, 2),
            round(rss / 1024, 2),
            fds,
            metrics.get("ingestd_messages_received_total", 0.0),
            metrics.get("ingestd_points_written_total", 0.0),
            metrics.get("ingestd_spool_records", 0.0),
            pending,
        )
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.take()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.every + 10)


# --- a fleet that alarms at once ----------------------------------------------------------


def alarming(devices: int, seed: int, start: float, horizon: float) -> int:
    """How many devices of the simulated fleet (``seed``) hold a pH or a reservoir level past
    a critical threshold of the example rules (``for: 1m``) from ``start`` to ``start +
    horizon``, by the simulator's own model: their alerts fire, and notify, within minutes."""
    fleet = Fleet(devices=devices, sites=2, fields=FIELDS, anomalies="high")
    count = 0
    for model in fleet.models(seed):
        moments = (start, start + horizon / 2, start + horizon)
        if any(model.silent(t) for t in moments):
            continue
        values = [model.reading(t) for t in moments]
        ph = [v.get("ph", 6.0) for v in values]  # a lost probe sends no pH
        level = [v.get("level", 50.0) for v in values]
        # margins past the thresholds (7.2, 5.0, 10) for the noise
        count += min(ph) > 7.3 or max(ph) < 4.9 or max(level) < 9
    return count


def choose_seed(devices: int, start: float, horizon: float, want: int = 4) -> tuple[int, float]:
    """The first seed from 1 whose fleet has ``want`` devices alarming from ``start``, and the
    shift of the fleet's model clock that gives them: anomalies follow the clock in 4-hour
    slots and start some way into one, so just after a slot began no seed has any (a soak
    run at 08:10 UTC found none among 5,000); an hour or more back, some do."""
    for shift in (0.0, -3600.0, -7200.0, -10800.0):
        for seed in range(1, 201):
            if alarming(devices, seed, start + shift, horizon) >= want:
                return seed, shift
    raise RuntimeError(f"no seed gives {want} alarming devices among {devices}")


# --- the run -------------------------------------------------------------------------------


@dataclass
class Chaos:
    tsdb_restarts: list[float] = field(default_factory=list)
    broker_restarts: list[float] = field(default_factory=list)


def _wait(condition: Any, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if condition():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(every)


def _simulate(plan: Plan, broker: Mosquitto, prefix: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    command = [
        sys.executable, "-m", "ingestd", "simulate",
        "--url", broker.url,
        "--devices", str(plan.devices),
        "--sites", "2",
        "--prefix", prefix,
        "--rate", str(plan.rate),
        "--duration", str(plan.duration),
        "--anomalies", "high",
        "--seed", str(plan.seed),
        "--model-shift", str(plan.shift),
        "--processes", "1",
        "--json",
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )


def _seqs(vm: VictoriaMetrics, prefix: str, expected: int, timeout: float) -> dict[str, Any]:
    """Every (device, seq) VictoriaMetrics holds, with the timestamps of each."""
    match = f'reservoir_seq{{farm="{prefix}"}}'

    def distinct(series: list[dict[str, Any]]) -> int:
        return sum(len(set(s["values"])) for s in series)

    with contextlib.suppress(AssertionError):  # judged below, with what is there
        vm.export_until(match, lambda s: distinct(s) >= expected, timeout=timeout)
    time.sleep(2)  # anything more (a duplicate) shows by now
    vm.flush()
    stamps: dict[tuple[str, int], set[int]] = {}
    for s in vm.export(match):
        device = s["metric"]["device"]
        for value, stamp in zip(s["values"], s["timestamps"], strict=True):
            stamps.setdefault((device, int(value)), set()).add(stamp)
    per_device: dict[str, list[int]] = {}
    for device, seq in stamps:
        per_device.setdefault(device, []).append(seq)
    gaps = {
        device: sorted(set(range(max(seqs) + 1)) - set(seqs))[:10]
        for device, seqs in per_device.items()
        if len(seqs) != max(seqs) + 1
    }
    return {
        "stored": len(stamps),
        "devices": len(per_device),
        "gaps": gaps,
        "two_timestamps": sorted(f"{d}:{q}" for (d, q), ts in stamps.items() if len(ts) > 1)[:20],
    }


def _flatness(samples: list[Sample], warmup: float) -> dict[str, Any]:
    """RSS: median of the last quarter of the run against the median of the quarter right
    after the warm-up; fds: at the end (after the drain) against that same early quarter."""
    warm = [s for s in samples if s.at >= warmup]
    if len(warm) < 4:
        return {"samples": len(warm), "rss_flat": False, "fds_flat": False}
    quarter = max(1, len(warm) // 4)
    early, late = warm[:quarter], warm[-quarter:]
    rss_early = statistics.median(s.rss_mib for s in early)
    rss_late = statistics.median(s.rss_mib for s in late)
    fds_early = max(s.fds for s in early)
    growth = rss_late - rss_early
    allowed = max(16.0, 0.10 * rss_early)
    return {
        "samples": len(warm),
        "rss_early_mib": round(rss_early, 1),
        "rss_late_mib": round(rss_late, 1),
        "rss_growth_mib": round(growth, 1),
        "rss_allowed_growth_mib": round(allowed, 1),
        "rss_max_mib": max(s.rss_mib for s in samples),
        "rss_flat": growth <= allowed,
        "fds_early": fds_early,
        "fds_end": samples[-1].fds,
        "fds_max": max(s.fds for s in samples),
        "fds_flat": samples[-1].fds <= fds_early + 4,
    }


def run(plan: Plan, workdir: Path) -> dict[str, Any]:
    prefix = f"soak{plan.seed}"
    broker = Mosquitto().start()
    vm = VictoriaMetrics().start()
    hook = FlakyHook()
    rules = workdir / "rules"
    rules.mkdir()
    for path in (REPO / "rules").glob("*.yaml"):
        shutil.copy(path, rules)
    notify = {
        "retry_min": "200ms",
        "retry_max": "2s",
        "call_timeout": "2s",
        "breaker_failures": 5,
        "breaker_cooldown": "2s",
        "channels": {"hook": hook.url()},
        "routes": [{"name": "ops", "channels": ["hook"], "group_window": "0s", "body": BODY}],
    }
    config = daemon_config(
        workdir / "ingestd",
        broker.url,
        prefix,
        {"url": vm.url},
        rules={"dir": str(rules), "watch_interval": "2s"},
        notify=notify,
    )
    daemon = DaemonProcess(workdir / "ingestd", config)
    watcher: AlertWatcher | None = None
    simulator: subprocess.Popen[bytes] | None = None
    chaos = Chaos()
    result: dict[str, Any] = {"plan": asdict(plan), "prefix": prefix}
    try:
        daemon.start()
        watcher = AlertWatcher(broker, f"soak-watcher-{prefix}")
        sampler = Sampler(daemon, plan.sample_every)
        started = time.time()
        simulator = _simulate(plan, broker, prefix)
        sampler.begin()
        next_tsdb = plan.tsdb_every
        broker_done = False
        while simulator.poll() is None:
            elapsed = time.monotonic() - sampler.start
            if elapsed >= next_tsdb and elapsed < plan.duration - 5:
                vm.restart()
                chaos.tsdb_restarts.append(round(elapsed, 1))
                next_tsdb += plan.tsdb_every
            if not broker_done and elapsed >= plan.broker_at:
                broker.restart()
                chaos.broker_restarts.append(round(elapsed, 1))
                broker_done = True
            if daemon.process is not None and daemon.process.poll() is not None:
                raise RuntimeError(f"ingestd exited ({daemon.process.returncode})")
            time.sleep(0.5)
        out, err = simulator.communicate()
        if simulator.returncode != 0:
            raise RuntimeError(f"the simulator failed ({simulator.returncode}): {err.decode()}")
        report = json.loads(out)
        sent = int(report["messages"])
        ran = time.monotonic() - sampler.start

        # Drain: every message in, the spool empty, every notification out.
        drained = _wait(
            lambda: (
                daemon.metric("ingestd_messages_received_total") >= sent
                and daemon.metric("ingestd_spool_records") == 0
            ),
            plan.settle,
        )
        readings = _seqs(vm, prefix, sent, timeout=plan.settle)

        def notifying() -> set[tuple[str, str, str]]:
            return {
                (e["id"], e["kind"], f"{e['at']:.6f}") for e in watcher.snapshot() if e["notify"]
            }

        def delivered() -> set[tuple[str, str, str]]:
            return {tuple(line.split(" ", 2)) for line in hook.lines()}  # type: ignore[misc]

        def outbox_empty() -> bool:
            metrics = daemon.metrics()
            pending = sum(v for k, v in metrics.items() if "notifications_pending" in k)
            return pending == 0 and notifying() <= delivered()

        notified = _wait(outbox_empty, plan.settle)
        spool_records = daemon.metric("ingestd_spool_records")
        sampler.stop()
        sampler.take()  # after the drain: fds and RSS at rest
        events = watcher.snapshot()
        expected, got = notifying(), delivered()
        lines = hook.lines()
        exit_code = daemon.terminate(timeout=60)
        spool_bytes = sum(
            p.stat().st_size for p in Path(config["spool"]["dir"]).rglob("*") if p.is_file()
        )

        flat = _flatness(sampler.samples, warmup=max(20.0, 0.2 * plan.duration))
        result.update(
            {
                "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "seconds": round(ran, 1),
                "chaos": asdict(chaos),
                "simulator": {
                    "messages": sent,
                    "rate": round(sent / ran, 1) if ran else 0.0,
                    "anomalies": Counter(a["kind"] for a in report.get("anomalies", [])),
                },
                "readings": {**readings, "sent": sent, "drained": drained},
                "alerts": {
                    "events": len(events),
                    "by_kind": Counter(e["kind"] for e in events),
                    "should_notify": len(expected),
                    "notified": len(expected & got),
                    "missing": sorted(" ".join(x) for x in expected - got)[:20],
                    "unexpected": sorted(" ".join(x) for x in got - expected)[:20],
                    "duplicate_deliveries": len(lines) - len(set(lines)),
                    "endpoint_requests": hook.requests,
                    "endpoint_failed": hook.failed,
                    "endpoint_hung": hook.hung,
                    "drained": notified,
                },
                "memory": flat,
                "spool": {"records_at_end": spool_records, "bytes_on_disk": spool_bytes},
                "exit_code": exit_code,
                "samples": [asdict(s) for s in sampler.samples],
            }
        )
        result["checks"] = {
            "every_reading_stored": readings["stored"] == sent
            and not readings["gaps"]
            and not readings["two_timestamps"],
            "every_transition_notified": bool(expected) and expected == got,
            "channel_was_flaky": hook.failed > 0,
            "tsdb_restarted": len(chaos.tsdb_restarts) >= 1,
            "broker_restarted": len(chaos.broker_restarts) == 1,
            "rss_flat": flat["rss_flat"],
            "fds_flat": flat["fds_flat"],
            "spool_empty": spool_records == 0,
            "clean_exit": exit_code == 0,
        }
        result["passed"] = all(result["checks"].values())
        if not result["passed"]:
            result["daemon_log"] = daemon.log()
        return result
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.kill()
            simulator.wait()
        if watcher is not None:
            watcher.close()
        daemon.close()
        hook.close()
        vm.close()
        broker.close()


def summary(result: dict[str, Any]) -> str:
    r, a, m = result["readings"], result["alerts"], result["memory"]
    checks = result["checks"]
    lines = [
        f"soak: {result['seconds']:.0f} s, {result['plan']['devices']} devices, "
        f"{result['simulator']['messages']} messages ({result['simulator']['rate']} msg/s), "
        f"VictoriaMetrics restarted at {result['chaos']['tsdb_restarts']} s, "
        f"broker at {result['chaos']['broker_restarts']} s",
        f"  readings: {r['stored']} of {r['sent']} stored, lost {r['sent'] - r['stored']}, "
        f"gaps in {len(r['gaps'])} devices, {len(r['two_timestamps'])} under two timestamps",
        f"  alerts: {a['events']} events {dict(a['by_kind'])}; {a['notified']} of "
        f"{a['should_notify']} notifiable transitions notified, {len(a['unexpected'])} "
        f"unexpected, {a['duplicate_deliveries']} delivered twice; endpoint: "
        f"{a['endpoint_requests']} requests, {a['endpoint_failed']} failed, "
        f"{a['endpoint_hung']} held past the timeout",
        f"  memory: RSS {m.get('rss_early_mib')} -> {m.get('rss_late_mib')} MiB "
        f"(+{m.get('rss_growth_mib')}, allowed {m.get('rss_allowed_growth_mib')}), max "
        f"{m.get('rss_max_mib')}; fds {m.get('fds_early')} -> {m.get('fds_end')} "
        f"(max {m.get('fds_max')})",
        f"  spool at the end: {result['spool']['records_at_end']:.0f} readings; "
        f"ingestd exit code {result['exit_code']}",
        "  checks: "
        + ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in checks.items()),
        f"soak {'PASSED' if result['passed'] else 'FAILED'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", default="10m", help="how long the simulator runs (10m)")
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--rate", type=float, default=150.0, help="messages/s in all")
    parser.add_argument(
        "--seed", type=int, help="the simulator's seed (default: one whose anomalies alarm at once)"
    )
    parser.add_argument("--tsdb-every", default=None, help="restart VictoriaMetrics this often")
    parser.add_argument("--sample-every", default=None, help="sample RSS and fds this often")
    parser.add_argument("--out", type=Path, help="the JSON result (soak/results/...)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    duration = parse_duration(args.duration)
    if duration < 30:
        parser.error("--duration: at least 30s")
    tsdb_every = (
        parse_duration(args.tsdb_every) if args.tsdb_every else min(180.0, max(20.0, duration / 4))
    )
    sample_every = (
        parse_duration(args.sample_every) if args.sample_every else max(1.0, duration / 600)
    )
    seed, shift = args.seed, 0.0
    if seed is None:
        seed, shift = choose_seed(args.devices, time.time() + 10, min(duration, 120.0))
    plan = Plan(
        duration=duration,
        devices=args.devices,
        rate=args.rate,
        seed=seed,
        shift=shift,
        tsdb_every=tsdb_every,
        broker_at=duration / 2,
        sample_every=sample_every,
        settle=max(120.0, duration / 10),
    )
    workdir = Path(tempfile.mkdtemp(prefix="ingestd-soak-"))
    try:
        result = run(plan, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out = args.out or REPO / "soak" / "results" / (
        f"soak-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(summary(result))
    print(f"result: {out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
