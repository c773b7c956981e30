"""The notifier in-process, with an injectable clock, real Apprise and real local endpoints:
routing, grouping, quiet hours, backoff, circuit breaker, max age, fallback, escalation,
idempotency, secrets, templates, and the ``notify`` commands and settings."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from test_notify_endpoints import HookServer, MailServer, wait_until

from ingestd.cli import main
from ingestd.config import NotifySection, load_settings, render_settings
from ingestd.errors import ConfigError
from ingestd.health import Health
from ingestd.metrics import Metrics
from ingestd.notify import Notifier
from ingestd.notify.messages import Templates, render
from ingestd.notify.outbox import FILENAME, SqliteOutbox
from ingestd.notify.routes import Router
from ingestd.notify.worker import RetryPolicy
from ingestd.rules import AlertEvent

REPO = Path(__file__).resolve().parent.parent
AMSTERDAM = ZoneInfo("Europe/Amsterdam")
T0 = datetime(2026, 5, 4, 12, 0, tzinfo=AMSTERDAM).timestamp()  # a Monday, noon
COMPACT = "{% for e in events %}{{ e.kind }} {{ e.id }}\n{% endfor %}"
R = TypeVar("R")


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer()
    yield server
    server.close()


@pytest.fixture
def mail() -> Iterator[MailServer]:
    server = MailServer()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def section(**values: Any) -> NotifySection:
    base: dict[str, Any] = {
        "workers": 3,
        "call_timeout": "3s",
        "retry_min": "10s",
        "retry_max": "80s",
        "breaker_failures": 3,
        "breaker_cooldown": "60s",
    }
    return NotifySection.model_validate({**base, **values})


def route(name: str, channels: list[str], **values: Any) -> dict[str, Any]:
    return {"name": name, "channels": channels, "group_window": 0, "body": COMPACT, **values}


def event(
    kind: str = "firing",
    *,
    alert: str = "a1",
    at: float = T0,
    severity: str = "critical",
    rule: str = "ph_high",
    device: str = "dev1",
    site: str = "gh1",
    labels: dict[str, str] | None = None,
    notify: bool = True,
) -> AlertEvent:
    state = {"resolved": "resolved", "acknowledged": "acknowledged"}.get(kind, "firing")
    return AlertEvent(
        id=alert,
        rule=rule,
        device=device,
        site=site,
        field="ph",
        measurement="reservoir",
        severity=severity,
        state=state,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
        value=7.4,
        threshold=7.0,
        started_at=T0 - 60,
        at=at,
        labels=labels or {},
        annotations={"summary": f"pH 7.4 on {device}"},
        flapping=False,
        notify=notify,
        acknowledged_by="night-shift" if kind == "acknowledged" else None,
    )


class Harness:
    """A notifier on a fake clock; ``step()`` persists, then runs rounds until idle."""

    def __init__(self, directory: Path, settings: NotifySection, clock: Clock) -> None:
        self.clock = clock
        self.metrics = Metrics()
        self.health = Health()
        self.notifier = Notifier(
            settings, directory, self.metrics, self.health, clock=clock, rng=lambda: 1.0
        )

    def submit(self, *events: AlertEvent) -> None:
        self.notifier.submit(list(events))

    async def step(self) -> None:
        assert await self.notifier.persist()
        for _ in range(20):
            await self.notifier.cycle()
            if not self.notifier._sends:
                return
            await self.notifier.idle()
        raise AssertionError("the notifier kept sending")

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def close(self) -> None:
        await self.notifier.close()


def run(body: Callable[[], Awaitable[R]]) -> R:
    return asyncio.run(body())  # type: ignore[arg-type]


def lines(server: HookServer, path: str) -> list[str]:
    """Every ``kind alert`` line delivered on ``path``, in order."""
    return [line for m in server.delivered(path) for line in m["message"].splitlines() if line]


# --- settings ------------------------------------------------------------------------------


def _example_notify_block(config_file: Path) -> str:
    """The commented example of config/ingestd.yaml's notify section, uncommented."""
    text = (REPO / "config" / "ingestd.yaml").read_text()
    block = text.split("  # An example (ingestd check validates it", 1)[1].split("\n", 1)[1]
    example = []
    for line in block.splitlines():
        if not line.startswith("  #"):
            break
        example.append("  " + line[4:] if line.startswith("  # ") else "")
    return "\n".join(example).replace("/etc/ingestd/apprise.yml", str(config_file))


