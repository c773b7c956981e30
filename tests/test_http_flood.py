"""Idle sockets and slowloris clients against a running daemon with systemd's default file
limit: ingestion goes on, nothing is lost, /healthz answers, the process never exits.

Seen before the fix: 1,500 idle connections to the HTTP endpoint with the soft fd limit at
1024 made ingestd exit with ``[Errno 24] Too many open files: '.../spool/cursor.tmp'``
within a minute (aiohttp held every connection, the spool's next cursor write failed, the
drainer task died and took the daemon with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import DaemonProcess, daemon_config, expected_keys, seqs_in_victoria
from services import Mosquitto, VictoriaMetrics, http_request

from ingestd.simulate import Fleet

IDLE = 2000
SLOW = 50
FILE_LIMIT = 1024  # systemd's default soft limit; the hard one too, so ingestd cannot raise it
PHASE = 10_000  # readings published in each phase, clean and under attack
DEVICES = 20


def file_limit(soft: int, hard: int) -> Callable[[], None]:
    """For preexec_fn: the open files limits ``ingestd run`` starts with."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


class Flood:
    """``idle`` sockets that never send a byte and ``slow`` clients that trickle a request
    head a byte every 2 s, each reconnecting a second after the daemon closes it (as an
    attacker would). In a process of its own: its thousands of descriptors stay out of
    this one's (paho's select() here takes none above 1023)."""

    def __init__(self, host: str, port: int, idle: int, slow: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._counts = context.Array("q", 4)  # attempts, opened, closed by the daemon, slow cut
        self._stop = context.Event()
        self._process = context.Process(
            target=_flood,
            args=((host, port), (idle, slow), self._counts, self._stop),
            daemon=True,
        )

    def start(self) -> Flood:
        self._process.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._process.join(60)
        assert self._process.exitcode == 0, self._process.exitcode

    @property
    def attempts(self) -> int:
        return int(self._counts[0])

    @property
    def opened(self) -> int:
        return int(self._counts[1])

    @property
    def closed_by_daemon(self) -> int:
        return int(self._counts[2])

    @property
    def slow_cut(self) -> int:
        return int(self._counts[3])


def _flood(address: tuple[str, int], sockets: tuple[int, int], counts: Any, stop: Any) -> None:
    (host, port), (idle, slow) = address, sockets
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, idle + slow + 512), hard))

    def count(index: int) -> None:
        with counts.get_lock():
            counts[index] += 1

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        count(0)
        try:
            link = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(1)  # refused or timed out: the backlog is full; again
            return None
        count(1)
        return link

    async def idle_socket() -> None:
        while True:
            link = await connect()
            if link is None:
                continue
            reader, writer = link
            try:
                with contextlib.suppress(OSError):
                    await reader.read(1)  # returns when the daemon closes it; never, before
                count(2)
            finally:
                writer.close()
            await asyncio.sleep(1)

    async def slowloris() -> None:
        while True:
            link = await connect()
            if link is None:
                continue
            reader, writer = link
            try:
                writer.write(b"GET /alerts HTTP/1.1\r\nHost: ingestd\r\nX-Slow: ")
                while not reader.at_eof():
                    writer.write(b"a")
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(1), 2)
            except OSError:
                pass
            finally:
                writer.close()
            count(3)
            await asyncio.sleep(1)

    async def run() -> None:
        tasks = [asyncio.create_task(idle_socket()) for _ in range(idle)]
        tasks += [asyncio.create_task(slowloris()) for _ in range(slow)]
        await asyncio.to_thread(stop.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


class FdCount:
    """The daemon's open file descriptors (/proc/<pid>/fd), sampled every 50 ms: the peak."""

    def __init__(self, pid: int) -> None:
        self._dir = f"/proc/{pid}/fd"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, len(os.listdir(self._dir)))

    def take(self) -> int:
        """The peak since the last take."""
        peak, self.peak = self.peak, 0
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def ingest(daemon: DaemonProcess, broker: Mosquitto, prefix: str, phase: int) -> float:
    """Publish the phase's PHASE readings from its DEVICES devices as fast as the broker
    takes them; the rate at which ingestd wrote them to the TSDB (readings per second)."""
    started = time.monotonic()
    fleet = Fleet(broker.url, devices=DEVICES, prefix=prefix, first=phase * DEVICES)
    fleet.run(rate=50_000, count=PHASE)
    daemon.wait(
        lambda: daemon.metric("ingestd_points_written_total") >= (phase + 1) * PHASE,
        "done writing the phase's readings",
        timeout=120,
    )
    return PHASE / (time.monotonic() - started)


