"""deploy/cluster/: three instance configs that form one cluster, and their systemd template unit.

The instance configs are loaded as ingestd loads them; what must differ per instance differs,
and nothing else does. The template unit is verified as tests/test_deploy.py verifies
ingestd.service: a temporary copy whose ExecStart names an existing ingestd (here this
checkout's venv, instead of a staged install: the unit is the subject, not install.sh), as
the instances a, b and c.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ingestd.cli import main
from ingestd.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "deploy" / "cluster"
TEMPLATE = CLUSTER / "ingestd@.service"
SINGLE = REPO / "deploy" / "ingestd.service"
INSTANCES = ("a", "b", "c")
EXEC_START = "/opt/ingestd/venv/bin/ingestd"
PER_INSTANCE = {
    ("mqtt", "username"),
    ("mqtt", "client_id"),
    ("spool", "dir"),
    ("http", "listen"),
    ("cluster", "instance"),
}
"""The settings each instance needs its own value of; all others are the same everywhere."""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def _load(instance: str) -> Settings:
    return load_settings(CLUSTER / f"{instance}.yaml")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: run `make setup` (it installs the Debian package systemd)",
            pytrace=False,
        )
    return path


def _directives(text: str) -> set[str]:
    return {line for line in text.splitlines() if line and line[0].isalpha() and "=" in line}


def test_shipped_files_are_the_unit_the_readme_and_one_config_per_instance() -> None:
    assert sorted(p.name for p in CLUSTER.iterdir()) == sorted(
        ["README.md", "acl", "ingestd@.service", *(f"{i}.yaml" for i in INSTANCES)]
    )


def test_each_instance_config_loads_and_they_form_one_cluster() -> None:
    instances = {name: _load(name) for name in INSTANCES}
    for name, settings in instances.items():
        assert settings.cluster.enabled, name
        assert settings.cluster.instance == name  # the file, the unit's %i and the name agree
        assert settings.spool.dir == Path("/var/lib/ingestd") / name  # StateDirectory=ingestd/%i
        assert settings.mqtt.protocol == "5", name  # shared subscriptions, session expiry
        assert settings.mqtt.session_expiry > 0, name  # a restart resumes the session
        assert settings.quotas.backend == "redis", name
        assert settings.notify.outbox == "postgres", name

    def shared(value: Any) -> None:
        assert len(set(value)) == 1, value

    shared(s.cluster.partitions for s in instances.values())
    shared(s.mqtt.share_group for s in instances.values())
    shared(s.redis.url for s in instances.values())
    shared(s.postgres.url for s in instances.values())
    shared(s.mqtt.url for s in instances.values())

    def distinct(values: list[Any]) -> None:
        assert len(set(values)) == len(values), values

    distinct([s.mqtt.client_id for s in instances.values()])
    distinct([s.mqtt.username for s in instances.values()])
    for name, settings in instances.items():
        # The gateway broker keys a session by the username: the client id sent says the same.
        assert settings.mqtt.username == settings.mqtt.client_id == f"ingestd-{name}", name
    distinct([s.spool.dir for s in instances.values()])
    distinct([s.http.listen for s in instances.values()])
    distinct([s.http.port for s in instances.values()])  # all three fit on one machine
    distinct([s.cluster.instance for s in instances.values()])


def test_the_cluster_acl_is_the_gateway_acl_with_an_account_per_instance() -> None:
    """deploy/cluster/acl: mosquitto/acl's patterns and users, but for the block of user
    ingestd, which is there once per instance (the accounts of a.yaml, b.yaml, c.yaml)."""
    from ingestd.broker import acl_blocks  # noqa: PLC0415

    def rules(text: str) -> tuple[list[str], dict[str, list[str]]]:
        lines = [line.strip() for line in text.splitlines()]
        patterns = [line for line in lines if line.startswith("pattern")]
        return patterns, acl_blocks(text)

    gateway_patterns, gateway_users = rules((REPO / "mosquitto" / "acl").read_text())
    cluster_patterns, cluster_users = rules((CLUSTER / "acl").read_text())
    assert cluster_patterns == gateway_patterns
    ingestd = gateway_users.pop("ingestd")
    accounts = {_load(name).mqtt.username for name in INSTANCES}
    assert {user: cluster_users.pop(user) for user in accounts} == dict.fromkeys(accounts, ingestd)
    assert cluster_users == gateway_users  # devices' name "5", the operator


def test_instance_configs_differ_only_in_the_per_instance_settings() -> None:
    """Edit one, edit all: a setting that drifted between instances is a bug waiting."""

    def common(settings: Settings) -> dict[str, Any]:
        data = settings.model_dump(mode="json")
        for section, key in PER_INSTANCE:
            del data[section][key]
        return data

    first, *others = (common(_load(name)) for name in INSTANCES)
    for other in others:
        assert other == first


@pytest.mark.parametrize("instance", INSTANCES)
def test_ingestd_check_accepts_each_instance_config(
    instance: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = CLUSTER / f"{instance}.yaml"
    assert main(["check", "--config", str(path)]) == 0
    assert f"{path}: configuration is valid" in capsys.readouterr().err


def test_template_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    text = TEMPLATE.read_text()
    assert f"ExecStart={EXEC_START} run --config /etc/ingestd/cluster/%i.yaml" in text
    ingestd = Path(sys.executable).parent / "ingestd"  # the same entry point, installed here
    assert os.access(ingestd, os.X_OK), ingestd
    (tmp_path / TEMPLATE.name).write_text(
        text.replace(f"ExecStart={EXEC_START}", f"ExecStart={ingestd}")
    )
    # Instances of the template in the same directory: verify loads ingestd@.service for each.
    units = [str(tmp_path / f"ingestd@{name}.service") for name in INSTANCES]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr


def test_template_unit_is_the_single_instance_unit_but_for_the_instance_paths() -> None:
    """Lifecycle, credentials and hardening stay as in deploy/ingestd.service."""
    single = _directives(SINGLE.read_text())
    template = _directives(TEMPLATE.read_text())
    differing = {line.partition("=")[0] for line in single ^ template}
    assert differing == {
        "Description",
        "After",
        "ExecStart",
        "StateDirectory",
        "WorkingDirectory",
        "EnvironmentFile",
    }
    for line in (
        "StateDirectory=ingestd/%i",
        "WorkingDirectory=/var/lib/ingestd/%i",
        "EnvironmentFile=-/etc/ingestd/cluster/%i.env",
    ):
        assert line in template, line
