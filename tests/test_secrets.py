"""No output carries a secret (issue 16 item 9).

A table of secret-bearing values - URL userinfo, libpq's query password, tokens, a token
where its hash belongs, Apprise URLs and Apprise config files with tokens - each given in
the config file, an environment variable and a secret file, and pushed through every
output: the configuration errors of an invalid value, ``ingestd check --show`` of a valid
one, and, with a real daemon whose channels fail, its log lines, the outbox (its
``last_error``, the whole file), ``ingestd notify status``, ``/metrics`` and ``/healthz``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon import REPO, DaemonProcess, daemon_config
from services import Mosquitto, VictoriaMetrics, http_request
from test_alerts_e2e import Watcher, reading, wait_for
from test_notify_endpoints import HookServer

from ingestd.cli import main
from ingestd.config import mask_url

S = "S3cr3t"  # every secret below holds it: an output holding it holds a secret


@dataclass(frozen=True)
class Value:
    """A setting's value: ``section.key`` (``notify.channels.NAME`` for a channel)."""

    path: str
    text: str
    shape: str = "text"  # "list": given as a YAML list (config file only)

    @property
    def section(self) -> str:
        return self.path.split(".")[0]


INVALID = [
    Value("mqtt.url", f"mqtt://dev:{S}-mqtt-1@broker.farm:99999"),
    Value("mqtt.url", f"mqtts//dev:{S}-mqtt-2@broker.farm"),
    Value("postgres.url", f"postgresql://ingestd:{S}-pg-1@db.farm:5x/farm?password={S}-pg-2"),
    Value("postgres.url", f"host=db.farm user=ingestd password={S}-pg-3"),
    Value("postgres.url", f"host=db.farm password='{S} pg 4'"),
    Value("postgres.url", f"mysql://db.farm/farm?sslpassword={S}-pg-5&token={S}-pg-6"),
    Value("redis.url", f"redis://:{S}-redis-1@cache.farm:63x9/0"),
    Value("redis.url", f"ftp://ingestd:{S}-redis-2@cache.farm"),
    Value("redis.url", f"redis://:{S}@-redis-3@cache.farm:99999/0"),  # an "@" in the password
    Value("influx.url", f"http://ingestd:{S}-influx-1@tsdb.farm:80x"),
    Value("influx.url", f"http//ingestd:{S}-influx-2@tsdb.farm"),
    Value("influx.token", f"{S}-influx-3", "list"),
    Value("mqtt.password", f"{S}-mqtt-3", "list"),
    Value("http.token_sha256", f"{S}-http-1"),  # the token itself where its hash belongs
    Value("notify.channels.hook", f"nosuch://ingestd:{S}-hook-1@hooks.farm/{S}-hook-2"),
    Value("notify.channels.hook", f"json://hooks.farm/{S}-hook-3", "list"),
    Value("notify.channels.hook", f"tgram://{S}-hook-4"),
]
VALID = [
    Value("mqtt.url", f"mqtt://dev:{S}-mqtt-4@broker.farm:1883"),
    Value("mqtt.password", f"{S}-mqtt-5"),
    Value(
        "postgres.url",
        f"postgresql://ingestd:{S}-pg-7@db.farm/farm?sslmode=require&password={S}-pg-8"
        f"&sslpassword={S}-pg-9",
    ),
    Value("postgres.url", f"postgresql://db.farm/farm?pass%77ord={S}-pg-10"),
    Value("postgres.password", f"{S}-pg-11"),
    Value("redis.url", f"rediss://ingestd:{S}-redis-4@cache.farm:6380/0"),
    Value("redis.url", f"redis://cache.farm/0?password={S}-redis-5"),
    Value("redis.password", f"{S}-redis-6"),
    Value("influx.url", f"http://ingestd:{S}-influx-4@tsdb.farm:8086"),
    Value("influx.token", f"{S}-influx-5"),
    Value("influx.password", f"{S}-influx-6"),
    Value("notify.channels.hook", f"ntfy://ingestd:{S}-hook-5@hooks.farm/{S}-hook-6"),
    Value("notify.channels.hook", f"tgram://123456789:{S}-hook-7/987654"),
    Value("notify.channels.hook", f"json://hooks.farm/ingestd?+X-Token={S}-hook-8"),
]
SOURCES = ("config file", "environment variable", "secret file")


