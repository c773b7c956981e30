"""Writes batches of line protocol to the TSDB and settles every line: accepted or refused.

A write never gives up on trouble that time can fix (the TSDB down, slow, throttling,
misconfigured): the batch stays in the spool while this module retries with capped,
jittered exponential backoff and says in the health report and the log what is wrong.
Only what the TSDB refuses for good comes back, line by line, as ``Refused``:

    reply            what happens
    2xx              accepted
    400, 422         bisect; a single line that is still refused is ``Refused``
    413              split in half; a single line too large is ``Refused``
    anything else    retry (5xx, 429, 408, 401/403/404 and no answer at all)

One retry loop serves both APIs; each API only provides "send one request".
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip
import json
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from influxdb_client.service.write_service import WriteService

from ingestd.config import InfluxSection, mask_url
from ingestd.health import Health
from ingestd.logs import get_logger
from ingestd.metrics import Metrics

__all__ = ["Refused", "Sink", "build_sink"]

BACKOFF_START = 0.2
"""Seconds before the first retry; each further failure doubles it up to backoff_max."""
LOG_EVERY = 30.0
"""While a problem persists unchanged, repeat its log line at most this often (seconds)."""
REASON_MAX = 300
"""Characters of the TSDB's error text kept in a ``Refused`` and in messages."""
_REFUSE = frozenset({400, 422})  # 422: InfluxDB 2.x, points outside the retention
_TOO_LARGE = 413
# Line protocol is repetitive: level 1 gets most of the saving for a fraction of the CPU.
_GZIP_LEVEL = 1
# VictoriaMetrics opens its errors with the client's address and port, which say nothing.
_VM_NOISE = re.compile(r'^remoteAddr: "[^"]*"; requestURI: [^;]*; ')


@dataclass(frozen=True, slots=True)
class Refused:
    """A line the TSDB refuses for good; the caller dead-letters it."""

    line: bytes
    status: int
    reason: str
    """The TSDB's own error text, trimmed."""