def test_the_shipped_example_route_loads_with_every_option(tmp_path: Path) -> None:
    apprise_file = tmp_path / "apprise.yml"
    apprise_file.write_text("urls:\n  - json://127.0.0.1:9/sms:\n      tag: sms\n")
    shipped = (REPO / "config" / "ingestd.yaml").read_text()
    assert "\n  channels: {}\n" in shipped and "\n  routes: []\n" in shipped
    text = shipped.replace("\n  channels: {}\n", "\n").replace("\n  routes: []\n", "\n")
    # The example goes at the end of the notify section, before the next top-level key.
    after = re.compile(r"\n\n[a-z_]+:\n").search(text, text.index("\nnotify:\n"))
    assert after is not None
    example = "\n" + _example_notify_block(apprise_file)
    text = text[: after.start()] + example + text[after.start() :]
    config = tmp_path / "ingestd.yaml"
    config.write_text(text)
    settings = load_settings(config)
    notify = settings.notify
    water, manager = notify.routes
    assert set(notify.channels) == {"farm-hook", "night-mail", "manager-sms"}
    assert water.escalate_to == "manager" and water.fallback == "manager"
    assert water.quiet_hours[0].daily and not water.quiet_hours[1].daily
    assert water.match.labels == {"team": "water"}
    assert manager.target_only
    documented = set(re.findall(r"^  #     (\w+):", text, re.MULTILINE))
    assert documented >= set(type(water).model_fields) - {"name"}
    for key in type(notify).model_fields:
        assert f"\n  {key}:" in shipped, f"notify.{key} is not in the shipped config"
    assert main(["check", "--config", str(config)]) == 0


