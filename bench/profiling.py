"""Where ingestd's time goes during a benchmark step: py-spy samples the running daemon
(``bench/run.py --profile``), and the folded stacks are summed by ingestd module, by
library and by function.

py-spy is not a dependency of ingestd: ``.venv/bin/pip install py-spy`` to profile.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` attached to ``pid`` until :meth:`stop`; folded stacks to ``path``."""

    def __init__(self, pid: int, path: Path, rate: int = 100) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.path = path
        self.process = subprocess.Popen(
            [
                binary,
                "record",
                f"--pid={pid}",
                "--format=raw",
                f"--output={path}",
                f"--rate={rate}",
                "--nonblocking",  # do not pause the daemon to sample it
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def stop(self) -> dict[str, Any]:
        """Stop sampling (py-spy writes its file on SIGINT) and summarise."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.path.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return {"file": self.path.name} | summarise(self.path.read_text())


def _where(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame ``function (file:line)``."""
    match = FRAME.match(frame)
    return (match["function"], match["file"]) if match else (frame, "")


def _module(file: str) -> str | None:
    """``ingestd/rules/engine.py`` for a file of ingestd, else None. (py-spy shows paths
    relative to their sys.path entry: ``ingestd/spool.py``, ``paho/mqtt/client.py``.)"""
    parts = Path(file).parts
    if "ingestd" in parts and "site-packages" not in parts:
        index = len(parts) - 1 - parts[::-1].index("ingestd")
        return "/".join(parts[index:])
    return None


def _library(file: str) -> str:
    """The package (or standard library module) a frame's file belongs to."""
    parts = Path(file).parts
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif _module(file):
        return "ingestd"
    elif Path(file).is_absolute():
        return Path(file).stem
    return parts[0].removesuffix(".py") if parts else file


def summarise(folded: str, top: int = 15) -> dict[str, Any]:
    """Shares of samples: by innermost ingestd module on the stack (the stage that asked for
    the work), by the library the innermost frame is in, and the top functions (self)."""
    stages: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in folded.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_where(f) for f in stack.split(";")]
        stage = next((m for _, file in reversed(frames) if (m := _module(file))), None)
        if stage in {None, "ingestd/cli.py", "ingestd/__main__.py"}:
            stage = "no ingestd stage (event loop, HTTP, threads)"
        stages[stage] += count
        function, file = frames[-1]
        libraries[_library(file)] += count
        functions[f"{function} ({Path(file).name})"] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "by_ingestd_module_percent": shares(stages) if total else [],
        "by_library_percent": shares(libraries) if total else [],
        "top_functions_percent": shares(functions) if total else [],
    }
