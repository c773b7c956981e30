"""Run ``ingestd run`` as a real process against the fixtures' servers, and read it back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from services import VictoriaMetrics, free_port, http_request

REPO = Path(__file__).resolve().parent.parent


def daemon_config(
    tmp: Path,
    mqtt_url: str,
    prefix: str,
    influx: dict[str, Any],
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A config for one test: its own topic prefix (a ``farm`` tag), spool and port."""
    config: dict[str, Any] = {
        "mqtt": {
            "url": mqtt_url,
            "client_id": f"ingestd-{prefix}-{tmp.name}",
            "reconnect_min": "100ms",
            "reconnect_max": "1s",
            "subscriptions": [
                {
                    "template": "{farm}/{site}/{device}/{measurement}",
                    "topic": f"{prefix}/+/+/+",
                }
            ],
        },
        "influx": {
            "batch_size": 2000,
            "flush_interval": "50ms",
            "backoff_max": "500ms",
            "timeout": "10s",
            **influx,
        },
        "spool": {"dir": str(tmp / "spool"), "commit_interval": "2ms", "shutdown_grace": "10s"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "logging": {"level": "info", "format": "json", "stats_interval": 0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


class DaemonProcess:
    """``ingestd run`` in a subprocess; its log goes to a file beside its spool."""

    command: tuple[str, ...] = (sys.executable, "-m", "ingestd")
    """What runs ingestd's command line (a fault test runs a wrapper that injects one)."""

    def __init__(
        self, tmp: Path, config: dict[str, Any], preexec_fn: Callable[[], None] | None = None
    ) -> None:
        """``preexec_fn`` runs in the child before ``ingestd run`` starts (e.g. to set its
        resource limits)."""
        tmp.mkdir(parents=True, exist_ok=True)
        self.preexec_fn = preexec_fn
        self.config = config
        self.config_path = tmp / "ingestd.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "ingestd.log"
        self.http = f"http://{config['http']['listen']}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.command, "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                preexec_fn=self.preexec_fn,  # noqa: PLW1509 - tests pass setrlimit only: no locks
            )
        if wait_ready:
            self.wait(
                lambda: http_request("GET", self.http + "/readyz").status == 200,
                "ready (subscribed, spool open)",
            )
        return self

    def wait(self, condition: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"ingestd exited ({self.process.returncode}):\n{self.log()}")
            try:
                if condition():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ingestd not {what} within {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """/metrics samples by name and labels: ``ingestd_messages_rejected_total{reason="x"}``."""
        body = http_request("GET", self.http + "/metrics").text
        samples: dict[str, float] = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def health(self) -> tuple[int, dict[str, Any]]:
        response = http_request("GET", self.http + "/healthz")
        return response.status, response.json()

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def seqs_in_victoria(
    vm: VictoriaMetrics, farm: str, expected: int, timeout: float = 60
) -> dict[tuple[str, float], list[int]]:
    """(device, seq) -> the timestamps of its points, once ``expected`` points are there.

    VictoriaMetrics keeps every raw sample, even one with the timestamp of an earlier one,
    where InfluxDB overwrites: a replayed reading shows here as a repeated timestamp.
    """
    match = f'reservoir_seq{{farm="{farm}"}}'

    def count(series: list[dict[str, Any]]) -> int:
        return sum(len(s["values"]) for s in series)

    vm.export_until(match, lambda s: count(s) >= expected, timeout=timeout)
    time.sleep(1.5)  # anything more (a duplicate) would show by now
    found: dict[tuple[str, float], list[int]] = {}
    for s in vm.export_until(match, bool):
        for value, stamp in zip(s["values"], s["timestamps"], strict=True):
            found.setdefault((s["metric"]["device"], value), []).append(stamp)
    return found


def expected_keys(devices: int, per_device: int) -> set[tuple[str, float]]:
    return {(f"esp32-{d:05d}", float(n)) for d in range(devices) for n in range(per_device)}
