"""Settings: file + secret files + environment, precedence, and errors that point at the cause."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingestd.cli import main
from ingestd.config import load_settings, mask_url, render_settings
from ingestd.errors import ConfigError
from ingestd.logs import get_logger

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "ingestd.yaml"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_example_loads_and_check_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(EXAMPLE)
    assert settings.influx.api == "v2"
    assert settings.http.listen == "127.0.0.1:9108"
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    assert "configuration is valid" in capsys.readouterr().err


def test_environment_beats_secret_file_beats_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path / "ingestd.yaml",
        "influx:\n  token: from-file\n  org: file-org\n  bucket: file-bucket\n"
        "mqtt:\n  url: mqtt://127.0.0.1:1883\n",
    )
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    write(secrets / "influx__token", "from-secret\n")
    write(secrets / "influx__org", "secret-org")

    settings = load_settings(config, secrets)
    assert settings.influx.token is not None
    assert settings.influx.token.get_secret_value() == "from-secret"  # trailing newline stripped
    assert settings.influx.org == "secret-org"
    assert settings.influx.bucket == "file-bucket"

    monkeypatch.setenv("INGESTD_INFLUX__TOKEN", "from-env")
    monkeypatch.setenv("INGESTD_MQTT__URL", "mqtts://user:pw@broker.farm:8883")
    monkeypatch.setenv("INGESTD_HTTP__LISTEN", "0.0.0.0:9200")
    monkeypatch.setenv("INGESTD_HTTP__TOKEN_SHA256", "ab" * 32)  # required off loopback
    settings = load_settings(config, secrets)
    assert settings.influx.token is not None
    assert settings.influx.token.get_secret_value() == "from-env"
    assert settings.influx.org == "secret-org"
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.tls) == (
        "broker.farm",
        8883,
        True,
    )
    assert settings.mqtt.credentials() == ("user", "pw")
    assert settings.http.port == 9200


def test_defaults_need_no_file() -> None:
    settings = load_settings(None)
    assert settings.spool.commit_interval == pytest.approx(0.005)
    assert settings.mqtt.protocol == "5"


PG = "postgresql://ingestd@127.0.0.1:1/ingestd"  # never connected to
CLUSTER = (
    "cluster: {enabled: true, instance: a}\nredis: {url: 'redis://127.0.0.1:1/0'}\n"
    "mqtt: {share_group: ingestd}\n"
)


def test_the_notification_outbox_is_in_postgresql_when_configured_else_local(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def outbox(text: str) -> tuple[str, str]:
        settings = load_settings(write(tmp_path / "c.yaml", text))
        return settings.notify.outbox, settings.notify_outbox

    assert outbox("") == ("auto", "local")
    assert outbox(f"postgres: {{url: '{PG}'}}\n") == ("auto", "postgres")
    assert outbox(f"postgres: {{url: '{PG}'}}\nnotify: {{outbox: local}}\n") == ("local", "local")
    assert outbox(f"postgres: {{url: '{PG}'}}\nnotify: {{outbox: postgres}}\n") == (
        "postgres",
        "postgres",
    )
    with pytest.raises(ConfigError, match=r"notify\.outbox postgres needs postgres\.url"):
        outbox("notify: {outbox: postgres}\n")

    # a cluster needs the outbox in PostgreSQL: auto with postgres.url is that
    assert outbox(f"{CLUSTER}postgres: {{url: '{PG}'}}\n") == ("auto", "postgres")
    with pytest.raises(ConfigError, match=r"outbox in PostgreSQL \(no postgres\.url\)"):
        outbox(CLUSTER)
    with pytest.raises(ConfigError, match=r"outbox in PostgreSQL \(notify\.outbox local\)"):
        outbox(f"{CLUSTER}postgres: {{url: '{PG}'}}\nnotify: {{outbox: local}}\n")

    # check --show says what auto means here, and its output still loads as auto
    config = write(tmp_path / "pg.yaml", f"postgres: {{url: '{PG}'}}\n")
    assert main(["check", "--config", str(config), "--show"]) == 0
    shown = capsys.readouterr().out
    assert "\nnotify:\n  outbox: auto  # postgres: postgres.url is set\n" in shown
    assert load_settings(write(tmp_path / "shown.yaml", shown)).notify.outbox == "auto"
    assert "\n  outbox: auto  # local: no postgres.url\n" in render_settings(load_settings(None))


def test_durations_and_sizes_are_readable(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.yaml",
        "spool:\n  max_bytes: 512MiB\n  commit_interval: 20ms\nmqtt:\n  session_expiry: 2h\n"
        "  protocol: 5\n",
    )
    settings = load_settings(config)
    assert settings.spool.max_bytes == 512 * 1024 * 1024
    assert settings.spool.commit_interval == pytest.approx(0.02)
    assert settings.mqtt.session_expiry == 7200
    assert settings.mqtt.protocol == "5"


def test_every_problem_names_file_line_key_value_and_what_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(
        tmp_path / "bad.yaml",
        "mqtt:\n"
        "  url: http://broker\n"
        "influx:\n"
        "  batch_size: 0\n"
        "  bucket_name: farm\n"
        "spool:\n"
        "  commit_interval: soon\n",
    )
    monkeypatch.setenv("INGESTD_LOGGING__LEVEL", "loud")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (5 problems)" in err
    assert f"{config}:2: mqtt.url = 'http://broker': expected a URL like mqtt://HOST[:PORT]" in err
    assert f"{config}:4: influx.batch_size = 0: Input should be greater than or equal to 1" in err
    assert f"{config}:5: influx.bucket_name: unknown key; accepted keys: url, api, token" in err
    assert f"{config}:7: spool.commit_interval = 'soon': expected a duration such as 500ms" in err
    assert (
        "environment variable INGESTD_LOGGING__LEVEL: logging.level = 'loud': "
        "Input should be 'debug', 'info', 'warning' or 'error'" in err
    )


def test_a_bad_secret_is_reported_without_its_value(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    write(secrets / "mqtt__password", "hunter2")
    write(secrets / "mqtt__receive_maximum", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, secrets)
    message = str(caught.value)
    assert f"secret file {secrets / 'mqtt__receive_maximum'}: mqtt.receive_maximum = '0'" in message
    assert "hunter2" not in message


def test_typos_in_variable_and_secret_file_names_are_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INGESTD_MQQT__URL", "mqtt://x")
    with pytest.raises(ConfigError, match="INGESTD_MQQT__URL: not a setting"):
        load_settings(None)
    monkeypatch.delenv("INGESTD_MQQT__URL")
    monkeypatch.setenv("INGESTD_MQTT__URLL", "mqtt://x")
    with pytest.raises(ConfigError, match=r"INGESTD_MQTT__URLL: mqtt.urll: unknown key"):
        load_settings(None)
    monkeypatch.delenv("INGESTD_MQTT__URLL")
    secrets = tmp_path / "s"
    secrets.mkdir()
    write(secrets / "influx__tokn", "x")
    with pytest.raises(ConfigError, match="influx__tokn: not a setting"):
        load_settings(None, secrets)


def test_yaml_syntax_and_missing_file_errors(tmp_path: Path) -> None:
    broken = write(tmp_path / "broken.yaml", "mqtt:\n  url: [\n")
    with pytest.raises(ConfigError, match=rf"{broken}:3:1: not valid YAML"):
        load_settings(broken)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path / "missing.yaml")
    listing = write(tmp_path / "list.yaml", "- mqtt\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_settings(listing)


def test_show_masks_every_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "**********" not in render_settings(load_settings(None))  # nothing set, nothing masked
    monkeypatch.setenv("INGESTD_MQTT__URL", "mqtt://bob:hunter2@127.0.0.1:1883")
    monkeypatch.setenv("INGESTD_INFLUX__TOKEN", "s3cr3t-token")
    monkeypatch.setenv("INGESTD_POSTGRES__URL", "postgresql://farm:pgpass@db:5432/farm")
    assert main(["check", "--config", str(EXAMPLE), "--show"]) == 0
    out = capsys.readouterr().out
    for secret in ("hunter2", "s3cr3t-token", "pgpass"):
        assert secret not in out
    assert "mqtt://bob:***@127.0.0.1:1883" in out
    assert "token: '**********'" in out


def test_mask_url_keeps_everything_but_the_password() -> None:
    assert mask_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert mask_url("http://127.0.0.1:8428") == "http://127.0.0.1:8428"


def test_every_shipped_subscription_decodes_a_real_message() -> None:
    from ingestd.decode import Decoder  # noqa: PLC0415
    from ingestd.lineproto import format_reading  # noqa: PLC0415

    settings = load_settings(EXAMPLE)
    decoder = Decoder(settings.mqtt.subscriptions, settings.guard)
    now = 1_790_000_000_000_000_000
    samples = {
        "farm/greenhouse-1/esp32-7/reservoir": b'{"ph": 6.1, "ec": 1.9, "water": {"temp": 20.5}}',
        "plain/greenhouse-1/probe-3/ph": b"6.05",
        "lp/greenhouse-1/gw-2": b"climate,zone=a air_temp=23.5,humidity=61",
        "tele/tasmota-4/SENSOR": b'{"Time":"2026-09-21T14:00:00","AM2301":{"Temperature":22.1,'
        b'"Humidity":55.3},"TempUnit":"C"}',
        "homie/esp-9/reservoir/level": b"73.5",
    }
    lines = {
        topic: [format_reading(r).decode() for r in decoder.decode(topic, payload, now)]
        for topic, payload in samples.items()
    }
    assert lines["farm/greenhouse-1/esp32-7/reservoir"] == [
        f"reservoir,device=esp32-7,site=greenhouse-1 ph=6.1,ec=1.9,water_temp=20.5 {now}"
    ]
    assert lines["plain/greenhouse-1/probe-3/ph"] == [
        f"reservoir,device=probe-3,site=greenhouse-1 ph=6.05 {now}"
    ]
    assert lines["lp/greenhouse-1/gw-2"] == [
        f"climate,device=gw-2,site=greenhouse-1,zone=a air_temp=23.5,humidity=61.0 {now}"
    ]
    # 14:00 in Amsterdam in September (CEST, UTC+2) is 12:00 UTC
    assert lines["tele/tasmota-4/SENSOR"] == [
        "tasmota,device=tasmota-4,sensor=AM2301 Temperature=22.1,Humidity=55.3 1789992000000000000"
    ]
    assert lines["homie/esp-9/reservoir/level"] == [f"reservoir,device=esp-9 level=73.5 {now}"]


def test_rules_commands_check_and_test_the_shipped_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", "check", str(REPO / "rules")]) == 0
    assert "valid" in capsys.readouterr().out
    tests = sorted(str(p) for p in (REPO / "rules" / "tests").glob("*.yaml"))
    assert tests
    assert main(["rules", "test", *tests]) == 0
    assert "rule tests passed" in capsys.readouterr().out
    bad = write(tmp_path / "bad.yaml", "rules:\n  - name: x\n    selct: {measurement: m}\n")
    assert main(["rules", "check", str(bad)]) == 2
    assert f"{bad}:3:5" in capsys.readouterr().err


def test_check_includes_the_rules_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INGESTD_RULES__DIR", str(REPO / "rules"))
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    assert "alert rules valid" in capsys.readouterr().err
    rules = tmp_path / "rules"
    rules.mkdir()
    write(rules / "broken.yaml", "rules:\n  - name: x\n    above: high\n")
    monkeypatch.setenv("INGESTD_RULES__DIR", str(rules))
    assert main(["check", "--config", str(EXAMPLE)]) == 2
    assert f"{rules / 'broken.yaml'}:" in capsys.readouterr().err


def test_commands_that_ask_the_daemon_say_when_it_is_not_running(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("INGESTD_HTTP__LISTEN", f"127.0.0.1:{port}")
    assert main(["alerts", "--config", str(EXAMPLE)]) == 1
    assert "is it running?" in capsys.readouterr().err
    assert main(["quotas", "--config", str(EXAMPLE)]) == 1
    assert "is it running?" in capsys.readouterr().err


def test_a_command_logs_on_stderr_so_its_stdout_stays_its_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ingestd notify status --json` once began with a log line on stdout: any command but
    run (which logs as its config says) sends log lines to stderr."""
    rules = tmp_path / "rules"
    rules.mkdir()
    assert main(["rules", "check", str(rules)]) == 0
    capsys.readouterr()
    get_logger("test").warning("a warning during a command")
    captured = capsys.readouterr()
    assert "a warning during a command" in captured.err
    assert captured.out == ""
