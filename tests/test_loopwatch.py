"""The loop watch: a callback that holds the event loop shows as lag, a collection as a pause."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

from ingestd.loopwatch import LoopWatch
from ingestd.metrics import Metrics


def _count(metrics: Metrics, name: str, le: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"{name}_bucket", {**labels, "le": le})
    return value or 0.0


def test_a_held_loop_is_lag_and_a_collection_is_a_pause() -> None:
    metrics = Metrics()

    async def scenario() -> None:
        watch = asyncio.create_task(LoopWatch(metrics, interval=0.01).run())
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # noqa: ASYNC251 - the point: a callback that holds the loop 300 ms
        await asyncio.sleep(0.05)
        gc.collect()
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)

    asyncio.run(scenario())
    samples = metrics.registry.get_sample_value("ingestd_loop_lag_seconds_count") or 0.0
    quick = _count(metrics, "ingestd_loop_lag_seconds", "0.1")
    assert samples >= 5
    assert samples - quick == 1  # exactly the one sample that waited out the 300 ms
    pauses = metrics.registry.get_sample_value(
        "ingestd_gc_pause_seconds_count", {"generation": "2"}
    )
    assert pauses is not None and pauses >= 1
    # cancelled, it no longer times collections
    assert not any(getattr(cb, "__self__", None).__class__ is LoopWatch for cb in gc.callbacks)


def test_a_collection_during_a_scrape_does_not_wait_for_the_scrape() -> None:
    """A scrape holds the histogram's lock while it copies a dict, and that copy can start a
    collection: the callback must not need the lock (labels() did: the loop froze)."""
    metrics = Metrics()

    async def scenario() -> None:
        watch = asyncio.create_task(LoopWatch(metrics, interval=0.01).run())
        await asyncio.sleep(0.02)
        done = threading.Event()

        def scrape_that_collects() -> None:
            with metrics.gc_pause._lock:  # what the scrape holds (prometheus_client)
                gc.collect()
            done.set()

        threading.Thread(target=scrape_that_collects, daemon=True).start()
        assert await asyncio.to_thread(done.wait, 5), "the GC callback waited on the lock"
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)

    asyncio.run(scenario())
