"""Rule unit tests written in YAML, in the spirit of ``promtool test rules``.

A test file names rule files and holds tests; each test feeds input series to a fresh
:class:`~ingestd.rules.engine.Engine` on a simulated clock and checks, at given times, the
alerts that are active and the events that were emitted::

    rule_files: [../ph.yaml]          # relative to this file; a directory loads all in it
    tests:
      - name: pH drifts up, warns, then goes critical
        interval: 1m                  # time between compact values (default 1m)
        input:
          - device: esp32-00001
            site: greenhouse-1        # becomes the tag site
            measurement: reservoir
            tags: {zone: a}           # optional, more tags
            fields:
              ph: "6.0 6.5 7.1x3 _ 7.4"        # compact: one value per interval from 0
              ec: [[0s, 1.8], [90s, 1.9]]      # or explicit [offset, value] points
        acknowledge:                  # optional operator actions
          - {at: 6m, rule: ph_range, device: esp32-00001, by: alice}
        expect:
          - at: 2m
            events:                   # every event emitted at exactly 2m (timers fire at
              - {rule: ph_range, device: esp32-00001, kind: pending, severity: warning}
          - at: 4m                    # their exact deadline), and nothing else
            alerts:                   # every alert pending/firing/acknowledged at 4m
              - {rule: ph_range, device: esp32-00001, severity: warning, state: firing}
          - at: 20m
            rule: ph_range            # optional: compare only this rule's alerts/events
            alerts: []

Compact values, separated by spaces, one slot per ``interval`` starting at 0: ``6.5`` a
value; ``7.1x3`` three times 7.1; ``6.0+0.1x4`` four values 6.0 6.1 6.2 6.3 (unlike
promtool's ``a+bxn``, which gives n+1); ``_`` no reading in this slot, ``_x5`` five empty
slots; ``true``/``false`` boolean fields. The fields of one series at one time form one
reading. An expected item lists only the keys it cares about (``rule device field site
measurement severity state kind notify flapping value threshold reason acknowledged_by``,
``labels``/``annotations``: the given keys must equal); lists are complete: an alert or
event not expected at that time is a failure. Time 0 is 2024-01-01T00:00:00Z, when the
engine starts (deadman grace counts from there).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ingestd.model import FieldValue, Reading
from ingestd.rules.engine import Engine
from ingestd.rules.loader import (
    RULE_FILE_SUFFIXES,
    RulesError,
    format_validation_errors,
    load_rule_files,
    rule_files,
)
from ingestd.rules.model import Alert, AlertEvent, RuleSet
from ingestd.rules.schema import Duration, Spec, parse_duration
from ingestd.rules.yamlmarks import Loc, MarkedDocument, read_marked_yaml

__all__ = ["TestReport", "TestResult", "run_rule_tests", "test_command"]

EPOCH = 1_704_067_200.0  # 2024-01-01T00:00:00Z: offset 0 of every test
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(
    rf"^(?:(?P<gap>_)|(?P<bool>true|false)|(?P<start>{_NUMBER})(?P<step>[-+](?:\d+\.?\d*|\.\d+)"
    rf"(?:[eE][-+]?\d+)?)?)(?:x(?P<times>\d+))?$"
)
_ALERT_KEYS = frozenset(
    {"rule", "device", "field", "site", "measurement", "severity", "state", "flapping"}
    | {"value", "threshold", "acknowledged_by", "labels", "annotations"}
)


# --- the file format ----------------------------------------------------------------------


class ExpectedSpec(Spec):
    rule: str | None = None
    device: str | None = None
    field: str | None = None
    site: str | None = None
    measurement: str | None = None
    severity: str | None = None
    state: str | None = None
    kind: str | None = None
    notify: bool | None = None
    flapping: bool | None = None
    value: float | None = None
    threshold: float | None = None
    reason: str | None = None
    acknowledged_by: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class CheckSpec(Spec):
    at: Duration
    rule: str | None = None
    alerts: list[ExpectedSpec] | None = None
    events: list[ExpectedSpec] | None = None


class AckSpec(Spec):
    at: Duration
    rule: str
    device: str
    field: str | None = None
    by: str = "rule-test"


class SeriesSpec(Spec):
    device: str
    measurement: str
    site: str | None = None
    tags: dict[str, str] = {}
    fields: dict[str, Any] = Field(min_length=1)


class TestSpec(Spec):
    name: str
    interval: Duration = 60.0
    input: list[SeriesSpec] = []
    acknowledge: list[AckSpec] = []
    expect: list[CheckSpec] = []


class TestFileSpec(Spec):
    rule_files: list[str] = Field(min_length=1)
    tests: list[TestSpec] = Field(min_length=1)


# --- results ------------------------------------------------------------------------------


@dataclass
class TestResult:
    """One test: where it is written and what went wrong (nothing when it passed)."""

    __test__ = False  # not a pytest test class

    file: Path
    name: str
    where: str
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class TestReport:
    """Every test of every file, and the files that could not be run at all."""

    __test__ = False

    results: list[TestResult] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    """Test files or rule files that are invalid: ``file:line:col: key: reason``."""

    @property
    def passed(self) -> bool:
        return not self.errors and all(r.passed for r in self.results)

    @property
    def failed(self) -> list[TestResult]:
        return [r for r in self.results if not r.passed]

    def render(self) -> str:
        lines = [f"error: {e}" for e in self.errors]
        for result in self.results:
            if result.passed:
                lines.append(f"PASS {result.where}: {result.name}")
            else:
                lines.append(f"FAIL {result.where}: {result.name}")
                lines.extend(f"  {line}" for f in result.failures for line in f.splitlines())
        total, failed = len(self.results), len(self.failed)
        summary = f"{total - failed} of {total} rule tests passed"
        if self.errors:
            summary += f"; {len(self.errors)} invalid file problem(s)"
        lines.append(summary)
        return "\n".join(lines)


def test_command(files: Sequence[Path]) -> tuple[int, str]:
    """``ingestd rules test FILE...``: exit code (0 all passed, 1 a test failed, 2 a file
    is invalid) and the text to print."""
    if not files:
        return 2, "ingestd rules test: no test file given"
    report = TestReport()
    for path in files:
        sub = run_rule_tests(path)
        report.results.extend(sub.results)
        report.errors.extend(sub.errors)
    code = 2 if report.errors else 1 if report.failed else 0
    return code, report.render()


test_command.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def run_rule_tests(path: Path) -> TestReport:
    """Run the tests of one test file, or of every ``*.yaml`` test file in a directory."""
    report = TestReport()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in RULE_FILE_SUFFIXES)
    elif path.exists():
        files = [path]
    else:
        report.errors.append(f"{path}: no such file or directory")
        return report
    for file in files:
        _run_file(file, report)
    return report


# --- running ------------------------------------------------------------------------------


@dataclass
class _Point:
    offset: float
    order: int
    reading: Reading


def _run_file(path: Path, report: TestReport) -> None:
    document = read_marked_yaml(path)
    problems = [f"{path}:{m.line}:{m.column}: {reason}" for m, reason in document.problems]
    if problems:
        report.errors.extend(problems)
        return
    try:
        spec = TestFileSpec.model_validate(document.data if document.data is not None else {})
    except ValidationError as exc:
        for where, reason, key in format_validation_errors(exc, TestFileSpec):
            report.errors.append(f"{document.where(where, key=key)}: {_dotted(where)}: {reason}")
        return
    paths: list[Path] = []
    for index, name in enumerate(spec.rule_files):
        target = (path.parent / name).resolve() if not Path(name).is_absolute() else Path(name)
        try:
            paths.extend(rule_files(target))
        except RulesError:
            report.errors.append(
                f"{document.where(('rule_files', index))}: rule_files.{index}: "
                f"{target}: no such file or directory"
            )
    if report.errors:
        return
    try:
        ruleset = load_rule_files(paths)
    except RulesError as exc:
        report.errors.extend(exc.problems)
        return
    for index, test in enumerate(spec.tests):
        loc: Loc = ("tests", index)
        result = TestResult(path, test.name, document.where(loc))
        errors = _check_test(test, ruleset, document, loc)
        if errors:
            report.errors.extend(errors)
            continue
        _run_test(test, ruleset, document, loc, result)
        report.results.append(result)


def _dotted(loc: Loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _check_test(test: TestSpec, ruleset: RuleSet, document: MarkedDocument, loc: Loc) -> list[str]:
    names = set(ruleset.by_name())
    errors = []

    def problem(sub: Loc, reason: str) -> None:
        full = (*loc, *sub)
        errors.append(f"{document.where(full)}: {_dotted(full)}: {reason}")

    if test.interval <= 0:
        problem(("interval",), "must be more than 0")
    for index, check in enumerate(test.expect):
        if check.alerts is None and check.events is None:
            problem(("expect", index), "a check needs alerts: [...] or events: [...] (or both)")
        if check.rule is not None and check.rule not in names:
            problem(("expect", index, "rule"), f"no rule named {check.rule!r} in rule_files")
        for kind, items in (("alerts", check.alerts), ("events", check.events)):
            for item_index, item in enumerate(items or []):
                given = item.model_dump(exclude_none=True)
                if item.rule is not None and item.rule not in names:
                    problem(
                        ("expect", index, kind, item_index, "rule"),
                        f"no rule named {item.rule!r} in rule_files",
                    )
                if kind == "alerts":
                    for key in sorted(set(given) - _ALERT_KEYS):
                        problem(
                            ("expect", index, kind, item_index, key),
                            f"{key} is a property of events, not of alerts",
                        )
    for index, ack in enumerate(test.acknowledge):
        if ack.rule not in names:
            problem(("acknowledge", index, "rule"), f"no rule named {ack.rule!r} in rule_files")
    for index, series in enumerate(test.input):
        for name, raw in series.fields.items():
            try:
                _values(raw, test.interval)
            except ValueError as exc:
                problem(("input", index, "fields", name), str(exc))
    return errors


def _values(raw: Any, interval: float) -> list[tuple[float, FieldValue]]:
    """(offset, value) points of one field: compact text or explicit [offset, value] pairs."""
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        points: list[tuple[float, FieldValue]] = []
        slot = 0
        for token in str(raw).split():
            match = _TOKEN.match(token)
            if match is None:
                raise ValueError(
                    f"{token!r} is not a value: expected a number, NxK (K times), A+BxK "
                    "(K values from A by B), _ (no reading), _xK, true or false"
                )
            times = int(match["times"]) if match["times"] else 1
            if times < 1:
                raise ValueError(f"{token!r}: a count must be at least 1")
            for i in range(times):
                if match["gap"] is None:
                    value: FieldValue
                    if match["bool"] is not None:
                        value = match["bool"] == "true"
                    else:
                        value = float(match["start"]) + i * float(match["step"] or 0.0)
                    points.append((slot * interval, value))
                slot += 1
        return points
    if isinstance(raw, list):
        points = []
        for item in raw:
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError("explicit points are [offset, value] pairs, e.g. [90s, 7.1]")
            offset = parse_duration(item[0])
            value = item[1]
            if isinstance(value, bool):
                points.append((offset, value))
            elif isinstance(value, int | float) and math.isfinite(value):
                points.append((offset, float(value)))
            else:
                raise ValueError(f"{value!r} is not a number or a boolean")
        return points
    raise ValueError('expected compact values ("6.0 6.5x3 _ 7.1") or [[offset, value], ...]')


def _readings(test: TestSpec) -> list[_Point]:
    points: list[_Point] = []
    order = 0
    for series in test.input:
        tags = dict(series.tags)
        if series.site is not None:
            tags["site"] = series.site
        by_time: dict[float, dict[str, FieldValue]] = {}
        for name, raw in series.fields.items():
            for offset, value in _values(raw, test.interval):
                by_time.setdefault(offset, {})[name] = value
        for offset, fields in sorted(by_time.items()):
            time_ns = round((EPOCH + offset) * 1e9)
            reading = Reading(series.measurement, series.device, dict(tags), fields, time_ns)
            points.append(_Point(offset, order, reading))
            order += 1
    points.sort(key=lambda p: (p.offset, p.order))
    return points


def _run_test(
    test: TestSpec, ruleset: RuleSet, document: MarkedDocument, loc: Loc, result: TestResult
) -> None:
    """Run the whole input first, noting the active alerts at each check, then judge every
    check against the complete event list (so a failure can show what came a bit later)."""
    clock = [EPOCH]
    engine = Engine(ruleset, lambda: clock[0])
    events: list[AlertEvent] = []
    readings = _readings(test)
    acks = sorted(enumerate(test.acknowledge), key=lambda a: a[1].at)
    checks = sorted(enumerate(test.expect), key=lambda c: c[1].at)
    times = sorted(
        {p.offset for p in readings} | {a.at for _, a in acks} | {c.at for _, c in checks}
    )
    if times:
        times.append(times[-1] + 2 * test.interval)  # context for the last check
    active: dict[int, list[Alert]] = {}
    r_i = a_i = c_i = 0
    for offset in times:
        _advance(engine, clock, EPOCH + offset, events)
        while r_i < len(readings) and readings[r_i].offset <= offset:
            events.extend(engine.evaluate(readings[r_i].reading))
            r_i += 1
        while a_i < len(acks) and acks[a_i][1].at <= offset:
            index, ack = acks[a_i]
            a_i += 1
            _acknowledge(engine, ack, events, result, document.where((*loc, "acknowledge", index)))
        while c_i < len(checks) and checks[c_i][1].at <= offset:
            active[checks[c_i][0]] = engine.active()
            c_i += 1
    for index, check in checks:
        where = document.where((*loc, "expect", index))
        _check(check, active[index], events, interval=test.interval, where=where, result=result)


def _advance(engine: Engine, clock: list[float], target: float, events: list[AlertEvent]) -> None:
    """Run every timer up to ``target``, each at its own deadline."""
    for _ in range(1_000_000):
        deadline = engine.next_deadline()
        if deadline is None or deadline > target:
            break
        clock[0] = max(clock[0], deadline)
        events.extend(engine.tick())
        if deadline == target or engine.next_deadline() == deadline:
            break
    clock[0] = target
    events.extend(engine.tick())


def _acknowledge(
    engine: Engine, ack: AckSpec, events: list[AlertEvent], result: TestResult, where: str
) -> None:
    for alert in engine.firing():
        if (alert.rule, alert.device) == (ack.rule, ack.device) and ack.field in (
            None,
            alert.field,
        ):
            event = engine.acknowledge(alert.id, ack.by)
            if event is not None:
                events.append(event)
                return
    result.failures.append(
        f"{where}: at {_offset(ack.at)}: nothing to acknowledge: no firing alert of "
        f"{ack.rule} on {ack.device}"
    )


def _offset(seconds: float) -> str:
    """``1h2m3s`` for an offset in seconds."""
    if seconds == 0:
        return "0s"
    parts = []
    rest = seconds
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            count = int(rest // size)
            parts.append(f"{count}{unit}")
            rest -= count * size
    if rest > 1e-9:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def _check(
    check: CheckSpec,
    active: list[Alert],
    events: list[AlertEvent],
    *,
    interval: float,
    where: str,
    result: TestResult,
) -> None:
    at = check.at
    if check.alerts is not None:
        actual = [a.to_dict() for a in active if check.rule in (None, a.rule)]
        problem = _compare(check.alerts, actual)
        if problem:
            result.failures.append(f"{where}: at {_offset(at)}: the active alerts differ{problem}")
    if check.events is not None:
        emitted = [e for e in events if abs(e.at - EPOCH - at) < 1e-6]
        actual = [e.to_dict() for e in emitted if check.rule in (None, e.rule)]
        problem = _compare(check.events, actual)
        if problem:
            nearby = [
                e
                for e in events
                if abs(e.at - EPOCH - at) <= 2 * interval
                and abs(e.at - EPOCH - at) >= 1e-6
                and check.rule in (None, e.rule)
            ]
            if nearby:
                problem += "\n    events at nearby times: " + "; ".join(
                    f"{_offset(e.at - EPOCH)} {_describe(e.to_dict(), actual=True)}" for e in nearby
                )
            result.failures.append(f"{where}: at {_offset(at)}: the events differ{problem}")


def _matches(expected: dict[str, Any], actual: dict[str, Any]) -> bool:
    for key, want in expected.items():
        got = actual.get(key)
        if key in ("labels", "annotations"):
            if any((got or {}).get(k) != v for k, v in want.items()):
                return False
        elif key in ("value", "threshold"):
            if got is None or not math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9):
                return False
        elif got != want:
            return False
    return True


def _compare(expected: Sequence[ExpectedSpec], actual: list[dict[str, Any]]) -> str:
    wanted = [e.model_dump(exclude_none=True) for e in expected]
    # The most specific expectations pick first, so a vague one cannot steal their match.
    order = sorted(range(len(wanted)), key=lambda i: -len(wanted[i]))
    unmatched = list(range(len(actual)))
    missing = []
    for i in order:
        found = next((j for j in unmatched if _matches(wanted[i], actual[j])), None)
        if found is None:
            missing.append(wanted[i])
        else:
            unmatched.remove(found)
    if not missing and not unmatched:
        return ""
    lines = []
    for item in missing:
        lines.append("expected, not found: " + _describe(item))
    mentioned = {key for item in wanted for key in item}
    for j in unmatched:
        lines.append("found, not expected: " + _describe(actual[j], actual=True, also=mentioned))
    if not actual:
        lines.append("found: nothing")
    return "".join(f"\n    {line}" for line in lines)


def _describe(
    item: dict[str, Any], *, actual: bool = False, also: set[str] | frozenset[str] = frozenset()
) -> str:
    """An expectation as written, or what happened, as ``key=value`` pairs (with the keys
    the expectations mention, such as annotations, so a difference shows)."""
    if not actual:
        return " ".join(f"{key}={_show(value)}" for key, value in item.items())
    shown = []
    for key in (*_SHOWN, *sorted(also - set(_SHOWN))):
        value = item.get(key)
        if value is None or (key == "flapping" and not value) or (key == "notify" and value):
            continue
        shown.append(f"{key}={_show(value)}")
    return " ".join(shown)


_SHOWN = (
    "rule",
    "device",
    "field",
    "severity",
    "state",
    "kind",
    "value",
    "threshold",
    "flapping",
    "notify",
    "reason",
    "acknowledged_by",
)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
