"""The TSDB sink against real servers: VictoriaMetrics 1.79 (v2 API) and influxd 1.6 (v1).

Faults a real server won't produce on demand (429, 503, hangs, dropped connections, 401,
413) come from the fault server in front of it; whatever lands is read back from the real
server. Backoff caps are small so retries take tenths of a second.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import time
import urllib.parse
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import structlog
from conftest import ServiceFactory
from faultserver import FaultServer
from pydantic import SecretStr
from services import InfluxDB1, VictoriaMetrics, http_request

from ingestd.config import InfluxSection
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.sink import Refused, Sink, build_sink

BASE_MS = 1_700_000_000_000
MS = 1_000_000  # ns: each line gets its own millisecond, as VM stores milliseconds


def make_lines(measurement: str, count: int, start: int = 0) -> list[bytes]:
    return [
        f"{measurement},site=north v={i} {(BASE_MS + i) * MS}".encode()
        for i in range(start, start + count)
    ]


def expected_ms(count: int, start: int = 0) -> list[int]:
    return [BASE_MS + i for i in range(start, start + count)]


@dataclass
class Target:
    """A real TSDB behind one API, and how to read back what landed."""

    api: Literal["v2", "v1"]
    url: str
    database: str
    read: Callable[[str, int], list[int]]
    """(measurement, count expected) -> sorted ms timestamps of field v, duplicates kept."""

    def section(self, url: str | None = None, **overrides: Any) -> InfluxSection:
        settings: dict[str, Any] = {
            "url": url or self.url,
            "api": self.api,
            "database": self.database,
            "bucket": self.database,
            "backoff_max": 0.2,
            "timeout": 5.0,
        }
        return InfluxSection(**(settings | overrides))


def read_vm(vm: VictoriaMetrics, measurement: str, count: int) -> list[int]:
    match = f'{{__name__="{measurement}_v"}}'
    vm.export_until(match, lambda series: sum(len(s["values"]) for s in series) >= count)
    vm.flush()  # one more look, so duplicates arriving late would show too
    return sorted(ts for series in vm.export(match) for ts in series["timestamps"])


def read_influx(influx: InfluxDB1, database: str, measurement: str, _count: int) -> list[int]:
    result = influx.query(database, f'SELECT v FROM "{measurement}"', epoch="ms")
    series = result["results"][0].get("series", [])
    return sorted(row[0] for s in series for row in s["values"])


@pytest.fixture(params=["v2", "v1"], ids=["v2-victoriametrics", "v1-influxd"])
def target(
    request: pytest.FixtureRequest,
    victoria_metrics: VictoriaMetrics,
    influxdb1: InfluxDB1,
    unique: str,
) -> Target:
    if request.param == "v2":
        return Target(
            "v2", victoria_metrics.url, unique,
            lambda m, n: read_vm(victoria_metrics, m, n),
        )  # fmt: skip
    influxdb1.create_database(unique)
    return Target(
        "v1", influxdb1.url, unique,
        lambda m, n: read_influx(influxdb1, unique, m, n),
    )  # fmt: skip


@pytest.fixture
def measurement(unique: str) -> str:
    return f"sink_{unique}"


@dataclass
class Run:
    sink: Sink
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)

    @classmethod
    def of(cls, section: InfluxSection) -> Run:
        metrics, health = Metrics(), Health()
        return cls(build_sink(section, metrics, health), metrics, health)

    def errors(self, status: str) -> float:
        labels = {"status": status}
        return self.metrics.registry.get_sample_value("ingestd_write_errors_total", labels) or 0.0

    def count(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0

    @property
    def detail(self) -> str:
        components: Any = self.health.report()["components"]
        return str(components["tsdb"]["detail"])


async def write_all(section: InfluxSection, batches: Sequence[Sequence[bytes]]) -> Run:
    """Write each batch (expecting nothing refused) and close the sink."""
    run = Run.of(section)
    try:
        for batch in batches:
            assert await run.sink.write(batch) == []
    finally:
        await run.sink.close()
    return run


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll for up to 15 s: what we wait on changes in the fault server's thread too."""
    for _ in range(750):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after 15 s waiting for {what}")


def warnings_of(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "tsdb write failed, retrying"]


