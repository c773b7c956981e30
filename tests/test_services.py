"""The server fixtures really start, serve, survive restarts and recover from kills."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
import redis
from conftest import ServiceFactory, start_service
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from services import (
    BinaryNotFoundError,
    InfluxDB1,
    Mosquitto,
    Postgres,
    Redis,
    Service,
    ServiceError,
    VictoriaMetrics,
    find_binary,
    http_request,
)

# A fixed historical instant with sub-millisecond digits: checks VM's retention setting
# (default 1 month would drop it) and the ns -> ms truncation in one go.
TS_NS = 1_700_000_000_123_456_789
TS_MS = 1_700_000_000_123


class MqttClient:
    """Blocking wrapper around paho's threaded client, just enough for assertions."""

    def __init__(self, broker: Mosquitto, client_id: str = "", clean_session: bool = True) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.session_present: bool | None = None
        self._connected = threading.Event()
        self._subscribed: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(5):
            self.close()
            raise AssertionError(f"no CONNACK from {broker.url}")

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: Any
    ) -> None:
        assert not rc.is_failure, rc
        self.session_present = flags.session_present
        self._connected.set()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        assert not any(code.is_failure for code in codes), codes
        with self._lock:
            self._subscribed.setdefault(mid, threading.Event()).set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            result, mid = self.client.subscribe(topic, qos)
            assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None
            event = self._subscribed.setdefault(mid, threading.Event())
        assert event.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def get(self, timeout: float = 5) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_clients() -> Iterator[Callable[..., MqttClient]]:
    clients: list[MqttClient] = []

    def make(broker: Mosquitto, client_id: str = "", clean_session: bool = True) -> MqttClient:
        client = MqttClient(broker, client_id, clean_session)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def assert_round_trip(broker: Mosquitto, make: Callable[..., MqttClient], topic: str) -> None:
    subscriber, publisher = make(broker), make(broker)
    subscriber.subscribe(topic, qos=1)
    publisher.publish(topic, b"ping", qos=1)
    message = subscriber.get()
    assert (message.topic, message.payload, message.qos) == (topic, b"ping", 1)
    subscriber.close()
    publisher.close()


# -- Mosquitto -----------------------------------------------------------------------


def test_mosquitto_qos1_round_trip(
    mosquitto: Mosquitto, mqtt_clients: Callable[..., MqttClient], unique: str
) -> None:
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert_round_trip(mosquitto, mqtt_clients, f"{unique}/rt")


def test_mosquitto_restart_keeps_retained_and_queued_messages(
    services: ServiceFactory, mqtt_clients: Callable[..., MqttClient], unique: str
) -> None:
    broker = services.mosquitto(extra_config="max_queued_messages 1000\n")
    assert "max_queued_messages 1000" in broker.config_path.read_text()
    port = broker.port

    # A persistent session with a QoS 1 subscription goes offline, then misses a message.
    offline = mqtt_clients(broker, client_id=f"sub-{unique}", clean_session=False)
    offline.subscribe(f"{unique}/queued", qos=1)
    offline.close()
    publisher = mqtt_clients(broker)
    publisher.publish(f"{unique}/retained", b"kept", qos=1, retain=True)
    publisher.publish(f"{unique}/queued", b"waiting", qos=1)
    publisher.close()

    broker.restart()
    assert broker.port == port

    late = mqtt_clients(broker)
    late.subscribe(f"{unique}/retained", qos=1)
    retained = late.get()
    assert (retained.payload, retained.retain) == (b"kept", True)

    back = mqtt_clients(broker, client_id=f"sub-{unique}", clean_session=False)
    assert back.session_present is True
    queued = back.get()
    assert (queued.topic, queued.payload) == (f"{unique}/queued", b"waiting")

    assert_round_trip(broker, mqtt_clients, f"{unique}/after-restart")


def test_mosquitto_kill_then_start(
    services: ServiceFactory, mqtt_clients: Callable[..., MqttClient], unique: str
) -> None:
    broker = services.mosquitto()
    publisher = mqtt_clients(broker)
    publisher.publish(f"{unique}/retained", b"autosaved", qos=1, retain=True)
    publisher.close()
    # Only what autosave already wrote survives SIGKILL; wait for it to hit the disk.
    db = broker.dir / "mosquitto.db"
    deadline = time.monotonic() + 5
    while not (db.exists() and b"autosaved" in db.read_bytes()):
        assert time.monotonic() < deadline, "autosave never wrote the retained message"
        time.sleep(0.1)

    broker.kill()
    assert not broker.running
    broker.start()

    late = mqtt_clients(broker)
    late.subscribe(f"{unique}/retained")
    assert late.get().payload == b"autosaved"
    assert_round_trip(broker, mqtt_clients, f"{unique}/after-kill")


