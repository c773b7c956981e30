"""The spool: a durable local write-ahead log between the broker and the TSDB.

Readings are appended as line protocol, grouped into one checksummed record per commit,
written and fsynced by one thread (group commit: one fsync for everything that arrived
while the previous commit ran). Only then are the messages acknowledged to the broker.
The drainer reads records in order and releases them once the TSDB has accepted them.

On disk: numbered segment files (``0000000000000001.seg``) of records, and ``cursor``,
the position of the first record not yet released. A record is::

    header  magic "IS", version, kind, payload length, trailer length, CRC-32 of
            payload + trailer, line count, commit time (ns)
    payload the lines, joined by "\\n"
    trailer per message: (message key, receipt time) - so a message the broker
            redelivers after a crash or reconnect gets its first receipt time back

After kill -9 a torn tail (a record whose write did not finish, never acknowledged) is
truncated and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import struct
import time
import zlib
from bisect import bisect_right
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from ingestd.config import SpoolSection
from ingestd.deadletters import DeadLetter, DeadLetters
from ingestd.durable import fsync_dir
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics

__all__ = ["Batch", "Position", "Recovery", "Spool"]

log = get_logger("spool")

_HEADER = struct.Struct("<2sBBIIIIQ")
_MAGIC = b"IS"
_VERSION = 1
_KIND_READINGS = 0
_RECEIPT = struct.Struct("<Qq")
_SEGMENT_BYTES = 16 << 20
# Lines per record: the drainer's batches are whole records, so this bounds their overshoot.
_RECORD_LINES = 1000
_RECORD_BYTES = 1 << 20
"""Bytes of lines per record, too (a longer line makes a record of its own): a record is
built whole in memory when written and when read, and 1,000 readings of 64 KiB would be
64 MiB at once."""
_BATCH_BYTES = 4 << 20
"""The drainer's batches stop at this many bytes of lines (after a whole record): with 64
KiB readings, influx.batch_size lines would be hundreds of MiB in memory, and more than
InfluxDB takes in one request (max body 25 MB by default)."""
# Receipt times remembered for redelivered messages: a few broker in-flight windows.
_RECEIPTS_KEPT = 65536
_RETRY = 1.0
"""Seconds between attempts while the spool's files cannot be written or read (no file
descriptor left, a full or failing disk): the health report says so meanwhile."""
_TROUBLE = (OSError, sqlite3.Error)
"""What a file operation of the spool (or the dead letters' SQLite) raises when the system
refuses it for now. It must never end the commit or drain task: the daemon would exit."""


@dataclass(frozen=True, slots=True, order=True)
class Position:
    segment: int
    offset: int


@dataclass(slots=True)
class Batch:
    lines: list[bytes]
    end: Position
    committed_ns: int
    """Commit time of the newest record in the batch (for the lag metric)."""


@dataclass(slots=True)
class Recovery:
    """What opening the spool found."""

    pending_lines: int = 0
    torn_bytes: int = 0
    corrupt_segments: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    lines: list[bytes] = field(default_factory=list)
    receipts: list[tuple[int, int]] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    acks: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.acks or self.letters or self.lines)


def _segment_name(number: int) -> str:
    return f"{number:016d}.seg"


def _records(lines: Sequence[bytes]) -> list[tuple[int, int]]:
    """Where a commit's lines are cut into records: (start, end) index pairs, each at most
    _RECORD_LINES lines and _RECORD_BYTES bytes (or one longer line)."""
    count = len(lines)
    if count <= _RECORD_LINES and sum(map(len, lines)) <= _RECORD_BYTES:
        return [(0, count)]  # the usual commit: one record
    ends = list(accumulate(map(len, lines)))
    cuts = []
    start = 0
    while start < count:
        before = ends[start - 1] if start else 0
        end = bisect_right(ends, before + _RECORD_BYTES, lo=start)
        end = min(max(end, start + 1), start + _RECORD_LINES)
        cuts.append((start, end))
        start = end
    return cuts


class Spool:
    def __init__(
        self,
        section: SpoolSection,
        metrics: Metrics,
        health: Health,
        deadletters: DeadLetters,
        segment_bytes: int | None = None,
    ) -> None:
        self._dir = section.dir
        self._max_bytes = int(section.max_bytes)
        self._linger = section.commit_interval
        self._segment_bytes = segment_bytes or max(
            64 << 10, min(_SEGMENT_BYTES, self._max_bytes // 8)
        )
        self._metrics = metrics
        self._health = health
        self._deadletters = deadletters
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-commit")
        self._pending = _Pending()
        self._has_pending = asyncio.Event()
        self._data_ready = asyncio.Event()
        self._space = asyncio.Event()
        self._released = asyncio.Event()
        self._receipts: deque[dict[int, int]] = deque([{}])
        """Message key -> first receipt time, in generations of _RECEIPTS_KEPT / 2 (the
        newest last): together at least the newest _RECEIPTS_KEPT, at most 1.5 times."""
        self._segments: dict[int, int] = {}  # segment number -> size on disk
        self._write_fd = -1
        self._write_segment = 0
        self._committed = Position(1, 0)
        self._read = Position(1, 0)
        self._read_fd = -1
        self._read_fd_segment = 0
        self._cursor = Position(1, 0)
        self._saved_cursor = Position(1, 0)
        self._oldest_ns = 0
        """Commit time of the oldest record not yet released (0: none)."""
        self._problems: dict[str, str] = {}
        """What is wrong now, by kind (full, write, rotate, read, cursor, dead letters)."""
        self._unreleased_lines = 0
        self._read_ahead_lines = 0
        self._full = False
        self._closed = False
        self._committing_acks = 0
        metrics.spool_oldest.set_function(self._oldest_age)  # computed when scraped

    # --- opening and recovery ---------------------------------------------------------

    def open(self) -> Recovery:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        recovery = Recovery()
        numbers = sorted(int(p.stem) for p in self._dir.glob("*.seg") if p.stem.isdigit())
        self._cursor = self._read_cursor(numbers)
        for number in numbers:
            if number < self._cursor.segment:
                (self._dir / _segment_name(number)).unlink()
        numbers = [n for n in numbers if n >= self._cursor.segment] or [self._cursor.segment]
        receipts: list[tuple[int, int, int]] = []
        for number in numbers:
            path = self._dir / _segment_name(number)
            path.touch(exist_ok=True)
            start = self._cursor.offset if number == self._cursor.segment else 0
            end, lines, bad_tail = self._scan(path, start, receipts)
            recovery.pending_lines += lines
            size = path.stat().st_size
            if bad_tail:
                with path.open("r+b") as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
                if number == numbers[-1]:
                    recovery.torn_bytes = size - end
                else:
                    recovery.corrupt_segments.append(
                        f"{path}: {size - end} bytes after offset {end}"
                    )
                size = end
            self._segments[number] = size
        # The newest messages may never have been acknowledged; the broker will redeliver
        # them, and they must get their first receipt time back.
        for _, key, received_ns in receipts[-_RECEIPTS_KEPT:]:
            self._remember(key, received_ns)
        self._write_segment = numbers[-1]
        self._write_fd, size = self._open_segment(self._write_segment)
        self._segments[self._write_segment] = size
        self._committed = Position(self._write_segment, size)
        self._read = self._saved_cursor = self._cursor
        self._unreleased_lines = recovery.pending_lines
        self._oldest_ns = self._head_ns()
        self._update_gauges()
        if self._read < self._committed:
            self._data_ready.set()
        return recovery

    def _read_cursor(self, numbers: Sequence[int]) -> Position:
        try:
            segment, offset = (self._dir / "cursor").read_text().split()
            return Position(int(segment), int(offset))
        except FileNotFoundError:
            return Position(numbers[0] if numbers else 1, 0)
        except ValueError:
            log.error("spool cursor unreadable; replaying the whole spool (duplicates overwrite)")
            return Position(numbers[0] if numbers else 1, 0)

    def _scan(
        self, path: Path, offset: int, receipts: list[tuple[int, int, int]]
    ) -> tuple[int, int, bool]:
        """(end of the last good record, lines in good records, whether bad bytes follow)."""
        data = path.read_bytes()
        lines = 0
        while offset < len(data):
            parsed = self._parse(data, offset)
            if parsed is None:
                return offset, lines, True
            end, payload_lines, committed_ns, trailer = parsed
            lines += payload_lines
            receipts.extend((committed_ns, k, ns) for k, ns in _RECEIPT.iter_unpack(trailer))
            offset = end
        return offset, lines, False

    @staticmethod
    def _parse(data: bytes | memoryview, offset: int) -> tuple[int, int, int, bytes] | None:
        if len(data) - offset < _HEADER.size:
            return None
        magic, version, _kind, plen, tlen, crc, nlines, committed_ns = _HEADER.unpack_from(
            data, offset
        )
        start = offset + _HEADER.size
        end = start + plen + tlen
        if magic != _MAGIC or version != _VERSION or end > len(data):
            return None
        body = bytes(data[start:end])
        if zlib.crc32(body) != crc:
            return None
        return end, nlines, committed_ns, body[plen:]

    def _open_segment(self, number: int) -> tuple[int, int]:
        """Open segment ``number`` for appending: (fd, size). Touches no shared state: it
        may run in the commit thread; when it raises, nothing is left open."""
        path = self._dir / _segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            # The new file's directory entry must be durable before records in it are acked.
            fsync_dir(self._dir)
            return fd, os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise

    # --- intake (event loop thread) ---------------------------------------------------

    def append(self, lines: Sequence[bytes], ack: Any, key: int, received_ns: int) -> None:
        """Queue a message's readings for the next commit; ``ack`` is released after it."""
        pending = self._pending
        pending.lines.extend(lines)
        pending.receipts.append((key, received_ns))
        pending.acks.append(ack)
        # Remembered now, not at commit: a copy redelivered meanwhile gets the same time.
        self._remember(key, received_ns)
        self._has_pending.set()

    def reject(self, letter: DeadLetter, ack: Any) -> None:
        """Queue a dead letter for the next commit; ``ack`` is released after it."""
        self._pending.letters.append(letter)
        self._pending.acks.append(ack)
        self._has_pending.set()

    def skip(self, ack: Any) -> None:
        """A message with nothing to keep: acknowledged in order with the next commit."""
        self._pending.acks.append(ack)
        self._has_pending.set()

    def receipt_of(self, key: int) -> int | None:
        """The first receipt time of a message committed but perhaps never acknowledged."""
        for generation in reversed(self._receipts):
            found = generation.get(key)
            if found is not None:
                return found
        return None

    def _remember(self, key: int, received_ns: int) -> None:
        # Kept after the ack is sent: a broker that restarts may not have stored our ack
        # and redeliver anyway. The newest receipt per key wins (an identical payload on the
        # same topic re-sent later maps to the latest copy, which is the one in flight).
        generations = self._receipts
        newest = generations[-1]
        newest[key] = received_ns
        if len(newest) >= _RECEIPTS_KEPT // 2:
            # A new generation; the oldest goes whole. (Copying the newest half of one dict,
            # as this once trimmed, held 12 MiB more for a moment: the bench's RSS peak.)
            generations.append({})
            if len(generations) > 3:
                generations.popleft()

    async def commit_loop(
        self,
        on_durable: Callable[[list[Any]], None],
        alongside: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Commit forever; after each commit call ``on_durable(acks)``."""
        while True:
            await self._has_pending.wait()
            if self._linger:
                await asyncio.sleep(self._linger)
            await self.commit(on_durable, alongside)

    async def commit(
        self,
        on_durable: Callable[[list[Any]], None],
        alongside: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Make everything queued so far durable, then hand its acks to ``on_durable``.

        ``alongside`` runs during the write and is awaited before the acks: what the
        messages caused elsewhere (alert transitions) is durable before they are acked."""
        pending, self._pending = self._pending, _Pending()
        self._has_pending.clear()
        if not pending:
            return
        self._committing_acks = len(pending.acks)
        size = 0
        if pending.lines:
            records = len(_records(pending.lines))
            size = (
                _HEADER.size * records
                + sum(map(len, pending.lines))
                + len(pending.lines)
                - records
                + _RECEIPT.size * len(pending.receipts)
            )
            try:
                await self._wait_for_space(size)
            except asyncio.CancelledError:
                self._committing_acks = 0  # never written, never acked: the broker redelivers
                raise
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        write = loop.run_in_executor(self._thread, self._write, pending)
        beside = asyncio.ensure_future(alongside()) if alongside is not None else None
        try:
            while True:
                try:
                    end, now = await asyncio.shield(write)
                    break
                except _TROUBLE as exc:
                    # No file descriptor left, a full or failing disk: the messages wait
                    # unacknowledged (the broker keeps them, intake pauses at max_unacked)
                    # and the same commit is tried again; ending here would end the daemon.
                    self._trouble(
                        "write",
                        f"cannot write to the spool ({exc}): messages wait unacknowledged,"
                        f" retrying every {_RETRY:g}s",
                        exc,
                    )
                    await asyncio.sleep(_RETRY)
                    write = loop.run_in_executor(self._thread, self._write, pending)
            if beside is not None:
                await asyncio.shield(beside)
        except asyncio.CancelledError:
            # A write in its thread goes on regardless: wait for it; if it made the records
            # durable, finish the bookkeeping and hand out its acks (in order, before any
            # later commit's), then stop as asked.
            (written,) = await asyncio.gather(write, return_exceptions=True)
            if beside is not None:
                await asyncio.gather(beside, return_exceptions=True)
            if isinstance(written, BaseException):
                self._committing_acks = 0  # never durable, never acked: the broker redelivers
            else:
                self._committed_write(pending, *written, started, on_durable)
            raise
        self._committed_write(pending, end, now, started, on_durable)
        if self._segments.get(self._write_segment, 0) >= self._segment_bytes:
            try:
                size = await loop.run_in_executor(self._thread, self._rotate)
            except OSError as exc:
                # The records are safe in the current segment, which grows on until a
                # later commit manages to start the next one.
                self._trouble(
                    "rotate",
                    f"cannot start a new spool segment ({exc}); writing on in the current"
                    " one, retrying at the next commit",
                    exc,
                )
            else:
                self._segments[self._write_segment] = size
                self._solved("rotate")

    def _committed_write(
        self,
        pending: _Pending,
        end: int,
        committed_ns: int,
        started: float,
        on_durable: Callable[[list[Any]], None],
    ) -> None:
        self._committing_acks = 0
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._solved("write")
        if pending.lines:
            # The file's own end, not a computed size: it stays right whatever happened.
            self._segments[self._write_segment] = end
            self._committed = Position(self._write_segment, end)
            if not self._unreleased_lines:
                self._oldest_ns = committed_ns
            self._unreleased_lines += len(pending.lines)
            self._metrics.readings.inc(len(pending.lines))
            self._data_ready.set()
        self._update_gauges()
        on_durable(pending.acks)

    async def _wait_for_space(self, size: int) -> None:
        # An empty spool takes any commit: its size is bounded by the broker's flow
        # control (Receive Maximum), and refusing it would wait forever.
        while self._bytes() + size > self._max_bytes and self._unreleased_lines:
            if not self._full:
                self._full = True
                self._metrics.spool_full.set(1)
                message = (
                    f"spool disk budget exhausted ({self._bytes()} of {self._max_bytes} bytes):"
                    " acknowledgements stopped, the broker is buffering; the TSDB must catch up"
                    " (check its health) or spool.max_bytes be raised"
                )
                self._problems["full"] = message
                self._report_health()
                log.error("spool full", bytes=self._bytes(), max_bytes=self._max_bytes)
            self._space.clear()
            await self._space.wait()
        if self._full:
            self._full = False
            self._metrics.spool_full.set(0)
            self._problems.pop("full", None)
            self._report_health()
            log.warning("spool has room again: acknowledgements resumed", bytes=self._bytes())

    def _write(self, pending: _Pending) -> tuple[int, int]:
        """Runs in the commit thread: dead letters, then the records, then fsync; returns
        the segment's end offset and the records' commit time. May be tried again after it
        raised: it starts where the last commit that made it ended."""
        if pending.letters:
            self._deadletters.add(pending.letters)
            pending.letters = []  # stored: a retry of the records must not store them twice
        committed = self._segments.get(self._write_segment, 0)
        if not pending.lines:
            return committed, 0
        lines = pending.lines
        now = time.time_ns()
        fd = self._write_fd
        try:
            if os.lseek(fd, 0, os.SEEK_END) != committed:
                os.ftruncate(fd, committed)  # what a failed attempt left behind
            # Written a record at a time: a commit of big readings is never copied whole.
            for start, end in _records(lines):
                payload = b"\n".join(lines[start:end])
                # The receipts ride with the commit's last record: any record of it would do.
                last = end == len(lines)
                trailer = (
                    b"".join(_RECEIPT.pack(k, ns) for k, ns in pending.receipts) if last else b""
                )
                body = payload + trailer
                header = _HEADER.pack(
                    _MAGIC,
                    _VERSION,
                    _KIND_READINGS,
                    len(payload),
                    len(trailer),
                    zlib.crc32(body),
                    end - start,
                    now,
                )
                data = memoryview(header + body)
                while data:
                    written = os.write(fd, data)
                    data = data[written:]
            os.fdatasync(fd)
        except BaseException:
            # Never acknowledged: leave nothing a restart would take for committed records
            # (the next attempt rewrites them whole, so a failed fsync is not trusted either).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, committed)
            raise
        return os.lseek(fd, 0, os.SEEK_END), now

    def _rotate(self) -> int:
        """Runs in the commit thread: the next segment becomes the one written, once it is
        open (a failure changes nothing); returns its size."""
        fd, size = self._open_segment(self._write_segment + 1)
        os.close(self._write_fd)
        self._write_fd = fd
        self._write_segment += 1
        return size

    # --- drain side (event loop thread) -----------------------------------------------

    async def read_batch(
        self, max_lines: int, linger: float, max_bytes: int = _BATCH_BYTES
    ) -> Batch:
        """The next lines in spool order: waits for data, then up to ``linger`` for more.
        Whole records, until ``max_lines`` lines or ``max_bytes`` bytes are reached."""
        while self._read >= self._committed:
            self._data_ready.clear()
            if "cursor" in self._problems:  # idle: a moment to record the cursor again
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._data_ready.wait(), _RETRY)
                self._save_cursor()
            else:
                await self._data_ready.wait()
        if linger and self._unreleased_lines - self._read_ahead_lines < max_lines:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full_batch(max_lines), linger)
        while True:
            try:
                batch = self._read_records(max_lines, max_bytes)
            except OSError as exc:
                # A segment cannot be opened (no file descriptor left) or read: the
                # drainer waits and tries again; raised, it would end the daemon.
                self._trouble(
                    "read",
                    f"cannot read the spool ({exc}): nothing goes to the TSDB meanwhile,"
                    f" retrying every {_RETRY:g}s",
                    exc,
                )
                await asyncio.sleep(_RETRY)
                continue
            self._solved("read")
            return batch

    def _read_records(self, max_lines: int, max_bytes: int) -> Batch:
        """Whole records from the read position on; on OSError nothing has moved."""
        lines: list[bytes] = []
        size = 0
        committed_ns = 0
        position = self._read
        while position < self._committed and len(lines) < max_lines and size < max_bytes:
            if position.offset >= self._segments.get(position.segment, 0):
                position = Position(position.segment + 1, 0)
                continue
            data = self._pread(position)
            parsed = self._parse(data, 0)
            if parsed is None:  # cannot happen unless the disk changed under us
                raise RuntimeError(f"spool record unreadable at {position}: disk corruption?")
            end, _, committed_ns, trailer = parsed
            payload = data[_HEADER.size : end - len(trailer)]
            size += len(payload)
            lines.extend(payload.split(b"\n"))
            position = Position(position.segment, position.offset + end)
        self._read = position
        self._read_ahead_lines += len(lines)
        return Batch(lines, position, committed_ns)

    async def _full_batch(self, max_lines: int) -> None:
        while self._unreleased_lines - self._read_ahead_lines < max_lines:
            self._data_ready.clear()
            await self._data_ready.wait()

    def _segment_fd(self, segment: int) -> int:
        """The read fd, on ``segment``."""
        if self._read_fd_segment != segment or self._read_fd < 0:
            if self._read_fd >= 0:
                os.close(self._read_fd)
                self._read_fd = -1  # closed even if the next open fails
            self._read_fd = os.open(self._dir / _segment_name(segment), os.O_RDONLY)
            self._read_fd_segment = segment
        return self._read_fd

    def _pread(self, position: Position) -> bytes:
        fd = self._segment_fd(position.segment)
        header = os.pread(fd, _HEADER.size, position.offset)
        _, _, _, plen, tlen, *_ = _HEADER.unpack(header)
        return header + os.pread(fd, plen + tlen, position.offset + _HEADER.size)

    def _head_ns(self) -> int:
        """Commit time of the first record not yet released (0: none), read from its
        header. The page was written or read a moment ago: no disk read in practice."""
        position = self._cursor
        while position < self._committed:
            if position.offset >= self._segments.get(position.segment, 0):
                position = Position(position.segment + 1, 0)
                continue
            try:
                header = os.pread(self._segment_fd(position.segment), _HEADER.size, position.offset)
                return int(_HEADER.unpack(header)[-1])
            except (OSError, struct.error):
                return self._oldest_ns or time.time_ns()  # only the age shown is off
        return 0

    def release(self, batch: Batch) -> None:
        """The TSDB has everything in ``batch``: forget it, and free whole segments."""
        end = batch.end
        if end.segment < self._write_segment and end.offset >= self._segments.get(end.segment, 0):
            end = Position(end.segment + 1, 0)  # that segment is done: free it now
        self._cursor = end
        self._unreleased_lines -= len(batch.lines)
        self._read_ahead_lines -= len(batch.lines)
        self._oldest_ns = self._head_ns() if self._unreleased_lines else 0
        self._save_cursor()
        self._update_gauges()
        self._space.set()
        self._released.set()

    def _save_cursor(self) -> None:
        """Record the cursor on disk, then delete the segments before it. A stale cursor
        only replays readings the TSDB has (they overwrite themselves): one that cannot be
        written (no file descriptor left, a full disk) keeps those segments, and their
        space, until a later release or the idle drainer records it."""
        end = self._cursor
        try:
            if end != self._saved_cursor:
                tmp = self._dir / "cursor.tmp"
                tmp.write_text(f"{end.segment} {end.offset}\n")
                tmp.replace(self._dir / "cursor")  # no promise follows: no directory fsync
                self._saved_cursor = end
            for number in sorted(n for n in self._segments if n < end.segment):
                (self._dir / _segment_name(number)).unlink(missing_ok=True)
                del self._segments[number]
                self._update_gauges()
                self._space.set()  # a commit may be waiting for this room
        except OSError as exc:
            self._trouble(
                "cursor",
                f"cannot record what the TSDB has taken ({exc}); retrying, nothing is lost"
                " but the spool's disk space is not freed meanwhile",
                exc,
            )
            return
        self._solved("cursor")

    async def add_deadletters(self, letters: Sequence[DeadLetter]) -> None:
        """Store dead letters found after the commit (lines the TSDB refused); while they
        cannot be stored, the drainer waits (they are still in the spool)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(self._thread, self._deadletters.add, letters)
            except _TROUBLE as exc:
                self._trouble(
                    "deadletters",
                    f"cannot store the lines the TSDB refused as dead letters ({exc});"
                    f" the drainer waits, retrying every {_RETRY:g}s",
                    exc,
                )
                await asyncio.sleep(_RETRY)
                continue
            self._solved("deadletters")
            return

    async def drained(self) -> None:
        """Return once everything committed has been released."""
        while self._unreleased_lines > 0:
            self._released.clear()
            await self._released.wait()

    # --- state ---------------------------------------------------------------------------

    def _bytes(self) -> int:
        return sum(self._segments.values())

    def _trouble(self, kind: str, problem: str, error: BaseException) -> None:
        """Something the spool must retry: health says so, the log once per episode."""
        if kind not in self._problems:
            log.error(problem, error=str(error))
        self._problems[kind] = problem
        self._report_health()

    def _solved(self, kind: str) -> None:
        if self._problems.pop(kind, None) is not None:
            log.warning("spool recovered", was=kind)
            self._report_health()

    def _report_health(self) -> None:
        if self._problems:
            self._health.problem("spool", "; ".join(self._problems.values()))
        else:
            self._health.ok("spool")

    def _oldest_age(self) -> float:
        """Seconds the oldest unreleased reading has waited since its commit (0: none).
        Reads one int: safe from the thread that renders /metrics."""
        oldest = self._oldest_ns
        return max(0.0, (time.time_ns() - oldest) / 1e9) if oldest else 0.0

    def backlog(self) -> dict[str, float]:
        """What waits for the TSDB: readings, bytes on disk, and how long the oldest of them
        has waited (since its commit), in seconds."""
        return {
            "readings": self._unreleased_lines,
            "bytes": self._bytes(),
            "oldest_seconds": round(self._oldest_age(), 3),
        }

    @property
    def pending_lines(self) -> int:
        """Readings committed but not yet released."""
        return self._unreleased_lines

    @property
    def unacked(self) -> int:
        """Messages queued or being committed, whose acks have not gone out yet."""
        return len(self._pending.acks) + self._committing_acks

    @property
    def full(self) -> bool:
        return self._full

    def _update_gauges(self) -> None:
        self._metrics.spool_records.set(self._unreleased_lines)
        self._metrics.spool_bytes.set(self._bytes())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._thread.shutdown(wait=True)
        if "cursor" in self._problems:
            self._save_cursor()  # a last try: the next start replays less
        for fd in (self._write_fd, self._read_fd):
            if fd >= 0:
                os.close(fd)
        self._write_fd = self._read_fd = -1
