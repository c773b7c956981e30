"""The device registry: which devices may send, their site and quota, their calibrations.

Loaded in one query when PostgreSQL answers and kept current by ``LISTEN ingestd_registry``
(triggers on ``devices`` and ``calibrations`` notify the changed device id), so the hot path
(:meth:`Registry.admit`) is a dict lookup and never waits for the database. A copy is kept
in ``<spool dir>/registry.json``: a daemon starting while PostgreSQL is down uses it.

Unknown devices follow ``registry.unknown``: ``accept``; ``reject`` (a dead letter
``unknown_device``); ``register`` (accepted, and added to ``devices`` in the background
with the site of its first message). A disabled device's messages are dead letters
``device_disabled``. A device whose site the registry knows may send only under that site:
a reading tagged with another ``site`` (a topic level, or a line-protocol tag) is a dead
letter ``site_mismatch``; the site drives the alert topics, rule selection and routes, and
the broker's ACL (``farm/+/%u/#``) leaves that level free. Until the registry has
been loaded once (PostgreSQL down at the first start, no copy yet), every device is accepted:
losing readings to a missing registry would be worse than accepting a stranger's.

Calibration: ``calibrated = raw * scale + offset`` with the calibration of the device and
field whose ``valid_from`` is the latest at or before the reading's time; the reading gets a
``<field>_cal`` field holding the calibration's id, so every value traces back to it.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.rows import tuple_row

from ingestd.config import PostgresSection, RegistrySection
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.model import Reading, Reject
from ingestd.store.postgres import conninfo, schema_problem

__all__ = [
    "CHANNEL",
    "DEVICE_DISABLED",
    "QUERIES",
    "SITE_MISMATCH",
    "UNKNOWN_DEVICE",
    "Calibration",
    "Device",
    "Registry",
]

log = get_logger("registry")

CHANNEL = "ingestd_registry"
UNKNOWN_DEVICE = "unknown_device"
DEVICE_DISABLED = "device_disabled"
SITE_MISMATCH = "site_mismatch"
CACHE_FILE = "registry.json"
_MAX_REGISTER = 10_000  # new devices waiting to be registered, at most

_DEVICE_SELECT = """
SELECT d.id, d.site_id, d.kind, d.enabled, d.quota_rate, d.quota_burst,
       coalesce(
           (SELECT json_agg(json_build_array(c.id, c.field, c."offset", c.scale,
                                             greatest(-9.2e18, least(9.2e18,
                                                 extract(epoch FROM c.valid_from) * 1e9))::bigint)
                            ORDER BY c.valid_from)
              FROM calibrations c WHERE c.device_id = d.id),
           '[]') AS calibrations
  FROM devices d
