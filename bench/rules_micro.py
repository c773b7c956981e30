"""µs per ``Engine.evaluate`` with 1,000 rules over 10,000 devices (5-field reservoir readings).

Run: ``.venv/bin/python bench/rules_micro.py``. Each scenario builds 1,000 rules, feeds
readings round-robin from 10,000 devices in 200 sites, and reports the cost per reading and
how many rules the index handed over per reading (cost follows the rules that can match a
reading, not the rule count: compare the worst case where every rule can match).
"""

from __future__ import annotations

import gc
import random
import tempfile
import timeit
from pathlib import Path

from ingestd.model import Reading
from ingestd.rules import Engine, RuleSet, load_rules

FIELDS = {
    "ph": (6.0, "outside: [5.5, 6.8]"),
    "ec": (1.8, "outside: [1.2, 2.5]"),
    "water_temp": (20.5, "above: 24"),
    "air_temp": (23.0, "outside: [12, 32]"),
    "humidity": (62.0, "outside: [40, 80]"),
}
SITES = [f"site{i + 1}" for i in range(200)]
DEVICES = [(f"esp32-{i:05d}", SITES[i % 200]) for i in range(10_000)]


def ruleset(kind: str) -> RuleSet:
    """1,000 rules: per site (indexed), site globs, a realistic mix, or all fleet-wide."""
    lines = ["rules:"]

    def rule(name: str, field: str, condition: str, site: str | None = None, *extra: str) -> None:
        where = f", site: '{site}'" if site else ""
        lines.extend(
            [
                f"  - name: {name}",
                f"    select: {{measurement: reservoir, field: {field}{where}}}",
                f"    {condition}",
                *extra,
            ]
        )

    n = 0
    if kind == "mixed":  # fleet-wide levels, rate and deadman rules + per-site rules
        for field, (_, condition) in FIELDS.items():
            rule(f"g{field}", field, condition, None, "    for: 1m")
            rule(f"rate{field}", field, "rate: {above: 5, window: 10m}")
            rule(f"dead{field}", field, "deadman: 10m")
    sites = SITES[:196] if kind == "mixed" else SITES
    for index, site in enumerate(sites):
        for field, (_, condition) in FIELDS.items():
            selector = {"per-site": site, "site-globs": f"{site}*", "all-match": None}.get(
                kind, site
            )
            rule(f"r{n}", field, condition, selector, *(["    for: 2m"] if index % 2 else []))
            n += 1
    path = Path(tempfile.mkdtemp()) / "rules.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_rules(path)


def run(kind: str, alerting: float, count: int = 200_000) -> str:
    rules = ruleset(kind)
    clock = [1.7e9]
    engine = Engine(rules, lambda: clock[0])
    rnd = random.Random(1)
    readings = []
    when = 1.7e9
    for i in range(count):
        device, site = DEVICES[i % len(DEVICES)]
        when += 0.0001
        values: dict[str, float | bool | str] = {
            f: base + rnd.gauss(0, 0.05) for f, (base, _) in FIELDS.items()
        }
        if rnd.random() < alerting:
            values["ph"] = 7.5
        readings.append(Reading("reservoir", device, {"site": site}, values, int(when * 1e9)))
    feed = iter(readings)

    def one() -> None:
        reading = next(feed)
        clock[0] = reading.time_ns / 1e9
        engine.evaluate(reading)

    gc.collect()
    warm = 20_000  # route caches and per-device state
    for _ in range(warm):
        one()
    seconds = timeit.timeit(one, number=count - warm)
    stats = engine.stats
    return (
        f"| {kind} | {alerting:.0%} | {len(rules)} | {seconds / (count - warm) * 1e6:.1f} "
        f"| {stats.rules_examined / stats.readings:.1f} |"
    )


def main() -> None:
    print("| rules | readings alerting | rules | µs per reading | rules examined per reading |")
    print("|---|---:|---:|---:|---:|")
    for kind, alerting in [
        ("per-site", 0.0),
        ("per-site", 0.05),
        ("site-globs", 0.0),
        ("mixed", 0.0),
        ("mixed", 0.05),
        ("all-match", 0.0),
    ]:
        print(run(kind, alerting), flush=True)


if __name__ == "__main__":
    main()
