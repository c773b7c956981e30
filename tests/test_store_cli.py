"""Operator mistakes on the store's commands (``alerts history``, ``devices``, ``latest``,
``retention``) end in one line naming the option, the bad value and what is accepted, with
exit 2, never a traceback. These are refused before any server is asked, so none runs here
(tests/test_store_e2e.py runs the commands against PostgreSQL)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from ingestd import retention
from ingestd.cli import main
from ingestd.config import load_settings, parse_duration
from ingestd.errors import ConfigError


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["alerts", "history", "--since", "bogus"],
            "argument --since: 'bogus': expected a duration such as 500ms, 30s",
        ),
        (["alerts", "history", "--since", "9" * 400], "argument --since: '999"),
        (
            ["alerts", "history", "--limit", "-5"],
            "argument --limit: '-5': expected a whole number, 1 or more",
        ),
        (["alerts", "history", "--limit", "0"], "argument --limit: '0': expected a whole"),
        (
            ["devices", "add", "x", "--quota-rate", "-1"],
            "argument --quota-rate: '-1': expected messages per second, a number above 0",
        ),
        (["devices", "add", "x", "--quota-rate", "0"], "argument --quota-rate: '0': expected"),
        (["devices", "add", "x", "--quota-rate", "nan"], "argument --quota-rate: 'nan': expect"),
        (["devices", "add", "x", "--quota-rate", "inf"], "argument --quota-rate: 'inf': expect"),
        (
            ["devices", "add", "x", "--quota-rate", "1", "--quota-burst", "0"],
            "argument --quota-burst: '0': expected a whole number of messages from 1 to",
        ),
        (
            ["devices", "add", "x", "--quota-rate", "1", "--quota-burst", "3000000000"],
            "argument --quota-burst: '3000000000': expected a whole number of messages from 1",
        ),
        (
            ["devices", "add", "gh1/x"],
            "argument device: 'gh1/x': a device id is one MQTT topic level",
        ),
        (["devices", "add", ""], "argument device: '': a device id is one MQTT topic level"),
        (["devices", "add", "x", "--site", ""], "argument --site: '': a site id is one MQTT"),
        (
            ["devices", "calibrate", "x", "ph", "--scale", "0"],
            "argument --scale: '0': expected a number other than 0",
        ),
        (
            ["devices", "calibrate", "x", "ph", "--scale", "nan"],
            "argument --scale: 'nan': expected a number other than 0",
        ),
        (
            ["devices", "calibrate", "x", "ph", "--offset", "inf"],
            "argument --offset: 'inf': expected a number such as",
        ),
        (
            ["devices", "calibrate", "x", "ph", "--offset", "1", "--from", "2026-13-01"],
            "argument --from: '2026-13-01': expected an ISO 8601 time from 1970 to 2261",
        ),
        (
            ["devices", "calibrate", "x", "ph", "--offset", "1", "--from", "0001-01-01"],
            "argument --from: '0001-01-01': expected an ISO 8601 time from 1970 to 2261",
        ),
        (["latest", ""], "argument device: '': a device id is one MQTT topic level"),
    ],
)
def test_a_bad_value_is_refused_with_what_is_accepted(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert says in err.splitlines()[-1], err


def _config(tmp: Path, **sections: object) -> Path:
    path = tmp / "ingestd.yaml"
    path.write_text(yaml.safe_dump({"spool": {"dir": str(tmp)}, **sections}))
    return path


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["devices", "add", "x", "--quota-burst", "5"],
            "ingestd: --quota-burst 5 needs --quota-rate: a burst alone limits nothing",
        ),
        (
            ["devices", "calibrate", "x", "--offset", "1", "--from", "2026-01-01"],
            "ingestd: --offset --from without a field: name it, e.g. ingestd devices calibrate"
            " x ph --offset ... (no field lists the calibrations)",
        ),
    ],
)
def test_options_that_need_another_are_refused_before_connecting(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No PostgreSQL at this address: the refusal must come first.
    config = _config(tmp_path, postgres={"url": "postgresql://nobody@127.0.0.1:9/none"})
    assert main([*argv, "--config", str(config)]) == 2
    assert capsys.readouterr().err == says + "\n"


def test_retention_ages_past_a_century_are_refused_by_the_config(tmp_path: Path) -> None:
    for key, age in (("alert_history", "100000000d"), ("deadletters", "36501d"), ("tsdb", 9e12)):
        with pytest.raises(ConfigError) as info:
            load_settings(_config(tmp_path, retention={key: age}))
        assert f"retention.{key} = " in str(info.value)
        assert "at most 36500d (100 years); 0 keeps it forever" in str(info.value)
    for huge in (10**400, "9" * 400):  # beyond a float: a bad duration, not an OverflowError
        with pytest.raises(ValueError, match="expected a duration"):
            parse_duration(huge)
        with pytest.raises(ConfigError, match=r"retention\.deadletters = "):
            load_settings(_config(tmp_path, retention={"deadletters": huge}))


def test_the_longest_retention_age_counts_back_to_a_date(tmp_path: Path) -> None:
    settings = load_settings(_config(tmp_path, retention={"deadletters": "36500d"}))
    (tmp_path / "deadletters.sqlite").touch()  # so the dead letters' cutoff is computed
    out = io.StringIO()
    now = datetime(2026, 11, 29, tzinfo=UTC)
    assert retention.apply(settings, out, out, dry_run=True, now=now) == 0
    assert (
        "dead letters: would delete 0 dead letters, received before 1926-12-24T00:00:00+00:00"
        " (retention.deadletters = 36500d); dry run"
    ) in out.getvalue()