# --- the happy path and what goes over the wire ----------------------------------------


def test_1000_lines_in_batches_land_exactly_once(target: Target, measurement: str) -> None:
    lines = make_lines(measurement, 1000)
    batches = [lines[i : i + 100] for i in range(0, 1000, 100)]
    run = asyncio.run(write_all(target.section(), batches))
    assert target.read(measurement, 1000) == expected_ms(1000)
    assert run.count("ingestd_batches_written_total") == 10
    assert run.count("ingestd_points_written_total") == 1000
    assert run.count("ingestd_write_seconds_count") == 10
    assert run.health.healthy
    assert run.detail == "ok"


def test_v2_sends_our_lines_verbatim(victoria_metrics: VictoriaMetrics, unique: str) -> None:
    # Escaped tag values, string fields with quotes and non-ASCII text: influxdb-client
    # must pass a bytes record through untouched, only joined by newlines and gzipped.
    lines = [
        f'sink_{unique},site=north\\ field,dev=a\\,b v=1,note="say \\"hi\\"" {BASE_MS * MS}',
        f'sink_{unique},site=süd v=2,note="ü" {(BASE_MS + 1) * MS}',
        f"sink_{unique},site=north v=3i {(BASE_MS + 2) * MS}",
    ]
    batch = [line.encode() for line in lines]
    target = Target("v2", victoria_metrics.url, "farm", lambda m, n: [])
    with FaultServer(victoria_metrics.url) as fs:
        section = target.section(fs.url, token=SecretStr("s3cret"), org="acme", bucket="crops")
        asyncio.run(write_all(section, [batch, []]))
        asyncio.run(write_all(target.section(fs.url, gzip=False), [batch]))
    gzipped, plain = fs.requests  # the empty batch sent nothing
    assert gzipped.body == plain.body == b"\n".join(batch)
    assert gzipped.path == "/api/v2/write"
    assert gzipped.query == {"org": "acme", "bucket": "crops", "precision": "ns"}
    assert gzipped.headers["Content-Encoding"] == "gzip"
    assert int(gzipped.headers["Content-Length"]) != len(gzipped.body)
    assert gzipped.headers["Authorization"] == "Token s3cret"
    assert "Content-Encoding" not in plain.headers
    assert "Authorization" not in plain.headers  # no token: VictoriaMetrics needs none
    assert gzipped.status == plain.status == 204
    # Written twice (VM keeps both copies of a sample): every line landed each time.
    assert read_vm(victoria_metrics, f"sink_{unique}", 6) == sorted(expected_ms(3) * 2)


def test_v1_request_carries_database_precision_and_credentials(
    influxdb1: InfluxDB1, unique: str, measurement: str
) -> None:
    influxdb1.create_database(unique)
    target = Target("v1", influxdb1.url, unique, lambda m, n: read_influx(influxdb1, unique, m, n))
    lines = make_lines(measurement, 5)
    with FaultServer(influxdb1.url) as fs:
        section = target.section(fs.url, username="farmer", password=SecretStr("pw"))
        asyncio.run(write_all(section, [lines]))
    (request,) = fs.requests
    assert request.path == "/write"
    # The credentials travel in the Authorization header, never in the URL (proxy logs,
    # error messages quoting the request).
    assert request.query == {"db": unique, "precision": "ns"}
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"farmer:pw").decode()
    assert request.headers["Content-Encoding"] == "gzip"
    assert request.body == b"\n".join(lines)
    # influxd without auth enabled ignores the credentials.
    assert target.read(measurement, 5) == expected_ms(5)


def test_v1_credentials_are_accepted_by_influxd_with_authentication_on(
    services: ServiceFactory, measurement: str
) -> None:
    influx = services.influxdb1(auth=True)
    influx.create_admin("farmer", "pa:ss w0rd")
    basic = {"Authorization": "Basic " + base64.b64encode(b"farmer:pa:ss w0rd").decode()}
    http_request("POST", f"{influx.url}/query?q=CREATE+DATABASE+farm", headers=basic)
    section = InfluxSection(
        url=influx.url,
        api="v1",
        database="farm",
        username="farmer",
        password=SecretStr("pa:ss w0rd"),
        backoff_max=0.2,
    )
    asyncio.run(write_all(section, [make_lines(measurement, 5)]))
    query = urllib.parse.urlencode({"db": "farm", "q": f'SELECT v FROM "{measurement}"'})
    result = http_request("GET", f"{influx.url}/query?epoch=ms&{query}", headers=basic).json()
    stored = sorted(row[0] for s in result["results"][0]["series"] for row in s["values"])
    assert stored == expected_ms(5)