def test_the_readme_example_is_valid(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Notifications", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "ingestd.yaml"
    config.write_text(example)
    notify = load_settings(config).notify
    assert [r.name for r in notify.routes] == ["water-team", "manager"]
    assert Router(notify).routes["water-team"].quiet_until(T0, "warning") is None


def test_settings_errors_name_the_problem(tmp_path: Path) -> None:
    def problem(notify: str) -> str:
        config = tmp_path / "bad.yaml"
        config.write_text("notify:\n" + notify)
        with pytest.raises(ConfigError) as caught:
            load_settings(config)
        return str(caught.value)

    assert "unknown channel pager (notify.channels: hook)" in problem(
        "  channels: {hook: 'json://127.0.0.1/x'}\n  routes: [{name: r, channels: [pager]}]\n"
    )
    assert "fallback loops: a -> b -> a" in problem(
        "  channels: {hook: 'json://127.0.0.1/x'}\n"
        "  routes:\n"
        "    - {name: a, channels: [hook], fallback: b}\n"
        "    - {name: b, channels: [hook], fallback: a}\n"
    )
    assert "write a time of day in quotes" in problem(
        "  channels: {hook: 'json://127.0.0.1/x'}\n"
        "  routes: [{name: r, channels: [hook], quiet_hours: [{start: 22:00, end: '06:00'}]}]\n"
    )
    assert "escalate_after and escalate_to go together" in problem(
        "  channels: {hook: 'json://127.0.0.1/x'}\n"
        "  routes: [{name: r, channels: [hook], escalate_after: 5m}]\n"
    )
    assert "must be below workers" in problem("  workers: 2\n  channel_concurrency: 2\n")
    assert "template error" in problem(
        "  channels: {hook: 'json://127.0.0.1/x'}\n"
        "  routes: [{name: r, channels: [hook], body: '{{ events[0].nope }}'}]\n"
    )
    bad_url = problem("  channels: {hook: 'nosuchscheme://user:hunter2secret@host/path'}\n")
    assert "Apprise cannot use this nosuchscheme:// URL" in bad_url
    assert "hunter2secret" not in bad_url


def test_channel_urls_come_from_environment_or_secret_file_and_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        "notify:\n  routes: [{name: ops, channels: [hook, mail]}]\n"
        "  channels:\n    hook: json://placeholder/x\n"
        "    mail: mailto://127.0.0.1:25?from=a@farm.example&to=b@farm.example&mode=insecure\n"
    )
    # a variable per channel, over the config file's channels
    monkeypatch.setenv("INGESTD_NOTIFY__CHANNELS__HOOK", "json://ingestd:envsecret456@127.0.0.1/h")
    settings = load_settings(config)
    hook = settings.notify.channels["hook"].url
    assert hook is not None and "envsecret456" in hook.get_secret_value()
    assert set(settings.notify.channels) == {"hook", "mail"}
    shown = render_settings(settings)
    assert "envsecret456" not in shown
    assert "url: json://**********" in shown and "url: mailto://**********" in shown
    assert main(["check", "--config", str(config), "--show"]) == 0
    assert "envsecret456" not in capsys.readouterr().out
    monkeypatch.delenv("INGESTD_NOTIFY__CHANNELS__HOOK")

    # the secret file notify__channels holds them all (it replaces the config file's)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "notify__channels").write_text(
        "hook: json://ingestd:filesecret123@127.0.0.1:9/hook\n"
        "mail: {url: 'mailto://127.0.0.1:25?from=a@farm.example&to=c@farm.example&mode=insecure'}\n"
    )
    settings = load_settings(config, secrets)
    hook = settings.notify.channels["hook"].url
    assert hook is not None and "filesecret123" in hook.get_secret_value()
    assert main(["check", "--config", str(config), "--secrets-dir", str(secrets), "--show"]) == 0
    assert "filesecret123" not in capsys.readouterr().out

    (secrets / "notify__channels").write_text("hook: [json://x:leakedtoken789@host\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, secrets)
    assert "not valid YAML" in str(caught.value)
    assert "leakedtoken789" not in str(caught.value)


# --- routes, quiet hours, messages ---------------------------------------------------------


def test_routes_match_by_severity_site_rule_device_and_labels_in_order() -> None:
    router = Router(
        section(
            channels={"c": "json://127.0.0.1/c"},
            routes=[
                route("escalation-only", ["c"], target_only=True),
                route(
                    "water-critical",
                    ["c"],
                    match={"severity": "critical", "labels": {"team": "water"}},
                    stop=False,
                ),
                route("greenhouses", ["c"], match={"site": "gh-*", "rule": ["ph_*", "ec_*"]}),
                route("lab", ["c"], match={"device": "!esp32-*"}, kinds=["firing"]),
                route("rest", ["c"]),
            ],
        )
    )

    def names(**fields: Any) -> list[str]:
        data = {**event().to_dict(), **fields}
        return [r.name for r in router.routes_for(data)]

    assert names(site="gh-1", labels={"team": "water"}) == ["water-critical", "greenhouses"]
    assert names(site="gh-1", severity="warning") == ["greenhouses"]
    assert names(site="gh-1", rule="co2_high", device="lab-3") == ["lab"]
    # lab matches but does not send repeats, and it stops the search all the same
    assert names(site="field", device="lab-3", kind="repeat") == []
    assert names(site="field", device="esp32-1") == ["rest"]


def test_quiet_hours_in_a_time_zone_across_midnight_and_once() -> None:
    router = Router(
        section(
            channels={"c": "json://127.0.0.1/c"},
            routes=[
                route(
                    "night",
                    ["c"],
                    timezone="Europe/Amsterdam",
                    quiet_hours=[
                        {"start": "22:00", "end": "06:30", "days": ["mon", "tue"]},
                        {"start": "2026-05-06T09:00", "end": "2026-05-06T10:00"},
                    ],
                )
            ],
        )
    )
    night = router.routes["night"]

    def at(day: int, hour: int, minute: int = 0) -> float:
        return datetime(2026, 5, day, hour, minute, tzinfo=AMSTERDAM).timestamp()

    assert night.quiet_until(at(4, 21, 59), "warning") is None
    assert night.quiet_until(at(4, 23, 0), "warning") == at(5, 6, 30)  # Monday night
    assert night.quiet_until(at(5, 3, 0), "warning") == at(5, 6, 30)  # still Monday's window
    assert night.quiet_until(at(5, 3, 0), "critical") is None  # critical overrides
    assert night.quiet_until(at(6, 23, 0), "warning") is None  # Wednesday: not a quiet day
    assert night.quiet_until(at(6, 9, 30), "warning") == at(6, 10, 0)  # the one-off window


def test_the_default_message_says_what_where_value_threshold_since_and_how_to_ack() -> None:
    templates = Templates.build(None, None)
    firing = event(alert="3f2a9c1b7d2e4f60").to_dict()
    message = render(templates, [firing], route="pager", ref="r1", now=T0 + 600, zone=AMSTERDAM)
    assert message.title == "[CRITICAL] FIRING ph_high on dev1 (gh1): ph 7.4, threshold 7"
    assert message.notify_type == "failure"
    body = message.body
    assert "What:  reservoir ph = 7.4 (threshold 7)" in body
    assert "Where: site gh1, device dev1" in body
    assert "Since: 2026-05-04 11:59 CEST (11m ago)" in body
    assert "pH 7.4 on dev1" in body
    assert (
        "mosquitto_pub -u YOU -P PASSWORD -t alerts/ack/3f2a9c1b7d2e4f60/YOU -m 'optional note'"
        in body
    )
    assert "ingestd alerts ack 3f2a9c1b7d2e4f60" in body
    resolved = event("resolved", alert="3f2a9c1b7d2e4f60").to_dict()
    grouped = render(templates, [firing, resolved], route="pager", ref="r2", now=T0, zone=AMSTERDAM)
    assert grouped.title == "[CRITICAL] 2 alerts: 1 firing, 1 resolved"
    assert grouped.body.count("alerts/ack/") == 1, "a resolution needs no acknowledgement"
    broken = Templates.build(None, "{{ events[0].labels.team }}")  # no such label here
    fallback = render(broken, [firing], route="pager", ref="r3", now=T0, zone=AMSTERDAM)
    assert "Where: site gh1" in fallback.body and "route template error" in fallback.body


# --- the notifier on a fake clock, real Apprise, real endpoints ----------------------------


def test_delivery_grouping_and_idempotency_across_a_restart(
    tmp_path: Path, hooks: HookServer
) -> None:
    settings = section(
        channels={"a": hooks.url("a"), "b": hooks.url("b")},
        routes=[route("ops", ["a", "b"], group_window="10s")],
    )
    clock = Clock()

    async def body() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="x1"))
        clock.now += 3
        h.submit(event(alert="x2", at=clock.now), event(alert="q", notify=False))
        await h.step()
        assert hooks.posts() == [], "held for the grouping window"
        clock.now = T0 + 10
        await h.step()
        assert lines(hooks, "a") == lines(hooks, "b") == ["firing x1", "firing x2"]
        assert len(hooks.delivered("a")) == 1, "one message for the group"
        clock.now = T0 + 30
        h.submit(event(alert="x1"))  # handed over again (a replay): known, not sent again
        h.submit(event(alert="x3", at=clock.now))
        await h.step()
        clock.now = T0 + 45
        await h.step()
        assert lines(hooks, "a") == ["firing x1", "firing x2", "firing x3"]
        assert h.metric("ingestd_notifications_sent_total", channel="a") == 3
        await h.close()

        again = Harness(tmp_path, settings, clock)  # a restart: nothing is sent twice
        again.submit(event(alert="x2", at=T0 + 3))
        clock.now = T0 + 100
        await again.step()
        assert lines(hooks, "b") == ["firing x1", "firing x2", "firing x3"]
        await again.close()

    run(body)