def _configure(tmp: Path, value: Value, source: str) -> tuple[list[str], dict[str, str]]:
    """Arguments and environment for ``ingestd check`` with ``value`` from ``source``."""
    section, *keys = value.path.split(".")
    document: dict[str, Any] = {"spool": {"dir": str(tmp / "spool")}}
    if section == "notify":
        document["notify"] = {"routes": [{"name": "ops", "channels": ["hook"]}]}
    env: dict[str, str] = {}
    args = ["check", "--config", str(tmp / "ingestd.yaml")]
    given: Any = [value.text] if value.shape == "list" else value.text
    if source == "config file":
        place = document.setdefault(section, {})
        for key in keys[:-1]:
            place = place.setdefault(key, {})
        place[keys[-1]] = given
    elif source == "environment variable":
        env["INGESTD_" + "__".join(p.upper() for p in value.path.split("."))] = value.text
    else:
        secrets = tmp / "secrets"
        secrets.mkdir(exist_ok=True)
        if section == "notify":  # notify__channels: YAML text, ``name: URL``
            text = yaml.safe_dump({keys[-1]: given})
            (secrets / "notify__channels").write_text(text)
        else:
            (secrets / f"{section}__{keys[0]}").write_text(value.text)
        args += ["--secrets-dir", str(secrets)]
    (tmp / "ingestd.yaml").write_text(yaml.safe_dump(document))
    return args, env


