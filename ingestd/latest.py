"""The latest value of every device and field, for dashboards: ``GET /latest``, ``ingestd latest``.

The hot path, :meth:`Latest.observe`, merges readings into a dict (newest reading time wins)
and never waits. Every ``latest.interval`` a task writes what changed in one round trip:

    Redis    one hash per device, ``ingestd:latest:<device>``, a field per measurement and
             field (``reservoir.ph``) holding JSON (time, value, tags); ``PEXPIRE`` latest.ttl
             after each write, so a dead device fades. The write is a pipeline of script
             calls (a thousand values each); the script keeps the newer of the stored and
             the written value, so instances sharing a subscription, or a device sending
             its backlog late, never turn the latest value back.
    memory   without ``redis.url``: the same data in this process, expiring the same way.

When Redis is down or slow, values wait (only the newest per device and field, and none
older than latest.ttl), ``/healthz`` says ``degraded`` (component ``latest``), and the next
write that gets through catches up. Readers get the same shape from either backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from itertools import chain
from typing import Any, Protocol

import orjson
import redis.asyncio
from redis.exceptions import NoScriptError, RedisError

from ingestd.config import LatestSection, RedisSection
from ingestd.errors import IngestdError
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.model import FieldValue, Reading
from ingestd.store.redis import connect as connect_redis

__all__ = [
    "KEY_PREFIX",
    "Latest",
    "LatestBackend",
    "LatestUnavailable",
    "MemoryLatest",
    "RedisLatest",
    "Values",
    "field_key",
    "read_redis",
    "render_table",
]

log = get_logger("latest")

KEY_PREFIX = "ingestd:latest:"
"""Redis key of a device's hash: the prefix, then the device id."""

_Tags = tuple[str, ...]
"""A reading's tags, flat: key, value, key, value..."""
_Entry = tuple[FieldValue, int, _Tags]
"""(value, reading time in ns, the reading's tags). Flat strings, not the reading's dict: a
tuple holding a dict (or tuples younger than itself) is never untracked by the garbage
collector, and 60,000 of these for 10,000 devices, replaced at every reading, set off the
middle-generation collections behind the alert latency's tail (50-100 ms pauses, bench)."""


def _flat(tags: dict[str, str]) -> _Tags:
    return tuple(chain.from_iterable(tags.items()))


def _tags(flat: _Tags) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


_Group = tuple[str, str]
"""(device, measurement): the values of one reading's fields go together."""
_Groups = Mapping[_Group, dict[str, _Entry]]
"""What a backend writes: (device, measurement) -> field -> newest entry."""
Values = dict[str, dict[str, dict[str, Any]]]
"""device -> field key (``reservoir.ph``) -> {time_ns, time, measurement, field, value, tags}."""


class LatestUnavailable(IngestdError):
    """Redis failed or did not answer within redis.timeout; the values wait for the next try."""

    retriable = True


def field_key(measurement: str, field: str) -> str:
    """``measurement.field``, a dot in the measurement escaped so that no two series meet."""
    if "." in measurement or "\\" in measurement:
        measurement = measurement.replace("\\", "\\\\").replace(".", "\\.")
    return f"{measurement}.{field}"


class _Times:
    """ISO 8601 times, formatted once per second of the readings (strftime is slow)."""

    __slots__ = ("_seconds",)

    def __init__(self) -> None:
        self._seconds: dict[int, str] = {}

    def iso(self, time_ns: int) -> str:
        seconds, ns = divmod(time_ns, 1_000_000_000)
        stamp = self._seconds.get(seconds)
        if stamp is None:
            stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._seconds[seconds] = stamp
        return f"{stamp}.{ns // 1_000_000:03d}Z"


def _value(measurement: str, field: str, entry: _Entry, times: _Times) -> dict[str, Any]:
    """What readers get for one value; ``time_ns`` first (the Redis script reads it there)."""
    value, time_ns, tags = entry
    return {
        "time_ns": time_ns,
        "time": times.iso(time_ns),
        "measurement": measurement,
        "field": field,
        "value": value,
        "tags": _tags(tags),
    }


def _merge(into: dict[str, _Entry], fields: dict[str, _Entry]) -> None:
    """Newest reading time wins; on a tie, ``fields`` (the later observed) wins."""
    for name, entry in fields.items():
        old = into.get(name)
        if old is None or old[1] <= entry[1]:
            into[name] = entry


class LatestBackend(Protocol):
    async def write(self, groups: _Groups) -> None:
        """Store every group's values (newest wins); raise LatestUnavailable on failure."""

    async def read(self, device: str | None = None) -> Values:
        """One device's values (empty when unknown or expired), or every device's."""

    async def check(self) -> None:
        """Raise LatestUnavailable unless a write could get through now (a cheap probe)."""


