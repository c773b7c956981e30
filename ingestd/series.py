"""The series cap: how many distinct series one device may write.

A device chooses its measurement (a topic level), its field names (JSON keys) and, in line
protocol, its tags: left alone, one device could grow the TSDB's series, the latest values
(``/latest``, the Redis hash) and the rules' state without limit. :class:`SeriesGuard`
counts, per device, the distinct (measurement, field) pairs and the distinct tag sets it
has written; a message that would take either past ``guard.max_series_per_device`` or
``guard.max_tag_sets_per_device`` is refused whole (``Reject`` with reason
``too_many_series``: a dead letter, counted). Other devices are not affected.

The hot path, :meth:`SeriesGuard.admit`, is one set lookup per reading whose shape (device,
measurement, tags, field names) was seen lately; only a new shape counts its pairs and tag
set against its device.

Memory: a device silent for ``expiry`` to twice that is forgotten, and its count starts
afresh (the daemon gives ``latest.ttl``: by then its latest values have expired too, so
``/latest`` never holds more than the cap). Devices and shapes live in two generations
swapped every ``expiry`` (what is seen in the older one moves to the newer), so nothing is
timed per message. What is remembered is bounded in all (``max_devices``, about 250 bytes
each, and ``max_entries`` series, tag sets and shapes, 8 to 60 bytes each): past either,
the older generation is forgotten early, and said so.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left, insort
from collections.abc import Callable, Sequence

from ingestd.config import GuardSection
from ingestd.decode import TOO_MANY_SERIES
from ingestd.logs import get_logger
from ingestd.metrics import Metrics
from ingestd.model import Reading, Reject

__all__ = ["SeriesGuard"]

log = get_logger("guard")

MAX_DEVICES = 100_000
"""Devices remembered at most (about 25 MiB): more than a gateway's fleet."""
MAX_ENTRIES = 1_000_000
"""Series, tag sets and shapes remembered in all, at most (8 to 60 MiB)."""


def _shape(reading: Reading) -> int:
    """Device, measurement, tag keys and values, field names: equal for a repeated message.
    A 64-bit hash: a collision costs one uncounted series."""
    tags = reading.tags
    return hash(
        (reading.device, reading.measurement, len(tags), *tags, *tags.values(), *reading.fields)
    )


class _Device:
    """What one device has written: hashes of its (measurement, field) pairs and tag sets,
    sorted in an array (8 bytes each), read only for a new shape; and how many of its
    shapes are remembered."""

    __slots__ = ("capped", "known", "pairs", "shapes", "tag_sets")

    def __init__(self) -> None:
        self.known = array("q")
        self.pairs = 0
        self.tag_sets = 0
        self.shapes = 0
        self.capped = False

    def knows(self, key: int) -> bool:
        known = self.known
        at = bisect_left(known, key)
        return at < len(known) and known[at] == key


def _clip(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:40] + "...")