def test_quiet_hours_delay_to_one_message_critical_overrides_drop_drops(
    tmp_path: Path, hooks: HookServer
) -> None:
    quiet = [{"start": "11:00", "end": "13:00"}]
    settings = section(
        channels={"a": hooks.url("a"), "b": hooks.url("b")},
        routes=[
            route(
                "delayed",
                ["a"],
                match={"rule": "ph_*"},
                timezone="Europe/Amsterdam",
                quiet_hours=quiet,
            ),
            route(
                "dropped",
                ["b"],
                timezone="Europe/Amsterdam",
                quiet_hours=quiet,
                quiet_action="drop",
            ),
        ],
    )
    clock = Clock()  # 12:00 in Amsterdam: quiet

    async def body() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="w1", severity="warning"), event(alert="c1", severity="critical"))
        h.submit(event(alert="w2", severity="warning", rule="co2_high"))
        clock.now += 600
        h.submit(event("resolved", alert="w1", severity="warning", at=clock.now))
        await h.step()
        assert lines(hooks, "a") == ["firing c1"], "critical is sent in quiet hours"
        assert hooks.posts("b") == []
        clock.now = datetime(2026, 5, 4, 13, 0, tzinfo=AMSTERDAM).timestamp()
        await h.step()
        assert lines(hooks, "a") == ["firing c1", "firing w1", "resolved w1"]
        assert len(hooks.delivered("a")) == 2, "what waited goes out as one message"
        assert hooks.posts("b") == [], "quiet_action drop never sends"
        assert h.metric("ingestd_notify_muted_total", route="dropped") == 1
        await h.close()

    run(body)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(retry_min=5, retry_max=60, breaker_failures=5, breaker_cooldown=60)
    assert [policy.backoff(n, lambda: 1.0) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert policy.backoff(3, lambda: 0.25) == 5
    assert policy.backoff(200, lambda: 0.0) == 0


def test_retry_backoff_then_circuit_breaker_probes_one_entry_and_closes(
    tmp_path: Path, hooks: HookServer
) -> None:
    hooks.set("a", "fail")
    settings = section(
        channels={"a": hooks.url("a")},
        routes=[route("ops", ["a"])],
        breaker_failures=3,
        retry_min="10s",
        breaker_cooldown="60s",
    )
    clock = Clock()

    async def body() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="e1"), event(alert="e2"))
        await h.step()
        assert len(hooks.posts("a")) == 1  # both in one message, which failed
        clock.now += 9.9
        await h.step()
        assert len(hooks.posts("a")) == 1, "backing off: 10s after the first failure"
        clock.now = T0 + 10
        await h.step()
        assert len(hooks.posts("a")) == 2
        clock.now = T0 + 10 + 20  # the second failure waits 20s (rng 1.0: the cap)
        await h.step()
        assert len(hooks.posts("a")) == 3
        assert h.notifier._breakers["a"].record.breaker == "open"
        assert h.metric("ingestd_notify_breaker_open", channel="a") == 1
        assert h.health.report()["status"] == "degraded"
        assert h.metric("ingestd_notifications_retried_total", channel="a") == 6
        h.submit(event(alert="e3", at=clock.now))
        clock.now += 59
        await h.step()
        assert len(hooks.posts("a")) == 3, "an open breaker does not call"
        clock.now += 1
        await h.step()
        probe = hooks.posts("a")[-1]
        assert len(hooks.posts("a")) == 4 and probe.body["message"] == "firing e1"
        clock.now += 60
        hooks.set("a", "ok")
        await h.step()
        assert lines(hooks, "a") == ["firing e1", "firing e2", "firing e3"]
        assert hooks.delivered("a")[0]["message"] == "firing e1", "the probe, alone"
        assert h.notifier._breakers["a"].record.breaker == "closed"
        assert h.health.report()["status"] == "ok"
        assert h.metric("ingestd_notifications_sent_total", channel="a") == 3
        await h.close()

    run(body)


