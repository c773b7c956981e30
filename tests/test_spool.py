"""The spool: group commit, acks after durability, release, recovery after crashes, budget."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ingestd import spool as spool_module
from ingestd.config import SpoolSection
from ingestd.deadletters import DeadLetter, DeadLetters
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.spool import Spool


def make_spool(directory: Path, max_bytes: int = 64 << 20, **kwargs: Any) -> Spool:
    directory.mkdir(parents=True, exist_ok=True)
    section = SpoolSection(dir=directory, max_bytes=max_bytes, commit_interval=0)
    return Spool(section, Metrics(), Health(), DeadLetters(directory, 1000), **kwargs)


def lines_for(n: int, start: int = 0) -> list[bytes]:
    return [
        f"m,device=d{i % 7} seq={i}.0 {1_700_000_000_000_000_000 + i}".encode()
        for i in range(start, start + n)
    ]


async def drain_all(spool: Spool, max_lines: int = 1000) -> list[bytes]:
    out: list[bytes] = []
    while spool.pending_lines:
        batch = await spool.read_batch(max_lines, linger=0)
        out.extend(batch.lines)
        spool.release(batch)
    return out


def test_acks_follow_the_commit_in_receive_order_and_lines_come_back_in_order(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        spool = make_spool(tmp_path)
        spool.open()
        acked: list[Any] = []
        lines = lines_for(300)
        for i, line in enumerate(lines):
            spool.append([line], ("ack", i), key=i, received_ns=i)
            if i == 150:
                spool.reject(DeadLetter(1, "t", "malformed", "x", 3, b"abc"), ("ack", "bad"))
        assert acked == []  # nothing is acknowledged before it is durable
        await spool.commit(acked.extend)
        assert acked[:151] == [("ack", i) for i in range(151)]
        assert acked[151] == ("ack", "bad")
        assert acked[152:] == [("ack", i) for i in range(151, 300)]
        assert await drain_all(spool, max_lines=64) == lines
        assert spool.pending_lines == 0
        spool.close()

    asyncio.run(scenario())
    store = DeadLetters(tmp_path, 1000)
    assert [d.reason for d in store.list()] == ["malformed"]


def test_unreleased_readings_survive_a_restart_and_released_ones_do_not_return(
    tmp_path: Path,
) -> None:
    async def first() -> None:
        spool = make_spool(tmp_path, segment_bytes=4096)  # several segments
        spool.open()
        for chunk in range(10):
            for line in lines_for(50, chunk * 50):
                spool.append([line], None, key=0, received_ns=0)
            await spool.commit(lambda acks: None)
        batch = await spool.read_batch(200, linger=0)
        assert len(batch.lines) == 200
        spool.release(batch)
        spool.close()

    async def second() -> list[bytes]:
        spool = make_spool(tmp_path, segment_bytes=4096)
        recovery = spool.open()
        assert recovery.pending_lines == 300
        assert recovery.torn_bytes == 0
        lines = await drain_all(spool)
        spool.close()
        return lines

    asyncio.run(first())
    assert len(list(tmp_path.glob("*.seg"))) > 1
    assert asyncio.run(second()) == lines_for(300, 200)
    # every fully released segment is gone; only the one being written remains
    assert len(list(tmp_path.glob("*.seg"))) == 1


@pytest.mark.parametrize("damage", ["partial record", "garbage", "flipped bit"])
def test_a_torn_tail_is_truncated_and_reported(tmp_path: Path, damage: str) -> None:
    async def write() -> None:
        spool = make_spool(tmp_path)
        spool.open()
        for n in (100, 100):
            for line in lines_for(n):
                spool.append([line], None, 0, 0)
            await spool.commit(lambda acks: None)
        spool.close()

    asyncio.run(write())
    segment = next(tmp_path.glob("*.seg"))
    data = segment.read_bytes()
    half = len(data) // 2  # the second record starts at exactly half (same content)
    if damage == "partial record":
        segment.write_bytes(data[: half + 40])
    elif damage == "garbage":
        segment.write_bytes(data[:half] + os.urandom(300))
    else:
        corrupted = bytearray(data)
        corrupted[-10] ^= 0x01
        segment.write_bytes(bytes(corrupted))

    damaged_size = segment.stat().st_size

    async def reopen() -> tuple[int, list[bytes]]:
        spool = make_spool(tmp_path)
        recovery = spool.open()
        lines = await drain_all(spool)
        spool.close()
        return recovery.torn_bytes, lines

    torn, lines = asyncio.run(reopen())
    assert torn == damaged_size - half
    assert lines == lines_for(100)  # the first, intact commit is all there
    assert segment.stat().st_size == half


def test_receipt_times_of_possibly_unacked_messages_survive_a_restart(tmp_path: Path) -> None:
    async def write() -> None:
        spool = make_spool(tmp_path)
        spool.open()
        spool.append(lines_for(1), None, key=42, received_ns=123456789)
        await spool.commit(lambda acks: None)
        assert spool.receipt_of(42) == 123456789
        spool.close()

    async def reopen() -> int | None:
        spool = make_spool(tmp_path)
        spool.open()
        found = spool.receipt_of(42)
        spool.close()
        return found

    asyncio.run(write())
    assert asyncio.run(reopen()) == 123456789


def test_the_newest_receipts_are_always_remembered_and_the_newest_time_wins(
    tmp_path: Path,
) -> None:
    """At least the newest _RECEIPTS_KEPT message keys keep their receipt time, however many
    came before; a key received again gets its newest time."""
    spool = make_spool(tmp_path)
    spool.open()
    kept = spool_module._RECEIPTS_KEPT
    total = 3 * kept + 123
    for key in range(total):
        spool.append([], None, key=key, received_ns=key * 10)
    spool.append([], None, key=total - 5, received_ns=1)  # received again, later
    assert all(spool.receipt_of(key) == key * 10 for key in range(total - kept, total - 5))
    assert spool.receipt_of(total - 5) == 1
    assert spool.receipt_of(0) is None  # long gone: memory stays bounded
    spool.close()


def test_a_full_budget_stops_acks_until_the_drainer_releases(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = make_spool(tmp_path, max_bytes=1 << 20)
        spool.open()
        acked: list[Any] = []
        big = [b"m,device=d f=" + b"1" * 900 + b" %d" % i for i in range(100)]  # ~90 KB a commit
        blocked = None
        for round_ in range(30):
            for line in big:
                spool.append([line], round_, 0, 0)
            commit = asyncio.create_task(spool.commit(acked.extend))
            await asyncio.sleep(0.05)
            if not commit.done():
                blocked = (round_, commit)
                break
        assert blocked is not None, "the budget never filled"
        round_, commit = blocked
        assert spool.full
        assert not spool._health.healthy
        assert round_ not in acked  # the round that did not fit is not acknowledged
        # the drainer catches up: the waiting commit goes through by itself
        batch = await spool.read_batch(10_000, linger=0)
        spool.release(batch)
        await asyncio.wait_for(commit, 5)
        assert not spool.full
        assert acked.count(round_) == len(big)
        assert await drain_all(spool) == big  # nothing corrupted: the last round reads back
        spool.close()

    asyncio.run(scenario())


CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_spool import make_spool, lines_for

    async def main():
        spool = make_spool(Path({directory!r}))
        spool.open()
        seq = 0
        while True:
            for line in lines_for(50, seq):
                spool.append([line], None, 0, 0)
            seq += 50
            await spool.commit(lambda acks: None)
            print(seq, flush=True)  # "acknowledged": everything below seq is durable

    asyncio.run(main())
    """
)


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    script = CRASHER.format(tests=str(Path(__file__).parent), directory=str(tmp_path / "spool"))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    acknowledged = 0
    deadline = time.monotonic() + 30
    while acknowledged < 20_000 and time.monotonic() < deadline:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert acknowledged >= 20_000

    async def reopen() -> list[bytes]:
        spool = make_spool(tmp_path / "spool")
        spool.open()
        lines = await drain_all(spool, max_lines=5000)
        spool.close()
        return lines

    lines = asyncio.run(reopen())
    assert lines[:acknowledged] == lines_for(acknowledged)
    assert len(lines) % 50 == 0 and lines == lines_for(len(lines))  # whole commits only


