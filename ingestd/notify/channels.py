"""A channel: one Apprise target, called synchronously from a notifier worker thread.

Apprise's own retries are switched off (ingestd retries, per channel, with backoff and a
circuit breaker) and the call deadline becomes the plugin's socket timeouts, so a hung
endpoint returns within about ``call_timeout``. Apprise is given no deadline of its own
(``service_timeout=0``): with one it would run the call in its process-wide pool and
abandon it there, where a hung endpoint could fill that pool for every channel.

URLs hold tokens: a channel is only ever shown as ``scheme://host`` (from Apprise's own
privacy URL, which masks a token even where it is the host, as in ``tgram://``), and error
texts are scrubbed of every other part of the URL (user, password, path, query values:
Apprise's privacy URL shows some tokens, such as an ntfy topic or a webhook's path). A
config-file channel is scrubbed of every URL the file holds, as loaded for each call.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from ingestd.config import NotifyChannel, NotifySection, apprise_quiet
from ingestd.errors import ConfigError
from ingestd.notify.messages import Message

if TYPE_CHECKING:
    import apprise

__all__ = ["Channel", "SendResult", "open_channels", "silence_apprise"]

_TOKEN_SPLIT = re.compile(r"[/:@?&=#,+;]+")
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key|auth|cred|sig", re.IGNORECASE)


@functools.cache
def _library() -> ModuleType:
    """Apprise, imported by the first channel: its plugins cost 17 MiB that a gateway
    without notification channels need not carry (bench: RSS at 10,000 devices)."""
    return importlib.import_module("apprise")


@dataclass(frozen=True, slots=True)
class SendResult:
    ok: bool
    error: str
    """Why it failed, scrubbed of secrets; empty on success."""
    seconds: float


def silence_apprise() -> None:
    """Apprise logs through the standard ``apprise`` logger; without a handler Python
    prints its warnings raw on stderr. The notifier logs every outcome itself."""
    logger = logging.getLogger("apprise")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def open_channels(section: NotifySection, names: Iterable[str] | None = None) -> list[Channel]:
    """The channels ``names`` (default: every channel), each checked: ConfigError when one
    has nothing to send to. ``ingestd run``, ``ingestd check`` and ``ingestd notify test``
    all refuse a channel here, with the same message."""
    silence_apprise()
    wanted = section.channels if names is None else names
    channels = [Channel(name, section.channels[name], section.call_timeout) for name in wanted]
    for channel in channels:
        channel.check()
    return channels


class Channel:
    def __init__(self, name: str, spec: NotifyChannel, call_timeout: float) -> None:
        self.name = name
        self._url = spec.url.get_secret_value() if spec.url is not None else None
        self._config: Path | None = spec.config
        self._tag = spec.tag
        self._timeout = call_timeout
        self._asset = _library().AppriseAsset(
            async_mode=False, service_timeout=0, storage_mode="memory"
        )
        self._secrets: tuple[str, ...] = ()
        self.target = self._describe()
        """``scheme://host`` (or the config file and tag): safe to show anywhere."""

    def _describe(self) -> str:
        if self._url is None:
            return f"config:{self._config}" + (f"#{self._tag}" if self._tag else "")
        with apprise_quiet():
            plugin = _library().Apprise.instantiate(self._url, asset=self._asset)
        if plugin is None:  # validated with the settings; only a changed plugin gets here
            return f"{self._url.partition('://')[0]}://?"
        private = str(plugin.url(privacy=True))
        parts = urlsplit(private)
        self._learn(_secret_words(self._url, private))
        return f"{parts.scheme}://{parts.hostname or ''}"

    def _learn(self, words: set[str]) -> None:
        if not words.issubset(self._secrets):
            # Longest first, so a token is replaced before a shorter token inside it.
            self._secrets = tuple(sorted(words.union(self._secrets), key=len, reverse=True))

    def check(self) -> None:
        """Raise ConfigError when a config-file channel yields no URL to send to."""
        if self._config is None:
            return
        with apprise_quiet():
            services = self._services(self._apprise())
        if not services:
            which = f" tagged {self._tag!r}" if self._tag else ""
            raise ConfigError(
                f"notify.channels.{self.name}: the Apprise config file {self._config} "
                f"has no usable URL{which}"
            )

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _apprise(self) -> apprise.Apprise:
        notifier: apprise.Apprise = _library().Apprise(asset=self._asset)
        if self._url is not None:
            notifier.add(self._url)
        else:
            config = _library().AppriseConfig(asset=self._asset)
            config.add(str(self._config))
            notifier.add(config)
        return notifier

    def _services(self, notifier: apprise.Apprise) -> list[apprise.NotifyBase]:
        services = list(notifier.find(self._tag)) if self._tag else list(notifier)
        if self._config is not None:  # the file's URLs, as they are now: scrub them all
            words: set[str] = set()
            plugins: list[Any] = services  # Apprise's url() is untyped
            for plugin in plugins:
                words |= _secret_words(str(plugin.url()), str(plugin.url(privacy=True)))
            self._learn(words)
        return services

    def send(self, message: Message) -> SendResult:
        """One call, retries off, socket timeouts at most ``call_timeout``. Blocking: run
        it in a worker thread."""
        started = time.monotonic()
        try:
            notifier = self._apprise()
            services = self._services(notifier)
            if not services:
                return SendResult(False, "no URL to send to", time.monotonic() - started)
            for service in services:
                service.retry = 0
                service.socket_connect_timeout = min(service.socket_connect_timeout, self._timeout)
                service.socket_read_timeout = min(service.socket_read_timeout, self._timeout)
            result = notifier.notify(
                body=message.body,
                title=message.title,
                notify_type=message.notify_type,
                tag=self._tag or _library().common.MATCH_ALL_TAG,
            )
            with result:
                if result:
                    return SendResult(True, "", time.monotonic() - started)
                reasons = [
                    entry.message
                    for entry in result.logs()
                    if entry.level in {"WARNING", "ERROR", "CRITICAL"}
                ]
                error = "; ".join(reasons[-3:]) or f"Apprise: {result.status.name.lower()}"
        except Exception as exc:  # a plugin bug costs one attempt, not a worker thread
            error = f"{type(exc).__name__}: {exc}"
        return SendResult(False, self.redact(error)[:500], time.monotonic() - started)


def _secret_words(url: str, private: str) -> set[str]:
    """The words of ``url`` an error text must not repeat: all but its scheme, host and port
    (as ``private``, Apprise's privacy URL of it, shows them) and its query, of which only
    the values Apprise masks or whose keys name a secret (token, password, key, ...)."""
    rest = url.partition("://")[2]
    words = _TOKEN_SPLIT.split(rest)
    try:
        shown = urlsplit(private)
        query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
        visible = {shown.scheme, shown.hostname or "", str(shown.port or "")}
    except ValueError:  # an odd URL: every word of it is a secret
        return {word for word in words if len(word) >= 3}
    if query:
        masked = dict(parse_qsl(shown.query, keep_blank_values=True))
        words = _TOKEN_SPLIT.split(rest.partition("?")[0])
        for key, value in query:
            if masked.get(key) != value or _SECRET_KEY.search(key):
                words += _TOKEN_SPLIT.split(value)
    return {word for word in words if len(word) >= 3 and word not in visible}