def _check(
    tmp: Path,
    value: Value,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
) -> tuple[int, str]:
    args, env = _configure(tmp, value, source)
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("INGESTD_")]:
            patch.delenv(name)
        for name, text in env.items():
            patch.setenv(name, text)
        code = main([*args, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _ids(values: list[Value]) -> list[str]:
    return [f"{v.path}-{n}" for n, v in enumerate(values)]


def _invalid() -> Iterator[Any]:
    for n, value in enumerate(INVALID):
        for source in SOURCES:
            # A variable or a secret file holds text: a list comes from the config file.
            if value.shape == "text" or source == "config file":
                yield pytest.param(value, source, id=f"{value.path}-{n}-{source}")


@pytest.mark.parametrize(("value", "source"), list(_invalid()))
def test_a_configuration_error_never_shows_a_secret(
    tmp_path: Path,
    value: Value,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, output = _check(tmp_path, value, source, monkeypatch, capsys)
    assert code == 2, output
    assert f"{value.path} = " in output, output  # the problem is reported...
    assert S not in output, output  # ...without the secret


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("value", VALID, ids=_ids(VALID))
def test_check_show_never_shows_a_secret(
    tmp_path: Path,
    value: Value,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, output = _check(tmp_path, value, source, monkeypatch, capsys, "--show")
    assert code == 0, output
    assert value.section + ":" in output
    assert S not in output, output


def test_mask_url_masks_userinfo_query_secrets_and_key_value_passwords() -> None:
    cases = {
        "mqtt://dev:pw@broker:1883": "mqtt://dev:***@broker:1883",
        "redis://:pw@[::1]:6379/0": "redis://:***@[::1]:6379/0",
        "http://127.0.0.1:8428": "http://127.0.0.1:8428",
        "postgresql://db/farm?sslmode=require&password=pw&sslpassword=pw2&pass%77ord=pw3": (
            "postgresql://db/farm?sslmode=require&password=***&sslpassword=***&pass%77ord=***"
        ),
        "redis://cache/0?token=pw#top": "redis://cache/0?token=***#top",
        "mqtt://u:p@ss/w?rd@broker:1": "mqtt://u:***@broker:1",  # "@", "/", "?" unescaped
        "host=db password=pw user=x": "host=db password=*** user=x",
        "host=db password='p w' user=x": "host=db password=*** user=x",
    }
    for url, masked in cases.items():
        assert mask_url(url) == masked


# --- a running daemon whose channels fail ---------------------------------------------------


RULES = """
rules:
  - name: ph_high
    select: {{measurement: reservoir, field: ph, tags: {{farm: "{farm}"}}}}
    above: 7.0
    severity: critical
"""


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()


def test_a_daemon_with_failing_channels_never_shows_a_secret(
    tmp_path: Path,
    mosquitto: Mosquitto,
    victoria_metrics: VictoriaMetrics,
    *,
    hooks: HookServer,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Four channels fail (HTTP 500) with secrets in their URLs - an ntfy URL (password,
    topic: an ntfy topic is its access secret), a webhook with a token in its path, and
    Apprise config files in YAML and TEXT holding such URLs - while the broker's and the
    TSDB's URLs carry passwords from secret files."""
    prefix = f"x{unique}"
    port = hooks.port
    for path in ("", f"{S}-path-1", f"{S}-path-2"):
        hooks.set(path, "fail")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    apprise_yaml = tmp_path / "apprise.yml"
    apprise_yaml.write_text(
        f"urls:\n  - ntfy://ingestd:{S}-yaml-1@127.0.0.1:{port}/{S}-yaml-topic:\n"
        "      tag: pager\n"
        f"  - json://ingestd:{S}-yaml-2@127.0.0.1:{port}/{S}-path-2:\n      tag: pager\n"
    )
    apprise_text = tmp_path / "apprise.txt"
    apprise_text.write_text(f"pager=ntfy://ingestd:{S}-text-1@127.0.0.1:{port}/{S}-text-topic\n")
    (secrets / "notify__channels").write_text(
        f"ntfy: 'ntfy://ingestd:{S}-ntfy-1@127.0.0.1:{port}/{S}-ntfy-topic'\n"
        f"hook: 'json://ingestd:{S}-hook-1@127.0.0.1:{port}/{S}-path-1'\n"
        f"yaml: {{config: '{apprise_yaml}', tag: pager}}\n"
        f"text: {{config: '{apprise_text}'}}\n"
    )
    host = mosquitto.url.removeprefix("mqtt://")
    (secrets / "mqtt__url").write_text(f"mqtt://ingestd:{S}-mqtt@{host}")
    influx = victoria_metrics.url.removeprefix("http://")
    (secrets / "influx__url").write_text(f"http://ingestd:{S}-influx@{influx}")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(secrets))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "farm.yaml").write_text(RULES.format(farm=prefix))
    channels = ["ntfy", "hook", "yaml", "text"]
    config = daemon_config(
        tmp_path,
        mosquitto.url,
        prefix,
        {"url": victoria_metrics.url},
        rules={"dir": str(rules)},
        notify={
            "retry_min": "200ms",
            "retry_max": "500ms",
            "breaker_failures": 2,
            "breaker_cooldown": "1s",
            "routes": [{"name": "ops", "channels": channels, "group_window": "0s"}],
        },
    )
    daemon = DaemonProcess(tmp_path, config).start()
    watcher = Watcher(mosquitto)
    try:
        reading(watcher, prefix, "tank-1", ph=7.4)
        for name in channels:  # failed, retried, and its breaker opened (logged with the error)
            calls = f'ingestd_notify_calls_total{{channel="{name}",outcome="error"}}'
            wait_for(lambda c=calls: daemon.metric(c) >= 3, f"{name} failing", timeout=60)
        metrics = http_request("GET", daemon.http + "/metrics").text
        health = http_request("GET", daemon.http + "/healthz").text
        outputs = {"/metrics": metrics, "/healthz": health}
        for command in (["notify", "status"], ["notify", "status", "--json"], ["check", "--show"]):
            done = subprocess.run(
                [sys.executable, "-m", "ingestd", *command, "--config", str(daemon.config_path)],
                capture_output=True,
                text=True,
                cwd=REPO,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            outputs[" ".join(command)] = done.stdout + done.stderr
        assert daemon.terminate() == 0
        outputs["log"] = daemon.log_path.read_text()
        for path in (tmp_path / "spool").rglob("*"):  # the outbox with its last_error, ...
            if path.is_file():
                outputs[str(path)] = path.read_bytes().decode(errors="replace")
        for where, text in outputs.items():
            assert S not in text, f"a secret in {where}:\n{text[-3000:]}"
        # what was shown instead: the failures, their secrets masked
        assert "failing" in outputs["notify status"] and "***" in outputs["notify status"]
        assert "notification failed" in outputs["log"]
    finally:
        watcher.close()
        daemon.close()