"""

QUERIES: dict[str, str] = {
    # Reads every device by design (once at start and after a reconnect).
    "registry_load": _DEVICE_SELECT,
    "registry_reload": _DEVICE_SELECT + " WHERE d.id = ANY(%(ids)s)",
    # The sites first: a device's site_id references sites.
    "registry_register_sites": (
        "INSERT INTO sites (id) SELECT DISTINCT s FROM unnest(%(sites)s::text[]) AS s"
        " WHERE s IS NOT NULL ON CONFLICT (id) DO NOTHING"
    ),
    "registry_register": (
        "INSERT INTO devices (id, site_id, auto_registered)"
        " SELECT d.id, d.site, true FROM unnest(%(ids)s::text[], %(sites)s::text[]) AS d(id, site)"
        " ON CONFLICT (id) DO NOTHING"
    ),
}
EXAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "registry_load": {},
    "registry_reload": {"ids": ["dev-00042"]},
    "registry_register_sites": {"sites": ["gh1", None]},
    "registry_register": {"ids": ["dev-new", "dev-new2"], "sites": ["gh1", None]},
}


@dataclass(frozen=True, slots=True)
class Calibration:
    id: int
    field: str
    offset: float
    scale: float
    valid_from_ns: int


@dataclass(frozen=True, slots=True)
class Device:
    id: str
    site: str | None = None
    kind: str = ""
    enabled: bool = True
    quota_rate: float | None = None
    quota_burst: int | None = None
    calibrations: dict[str, tuple[Calibration, ...]] = field(default_factory=dict)
    starts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per field: the calibrations' valid_from_ns, for bisect."""

    @classmethod
    def of(cls, row: Sequence[Any]) -> Device:
        ident, site, kind, enabled, rate, burst, calibrations = row
        if isinstance(calibrations, str):
            calibrations = orjson.loads(calibrations)
        by_field: dict[str, list[Calibration]] = {}
        for cal_id, name, offset, scale, valid_from_ns in calibrations:
            by_field.setdefault(name, []).append(
                Calibration(int(cal_id), name, float(offset), float(scale), int(valid_from_ns))
            )
        cals = {
            name: tuple(sorted(c, key=lambda x: x.valid_from_ns)) for name, c in by_field.items()
        }
        return cls(
            id=ident,
            site=site,
            kind=kind,
            enabled=enabled,
            quota_rate=rate,
            quota_burst=burst,
            calibrations=cals,
            starts={name: tuple(c.valid_from_ns for c in cs) for name, cs in cals.items()},
        )

    def to_row(self) -> list[Any]:
        cals = [
            [c.id, c.field, c.offset, c.scale, c.valid_from_ns]
            for cs in self.calibrations.values()
            for c in cs
        ]
        return [
            self.id,
            self.site,
            self.kind,
            self.enabled,
            self.quota_rate,
            self.quota_burst,
            cals,
        ]

    def calibration(self, name: str, time_ns: int) -> Calibration | None:
        starts = self.starts.get(name)
        if starts is None:
            return None
        at = bisect.bisect_right(starts, time_ns) - 1
        return self.calibrations[name][at] if at >= 0 else None


Changed = Callable[[Device | None, Device | None], None]
"""Called with (before, after) for every device that changed; None: absent."""