def test_a_retry_repeats_the_same_message_with_the_same_ref(
    tmp_path: Path, hooks: HookServer
) -> None:
    hooks.set("a", "fail")
    body = "ref {{ ref }}: {% for e in events %}{{ e.id }} {% endfor %}"
    settings = section(channels={"a": hooks.url("a")}, routes=[route("ops", ["a"], body=body)])
    clock = Clock()

    async def body_() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="e1"), event(alert="e2"))
        await h.step()
        clock.now += 5
        h.submit(event(alert="e3", at=clock.now))  # arrives while the first message waits
        await h.step()
        hooks.set("a", "ok")
        clock.now += 5
        await h.step()
        first, retried, third = (p.body["message"] for p in hooks.posts("a"))
        assert first == retried and first.endswith(": e1 e2"), "the same message, same ref"
        assert third.endswith(": e3") and third.split(":")[0] != first.split(":")[0]
        await h.close()

    run(body_)


def test_breaker_open_and_max_age_hand_notifications_to_the_fallback_route(
    tmp_path: Path, hooks: HookServer
) -> None:
    hooks.set("a", "fail")
    settings = section(
        channels={"a": hooks.url("a"), "b": hooks.url("b"), "c": hooks.url("c")},
        routes=[
            route("primary", ["a"], match={"rule": "ph_*"}, fallback="backup"),
            route("other", ["c"], match={"rule": "co2_*"}, fallback="backup"),
            route("backup", ["b"], target_only=True),
        ],
        breaker_failures=2,
        retry_min="1s",
        max_age="1h",
    )
    clock = Clock()

    async def body() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="p1"))
        await h.step()
        assert hooks.posts("b") == [], "one failure is not yet 'keeps failing'"
        clock.now += 1
        await h.step()  # the second failure opens the breaker: fallback
        await h.step()
        assert lines(hooks, "b") == ["firing p1"]
        hooks.set("c", "fail")
        h.submit(event(alert="o1", rule="co2_high", at=clock.now))
        await h.step()
        clock.now = T0 + 3602
        await h.step()  # older than max_age: failed; o1 to the fallback, p1 was already
        assert lines(hooks, "b") == ["firing p1", "firing o1"]
        assert h.metric("ingestd_notifications_failed_total", channel="c") == 1
        assert h.metric("ingestd_notifications_failed_total", channel="a") == 1
        assert h.metric("ingestd_notify_fallbacks_total", route="other") == 1
        assert h.metric("ingestd_notify_fallbacks_total", route="primary") == 1
        hooks.set("a", "ok")
        hooks.set("c", "ok")
        clock.now += 600
        await h.step()
        assert lines(hooks, "a") == lines(hooks, "c") == [], "a failed entry is not sent again"
        await h.close()

    run(body)


