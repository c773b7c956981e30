"""systemd's notify protocol (``sd_notify(3)``) without libsystemd: one datagram per message.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: a unix datagram socket, a path or
an abstract name written with a leading ``@``. Each message is ``KEY=VALUE`` lines:

- ``READY=1``: startup finished (ingestd: subscribed and the spool open); also the end of
  a reload;
- ``RELOADING=1`` with ``MONOTONIC_USEC=``: a reload (SIGHUP) started;
- ``STOPPING=1``: shutdown started (SIGTERM);
- ``WATCHDOG=1``: alive; sent from the event loop every ``$WATCHDOG_USEC / 2``, so a loop
  that stalls stops pinging and systemd restarts the service (``WatchdogSec=``);
- ``STATUS=...``: one line shown by ``systemctl status``.

Everything is a no-op when ``$NOTIFY_SOCKET`` is unset (not under systemd). A send that
fails is logged once and never raises: the daemon must not die of its supervisor's socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

from ingestd.logs import get_logger

__all__ = ["SystemdNotify"]

log = get_logger("systemd")


class SystemdNotify:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        self._socket: socket.socket | None = None
        self._failed = False
        self._status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False when not sent."""
        if self.address is None or not lines:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket would otherwise log every ping
                log.warning("cannot notify systemd", socket=str(self.address), error=str(exc))
                self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> None:
        self.notify("READY=1", *self._status_lines(status))

    def reloading(self, status: str = "reloading") -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", *self._status_lines(status))

    def stopping(self, status: str = "stopping") -> None:
        self.notify("STOPPING=1", *self._status_lines(status))

    def status(self, status: str) -> None:
        lines = self._status_lines(status)
        if lines:
            self.notify(*lines)

    async def keepalive(self, status: Callable[[], str] | None = None) -> None:
        """Ping the watchdog (and refresh a changed STATUS) until cancelled.

        Runs on the event loop on purpose: when the loop is blocked, the pings stop.
        Returns at once when there is no watchdog to ping.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            lines = ["WATCHDOG=1"]
            if status is not None:
                lines += self._status_lines(status())
            self.notify(*lines)
            await asyncio.sleep(interval / 2)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _status_lines(self, status: str | None) -> list[str]:
        """``STATUS=`` when it says something new (one line: systemd shows only one)."""
        if status is None:
            return []
        status = " ".join(status.split())
        if status == self._status:
            return []
        self._status = status
        return [f"STATUS={status}"]


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # Linux abstract namespace: a leading NUL byte, not a file
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET is not a unix socket address; not notifying", value=value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """The watchdog timeout in seconds, when it is meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    try:
        timeout = int(usec) / 1e6 if usec else 0.0
        if pid and int(pid) != os.getpid():
            return None  # set for another process (e.g. inherited from a parent)
    except ValueError:
        log.warning("ignoring a malformed watchdog setting", WATCHDOG_USEC=usec, WATCHDOG_PID=pid)
        return None
    return timeout if timeout > 0 else None
