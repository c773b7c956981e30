"""A local HTTP endpoint for an Apprise ``json://`` notification channel that either answers
at once (a healthy neighbour) or reads each request and never answers (one that hangs, as a
stuck webhook or a half-open proxy does)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

HOST = "127.0.0.1"


class Webhook:
    def __init__(self, *, hang: bool) -> None:
        self.hang = hang
        self.requests = 0
        self.answered = 0
        self.lock = threading.Lock()
        self.released = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with hook.lock:
                    hook.requests += 1
                if hook.hang:
                    hook.released.wait()  # until the benchmark closes the endpoint
                    self.close_connection = True
                    return
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                with hook.lock:
                    hook.answered += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the benchmark counts requests; no access log on stderr

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "hook") -> str:
        return f"json://{HOST}:{self.port}/{path}"

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"requests": self.requests, "answered": self.answered}

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Webhook:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
