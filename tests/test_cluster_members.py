"""Cluster membership against a real Redis: what a heartbeat says (rates over one beat),
a dead instance leaving the list, a graceful leave, a Redis restart under a running
heartbeat, lease owners, and ``ingestd status --cluster``."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import ServiceFactory
from services import Redis, free_port

import ingestd
from ingestd.cli import main
from ingestd.cluster.members import (
    LEASE_PREFIX,
    MEMBER_PREFIX,
    MEMBERS_KEY,
    ClusterUnavailable,
    Members,
    lease_owners,
    list_members,
)
from ingestd.config import ClusterSection, RedisSection, Settings
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.operator import cluster_status
from ingestd.store.redis import connect

ESC = "\x1b["


class Clock:
    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Beats:
    """The real time, counting the calls: Members reads the clock once per heartbeat."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> float:
        self.count += 1
        return time.time()


async def until(predicate: Callable[[], Any], what: str, within: float = 10) -> None:
    """Poll (async predicates too) until true, for at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        found = predicate()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(0.02)


def section(instance: str, heartbeat: float = 30.0, partitions: int = 4) -> ClusterSection:
    return ClusterSection(
        enabled=True, instance=instance, heartbeat=heartbeat, partitions=partitions
    )


def member(
    client: Any, instance: str, heartbeat: float = 30.0, **kwargs: Any
) -> tuple[Members, Metrics, Health]:
    metrics, health = Metrics(), Health()
    return Members(section(instance, heartbeat), client, metrics, health, **kwargs), metrics, health


def cluster_problem(health: Health) -> bool:
    components: dict[str, dict[str, Any]] = health.report()["components"]  # type: ignore[assignment]
    return "heartbeat" in components and not components["heartbeat"]["ok"]


def cluster_ok(health: Health) -> bool:
    components: dict[str, dict[str, Any]] = health.report()["components"]  # type: ignore[assignment]
    return "heartbeat" in components and bool(components["heartbeat"]["ok"])


def stored(admin: Any, instance: str) -> dict[str, str]:
    """The member's hash as Redis holds it."""
    return {k.decode(): v.decode() for k, v in admin.hgetall(MEMBER_PREFIX + instance).items()}


def settings_for(url: str, *, enabled: bool = True, partitions: int = 4) -> Settings:
    document: dict[str, Any] = {"redis": {"url": url, "timeout": "300ms"}}
    if enabled:
        document |= {
            "cluster": {"enabled": True, "instance": "cli", "partitions": partitions},
            "mqtt": {"share_group": "ingestd"},
            "notify": {"outbox": "postgres"},
            "postgres": {"url": "postgresql://ingestd@127.0.0.1:1/ingestd"},  # never used
        }
    return Settings(**document)


# --- heartbeats ---------------------------------------------------------------------------


