"""One typed Settings tree, read from a YAML file, secret files and ``INGESTD_*`` variables.

Precedence, highest first: environment (``INGESTD_<SECTION>__<KEY>``), secret files
(``<section>__<key>`` in the secrets directory, e.g. systemd's ``$CREDENTIALS_DIRECTORY``),
the config file, defaults. Every problem is reported at once, each naming where the value
came from (file and line, variable or secret file), the key, the bad value and what is
accepted.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ingestd.errors import ConfigError, key_path

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DURATION_HELP",
    "ENV_PREFIX",
    "TEMPLATE_VAR",
    "ClusterSection",
    "Duration",
    "GuardSection",
    "HttpSection",
    "InfluxSection",
    "LatestSection",
    "LoggingSection",
    "MqttSection",
    "NotifyChannel",
    "NotifyRoute",
    "NotifySection",
    "QuietWindow",
    "QuotaLimits",
    "QuotaRule",
    "QuotasSection",
    "RedisSection",
    "RegistrySection",
    "RetentionSection",
    "RouteMatch",
    "Settings",
    "SpoolSection",
    "Subscription",
    "load_settings",
    "mask_url",
    "parse_duration",
    "render_settings",
]

ENV_PREFIX = "INGESTD_"
DEFAULT_CONFIG_PATH = Path("/etc/ingestd/ingestd.yaml")
# Variables the command line reads itself; they are not settings.
# INGESTD_HTTP_TOKEN: the bearer token commands send to the daemon (the daemon keeps its hash).
_CLI_VARIABLES = frozenset({"INGESTD_CONFIG", "INGESTD_SECRETS_DIR", "INGESTD_HTTP_TOKEN"})

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DURATION_HELP = "expected a duration such as 500ms, 30s, 5m, 1h30m or 2d (a bare number is seconds)"


def parse_duration(value: Any) -> float:
    """Seconds from ``500ms``, ``30s``, ``5m``, ``1h30m``, ``2d`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(DURATION_HELP)
    seconds = math.nan
    if isinstance(value, int):  # YAML integers have no size limit; floats do
        seconds = float(value) if value.bit_length() < 1000 else math.inf
    elif isinstance(value, float):
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _DURATION_PART.findall(text)
            if parts and "".join(n + u for n, u in parts) == text:
                seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if math.isfinite(seconds):  # "9" * 400 is a float overflow, not a duration
        return seconds
    raise ValueError(DURATION_HELP)


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
"""Seconds; written ``500ms``, ``30s``, ``5m``, ``1h30m``, ``2d`` or a number."""


_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|cred|sig", re.IGNORECASE)
"""A query parameter or conninfo keyword holding a secret: libpq's ``password`` and
``sslpassword``, ``token``, ``api_key``, ``secret``, ``auth``, ``signature``..."""
_QUERY_PAIR = re.compile(r"([^&;=]*)=([^&;]*)")
_CONNINFO_PAIR = re.compile(r"""([A-Za-z_]+)(\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s']*)""")


def mask_url(url: str) -> str:
    """The URL with every secret in it replaced by ``***``: the password of its userinfo,
    the values of query parameters naming a secret (libpq's ``?password=`` and
    ``sslpassword=``, ``token=``, ...), and of ``password=...`` where the value is libpq
    key/value text rather than a URL. Safe for logs, errors and ``check --show``, also for
    a URL too malformed to use (it may then mask more than the secret)."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL (a typo, or libpq's key/value text): "x:y@" and "password=" go
        at = url.rfind("@")
        start = url.rfind("/", 0, at) + 1
        colon = url.find(":", start, at)
        if at >= 0 and colon >= 0:
            url = url[: colon + 1] + "***" + url[at:]
        return _mask_pairs(url)
    # The userinfo ends at the last "@" (a password may hold "@", "/" or "?" unescaped).
    at = rest.rfind("@")
    colon = rest.find(":", 0, at)
    if at >= 0 and colon >= 0:
        rest = rest[: colon + 1] + "***" + rest[at:]
        at = colon + 4
    userinfo, (path, query_sep, query) = rest[: at + 1], rest[at + 1 :].partition("?")
    if not query_sep:
        return f"{scheme}://{rest}"
    query, hash_, fragment = query.partition("#")
    query = _QUERY_PAIR.sub(_mask_query_pair, query)
    return f"{scheme}://{userinfo}{path}?{query}{hash_}{fragment}"


def _mask_query_pair(pair: re.Match[str]) -> str:
    key = pair.group(1)
    return f"{key}=***" if _SECRET_KEY.search(unquote(key)) else pair.group(0)


def _mask_pairs(text: str) -> str:
    """``password=x`` in libpq's key/value form (``host=db password='x y'``)."""

    def one(pair: re.Match[str]) -> str:
        key, equals, _ = pair.groups()
        return f"{key}{equals}***" if _SECRET_KEY.search(key) else pair.group(0)

    return _CONNINFO_PAIR.sub(one, text)


def _check_url(url: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        accepted = " or ".join(f"{s}://HOST[:PORT]" for s in schemes)
        raise ValueError(f"expected a URL like {accepted}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("the port must be a number between 0 and 65535") from None
    return url


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TEMPLATE_VAR = re.compile(r"^\{([a-z_][a-z0-9_]*)\}$")
"""A whole topic level that is a template variable, ``{name}``."""


class Subscription(Section):
    """One topic tree: how its topics map to tags and how its payloads are decoded."""

    template: str = Field(min_length=1)
    """Topic levels: literals, ``{name}`` variables (tags), ``{device}`` (required),
    ``{measurement}`` and ``{field}`` (special); e.g. ``farm/{site}/{device}/{measurement}``."""
    topic: str | None = None
    """The MQTT filter to subscribe to; derived from ``template`` ({x} -> +) when unset."""
    codec: Literal["json", "value", "line", "tasmota", "homie"] = "json"
    measurement: str | None = None
    """The measurement when the template has no ``{measurement}``."""
    field: str = "value"
    """``value`` codec: the field name when the template has no ``{field}``."""
    string_fields: list[str] = []
    """Fields kept as strings; other string values are skipped (numbers are floats)."""
    time_keys: list[str] = ["time", "timestamp", "ts"]
    """JSON keys holding the device's timestamp (epoch s/ms/us/ns or ISO 8601)."""
    timezone: str = "UTC"
    """Zone of timestamps without an offset (Tasmota sends local time)."""
    device_pattern: str = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
    measurements: list[str] | None = None
    """``line`` codec: allowed measurements (all when unset)."""
    tags: list[str] | None = None
    """``line`` codec: allowed tag keys (all when unset)."""

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        levels = value.split("/")
        names = [m.group(1) for lvl in levels if (m := TEMPLATE_VAR.match(lvl))]
        for level in levels:
            if ("{" in level or "}" in level) and not TEMPLATE_VAR.match(level):
                raise ValueError(f"level {level!r} must be a literal or a whole {{name}}")
            if level in {"+", "#"}:
                raise ValueError("use {name} variables, not MQTT wildcards, in a template")
        if "device" not in names:
            raise ValueError("a template must contain {device}: identity comes from the topic")
        if len(set(names)) != len(names):
            raise ValueError("a variable may appear only once in a template")
        return value

    @field_validator("device_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @property
    def filter(self) -> str:
        """The MQTT topic filter this subscription subscribes to."""
        if self.topic:
            return self.topic
        return "/".join("+" if TEMPLATE_VAR.match(lvl) else lvl for lvl in self.template.split("/"))


class MqttSection(Section):
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    client_id: str = Field(default_factory=lambda: f"ingestd-{socket.gethostname()}", min_length=1)
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry: Duration = 86400.0
    keepalive: Duration = 30.0
    receive_maximum: int = Field(default=1000, ge=1, le=65535)
    max_unacked: int = Field(default=50_000, ge=100)
    """Messages received but not yet acknowledged, held in memory; above this ingestd stops
    reading from the broker until commits catch up (some brokers, e.g. Mosquitto 2.0.11,
    send more than receive_maximum)."""
    max_unacked_bytes: ByteSize = ByteSize(64 << 20)
    """Bytes held in memory between receipt and the commit that makes them durable (the
    readings as line protocol, dead letters, what waits for the Redis quota check). Above
    this ingestd stops reading from the broker (QoS 0 too, which Receive Maximum does not
    limit) and resumes below half of it: a full spool cannot grow the daemon's memory."""
    retained: Literal["once", "ignore"] = "once"
    """Retained messages the broker replays at subscribe (the flag says so; a retained
    message published while subscribed arrives as a live one): ``once`` stores those whose
    readings carry the device's own timestamp (a replay writes the same point again) and
    skips the rest; ``ignore`` skips them all. Never seen by the rules, the latest values
    or the quotas: an old value, re-sent by the broker."""
    share_group: str | None = Field(default=None, pattern=r"^[^/+#]+$")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    reconnect_min: Duration = 0.5
    reconnect_max: Duration = 30.0
    subscriptions: list[Subscription] = [
        Subscription(template="farm/{site}/{device}/{measurement}", codec="json")
    ]

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("mqtt", "mqtts"))

    @field_validator("max_unacked_bytes")
    @classmethod
    def _held(cls, value: ByteSize) -> ByteSize:
        if value < 1 << 20:
            raise ValueError("must be at least 1MiB (memory for messages awaiting their commit)")
        return value

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an int; both spellings mean the same thing.
        return str(value) if isinstance(value, int | float) else value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    def credentials(self) -> tuple[str | None, str | None]:
        """Username and password: the explicit keys win over the URL's userinfo."""
        parts = urlsplit(self.url)
        username = self.username or parts.username
        password = self.password.get_secret_value() if self.password else parts.password
        return username, password


class GuardSection(Section):
    """What input is refused before it reaches the spool, and how many refusals are kept."""

    max_payload_bytes: ByteSize = ByteSize(65536)
    max_future: Duration = 300.0
    """Reject readings stamped further ahead than this (device clock skew)."""
    max_age: Duration = 30 * 86400.0
    """Reject readings older than this (the TSDB's retention drops them anyway)."""
    deadletters_max: int = Field(default=100_000, ge=100)
    """Dead letters kept; the oldest go first."""
    sample_bytes: int = Field(default=1024, ge=16, le=65536)
    """Payload bytes kept with each dead letter."""
    max_series_per_device: int = Field(default=200, ge=1)
    """Distinct (measurement, field) pairs one device may write; a message taking it past
    is a dead letter ``too_many_series``. A device's count is kept until it has been silent
    for latest.ttl (to twice that), or ingestd restarts."""
    max_tag_sets_per_device: int = Field(default=100, ge=1)
    """Distinct tag sets (topic tags and line-protocol tags together) one device may write;
    past it, ``too_many_series`` as above."""


class InfluxSection(Section):
    url: str = "http://127.0.0.1:8428"
    api: Literal["v2", "v1"] = "v2"
    token: SecretStr | None = None
    org: str = "farm"
    bucket: str = "farm"
    database: str = "farm"
    username: str | None = None
    password: SecretStr | None = None
    batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    flush_interval: Duration = 0.2
    timeout: Duration = 10.0
    gzip: bool = True
    backoff_max: Duration = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, ("http", "https"))


class PostgresSection(Section):
    url: str | None = None
    password: SecretStr | None = None
    pool_min: int = Field(default=1, ge=0)
    pool_max: int = Field(default=10, ge=1)
    connect_timeout: Duration = 5.0
    """How long one connection attempt may take before PostgreSQL counts as down."""
    retry: Duration = 5.0
    """While PostgreSQL is down, try again this often (the daemon runs degraded meanwhile)."""
    history_batch: int = Field(default=500, ge=1, le=100_000)
    """Alert history rows written per round trip."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, ("postgresql", "postgres"))

    @model_validator(mode="after")
    def _pool(self) -> PostgresSection:
        if self.pool_min > self.pool_max:
            raise ValueError(
                f"pool_min ({self.pool_min}) must not exceed pool_max ({self.pool_max})"
            )
        return self


class RedisSection(Section):
    url: str | None = None
    password: SecretStr | None = None
    timeout: Duration = 2.0
    """How long one Redis command may take before Redis counts as down."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, ("redis", "rediss", "unix"))


class QuotaLimits(Section):
    """Limits for one device; unset limits do not apply."""

    rate: float | None = Field(default=None, gt=0)
    """Sustained messages per second."""
    burst: int | None = Field(default=None, ge=1)
    """Messages allowed at once above the sustained rate (default: max(1, floor(rate)))."""
    bytes_per_second: float | None = Field(default=None, gt=0)
    bytes_burst: int | None = Field(default=None, ge=1)
    """Bytes allowed at once (default: one second's worth, at least 64KiB)."""
    per_hour: int | None = Field(default=None, ge=1)
    per_day: int | None = Field(default=None, ge=1)


class QuotaRule(QuotaLimits):
    """Limits for every device whose topics match ``topic``; the first matching rule applies."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    topic: str = Field(min_length=1)
    """An MQTT filter with the device's level named (``farm/+/{device}/#``) or a template
    (``farm/{site}/{device}/+``)."""
    key: str = Field(default="{device}", pattern=r"^\{[a-z_][a-z0-9_]*\}$")
    """The template variable that names the device the quota is counted for."""
    timezone: str = "UTC"
    """Where per_hour and per_day windows start (local midnight for per_day)."""
    overrides: dict[str, QuotaLimits] = {}
    """Per-device limits replacing all of this rule's (unset ones do not apply), e.g. a
    greenhouse controller's higher rate."""


class QuotasSection(Section):
    backend: Literal["memory", "redis"] = "memory"
    """memory: this instance only, fresh after a restart; redis: one quota shared by all
    instances, kept across restarts (needs redis.url)."""
    rules: list[QuotaRule] = []
    notice_topic: str = "ingestd/quota/{device}"
    """Where a throttled device is told so, at most once per notice_interval."""
    notice_interval: Duration = 60.0
    idle_expiry: Duration = 3600.0
    """Forget a device's state after this long without messages, once forgetting changes
    nothing (a used-up daily quota is kept until the day ends): bounds memory."""
    redis_timeout: Duration = 0.05
    """Longer than this, a Redis check falls back to local limits for that batch."""
    redis_retry: Duration = 1.0
    """After a Redis failure, use local limits this long before trying Redis again."""


class RulesSection(Section):
    dir: Path = Path("/etc/ingestd/rules")
    """YAML alert rule files; reloaded on SIGHUP and when a file changes."""
    watch_interval: Duration = 2.0
    """How often rules.dir is checked for changed files."""


# --- notifications (ingestd/notify/) ---------------------------------------------------

NotifyKind = Literal[
    "firing", "escalated", "deescalated", "repeat", "resolved", "acknowledged", "flapping"
]
NOTIFY_KINDS: tuple[NotifyKind, ...] = (
    "firing",
    "escalated",
    "deescalated",
    "repeat",
    "resolved",
    "acknowledged",
    "flapping",
)
"""Alert event kinds a route can send (``pending`` and ``cancelled`` never notify)."""
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NOTIFY_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_TIME_OF_DAY = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")


def _mask_apprise_url(url: SecretStr) -> str:
    scheme, sep, _ = url.get_secret_value().partition("://")
    return f"{scheme}://**********" if sep and scheme.isalnum() else "**********"


AppriseUrl = Annotated[SecretStr, PlainSerializer(_mask_apprise_url, when_used="json")]
"""An Apprise URL. It holds tokens, so it is a secret: ``check --show`` prints the scheme only."""


@contextmanager
def apprise_quiet() -> Iterator[None]:
    """Keep Apprise's own log lines (which may name a URL) off stderr while we validate;
    and the DeprecationWarning of ``imghdr``, which Apprise's email plugin imports when
    its plugins first load on Python < 3.13: it tells an operator nothing."""
    logger = logging.getLogger("apprise")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'imghdr' is deprecated", DeprecationWarning)
            yield
    finally:
        logger.removeHandler(handler)


def check_apprise_url(url: str) -> None:
    """Raise ValueError when Apprise cannot use ``url``; the message never repeats the URL."""
    import apprise  # noqa: PLC0415 - only configurations with channels pay for it

    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ValueError(
            "expected an Apprise URL such as json://HOST/PATH, mailto://HOST?to=ADDRESS or "
            "tgram://TOKEN/CHAT"
        )
    with apprise_quiet():
        asset = apprise.AppriseAsset(storage_mode="memory")
        plugin = apprise.Apprise.instantiate(url, asset=asset)
    if plugin is None:
        raise ValueError(
            f"Apprise cannot use this {scheme}:// URL (an unknown scheme, or a part missing or "
            "malformed; the URL is not shown because it may hold a token)"
        )


class _Unreadable:
    """Stands for channel text from a secret file that is not a mapping, so an error
    message can say so without printing the text (it holds tokens)."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"<text not shown: {self.why}>"


def _channels_input(value: Any) -> Any:
    """Channels come as a mapping, or as YAML text (a secret file ``notify__channels``);
    ``name: URL`` is short for ``name: {url: URL}``."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            return _Unreadable(f"not valid YAML{where}")
        if not isinstance(value, dict):
            return _Unreadable("expected a mapping of channel names to Apprise URLs")
    if isinstance(value, Mapping):
        return {
            str(name): {"url": spec} if isinstance(spec, str) else spec
            for name, spec in value.items()
        }
    return value


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_glob(pattern: str) -> None:
    from ingestd.rules.glob import Glob, GlobError  # noqa: PLC0415

    try:
        Glob(pattern)
    except GlobError as exc:
        raise ValueError(f"{pattern!r}: {exc}") from None


GlobList = Annotated[list[str], BeforeValidator(_one_or_many)]


class NotifyChannel(Section):
    """One destination: an Apprise URL, or the URLs of an Apprise config file (only those
    tagged ``tag`` when set). A channel is retried, circuit-broken and counted as a unit."""

    url: AppriseUrl | None = None
    config: Path | None = None
    """An Apprise config file (YAML or TEXT format)."""
    tag: str | None = Field(default=None, min_length=1)
    """With ``config``: only the URLs carrying this Apprise tag."""

    @model_validator(mode="after")
    def _target(self) -> NotifyChannel:
        if (self.url is None) == (self.config is None):
            raise ValueError(
                "a channel needs either url (an Apprise URL) or config (an Apprise config file)"
            )
        if self.tag is not None and self.config is None:
            raise ValueError("tag selects URLs of an Apprise config file: use it with config")
        if self.url is not None:
            check_apprise_url(self.url.get_secret_value())
        elif self.config is not None and not self.config.is_file():
            raise ValueError(f"the Apprise config file {self.config} does not exist")
        return self


class RouteMatch(Section):
    """Which alerts a route takes: every listed selector must match (globs, ``!`` negates;
    a list matches when any of its patterns does)."""

    severity: GlobList = ["*"]
    site: GlobList = ["*"]
    rule: GlobList = ["*"]
    device: GlobList = ["*"]
    labels: dict[str, str] = {}
    """Rule label -> glob; a label the rule lacks is matched as the empty string."""

    @field_validator("severity", "site", "rule", "device")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one pattern (* matches anything)")
        for pattern in value:
            _check_glob(pattern)
        return value

    @field_validator("labels")
    @classmethod
    def _label_globs(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value.values():
            _check_glob(pattern)
        return value


class QuietWindow(Section):
    """A time a route stays quiet: every day (``start``/``end`` as ``'HH:MM'``; an ``end``
    at or before ``start`` ends the next day), or once (``start``/``end`` as date-times)."""

    start: str
    end: str
    days: list[Weekday] = list(WEEKDAYS)
    """Daily windows: the days on which the window starts."""

    @field_validator("start", "end", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                "write a time of day in quotes, e.g. '22:00' (YAML reads 22:00 without quotes "
                f"as the number {22 * 60})"
            )
        if isinstance(value, date):  # YAML reads an unquoted date-time itself
            return value.isoformat()
        return value

    @field_validator("start", "end")
    @classmethod
    def _form(cls, value: str) -> str:
        if _TIME_OF_DAY.match(value):
            return value
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                "expected a time of day 'HH:MM' (every day) or a date-time such as "
                "'2026-05-01T06:00' (once)"
            ) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> QuietWindow:
        daily = [bool(_TIME_OF_DAY.match(v)) for v in (self.start, self.end)]
        if daily[0] != daily[1]:
            raise ValueError("start and end must both be times of day, or both date-times")
        if daily[0]:
            if self.start == self.end:
                raise ValueError("start and end are the same time: the window would be empty")
            if not self.days:
                raise ValueError("days is empty: the window would never apply")
            return self
        start, end = datetime.fromisoformat(self.start), datetime.fromisoformat(self.end)
        if (start.tzinfo is None) != (end.tzinfo is None):
            raise ValueError("give both date-times with an offset, or neither")
        if end <= start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self

    @property
    def daily(self) -> bool:
        return bool(_TIME_OF_DAY.match(self.start))


class NotifyRoute(Section):
    """Which alerts go to which channels, when, and as what message."""

    name: str = Field(pattern=_NOTIFY_NAME)
    match: RouteMatch = RouteMatch()
    target_only: bool = False
    """True: this route takes no alerts itself, it is only another route's escalate_to or
    fallback."""
    stop: bool = True
    """True: an alert this route takes is not offered to the routes after it."""
    channels: list[str] = Field(min_length=1)
    kinds: list[NotifyKind] = list(NOTIFY_KINDS)
    """Which transitions are sent (escalation messages always are)."""
    group_window: Duration = 10.0
    """Alerts of this route arriving within this window go out as one message."""
    group_max: int = Field(default=20, ge=1, le=500)
    """At most this many alerts in one message."""
    timezone: str = "UTC"
    """Zone of quiet_hours and of the times shown in messages."""
    quiet_hours: list[QuietWindow] = []
    quiet_override: list[str] = ["critical"]
    """Severities sent even in quiet hours."""
    quiet_action: Literal["delay", "drop"] = "delay"
    """delay: send when the quiet window ends (one grouped message); drop: never send."""
    escalate_after: Duration | None = None
    """A firing alert still unacknowledged this long after it fired is sent to escalate_to."""
    escalate_to: str | None = None
    fallback: str | None = None
    """Where this route's notifications also go when a channel keeps failing (its circuit
    breaker opens, or an entry reaches max_age)."""
    title: str | None = None
    """Jinja2 template (sandboxed) of the message title; null: notify.title or the default."""
    body: str | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: ZoneInfo('America')
            raise ValueError("expected an IANA time zone such as Europe/Amsterdam or UTC") from None
        return value

    @field_validator("title", "body")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            from ingestd.notify.messages import check_template  # noqa: PLC0415

            check_template(value)
        return value

    @model_validator(mode="after")
    def _escalation(self) -> NotifyRoute:
        if (self.escalate_after is None) != (self.escalate_to is None):
            raise ValueError("escalate_after and escalate_to go together: set both or neither")
        if self.escalate_after is not None and self.escalate_after <= 0:
            raise ValueError("escalate_after must be longer than 0s")
        return self


class NotifySection(Section):
    """Notifications of alert events through Apprise (ingestd/notify/, README "Notifications")."""

    outbox: Literal["auto", "local", "postgres"] = "auto"
    """Where notifications wait: ``local`` (spool dir), ``postgres`` (shared by every
    instance, one of which delivers; the local outbox serves while PostgreSQL is down), or
    ``auto``: postgres when postgres.url is set, else local (:attr:`Settings.notify_outbox`)."""
    workers: int = Field(default=4, ge=2, le=64)
    """Threads that call Apprise, apart from everything else."""
    channel_concurrency: int = Field(default=1, ge=1, le=63)
    """Calls in flight per channel: a hung channel holds at most this many workers."""
    call_timeout: Duration = 30.0
    """Deadline of one call to a channel (also its socket timeouts)."""
    retry_min: Duration = 5.0
    """Backoff after a channel's first failure; doubling per failure, capped, full jitter."""
    retry_max: Duration = 300.0
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive failures that open a channel's circuit breaker."""
    breaker_cooldown: Duration = 60.0
    """An open breaker waits this long, then lets one entry through as a probe."""
    max_age: Duration = 86400.0
    """An entry still undelivered after this long is marked failed (and sent to fallback)."""
    max_pending: int = Field(default=100_000, ge=100)
    """Undelivered entries kept at most (the outbox's budget); the oldest fail first."""
    keep_done: Duration = 7 * 86400.0
    """Delivered and failed entries are kept this long (notify status; idempotency)."""
    title: str | None = None
    """Default title template for every route; null: the built-in one."""
    body: str | None = None
    channels: Annotated[dict[str, NotifyChannel], BeforeValidator(_channels_input)] = {}
    """Name -> channel. URLs hold tokens: set them with INGESTD_NOTIFY__CHANNELS__<NAME>=URL
    or the secret file notify__channels (YAML: name: URL)."""
    routes: list[NotifyRoute] = []

    @field_validator("call_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be longer than 0s")
        return value

    @field_validator("title", "body")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        return NotifyRoute._template(value)

    @field_validator("channels")
    @classmethod
    def _names(cls, value: dict[str, NotifyChannel]) -> dict[str, NotifyChannel]:
        for name in value:
            if not re.match(_NOTIFY_NAME, name):
                raise ValueError(
                    f"channel name {name!r}: use lowercase letters, digits, - and _ "
                    "(at most 64; names from environment variables arrive lowercased)"
                )
        return value

    @model_validator(mode="after")
    def _references(self) -> NotifySection:
        if self.channel_concurrency >= self.workers:
            raise ValueError(
                f"channel_concurrency ({self.channel_concurrency}) must be below workers "
                f"({self.workers}): one hung channel must not take every worker"
            )
        if self.retry_min > self.retry_max:
            raise ValueError(f"retry_min ({self.retry_min:g}s) exceeds retry_max")
        names = [route.name for route in self.routes]
        doubles = sorted({n for n in names if names.count(n) > 1})
        if doubles:
            raise ValueError(f"route names must be unique: {', '.join(doubles)}")
        routes = {route.name: route for route in self.routes}
        problems = []
        for route in self.routes:
            missing = [c for c in route.channels if c not in self.channels]
            if missing:
                known = ", ".join(sorted(self.channels)) or "none defined"
                problems.append(
                    f"route {route.name}: unknown channel {', '.join(missing)} "
                    f"(notify.channels: {known})"
                )
            for key in ("escalate_to", "fallback"):
                target = getattr(route, key)
                if target is not None and target not in routes:
                    problems.append(f"route {route.name}: {key} {target!r} is not a route")
        for key in ("escalate_to", "fallback"):
            reported: set[frozenset[str]] = set()
            for route in self.routes:
                path = [route.name]
                target = getattr(route, key)
                while target is not None and target in routes:
                    if target in path:
                        loop = [*path[path.index(target) :], target]
                        if frozenset(loop) not in reported:
                            reported.add(frozenset(loop))
                            problems.append(f"{key} loops: {' -> '.join(loop)}")
                        break
                    path.append(target)
                    target = getattr(routes[target], key)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class SpoolSection(Section):
    dir: Path = Path("/var/lib/ingestd/spool")
    max_bytes: ByteSize = ByteSize(1 << 30)
    commit_interval: Duration = 0.005
    shutdown_grace: Duration = 10.0
    """On SIGTERM, deliver to the TSDB for at most this long; the rest waits for next start."""

    @field_validator("max_bytes")
    @classmethod
    def _budget(cls, value: ByteSize) -> ByteSize:
        if value < 1 << 20:
            raise ValueError("the spool needs a budget of at least 1MiB")
        return value


class RegistrySection(Section):
    """The device registry (PostgreSQL): who may send, from which site, and their
    calibrations. A device the registry knows at a site may send only under that site (dead
    letter ``site_mismatch``)."""

    unknown: Literal["accept", "reject", "register"] = "accept"
    """A device not in the registry: accept its readings, reject them (dead letter
    ``unknown_device``), or register it (enabled, at the site of its first message) and
    accept them."""
    cache: bool = True
    """Keep a copy in the spool dir, used when PostgreSQL is down at start."""


class LatestSection(Section):
    """The latest value per device and field (Redis when redis.url is set, else memory)."""

    enabled: bool = True
    ttl: Duration = 86400.0
    """A device silent this long disappears from the latest values."""
    interval: Duration = 1.0
    """Latest values are written (one pipelined round trip) this often."""

    @field_validator("ttl", "interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0")
        return value


class ClusterSection(Section):
    """Several instances as one system (needs redis.url and a shared subscription): the
    rules' devices are split into ``partitions``, each owned by one instance at a time under
    a lease in Redis; every instance forwards its readings to the owner's partition stream,
    and a dead instance's partitions move to the others when its lease runs out."""

    enabled: bool = False
    instance: str = Field(default_factory=socket.gethostname, pattern=r"^[\w.@-]+$")
    """This instance's name in the cluster (``ingestd status --cluster``); unique per instance."""
    partitions: int = Field(default=32, ge=1, le=4096)
    """How the devices are split for the rules; every instance must use the same number."""
    lease: Duration = 10.0
    """A partition's owner renews its lease every lease/5; when the owner dies, another
    instance takes the partition (and its deadman timers) at most this long after."""
    heartbeat: Duration = 2.0
    """How often an instance says it is alive, with its rates (``ingestd status --cluster``)."""
    forward_max: int = Field(default=200_000, ge=1000)
    """Readings waiting for Redis to take them (while it is down); beyond, the oldest go
    unevaluated by the rules (counted; they are stored all the same)."""

    @field_validator("lease", "heartbeat")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0")
        return value


MAX_RETENTION = 36500 * 86400.0
"""The longest retention age (100 years); 0 means forever."""


class RetentionSection(Section):
    """How long history is kept; ``ingestd retention apply`` deletes what is older."""

    alert_history: Duration = 365 * 86400.0
    """Resolved alerts (PostgreSQL) older than this are deleted; 0: kept forever."""
    deadletters: Duration = 30 * 86400.0
    """Dead letters older than this are deleted; 0: kept forever."""
    tsdb: Duration = 0.0
    """The TSDB bucket's retention, applied by ``ingestd influx setup``; 0: forever."""
    batch_size: int = Field(default=5000, ge=1, le=1_000_000)
    """Rows deleted per statement, so a big purge never holds long locks."""

    @field_validator("alert_history", "deadletters", "tsdb")
    @classmethod
    def _age(cls, value: float) -> float:
        # Far beyond any real age, yet a date can still be counted back from it (and
        # InfluxDB's durations, int64 nanoseconds, end at 292 years).
        if value > MAX_RETENTION:
            raise ValueError(
                f"at most {MAX_RETENTION / 86400:.0f}d (100 years); 0 keeps it forever"
            )
        return value


class HttpSection(Section):
    listen: str = "127.0.0.1:9108"
    token_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """SHA-256 (hex) of the bearer token required on every endpoint but /metrics, /healthz
    and /readyz; ``ingestd http token`` makes one. Required when listening beyond loopback."""
    max_connections: int = Field(default=128, ge=1)
    """Open connections at most; past it the one idle the longest is closed for the new one
    (none idle: the new one is closed). Each holds a file descriptor the spool may need."""
    header_timeout: Annotated[Duration, Field(gt=0)] = 10.0
    """A new connection must have sent its whole request head within this."""
    idle_timeout: Annotated[Duration, Field(gt=0)] = 15.0
    """A kept-alive connection is closed when no new request head is complete this long
    after the previous response."""

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9108 or [::1]:9108")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class LoggingSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"
    stats_interval: Duration = 60.0
    """How often a summary line (received, written, rejected, spool) is logged; 0: never."""

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """The whole configuration of one ingestd instance."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    mqtt: MqttSection = MqttSection()
    guard: GuardSection = GuardSection()
    influx: InfluxSection = InfluxSection()
    postgres: PostgresSection = PostgresSection()
    redis: RedisSection = RedisSection()
    quotas: QuotasSection = QuotasSection()
    rules: RulesSection = RulesSection()
    notify: NotifySection = NotifySection()
    spool: SpoolSection = SpoolSection()
    registry: RegistrySection = RegistrySection()
    latest: LatestSection = LatestSection()
    retention: RetentionSection = RetentionSection()
    cluster: ClusterSection = ClusterSection()
    http: HttpSection = HttpSection()
    logging: LoggingSection = LoggingSection()

    @property
    def notify_outbox(self) -> Literal["local", "postgres"]:
        """Where notifications wait, ``notify.outbox: auto`` resolved: in PostgreSQL when
        postgres.url is set, else in the spool dir. Read this, never notify.outbox."""
        if self.notify.outbox == "auto":
            return "postgres" if self.postgres.url else "local"
        return self.notify.outbox

    @model_validator(mode="after")
    def _needs(self) -> Settings:
        if self.quotas.backend == "redis" and not self.redis.url:
            raise ValueError("quotas.backend redis needs redis.url (e.g. redis://127.0.0.1:6379/0)")
        if self.cluster.enabled:
            if not self.redis.url:
                raise ValueError("cluster.enabled needs redis.url: the instances meet in Redis")
            if not self.mqtt.share_group:
                raise ValueError(
                    "cluster.enabled needs mqtt.share_group (e.g. ingestd): without a shared"
                    " subscription every instance would store every reading"
                )
            if self.notify_outbox != "postgres":
                why = "no postgres.url" if self.notify.outbox != "local" else "notify.outbox local"
                raise ValueError(
                    f"cluster.enabled needs the notification outbox in PostgreSQL ({why}): set"
                    " postgres.url, with notify.outbox auto (the default) or postgres; one"
                    " outbox for every instance, so a notification goes out once"
                )
        if self.notify.outbox == "postgres" and not self.postgres.url:
            raise ValueError(
                "notify.outbox postgres needs postgres.url (or notify.outbox: auto or local)"
            )
        if self.registry.unknown != "accept" and not self.postgres.url:
            raise ValueError(
                f"registry.unknown {self.registry.unknown} needs the device registry:"
                " set postgres.url (or registry.unknown: accept)"
            )
        if not _loopback(self.http.host) and not self.http.token_sha256:
            raise ValueError(
                f"http.listen {self.http.listen} is reachable from other machines: set"
                " http.token_sha256 (ingestd http token makes one) or listen on 127.0.0.1"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats what load_settings() passes in (file overlaid by secrets).
        return (env_settings, init_settings)


# --- loading -----------------------------------------------------------------------------


@dataclass
class _Origins:
    """Where each value came from, so an error can point at it."""

    config_path: Path | None
    lines: dict[tuple[str | int, ...], int] = field(default_factory=dict)
    secret_files: dict[tuple[str, ...], Path] = field(default_factory=dict)

    def describe(self, loc: tuple[str | int, ...], environ: Mapping[str, str]) -> str:
        for depth in range(len(loc), 0, -1):
            name = ENV_PREFIX + "__".join(str(p).upper() for p in loc[:depth])
            if name in environ:
                return f"environment variable {name}"
        for depth in range(len(loc), 0, -1):
            if loc[:depth] in self.secret_files:
                return f"secret file {self.secret_files[loc[:depth]]}"  # type: ignore[index]
        if self.config_path is not None:
            for depth in range(len(loc), -1, -1):
                line = self.lines.get(loc[:depth])
                if line is not None:
                    return f"{self.config_path}:{line}"
            return str(self.config_path)
        return "defaults"


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str | int, ...], int]]:
    """The document and the line of every key in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # raises ReaderError for a non-printable character
        node = loader.get_single_node()
        lines: dict[tuple[str | int, ...], int] = {}
        budget = [max(_YAML_MAX_VALUES, 10 * len(text))]
        doc = _construct(loader, node, (), lines, budget) if node is not None else {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {exc.problem or exc}") from exc
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line, column = before.count("\n") + 1, exc.position - before.rfind("\n")
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line}:{column}: not valid YAML: {problem}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:  # PyYAML composes and we construct recursively
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{path}: the config file must be a mapping of sections (mqtt:, influx:, ...)"
        )
    return doc, lines


_YAML_MAX_VALUES = 100_000
"""Values a config file may expand to, at least (10 per byte of text is always allowed):
nested aliases ("billion laughs") would otherwise expand a few hundred bytes to billions."""


def _construct(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: tuple[str | int, ...],
    lines: dict[tuple[str | int, ...], int],
    budget: list[int],
) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise yaml.constructor.ConstructorError(
            None, None, "the document expands to too many values (aliases)", node.start_mark
        )
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(_scalar(loader, key_node))
            lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = _construct(loader, value_node, (*path, key), lines, budget)
        return result
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            items.append(_construct(loader, item, (*path, index), lines, budget))
        return items
    return _scalar(loader, node)


def _scalar(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    """PyYAML lets ValueError out of ``!!int x``, ``!!float x`` and dates that do not exist
    (``2024-02-30``): each becomes a ``MarkedYAMLError`` at the value."""
    try:
        return loader.construct_object(node)
    except (ValueError, TypeError, OverflowError) as exc:
        kind = node.tag.rpartition(":")[2]
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"cannot read this value as {kind} (not shown: it may be a secret): {exc}",
            node.start_mark,
        ) from None


def _read_secrets(directory: Path, origins: _Origins) -> dict[str, Any]:
    """``<section>__<key>`` files as a nested mapping; unknown names are errors (typos)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: the secrets directory does not exist")
    sections = Settings.model_fields
    secrets: dict[str, Any] = {}
    problems = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        section, sep, key = entry.name.lower().partition("__")
        section_type = sections[section].annotation if section in sections else None
        known = (
            isinstance(section_type, type)
            and issubclass(section_type, BaseModel)
            and key in section_type.model_fields
        )
        if not sep or not known:
            problems.append(
                f"secret file {entry}: not a setting; name secret files <section>__<key>, "
                "e.g. influx__token or mqtt__password"
            )
            continue
        secrets.setdefault(section, {})[key] = entry.read_text(encoding="utf-8").strip()
        origins.secret_files[(section, key)] = entry
    if problems:
        raise ConfigError("\n".join(problems))
    return secrets


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    sections = Settings.model_fields
    unknown = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _CLI_VARIABLES:
            continue
        section, sep, _ = name[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or section not in sections:
            unknown.append(
                f"environment variable {name}: not a setting; expected "
                f"{ENV_PREFIX}<SECTION>__<KEY> with SECTION one of "
                + ", ".join(s.upper() for s in sections)
            )
    return unknown


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _accepted(error: Mapping[str, Any], loc: tuple[str | int, ...]) -> str:
    if error["type"] == "extra_forbidden":
        parent: Any = Settings
        for part in loc[:-1]:
            field_info = parent.model_fields.get(part) if isinstance(part, str) else None
            parent = field_info.annotation if field_info else None
            if not isinstance(parent, type) or not issubclass(parent, BaseModel):
                return "unknown key"
        return "unknown key; accepted keys: " + ", ".join(parent.model_fields)
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


_SECRET_KEYS = frozenset({"password", "token", "token_sha256"})
"""Keys whose values are never shown in an error: passwords, tokens and a token's hash (an
invalid one is often the token itself); nor is anything under notify.channels (Apprise
URLs)."""
_TEXT_USERINFO = re.compile(r"""([A-Za-z][\w+.-]*://[^\s'"/@:]*:)[^\s'"]*@""")
_TEXT_PAIR = re.compile(
    r"""((?:pass|pwd|secret|token|key|auth|cred|sig)[\w%-]*\s*=\s*)('[^']*'?|[^\s&;'",]*)""",
    re.IGNORECASE,
)


def _shown(loc: tuple[str | int, ...], bad: Any) -> str:
    """A bad value as an error may show it: secrets masked, wherever it came from."""
    if isinstance(bad, _Unreadable):  # says why, never what
        return repr(bad)
    if loc[:2] == ("notify", "channels") or any(str(part) in _SECRET_KEYS for part in loc):
        return "***"
    if isinstance(bad, dict):
        return "a mapping"
    text = repr(mask_url(bad)) if isinstance(bad, str) else repr(bad)
    # Lists and odd shapes: any URL userinfo or secret-named pair in their text.
    return _TEXT_PAIR.sub(r"\1***", _TEXT_USERINFO.sub(r"\1***@", text))


def _format_errors(exc: ValidationError, origins: _Origins, environ: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = key_path(loc)
        shown = _shown(loc, error.get("input"))
        value = "" if error["type"] in {"extra_forbidden", "missing"} else f" = {shown}"
        problems.append(f"{origins.describe(loc, environ)}: {key}{value}: {_accepted(error, loc)}")
    count = len(problems)
    head = f"invalid configuration ({count} problem{'s' if count > 1 else ''}):"
    return head + "".join(f"\n  {p}" for p in problems)


def load_settings(config_path: Path | None, secrets_dir: Path | None = None) -> Settings:
    """Read and validate everything; raise ConfigError listing every problem."""
    environ = os.environ
    origins = _Origins(config_path)
    document: dict[str, Any] = {}
    if config_path is not None:
        document, origins.lines = _read_yaml(config_path)
    if secrets_dir is not None:
        document = _deep_merge(document, _read_secrets(secrets_dir, origins))
    unknown = _unknown_variables(environ)
    if unknown:
        raise ConfigError("invalid configuration:" + "".join(f"\n  {u}" for u in unknown))
    try:
        return Settings(**document)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origins, environ)) from None


def render_settings(settings: Settings) -> str:
    """The effective settings as YAML, with every secret masked."""
    data = settings.model_dump(mode="json")
    for section in data.values():
        for key, value in section.items():
            if isinstance(value, str) and key == "url":
                section[key] = mask_url(value)
            elif key in {"password", "token"} and value is not None:
                section[key] = "**********"
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    if settings.notify.outbox == "auto":  # what it means here (outbox is notify's first key)
        why = "postgres.url is set" if settings.postgres.url else "no postgres.url"
        text = text.replace(
            "\nnotify:\n  outbox: auto\n",
            f"\nnotify:\n  outbox: auto  # {settings.notify_outbox}: {why}\n",
            1,
        )
    return text
