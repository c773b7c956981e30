"""Partition leases against a real Redis: shares, hand-over, fencing, Redis losing its data."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio
from services import Redis

from ingestd.cluster.leases import FENCED_SET, PREFIX, Leases, lease_key, partition_of
from ingestd.config import ClusterSection


@pytest.fixture
def server(services: object) -> Iterator[Redis]:
    yield services.redis()  # type: ignore[attr-defined]


def section(instance: str, lease: float = 1.0, partitions: int = 4) -> ClusterSection:
    return ClusterSection(enabled=True, instance=instance, partitions=partitions, lease=lease)


async def new_cluster(client: redis.asyncio.Redis, *instances: Leases) -> None:
    """The instances meet a new epoch; for one lease time nobody takes a partition (it
    could be a Redis that lost its data under live owners); then that time has passed."""
    for leases in instances:
        assert (await leases.cycle(live=len(instances))).gained == []
    await client.delete(PREFIX + "fresh")


def run(scenario: object, url: str) -> None:
    async def main() -> None:
        client = redis.asyncio.Redis.from_url(url)
        try:
            await scenario(client)  # type: ignore[operator]
        finally:
            await client.aclose()

    asyncio.run(main())


def test_partitions_spread_by_share_and_move_when_given_up(server: Redis) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        x = Leases(section("x"), client)
        y = Leases(section("y"), client)
        await new_cluster(client, x)
        first = await x.cycle(live=1)
        assert sorted(p for p, _ in first.gained) == [0, 1, 2, 3]
        assert (await y.cycle(live=2)).gained == []  # nothing free
        given = await x.cycle(live=2)
        assert given.surplus == [2, 3]  # the highest numbers: every instance agrees
        await x.release(given.surplus)
        taken = await y.cycle(live=2)
        assert sorted(p for p, _ in taken.gained) == [2, 3]
        assert sorted(x.held) == [0, 1] and sorted(y.held) == [2, 3]
        values = await client.mget([lease_key(p) for p in range(4)])
        assert [v.decode().split(":")[0] for v in values] == ["x", "x", "y", "y"]

    run(scenario, server.url)


def test_a_stalled_owner_loses_its_partition_and_cannot_write_over_its_successor(
    server: Redis,
) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        fenced = client.register_script(FENCED_SET)
        x = Leases(section("x", lease=0.5, partitions=1), client)
        y = Leases(section("y", lease=0.5, partitions=1), client)
        await new_cluster(client, x, y)
        ((_, x_value),) = (await x.cycle(live=1)).gained
        assert await fenced(keys=[lease_key(0), "state"], args=[x_value, b"from x"]) == 1
        await asyncio.sleep(0.7)  # x stalls past its lease: no renewal
        assert not x.valid(0), "x stops trusting the lease on its own clock"
        ((_, y_value),) = (await y.cycle(live=1)).gained
        assert await fenced(keys=[lease_key(0), "state"], args=[x_value, b"stale x"]) == 0
        assert await fenced(keys=[lease_key(0), "state"], args=[y_value, b"from y"]) == 1
        assert await client.get("state") == b"from y"
        back = await x.cycle(live=1)
        assert back.lost == [0] and not x.held, "x learns it lost the partition"

    run(scenario, server.url)


def test_after_redis_loses_its_data_owners_take_back_what_they_held_and_nobody_else_yet(
    server: Redis,
) -> None:
    async def scenario(client: redis.asyncio.Redis) -> None:
        x = Leases(section("x", lease=1.0), client)
        y = Leases(section("y", lease=1.0), client)
        await new_cluster(client, x, y)
        await x.cycle(live=2)
        await y.cycle(live=2)
        mine, theirs = sorted(x.held), sorted(y.held)
        assert len(mine) == len(theirs) == 2 and set(mine).isdisjoint(theirs)
        await client.flushall()  # Redis restarted without persistence
        await y.release(theirs[:1])  # y gives one up meanwhile: it is free
        again = await x.cycle(live=1)
        assert again.epoch_changed and sorted(again.reasserted) == mine
        assert again.gained == [], "no free partition is taken during the grace period"
        assert (await client.get(lease_key(mine[0]))).decode().startswith("x:")
        await asyncio.sleep(1.05)  # one lease later: the free ones go
        later = await x.cycle(live=1)
        assert theirs[0] in [p for p, _ in later.gained]

    run(scenario, server.url)


def test_a_device_stays_in_its_partition() -> None:
    found = {partition_of("esp32-00042", 32) for _ in range(3)}
    assert len(found) == 1 and next(iter(found)) in range(32)
    spread = {partition_of(f"esp32-{n:05d}", 8) for n in range(200)}
    assert spread == set(range(8))
    assert partition_of("\udcff-surrogate", 8) in range(8)  # any device name at all
