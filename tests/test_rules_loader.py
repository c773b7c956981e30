"""Rule files: the shipped examples load, and every mistake is reported at file:line:column."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ingestd.errors import ConfigError
from ingestd.rules import RulesError, check_command, load_rules
from ingestd.rules.glob import Glob, GlobError
from ingestd.rules.schema import parse_duration

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "rules"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load_rules(path)
    assert isinstance(caught.value, ConfigError)
    return caught.value.problems


def test_shipped_rules_load_and_check_passes() -> None:
    ruleset = load_rules(SHIPPED)
    names = {rule.name for rule in ruleset}
    assert {
        "ph_out_of_range",
        "ec_out_of_range",
        "water_temperature_high",
        "reservoir_level_low",
        "reservoir_draining_fast",
        "air_humidity",
        "co2_high",
        "sensor_silent",
    } <= names
    assert all(p.parent == SHIPPED for p in ruleset.files)  # rules/tests/ is not rules
    code, text = check_command([SHIPPED])
    assert code == 0, text
    assert f"{len(ruleset)} rules in 3 files: valid" in text


def test_unknown_key_is_reported_at_the_key_with_a_suggestion(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            repeat_intervall: 1h
        """,
    )
    [problem] = problems(path)
    assert problem.startswith(f"{path}:5:5: rules.0.repeat_intervall: unknown key ")
    assert "did you mean 'repeat_interval'?" in problem


def test_nested_unknown_key_lists_the_keys_accepted_there(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: ph_high
            select:
              measurement: reservoir
              feild: ph
            above: 7.0
        """,
    )
    found = problems(path)
    assert found[0].startswith(f"{path}:5:7: rules.0.select.feild: unknown key 'feild'")
    assert "did you mean 'field'?" in found[0]
    assert "accepted: measurement, field, device, site, tags" in found[0]


def test_wrong_type_is_reported_at_the_value(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: high
            for: soon
        """,
    )
    assert problems(path) == [
        f"{path}:4:12: rules.0.above: Input should be a valid number, unable to parse "
        "string as a number (got 'high')",
        f"{path}:5:10: rules.0.for: expected a duration such as 500ms, 30s, 5m, 1h30m or 2d "
        "(a bare number is seconds) (got 'soon')",
    ]


def test_bad_template_is_a_validation_error_at_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            annotations:
              summary: "pH {{ value }} on {{ devise }}"
              description: "{% if value %}unclosed"
        """,
    )
    found = problems(path)
    assert found[0].startswith(
        f"{path}:6:16: rules.0.annotations.summary: template error with sample values: "
        "'devise' is undefined"
    )
    assert found[1].startswith(f"{path}:7:20: rules.0.annotations.description: template error:")
    assert "endif" in found[1]


def test_sandbox_refuses_unsafe_templates(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            annotations:
              summary: "{{ value.__class__.__mro__ }}"
        """,
    )
    [problem] = problems(path)
    assert f"{path}:6:16: rules.0.annotations.summary: template error" in problem