def test_escalation_when_unacknowledged_is_durable_and_cancelled_by_an_ack(
    tmp_path: Path, hooks: HookServer
) -> None:
    settings = section(
        channels={"a": hooks.url("a"), "m": hooks.url("m")},
        routes=[
            route("ops", ["a"], escalate_after="15m", escalate_to="manager"),
            route("manager", ["m"], target_only=True),
        ],
    )
    clock = Clock()

    async def body() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="late"), event(alert="acked"))
        await h.step()
        clock.now += 300
        h.submit(event("acknowledged", alert="acked", at=clock.now))
        await h.step()
        await h.close()

        h = Harness(tmp_path, settings, clock)  # restarted: the timer is still there
        clock.now = T0 + 899
        await h.step()
        assert hooks.posts("m") == []
        clock.now = T0 + 900
        await h.step()
        (message,) = hooks.delivered("m")
        assert message["message"] == "unacknowledged late"
        assert h.metric("ingestd_notify_escalations_total", route="ops") == 1
        clock.now += 60
        h.submit(event("resolved", alert="late", at=clock.now))
        await h.step()
        assert lines(hooks, "m") == ["unacknowledged late", "resolved late"]
        assert lines(hooks, "a") == [
            "firing late",
            "firing acked",
            "acknowledged acked",
            "resolved late",
        ]
        await h.close()

    run(body)


def test_a_slow_channel_holds_one_worker_and_its_late_answer_counts_once(
    tmp_path: Path, hooks: HookServer, mail: MailServer
) -> None:
    mail.slow(0.6)  # each SMTP step in time (0.4 s to spare), the whole call past the 1s deadline
    settings = section(
        channels={"slow": mail.url(), "fast": hooks.url("fast")},
        routes=[route("ops", ["slow", "fast"])],
        call_timeout="1s",
        workers=2,
    )
    clock = Clock()

    async def body() -> None:
        h = Harness(tmp_path, settings, clock)
        h.submit(event(alert="h1"))
        assert await h.notifier.persist()
        await h.notifier.cycle()  # both calls start
        # Recorded by the notifier, not only received: else fast still counts as busy.
        await asyncio.to_thread(
            wait_until,
            lambda: h.metric("ingestd_notifications_sent_total", channel="fast") == 1,
            "fast delivery recorded",
        )
        h.submit(event(alert="h2", at=clock.now))
        assert await h.notifier.persist()
        await h.notifier.cycle()  # fast is free again; slow is busy: not called a second time
        await asyncio.to_thread(
            wait_until, lambda: len(hooks.delivered("fast")) == 2, "the second on fast"
        )
        await h.notifier.idle()  # the slow call: past its deadline, then a success
        assert h.metric("ingestd_notify_calls_total", channel="slow", outcome="timeout") == 1
        assert [text.split() for _, text in mail.mails()] == [["firing", "h1"]]
        await h.step()  # h2 now; h1 is not sent again
        assert [text.split() for _, text in mail.mails()] == [["firing", "h1"], ["firing", "h2"]]
        assert h.metric("ingestd_notifications_sent_total", channel="slow") == 2
        assert h.metric("ingestd_notifications_retried_total", channel="slow") == 0
        assert h.notifier._breakers["slow"].record.breaker == "closed"
        await h.close()

    run(body)


