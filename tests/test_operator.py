"""Operator tools end to end: ``ingestd status`` against a running daemon (healthy, then with
its TSDB down) and ``ingestd tail`` following real alert events through Mosquitto."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import orjson
from conftest import ServiceFactory
from daemon import REPO, DaemonProcess, daemon_config, expected_keys, seqs_in_victoria
from services import Mosquitto, VictoriaMetrics, free_port
from test_alerts_e2e import Watcher, reading, wait_for, write_rules

from ingestd.simulate import Fleet

ESC = "\x1b["


def start(tmp: Path, broker: Mosquitto, tsdb: VictoriaMetrics, prefix: str) -> DaemonProcess:
    write_rules(tmp, prefix)
    config = daemon_config(
        tmp,
        broker.url,
        prefix,
        {"url": tsdb.url},
        rules={"dir": str(tmp / "rules"), "watch_interval": "200ms"},
    )
    return DaemonProcess(tmp, config).start()


def ingestd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
        check=False,
    )


def test_status_of_a_healthy_daemon_shows_the_key_lines_and_exits_0(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"s{unique}"
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "dev1", ph=7.5, ec=1.8)  # fires ph_high
        wait_for(lambda: watcher.events("firing"), "the firing event")
        wait_for(lambda: daemon.metric("ingestd_points_written_total") >= 1, "a point written")
        wait_for(lambda: daemon.metric('ingestd_alerts{state="firing"}') == 1, "alerts gauge")

        result = ingestd("status", "--config", str(daemon.config_path))
        out = result.stdout
        assert result.returncode == 0, out + result.stderr
        assert ": OK (ready)" in out
        for component in ("mqtt", "spool", "tsdb"):
            assert any(line.split()[:2] == [component, "ok"] for line in out.splitlines()), (
                f"{component} not ok in:\n{out}"
            )
        assert "messages received  " in out and "/s (total 1)" in out
        assert "points written     " in out
        assert "spool: 0 readings waiting" in out and "not full" in out
        assert "sink: lag " in out and "write errors 0" in out
        assert "mqtt: connected, 0 reconnects" in out
        assert "alerts: 1 firing, 0 acknowledged, 0 pending (2 rules loaded)" in out
        assert "quota: 0 messages dropped" in out
        assert ESC not in out, "colour codes when stdout is not a terminal"
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_status_names_the_tsdb_problem_and_exits_1_when_the_tsdb_is_down(
    tmp_path: Path, mosquitto: Mosquitto, services: ServiceFactory, unique: str
) -> None:
    prefix = f"d{unique}"
    tsdb = services.victoria_metrics()
    daemon = start(tmp_path, mosquitto, tsdb, prefix)
    watcher = Watcher(mosquitto)
    try:
        tsdb.stop()
        reading(watcher, prefix, "dev1", ph=6.5, ec=1.8)
        daemon.wait(lambda: daemon.health()[0] == 503, "degraded by the stopped TSDB")

        result = ingestd("status", "--config", str(daemon.config_path))
        out = result.stdout
        assert result.returncode == 1, out + result.stderr
        assert ": DEGRADED" in out
        tsdb_line = next(line for line in out.splitlines() if line.split()[:1] == ["tsdb"])
        assert "PROBLEM" in tsdb_line, out
        assert "degraded: tsdb: " in out
        assert "spool: 1 readings waiting" in out
        assert "write errors 0" not in out
        assert daemon.terminate() == 0
    finally:
        watcher.close()
        daemon.close()


def test_healthz_and_status_show_the_whole_backlog_and_its_age_while_the_tsdb_is_down(
    tmp_path: Path, mosquitto: Mosquitto, services: ServiceFactory, unique: str
) -> None:
    """During an outage /healthz once said only "11 lines waiting" (the sink's batch in
    hand) while the spool held about 4,500 readings: now it says how many wait and since
    when, and so does `ingestd status`."""
    prefix = f"b{unique}"
    tsdb = services.victoria_metrics()
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": tsdb.url, "batch_size": 50, "backoff_max": "300ms", "timeout": "1s"},
    )
    daemon = DaemonProcess(tmp_path, config).start()
    try:
        Fleet(mosquitto.url, devices=10, prefix=prefix).run(rate=2000, count=200)
        daemon.wait(lambda: daemon.metric("ingestd_points_written_total") >= 200, "writing")
        assert daemon.health()[1]["backlog"]["readings"] == 0

        tsdb.stop()
        Fleet(mosquitto.url, devices=10, prefix=prefix, first=10).run(rate=500, count=3000)
        daemon.wait(lambda: daemon.metric("ingestd_messages_accepted_total") >= 3200, "spooled")
        code, first = daemon.health()
        assert code == 503
        backlog = first["backlog"]
        # every reading published during the outage is held, however small the batch in hand
        assert backlog["readings"] == daemon.metric("ingestd_spool_records") >= 3000
        assert backlog["bytes"] == daemon.metric("ingestd_spool_bytes") > 0
        assert backlog["oldest_seconds"] > 0
        in_hand = re.search(r"this batch: (\d+) readings", first["components"]["tsdb"]["detail"])
        assert in_hand and int(in_hand[1]) <= 50  # the sink's batch, told apart from the backlog
        daemon.wait(
            lambda: daemon.health()[1]["backlog"]["oldest_seconds"] > backlog["oldest_seconds"],
            "the backlog's age growing",
        )
        assert daemon.metric("ingestd_spool_oldest_seconds") > backlog["oldest_seconds"]

        result = ingestd("status", "--config", str(config_path := daemon.config_path))
        assert result.returncode == 1, result.stdout + result.stderr
        waiting = next(line for line in result.stdout.splitlines() if line.startswith("spool:"))
        assert re.fullmatch(
            rf"spool: {int(backlog['readings'])} readings waiting \(the oldest for [0-9.]+s\),"
            r" [0-9.]+ KiB on disk, not full",
            waiting,
        ), waiting

        tsdb.start()
        found = seqs_in_victoria(tsdb, prefix, 3200)
        before = expected_keys(10, 20)  # esp32-00000..9, 20 readings each
        during = expected_keys(20, 300) - expected_keys(10, 300)  # esp32-00010..19, 300 each
        assert found.keys() == before | during
        assert all(len(set(stamps)) == 1 for stamps in found.values())
        daemon.wait(lambda: daemon.health()[0] == 200, "healthy again")
        after = daemon.health()[1]["backlog"]
        assert after["readings"] == 0 and after["oldest_seconds"] == 0
        result = ingestd("status", "--config", str(config_path))
        assert "spool: 0 readings waiting, " in result.stdout
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_status_of_no_daemon_exits_1_with_the_reason(tmp_path: Path) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"http: {{listen: '127.0.0.1:{free_port()}'}}\nspool: {{dir: '{tmp_path / 'spool'}'}}\n"
    )
    result = ingestd("status", "--config", str(config))
    assert result.returncode == 1
    assert "UNREACHABLE: cannot reach the daemon" in result.stdout


class Lines:
    """A subprocess's output lines, read in a thread so the test can poll them."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def join(self) -> None:
        self._thread.join(timeout=10)

    def having(self, text: str) -> list[str]:
        return [line for line in list(self.lines) if text in line]