class Registry:
    def __init__(
        self,
        section: RegistrySection,
        postgres: PostgresSection,
        state_dir: Path,
        metrics: Metrics,
        health: Health,
        *,
        on_change: Changed | None = None,
    ) -> None:
        self._section = section
        self._postgres = postgres
        self._cache = state_dir / CACHE_FILE
        self._metrics = metrics
        self._health = health
        self._on_change = on_change
        self._devices: dict[str, Device] = {}
        self.loaded = False
        """Whether the devices come from PostgreSQL or its copy (else every device passes)."""
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._policy = section.unknown
        self._register: dict[str, str | None] = {}
        """Devices to register: their first site (None: their topic names none)."""
        self.schema_error: str | None = None

    # --- the hot path -----------------------------------------------------------------

    def admit(self, readings: Sequence[Reading]) -> None:
        """Refuse a message of an unknown or disabled device, or under another site than
        its own (Reject), calibrate the rest."""
        if not readings:
            return
        name = readings[0].device
        device = self._devices.get(name)
        if device is None:
            if not self.loaded or self._policy == "accept":
                return
            if self._policy == "reject":
                raise Reject(
                    UNKNOWN_DEVICE,
                    f"device {name!r} is not in the registry (registry.unknown: reject);"
                    f" add it with: ingestd devices add {name}",
                )
            if len(self._register) < _MAX_REGISTER:  # else: accepted, registered later
                site = next((r.tags["site"] for r in readings if "site" in r.tags), None)
                if site is not None:
                    _check_site(name, site, readings, "is being registered at site")
                self._devices[name] = Device(name, site=site)  # accepted from now on
                self._register[name] = site
            return
        if not device.enabled:
            raise Reject(
                DEVICE_DISABLED,
                f"device {name!r} is disabled in the registry; enable it with:"
                f" ingestd devices enable {name}",
            )
        if device.site is not None:
            _check_site(name, device.site, readings, "is at site")
        if device.calibrations:
            for reading in readings:
                _calibrate(device, reading)

    def get(self, name: str) -> Device | None:
        return self._devices.get(name)

    def devices(self) -> list[Device]:
        return list(self._devices.values())

    # --- loading ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load from PostgreSQL (one query) or, when it does not answer, from the copy.

        Raises SchemaError when PostgreSQL answers with an older schema: ``ingestd run``
        refuses to start until ``ingestd db migrate``."""
        try:
            conn = await self._connect()
        except psycopg.OperationalError as exc:
            why = _reason(exc)
        else:
            try:
                await conn.execute(f"LISTEN {CHANNEL}")  # before loading: nothing missed
                await self._check_schema(conn, raise_error=True)
                await self._load(conn)
            except psycopg.Error as exc:  # a refused query: the copy serves, run() retries
                await conn.close()
                log.error("cannot load the registry from PostgreSQL", error=_reason(exc))
                self._health.problem("postgres", f"registry not loaded: {_reason(exc)}")
                self._read_cache()
                return
            except BaseException:
                await conn.close()
                raise
            self._conn = conn  # run() goes on listening on it
            self._health.ok("postgres")
            return
        self._health.problem("postgres", f"unreachable, registry from its copy: {why}")
        log.warning("PostgreSQL unreachable at start; using the registry copy", error=why)
        self._read_cache()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        kwargs = conninfo(self._postgres)
        return await psycopg.AsyncConnection.connect(
            kwargs.pop("conninfo"), autocommit=True, row_factory=tuple_row, **kwargs
        )

    async def _check_schema(
        self, conn: psycopg.AsyncConnection[Any], *, raise_error: bool = False
    ) -> bool:
        cursor = await conn.execute("SELECT to_regclass('ingestd_schema') IS NOT NULL")
        row = await cursor.fetchone()
        version = 0
        if row and row[0]:
            cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM ingestd_schema")
            found = await cursor.fetchone()
            version = int(found[0]) if found else 0
        problem = schema_problem(version)
        self.schema_error = problem
        if problem is None:
            return True
        if raise_error:
            from ingestd.store.postgres import SchemaError  # noqa: PLC0415

            raise SchemaError(problem)
        self._health.problem("postgres", problem)
        log.error("PostgreSQL schema does not match; not using it", problem=problem)
        return False

    async def _load(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cursor = await conn.execute(QUERIES["registry_load"])
        rows = await cursor.fetchall()
        fresh = await asyncio.to_thread(_devices_of, rows)  # 100k devices: seconds of CPU
        old, self._devices = self._devices, fresh
        self.loaded = True
        # Devices registered here but not yet written stay accepted (under their site).
        for name, site in self._register.items():
            self._devices.setdefault(name, Device(name, site=site))
        self._changed(old, fresh, set(old) | set(fresh))
        self._metrics.registry_devices.set(len(fresh))
        log.info("device registry loaded", devices=len(fresh))
        await self._save_cache()

    def _changed(
        self, old: dict[str, Device], new: dict[str, Device], names: Iterable[str]
    ) -> None:
        if self._on_change is None:
            return
        for name in names:
            before, after = old.get(name), new.get(name)
            if before != after:
                self._on_change(before, after)

    def _read_cache(self) -> None:
        if not self._section.cache:
            return
        try:
            rows = orjson.loads(self._cache.read_bytes())
            self._devices = {device.id: device for device in map(Device.of, rows)}
        except FileNotFoundError:
            log.warning(
                "no registry copy yet: every device is accepted until PostgreSQL answers",
                file=str(self._cache),
            )
            return
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            log.error("registry copy unreadable; ignored", file=str(self._cache), error=str(exc))
            return
        self.loaded = True
        self._changed({}, self._devices, self._devices)
        self._metrics.registry_devices.set(len(self._devices))
        log.info("device registry loaded from its copy", devices=len(self._devices))

    async def _save_cache(self) -> None:
        if not self._section.cache:
            return
        rows = [device.to_row() for device in list(self._devices.values())]  # on the loop
        await asyncio.to_thread(self._write_cache, rows)

    def _write_cache(self, rows: list[list[Any]]) -> None:
        data = orjson.dumps(rows)
        tmp = self._cache.with_suffix(".tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            tmp.replace(self._cache)
        except OSError as exc:
            log.error("cannot save the registry copy", file=str(self._cache), error=str(exc))

    # --- staying current ----------------------------------------------------------------

    async def run(self) -> None:
        """LISTEN for changes; reconnect (and reload everything) after an outage."""
        while True:
            try:
                conn, self._conn = self._conn, None
                if conn is None:
                    conn = await self._connect()
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # Loaded after LISTEN, so a change made meanwhile is never missed.
                    if await self._check_schema(conn):
                        await self._load(conn)
                async with conn:
                    if self.schema_error is None:
                        self._health.ok("postgres")
                        await self._listen(conn)
            except psycopg.Error as exc:
                why = _reason(exc)
                self._health.problem("postgres", f"unreachable, registry cached: {why}")
                log.warning("PostgreSQL connection lost; registry cached, retrying", error=why)
            except Exception as exc:  # a bug of ours must not end the daemon: say so, retry
                self._health.problem("postgres", f"registry error: {type(exc).__name__}: {exc}")
                log.exception("internal error in the registry; retrying")
            await asyncio.sleep(self._postgres.retry)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            changed: set[str] = set()
            # stop_after, never break: a break would drop the rest of a packet's notifies.
            async for notify in conn.notifies(timeout=0.5, stop_after=1000):
                changed.add(notify.payload)
            if changed:
                await self._reload(conn, changed)
            if self._register:
                await self._register_new(conn)
            # Proves the connection is alive (notifies() alone would wait silently).
            await conn.execute("SELECT 1")

    async def _reload(self, conn: psycopg.AsyncConnection[Any], names: set[str]) -> None:
        cursor = await conn.execute(QUERIES["registry_reload"], {"ids": sorted(names)})
        found = {device.id: device for device in map(Device.of, await cursor.fetchall())}
        old = {name: self._devices[name] for name in names if name in self._devices}
        for name in names:
            if name in found:
                self._devices[name] = found[name]
            elif name not in self._register:
                self._devices.pop(name, None)
        self._changed(old, found, names)
        self._metrics.registry_devices.set(len(self._devices))
        self._metrics.registry_updates.inc(len(names))
        log.info("device registry updated", devices=sorted(names)[:20], count=len(names))
        await self._save_cache()

    async def _register_new(self, conn: psycopg.AsyncConnection[Any]) -> None:
        names = list(self._register)
        sites = [self._register[name] for name in names]
        async with conn.transaction():
            await conn.execute(QUERIES["registry_register_sites"], {"sites": sites})
            await conn.execute(QUERIES["registry_register"], {"ids": names, "sites": sites})
        for name in names:
            self._register.pop(name, None)
        self._metrics.registry_registered.inc(len(names))
        log.info("devices registered", devices=names[:20], count=len(names))


def _devices_of(rows: Sequence[Sequence[Any]]) -> dict[str, Device]:
    return {device.id: device for device in map(Device.of, rows)}


def _check_site(name: str, site: str, readings: Sequence[Reading], where: str) -> None:
    """Every reading tagged with a site is tagged with ``site``."""
    for reading in readings:
        claimed = reading.tags.get("site")
        if claimed is not None and claimed != site:
            raise Reject(
                SITE_MISMATCH,
                f"device {name!r} {where} {site!r} in the registry, not {claimed[:64]!r};"
                f" if it moved, change its site there (ingestd devices add {name}"
                " --site SITE, with its other settings)",
            )


def _calibrate(device: Device, reading: Reading) -> None:
    fields = reading.fields
    for name in [n for n in fields if n in device.calibrations]:
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, (float, int)):
            continue
        cal = device.calibration(name, reading.time_ns)
        if cal is not None:
            fields[name] = value * cal.scale + cal.offset
            fields[f"{name}_cal"] = float(cal.id)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
