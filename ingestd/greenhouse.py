"""A simulated hydroponic greenhouse: what one device's sensors read at a given moment.

Each simulated device is an ESP32 on a nutrient reservoir (pH, EC, water temperature, level)
with a climate sensor beside it (air temperature, humidity, CO2, light). Readings follow the
time of day at the greenhouse (``utc_offset``):

- light (lux): sunlight from 06:00 to 18:00, strongest at noon, dimmed by passing clouds,
  plus grow lights from 06:00 to 22:00 while the sun is weak; dark at night;
- air temperature peaks mid-afternoon, humidity is lowest then; CO2 builds up overnight
  (plants respire, vents are shut) and is drawn down by photosynthesis in daylight;
- the water follows the air slowly; pH rises and EC falls a little as plants feed by day;
  the reservoir level sags by day (transpiration) and the float valve tops it up at night;

with sensor noise on every value. Normal values stay inside the example rules' quiet bands
(rules/*.yaml), so alerts come only from anomalies:

=================  ===============================================  ====================
anomaly            what happens                                     caught by
=================  ===============================================  ====================
ph_drift           the pH probe drifts to 7.0-7.8 or 4.6-5.3        ph_out_of_range
ec_drift           nutrients run low (EC 0.5-1.0) or concentrate    ec_out_of_range
chiller_failure    the water warms to 24.8-27.5 °C                  water_temperature_high
heater_failure     the air cools to 7-11 °C                         air_temperature
vent_failure       humidity climbs to 84-95 %                       air_humidity
co2_valve_stuck    CO2 climbs to 1800-3500 ppm                      co2_high
leak               the reservoir drains at >1 %/min to 2-8 %        reservoir_draining_fast,
                                                                    reservoir_level_low
dropout            the device goes silent for 12-60 min             sensor_silent
ph_probe_lost      readings come without pH for 20-60 min           ph_probe_silent
=================  ===============================================  ====================

A drift pulls its field from the normal value to the target over a ramp, holds it there,
then ends at once (probe recalibrated, valve fixed, tank refilled).

Everything is a function of the seed, the device number, its site and the time, except
the noise, which is one random stream per device: the same seed gives the same devices,
the same anomalies at the same moments and, for the same sequence of reading times, the
same values, whichever process simulates the device. Anomalies are drawn per device and
per 4-hour slot, each inside its slot, so finding the one at a moment costs one lookup.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "BASIC_FIELDS",
    "FIELDS",
    "KINDS",
    "RANGES",
    "SLOT",
    "Anomalies",
    "Device",
    "Episode",
]

FIELDS = ("ph", "ec", "water_temp", "air_temp", "humidity", "co2", "light", "level")
"""Every field a device reports."""
BASIC_FIELDS = FIELDS[:5]
"""The fields of the simulator's first version (and of the benchmarks' series)."""
RANGES: dict[str, tuple[float, float]] = {
    "ph": (0.0, 14.0),
    "ec": (0.0, 10.0),  # mS/cm
    "water_temp": (0.0, 45.0),  # °C
    "air_temp": (-10.0, 50.0),  # °C
    "humidity": (0.0, 100.0),  # % relative
    "co2": (0.0, 10_000.0),  # ppm
    "light": (0.0, 120_000.0),  # lux (full sun is ~100,000)
    "level": (0.0, 100.0),  # % full
}
"""What a working sensor can report, anomalies included."""

SLOT = 4 * 3600.0
"""Seconds: at most one anomaly per device starts and ends within each slot."""

_TAU = 2 * math.pi
_MINUTE = 60.0

# field: (noise sigma, decimals) as a cheap probe of the kind would report them.
_NOISE: dict[str, tuple[float, int]] = {
    "ph": (0.02, 3),
    "ec": (0.015, 3),
    "water_temp": (0.05, 2),
    "air_temp": (0.15, 2),
    "humidity": (0.6, 1),
    "co2": (15.0, 0),
    "light": (0.0, 0),  # multiplicative: 2 % of the value, below
    "level": (0.15, 1),
}


class Anomalies(StrEnum):
    """How often each device has an anomaly."""

    OFF = "off"
    NORMAL = "normal"  # one in 12 slots: about one every two days per device
    HIGH = "high"  # three in 4 slots: about one every five hours per device


_CHANCE = {Anomalies.OFF: 0.0, Anomalies.NORMAL: 1 / 12, Anomalies.HIGH: 3 / 4}


@dataclass(frozen=True)
class _Kind:
    weight: int
    field: str | None  # the field a drift pulls; None: dropout, or a lost probe's field
    targets: tuple[tuple[float, float], ...]  # one range is picked, then a value in it
    ramp: tuple[float, float]  # minutes to reach the target
    hold: tuple[float, float]  # minutes at the target (the whole anomaly when ramp is 0)


KINDS: dict[str, _Kind] = {
    "ph_drift": _Kind(3, "ph", ((7.0, 7.8), (4.6, 5.3)), (40, 120), (15, 45)),
    "ec_drift": _Kind(2, "ec", ((0.5, 1.0), (2.7, 3.4)), (40, 120), (15, 45)),
    "chiller_failure": _Kind(1, "water_temp", ((24.8, 27.5),), (30, 90), (15, 45)),
    "heater_failure": _Kind(1, "air_temp", ((7.0, 11.0),), (30, 90), (20, 60)),
    "vent_failure": _Kind(1, "humidity", ((84.0, 95.0),), (20, 60), (20, 60)),
    "co2_valve_stuck": _Kind(1, "co2", ((1800.0, 3500.0),), (10, 30), (15, 60)),
    "leak": _Kind(1, "level", ((2.0, 8.0),), (25, 50), (10, 30)),
    "dropout": _Kind(3, None, (), (0, 0), (12, 60)),
    "ph_probe_lost": _Kind(1, None, (), (0, 0), (20, 60)),
}
"""Every anomaly kind (see the module docstring); a kind is drawn by its weight."""
_KIND_NAMES = tuple(KINDS)
_KIND_WEIGHTS = tuple(k.weight for k in KINDS.values())


@dataclass(frozen=True)
class Episode:
    """One anomaly of one device, from ``start`` to ``end`` (epoch seconds)."""

    device: str
    site: str
    kind: str
    start: float
    end: float
    field: str | None = None
    """The field a drift pulls (``ph`` for ph_probe_lost: the one missing)."""
    target: float | None = None
    """Where a drift pulls its field, reached ``ramp`` seconds after ``start``."""
    ramp: float = 0.0

    def covers(self, at: float) -> bool:
        return self.start <= at < self.end


class Device:
    """The sensors of one simulated device: :meth:`reading` at any moment.

    ``number`` and ``seed`` fix the device's character (its set points, noise, anomalies);
    devices of one ``site`` share the site's climate. ``utc_offset`` (seconds) places the
    greenhouse in time: light at noon is light at local noon.
    """

    def __init__(
        self,
        number: int,
        site: str,
        *,
        seed: int,
        anomalies: Anomalies | str = Anomalies.OFF,
        utc_offset: float = 0.0,
        name: str | None = None,
    ) -> None:
        self.number = number
        self.site = site
        self.name = name or f"device-{number}"
        self._seed = seed
        self._chance = _CHANCE[Anomalies(anomalies)]
        self._offset = utc_offset
        climate = random.Random(f"{seed}:site:{site}")
        self._air = 21.0 + climate.uniform(-1.0, 1.0)
        self._humidity = 63.0 + climate.uniform(-2.0, 2.0)
        self._co2 = 780.0 + climate.uniform(-40.0, 40.0)
        self._sun = climate.uniform(25_000.0, 45_000.0)
        self._grow = climate.uniform(12_000.0, 18_000.0)
        self._clouds = climate.uniform(0.0, _TAU)
        own = random.Random(f"{seed}:device:{number}")
        self._ph = own.uniform(5.8, 6.2)
        self._ec = own.uniform(1.6, 2.0)
        self._water = 19.8 + own.uniform(-0.5, 0.5)
        self._air_own = own.uniform(-0.3, 0.3)
        self._humidity_own = own.uniform(-1.0, 1.0)
        self._level = own.uniform(85.0, 90.0)
        self._random = own.random  # the device's noise stream, after its set points
        self._slot = -1
        self._slot_episode: Episode | None = None

    # --- anomalies ------------------------------------------------------------------------

    def episode(self, at: float) -> Episode | None:
        """The anomaly going on at ``at``, if any."""
        if not self._chance:
            return None
        slot = int(at // SLOT)
        if slot != self._slot:
            self._slot, self._slot_episode = slot, self._draw(slot)
        episode = self._slot_episode
        return episode if episode is not None and episode.covers(at) else None

    def silent(self, at: float) -> bool:
        """Whether the device is in a dropout at ``at`` (it publishes nothing)."""
        episode = self.episode(at) if self._chance else None
        return episode is not None and episode.kind == "dropout"

    def episodes(self, start: float, end: float) -> list[Episode]:
        """The anomalies that overlap ``[start, end)``, in time order."""
        if not self._chance:
            return []
        found = []
        for slot in range(int(start // SLOT), int(end // SLOT) + 1):
            episode = self._draw(slot)
            if episode is not None and episode.start < end and episode.end > start:
                found.append(episode)
        return found

    def _draw(self, slot: int) -> Episode | None:
        rng = random.Random(f"{self._seed}:{self.number}:{slot}")
        if rng.random() >= self._chance:
            return None
        name = rng.choices(_KIND_NAMES, _KIND_WEIGHTS)[0]
        kind = KINDS[name]
        target = rng.uniform(*rng.choice(kind.targets)) if kind.targets else None
        ramp = rng.uniform(*kind.ramp) * _MINUTE
        length = ramp + rng.uniform(*kind.hold) * _MINUTE
        start = slot * SLOT + rng.uniform(0.0, SLOT - length)
        field = "ph" if name == "ph_probe_lost" else kind.field
        return Episode(self.name, self.site, name, start, start + length, field, target, ramp)

    # --- readings -------------------------------------------------------------------------

    def reading(self, at: float) -> dict[str, float]:
        """Every field the device reports at ``at`` (epoch seconds), noise included.

        During a dropout this is what the sensors would read; the device does not send it
        (see :meth:`silent`). Each call draws from the device's noise stream.
        """
        hour = ((at + self._offset) / 3600.0) % 24.0
        daylight = max(0.0, math.sin(math.pi * (hour - 6.0) / 12.0))  # 0 at 06 and 18, 1 at noon
        warmth = math.sin(_TAU * (hour - 9.0) / 24.0)  # +1 at 15:00, -1 at 03:00
        feeding = math.sin(_TAU * (hour - 12.0) / 24.0)  # +1 at 18:00
        water = math.sin(_TAU * (hour - 11.0) / 24.0)  # lags the air
        sun = self._sun * daylight * (0.8 + 0.2 * math.sin(at / 1900.0 + self._clouds))
        grow = self._grow if 6.0 <= hour < 22.0 and sun < 20_000.0 else 0.0
        ph = self._ph + 0.1 * feeding
        ec = self._ec - 0.08 * feeding
        water_temp = self._water + 1.0 * water
        air_temp = self._air + self._air_own + 5.0 * warmth
        humidity = self._humidity + self._humidity_own - 9.0 * warmth
        co2 = self._co2 - 330.0 * daylight
        light = sun + grow
        level = self._level - 5.0 * daylight
        episode = self.episode(at) if self._chance else None
        if episode is not None:
            return self._anomalous(
                episode, at, [ph, ec, water_temp, air_temp, humidity, co2, light, level]
            )
        r = self._random
        # Unrolled: this runs once per simulated message. Noise: the sum of three uniform
        # draws, scaled to the sigma (Irwin-Hall; bounded at 3 sigma, as a probe's is).
        return {
            "ph": round(ph + 0.04 * (r() + r() + r() - 1.5), 3),
            "ec": round(max(0.0, ec + 0.03 * (r() + r() + r() - 1.5)), 3),
            "water_temp": round(water_temp + 0.1 * (r() + r() + r() - 1.5), 2),
            "air_temp": round(air_temp + 0.3 * (r() + r() + r() - 1.5), 2),
            "humidity": round(min(100.0, max(0.0, humidity + 1.2 * (r() + r() + r() - 1.5))), 1),
            "co2": round(max(0.0, co2 + 30.0 * (r() + r() + r() - 1.5)), 0),
            "light": round(max(0.0, light * (1.0 + 0.04 * (r() + r() + r() - 1.5))), 0),
            "level": round(min(100.0, max(0.0, level + 0.3 * (r() + r() + r() - 1.5))), 1),
        }

    def _anomalous(self, episode: Episode, at: float, normal: list[float]) -> dict[str, float]:
        """A reading during an anomaly: a drift pulls its field towards the target (noise
        on top), a lost probe's field is missing; the same noise draws as a normal one."""
        base = dict(zip(FIELDS, normal, strict=True))
        if episode.target is not None and episode.field is not None:
            progress = min(1.0, (at - episode.start) / episode.ramp) if episode.ramp else 1.0
            value = base[episode.field]
            base[episode.field] = value + (episode.target - value) * progress
        r = self._random
        values: dict[str, float] = {}
        for field, value in base.items():
            sigma, digits = _NOISE[field]
            noise = 2.0 * (r() + r() + r() - 1.5)
            noisy = value * (1.0 + 0.02 * noise) if field == "light" else value + sigma * noise
            low, high = RANGES[field]
            values[field] = round(min(high, max(low, noisy)), digits)
        if episode.kind == "ph_probe_lost":
            del values["ph"]
        return values