def test_secrets_stay_out_of_errors_status_and_metrics(
    tmp_path: Path, hooks: HookServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hooks.set("tokenpath-s3cr3t", "fail")
    url = f"json://ingestd:pw-s3cr3t@127.0.0.1:{hooks.port}/tokenpath-s3cr3t"
    settings = section(channels={"hook": url}, routes=[route("ops", ["hook"])])
    clock = Clock()

    async def body() -> Harness:
        h = Harness(tmp_path / "spool", settings, clock)
        h.submit(event())
        await h.step()
        await h.close()
        return h

    (tmp_path / "spool").mkdir()
    h = run(body)
    store = SqliteOutbox(tmp_path / "spool" / FILENAME, readonly=True)
    (record,) = store.channel_records()
    store.close()
    assert record.last_error and "s3cr3t" not in record.last_error
    metrics = h.metrics.registry
    from prometheus_client import generate_latest  # noqa: PLC0415

    assert b"s3cr3t" not in generate_latest(metrics)
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"spool: {{dir: {tmp_path / 'spool'}}}\n"
        f"notify:\n  channels: {{hook: '{url}'}}\n  routes: [{{name: ops, channels: [hook]}}]\n"
    )
    assert main(["notify", "status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out
    assert "json://127.0.0.1" in out and "1 pending" in out
    assert main(["notify", "status", "--json", "--config", str(config)]) == 0
    assert "s3cr3t" not in capsys.readouterr().out


def test_notify_test_sends_through_every_channel_of_a_route(
    tmp_path: Path, hooks: HookServer, mail: MailServer, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        "notify:\n"
        f"  channels: {{hook: '{hooks.url('t')}', mail: '{mail.url()}'}}\n"
        "  routes: [{name: ops, channels: [hook, mail], timezone: Europe/Amsterdam}]\n"
    )
    assert main(["notify", "test", "ops", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ok      hook (json://127.0.0.1)" in out and "ok      mail (mailto://" in out
    (posted,) = hooks.delivered("t")
    assert posted["title"].startswith("[TEST] ingestd notification test through route ops")
    ((subject, text),) = mail.mails()
    assert subject.startswith("[TEST]") and "if you read this" in text
    hooks.set("t", "fail")
    assert main(["notify", "test", "ops", "--config", str(config)]) == 1
    assert "FAILED  hook" in capsys.readouterr().out
    assert main(["notify", "test", "nope", "--config", str(config)]) == 2
    assert "no route 'nope'; routes: ops" in capsys.readouterr().err


def test_check_run_and_notify_test_refuse_a_config_file_channel_without_a_tagged_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    apprise_file = tmp_path / "apprise.yml"
    apprise_file.write_text("urls:\n  - json://127.0.0.1:9/sms:\n      tag: sms\n")
    config = tmp_path / "ingestd.yaml"

    def configure(tag: str) -> NotifySection:
        config.write_text(
            f"spool: {{dir: {tmp_path / 'spool'}}}\n"
            f"notify:\n  channels: {{pager: {{config: {apprise_file}, tag: {tag}}}}}\n"
            "  routes: [{name: ops, channels: [pager]}]\n"
        )
        return load_settings(config).notify

    configure("sms")
    assert main(["check", "--config", str(config)]) == 0
    capsys.readouterr()

    notify = configure("nosuchtag")
    refusal = (
        f"ingestd: notify.channels.pager: the Apprise config file {apprise_file} "
        "has no usable URL tagged 'nosuchtag'\n"
    )
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.endswith(refusal) and "configuration is valid" not in err
    assert main(["notify", "test", "ops", "--config", str(config)]) == 2
    assert capsys.readouterr().err == refusal
    with pytest.raises(ConfigError) as caught:  # what `ingestd run` makes first
        Notifier(notify, tmp_path, Metrics(), Health())
    assert f"ingestd: {caught.value}\n" == refusal


def test_status_without_an_outbox_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text(f"spool: {{dir: {tmp_path}}}\n")
    assert main(["notify", "status", "--config", str(config)]) == 0
    assert "no notification was queued yet" in capsys.readouterr().out