class Sink(Protocol):
    async def write(self, lines: Sequence[bytes]) -> list[Refused]:
        """Return once every line is accepted or refused; retry all else until cancelled."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    reason: str = ""
    retry_after: float | None = None


Send = Callable[[bytes], Awaitable[_Reply]]
"""Send one request with this body (lines joined by ``\\n``); raises when no answer came."""


def build_sink(section: InfluxSection, metrics: Metrics, health: Health) -> Sink:
    """The writer for ``section.api``; it connects on its first write."""
    transport: _V2 | _V1 = _V2(section) if section.api == "v2" else _V1(section)
    return _RetryingSink(
        transport.send, transport.close, transport.hints,
        section=section, metrics=metrics, health=health,
    )  # fmt: skip


@dataclass(slots=True)
class _Batch:
    waiting: int
    refused: list[Refused] = field(default_factory=list)


class _RetryingSink:
    def __init__(
        self,
        send: Send,
        close: Callable[[], Awaitable[None]],
        hints: Mapping[int, tuple[str, str]],
        *,
        section: InfluxSection,
        metrics: Metrics,
        health: Health,
    ) -> None:
        self._send = send
        self._close = close
        self._hints = hints
        self._url = mask_url(section.url)
        self._timeout = section.timeout
        self._backoff_max = section.backoff_max
        self._metrics = metrics
        self._health = health
        self._log = get_logger("sink")
        self._failures = 0  # consecutive failed requests: the backoff exponent
        self._down_since: float | None = None
        self._problem: str | None = None  # kind of the last failure: log each change once
        self._logged_at = 0.0

    async def write(self, lines: Sequence[bytes]) -> list[Refused]:
        if not lines:
            return []
        batch = _Batch(len(lines))
        await self._write(list(lines), batch)
        if batch.refused:
            first = batch.refused[0]
            self._log.warning(
                "tsdb refused lines",
                count=len(batch.refused),
                status=first.status,
                reason=first.reason,
                line=first.line[:200].decode(errors="replace"),
            )
        return batch.refused

    async def close(self) -> None:
        await self._close()

    async def _write(self, lines: list[bytes], batch: _Batch) -> None:
        while True:
            reply, kind, problem = await self._request(b"\n".join(lines))
            if reply is not None and (
                200 <= reply.status < 300 or reply.status in _REFUSE or reply.status == _TOO_LARGE
            ):
                self._up()
                if reply.status < 300:
                    self._metrics.batches.inc()
                    self._metrics.points_written.inc(len(lines))
                    batch.waiting -= len(lines)
                    return
                if len(lines) == 1:
                    batch.refused.append(Refused(lines[0], reply.status, reply.reason))
                    batch.waiting -= 1
                    return
                # Resending the lines a partial write already took is harmless: the same
                # series and timestamp overwrite themselves.
                half = len(lines) // 2
                await self._write(lines[:half], batch)
                await self._write(lines[half:], batch)
                return
            delay = self._backoff(reply)
            self._down(kind, problem, delay, batch)
            await asyncio.sleep(delay)

    async def _request(self, body: bytes) -> tuple[_Reply | None, str, str]:
        """The reply (None when none came), the error's kind and what went wrong."""
        started = time.monotonic()
        try:
            reply = await self._send(body)
        except TimeoutError:  # before OSError: it is one, and so are aiohttp's timeouts
            self._metrics.write_errors.labels("timeout").inc()
            return (
                None,
                "timeout",
                f"the TSDB at {self._url} did not answer within {self._timeout:g}s",
            )
        except (aiohttp.ClientError, OSError) as exc:
            self._metrics.write_errors.labels("connection").inc()
            return None, "connection", f"cannot reach the TSDB at {self._url} ({_describe(exc)})"
        finally:
            self._metrics.write_seconds.observe(time.monotonic() - started)
        if 200 <= reply.status < 300:
            return reply, "", ""
        kind = str(reply.status)
        self._metrics.write_errors.labels(kind).inc()
        what, fix = self._hints.get(reply.status, ("the TSDB answers", ""))
        return reply, kind, f"{what} ({kind}: {reply.reason})" + (f": {fix}" if fix else "")

    def _backoff(self, reply: _Reply | None) -> float:
        self._failures += 1
        if reply is not None and reply.retry_after is not None:
            return min(reply.retry_after, self._backoff_max)
        ceiling = min(self._backoff_max, BACKOFF_START * 2 ** min(self._failures - 1, 32))
        return random.uniform(0.0, ceiling)  # full jitter: many writers do not retry in step

    def _down(self, kind: str, problem: str, delay: float, batch: _Batch) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
        # The batch in hand, not the backlog: that is the spool's (/healthz "backlog").
        self._health.problem(
            "tsdb",
            f"{problem}; retrying in {delay:.1f}s (this batch: {batch.waiting} readings;"
            " what waits in all: backlog)",
        )
        if kind != self._problem or now - self._logged_at >= LOG_EVERY:
            self._problem, self._logged_at = kind, now
            self._log.warning(
                "tsdb write failed, retrying",
                problem=problem,
                retry_in=round(delay, 2),
                waiting=batch.waiting,
                failures=self._failures,
                down_seconds=round(now - self._down_since, 1),
            )

    def _up(self) -> None:
        if self._down_since is not None:
            self._log.info(
                "tsdb writes recovered",
                down_seconds=round(time.monotonic() - self._down_since, 1),
                failed_requests=self._failures,
            )
        self._down_since = self._problem = None
        self._failures = 0
        self._health.ok("tsdb")