def test_a_heartbeat_says_who_and_how_fast_over_the_last_beat(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    admin = server.client()
    clock = Clock()
    name = f"node-{unique}"
    start = clock.now

    async def scenario() -> None:
        client = connect(RedisSection(url=server.url))
        members, metrics, health = member(client, name, heartbeat=2.0, clock=clock)
        try:
            metrics.received.inc(50)  # since the start: counted in the first beat
            clock.now += 10
            assert await members.beat()
            first = stored(admin, name)
            assert first["received_per_s"] == "5.000"
            assert first["accepted_per_s"] == "0.000"
            assert first["partitions"] == ""

            metrics.received.inc(100)
            metrics.accepted.inc(80)
            metrics.points_written.inc(60)
            metrics.spool_records.set(7)
            members.set_partitions([5, 1, 3, 1])
            clock.now += 20
            assert await members.beat()

            assert stored(admin, name) == {
                "instance": name,
                "host": socket.gethostname(),
                "pid": str(os.getpid()),
                "version": ingestd.__version__,
                "started_at": repr(start),
                "beat_at": repr(start + 30),
                "received_per_s": "5.000",  # 100 in the last 20 s, not 150 in 30
                "accepted_per_s": "4.000",
                "written_per_s": "3.000",
                "spool_waiting": "7",
                "partitions": "1,3,5",
            }
            assert 5000 < admin.pttl(MEMBER_PREFIX + name) <= 6000  # 3 x heartbeat
            assert admin.zscore(MEMBERS_KEY, name) == start + 30
            assert cluster_ok(health)

            (listed,) = await list_members(client, now=start + 32)
            assert listed["instance"] == name
            assert listed["pid"] == os.getpid()
            assert listed["uptime"] == 32 and listed["since_beat"] == 2
            assert listed["received_per_s"] == 5.0 and listed["written_per_s"] == 3.0
            assert listed["spool_waiting"] == 7
            assert listed["partitions"] == [1, 3, 5]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_dead_instance_leaves_the_list_and_the_set_while_a_live_one_stays(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    admin = server.client()
    alive, dead = f"a-{unique}", f"b-{unique}"

    async def names(client: Any) -> list[str]:
        return [m["instance"] for m in await list_members(client)]

    async def scenario() -> None:
        client = connect(RedisSection(url=server.url))
        a, _, _ = member(client, alive, heartbeat=0.2)
        b, _, _ = member(client, dead, heartbeat=0.2)
        running = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
        try:
            await until(lambda: names(client), "both instances listed")
            assert await names(client) == [alive, dead]
            first_beat = admin.zscore(MEMBERS_KEY, alive)
            running[1].cancel()  # a crash: no leave()

            async def only_alive() -> bool:
                return await names(client) == [alive]

            await until(only_alive, f"{dead} gone after 3 heartbeats", within=5)
            assert admin.exists(MEMBER_PREFIX + dead) == 0
            assert admin.zscore(MEMBERS_KEY, dead) is None  # removed by the reader
            # `alive` kept beating through several expiry periods of its own hash
            assert admin.zscore(MEMBERS_KEY, alive) > first_beat  # type: ignore[operator]
            assert await names(client) == [alive]
            assert not running[0].done()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await client.aclose()

    asyncio.run(scenario())


def test_leave_takes_the_instance_out_at_once_and_it_stays_out(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    admin = server.client()
    name = f"node-{unique}"

    async def scenario() -> list[MutableMapping[str, Any]]:
        client = connect(RedisSection(url=server.url, timeout=0.3))
        members, _, _ = member(client, name, heartbeat=0.2)
        task = asyncio.create_task(members.run())
        try:
            await until(lambda: admin.exists(MEMBER_PREFIX + name), "registered")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await members.leave()
            assert admin.exists(MEMBER_PREFIX + name) == 0
            assert admin.zscore(MEMBERS_KEY, name) is None
            assert await list_members(client) == []
            assert not await members.beat()  # a late beat does not bring it back
            assert admin.zcard(MEMBERS_KEY) == 0

            # Redis gone: leave() gives up within the client's timeout, without raising.
            again, _, _ = member(client, f"x-{unique}")
            await asyncio.to_thread(server.stop)
            with structlog.testing.capture_logs() as logs:
                async with asyncio.timeout(3):
                    await again.leave()
            return logs
        finally:
            await client.aclose()

    logs = asyncio.run(scenario())
    (warning,) = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"].startswith("could not leave the cluster")


def test_a_redis_restart_costs_heartbeats_not_the_heartbeat_task(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    admin = server.client()
    name = f"node-{unique}"

    async def scenario() -> tuple[list[MutableMapping[str, Any]], str]:
        client = connect(RedisSection(url=server.url, timeout=0.3))
        beats = Beats()
        members, _, health = member(client, name, heartbeat=0.1, clock=beats)
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(members.run())
            try:
                await until(lambda: cluster_ok(health), "registered")
                await asyncio.to_thread(server.stop)
                await until(lambda: cluster_problem(health), "the outage in /healthz")
                report: dict[str, Any] = health.report()
                detail = str(report["components"]["heartbeat"]["detail"])
                failed = beats.count
                await until(lambda: beats.count >= failed + 3, "more failed beats")
                assert not task.done()
                # Restarted empty (no persistence): the next beat registers it again.
                await asyncio.to_thread(server.start)
                await until(lambda: cluster_ok(health), "ok again in /healthz")
                assert admin.exists(MEMBER_PREFIX + name) == 1
                assert [m["instance"] for m in await list_members(client)] == [name]
                assert not task.done()
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await client.aclose()
        return logs, detail

    logs, detail = asyncio.run(scenario())
    assert "Redis unavailable" in detail and name in detail and "ingestion goes on" in detail
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings  # one per outage, however many beats failed
    assert warnings[0]["instance"] == name and warnings[0]["error"]
    (back,) = [e for e in logs if e["log_level"] == "info"]
    assert "get through again" in back["event"] and back["down_seconds"] > 0


# --- leases and unreachable Redis --------------------------------------------------------


def test_lease_owners_name_the_instance_before_the_last_colon(
    services: ServiceFactory,
) -> None:
    server: Redis = services.redis()
    admin = server.client()
    admin.set(LEASE_PREFIX + "0", "node-a:7c1e")
    admin.set(LEASE_PREFIX + "2", "node.b@farm-2:9f3c")
    admin.set(LEASE_PREFIX + "3", "odd:name:token")
    admin.set(LEASE_PREFIX + "5", "node-a:beyond")  # not one of the 5 partitions

    async def scenario() -> tuple[dict[int, str | None], dict[int, str | None]]:
        client = connect(RedisSection(url=server.url))
        try:
            return await lease_owners(client, 5), await lease_owners(client, 0)
        finally:
            await client.aclose()

    owners, none = asyncio.run(scenario())
    assert owners == {0: "node-a", 1: None, 2: "node.b@farm-2", 3: "odd:name", 4: None}
    assert none == {}


def test_reading_the_cluster_from_an_unreachable_redis_says_so() -> None:
    async def scenario() -> list[str]:
        client = connect(RedisSection(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.3))
        reasons = []
        try:
            for read in (list_members(client), lease_owners(client, 4)):
                with pytest.raises(ClusterUnavailable) as caught:
                    await read
                reasons.append(str(caught.value))
        finally:
            await client.aclose()
        return reasons

    for reason in asyncio.run(scenario()):
        assert reason.startswith("Redis: ")
        assert ClusterUnavailable.retriable


# --- ingestd status --cluster -------------------------------------------------------------


def register(url: str, *instances: tuple[str, list[int]]) -> None:
    """Instances with one heartbeat each (heartbeat 30 s: alive for the whole test)."""

    async def scenario() -> None:
        client = connect(RedisSection(url=url))
        try:
            for name, partitions in instances:
                members, metrics, _ = member(client, name)
                metrics.received.inc(3)
                metrics.spool_records.set(12)
                members.set_partitions(partitions)
                assert await members.beat()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def lease(admin: Any, owners: dict[int, str]) -> None:
    for partition, instance in owners.items():
        admin.set(LEASE_PREFIX + str(partition), f"{instance}:t{partition}")


def row(out: str, instance: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.split()[:1] == [instance]]
    return line.split()


def test_status_cluster_lists_live_instances_and_exits_0_when_every_partition_is_owned(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    a, b = f"a-{unique}", f"b-{unique}"
    register(server.url, (a, [0, 1, 2]), (b, [3]))
    lease(server.client(), {0: a, 1: a, 2: a, 3: b})

    out = io.StringIO()
    code = cluster_status(settings_for(server.url), out)
    text = out.getvalue()
    assert code == 0, text
    assert text.splitlines()[0] == f"cluster at {server.url}: OK, 2 live instances, 4 partitions"
    header = text.splitlines()[1].split()
    assert header[:3] == ["INSTANCE", "HOST", "PID"] and header[-1] == "PARTITIONS"
    cells = row(text, a)
    assert cells[1:3] == [socket.gethostname(), str(os.getpid())]
    assert cells[-1] == "3" and row(text, b)[-1] == "1"  # partitions held
    assert cells[-2] == "12"  # spool waiting
    assert "ago" in cells  # seconds since the last beat
    assert text.splitlines()[-1] == "all 4 partitions owned"
    assert "degraded" not in text and ESC not in text


def test_status_cluster_names_the_partitions_without_an_owner_and_exits_1(
    services: ServiceFactory, unique: str
) -> None:
    server: Redis = services.redis()
    a = f"a-{unique}"
    register(server.url, (a, [0, 1]))
    lease(server.client(), {0: a, 1: a, 4: "ghost", 6: a})

    out = io.StringIO()
    code = cluster_status(settings_for(server.url, partitions=8), out)
    text = out.getvalue()
    assert code == 1, text
    assert ": DEGRADED, 1 live instance, 8 partitions" in text.splitlines()[0]
    assert row(text, a)[-1] == "3"
    assert "partitions without an owner: 2-3, 5, 7" in text
    assert "note: ghost holds 1 partition but sends no heartbeat" in text
    assert "degraded: 4 of 8 partitions without an owner" in text


def test_status_cluster_without_a_live_instance_exits_1(services: ServiceFactory) -> None:
    server: Redis = services.redis()
    lease(server.client(), {p: "gone" for p in range(4)})

    out = io.StringIO()
    assert cluster_status(settings_for(server.url), out) == 1
    text = out.getvalue()
    assert "0 live instances" in text and "all 4 partitions owned" in text
    assert "degraded: no live instance" in text


def test_status_cluster_of_an_unreachable_redis_or_no_cluster_exits_1_with_the_reason() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    out = io.StringIO()
    assert cluster_status(settings_for(url), out) == 1
    assert f"UNREACHABLE: cannot read the cluster from {url}: Redis: " in out.getvalue()

    out = io.StringIO()
    assert cluster_status(settings_for(url, enabled=False), out) == 1
    assert "cluster.enabled is false" in out.getvalue()


def test_ingestd_status_cluster_from_the_command_line(
    services: ServiceFactory, unique: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server: Redis = services.redis()
    a = f"a-{unique}"
    register(server.url, (a, [0, 1]))
    lease(server.client(), {0: a, 1: a})
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"redis: {{url: '{server.url}'}}\n"
        "cluster: {enabled: true, partitions: 2}\n"
        "mqtt: {share_group: ingestd}\n"
        "notify: {outbox: postgres}\n"
        "postgres: {url: 'postgresql://ingestd@127.0.0.1:1/ingestd'}\n"
    )
    assert main(["status", "--cluster", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert row(text, a)[-1] == "2" and "all 2 partitions owned" in text

    server.stop()
    assert main(["status", "--cluster", "--config", str(config)]) == 1
    assert "UNREACHABLE" in capsys.readouterr().out
