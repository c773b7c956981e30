"""deploy/: the systemd unit verifies, install.sh installs idempotently, sd_notify works.

The unit's ExecStart points at /opt/ingestd/venv/bin/ingestd, which `systemd-analyze verify`
requires to exist and be executable. Rather than write to /opt on the test machine, the
unit is verified as a temporary copy whose ExecStart is the same binary in a staged install
(install.sh --root); nothing else in the copy changes. (`verify --root=` would need a whole
systemd tree in the staged root: sysinit.target, /bin/kill, ...)

The sd_notify test binds a real unix datagram socket, as systemd does, and runs
`ingestd run` with $NOTIFY_SOCKET pointing at it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from daemon import REPO, DaemonProcess, daemon_config
from services import http_request

from ingestd import __version__
from ingestd.config import HttpSection
from ingestd.systemd import SystemdNotify

UNIT = REPO / "deploy" / "ingestd.service"
RETENTION_UNIT = REPO / "deploy" / "ingestd-retention.service"
RETENTION_TIMER = REPO / "deploy" / "ingestd-retention.timer"
INSTALL = REPO / "deploy" / "install.sh"
EXEC_START = "/opt/ingestd/venv/bin/ingestd"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: run `make setup` (it installs the Debian package systemd)",
            pytrace=False,
        )
    return path


def _snapshot_checkout(dest: Path) -> Path:
    """A copy of what install.sh reads, so concurrent edits of the checkout cannot race."""
    for part in ("ingestd", "config", "rules", "deploy"):
        shutil.copytree(
            REPO / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _install(checkout: Path, root: Path, *args: str) -> str:
    result = subprocess.run(
        ["bash", str(checkout / "deploy" / "install.sh"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, f"install.sh failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root: mode, mtime and content hash (or link target)."""
    tree: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            tree[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            tree[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
        else:
            tree[str(path.relative_to(root))] = (st.st_mode,)
    return tree


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """(checkout copy, staged root, first install output): one real install for the module."""
    _tool("systemctl")  # offline `systemctl --root enable`
    base = tmp_path_factory.mktemp("deploy")
    checkout = _snapshot_checkout(base / "checkout")
    root = base / "root"
    yield checkout, root, _install(checkout, root)


def test_install_into_a_root_then_again_changes_nothing_and_keeps_edits(
    staged: tuple[Path, Path, str],
) -> None:
    checkout, root, first = staged
    etc = root / "etc" / "ingestd"
    assert (etc / "ingestd.yaml").read_bytes() == (checkout / "config/ingestd.yaml").read_bytes()
    shipped_rules = sorted(p.name for p in (checkout / "rules").glob("*.yaml"))
    assert shipped_rules
    assert sorted(p.name for p in (etc / "rules").iterdir()) == shipped_rules
    unit = root / "etc/systemd/system/ingestd.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/ingestd.service"
    assert os.readlink(wants) == "/etc/systemd/system/ingestd.service"
    for shipped in (RETENTION_UNIT, RETENTION_TIMER):
        assert (root / "etc/systemd/system" / shipped.name).read_bytes() == shipped.read_bytes()
    timer = root / "etc/systemd/system/timers.target.wants/ingestd-retention.timer"
    assert os.readlink(timer) == "/etc/systemd/system/ingestd-retention.timer"
    assert "installed ingestd" in first

    before = _tree(root)
    second = _install(checkout, root)
    assert _tree(root) == before
    assert "nothing to change" in second

    # An admin edits the config: the edit stays, the shipped version lands beside it.
    config = etc / "ingestd.yaml"
    edited = config.read_text() + "\n# edited by the admin\n"
    config.write_text(edited)
    third = _install(checkout, root, "--no-systemctl")
    assert config.read_text() == edited
    dist = etc / "ingestd.yaml.dist"
    assert dist.read_bytes() == (checkout / "config/ingestd.yaml").read_bytes()
    assert "ingestd.yaml.dist" in third
    before = _tree(root)
    fourth = _install(checkout, root, "--no-systemctl")
    assert _tree(root) == before
    assert "nothing to change" in fourth


def test_installed_venv_runs_ingestd(staged: tuple[Path, Path, str]) -> None:
    _, root, _ = staged
    binary = root / EXEC_START.lstrip("/")
    result = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ingestd {__version__}"
    assert os.readlink(root / "usr/local/bin/ingestd") == EXEC_START  # on the admin's PATH
    # Package data ships too: the schema migrations `ingestd db migrate` applies.
    found = subprocess.run(
        [
            str(binary.parent / "python"),
            "-c",
            "from ingestd.store.postgres import LATEST; print(LATEST)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert found.returncode == 0 and int(found.stdout) >= 1, found.stderr


def test_unit_passes_systemd_analyze_verify(staged: tuple[Path, Path, str], tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    _, root, _ = staged
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_START} run --config /etc/ingestd/ingestd.yaml" in text
    staged_binary = root / EXEC_START.lstrip("/")
    assert os.access(staged_binary, os.X_OK)
    copy = tmp_path / "ingestd.service"
    copy.write_text(text.replace(f"ExecStart={EXEC_START}", f"ExecStart={staged_binary}"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def test_retention_units_pass_systemd_analyze_verify(
    staged: tuple[Path, Path, str], tmp_path: Path
) -> None:
    analyze = _tool("systemd-analyze")
    _, root, _ = staged
    text = RETENTION_UNIT.read_text()
    command = f"ExecStart={EXEC_START} retention apply --config /etc/ingestd/ingestd.yaml"
    assert re.search(rf"^{re.escape(command)}$", text, re.M)
    staged_binary = root / EXEC_START.lstrip("/")
    # The timer starts the service of its own name; both are verified together.
    service = tmp_path / RETENTION_UNIT.name
    service.write_text(text.replace(f"ExecStart={EXEC_START}", f"ExecStart={staged_binary}"))
    timer = tmp_path / RETENTION_TIMER.name
    shutil.copy2(RETENTION_TIMER, timer)
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(service), str(timer)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def _directives(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and line[0].isalpha() and "=" in line}


def test_retention_service_runs_as_the_daemon_with_its_hardening() -> None:
    daemon = UNIT.read_text()
    service = _directives(RETENTION_UNIT.read_text())
    assert "Type=oneshot" in service
    # Everything from the daemon's identity line on (user, files, hardening) applies to a
    # oneshot too, but for the credentials the retention run does not use.
    start = daemon.index("\nUser=")
    shared = {d for d in _directives(daemon[start:]) if not d.startswith("LoadCredential=")}
    shared -= {"WantedBy=multi-user.target"}  # the timer starts it, not a target
    assert shared - service == set()
    assert "LoadCredential=postgres__password:ingestd.postgres__password" in service
    assert not any(d.startswith(("WantedBy=", "Restart=", "WatchdogSec=")) for d in service)
    timer = _directives(RETENTION_TIMER.read_text())
    assert {"OnCalendar=daily", "Persistent=true", "WantedBy=timers.target"} <= timer
    assert any(d.startswith("RandomizedDelaySec=") for d in timer)
    assert not any(d.startswith("Unit=") for d in timer)  # starts ingestd-retention.service


def test_unit_stop_timeout_exceeds_the_shutdown_drain() -> None:
    """Shutdown waits up to spool.shutdown_grace twice (commit, then drain)."""
    text = UNIT.read_text()
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", text, re.M)
    assert stop is not None
    from ingestd.config import SpoolSection  # noqa: PLC0415

    assert int(stop.group(1)) > 2 * SpoolSection().shutdown_grace + 10
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s", "User=ingestd"):
        assert re.search(rf"^{re.escape(line)}$", text, re.M), line


def test_unit_gives_ingestd_room_for_its_file_descriptors() -> None:
    """systemd's default soft limit, 1024, was once used up by idle HTTP sockets: the spool
    could not write and the daemon exited. The unit raises it (so does `ingestd run`, up to
    the hard limit; the HTTP endpoint caps its connections besides)."""
    limit = re.search(r"^LimitNOFILE=(\d+)$", UNIT.read_text(), re.M)
    assert limit is not None, "deploy/ingestd.service sets no LimitNOFILE"
    assert int(limit.group(1)) >= max(8192, 16 * HttpSection().max_connections)


# --- sd_notify ------------------------------------------------------------------------


class NotifySocket:
    """The service manager's end: a bound unix datagram socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[tuple[float, dict[str, str]]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.received.append((time.monotonic(), fields))
        return fields

    def expect(self, key: str, timeout: float, what: str) -> dict[str, str]:
        """The next message that carries ``key`` (others are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            fields = self.receive(left)
            if fields is not None and key in fields:
                return fields
        raise AssertionError(f"no {key} ({what}) within {timeout}s; got {self.received}")

    def close(self) -> None:
        self.sock.close()


class NotifiedDaemon(DaemonProcess):
    """``ingestd run`` with extra environment (what systemd would pass)."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str]) -> None:
        super().__init__(tmp, config)
        self.env = env

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        with mock.patch.dict(os.environ, self.env):
            return super().start(wait_ready)


def test_ingestd_run_speaks_sd_notify_ready_watchdog_reload_stop(
    mosquitto: Any, victoria_metrics: Any, tmp_path: Path, unique: str
) -> None:
    name = f"@ingestd-test-{uuid.uuid4().hex}"  # abstract namespace, as systemd often uses
    manager = NotifySocket(b"\0" + name[1:].encode())
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        f"n{unique}",
        {"url": victoria_metrics.url},
        rules={"dir": str(REPO / "rules")},
    )
    daemon = NotifiedDaemon(tmp_path, config, {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"})
    try:
        daemon.start(wait_ready=False)
        ready = manager.expect("READY", 30, "after subscribing")
        # Readiness is set before READY=1 goes out: /readyz must already say so.
        assert http_request("GET", daemon.http + "/readyz").status == 200
        assert ready["READY"] == "1"
        assert re.fullmatch(r"ready: \d+ filters, spool 0 readings", ready["STATUS"]), ready

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 1s, from the event loop.
        pings = [time.monotonic()]
        for _ in range(3):
            manager.expect("WATCHDOG", 3, "every second")
            pings.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(pings[1:])]
        assert all(0.5 < gap < 1.8 for gap in gaps), gaps

        assert daemon.process is not None
        before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        daemon.process.send_signal(signal.SIGHUP)
        reloading = manager.expect("RELOADING", 10, "after SIGHUP")
        assert reloading["RELOADING"] == "1"
        assert before_usec <= int(reloading["MONOTONIC_USEC"]) <= before_usec + 10_000_000
        reloaded = manager.expect("READY", 10, "when the reload finished")
        assert "failed" not in reloaded.get("STATUS", ""), reloaded

        daemon.process.send_signal(signal.SIGTERM)
        stopping = manager.expect("STOPPING", 10, "after SIGTERM")
        assert stopping["STOPPING"] == "1"
        assert daemon.process.wait(30) == 0
    finally:
        daemon.close()
        manager.close()


def test_keepalive_stops_when_the_event_loop_stalls(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    manager = NotifySocket(str(path))
    notify = SystemdNotify({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
    assert notify.watchdog_interval == 0.2

    async def scenario() -> None:
        task = asyncio.create_task(notify.keepalive())
        await asyncio.sleep(0.5)  # pings every 0.1s
        time.sleep(1.0)  # noqa: ASYNC251 - the stall under test: the loop cannot run
        await asyncio.sleep(0.3)
        task.cancel()

    try:
        asyncio.run(scenario())
        pings = 0
        while manager.receive(0.1) is not None:
            pings += 1
    finally:
        manager.close()
        notify.close()
    # Datagrams queue up, so their receipt times say nothing; the count does: 0.8s of a
    # running loop pings ~9 times, pings that went on through the 1s stall ~19 times.
    assert 6 <= pings <= 12, pings


def test_no_notify_socket_is_a_no_op_and_watchdog_pid_must_match() -> None:
    silent = SystemdNotify({})
    assert not silent.enabled
    assert silent.notify("READY=1") is False
    assert silent.watchdog_interval is None
    other = SystemdNotify(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert other.watchdog_interval is None
    mine = SystemdNotify(
        {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert mine.address == b"\0x"
    assert mine.watchdog_interval == 3.0
