"""YAML rule tests: the shipped ones pass, failures say exactly what differed and where."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from ingestd.rules import load_rules, run_rule_tests
from ingestd.rules import testing as rule_testing

REPO = Path(__file__).resolve().parent.parent
SHIPPED_TESTS = REPO / "rules" / "tests"

RULES = """
rules:
  - name: ph_high
    select: {measurement: reservoir, field: ph}
    above: 7.0
    for: 2m
    annotations:
      summary: "pH {{ value }} on {{ device }}"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@pytest.mark.parametrize("path", sorted(SHIPPED_TESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_rule_tests_pass(path: Path) -> None:
    report = run_rule_tests(path)
    assert report.passed, report.render()
    assert report.results


def test_every_shipped_rule_is_tested_firing() -> None:
    fired: set[str] = set()
    for path in SHIPPED_TESTS.glob("*.yaml"):
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in test.get("expect", []):
                for item in (check.get("events") or []) + (check.get("alerts") or []):
                    if "firing" in (item.get("kind"), item.get("state")):
                        fired.add(item.get("rule") or check.get("rule"))
    untested = {rule.name for rule in load_rules(REPO / "rules")} - fired
    assert not untested, f"no shipped rule test expects these rules to fire: {untested}"


def test_failures_say_what_was_expected_and_what_happened(tmp_path: Path) -> None:
    write(tmp_path / "ph.yaml", RULES)
    tests = write(
        tmp_path / "ph_test.yaml",
        """
        rule_files: [ph.yaml]
        tests:
          - name: wrong on purpose
            input:
              - {device: d1, site: gh1, measurement: reservoir, fields: {ph: "6.5 7.2x5"}}
            expect:
              - at: 2m
                events: [{rule: ph_high, kind: firing}]
              - at: 4m
                alerts:
                  - {rule: ph_high, device: d1, state: firing, annotations: {summary: "pH 7 on d1"}}
        """,
    )
    report = run_rule_tests(tests)
    assert not report.passed
    [result] = report.results
    assert result.where == f"{tests}:3:5"
    first, second = result.failures
    assert first.splitlines() == [
        f"{tests}:7:9: at 2m: the events differ",
        "    expected, not found: rule=ph_high kind=firing",
        "    found: nothing",
        "    events at nearby times: 1m rule=ph_high device=d1 field=ph severity=warning "
        "state=pending kind=pending value=7.2 threshold=7 notify=false; "
        "3m rule=ph_high device=d1 field=ph severity=warning state=firing kind=firing "
        "value=7.2 threshold=7",
    ]
    assert first == first.rstrip()
    assert second.splitlines()[0] == f"{tests}:9:9: at 4m: the active alerts differ"
    assert "expected, not found: rule=ph_high device=d1 state=firing annotations=" in second
    assert "'summary': 'pH 7.2 on d1'" in second
    text = report.render()
    assert text.startswith(f"FAIL {tests}:3:5: wrong on purpose")
    assert text.endswith("0 of 1 rule tests passed")


def test_compact_values_and_explicit_points(tmp_path: Path) -> None:
    assert rule_testing._values("6.0 7.1x3 _ _x2 6.0+0.5x3 true", 60) == [
        (0, 6.0),
        (60, 7.1),
        (120, 7.1),
        (180, 7.1),
        (420, 6.0),
        (480, 6.5),
        (540, 7.0),
        (600, True),
    ]
    assert rule_testing._values("-1.5 1e3 10-2x2", 10) == [
        (0, -1.5),
        (10, 1000.0),
        (20, 10.0),
        (30, 8.0),
    ]
    assert rule_testing._values([["0s", 6], ["1m30s", 7.5]], 60) == [(0, 6.0), (90, 7.5)]
    for bad in ("6.0 seven", "7x0", "[1]"):
        with pytest.raises(ValueError):
            rule_testing._values(bad, 60)


def test_invalid_test_files_are_reported_at_file_line_column(tmp_path: Path) -> None:
    write(tmp_path / "ph.yaml", RULES)
    tests = write(
        tmp_path / "bad_test.yaml",
        """
        rule_files: [ph.yaml, missing.yaml]
        tests:
          - name: t
            input:
              - {device: d1, measurement: reservoir, fields: {ph: "6.5 seven"}}
            expect:
              - {at: 1m, alerts: []}
        """,
    )
    report = run_rule_tests(tests)
    assert report.errors == [
        f"{tests}:1:23: rule_files.1: {tmp_path / 'missing.yaml'}: no such file or directory"
    ]
    write(tmp_path / "bad_test.yaml", tests.read_text().replace(", missing.yaml", ""))
    report = run_rule_tests(tests)
    [error] = report.errors
    assert error.startswith(f"{tests}:5:59: tests.0.input.0.fields.ph: 'seven' is not a value")
    write(
        tmp_path / "bad_test.yaml",
        """
        rule_files: [ph.yaml]
        tests:
          - name: t
            expect:
              - {at: 1m, alerts: [{rule: ph_hihg, kind: firing}], evnts: []}
        """,
    )
    [error] = run_rule_tests(tests).errors
    assert error.startswith(f"{tests}:5:59: tests.0.expect.0.evnts: unknown key 'evnts'")
    assert "did you mean 'events'?" in error


def test_test_command_exit_codes(tmp_path: Path) -> None:
    write(tmp_path / "ph.yaml", RULES)
    good = write(
        tmp_path / "good.yaml",
        """
        rule_files: [ph.yaml]
        tests:
          - name: fires after two minutes
            input:
              - {device: d1, measurement: reservoir, fields: {ph: "7.2x4"}}
            acknowledge:
              - {at: 3m, rule: ph_high, device: d1, by: ops}
            expect:
              - at: 2m
                events: [{rule: ph_high, kind: firing, annotations: {summary: "pH 7.2 on d1"}}]
              - at: 3m
                alerts: [{rule: ph_high, state: acknowledged, acknowledged_by: ops}]
        """,
    )
    assert rule_testing.test_command([good]) == (
        0,
        f"PASS {good}:3:5: fires after two minutes\n1 of 1 rule tests passed",
    )
    failing = write(tmp_path / "failing.yaml", good.read_text().replace("at: 2m", "at: 1m"))
    assert rule_testing.test_command([failing])[0] == 1
    invalid = write(tmp_path / "invalid.yaml", "rule_files: []\ntests: []\n")
    code, text = rule_testing.test_command([invalid])
    assert code == 2
    assert f"error: {invalid}:1:13: rule_files: List should have at least 1 item" in text
    assert rule_testing.test_command([])[0] == 2


def test_the_examples_in_the_rules_readme_work(tmp_path: Path) -> None:
    readme = (REPO / "rules" / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    [rule_file] = [b for b in blocks if b.startswith("rules:")]
    load_rules(write(tmp_path / "example.yaml", rule_file))
    [test_file] = [b for b in blocks if b.startswith("rule_files:")]
    shipped = REPO / "rules" / "reservoir.yaml"
    test = write(
        tmp_path / "example_test.yaml", test_file.replace("../reservoir.yaml", str(shipped))
    )
    report = run_rule_tests(test)
    assert report.passed, report.render()