class _V2:
    """``/api/v2/write`` through influxdb-client (InfluxDB 2.x, VictoriaMetrics)."""

    def __init__(self, section: InfluxSection) -> None:
        self._section = section
        self._client: InfluxDBClientAsync | None = None
        self._service: Any = None
        where = f"bucket {section.bucket!r} of org {section.org!r}"
        self.hints = {
            401: ("the TSDB refuses our credentials", "check influx.token"),
            403: (f"the token may not write to {where}", "check influx.token's permissions"),
            404: (
                f"the TSDB has no {where}",
                "create it, or check influx.bucket, influx.org and influx.url "
                "(InfluxDB 1.x has no /api/v2/write: set influx.api to v1)",
            ),
        }

    async def send(self, body: bytes) -> _Reply:
        section = self._section
        if self._client is None:  # its aiohttp session must be made inside the event loop
            token = section.token.get_secret_value() if section.token else None
            # The client's own gzip runs at level 9 on the event loop; we compress in a
            # thread instead and tell the write service the body is gzipped.
            self._client = InfluxDBClientAsync(
                url=section.url,
                token=token,  # type: ignore[arg-type]  # None (no auth header) is fine
                org=section.org,
                timeout=int(section.timeout * 1000),
                enable_gzip=False,
            )
            self._service = WriteService(self._client.api_client)  # type: ignore[no-untyped-call]
        extra: dict[str, str] = {}
        if section.gzip:
            body = await asyncio.to_thread(gzip.compress, body, _GZIP_LEVEL)
            extra["content_encoding"] = "gzip"
        try:
            # The body goes out as is; the async client has no retries of its own, and its
            # timeout bounds the whole request.
            await self._service.post_write_async(
                org=section.org, bucket=section.bucket, body=body,
                precision=WritePrecision.NS, async_req=False, _return_http_data_only=False,
                content_type="text/plain; charset=utf-8", **extra,
            )  # fmt: skip
        except ApiException as exc:
            if not exc.status:  # no HTTP exchange happened: a bug, not the TSDB's answer
                raise
            headers: Mapping[str, str] = exc.headers or {}
            return _Reply(exc.status, _reason(exc.body, exc.reason), _retry_after(headers))
        return _Reply(204)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()  # type: ignore[no-untyped-call]


class _V1:
    """``/write`` of the InfluxDB 1.x API, over one reused aiohttp session."""

    def __init__(self, section: InfluxSection) -> None:
        self._section = section
        self._session: aiohttp.ClientSession | None = None
        self._endpoint = section.url.rstrip("/") + "/write"
        self._params = {"db": section.database, "precision": "ns"}
        # Basic authentication, not ?u=&p=: a password in the URL ends up in proxies' access
        # logs and in any error message that quotes the request.
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if section.username or section.password:
            password = section.password.get_secret_value() if section.password else ""
            credentials = f"{section.username or ''}:{password}".encode()
            self._headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        db = f"database {section.database!r}"
        self.hints = {
            401: (
                "the TSDB refuses our credentials",
                "check influx.username and influx.password",
            ),
            403: (
                f"user {section.username!r} may not write to {db}",
                "grant it WRITE, or check influx.username",
            ),
            404: (f"the TSDB has no {db}", "create it, or check influx.database and influx.url"),
        }

    async def send(self, body: bytes) -> _Reply:
        if self._session is None:  # must be made inside the event loop
            timeout = aiohttp.ClientTimeout(total=self._section.timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        headers = self._headers
        if self._section.gzip:
            body = await asyncio.to_thread(gzip.compress, body, _GZIP_LEVEL)
            headers = {**headers, "Content-Encoding": "gzip"}
        async with self._session.post(
            self._endpoint, params=self._params, data=body, headers=headers
        ) as response:
            text = await response.read()
            return _Reply(
                response.status,
                _reason(text, response.reason or ""),
                _retry_after(response.headers),
            )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _reason(body: Any, fallback: str | None) -> str:
    """The TSDB's error text: ``error`` (1.x) or ``message`` (2.x) of a JSON body, or the body."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        text = str(data.get("error") or data.get("message") or text)
    text = _VM_NOISE.sub("", " ".join(text.split())) or (fallback or "")
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _describe(exc: BaseException) -> str:
    # aiohttp's connector errors repeat the whole ConnectionKey; the OS error says it all.
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
