"""The latest values: merging on the hot path, the Redis backend (real Redis), the memory
backend's expiry, and waiting out a Redis outage."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

import orjson
import redis
from conftest import ServiceFactory
from services import Redis

from ingestd.config import LatestSection, RedisSection
from ingestd.health import Health
from ingestd.latest import KEY_PREFIX, Latest, MemoryLatest, RedisLatest, field_key
from ingestd.metrics import Metrics
from ingestd.model import Reading
from ingestd.store.redis import connect

T0 = 1_790_000_000_000_000_000  # ns


def reading(device: str, when: int, measurement: str = "reservoir", **fields: Any) -> Reading:
    return Reading(measurement, device, {"site": "g1"}, dict(fields), when)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stage(
    client: Any = None, *, ttl: float = 3600, clock: Callable[[], float] | None = None
) -> tuple[Latest, Metrics, Health]:
    metrics, health = Metrics(), Health()
    section = LatestSection(ttl=ttl, interval=0.1)
    kwargs = {"clock": clock} if clock else {}
    return Latest(section, metrics, health, client, **kwargs), metrics, health


def stats(admin: redis.Redis, section: str) -> dict[str, Any]:
    return admin.info(section)  # type: ignore[no-any-return]


def test_field_keys_name_measurement_and_field_and_never_meet() -> None:
    assert field_key("reservoir", "ph") == "reservoir.ph"
    assert field_key("a.b", "c") != field_key("a", "b.c")
    assert field_key("a\\", "b") != field_key("a", "\\b")


def test_one_pipelined_write_per_interval_holding_the_newest_value_per_field(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    admin = server.client()
    devices = [f"{unique}-{n}" for n in range(6)]

    async def scenario() -> None:
        client = connect(RedisSection(url=server.url))
        latest, metrics, _ = stage(client)
        try:
            latest.observe([reading(devices[0], T0, ph=5.0)])
            assert await latest.flush()  # loads the script (a fresh Redis): not measured
            # 600 readings, newest last for some fields and first for others
            for n in range(50):
                for device in devices:
                    latest.observe([reading(device, T0 + n, ph=6.0 + n / 100)])
                    latest.observe([reading(device, T0 + 1000 - n, ec=2.0 - n / 100)])
            admin.config_resetstat()
            reads_before = stats(admin, "stats")["total_reads_processed"]
            assert await latest.flush()
            reads = stats(admin, "stats")["total_reads_processed"] - reads_before - 1
            commands = stats(admin, "commandstats")
            # one script call for them all, one HSET per device: not one per reading (600)
            assert commands["cmdstat_evalsha"]["calls"] == 1
            assert commands["cmdstat_hset"]["calls"] == len(devices)
            # in one round trip: the server read the request in one go (a command per
            # device, each waiting for its answer, would take a read each)
            assert reads == 1, reads
            assert metrics.registry.get_sample_value("ingestd_latest_writes_total") == 2
            assert metrics.registry.get_sample_value("ingestd_latest_values_written_total") == 13
            values = (await latest.read(devices[1]))[devices[1]]
            assert values["reservoir.ph"]["value"] == 6.49
            assert values["reservoir.ph"]["time_ns"] == T0 + 49
            assert values["reservoir.ec"]["value"] == 2.0  # the newest, though observed first
            # nothing new: no write at all
            admin.config_resetstat()
            assert await latest.flush()
            assert "cmdstat_evalsha" not in stats(admin, "commandstats")

            # many script calls (here two values each) still go in one round trip
            latest.backend = RedisLatest(client, 3600, call_values=2)
            for device in devices:
                latest.observe([reading(device, T0 + 2000, ph=7.0, ec=1.0)])
            admin.config_resetstat()
            reads_before = stats(admin, "stats")["total_reads_processed"]
            assert await latest.flush()
            reads = stats(admin, "stats")["total_reads_processed"] - reads_before - 1
            assert stats(admin, "commandstats")["cmdstat_evalsha"]["calls"] == len(devices)
            assert reads == 1, reads
        finally:
            await client.aclose()

    asyncio.run(scenario())
    stored = admin.hgetall(KEY_PREFIX + devices[1])
    assert set(stored) == {b"reservoir.ph", b"reservoir.ec"}
    ph = orjson.loads(stored[b"reservoir.ph"])
    assert ph == {
        "time_ns": T0 + 2000,
        "time": "2026-09-21T14:13:20.000Z",
        "measurement": "reservoir",
        "field": "ph",
        "value": 7.0,
        "tags": {"site": "g1"},
    }
    assert orjson.loads(stored[b"reservoir.ec"])["value"] == 1.0
    assert orjson.loads(admin.hget(KEY_PREFIX + devices[0], "reservoir.ph"))["value"] == 7.0
    admin.close()


def test_ttl_set_and_refreshed_and_an_older_value_never_replaces_a_newer_one(
    redis_server: Redis, unique: str
) -> None:
    admin = redis_server.client()
    device, key = f"d{unique}", KEY_PREFIX + f"d{unique}"

    async def scenario() -> None:
        client = connect(RedisSection(url=redis_server.url))
        first, _, _ = stage(client, ttl=3600)
        second, _, _ = stage(client, ttl=3600)  # another instance sharing the subscription
        try:
            first.observe([reading(device, T0 + 300, ph=6.3, ec=1.9)])
            assert await first.flush()
            assert 3_590_000 < admin.pttl(key) <= 3_600_000
            admin.pexpire(key, 5000)  # as if nearly an hour passed

            # a late reading (a device's backlog, or the other instance) stays behind
            second.observe([reading(device, T0 + 250, ph=9.9, ec=1.5, water_temp=20.5)])
            assert await second.flush()
            assert 3_590_000 < admin.pttl(key) <= 3_600_000  # refreshed by the write
            values = (await first.read(device))[device]
            assert values["reservoir.ph"]["value"] == 6.3
            assert values["reservoir.ec"]["value"] == 1.9
            assert values["reservoir.water_temp"]["value"] == 20.5  # new field: taken

            second.observe([reading(device, T0 + 301, ph=6.4)])  # newer: replaces
            first.observe([reading(device, T0 + 300, ec=1.8)])  # same time: replaces
            assert await second.flush() and await first.flush()
            values = (await second.read(device))[device]
            assert values["reservoir.ph"]["value"] == 6.4
            assert values["reservoir.ec"]["value"] == 1.8

            everything = await first.read()
            assert everything[device] == values
            assert await first.read(f"unknown-{unique}") == {}
        finally:
            await client.aclose()

    asyncio.run(scenario())
    admin.close()


def test_memory_backend_expires_a_silent_device_after_the_ttl() -> None:
    clock = Clock()

    async def scenario() -> None:
        latest, _, health = stage(None, ttl=60, clock=clock)
        assert health.report()["components"] == {
            "latest": {"ok": True, "detail": "in memory (no redis.url)"}
        }
        latest.observe([reading("quiet", T0, ph=6.1), reading("busy", T0, ph=6.2)])
        latest.observe([reading("busy", T0 - 5, ph=9.9)])  # older: ignored
        assert await latest.flush()
        assert set(await latest.read()) == {"busy", "quiet"}
        assert (await latest.read("busy"))["busy"]["reservoir.ph"]["value"] == 6.2

        clock.now += 59
        latest.observe([reading("busy", T0 + 1, ec=1.7)])
        assert await latest.flush()  # busy written again: its TTL starts over
        assert set(await latest.read()) == {"busy", "quiet"}

        clock.now += 2  # quiet: 61 s since its last write
        assert await latest.flush()  # nothing to write; still sweeps
        backend = latest.backend
        assert isinstance(backend, MemoryLatest)
        assert len(backend) == 1  # swept, not merely hidden
        assert await latest.read("quiet") == {}
        busy = (await latest.read())["busy"]
        assert set(busy) == {"reservoir.ph", "reservoir.ec"}  # kept its older fields too

        clock.now += 60
        assert await latest.read() == {}
        assert len(backend) == 0

    asyncio.run(scenario())


def test_redis_outage_keeps_only_the_newest_values_and_catches_up_when_it_returns(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    clock = Clock()
    device, old = f"d{unique}", f"gone{unique}"

    async def scenario() -> None:
        client = connect(RedisSection(url=server.url, timeout=0.5))
        latest, metrics, health = stage(client, ttl=600, clock=clock)
        pending = "ingestd_latest_pending"
        try:
            latest.observe([reading(device, T0, ph=6.0)])
            assert await latest.flush()
            server.stop()

            latest.observe([reading(old, T0, ph=7.0)])
            for n in range(1, 1001):  # a thousand readings while Redis is away
                latest.observe([reading(device, T0 + n, ph=6.0 + n / 1000, ec=1.8)])
                if n % 100 == 0:
                    clock.now += 1
                    assert not await latest.flush()
            # bounded: the newest per device and field, not a thousand readings
            assert metrics.registry.get_sample_value(pending) == 3
            report = health.report()
            assert report["status"] == "degraded"
            detail = report["components"]["latest"]["detail"]
            assert "Redis unavailable" in detail and "ingestion goes on" in detail
            errors = metrics.registry.get_sample_value("ingestd_latest_write_errors_total")
            assert errors == 10

            clock.now += 595  # `old` has not been seen for 600 s: Redis would drop it too
            assert not await latest.flush()
            assert metrics.registry.get_sample_value(pending) == 2

            server.start()  # empty, without the script: loaded again by itself
            assert await latest.flush()
            assert health.report()["status"] == "ok"
            assert metrics.registry.get_sample_value(pending) == 0
            values = await latest.read()
            assert set(values) == {device}
            assert values[device]["reservoir.ph"]["value"] == 7.0
            assert values[device]["reservoir.ph"]["time_ns"] == T0 + 1000
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_hung_redis_costs_a_write_not_the_hot_path(services: ServiceFactory, unique: str) -> None:
    server: Redis = services.redis()
    device = f"d{unique}"
    assert server.pid is not None

    async def scenario() -> None:
        client = connect(RedisSection(url=server.url, timeout=0.3))
        latest, _, health = stage(client)
        try:
            latest.observe([reading(device, T0, ph=6.0)])
            assert await latest.flush()
            os.kill(server.pid, signal.SIGSTOP)  # accepts connections, answers nothing
            try:
                latest.observe([reading(device, T0 + 1, ec=1.8)])
                writing = asyncio.create_task(latest.flush())
                await asyncio.sleep(0)  # the write is on its way, waiting for an answer
                for n in range(1, 1001):  # the hot path goes on meanwhile
                    latest.observe([reading(device, T0 + n, ph=6.0 + n / 1000)])
                assert not await writing  # no answer within redis.timeout: failed
                detail = health.report()["components"]["latest"]["detail"]
                assert "Redis unavailable" in detail and "Timeout" in detail, detail
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert await latest.flush()
            assert health.report()["status"] == "ok"
            assert (await latest.read(device))[device]["reservoir.ph"]["value"] == 7.0
        finally:
            await client.aclose()

    asyncio.run(scenario())