def test_bad_globs_and_type_errors_in_one_report(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: "ph[", device: "esp32-{a,b"}
            above: [7]
        """,
    )
    found = problems(path)
    assert [p.split(": ")[0:2] for p in found] == [
        [f"{path}:3:45", "rules.0.select.field"],
        [f"{path}:3:60", "rules.0.select.device"],
        [f"{path}:4:12", "rules.0.above"],
    ]
    assert "bad glob 'ph[': unterminated '['" in found[0]


def test_duplicate_rule_names_across_files(tmp_path: Path) -> None:
    rule = """
    rules:
      - name: ph_high
        select: {measurement: reservoir, field: ph}
        above: 7.0
    """
    first = write(tmp_path / "a.yaml", rule)
    second = write(tmp_path / "b.yaml", "# second copy\n" + textwrap.dedent(rule).lstrip("\n"))
    assert problems(tmp_path) == [
        f"{second}:3:11: rules.0.name: duplicate rule name 'ph_high' "
        f"(first defined at {first}:2:11)"
    ]


def test_yaml_syntax_errors_and_duplicate_keys(tmp_path: Path) -> None:
    broken = write(tmp_path / "a.yaml", "rules:\n  - name: x\n    select: {field: ph\n")
    dupes = write(
        tmp_path / "b.yaml",
        """
        rules:
          - name: ph_high
            select: {measurement: reservoir, field: ph}
            above: 7.0
            above: 7.5
        """,
    )
    found = problems(tmp_path)
    assert found[0].startswith(f"{broken}:4:1: not valid YAML")
    assert found[1] == f"{dupes}:5:5: rules.0.above: duplicate key (first at line 4)"


@pytest.mark.parametrize(
    ("snippet", "where", "reason"),
    [
        ("above: 7.0\n    clear: {above: 6.8}", "5:13: rules.0.clear.above", "clears below"),
        ("above: 7.0\n    clear: {below: 7.2}", "5:20: rules.0.clear.below", "at most"),
        ("outside: [7, 5]", "4:14: rules.0.outside", "low < high"),
        (
            "outside: [5, 7]\n    clear: {inside: [4, 6]}",
            "5:21: rules.0.clear.inside",
            "within [5, 7]",
        ),
        ("above: 7\n    below: 5", "2:5: rules.0", "exactly one of"),  # the rule mapping
        ("rate: {above: 1}", "4:11: rules.0.rate.window", "missing required key 'window'"),
        ("rate: {window: 5m}", "4:11: rules.0.rate", "exactly one of above, below"),
        ("above: 7\n    severity: Bad", "5:15: rules.0.severity", "not a severity"),
        ("above: 7\n    severity: ack", "5:15: rules.0.severity", "reserved"),
        ("above: 7\n    grace: 5m", "5:12: rules.0.grace", "only deadman"),
        ("deadman: 5m\n    for: 1m", "5:10: rules.0.for", "no for"),
        ("levels: []", "4:13: rules.0.levels", "at least one level"),
        ("above: 7\n    labels: {1bad: x}", "5:14: rules.0.labels.1bad", "not a label name"),
        ("above: 7\n    repeat_interval: 0s", "5:22: rules.0.repeat_interval", "more than 0"),
    ],
)
def test_inconsistent_conditions(tmp_path: Path, snippet: str, where: str, reason: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "rules:\n  - name: r\n    select: {measurement: reservoir, field: ph}\n    "
        + snippet
        + "\n",
        encoding="utf-8",
    )
    [problem] = [p for p in problems(path) if reason in p]
    assert problem.startswith(f"{path}:{where}: "), problem


def test_condition_rule_must_name_its_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        rules:
          - name: anything_high
            select: {measurement: reservoir}
            above: 7
        """,
    )
    [problem] = problems(path)
    assert problem.startswith(f"{path}:3:13: rules.0.select: a condition rule must name")


def test_missing_path_and_check_command_exit_codes(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope") == [f"{tmp_path / 'nope'}: no such file or directory"]
    bad = write(tmp_path / "bad.yaml", "rules:\n  - name: x\n")
    code, text = check_command([bad])
    assert code == 2
    assert f"{bad}:2:5: rules.0.select: missing required key 'select'" in text
    assert check_command([])[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_command([empty]) == (0, f"{empty}: 0 rules in 0 files: valid")


def test_identity_ignores_tuning_but_not_what_is_watched(tmp_path: Path) -> None:
    base = """
    rules:
      - name: ph_high
        select: {measurement: reservoir, field: ph}
        above: 7.0
        for: 1m
        labels: {team: a}
    """

    def identity(text: str, name: str) -> str:
        [rule] = load_rules(write(tmp_path / name, text)).rules
        return rule.identity

    same = identity(base, "a.yaml")
    assert identity(base.replace("7.0", "7.5").replace("1m", "5m"), "b.yaml") == same
    assert identity(base.replace("team: a", "team: b"), "c.yaml") == same
    assert identity(base.replace("field: ph", "field: ec"), "d.yaml") != same
    assert identity(base.replace("above: 7.0", "below: 7.0"), "e.yaml") != same


def test_globs_and_durations() -> None:
    assert Glob("esp32-*").match("esp32-7") and not Glob("esp32-*").match("rpi-1")
    assert Glob("{ph,ec}").match("ec") and not Glob("{ph,ec}").match("e")
    assert Glob("!lab-*").match("") and not Glob("!lab-*").match("lab-2")
    assert Glob("gh[12]").match("gh2") and Glob("gh[!12]").match("gh3")
    assert Glob("a\\*b").literal == "a*b"
    assert Glob("reservoir").literal == "reservoir" and Glob("*").matches_everything
    for bad in ("", "[ab", "{a,b", "a}", "{a{b}}", "x\\", "[]"):
        with pytest.raises(GlobError):
            Glob(bad)
    assert parse_duration("1h30m") == 5400 and parse_duration("500ms") == 0.5
    assert parse_duration(90) == 90 and parse_duration("2d") == 172800
    bad_durations: tuple[object, ...] = ("5 minutes", "m", True, "1h 30m", "-5s")
    for wrong in bad_durations:
        with pytest.raises(ValueError, match="duration"):
            parse_duration(wrong)