class SeriesGuard:
    def __init__(
        self,
        guard: GuardSection,
        expiry: float,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_devices: int = MAX_DEVICES,
        max_entries: int = MAX_ENTRIES,
    ) -> None:
        self._max_series = guard.max_series_per_device
        self._max_tag_sets = guard.max_tag_sets_per_device
        # Shapes are remembered only to skip the count: a device varying its field subsets
        # (2**n shapes) is counted each time instead of growing this.
        self._max_shapes = self._max_series + self._max_tag_sets
        self._expiry = expiry
        self._metrics = metrics
        self._clock = clock
        self._max_devices = max_devices
        self._max_entries = max_entries
        self._shapes: set[int] = set()
        self._old_shapes: set[int] = set()
        self._current: dict[str, _Device] = {}
        self._previous: dict[str, _Device] = {}
        self._known = 0  # entries in the devices' arrays
        self._capped = 0
        self._swapped = clock()

    @property
    def devices(self) -> int:
        """Devices remembered now."""
        return len(self._current) + len(self._previous)

    @property
    def entries(self) -> int:
        """Series, tag sets and shapes remembered now, of every device."""
        return self._known + len(self._shapes) + len(self._old_shapes)

    @property
    def capped(self) -> int:
        """Devices at their cap now (among those remembered)."""
        return self._capped

    # --- the hot path -----------------------------------------------------------------

    def admit(self, readings: Sequence[Reading]) -> None:
        """Refuse (Reject ``too_many_series``) a message that would take its device past a
        cap; nothing of a refused message counts. A message's readings share one device."""
        shapes = self._shapes
        for reading in readings:
            tags = reading.tags  # _shape(), inlined: this runs for every reading
            key = (
                reading.device,
                reading.measurement,
                len(tags),
                *tags,
                *tags.values(),
                *reading.fields,
            )
            if hash(key) not in shapes:
                self._miss(readings)
                return

    def _miss(self, readings: Sequence[Reading]) -> None:
        """A shape not seen in this generation: from the last one (remembered again, with
        its device), or new (counted)."""
        name = readings[0].device
        device = self._current.get(name)
        if device is None:
            device = self._arrive(name)
        keys = [_shape(reading) for reading in readings]
        shapes, old = self._shapes, self._old_shapes
        if all(key in shapes or key in old for key in keys):
            for key in keys:
                if key in old:
                    old.discard(key)
                    shapes.add(key)
            return
        self._learn(name, device, readings)
        for key in keys:
            if device.shapes >= self._max_shapes:
                break
            if key not in shapes:
                if key in old:
                    old.discard(key)
                else:
                    device.shapes += 1
                shapes.add(key)
        if self.entries > self._max_entries:
            self._overflow()

    def _arrive(self, name: str) -> _Device:
        device = self._previous.pop(name, None)
        if device is None:
            device = _Device()
            if self.devices >= self._max_devices:
                self._overflow()
        self._current[name] = device
        return device

    def _learn(self, name: str, device: _Device, readings: Sequence[Reading]) -> None:
        knows = device.knows
        new: set[int] = set()
        pairs, tag_sets = device.pairs, device.tag_sets
        first_pair: tuple[str, str] | None = None
        first_tags: dict[str, str] | None = None
        for reading in readings:
            measurement = reading.measurement
            for field in reading.fields:
                key = hash((measurement, field))
                if key not in new and not knows(key):
                    new.add(key)
                    pairs += 1
                    first_pair = first_pair or (measurement, field)
            # Order-free, and apart from the pairs: no measurement is empty.
            key = hash(("", *sorted(reading.tags.items())))
            if key not in new and not knows(key):
                new.add(key)
                tag_sets += 1
                first_tags = first_tags or reading.tags
        if pairs > self._max_series:
            assert first_pair is not None  # the count grew
            measurement, field = first_pair
            self._refuse(
                name,
                device,
                f"device {name!r} would write {pairs} series (measurement and field), more"
                f" than guard.max_series_per_device ({self._max_series}); the first new one:"
                f" measurement {_clip(measurement)} field {_clip(field)}",
            )
        if tag_sets > self._max_tag_sets:
            assert first_tags is not None
            shown = ",".join(f"{k}={v}" for k, v in sorted(first_tags.items()))
            self._refuse(
                name,
                device,
                f"device {name!r} would write {tag_sets} tag sets, more than"
                f" guard.max_tag_sets_per_device ({self._max_tag_sets}); the first new one:"
                f" {_clip(shown)}",
            )
        for key in new:
            insort(device.known, key)
        self._known += len(new)
        device.pairs, device.tag_sets = pairs, tag_sets

    def _refuse(self, name: str, device: _Device, detail: str) -> None:
        if not device.capped:
            device.capped = True
            self._capped += 1
            self._metrics.series_capped.set(self._capped)
            log.warning(
                "device at its series cap: its readings with new series become dead letters"
                " (too_many_series); look at what it sends (ingestd deadletters --reason"
                " too_many_series), or raise the cap; it is forgotten after latest.ttl of"
                " silence, or at a restart",
                device=name,
                series=device.pairs,
                tag_sets=device.tag_sets,
                max_series_per_device=self._max_series,
                max_tag_sets_per_device=self._max_tag_sets,
            )
        raise Reject(TOO_MANY_SERIES, detail)

    # --- memory -------------------------------------------------------------------------

    def sweep(self) -> None:
        """Forget the devices silent for a whole generation (call every few seconds)."""
        now = self._clock()
        if now - self._swapped >= self._expiry:
            self._swapped = now
            self._swap()
        self._metrics.series_devices.set(self.devices)

    def _swap(self) -> None:
        gone, self._previous, self._current = self._previous, self._current, {}
        self._old_shapes, self._shapes = self._shapes, set()
        self._known -= sum(len(device.known) for device in gone.values())
        capped = sum(device.capped for device in gone.values())
        if capped:
            self._capped -= capped
            self._metrics.series_capped.set(self._capped)

    def _overflow(self) -> None:
        before = self.devices
        self._swap()
        if self.entries > self._max_entries or self.devices >= self._max_devices:
            self._swap()
        log.warning(
            "the series guard remembers too much: devices seen least recently are forgotten"
            " early, and their series counted afresh",
            forgotten=before - self.devices,
            devices=self.devices,
            max_devices=self._max_devices,
            max_entries=self._max_entries,
        )
        self._metrics.series_devices.set(self.devices)
