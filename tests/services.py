"""Real servers for the test suite, each on a free loopback port in its own temp dir.

Every class starts the genuine binary (no mocks, no Docker), waits until the server
answers its own protocol, and can be stopped, killed and restarted on the same port
and data dir so fault tests can exercise reconnects against an unchanged address.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"


class ServiceError(RuntimeError):
    """A server failed to start, answer or stop."""


class BinaryNotFoundError(ServiceError):
    """A server binary is not installed."""

    def __init__(self, binary: str) -> None:
        super().__init__(f'{binary} not found: run "make setup" to install it')
        self.binary = binary


def free_ports(count: int = 1) -> list[int]:
    """Ask the kernel for `count` distinct free ports on the loopback interface."""
    # All sockets stay open until every port is picked, so one call never repeats a port.
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def port_in_use(port: int) -> bool:
    """True if something already listens on (or is bound to) 127.0.0.1:`port`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the servers use, so lingering TIME_WAIT sockets don't count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
        return False


def find_binary(name: str, extra_dirs: Iterable[str] = ()) -> str:
    """Locate `name` on PATH or in `extra_dirs`, raising BinaryNotFoundError otherwise."""
    # /usr/sbin is often missing from a non-login PATH, yet that is where Debian puts mosquitto.
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *extra_dirs, "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise BinaryNotFoundError(name)
    return found


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def http_request(
    method: str,
    url: str,
    data: bytes | str | None = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpResponse:
    """Plain HTTP call that returns error statuses instead of raising on them."""
    body = data.encode() if isinstance(data, str) else data
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResponse(response.status, response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpResponse(exc.code, exc.read())


# Services not yet closed when the interpreter exits (pytest aborted by a crash or a
# second Ctrl-C before fixture teardown) are killed and their dirs removed, so no test
# run leaks processes or temp dirs.
_unclosed: set[Service] = set()


@atexit.register
def _close_leftovers() -> None:
    for service in list(_unclosed):
        with contextlib.suppress(Exception):
            service.kill()
        shutil.rmtree(service.dir, ignore_errors=True)


class Service:
    """Base class: process lifecycle, log capture and readiness polling.

    Subclasses provide `_command()` and `_probe()`, and optionally `_prepare()` for
    one-time setup of the data dir before the first start.
    """

    name: ClassVar[str] = "service"
    # SIGTERM is graceful for every server here except postgres (see Postgres).
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self, *, startup_timeout: float = 30.0, stop_timeout: float = 20.0) -> None:
        self.host = HOST
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.dir = Path(tempfile.mkdtemp(prefix=f"ingestd-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._prepared = False
        _unclosed.add(self)

    # -- subclass hooks ---------------------------------------------------------------

    def _prepare(self) -> None:
        """One-time setup before the first start (config files, initdb, ...)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> None:
        """Raise any exception while the server is not yet serving its protocol."""
        raise NotImplementedError

    # -- lifecycle --------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        """Every port the server binds; all must be free before it starts."""
        return [self.port]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> Self:
        if self.running:
            return self
        # Otherwise the readiness probe could succeed against whatever already holds the
        # port, while our server dies with "address in use" behind the test's back.
        taken = [port for port in self.ports if port_in_use(port)]
        if taken:
            raise ServiceError(f"{self.name}: port(s) {taken} on {self.host} already in use")
        if not self._prepared:
            self._prepare()
            self._prepared = True
        with self.log_path.open("ab") as log:
            log.write(f"\n===== {self.name} start {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            # A new session keeps terminal Ctrl-C away from the servers (teardown stops them
            # in order) and lets kill() take down worker children with the group.
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: BaseException | None = None
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise ServiceError(
                    f"{self.name} exited with code {code} during startup\n{self.log_tail()}"
                )
            try:
                self._probe()
            except Exception as exc:
                last_error = exc
            else:
                return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.name} not ready on port {self.port} after {self.startup_timeout}s "
                    f"(last probe error: {last_error!r})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Graceful shutdown; escalates to SIGKILL if the server hangs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise ServiceError(
                    f"{self.name} ignored {self.stop_signal.name} for {self.stop_timeout}s "
                    f"and was killed\n{self.log_tail()}"
                ) from None
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and its children, as a crash would."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._reap()

    def _reap(self) -> None:
        # Children of a killed group (postgres backends) may outlive the leader briefly;
        # they must be gone before a restart can reuse the port and data dir.
        assert self.process is not None
        pgid = self.process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.02)
        self.process = None

    def restart(self) -> Self:
        """Graceful stop, then start on the same port with the same data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its dir."""
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.dir, ignore_errors=True)
            _unclosed.discard(self)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log file at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log_path} ---\n{tail}"

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} dir={self.dir}>"


class Mosquitto(Service):
    name = "mosquitto"

    def __init__(self, *, extra_config: str = "", **kwargs: Any) -> None:
        self.binary = find_binary("mosquitto")
        super().__init__(**kwargs)
        self.extra_config = extra_config
        self.config_path = self.dir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _prepare(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            # Time-based autosave: a kill() loses at most ~1 s of state, while saving on
            # every change would make high-volume tests rewrite the whole db per message.
            "autosave_interval 1",
            # Mosquitto's default (1000) silently drops QoS 1 messages queued for a busy
            # subscriber; a gateway broker for ingestd must queue far more (issue 8 ships it).
            "max_queued_messages 1000000",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto would switch to user "mosquitto", which cannot write the
            # root-owned temp dir, so persistence would silently fail.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")

    def _command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def _probe(self) -> None:
        # Raw MQTT 3.1.1 CONNECT / CONNACK: proves the broker accepts clients without
        # dragging in paho's network thread. Empty client id + clean session is legal.
        connect = bytes([0x10, 12, 0, 4, *b"MQTT", 4, 0x02, 0, 10, 0, 0])
        with socket.create_connection((self.host, self.port), timeout=1) as sock:
            sock.sendall(connect)
            connack = sock.recv(4)
            if connack[:2] != b"\x20\x02" or connack[3:4] != b"\x00":
                raise ServiceError(f"unexpected CONNACK {connack!r}")
            sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean exit


class VictoriaMetrics(Service):
    name = "victoria-metrics"

    def __init__(self, **kwargs: Any) -> None:
        self.binary = find_binary("victoria-metrics")
        super().__init__(**kwargs)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"-storageDataPath={self.dir / 'data'}",
            f"-httpListenAddr={self.host}:{self.port}",
            # VM silently drops rows older than the retention (default 1 month), which
            # would swallow tests that write fixed historical timestamps.
            "-retentionPeriod=100y",
            # Default 7 s wait for idle keep-alive clients would slow every restart.
            "-http.maxGracefulShutdownDuration=1s",
            "-loggerLevel=WARN",
        ]

    def _probe(self) -> None:
        response = http_request("GET", f"{self.url}/health", timeout=1)
        if response.status != 200:
            raise ServiceError(f"/health returned {response.status}")

    def flush(self) -> None:
        """Ask VM to move buffered rows into searchable parts."""
        response = http_request("GET", f"{self.url}/internal/force_flush")
        if response.status != 200:
            raise ServiceError(f"force_flush returned {response.status}: {response.text}")

    def write(self, lines: str | bytes, path: str = "/write") -> None:
        """POST InfluxDB line protocol (e.g. path="/api/v2/write?bucket=b&org=o")."""
        response = http_request("POST", f"{self.url}{path}", lines)
        if response.status != 204:
            raise ServiceError(f"POST {path} returned {response.status}: {response.text}")

    def export(self, match: str) -> list[dict[str, Any]]:
        """Series matching the selector, as VM has them right now.

        Each item has `metric` (labels incl. `__name__`), `values` and `timestamps` (ms).
        Freshly written rows are usually NOT visible yet; use export_until() for those.
        """
        query = urllib.parse.urlencode({"match[]": match})
        response = http_request("GET", f"{self.url}/api/v1/export?{query}")
        if response.status != 200:
            raise ServiceError(f"export {match!r} returned {response.status}: {response.text}")
        # One JSON object per "\n": splitlines() would also split at U+2028 inside a label.
        return [json.loads(line) for line in response.text.split("\n") if line.strip()]

    def export_until(
        self,
        match: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout: float = 15.0,
    ) -> list[dict[str, Any]]:
        """Poll flush()+export() until `predicate(series)` holds; default: any series.

        VM 1.79 makes new rows searchable only after its ~1 s background flush of
        ingestion buffers, and a force_flush before that point has nothing to flush, so
        one flush is not enough: flushing on every poll gets data in ~1 s instead of
        the ~10 s it takes with no flush at all.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.flush()
            series = self.export(match)
            if predicate(series):
                return series
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"VictoriaMetrics export {match!r} did not satisfy {predicate!r} "
                    f"within {timeout}s; last result: {series!r}"
                )
            time.sleep(0.1)


class InfluxDB1(Service):
    name = "influxd"

    def __init__(self, *, auth: bool = False, **kwargs: Any) -> None:
        """``auth``: authentication on; the first user made with :meth:`create_admin`."""
        self.binary = find_binary("influxd")
        self.auth = auth
        super().__init__(**kwargs)
        # influxd also listens on an RPC port (backup/restore, default 8088); a fixed one
        # would make two instances collide.
        self.rpc_port = free_port()
        while self.rpc_port == self.port:
            self.rpc_port = free_port()
        self.config_path = self.dir / "influxdb.conf"

    @property
    def ports(self) -> list[int]:
        return [self.port, self.rpc_port]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> None:
        self.config_path.write_text(
            f"""\
# Upstream spells it reporting-disabled, Debian's patched build reporting-enabled;
# unknown keys are ignored, so both are set to be sure no usage report leaves the box.
reporting-disabled = true
reporting-enabled = false
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{self.dir / "meta"}"
  logging-enabled = false

[data]
  dir = "{self.dir / "data"}"
  wal-dir = "{self.dir / "wal"}"
  query-log-enabled = false

[http]
  bind-address = "{self.host}:{self.port}"
  log-enabled = false
  auth-enabled = {"true" if self.auth else "false"}

[monitor]
  store-enabled = false

[logging]
  level = "warn"
  suppress-logo = true
"""
        )

    def _command(self) -> list[str]:
        return [self.binary, "run", "-config", str(self.config_path)]

    def _probe(self) -> None:
        response = http_request("GET", f"{self.url}/ping", timeout=1)
        if response.status != 204:
            raise ServiceError(f"/ping returned {response.status}")

    def create_admin(self, user: str, password: str) -> None:
        """The first user of an instance with ``auth``: an admin (influxd lets the first
        user be made without credentials)."""
        response = http_request(
            "POST",
            f"{self.url}/query",
            urllib.parse.urlencode(
                {"q": f"CREATE USER {user} WITH PASSWORD '{password}' WITH ALL PRIVILEGES"}
            ),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        if response.status != 200 or "error" in response.text:
            raise ServiceError(f"influxd: cannot create user {user}: {response.text}")

    def query(
        self, db: str, influxql: str, *, epoch: str | None = "ns", method: str = "GET"
    ) -> dict[str, Any]:
        """Run InfluxQL via /query; raises on HTTP or statement errors.

        `epoch="ns"` returns integer timestamps instead of RFC3339 strings, so tests can
        compare exact values.
        """
        params = {"db": db, "q": influxql}
        if epoch is not None:
            params["epoch"] = epoch
        response = http_request(method, f"{self.url}/query?{urllib.parse.urlencode(params)}")
        if response.status != 200:
            raise ServiceError(f"query {influxql!r} returned {response.status}: {response.text}")
        result: dict[str, Any] = response.json()
        errors = [r["error"] for r in result.get("results", []) if "error" in r]
        if "error" in result or errors:
            raise ServiceError(f"query {influxql!r} failed: {result}")
        return result

    def create_database(self, name: str) -> None:
        # InfluxQL identifiers need double quotes when they contain e.g. dashes.
        self.query("", f'CREATE DATABASE "{name}"', epoch=None, method="POST")

    def write(self, db: str, lines: str | bytes, precision: str = "ns") -> None:
        query = urllib.parse.urlencode({"db": db, "precision": precision})
        response = http_request("POST", f"{self.url}/write?{query}", lines)
        if response.status != 204:
            raise ServiceError(f"write to {db} returned {response.status}: {response.text}")


class Redis(Service):
    name = "redis"

    def __init__(self, **kwargs: Any) -> None:
        self.binary = find_binary("redis-server")
        super().__init__(**kwargs)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def _probe(self) -> None:
        # redis-py 8 retries a refused connect 10 times with backoff (~4.5 s) by default,
        # which would make every poll of a not-yet-listening server slow.
        with redis.Redis(
            host=self.host,
            port=self.port,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        ) as client:
            if client.ping() is not True:
                raise ServiceError("PING did not return PONG")


class Postgres(Service):
    name = "postgres"
    # SIGTERM is "smart" shutdown, which waits for every client to disconnect;
    # SIGINT is "fast": it ends sessions and still checkpoints cleanly.
    stop_signal = signal.SIGINT
    database = "ingestd"

    def __init__(self, *, user: str = "ingestd", **kwargs: Any) -> None:
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version, reverse=True)
        self.binary = find_binary("postgres", bindirs)
        # initdb must match the server's major version; PATH may hold symlinks to either.
        pg_bindir = Path(self.binary).resolve().parent
        sibling = pg_bindir / "initdb"
        self.initdb = str(sibling) if sibling.exists() else find_binary("initdb", bindirs)
        super().__init__(**kwargs)
        self.user = user
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "socket"
        # initdb and postgres refuse to run as root, so drop to an unprivileged account
        # that owns the whole dir (hence mkdtemp, not pytest's root-only 0700 tmp_path).
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("nobody")
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            # setpriv execs in place (runuser forks), so our pid is the postmaster's.
            self._run_as = [
                find_binary("setpriv"),
                f"--reuid={account.pw_uid}",
                f"--regid={account.pw_gid}",
                "--clear-groups",
                "--",
            ]

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def _admin_dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def _prepare(self) -> None:
        self.socket_dir.mkdir()
        shutil.chown(self.socket_dir, *self._owner())
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                [
                    *self._run_as,
                    self.initdb,
                    f"--pgdata={self.data_dir}",
                    f"--username={self.user}",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            raise ServiceError(f"initdb failed with code {result.returncode}\n{self.log_tail()}")

    def _owner(self) -> tuple[int, int]:
        stat = self.dir.stat()
        return stat.st_uid, stat.st_gid

    def _command(self) -> list[str]:
        return [
            *self._run_as,
            self.binary,
            "-D", str(self.data_dir),
            "-c", f"listen_addresses={self.host}",
            "-c", f"port={self.port}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            # Durability against OS crashes is irrelevant for throwaway test data;
            # a graceful stop still checkpoints, so restart() keeps every row.
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "log_min_messages=warning",
        ]  # fmt: skip

    def _probe(self) -> None:
        with psycopg.connect(self._admin_dsn(), connect_timeout=1) as conn:
            conn.execute("SELECT 1").fetchone()

    def start(self) -> Self:
        super().start()
        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{self.database}"')
        return self

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, **kwargs)

    def create_database(self, name: str) -> str:
        """A new empty database on this server; returns its URL."""
        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@{self.host}:{self.port}/{name}"


def _pg_version(bindir: str) -> float:
    try:
        return float(Path(bindir).parent.name)
    except ValueError:
        return 0.0
