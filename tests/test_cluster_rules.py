"""Partition hand-over in one process, against a real Redis: two ClusterRules (instances
``a`` and ``b``) share one partition; what ``a`` announced is never announced again by
``b``, and what ``a`` had not evaluated yet ``b`` does evaluate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from services import Redis

from ingestd.cluster.leases import lease_key
from ingestd.cluster.rules import ClusterRules, stream_key
from ingestd.config import Settings
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.model import Reading

RULES = """
rules:
  - name: ph_high
    select: {measurement: reservoir, field: ph}
    above: 7.0
    clear: {below: 6.8}
    severity: critical
    flapping: {max_changes: 0}
"""


@pytest.fixture
def server(services: Any) -> Iterator[Redis]:
    yield services.redis()


class Instance:
    def __init__(self, name: str, url: str, rules: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self.published: list[tuple[str, bytes]] = []
        settings = Settings.model_validate({
            "mqtt": {"share_group": "g"},
            "redis": {"url": url},
            "postgres": {"url": "postgresql://unused@127.0.0.1/unused"},
            "notify": {"outbox": "postgres"},
            "rules": {"dir": str(rules), "watch_interval": "1h"},
            "cluster": {"enabled": True, "instance": name, "partitions": 1, "lease": "1s"},
        })  # fmt: skip
        self.client = redis.asyncio.Redis.from_url(url)
        self.rules = ClusterRules(settings, self.client, Metrics(), Health(), self._publish)
        self.task: asyncio.Task[None] | None = None

    def _publish(self, topic: str, payload: bytes, retain: bool) -> bool:
        self.published.append((topic, payload))
        if payload and not retain and topic.startswith("alerts/critical/"):
            self.events.append(orjson.loads(payload))
        return True

    def kinds(self) -> list[tuple[str, str]]:
        return [(e["kind"], e["device"]) for e in self.events]

    def start(self) -> None:
        self.task = asyncio.create_task(self.rules.run())

    async def die(self) -> None:
        """kill -9: the loop stops, nothing is saved or released."""
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def send(self, *readings: tuple[str, float]) -> None:
        now = time.time_ns()
        self.rules.evaluate(
            [
                Reading("reservoir", d, {"site": "s"}, {"ph": ph}, now + i)
                for i, (d, ph) in enumerate(readings)
            ]
        )
        await self.rules.save_if_changed()


async def until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10
) -> None:
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def scenario(server: Redis, tmp_path: Path, body: Callable[..., Awaitable[None]]) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(RULES)

    async def main() -> None:
        a, b = Instance("a", server.url, rules), Instance("b", server.url, rules)
        try:
            await body(a, b)
        finally:
            for instance in (a, b):
                if instance.task is not None:
                    instance.task.cancel()
                    await asyncio.gather(instance.task, return_exceptions=True)
                await instance.client.aclose()

    asyncio.run(main())


def test_a_successor_replays_silently_what_its_predecessor_announced(
    server: Redis, tmp_path: Path
) -> None:
    async def body(a: Instance, b: Instance) -> None:
        a.start()
        await until(lambda: 0 in a.rules.stages, "a owns the partition", 5)
        await a.send(("d1", 7.5))
        await until(lambda: a.kinds() == [("firing", "d1")], "a fires d1")
        await a.send(("d1", 6.5))
        await until(lambda: a.kinds() == [("firing", "d1"), ("resolved", "d1")], "a resolves")
        await asyncio.sleep(0.3)  # the transitions are saved
        await a.die()
        await a.send(("d2", 7.5))  # forwarded by a live instance, never evaluated by a
        await a.client.delete(lease_key(0))  # a's lease runs out
        b.start()
        await until(lambda: 0 in b.rules.stages, "b takes the partition over", 5)
        await until(lambda: ("firing", "d2") in b.kinds(), "b evaluates what a had not")
        await asyncio.sleep(0.5)
        assert b.kinds() == [("firing", "d2")], "d1's alert, ended under a, is not repeated"

    scenario(server, tmp_path, body)


def test_an_acknowledgement_given_to_another_instance_reaches_the_owner_with_its_name(
    server: Redis, tmp_path: Path
) -> None:
    """`ingestd alerts ack` asks any instance's HTTP API; one that does not own the alert
    passes it on, as alerts/ack/<id>/<name> with the note as payload, which every instance
    hears and the owner acts on."""

    async def body(a: Instance, b: Instance) -> None:
        a.start()
        await until(lambda: 0 in a.rules.stages, "a owns the partition", 5)
        # b is not started: an instance that owns no partition, whose HTTP API was asked.
        await a.send(("d1", 7.5))
        await until(lambda: a.kinds() == [("firing", "d1")], "a fires d1")
        alert = a.events[0]["id"]
        forwarded = b.rules.acknowledge(alert, "night/shift", "swapping the probe")
        assert forwarded == {"id": alert, "forwarded": True, "by": "night/shift"}
        ((topic, payload),) = [m for m in b.published if m[0].startswith("alerts/ack/")]
        assert (topic, payload) == (f"alerts/ack/{alert}/night%2Fshift", b"swapping the probe")
        for instance in (a, b):  # both hear it; only the owner acts
            instance.rules.acknowledge_message(topic, payload)
        await until(lambda: ("acknowledged", "d1") in a.kinds(), "a acknowledges d1")
        acked = a.events[-1]
        assert (acked["acknowledged_by"], acked["reason"]) == (
            "night%2Fshift",
            "swapping the probe",
        )
        assert b.kinds() == []

    scenario(server, tmp_path, body)


def test_an_owner_that_stalled_past_its_lease_announces_nothing_more(
    server: Redis, tmp_path: Path
) -> None:
    async def body(a: Instance, b: Instance) -> None:
        a.start()
        await until(lambda: 0 in a.rules.stages, "a owns the partition", 5)
        await asyncio.sleep(0.2)  # a waits on its read of the stream (100 ms at a time)
        # A reading arrives and answers that read; a's event loop stalls past its lease (1 s)
        # before it looks at the answer.
        reading = ["reservoir", "d3", {"site": "s"}, {"ph": 7.5}, time.time_ns()]
        with server.client() as sync:
            sync.xadd(stream_key(0), {"r": orjson.dumps([reading])})
        time.sleep(1.2)  # noqa: ASYNC251
        # Meanwhile the lease ran out and another instance took the partition.
        await a.client.set(lease_key(0), "b:99", px=60_000)
        await until(lambda: 0 not in a.rules.stages, "a learns it lost the partition", 5)
        assert a.kinds() == [], "a, no longer sure of its lease, evaluated nothing"
        assert b.task is None

    scenario(server, tmp_path, body)
