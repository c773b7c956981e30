"""A TCP proxy that holds every byte back for a fixed time in each direction, so a TSDB on
loopback answers like one across the internet (25 ms each way: a 50 ms round trip).

    .venv/bin/python bench/latency_proxy.py --port 18429 --target 127.0.0.1:8428 [--delay 0.025]

Only latency is added, not a bandwidth limit: each chunk read is written out ``delay`` seconds
after it arrived, in order, however many are on the way. ``LatencyProxy`` runs it as a
subprocess (its own CPU, like a network hop) for the benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
CHUNK = 1 << 16


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction, each chunk ``delay`` seconds after it was read; EOF likewise."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait((loop.time() + delay, b""))
        await delivering
    finally:
        delivering.cancel()


async def _connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    for writer in (client_writer, server_writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        # Each direction ends at its EOF (forwarded after the delay) or a reset.
        await asyncio.gather(
            _pump(client_reader, server_writer, delay),
            _pump(server_reader, client_writer, delay),
            return_exceptions=True,
        )
    except asyncio.CancelledError:
        # The proxy is stopping. Ending quietly: asyncio's stream server would otherwise
        # log the cancellation of every open connection as an error (Python 3.11).
        pass
    finally:
        for writer in (client_writer, server_writer):
            writer.close()


async def serve(port: int, target: tuple[str, int], delay: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _connection(r, w, target, delay), HOST, port, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


class LatencyProxy:
    """The proxy as a subprocess in front of ``target_url`` (``http://host:port``)."""

    def __init__(self, target_url: str, delay: float, port: int) -> None:
        host, _, target_port = target_url.removeprefix("http://").rstrip("/").partition(":")
        self.delay = delay
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                f"--port={port}",
                f"--target={host}:{target_port}",
                f"--delay={delay}",
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C is the benchmark's; it stops the proxy
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"latency proxy did not listen on {HOST}:{port}") from None
                time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help=f"listen on {HOST}:PORT")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, default=0.025, help="seconds, each direction")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, (host, int(port)), args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