class MemoryLatest:
    """The latest values in this process: a device's values expire ``ttl`` after its last
    write, like the Redis hash's ``PEXPIRE``; expired devices are swept on every write."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        # device -> [expires at, measurement -> field -> entry]; ordered by expiry, since a
        # write moves the device last. Updated in place: a new object per device per write
        # lives until its next reading, long enough to burden the garbage collector.
        self._devices: OrderedDict[str, list[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._devices)

    async def write(self, groups: _Groups) -> None:
        now = self._clock()
        expires = now + self._ttl
        stored = self._devices
        for (device, measurement), fields in groups.items():
            found = stored.get(device)
            if found is None:
                found = stored[device] = [expires, {}]
            else:
                if found[0] <= now:
                    found[1] = {}
                found[0] = expires
                stored.move_to_end(device)
            _merge(found[1].setdefault(measurement, {}), fields)
        self.sweep()

    async def check(self) -> None:
        return None

    def sweep(self) -> None:
        now = self._clock()
        stored = self._devices
        while stored:
            device, (expires, _) = next(iter(stored.items()))
            if expires > now:
                break
            del stored[device]

    async def read(self, device: str | None = None) -> Values:
        self.sweep()
        times = _Times()
        if device is not None:
            found = self._devices.get(device)
            return {device: self._render(found[1], times)} if found is not None else {}
        return {
            name: self._render(values, times) for name, (_, values) in sorted(self._devices.items())
        }

    @staticmethod
    def _render(values: dict[str, dict[str, _Entry]], times: _Times) -> dict[str, dict[str, Any]]:
        rendered = {
            field_key(measurement, name): _value(measurement, name, entry, times)
            for measurement, fields in values.items()
            for name, entry in fields.items()
        }
        return dict(sorted(rendered.items()))


# KEYS: device hashes; ARGV[1]: TTL in ms; ARGV[2]: JSON, for each key a list of
# (field key, time_ns as digits, JSON value). A stored value with a later time_ns than the
# written one stays; times are compared as digit strings (19-digit nanoseconds do not fit
# Lua's doubles). Two calls per hash (HMGET, HSET) whatever its number of fields.
_SCRIPT = """
local ttl = ARGV[1]
local groups = cjson.decode(ARGV[2])
for k = 1, #KEYS do
  local key, values = KEYS[k], groups[k]
  local fields = {}
  for i = 1, #values, 3 do
    fields[#fields + 1] = values[i]
  end
  local stored = redis.call('HMGET', key, unpack(fields))
  local set = {}
  for j = 1, #fields do
    local i = 3 * j - 2
    local new, old = values[i + 1], stored[j]
    local keep = false
    if old then
      local t = string.match(old, '^{"time_ns":(%d+)')
      keep = t ~= nil and (#t > #new or (#t == #new and t > new))
    end
    if not keep then
      set[#set + 1] = values[i]
      set[#set + 1] = values[i + 2]
    end
  end
  if #set > 0 then
    redis.call('HSET', key, unpack(set))
  end
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()

_CALL_VALUES = 1000
"""Values per script call: a call is short (Redis serves others between calls), and a
hash's fields stay far below Lua's limit on unpacked arguments."""
_SCAN_COUNT = 1000

# KEYS: device hashes; ARGV[1]: the length of their prefix. One JSON object, device ->
# field key -> stored value, so that the client parses one string, not a reply per field.
_READ_SCRIPT = """
local skip = tonumber(ARGV[1])
local devices = {}
for k = 1, #KEYS do
  local flat = redis.call('HGETALL', KEYS[k])
  if #flat > 0 then
    local fields = {}
    for i = 1, #flat, 2 do
      fields[#fields + 1] = cjson.encode(flat[i]) .. ':' .. flat[i + 1]
    end
    local device = cjson.encode(string.sub(KEYS[k], skip + 1))
    devices[#devices + 1] = device .. ':{' .. table.concat(fields, ',') .. '}'
  end
end
return '{' .. table.concat(devices, ',') .. '}'
"""
_READ_SCRIPT_SHA = hashlib.sha1(_READ_SCRIPT.encode()).hexdigest()


class RedisLatest:
    """The latest values in Redis: every write one pipelined round trip of script calls,
    each for up to a thousand values (the script is loaded again when Redis lost it, e.g.
    after a restart)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        ttl: float,
        *,
        prefix: str = KEY_PREFIX,
        call_values: int = _CALL_VALUES,
    ) -> None:
        self._client = client
        self._ttl_ms = max(1, round(ttl * 1000))
        self._prefix = prefix
        self._call_values = call_values

    async def write(self, groups: _Groups) -> None:
        calls = self._calls(groups)
        try:
            try:
                await self._run(calls)
            except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load it, write again
                await self._client.script_load(_SCRIPT)
                await self._run(calls)
        except (RedisError, OSError, TimeoutError) as exc:
            raise LatestUnavailable(f"Redis: {_reason(exc)}") from exc

    def _calls(self, groups: _Groups) -> list[tuple[list[str], bytes]]:
        """Script calls of up to ``call_values`` values each: (keys, JSON argument)."""
        dumps = orjson.dumps
        times = _Times()
        limit = 3 * self._call_values
        calls: list[tuple[list[str], bytes]] = []
        keys: list[str] = []
        lists: list[list[str]] = []
        count = 0
        last_ns = -1
        for (device, measurement), fields in groups.items():
            key = self._prefix + device
            prefix = field_key(measurement, "")
            measurement_json = dumps(measurement).decode()
            values: list[str] = []
            last_tags: _Tags | None = None
            for name, (value, time_ns, tags) in fields.items():
                if len(values) == limit:  # one reading with very many fields
                    keys.append(key)
                    lists.append(values)
                    values = []
                # Fields of one reading share their time and tags: encode those once.
                if time_ns != last_ns:
                    last_ns, digits, stamp = time_ns, str(time_ns), times.iso(time_ns)
                if tags is not last_tags:
                    last_tags, tags_json = tags, dumps(_tags(tags)).decode()
                values.append(prefix + name)
                values.append(digits)
                # The layout of _value(), time_ns first, without building a dict per value.
                values.append(
                    f'{{"time_ns":{digits},"time":"{stamp}","measurement":{measurement_json},'
                    f'"field":{dumps(name).decode()},"value":{dumps(value).decode()},'
                    f'"tags":{tags_json}}}'
                )
            keys.append(key)
            lists.append(values)
            count += len(fields)
            if count >= self._call_values:
                calls.append((keys, dumps(lists)))
                keys, lists, count = [], [], 0
        if keys:
            calls.append((keys, dumps(lists)))
        return calls

    async def check(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError, TimeoutError) as exc:
            raise LatestUnavailable(f"Redis: {_reason(exc)}") from exc

    async def _run(self, calls: list[tuple[list[str], bytes]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, blob in calls:
                pipe.evalsha(_SCRIPT_SHA, len(keys), *keys, self._ttl_ms, blob)
            await pipe.execute()

    async def read(self, device: str | None = None) -> Values:
        try:
            if device is not None:
                found = await self._client.hgetall(self._prefix + device)
                return {device: self._render(found)} if found else {}
            keys = [
                key
                async for key in self._client.scan_iter(match=self._prefix + "*", count=_SCAN_COUNT)
            ]
            chunks = [keys[i : i + _SCAN_COUNT] for i in range(0, len(keys), _SCAN_COUNT)]
            try:
                blobs = await self._read_all(chunks)
            except NoScriptError:  # Redis restarted or SCRIPT FLUSH: load it, read again
                await self._client.script_load(_READ_SCRIPT)
                blobs = await self._read_all(chunks)
            result: Values = {}
            for blob in blobs:
                result.update(orjson.loads(blob))
            return {name: dict(sorted(result[name].items())) for name in sorted(result)}
        except (RedisError, OSError, TimeoutError) as exc:
            raise LatestUnavailable(f"Redis: {_reason(exc)}") from exc
        except orjson.JSONDecodeError as exc:
            raise LatestUnavailable(f"Redis: a latest value is not JSON: {exc}") from exc

    async def _read_all(self, chunks: list[list[Any]]) -> list[bytes]:
        async with self._client.pipeline(transaction=False) as pipe:
            for chunk in chunks:
                pipe.evalsha(_READ_SCRIPT_SHA, len(chunk), *chunk, len(self._prefix))
            return list(await pipe.execute())

    @staticmethod
    def _render(found: dict[Any, Any]) -> dict[str, dict[str, Any]]:
        values = {}
        for key, raw in found.items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            values[name] = orjson.loads(raw)
        return dict(sorted(values.items()))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


class Latest:
    """The latest-values stage: observe readings on the hot path, write them periodically."""

    def __init__(
        self,
        section: LatestSection,
        metrics: Metrics,
        health: Health,
        client: redis.asyncio.Redis | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._section = section
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self.backend: LatestBackend
        if client is not None:
            self.backend = RedisLatest(client, section.ttl)
            self._where = "Redis"
        else:
            self.backend = MemoryLatest(section.ttl, clock=clock)
            self._where = "memory (no redis.url)"
        # Observed since the last write: (device, measurement) -> field -> newest entry.
        self._pending: dict[_Group, dict[str, _Entry]] = {}
        # Waiting since a failed write (least recently changed first), and since when.
        self._backlog: OrderedDict[_Group, dict[str, _Entry]] = OrderedDict()
        self._changed: dict[_Group, float] = {}
        self._down: str | None = None
        health.ok("latest", f"in {self._where}")

    def observe(self, readings: Iterable[Reading]) -> None:
        """Take the readings' values; newest reading time wins. No I/O: O(fields)."""
        pending = self._pending
        for reading in readings:
            group = (reading.device, reading.measurement)
            fields = pending.get(group)
            if fields is None:
                fields = pending[group] = {}
            when = reading.time_ns
            tags = _flat(reading.tags)
            for name, value in reading.fields.items():
                old = fields.get(name)
                if old is None or old[1] <= when:
                    fields[name] = (value, when, tags)

    async def run(self) -> None:
        """Write every ``latest.interval``, until cancelled."""
        while True:
            await asyncio.sleep(self._section.interval)
            await self.flush()

    async def flush(self) -> bool:
        """Write everything waiting in one round trip; False when it has to wait longer."""
        now = self._clock()
        pending, self._pending = self._pending, {}
        batch: _Groups = pending
        if self._backlog:  # after a failed write: everything waiting, and what is new
            self._keep(pending, now)
            batch = self._backlog
        if not batch:
            if isinstance(self.backend, MemoryLatest):
                self.backend.sweep()
            return True
        count = sum(map(len, batch.values()))
        try:
            if self._down is not None:
                await self.backend.check()  # before encoding everything for nothing
            await self.backend.write(batch)
        except LatestUnavailable as exc:
            if batch is pending:
                self._keep(pending, now)
            self._failed(str(exc), now)
            return False
        except asyncio.CancelledError:  # shutting down: close() tries once more
            if batch is pending:
                self._keep(pending, now)
            raise
        if batch is not pending:
            self._backlog = OrderedDict()
            self._changed = {}
        self._metrics.latest_writes.inc()
        self._metrics.latest_values_written.inc(count)
        self._metrics.latest_pending.set(0)
        if self._down is not None:
            self._down = None
            self._health.ok("latest", f"in {self._where}")
            log.info("latest values written again", backend=self._where, values=count)
        return True

    def _keep(self, pending: dict[_Group, dict[str, _Entry]], now: float) -> None:
        """Add values to those waiting for the next write (newest wins)."""
        backlog, changed = self._backlog, self._changed
        for group, fields in pending.items():
            waiting = backlog.get(group)
            if waiting is None:
                backlog[group] = fields
            else:
                _merge(waiting, fields)
                backlog.move_to_end(group)
            changed[group] = now

    def _failed(self, reason: str, now: float) -> None:
        self._metrics.latest_write_errors.inc()
        # What Redis would have expired by now goes: waiting stays bounded in an outage.
        backlog, changed = self._backlog, self._changed
        while backlog:
            group = next(iter(backlog))
            if now - changed[group] < self._section.ttl:
                break
            del backlog[group], changed[group]
        if self._down is None:
            log.error("latest values cannot be written; they wait, ingestion goes on", error=reason)
        self._down = reason
        waiting_count = sum(map(len, backlog.values()))
        self._metrics.latest_pending.set(waiting_count)
        self._health.problem(
            "latest",
            f"{self._where} unavailable ({reason}): {waiting_count} latest values waiting;"
            " ingestion goes on",
        )

    async def read(self, device: str | None = None) -> Values:
        """Raises LatestUnavailable when Redis is."""
        return await self.backend.read(device)

    async def close(self, grace: float) -> None:
        """One last write (Redis only), for at most ``grace`` seconds."""
        if isinstance(self.backend, RedisLatest):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self.flush()


def render_table(values: Values, now_ns: int | None = None) -> list[str]:
    """Lines of a readable table: device, measurement, field, value, time, age, tags."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    rows = [("DEVICE", "MEASUREMENT", "FIELD", "VALUE", "TIME", "AGE", "TAGS")]
    for device, fields in values.items():
        for entry in fields.values():
            age = max(0, now_ns - int(entry["time_ns"])) / 1e9
            tags = ",".join(f"{k}={v}" for k, v in sorted(entry.get("tags", {}).items()))
            value = entry["value"]
            shown = f"{value:.15g}" if isinstance(value, float) else str(value)
            rows.append(
                (
                    device,
                    str(entry["measurement"]),
                    str(entry["field"]),
                    shown,
                    str(entry["time"]),
                    _age(age),
                    tags,
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
        for row in rows
    ]


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


async def read_redis(section: RedisSection, ttl: float, device: str | None = None) -> Values:
    """The latest values straight from Redis (``ingestd latest``: no daemon needed)."""
    client = connect_redis(section)
    try:
        return await RedisLatest(client, ttl).read(device)
    finally:
        await client.aclose()