def test_tail_shows_the_retained_picture_then_live_events_with_their_ids(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"t{unique}"
    device = f"dev{unique}"
    daemon = start(tmp_path, mosquitto, victoria_metrics, prefix)
    watcher = Watcher(mosquitto)
    tail: subprocess.Popen[str] | None = None
    try:
        reading(watcher, prefix, device, ph=7.4, ec=1.8)
        wait_for(lambda: watcher.events("firing"), "the firing event")
        (firing,) = watcher.events("firing")
        state_topic = f"alerts/state/site1/{device}/ph_high/ph"
        wait_for(lambda: watcher.on(state_topic), "the retained state")

        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR",)}
        tail = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ingestd",
                "tail",
                "--config",
                str(daemon.config_path),
                "--count",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        assert tail.stdout is not None
        out = Lines(tail.stdout)
        wait_for(lambda: out.having("following alerts/#"), "tail to show the picture")
        picture = out.having(firing["id"])
        assert picture and "FIRING" in picture[0] and f"site1/{device}" in picture[0]
        assert "ph_high" in picture[0] and "ph=7.4 (threshold 7)" in picture[0]
        assert out.having("currently firing: ")[0].startswith("currently firing: ")
        assert out.lines.index(out.having("currently firing")[0]) < out.lines.index(picture[0])

        watcher.publish(f"alerts/ack/{firing['id']}/night-shift", b"")
        wait_for(lambda: out.having("ack by night-shift"), "the acknowledgement line")
        acked = out.having("ack by night-shift")[0]
        assert "ACKNOWLEDGED" in acked and f"id={firing['id']}" in acked

        reading(watcher, prefix, device, ph=6.5, ec=1.8)
        assert tail.wait(timeout=20) == 0, "tail --count 2 did not stop after two events"
        out.join()
        resolved = out.having("RESOLVED")
        assert resolved and f"id={firing['id']}" in resolved[0] and "ph=6.5" in resolved[0]
        assert not [line for line in out.lines if ESC in line], "colour codes on a pipe"
        assert not out.having("alerts/ack"), "acks are not alert events"
        assert daemon.terminate() == 0
    finally:
        if tail is not None:
            if tail.poll() is None:
                tail.kill()
            tail.communicate(timeout=10)  # drains and closes the pipes
        watcher.close()
        daemon.close()


def test_tail_colours_states_on_a_terminal_only() -> None:
    from ingestd.operator import format_event  # noqa: PLC0415

    event: dict[str, Any] = orjson.loads(
        b'{"id":"abc","rule":"r","device":"d","site":"s","field":"ph","severity":"warning",'
        b'"state":"firing","kind":"firing","value":7.5,"threshold":7.0,"at":0}'
    )
    assert "\x1b[31mFIRING" in format_event(event, True)
    assert ESC not in format_event(event, False)
    assert "\x1b[32mRESOLVED" in format_event({**event, "state": "resolved"}, True)
    assert "\x1b[33mACKNOWLEDGED" in format_event({**event, "state": "acknowledged"}, True)
