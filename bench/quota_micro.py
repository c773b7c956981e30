"""Micro-benchmark of the quota check: microseconds per message, memory and Redis backends.

    .venv/bin/python bench/quota_micro.py [--redis-url redis://HOST:PORT/0] [--devices N]

Memory backend: ``MemoryLimiter.allow`` for 10,000 devices in round robin (every call finds
an existing device), with a rate limit only and with every limit (rate, bytes, hour, day),
plus ``QuotaRules.match`` with its topic cache hit and missed. Redis backend:
``RedisLimiter.allow_batch`` per message at batch sizes 1, 100 and 1000, against a private
redis-server on a free port (tests/services.py) unless ``--redis-url`` is given. Prints a
Markdown table; takes well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test suite's server launchers

import redis.asyncio  # noqa: E402
from services import Redis  # noqa: E402

from ingestd.config import QuotaRule, QuotasSection  # noqa: E402
from ingestd.quota import ALLOWED, MemoryLimiter, QuotaRules, RedisLimiter  # noqa: E402

TOPIC = "farm/greenhouse-{site}/esp32-{device:05d}/reservoir"
RATE_ONLY: dict[str, Any] = {"rate": 1000.0}
EVERY_LIMIT: dict[str, Any] = {
    "rate": 1000.0,
    "bytes_per_second": 1e6,
    "per_hour": 10**9,
    "per_day": 10**9,
    "timezone": "Europe/Amsterdam",
}


def quotas(limits: Mapping[str, Any], name: str = "bench") -> QuotasSection:
    rule = QuotaRule(name=name, topic="farm/+/{device}/#", **limits)
    return QuotasSection(rules=[rule], redis_timeout=5.0)


def per_call_us(run: Callable[[], int], seconds: float = 1.0) -> float:
    """Best of three timed rounds of ``run`` (which returns how many checks it made)."""
    best = float("inf")
    for _ in range(3):
        gc.collect()
        deadline = time.perf_counter() + seconds / 3
        calls = 0
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            calls += run()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    return best


def memory_allow(limits: Mapping[str, Any], devices: list[str]) -> float:
    section = quotas(limits)
    limiter = MemoryLimiter(QuotaRules(section), section)
    allow = limiter.allow
    for device in devices:  # create every device first: the figure is the steady state
        assert allow(0, device, 120) == ALLOWED

    def run() -> int:
        for device in devices:
            allow(0, device, 120)
        return len(devices)

    return per_call_us(run)


def memory_footprint(count: int) -> float:
    """Bytes per device held by a MemoryLimiter, device names included."""
    section = quotas(EVERY_LIMIT)
    rules = QuotaRules(section)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        limiter = MemoryLimiter(rules, section)
        for i in range(count):
            limiter.allow(0, f"esp32-{i:05d}", 120)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return used / count


def match_us(topics: list[str], fresh: bool) -> float:
    rules = QuotaRules(quotas(RATE_ONLY))
    match = rules.match
    if not fresh:
        topics = topics[:1000]  # fits the cache: every call a hit
        for topic in topics:
            match(topic)

    def run() -> int:
        for topic in topics:
            match(topic)
        return len(topics)

    return per_call_us(run)


async def redis_allow(url: str, devices: list[str], batch: int) -> float:
    client = redis.asyncio.Redis.from_url(url)
    try:
        section = quotas(EVERY_LIMIT, name=f"bench{batch}")
        limiter = RedisLimiter(QuotaRules(section), section, client)
        items = [(0, device, 120) for device in devices]
        batches = [items[i : i + batch] for i in range(0, len(items), batch)]
        await limiter.allow_batch(batches[0])  # loads the script
        best = float("inf")
        for _ in range(3):
            count = 0
            started = time.perf_counter()
            deadline = started + 1.0
            for chunk in batches:
                await limiter.allow_batch(chunk)
                count += len(chunk)
                if time.perf_counter() > deadline:
                    break
            best = min(best, (time.perf_counter() - started) / count * 1e6)
        await client.flushdb()
        return best
    finally:
        await client.aclose()


@contextlib.contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with Redis() as server:
        yield server.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--devices", type=int, default=10_000)
    options = parser.parse_args()
    devices = [f"esp32-{i:05d}" for i in range(options.devices)]
    topics = [TOPIC.format(site=i % 7, device=i) for i in range(50_000)]

    count = f"{len(devices):,} devices"
    rows: list[tuple[str, str, float]] = [
        ("memory", f"allow, rate only, {count}", memory_allow(RATE_ONLY, devices)),
        ("memory", f"allow, every limit, {count}", memory_allow(EVERY_LIMIT, devices)),
        ("memory", "match, topic cached", match_us(topics, fresh=False)),
        ("memory", f"match, {len(topics):,} topics (cache misses)", match_us(topics, fresh=True)),
    ]
    with redis_url(options.redis_url) as url:
        for batch in (1, 100, 1000):
            us = asyncio.run(redis_allow(url, devices, batch))
            rows.append(("redis", f"allow_batch, batch of {batch}, every limit", us))
    footprint = memory_footprint(len(devices))

    print("| backend | what | µs per message |")
    print("|---|---|---:|")
    for backend, what, us in rows:
        print(f"| {backend} | {what} | {us:.2f} |")
    print(
        f"\nMemoryLimiter state: {footprint:.0f} B per device, device name included "
        f"({footprint * 10_000 / 2**20:.2f} MiB per 10,000 devices)."
    )


if __name__ == "__main__":
    main()