# -- VictoriaMetrics -----------------------------------------------------------------


def test_victoria_metrics_line_protocol_round_trip(
    victoria_metrics: VictoriaMetrics, unique: str
) -> None:
    vm = victoria_metrics
    assert vm.url == f"http://127.0.0.1:{vm.port}"
    m = f"m{unique}"
    vm.write(f"{m},host=a temp=21.5,count=3i {TS_NS}\n", path="/api/v2/write?bucket=b&org=o")
    vm.write(f"{m},host=b temp=-4.25 {TS_NS + 1_000_000_000}\n", path="/write?db=d")

    series = vm.export_until(f'{{__name__=~"{m}_.*"}}', lambda s: len(s) == 3)
    by_key = {(s["metric"]["__name__"], s["metric"]["host"]): s for s in series}
    assert set(by_key) == {(f"{m}_temp", "a"), (f"{m}_count", "a"), (f"{m}_temp", "b")}
    assert by_key[(f"{m}_temp", "a")]["values"] == [21.5]
    assert by_key[(f"{m}_temp", "a")]["timestamps"] == [TS_MS]
    assert by_key[(f"{m}_count", "a")]["values"] == [3]
    assert by_key[(f"{m}_temp", "b")]["values"] == [-4.25]
    assert by_key[(f"{m}_temp", "b")]["timestamps"] == [TS_MS + 1000]
    # /write's ?db= becomes a label; /api/v2/write's bucket does not (VM 1.79).
    assert by_key[(f"{m}_temp", "b")]["metric"]["db"] == "d"
    assert "db" not in by_key[(f"{m}_temp", "a")]["metric"]


def test_victoria_metrics_restart_keeps_data(services: ServiceFactory, unique: str) -> None:
    vm = services.victoria_metrics()
    port = vm.port
    vm.write(f"r{unique} v=1 {TS_NS}\n")
    vm.export_until(f"r{unique}_v")

    vm.restart()
    assert vm.port == port
    # No polling: a graceful stop flushed everything, so it must be there right away.
    before = vm.export(f"r{unique}_v")
    assert [(s["values"], s["timestamps"]) for s in before] == [([1], [TS_MS])]

    vm.write(f"r{unique} v=2 {TS_NS + 1_000_000}\n", path="/api/v2/write?bucket=b&org=o")
    after = vm.export_until(f"r{unique}_v", lambda s: len(s) == 1 and len(s[0]["values"]) == 2)
    assert after[0]["values"] == [1, 2]
    assert after[0]["timestamps"] == [TS_MS, TS_MS + 1]


# -- InfluxDB 1.x --------------------------------------------------------------------


def influx_rows(influx: InfluxDB1, db: str, influxql: str) -> list[dict[str, Any]]:
    result = influx.query(db, influxql)
    series = result["results"][0].get("series", [])
    return [dict(zip(s["columns"], values, strict=True)) for s in series for values in s["values"]]


def test_influxdb1_write_and_query(influxdb1: InfluxDB1, unique: str) -> None:
    assert influxdb1.url == f"http://127.0.0.1:{influxdb1.port}"
    assert influxdb1.rpc_port != influxdb1.port
    db = f"db-{unique}"
    influxdb1.create_database(db)
    influxdb1.write(db, f"m,host=a temp=21.5,count=3i {TS_NS}\nm,host=b temp=7 {TS_NS + 1}\n")

    rows = influx_rows(influxdb1, db, "SELECT * FROM m")
    assert rows == [
        {"time": TS_NS, "host": "a", "temp": 21.5, "count": 3},
        {"time": TS_NS + 1, "host": "b", "temp": 7, "count": None},
    ]


def test_influxdb1_restart_keeps_data(services: ServiceFactory, unique: str) -> None:
    influx = services.influxdb1()
    port = influx.port
    db = f"db-{unique}"
    influx.create_database(db)
    influx.write(db, f"m v=1 {TS_NS}\n")
    assert influx_rows(influx, db, "SELECT * FROM m") == [{"time": TS_NS, "v": 1}]

    influx.restart()
    assert influx.port == port
    assert influx_rows(influx, db, "SELECT * FROM m") == [{"time": TS_NS, "v": 1}]
    influx.write(db, f"m v=2 {TS_NS + 1}\n")
    assert influx_rows(influx, db, "SELECT v FROM m") == [
        {"time": TS_NS, "v": 1},
        {"time": TS_NS + 1, "v": 2},
    ]


def test_influxdb1_query_errors_are_raised(influxdb1: InfluxDB1) -> None:
    with pytest.raises(ServiceError, match="database not found"):
        influxdb1.query("no_such_db_here", "SELECT * FROM m")


