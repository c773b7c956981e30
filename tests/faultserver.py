"""A scriptable HTTP proxy that stands beside a real TSDB and injects the faults it won't.

It forwards ``/api/v2/write`` and ``/write`` to the real upstream unchanged, unless a test
scripted a fault for the next requests: answer a status (with ``Retry-After``), hang, or
drop the connection. A faulted request never reaches the upstream, so whatever lands
there came through a request that was forwarded. Every request is recorded.

It runs its own event loop in a thread, so a test's blocking calls (stopping a server,
polling an export) never stall it, and sync and async tests can both drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web
from services import HOST, free_port

__all__ = ["FaultServer", "Recorded"]

# Hop-by-hop and body-framing headers: aiohttp sets its own for the bytes it sends. The
# request body arrives decompressed, so it goes upstream without its Content-Encoding.
_SKIP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive",
     "content-encoding"}
)  # fmt: skip


@dataclass(frozen=True)
class Recorded:
    """One request as the fault server saw it."""

    received: float
    """time.monotonic() when the whole request had arrived."""
    answered: float | None
    """time.monotonic() when the answer went out; None when it hung or was dropped."""
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    """The body, decompressed (aiohttp undoes ``Content-Encoding`` on receipt)."""
    status: int | None
    """The status answered (injected or the upstream's); None when it hung or was dropped."""
    fault: str | None
    """``status``, ``hang`` or ``drop`` when a fault was injected, None when proxied."""

    @property
    def lines(self) -> list[bytes]:
        return self.body.split(b"\n") if self.body else []


@dataclass
class _Fault:
    kind: str
    remaining: int | None  # None: until cleared
    status: int = 0
    retry_after: str | None = None
    body: bytes = b""
    seconds: float = 0.0


@dataclass
class _State:
    faults: list[_Fault] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)
    arrived: int = 0


class FaultServer:
    """``with FaultServer(vm.url) as fs: fs.respond(503, times=2); ... fs.requests``"""

    def __init__(self, upstream: str, paths: tuple[str, ...] = ("/api/v2/write", "/write")) -> None:
        self.upstream = upstream.rstrip("/")
        self.paths = paths
        """The paths served (faulted or forwarded); any other answers 404."""
        self.port = free_port()
        self._lock = threading.Lock()
        self._state = _State()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- scripting ---------------------------------------------------------------------

    def respond(
        self,
        status: int,
        times: int | None = 1,
        *,
        retry_after: str | None = None,
        body: bytes = b"",
    ) -> None:
        """Answer the next `times` requests (None: until clear()) with `status`."""
        self._add(_Fault("status", times, status=status, retry_after=retry_after, body=body))

    def hang(self, seconds: float, times: int | None = 1) -> None:
        """Hold the next requests `seconds` without answering, then drop the connection."""
        self._add(_Fault("hang", times, seconds=seconds))

    def drop(self, times: int | None = 1) -> None:
        """Close the connection of the next requests without answering."""
        self._add(_Fault("drop", times))

    def clear(self) -> None:
        """Forward everything from now on."""
        with self._lock:
            self._state.faults.clear()

    @property
    def requests(self) -> list[Recorded]:
        """Requests answered, dropped or given up on, in the order they finished."""
        with self._lock:
            return list(self._state.requests)

    @property
    def arrived(self) -> int:
        """Requests received so far, including any still hanging."""
        with self._lock:
            return self._state.arrived

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._state.faults.append(fault)

    def _next_fault(self) -> _Fault | None:
        with self._lock:
            self._state.arrived += 1
            faults = self._state.faults
            if not faults:
                return None
            fault = faults[0]
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    faults.pop(0)
            return fault

    # -- serving -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received = time.monotonic()
        fault = self._next_fault()
        status: int | None = None
        answered: float | None = None
        try:
            if fault is None:
                response = await self._forward(request, body)
            elif fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                ctype = "application/json" if fault.body.startswith(b"{") else "text/plain"
                response = web.Response(
                    status=fault.status, body=fault.body, headers=headers, content_type=ctype
                )
            else:
                if fault.kind == "hang":
                    await asyncio.sleep(fault.seconds)
                assert request.transport is not None
                request.transport.abort()
                # The handler must still return; nothing reaches the closed socket.
                return web.Response(status=599)
            status, answered = response.status, time.monotonic()
            return response
        finally:
            record = Recorded(
                received=received,
                answered=answered,
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=dict(request.headers),
                body=body,
                status=status,
                fault=fault.kind if fault else None,
            )
            with self._lock:
                self._state.requests.append(record)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_HEADERS}
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            data=body,
            headers=headers,
            skip_auto_headers={"Accept-Encoding", "User-Agent", "Content-Type"},
        ) as upstream:
            payload = await upstream.read()
            keep = {
                k: v
                for k, v in upstream.headers.items()
                if k.lower() not in _SKIP_HEADERS | {"date", "server"}
            }
            return web.Response(status=upstream.status, body=payload, headers=keep)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="faultserver", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("fault server did not start within 10 s")
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        for path in self.paths:
            app.router.add_route("*", path, self._handle)
        # handler_cancellation: a client that gave up on a hang frees its handler at once.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        try:
            site = web.TCPSite(runner, HOST, self.port)
            await site.start()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self._session.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already gone
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
