"""The HTTP endpoint bounds what a client can hold: its connections (a cap, the idlest closed
first so /healthz still gets in), the time to send a request head, idle keep-alive, and the
event loop while /metrics is rendered. Against the real endpoint on a loopback port; the
end-to-end flood against a running daemon is in test_http_flood.py."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from services import free_port

from ingestd.cli import main
from ingestd.config import HttpSection
from ingestd.health import Health
from ingestd.http import HttpServer
from ingestd.metrics import Metrics

WAIT = 20.0  # seconds: generous, never a measure of speed


class Served:
    def __init__(self, server: HttpServer, metrics: Metrics, port: int) -> None:
        self.server = server
        self.metrics = metrics
        self.port = port

    def closed(self, reason: str) -> float:
        return sample(self.metrics.http_closed, "_total", reason=reason)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        """One request on a new connection; (status, body)."""
        reader, writer = await self.connect()
        try:
            return await request(reader, writer, path)
        finally:
            writer.close()


@asynccontextmanager
async def serving(**http: Any) -> AsyncIterator[Served]:
    port = free_port()
    metrics = Metrics()
    health = Health(ready=True)
    health.ok("spool")
    server = HttpServer(HttpSection(listen=f"127.0.0.1:{port}", **http), health, metrics)
    await server.start()
    try:
        yield Served(server, metrics, port)
    finally:
        await server.close()


async def request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, bytes]:
    """GET ``path`` on an open (kept-alive) connection; (status, body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: ingestd\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await asyncio.wait_for(reader.readexactly(length), WAIT)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(int(WAIT / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not {what} within {WAIT}s")


def sample(metric: MetricWrapperBase, suffix: str = "", **labels: str) -> float:
    """A metric's value, read from the metric itself (a registry read would run the
    tests' blocking collector)."""
    for family in metric.collect():
        for found in family.samples:
            if found.name == family.name + suffix and found.labels == labels:
                return found.value
    return 0.0


def open_count(served: Served) -> float:
    return sample(served.metrics.http_connections)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (within WAIT) without sending anything."""
    try:
        data = await asyncio.wait_for(reader.read(1), WAIT)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


def test_a_request_head_trickled_a_byte_at_a_time_is_cut_off_at_the_header_timeout() -> None:
    """Slowloris: aiohttp alone waited about an hour for the end of the head."""

    async def scenario() -> None:
        async with serving(header_timeout="1s") as served:
            reader, writer = await served.connect()
            writer.write(b"GET /alerts HTTP/1.1\r\nHost: ingestd\r\n")

            async def trickle() -> None:
                for byte in b"X-Slow: " + b"a" * 10_000:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.1)

            trickling = asyncio.create_task(trickle())
            try:
                assert await closed_by_server(reader), "the trickled head was never cut off"
            finally:
                trickling.cancel()
                writer.close()
            assert served.closed("header_timeout") == 1
            # a client that sends its request at once is served as before
            assert (await served.get("/healthz"))[0] == 200

    asyncio.run(scenario())


def test_a_connection_kept_alive_and_idle_is_closed_after_the_idle_timeout() -> None:
    async def scenario() -> None:
        async with serving(idle_timeout="1s", header_timeout="60s") as served:
            reader, writer = await served.connect()
            for _ in range(3):  # requests on one connection, as Prometheus keeps one
                assert (await request(reader, writer, "/healthz"))[0] == 200
            assert await closed_by_server(reader), "an idle kept-alive connection stayed"
            writer.close()
            assert served.closed("idle") == 1
            assert served.closed("header_timeout") == 0

    asyncio.run(scenario())


def test_past_max_connections_the_idlest_is_closed_and_healthz_still_answers() -> None:
    async def scenario() -> None:
        async with serving(max_connections=4, header_timeout="60s") as served:
            idle = [await served.connect() for _ in range(4)]
            await until(lambda: open_count(served) == 4, "four connections open")

            status, body = await served.get("/healthz")
            assert status == 200 and b'"status": "ok"' in body
            assert await closed_by_server(idle[0][0]), "the idlest connection stayed open"
            assert served.closed("evicted") == 1
            # the next three were left alone, in their order: each still takes a request,
            # which makes it the most recently active (the next to go is the one after)
            for reader, writer in idle[1:]:
                assert (await request(reader, writer, "/readyz"))[0] == 200
            assert served.closed("evicted") == 1
            await until(lambda: open_count(served) == 3, "the probe's connection gone")
            assert (await served.get("/healthz"))[0] == 200
            assert await closed_by_server(idle[1][0])
            for _, writer in idle:
                writer.close()

    asyncio.run(scenario())


class BlockingCollector(Collector):
    """A collector that holds a /metrics render until released: a stand-in for a big
    registry, and a count of how many renders ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.calls += 1
        self.release.wait(WAIT)
        yield GaugeMetricFamily("test_render_held", "held until released", value=1)


def test_a_scrape_never_holds_the_event_loop_and_scrapes_at_once_share_one_render() -> None:
    async def scenario() -> None:
        async with serving(header_timeout="60s") as served:
            collector = BlockingCollector()
            served.metrics.registry.register(collector)
            scrapes = [asyncio.create_task(served.get("/metrics")) for _ in range(10)]
            await until(lambda: collector.calls == 1, "a render started (and held)")
            # the loop goes on meanwhile: health answers while the scrapes wait
            assert (await asyncio.wait_for(served.get("/healthz"), WAIT))[0] == 200
            assert not any(scrape.done() for scrape in scrapes)
            collector.release.set()
            answers = await asyncio.wait_for(asyncio.gather(*scrapes), WAIT)
            assert all(
                status == 200 and b"test_render_held 1.0" in body for status, body in answers
            )
            assert collector.calls == 1  # one render served all ten
            # a scrape after a render gets a new one, never the old body (after a pause
            # that keeps renders to a fifth of the time)
            status, _ = await served.get("/metrics")
            assert status == 200 and collector.calls == 2

    asyncio.run(scenario())


def test_with_every_connection_in_a_request_a_new_one_is_closed_at_once() -> None:
    async def scenario() -> None:
        async with serving(max_connections=2, header_timeout="60s") as served:
            collector = BlockingCollector()
            served.metrics.registry.register(collector)
            scrapes = [asyncio.create_task(served.get("/metrics")) for _ in range(2)]
            await until(lambda: collector.calls == 1, "a render started (and held)")
            await until(lambda: open_count(served) == 2, "both scrapes connected")
            reader, writer = await served.connect()
            assert await closed_by_server(reader), "a third connection was let in"
            writer.close()
            assert served.closed("refused") == 1
            assert served.closed("evicted") == 0  # a request in progress is never cut off
            collector.release.set()
            answers = await asyncio.wait_for(asyncio.gather(*scrapes), WAIT)
            assert [status for status, _ in answers] == [200, 200]

    asyncio.run(scenario())


def test_the_limits_are_settings_and_none_may_close_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("INGESTD_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "ingestd.yaml"
    config.write_text("http:\n  max_connections: 0\n  header_timeout: 0s\n  idle_timeout: 2m\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "http.max_connections = 0: Input should be greater than or equal to 1" in err
    assert "http.header_timeout = '0s': Input should be greater than 0" in err
    assert "idle_timeout" not in err
    config.write_text("http:\n  max_connections: 16\n  header_timeout: 3s\n  idle_timeout: 2m\n")
    assert main(["check", "--config", str(config)]) == 0
