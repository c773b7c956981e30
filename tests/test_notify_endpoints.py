"""Local notification endpoints for the notify tests, and proof that real Apprise reaches them.

- :class:`HookServer`: an aiohttp server in a thread that receives Apprise ``json://``
  posts, scriptable per path: answer 200, answer 500, or hang (then answer when released).
  A post counts as *delivered* only when it was answered 200 to a client still waiting:
  what the client abandoned on its deadline is an attempt, not a delivery.
- :class:`MailServer`: an aiosmtpd SMTP server (no TLS) for Apprise ``mailto://``; it can
  be made slow (each step answered late, within the client's socket timeout).

Other test modules import these (``from test_notify_endpoints import HookServer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import apprise
import orjson
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from services import free_port

from ingestd.config import apprise_quiet


@dataclass(frozen=True)
class Post:
    path: str
    body: dict[str, Any]
    status: int
    delivered: bool
    at: float


class HookServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._lock = threading.Lock()
        self._modes: dict[str, tuple[str, float]] = {}
        self._posts: list[Post] = []
        self._arrivals: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="hook-server", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the hook server did not start"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        if self._runner is not None:
            self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _mode(self, path: str) -> tuple[str, float]:
        with self._lock:
            return self._modes.get(path, ("ok", 0.0))

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = orjson.loads(await request.read())
        with self._lock:
            self._arrivals[path] = self._arrivals.get(path, 0) + 1
        mode, hang = self._mode(path)
        if mode == "hang":
            changed = self._changed.setdefault(path, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), hang)
            mode = self._mode(path)[0]
            mode = "ok" if mode == "hang" else mode  # the hang is over: the channel answers
        status = 200 if mode == "ok" else 500
        waiting = request.transport is not None and not request.transport.is_closing()
        with self._lock:
            self._posts.append(Post(path, body, status, status == 200 and waiting, time.time()))
        return web.json_response({"ok": status == 200}, status=status)

    def set(self, path: str, mode: str, hang: float = 60.0) -> None:
        """``ok``, ``fail`` (500) or ``hang`` (answer after ``hang`` s, or when set again)."""
        with self._lock:
            self._modes[path] = (mode, hang)

        def release() -> None:
            event = self._changed.pop(path, None)
            if event is not None:
                event.set()

        self._loop.call_soon_threadsafe(release)

    def url(self, path: str, extra: str = "") -> str:
        return f"json://127.0.0.1:{self.port}/{path}{extra}"

    def posts(self, path: str | None = None) -> list[Post]:
        with self._lock:
            return [p for p in self._posts if path is None or p.path == path]

    def arrivals(self, path: str) -> int:
        """Requests received on ``path``, answered or not (yet)."""
        with self._lock:
            return self._arrivals.get(path, 0)

    def delivered(self, path: str) -> list[dict[str, Any]]:
        return [p.body for p in self.posts(path) if p.delivered]

    def close(self) -> None:
        for path in list(self._changed):
            self.set(path, "ok")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.lock = threading.Lock()
        self.delay = 0.0

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        await asyncio.sleep(self.delay)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, email.message.EmailMessage)
        with self.lock:
            self.messages.append(message)
        return "250 OK"


class MailServer:
    def __init__(self) -> None:
        self.port = free_port()
        self._inbox = _Inbox()
        self._controller = Controller(self._inbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def slow(self, delay: float) -> None:
        """Answer RCPT and DATA after ``delay`` s each: a slow server, never a silent one."""
        self._inbox.delay = delay

    def url(self, to: str = "ops@farm.example") -> str:
        return (
            f"mailto://127.0.0.1:{self.port}?smtp=127.0.0.1&from=ingestd@farm.example"
            f"&to={to}&mode=insecure"
        )

    def mails(self) -> list[tuple[str, str]]:
        """(subject, plain or html text) of every mail received."""
        with self._inbox.lock:
            messages = list(self._inbox.messages)
        found = []
        for message in messages:
            part = message.get_body(preferencelist=("plain", "html"))
            text = part.get_content() if part is not None else ""
            found.append((str(message["Subject"]), str(text)))
        return found

    def close(self) -> None:
        self._controller.stop()


@pytest.fixture
def hooks() -> Iterator[HookServer]:
    server = HookServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def mail() -> Iterator[MailServer]:
    server = MailServer()
    try:
        yield server
    finally:
        server.close()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# --- the endpoints do what the other tests rely on -----------------------------------------


def _apprise(url: str) -> apprise.Apprise:
    notifier = apprise.Apprise(
        asset=apprise.AppriseAsset(async_mode=False, service_timeout=0, storage_mode="memory")
    )
    with apprise_quiet():  # the first plugin load warns about imghdr on Python < 3.13
        assert notifier.add(url)
    return notifier


def test_hook_server_answers_as_scripted_and_counts_only_answered_deliveries(
    hooks: HookServer,
) -> None:
    assert _apprise(hooks.url("a")).notify(body="one", title="t")
    hooks.set("a", "fail")
    assert not _apprise(hooks.url("a")).notify(body="two", title="t")
    hooks.set("a", "hang", hang=5.0)
    started = time.monotonic()
    assert not _apprise(hooks.url("a", "?rto=0.5")).notify(body="three", title="t")
    assert time.monotonic() - started < 4.0, "the client's read timeout ends the call"
    hooks.set("a", "ok")  # releases the hung handler: it answers a client that left
    wait_until(lambda: len(hooks.posts("a")) == 3, "the abandoned post answered")
    assert [p.body["message"] for p in hooks.posts("a")] == ["one", "two", "three"]
    assert [p.status for p in hooks.posts("a")] == [200, 500, 200]
    assert [m["message"] for m in hooks.delivered("a")] == ["one"]


def test_mail_server_receives_apprise_mail(mail: MailServer) -> None:
    assert _apprise(mail.url()).notify(body="pH 7.4 on esp32-7", title="[CRITICAL] ph_high")
    ((subject, text),) = mail.mails()
    assert subject == "[CRITICAL] ph_high"
    assert "pH 7.4 on esp32-7" in text