# -- Redis ---------------------------------------------------------------------------


def test_redis_ping_set_get(redis_server: Redis, unique: str) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping() is True
        client.set(f"{unique}:k", b"v")
        assert client.get(f"{unique}:k") == b"v"


def test_redis_restart(services: ServiceFactory, unique: str) -> None:
    server = services.redis()
    port = server.port
    with server.client() as client:
        client.set(f"{unique}:k", b"v")
    server.restart()
    assert server.port == port
    with server.client() as client:
        assert client.ping() is True
        # --save '' and no AOF: nothing may survive, or tests would leak state into others.
        assert client.get(f"{unique}:k") is None


# -- PostgreSQL ----------------------------------------------------------------------


def test_postgres_select_and_table(postgres: Postgres, unique: str) -> None:
    assert postgres.dsn.endswith(f"@127.0.0.1:{postgres.port}/ingestd")
    table = f"t_{unique}"
    with psycopg.connect(postgres.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text)")
        conn.execute(f"INSERT INTO {table} VALUES (1, 'one'), (2, 'two')")
        assert conn.execute(f"SELECT id, name FROM {table} ORDER BY id").fetchall() == [
            (1, "one"),
            (2, "two"),
        ]


def test_postgres_restart_keeps_rows(services: ServiceFactory) -> None:
    pg = services.postgres()
    port = pg.port
    with pg.connect() as conn:
        conn.execute("CREATE TABLE kept (id int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    # An open connection must not block the graceful stop (smart shutdown would wait).
    with pg.connect() as idle:
        pg.restart()
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
    assert pg.port == port
    with pg.connect() as conn:
        assert conn.execute("SELECT id FROM kept").fetchall() == [(42,)]


# -- all servers ---------------------------------------------------------------------


def _serves(service: Service) -> None:
    if isinstance(service, Mosquitto | Redis | Postgres):
        service._probe()
    elif isinstance(service, VictoriaMetrics):
        assert http_request("GET", f"{service.url}/health").text == "OK"
    elif isinstance(service, InfluxDB1):
        assert http_request("GET", f"{service.url}/ping").status == 204


@pytest.mark.parametrize(
    "kind", ["mosquitto", "victoria_metrics", "influxdb1", "redis", "postgres"]
)
def test_kill_then_start_on_same_port(services: ServiceFactory, kind: str) -> None:
    service: Service = getattr(services, kind)()
    port, pid = service.port, service.pid
    service.kill()
    assert not service.running
    with pytest.raises((OSError, redis.ConnectionError, psycopg.OperationalError)):
        _serves(service)
    service.start()
    assert (service.port, service.running) == (port, True)
    assert service.pid != pid
    _serves(service)


def test_close_removes_dir_and_process(services: ServiceFactory) -> None:
    server = services.redis()
    process = server.process
    assert process is not None
    server.close()
    assert process.poll() is not None
    assert not server.dir.exists()
    server.close()  # idempotent, so the factory's own teardown close is harmless


def test_start_refuses_a_taken_port(redis_server: Redis) -> None:
    # Without this check the readiness probe would happily talk to the other server.
    clash = Redis()
    clash.port = redis_server.port
    try:
        with pytest.raises(ServiceError, match=f"{redis_server.port}.*already in use"):
            clash.start()
        assert not clash.running
    finally:
        clash.close()


def test_startup_failure_reports_server_log(services: ServiceFactory) -> None:
    with pytest.raises(ServiceError) as excinfo:
        services.mosquitto(extra_config="no_such_option 1\n")
    message = str(excinfo.value)
    assert "mosquitto exited with code" in message
    assert "last 40 lines of" in message
    # The broker's own diagnosis, taken from its log file, not a generic timeout.
    assert "no_such_option" in message


# -- harness plumbing (no servers) ---------------------------------------------------


def test_missing_binary_names_it_and_says_make_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BinaryNotFoundError, match=r'no-such-server.*run "make setup"'):
        find_binary("no-such-server")
    monkeypatch.setattr("services.shutil.which", lambda *_a, **_k: None)
    with pytest.raises(BinaryNotFoundError, match=r'victoria-metrics.*run "make setup"'):
        VictoriaMetrics()


def test_missing_binary_fails_fixture_instead_of_skipping() -> None:
    def missing() -> Service:
        raise BinaryNotFoundError("mosquitto")

    with pytest.raises(pytest.fail.Exception, match=r'mosquitto.*run "make setup"'):
        start_service(missing)


def test_auto_markers(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("services") is None


def test_auto_marker_services(redis_server: Redis, request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("services") is not None
    assert request.node.get_closest_marker("unit") is None