def test_a_commit_larger_than_the_budget_never_deadlocks_an_empty_spool(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = make_spool(tmp_path, max_bytes=1 << 20)
        spool.open()
        acked: list[Any] = []
        huge = [b"m,device=d f=" + b"2" * 1000 + b" %d" % i for i in range(1200)]  # ~1.2 MiB
        for line in huge:
            spool.append([line], "a", 0, 0)
        await asyncio.wait_for(spool.commit(acked.extend), 5)
        assert len(acked) == len(huge)
        assert await drain_all(spool, max_lines=100) == huge
        spool.close()

    asyncio.run(scenario())
    # fully released segments are freed, not kept against the budget
    assert sum(p.stat().st_size for p in tmp_path.glob("*.seg")) < 300_000


def test_a_commit_cancelled_mid_write_still_acks_in_order_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """Shutdown may cancel the commit task while its write runs in the commit thread."""

    async def scenario() -> None:
        spool = make_spool(tmp_path, segment_bytes=64 << 10)
        spool.open()
        acked: list[Any] = []
        first = lines_for(2000)
        for i, line in enumerate(first):
            spool.append([line], ("first", i), i, i)
        commit = asyncio.create_task(spool.commit(acked.extend))
        await asyncio.sleep(0)  # the write is now running in the commit thread
        commit.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commit
        assert acked == [("first", i) for i in range(2000)]  # durable, so acknowledged
        second = lines_for(500, 2000)
        for i, line in enumerate(second):
            spool.append([line], ("second", i), i, i)
        await spool.commit(acked.extend)
        assert acked[2000:] == [("second", i) for i in range(500)]
        assert await drain_all(spool, max_lines=700) == first + second
        spool.close()

    asyncio.run(scenario())

    async def reopen() -> int:
        spool = make_spool(tmp_path, segment_bytes=64 << 10)
        recovery = spool.open()
        spool.close()
        return recovery.pending_lines

    assert asyncio.run(reopen()) == 0  # everything released; nothing half-counted


def test_big_readings_are_cut_into_records_and_batches_of_bounded_bytes(tmp_path: Path) -> None:
    """64 KiB readings: a record holds at most 1 MiB of them (it is built whole in memory
    when written and read), a batch at most 4 MiB after a whole record, and a reading longer
    than a record gets one of its own; nothing is lost or reordered across the cuts."""

    async def scenario() -> None:
        spool = make_spool(tmp_path)
        spool.open()
        big = [f'm,device=d seq={i}.0,blob="{"x" * (64 << 10)}" {i}'.encode() for i in range(100)]
        huge = b'm,device=d huge="' + b"y" * (3 << 20) + b'" 100'
        lines = [*big[:50], huge, *big[50:]]
        for i, line in enumerate(lines):
            spool.append([line], i, key=i, received_ns=i)
        acked: list[Any] = []
        await spool.commit(acked.extend)
        assert acked == list(range(len(lines)))
        batches = []
        while spool.pending_lines:
            batch = await spool.read_batch(100_000, linger=0)
            batches.append(batch.lines)
            spool.release(batch)
        assert [line for batch in batches for line in batch] == lines
        for batch in batches:
            assert sum(map(len, batch)) <= (4 << 20) + len(huge), [len(b) for b in batch]
        assert len(batches) >= 2


class FilesExhausted:
    """Every file descriptor this process may open taken, under a lowered soft limit: the
    next open fails with EMFILE, as it did in the daemon once 1,000 idle HTTP sockets held
    the rest (a real exhaustion, not a stand-in). ``release()`` gives them back."""

    def __init__(self) -> None:
        self._limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._held: list[int] = []

    def __enter__(self) -> FilesExhausted:
        soft, hard = self._limits
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, in_use + 64), hard))
        while True:
            try:
                self._held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                return self

    def release(self) -> None:
        for fd in self._held:
            os.close(fd)
        self._held.clear()
        resource.setrlimit(resource.RLIMIT_NOFILE, self._limits)

    def __exit__(self, *_: object) -> None:
        self.release()