# --- retriable trouble ------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, 408])
def test_server_errors_are_retried_until_the_batch_lands(
    target: Target, measurement: str, status: int
) -> None:
    lines = make_lines(measurement, 50)
    with FaultServer(target.url) as fs:
        fs.respond(status, times=3, body=b"try later")
        run = asyncio.run(write_all(target.section(fs.url), [lines]))
    assert [r.status for r in fs.requests] == [status, status, status, 204]
    assert target.read(measurement, 50) == expected_ms(50)
    assert run.errors(str(status)) == 3
    assert run.count("ingestd_batches_written_total") == 1
    assert run.count("ingestd_write_seconds_count") == 4
    assert run.health.healthy


def _http_date(ahead: float) -> Callable[[], str]:
    return lambda: email.utils.formatdate(time.time() + ahead, usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "backoff_max", "waited"),
    [
        # Delta-seconds: honoured (the backoff alone would wait at most 0.2 s here).
        (lambda: "1", 2.0, (0.95, 10.0)),
        # An HTTP date (whole seconds, so 2 to 3 s ahead when sent): honoured.
        (_http_date(3), 10.0, (1.5, 10.0)),
        # An HTTP date an hour ahead: still capped at backoff_max.
        (_http_date(3600), 0.3, (0.0, 5.0)),
    ],
    ids=["seconds", "http-date", "http-date-capped"],
)
def test_429_retry_after_is_honoured_up_to_backoff_max(
    target: Target,
    measurement: str,
    retry_after: Callable[[], str],
    backoff_max: float,
    waited: tuple[float, float],
) -> None:
    lines = make_lines(measurement, 20)
    with FaultServer(target.url) as fs:
        fs.respond(429, retry_after=retry_after())
        run = asyncio.run(write_all(target.section(fs.url, backoff_max=backoff_max), [lines]))
    throttled, accepted = fs.requests
    assert (throttled.status, accepted.status) == (429, 204)
    assert throttled.answered is not None
    lower, upper = waited
    assert lower <= accepted.received - throttled.answered < upper
    assert target.read(measurement, 20) == expected_ms(20)
    assert run.errors("429") == 1


def test_a_hang_longer_than_the_timeout_is_retried(target: Target, measurement: str) -> None:
    lines = make_lines(measurement, 30)
    with FaultServer(target.url) as fs:
        fs.hang(30)
        run = asyncio.run(write_all(target.section(fs.url, timeout=0.5), [lines]))
    assert [(r.fault, r.status) for r in fs.requests] == [("hang", None), (None, 204)]
    assert target.read(measurement, 30) == expected_ms(30)
    assert run.errors("timeout") == 1


def test_a_dropped_connection_is_retried(target: Target, measurement: str) -> None:
    lines = make_lines(measurement, 30)
    with FaultServer(target.url) as fs:
        fs.drop(times=2)
        run = asyncio.run(write_all(target.section(fs.url), [lines]))
    assert [r.fault for r in fs.requests] == ["drop", "drop", None]
    assert target.read(measurement, 30) == expected_ms(30)
    assert run.errors("connection") == 2


def test_413_splits_the_batch_until_it_fits(target: Target, measurement: str) -> None:
    lines = make_lines(measurement, 100)
    with FaultServer(target.url) as fs:
        fs.respond(413, times=2, body=b"request entity too large")
        run = asyncio.run(write_all(target.section(fs.url), [lines]))
    assert [(len(r.lines), r.status) for r in fs.requests] == [
        (100, 413), (50, 413), (25, 204), (25, 204), (50, 204)
    ]  # fmt: skip
    assert target.read(measurement, 100) == expected_ms(100)
    assert run.count("ingestd_batches_written_total") == 3
    assert run.count("ingestd_points_written_total") == 100
    assert run.errors("413") == 2