def test_idle_sockets_and_slowloris_neither_stop_ingestion_nor_lose_a_reading(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    prefix = f"f{unique}"
    config = daemon_config(tmp_path, mosquitto.url, prefix, {"url": victoria_metrics.url})
    daemon = DaemonProcess(tmp_path, config, preexec_fn=file_limit(FILE_LIMIT, FILE_LIMIT))
    host, port = config["http"]["listen"].split(":")
    daemon.start()
    assert daemon.process is not None
    pid = daemon.process.pid
    fds = FdCount(pid)
    flood: Flood | None = None
    try:
        clean_rate = ingest(daemon, mosquitto, prefix, phase=0)
        clean_fds = fds.take()

        flood = Flood(host, int(port), IDLE, SLOW).start()
        attack_started = time.monotonic()
        # more sockets than the daemon has descriptors for (before the fix the excess
        # waited in the listen backlog: the daemon could accept no more)
        daemon.wait(
            lambda: flood.attempts >= IDLE + SLOW and flood.opened > FILE_LIMIT,
            "flooded",
            timeout=120,
        )
        probes: list[int | str] = []
        probing = threading.Event()

        def probe() -> None:  # monitoring, every 0.5 s, each on a new connection
            while not probing.wait(0.5):
                try:
                    probes.append(http_request("GET", daemon.http + "/healthz").status)
                except OSError as exc:
                    probes.append(repr(exc))

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        attacked_rate = ingest(daemon, mosquitto, prefix, phase=1)
        # Long enough for every slowloris head to pass the header deadline (10 s).
        daemon.wait(
            lambda: time.monotonic() - attack_started > 25 and flood.slow_cut >= SLOW,
            "cutting the slowloris clients off",
            timeout=120,
        )
        probing.set()
        prober.join(30)
        attacked_fds = fds.take()
        metrics = daemon.metrics()
        flood.stop()
        flood_opened, flood_closed = flood.opened, flood.closed_by_daemon
        flood = None

        found = seqs_in_victoria(victoria_metrics, prefix, 2 * PHASE)
        assert found.keys() == expected_keys(2 * DEVICES, PHASE // DEVICES)
        assert all(len(set(stamps)) == 1 for stamps in found.values())
        assert daemon.process.poll() is None and daemon.process.pid == pid
        assert probes and set(probes) == {200}, f"/healthz did not always answer: {probes}"
        assert attacked_fds < FILE_LIMIT
        assert flood_opened >= IDLE + SLOW  # every socket got in, at least once
        closed = {
            reason: metrics.get(f'ingestd_http_connections_closed_total{{reason="{reason}"}}', 0.0)
            for reason in ("evicted", "header_timeout", "idle", "refused")
        }
        assert closed["evicted"] > 0
        print(
            f"\nclean: {clean_rate:.0f} readings/s, peak {clean_fds} fds;"
            f" flooded: {attacked_rate:.0f} readings/s, peak {attacked_fds} fds"
            f" (soft limit {FILE_LIMIT}); flood opened {flood_opened} connections,"
            f" {flood_closed} idle ones closed by ingestd; closed by reason {closed};"
            f" {len(probes)} /healthz probes all 200"
        )
        assert daemon.terminate() == 0
    finally:
        if flood is not None:
            flood.stop()
        fds.stop()
        daemon.close()


def test_ingestd_run_raises_its_soft_file_limit_to_the_hard_limit(
    tmp_path: Path, mosquitto: Mosquitto, victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    config = daemon_config(tmp_path, mosquitto.url, f"l{unique}", {"url": victoria_metrics.url})
    daemon = DaemonProcess(tmp_path, config, preexec_fn=file_limit(FILE_LIMIT, 4 * FILE_LIMIT))
    try:
        daemon.start()
        assert daemon.process is not None
        limits = Path(f"/proc/{daemon.process.pid}/limits").read_text().splitlines()
        (files,) = [line for line in limits if line.startswith("Max open files")]
        assert files.split()[3:5] == [str(4 * FILE_LIMIT)] * 2, files
        assert "open files limit raised to the hard limit" in daemon.log()
        assert daemon.terminate() == 0
    finally:
        daemon.close()