async def until(condition: Callable[[], bool], what: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {within}s"
        await asyncio.sleep(0.02)


def spool_detail(spool: Spool) -> str:
    components = spool._health.report()["components"]
    assert isinstance(components, dict)
    return str(components["spool"]["detail"])


def test_no_file_descriptor_left_degrades_health_and_the_spool_retries(tmp_path: Path) -> None:
    """EMFILE in the cursor write (the drainer's release) and in a segment rotation (a
    commit): nothing raises (a task that raises ends the daemon), health says what is
    wrong, the records are acknowledged as usual, and all is done once descriptors free."""

    async def scenario() -> None:
        spool = make_spool(tmp_path, segment_bytes=1)  # every commit starts a new segment
        spool.open()
        acked: list[Any] = []
        spool.append(lines_for(1), "a", 1, 1)
        await spool.commit(acked.extend)
        batch = await spool.read_batch(100, linger=0)
        with FilesExhausted() as files:
            spool.release(batch)  # the TSDB took it; the cursor cannot be written
            assert "cannot record what the TSDB has taken" in spool_detail(spool)
            spool.append(lines_for(1, 1), "b", 2, 2)
            await spool.commit(acked.extend)  # written in the current segment, acked
            assert acked == ["a", "b"]
            detail = spool_detail(spool)
            assert "cannot start a new spool segment" in detail
            assert "Too many open files" in detail
            assert not spool._health.healthy
            files.release()
        # the idle drainer records the cursor by itself; the next commit rotates
        batch = await asyncio.wait_for(spool.read_batch(100, linger=0), 10)
        assert batch.lines == lines_for(1, 1)
        spool.release(batch)
        spool.append(lines_for(1, 2), "c", 3, 3)
        await spool.commit(acked.extend)
        assert spool._health.healthy, spool_detail(spool)
        assert (tmp_path / "cursor").read_text().split()[0] == str(batch.end.segment)
        assert await drain_all(spool) == lines_for(1, 2)
        spool.close()

    asyncio.run(scenario())

    async def reopen() -> int:
        spool = make_spool(tmp_path, segment_bytes=1)
        recovery = spool.open()
        spool.close()
        return recovery.pending_lines

    assert asyncio.run(reopen()) == 0  # nothing lost, nothing replayed twice
    assert len(list(tmp_path.glob("*.seg"))) == 1  # the released segments were freed


def test_an_idle_drainer_records_the_cursor_once_descriptors_are_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        spool = make_spool(tmp_path)
        spool.open()
        spool.append(lines_for(3), "a", 1, 1)
        await spool.commit(lambda acks: None)
        batch = await spool.read_batch(100, linger=0)
        with FilesExhausted() as files:
            spool.release(batch)
            reading = asyncio.create_task(spool.read_batch(100, linger=0))  # idle: waits
            await asyncio.sleep(0)
            assert not spool._health.healthy
            files.release()
        await until(lambda: spool._health.healthy, "the cursor recorded by the idle drainer")
        assert (tmp_path / "cursor").read_text().split() == [
            str(batch.end.segment),
            str(batch.end.offset),
        ]
        reading.cancel()
        spool.close()

    asyncio.run(scenario())


def test_records_are_cut_at_a_mebibyte_or_a_thousand_lines() -> None:
    cut = spool_module._records
    assert cut([b"x" * 100] * 999) == [(0, 999)]
    assert cut([b"x" * 100] * 2500) == [(0, 1000), (1000, 2000), (2000, 2500)]
    big = [b"x" * (300 << 10)] * 7  # three fit in 1 MiB, four do not
    assert cut(big) == [(0, 3), (3, 6), (6, 7)]
    assert cut([b"x" * (2 << 20), b"y"]) == [(0, 1), (1, 2)]  # a longer line: alone


def test_a_failed_spool_write_is_retried_whole_and_acked_only_once_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that refuses a write (ENOSPC after part of it): the messages wait, health
    says so, the commit task goes on, and the retry leaves no torn record behind."""
    real_write = os.write
    failures = {"left": 3}

    async def scenario() -> None:
        spool = make_spool(tmp_path)
        spool.open()

        def failing_write(fd: int, data: Any) -> int:
            if failures["left"] and fd == spool._write_fd:  # the segment's writes only
                failures["left"] -= 1
                real_write(fd, bytes(data[:50]))  # part of it reached the file
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        acked: list[Any] = []
        for i, line in enumerate(lines_for(20)):
            spool.append([line], i, i, i)
        monkeypatch.setattr(spool_module.os, "write", failing_write)
        commit = asyncio.create_task(spool.commit(acked.extend))
        await until(lambda: commit.done() or not spool._health.healthy, "health degraded")
        assert not commit.done(), f"the commit task ended: {commit.exception()!r}"
        assert "No space left on device" in spool_detail(spool)
        assert acked == []  # not durable, not acknowledged
        await asyncio.wait_for(commit, 20)  # retried every second until the disk takes it
        assert acked == list(range(20))
        assert spool._health.healthy
        assert await drain_all(spool) == lines_for(20)
        spool.close()

    asyncio.run(scenario())
    spool = make_spool(tmp_path)
    recovery = spool.open()
    spool.close()
    assert recovery.torn_bytes == 0 and recovery.pending_lines == 0


def test_the_backlog_counts_every_reading_held_and_the_age_of_the_oldest(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        spool = make_spool(tmp_path, segment_bytes=64 << 10)
        spool.open()
        assert spool.backlog() == {"readings": 0, "bytes": 0, "oldest_seconds": 0.0}
        for round_ in range(3):
            for i, line in enumerate(lines_for(1000, round_ * 1000)):
                spool.append([line], i, i, i)
            await spool.commit(lambda acks: None)
        first = spool.backlog()
        assert first["readings"] == 3000 and first["bytes"] > 0
        await until(lambda: spool.backlog()["oldest_seconds"] > first["oldest_seconds"], "age")
        # the drainer takes the first commit's records: the oldest is the second commit's
        batch = await spool.read_batch(1000, linger=0)
        spool.release(batch)
        after = spool.backlog()
        assert after["readings"] == 2000 and after["oldest_seconds"] > 0
        await drain_all(spool)
        after = spool.backlog()
        assert after["readings"] == 0 and after["oldest_seconds"] == 0.0
        spool.close()

    asyncio.run(scenario())


def test_dead_letters_the_disk_refuses_hold_their_acks_and_are_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite refusing the dead letters (a full disk: "database or disk is full") in a
    commit, and later the lines the TSDB refused: retried, never stored twice, acked after."""
    refusals = {"left": 2}

    async def scenario() -> None:
        spool = make_spool(tmp_path)
        spool.open()
        real_add = spool._deadletters.add

        def refusing_add(letters: Any) -> None:
            if refusals["left"]:
                refusals["left"] -= 1
                raise sqlite3.OperationalError("database or disk is full")
            real_add(letters)

        monkeypatch.setattr(spool._deadletters, "add", refusing_add)
        acked: list[Any] = []
        spool.reject(DeadLetter(1, "t", "malformed", "x", 3, b"abc"), "bad")
        spool.append(lines_for(1), "good", 1, 1)
        commit = asyncio.create_task(spool.commit(acked.extend))
        await until(lambda: commit.done() or not spool._health.healthy, "health degraded")
        assert not commit.done(), f"the commit task ended: {commit.exception()!r}"
        assert "database or disk is full" in spool_detail(spool)
        assert acked == []
        await asyncio.wait_for(commit, 20)
        assert acked == ["bad", "good"] and spool._health.healthy
        refusals["left"] = 1
        refused = DeadLetter(2, "", "tsdb_refused", "400: bad", 3, b"xyz")
        await asyncio.wait_for(spool.add_deadletters([refused]), 20)  # the drainer's
        assert spool._health.healthy
        reasons = [letter.reason for letter in spool._deadletters.list()]
        assert reasons == ["tsdb_refused", "malformed"]
        spool.close()

    asyncio.run(scenario())