def test_a_single_line_too_large_is_refused(target: Target, measurement: str) -> None:
    (line,) = make_lines(measurement, 1)

    async def scenario() -> list[Refused]:
        run = Run.of(target.section(fs.url))
        try:
            return await run.sink.write([line])
        finally:
            await run.sink.close()

    with FaultServer(target.url) as fs:
        fs.respond(413, times=None, body=b"request entity too large")
        refused = asyncio.run(scenario())
    assert refused == [Refused(line, 413, "request entity too large")]


# --- what the real servers refuse -------------------------------------------------------


def test_influxd_field_type_conflict_refuses_only_the_bad_line(
    influxdb1: InfluxDB1, unique: str, measurement: str
) -> None:
    influxdb1.create_database(unique)
    influxdb1.write(unique, f"{measurement} f=1.0 {(BASE_MS - 1) * MS}")
    lines = [f"{measurement} f={i}.5 {(BASE_MS + i) * MS}".encode() for i in range(200)]
    bad = f'{measurement} f="text" {(BASE_MS + 137) * MS}'.encode()
    lines[137] = bad
    target = Target("v1", influxdb1.url, unique, lambda m, n: [])

    async def scenario() -> tuple[list[Refused], Run]:
        run = Run.of(target.section())
        try:
            return await run.sink.write(lines), run
        finally:
            await run.sink.close()

    refused, run = asyncio.run(scenario())
    assert len(refused) == 1
    assert refused[0].line == bad
    assert refused[0].status == 400
    # influxd 1.6 answers a batch with a conflicting line with 400 "partial write": it
    # stores the rest; the sink bisects until the one line is left.
    assert refused[0].reason == (
        f'partial write: field type conflict: input field "f" on measurement "{measurement}" '
        "is type string, already exists as type float dropped=1"
    )
    result = influxdb1.query(unique, f'SELECT f FROM "{measurement}"', epoch="ms")
    stored = {row[0]: row[1] for row in result["results"][0]["series"][0]["values"]}
    assert len(stored) == 200  # the first point plus the 199 good lines
    assert BASE_MS + 137 not in stored
    assert stored[BASE_MS + 199] == 199.5
    assert run.health.healthy
    assert run.count("ingestd_points_written_total") == 199


def test_victoria_metrics_skips_an_unparseable_line(
    victoria_metrics: VictoriaMetrics, measurement: str
) -> None:
    # VictoriaMetrics 1.79 does not refuse a line it cannot parse: it logs
    # 'cannot unmarshal InfluxDB line "...": ...; skipping it', drops that line, stores
    # the rest and answers 204. So nothing comes back as Refused, and the line is gone
    # without a dead letter; only VM's log (and its vm_rows_invalid_total) tells.
    lines = make_lines(measurement, 200)
    garbage = f"{measurement} this line is not line protocol".encode()
    lines[66] = garbage
    target = Target("v2", victoria_metrics.url, "farm", lambda m, n: [])
    run = asyncio.run(write_all(target.section(), [lines]))
    assert read_vm(victoria_metrics, measurement, 199) == [
        ts for ts in expected_ms(200) if ts != BASE_MS + 66
    ]
    assert run.count("ingestd_points_written_total") == 200  # as far as the sink knows
    assert f'cannot unmarshal InfluxDB line "{garbage.decode()}"' in (
        victoria_metrics.log_path.read_text()
    )


# --- outages, operator errors, shutdown -------------------------------------------------


