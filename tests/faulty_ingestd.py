"""``ingestd`` with one stage of the message path raising, for the internal-error tests.

    python tests/faulty_ingestd.py STAGE MARKER QUIET run --config FILE

STAGE (quota, gate, rules, latest, spool) raises RuntimeError for the messages of devices
whose name holds MARKER (gate: the Redis quota check of a batch holding one): a bug no real
server can be asked to produce. STAGE ack makes the first PUBACK fail (MARKER unused).
QUIET is the seconds without an internal error after which /healthz is healthy again (five
minutes in production, too long to wait for in a test). The rest of the command line is
ingestd's.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho

from ingestd import daemon, faults
from ingestd.alerts import AlertStage
from ingestd.cli import main
from ingestd.latest import Latest
from ingestd.model import Reading
from ingestd.spool import Spool
from ingestd.throttle import QuotaItem, Throttle


def inject(stage: str, marker: str) -> None:
    def fault(device: str) -> None:
        if marker in device:
            raise RuntimeError(f"injected fault in {stage} for {device}")

    if stage == "quota":
        match = Throttle.match

        def quota(self: Throttle, topic: str, nbytes: int, device: str) -> QuotaItem | None:
            fault(device)
            return match(self, topic, nbytes, device)

        Throttle.match = quota  # type: ignore[method-assign]
    elif stage == "gate":
        allow_batch = Throttle.allow_batch

        async def gate(self: Throttle, items: Sequence[QuotaItem]) -> list[bool]:
            for _, device, _ in items:
                fault(device)
            return await allow_batch(self, items)

        Throttle.allow_batch = gate  # type: ignore[method-assign]
    elif stage == "rules":
        evaluate = AlertStage.evaluate

        def rules(self: AlertStage, readings: Sequence[Reading], *, announce: bool = True) -> None:
            fault(readings[0].device)
            evaluate(self, readings, announce=announce)

        AlertStage.evaluate = rules  # type: ignore[method-assign]
    elif stage == "latest":
        observe = Latest.observe

        def latest(self: Latest, readings: Sequence[Reading]) -> None:
            fault(next(iter(readings)).device)
            observe(self, readings)

        Latest.observe = latest  # type: ignore[method-assign]
    elif stage == "spool":
        append = Spool.append

        def spool(self: Spool, lines: Sequence[bytes], *args: Any) -> None:
            if marker.encode() in lines[0]:  # the device tag (the topic's other levels do not)
                raise RuntimeError(f"injected fault in {stage}")
            append(self, lines, *args)

        Spool.append = spool  # type: ignore[method-assign]
    elif stage == "ack":
        ack = paho.Client.ack
        calls = 0

        def first_fails(self: paho.Client, mid: int, qos: int) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError(f"injected fault in {stage} of message {mid}")
            return ack(self, mid, qos)

        paho.Client.ack = first_fails  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    stage, marker, quiet, *argv = sys.argv[1:]
    inject(stage, marker)
    daemon.InternalErrors = functools.partial(  # type: ignore[misc]
        faults.InternalErrors, quiet=float(quiet)
    )
    sys.exit(main(argv))
