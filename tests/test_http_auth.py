"""The HTTP endpoint's bearer token: who gets in, what stays open for monitoring, how the
commands send it, and the config rule that a non-loopback listener needs one."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from services import free_port, http_request

from ingestd.cli import main
from ingestd.config import HttpSection, LatestSection
from ingestd.health import Health
from ingestd.http import HttpServer
from ingestd.latest import Latest
from ingestd.metrics import Metrics
from ingestd.model import Reading

TOKEN = "correct-horse-battery-staple"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()
T0 = 1_790_000_000_000_000_000


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INGESTD_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


class Served:
    """An HttpServer on its own event loop in a thread, so commands can call it."""

    def __init__(self, section: HttpSection) -> None:
        self.section = section
        self.url = f"http://{section.listen}"
        self.loop = asyncio.new_event_loop()
        self.health = Health(ready=True)
        self.health.ok("spool")
        self.latest = Latest(LatestSection(), Metrics(), self.health)  # memory backend
        self.server = HttpServer(section, self.health, Metrics(), latest=self.latest)

    def call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def get(self, path: str, token: str | None = None, scheme: str = "Bearer") -> Any:
        headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
        return http_request("GET", self.url + path, headers=headers)


@contextmanager
def serving(token_sha256: str | None = TOKEN_SHA256) -> Iterator[Served]:
    served = Served(HttpSection(listen=f"127.0.0.1:{free_port()}", token_sha256=token_sha256))
    thread = threading.Thread(target=served.loop.run_forever, daemon=True)
    thread.start()
    try:
        served.call(served.server.start())
        yield served
    finally:
        served.call(served.server.close())
        served.loop.call_soon_threadsafe(served.loop.stop)
        thread.join(10)
        served.loop.close()


def config_file(tmp_path: Path, served: Served, **http: Any) -> Path:
    path = tmp_path / "ingestd.yaml"
    section = {"listen": served.section.listen, "token_sha256": served.section.token_sha256}
    path.write_text(yaml.safe_dump({"http": {**section, **http}}))
    return path


def test_protected_endpoints_need_the_right_token_and_monitoring_stays_open() -> None:
    with serving() as served:
        for path in ("/alerts", "/quotas", "/latest", "/latest/esp32-7", "/nowhere"):
            for token, scheme in ((None, "Bearer"), ("wrong", "Bearer"), (TOKEN, "Basic")):
                response = served.get(path, token, scheme)
                assert response.status == 401, (path, token, scheme)
                assert "Authorization: Bearer <token>" in response.json()["error"]
            # the hash is what the server keeps; it is not a token
            assert served.get(path, TOKEN_SHA256).status == 401
        assert http_request("POST", served.url + "/alerts/x/ack").status == 401
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(served.url + "/latest", timeout=10)
        with refused.value:
            assert refused.value.headers["WWW-Authenticate"] == 'Bearer realm="ingestd"'

        assert served.get("/alerts", TOKEN).json() == {"firing": []}
        assert served.get("/quotas", TOKEN).json() == {"throttled": []}
        assert served.get("/latest", TOKEN).json() == {"devices": {}}
        assert served.get("/nowhere", TOKEN).status == 404
        for path in ("/metrics", "/healthz", "/readyz"):
            assert served.get(path).status == 200, path
        assert "ingestd_latest_writes_total" in served.get("/metrics").text


def test_without_a_token_configured_everything_is_open() -> None:
    with serving(token_sha256=None) as served:
        assert served.get("/alerts").status == 200
        assert served.get("/latest").json() == {"devices": {}}
        bad = served.get("/quotas?top=x")  # a bad parameter: a 400 that says why, not a 500
        assert bad.status == 400 and "whole number" in bad.json()["error"]


def test_latest_endpoints_answer_from_memory_and_404_names_the_unknown_device() -> None:
    with serving() as served:
        served.latest.observe(
            [Reading("reservoir", "esp32-7", {"site": "g1"}, {"ph": 6.1, "ec": 1.9}, T0)]
        )
        assert served.call(served.latest.flush())
        every = served.get("/latest", TOKEN).json()["devices"]
        assert every["esp32-7"]["reservoir.ph"]["value"] == 6.1
        one = served.get("/latest/esp32-7", TOKEN).json()
        assert one["device"] == "esp32-7" and one["values"] == every["esp32-7"]
        missing = served.get("/latest/esp32-404", TOKEN)
        assert missing.status == 404
        assert "no latest values for device 'esp32-404'" in missing.json()["error"]


def test_commands_send_the_token_from_a_file_or_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving() as served:
        served.latest.observe([Reading("reservoir", "esp32-7", {"site": "g1"}, {"ph": 6.1}, T0)])
        assert served.call(served.latest.flush())
        config = str(config_file(tmp_path, served))
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")

        for command in (["alerts"], ["quotas"], ["latest"]):
            assert main([*command, "--config", config]) == 1
            err = capsys.readouterr().err
            assert "needs a bearer token: pass --token-file FILE or set INGESTD_HTTP_TOKEN" in err
        (tmp_path / "wrong").write_text("wrong")
        assert main(["alerts", "--config", config, "--token-file", str(tmp_path / "wrong")]) == 1
        assert "refused the token given" in capsys.readouterr().err

        assert main(["alerts", "--config", config, "--token-file", str(token_file)]) == 0
        assert "no alert is firing" in capsys.readouterr().out
        assert main(["quotas", "--config", config, "--token-file", str(token_file)]) == 0
        assert "no device is being throttled" in capsys.readouterr().out
        assert main(["latest", "--config", config, "--token-file", str(token_file)]) == 0
        table = capsys.readouterr().out.splitlines()
        header = ["DEVICE", "MEASUREMENT", "FIELD", "VALUE", "TIME", "AGE", "TAGS"]
        row = ["esp32-7", "reservoir", "ph", "6.1", "2026-09-21T14:13:20.000Z"]
        assert table[0].split() == header
        assert table[1].split()[:5] == row
        assert table[1].endswith("site=g1")

        monkeypatch.setenv("INGESTD_HTTP_TOKEN", TOKEN)  # allowed beside the settings
        assert main(["latest", "esp32-7", "--json", "--config", config]) == 0
        answer = orjson.loads(capsys.readouterr().out)
        assert answer["device"] == "esp32-7" and answer["values"]["reservoir.ph"]["value"] == 6.1
        assert main(["latest", "esp32-404", "--config", config]) == 1
        assert "no latest values for device 'esp32-404'" in capsys.readouterr().err
        # ingestd status reads only /healthz and /metrics, open to monitoring
        assert main(["status", "--config", config, "--interval", "0"]) == 0


def test_http_token_prints_a_fresh_token_and_the_config_line_that_accepts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["http", "token"]) == 0
    first = capsys.readouterr().out
    assert main(["http", "token"]) == 0
    second = capsys.readouterr().out
    token = re.search(r"\n\n  (\S+)\n\n", first)
    digest = re.search(r"\n  http:\n    token_sha256: ([0-9a-f]{64})\n", first)
    assert token and digest, first
    assert len(token[1]) >= 40 and token[1] not in second  # random each time
    assert hashlib.sha256(token[1].encode()).hexdigest() == digest[1]
    assert "--token-file" in first and "INGESTD_HTTP_TOKEN" in first

    config = tmp_path / "ingestd.yaml"
    config.write_text(f"http:\n  listen: 0.0.0.0:{free_port()}\n  token_sha256: {digest[1]}\n")
    assert main(["check", "--config", str(config)]) == 0
    with serving(token_sha256=digest[1]) as served:
        assert served.get("/alerts", token[1]).status == 200


def test_listening_beyond_loopback_without_a_token_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text("http:\n  listen: 0.0.0.0:9200\n")
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "http.listen 0.0.0.0:9200 is reachable from other machines" in err
    assert "set http.token_sha256 (ingestd http token makes one)" in err
    config.write_text("http:\n  listen: 127.0.0.1:9200\n")
    assert main(["check", "--config", str(config)]) == 0