def test_tsdb_outage_waits_and_recovers(services: Any, measurement: str) -> None:
    vm: VictoriaMetrics = services.victoria_metrics()
    target = Target("v2", vm.url, "farm", lambda m, n: read_vm(vm, m, n))
    first, second = make_lines(measurement, 100), make_lines(measurement, 100, start=100)

    async def scenario() -> tuple[Run, list[str], list[MutableMapping[str, Any]]]:
        with structlog.testing.capture_logs() as logs:
            run = Run.of(target.section())
            try:
                assert await run.sink.write(first) == []
                await asyncio.to_thread(vm.stop)
                task = asyncio.create_task(run.sink.write(second))
                await until(lambda: run.errors("connection") >= 3, "three failed attempts")
                during = [run.detail, str(run.health.healthy)]
                await asyncio.to_thread(vm.start)
                assert await asyncio.wait_for(task, 30) == []
            finally:
                await run.sink.close()
        return run, during, logs

    run, (detail, healthy), logs = asyncio.run(scenario())
    assert healthy == "False"
    assert f"cannot reach the TSDB at {vm.url}" in detail
    assert "this batch: 100 readings" in detail
    assert "retrying in" in detail
    assert run.health.healthy
    assert run.detail == "ok"
    assert target.read(measurement, 200) == expected_ms(200)
    # One warning for the whole outage, however many attempts failed; one recovery line.
    assert len(warnings_of(logs)) == 1
    (recovered,) = [e for e in logs if e["event"] == "tsdb writes recovered"]
    assert recovered["down_seconds"] > 0
    assert recovered["failed_requests"] >= 3
    assert run.count("ingestd_batches_written_total") == 2


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_keep_the_data_and_say_what_to_fix(
    target: Target, measurement: str, status: int
) -> None:
    lines = make_lines(measurement, 40)
    # What the real servers say: InfluxDB 2.x a JSON "message", 1.x a JSON "error".
    body = (
        b'{"code":"unauthorized","message":"unauthorized access"}'
        if target.api == "v2"
        else b'{"error":"authorization failed"}'
    )
    reason = "unauthorized access" if target.api == "v2" else "authorization failed"
    fix = "influx.token" if target.api == "v2" else "influx.username"

    async def scenario() -> tuple[Run, str, list[MutableMapping[str, Any]]]:
        with structlog.testing.capture_logs() as logs:
            run = Run.of(target.section(fs.url, backoff_max=0.05))
            try:
                task = asyncio.create_task(run.sink.write(lines))
                await until(lambda: fs.arrived >= 5, "five refused attempts")
                detail = run.detail
                fs.clear()
                assert await asyncio.wait_for(task, 30) == []
            finally:
                await run.sink.close()
        return run, detail, logs

    with FaultServer(target.url) as fs:
        fs.respond(status, times=None, body=body)
        run, detail, logs = asyncio.run(scenario())
    assert f"({status}: {reason})" in detail
    assert fix in detail
    assert "this batch: 40 readings" in detail
    assert run.errors(str(status)) >= 5
    assert target.read(measurement, 40) == expected_ms(40)
    assert run.health.healthy
    (warning,) = warnings_of(logs)
    assert fix in warning["problem"]


def test_influxd_missing_database_is_retried_until_created(
    influxdb1: InfluxDB1, unique: str, measurement: str
) -> None:
    target = Target("v1", influxdb1.url, unique, lambda m, n: read_influx(influxdb1, unique, m, n))
    lines = make_lines(measurement, 10)

    async def scenario() -> tuple[Run, str]:
        run = Run.of(target.section())
        try:
            task = asyncio.create_task(run.sink.write(lines))
            await until(lambda: run.errors("404") >= 2, "two 404s")
            detail = run.detail
            await asyncio.to_thread(influxdb1.create_database, unique)
            assert await asyncio.wait_for(task, 30) == []
        finally:
            await run.sink.close()
        return run, detail

    run, detail = asyncio.run(scenario())
    assert f'(404: database not found: "{unique}")' in detail
    assert "influx.database" in detail
    assert target.read(measurement, 10) == expected_ms(10)
    assert run.health.healthy


@pytest.mark.parametrize("fault", ["backoff", "hang"])
def test_cancelling_a_retrying_write_is_prompt(
    target: Target, measurement: str, fault: str
) -> None:
    lines = make_lines(measurement, 10)

    async def scenario() -> float:
        # Long waits on both sides: only cancellation can end this write quickly.
        run = Run.of(target.section(fs.url, backoff_max=60, timeout=60))
        try:
            task = asyncio.create_task(run.sink.write(lines))
            await until(lambda: fs.arrived >= (4 if fault == "backoff" else 1), "attempts")
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - started
        finally:
            await run.sink.close()

    with FaultServer(target.url) as fs:
        if fault == "backoff":
            fs.respond(503, times=None)
        else:
            fs.hang(60)
        took = asyncio.run(scenario())
    assert took < 1.0
    assert all(r.status != 204 for r in fs.requests)
