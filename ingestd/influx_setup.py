"""``ingestd influx setup``: the TSDB's bucket or database, keeping data ``retention.tsdb``.

    influx.api   TSDB                what happens
    v2           InfluxDB 2.x/3.x    the bucket is created with an expire rule (BucketsApi),
                                     or its rule is changed when the bucket exists
    v1           InfluxDB 1.x        CREATE DATABASE ... WITH DURATION, or ALTER RETENTION
                                     POLICY on the database's default policy when it exists
    either       VictoriaMetrics     nothing to create: retention is its -retentionPeriod flag

Where the token (or user) may not do it, or the TSDB has no such API, the outcome says why
and carries the exact command an admin should run instead.
"""

from __future__ import annotations

import base64
import re
import shlex
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson
import urllib3
from influxdb_client.client.exceptions import InfluxDBError
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.domain.bucket_retention_rules import BucketRetentionRules
from influxdb_client.domain.patch_retention_rule import PatchRetentionRule
from influxdb_client.rest import ApiException

from ingestd.config import InfluxSection, mask_url
from ingestd.errors import ConfigError

__all__ = ["MIN_RETENTION", "Outcome", "setup"]

MIN_RETENTION = 3600.0
"""InfluxDB 1.x and 2.x refuse a retention shorter than an hour (0, forever, is fine)."""
_VM_MIN_RETENTION = 86400.0
_VM_FOREVER = "100y"  # VictoriaMetrics has no "forever"; 100y is its longest sensible value
_REASON_MAX = 300


@dataclass(frozen=True, slots=True)
class Outcome:
    done: bool
    """True: the bucket/database keeps data as configured now; False: an admin must act."""
    message: str
    commands: tuple[str, ...] = ()
    """What an admin should run (lines starting with ``#`` explain the next one)."""


def setup(section: InfluxSection, retention: float) -> Outcome:
    """Make the TSDB keep data ``retention`` seconds (0: forever), or say who must and how."""
    where = mask_url(section.url)
    try:
        if _is_victoria_metrics(section):
            return _victoria_metrics(where, retention)
        if 0 < retention < MIN_RETENTION:
            raise ConfigError(
                f"retention.tsdb = {_age(retention)}: InfluxDB keeps data at least 1h;"
                " set 0 (forever) or 1h or more"
            )
        if section.api == "v1":
            return _V1(section).setup(retention)
        return _setup_v2(section, retention)
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        return Outcome(False, f"cannot reach the TSDB at {where}: {_reason(str(exc))}")


# --- VictoriaMetrics ----------------------------------------------------------------------


def _is_victoria_metrics(section: InfluxSection) -> bool:
    # VictoriaMetrics answers /api/v1/status/buildinfo (Prometheus' API); InfluxDB has none.
    # Asked first because VictoriaMetrics answers *every* InfluxQL /query with the list of
    # databases, which would pass for a successful CREATE DATABASE.
    status, body = _http(section, "GET", "/api/v1/status/buildinfo")
    if status != 200:
        return False
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and answer.get("status") == "success"


def _victoria_metrics(where: str, retention: float) -> Outcome:
    if retention == 0:
        flag = f"-retentionPeriod={_VM_FOREVER}"
        keep = "forever (VictoriaMetrics has no 'forever': 100y is the longest sensible)"
    else:
        hours = -(-round(retention) // 3600)  # whole hours, rounded up
        if hours * 3600 < _VM_MIN_RETENTION:
            hours = 24
        flag = (
            f"-retentionPeriod={hours // 24}d" if hours % 24 == 0 else f"-retentionPeriod={hours}h"
        )
        keep = _age(retention) + ("" if retention >= _VM_MIN_RETENTION else " (its minimum is 1d)")
    message = (
        f"the TSDB at {where} is VictoriaMetrics: it has no bucket or database to create and"
        f" keeps every series for its -retentionPeriod flag (default 1 month, and it silently"
        f" drops older readings). To keep data {keep} (retention.tsdb), whoever runs it starts"
        f" it with {flag}:"
    )
    return Outcome(
        False,
        message,
        (
            f"victoria-metrics {flag} -storageDataPath=...",
            "# Debian's package: add it to ARGS in /etc/default/victoria-metrics, then",
            "systemctl restart victoria-metrics",
        ),
    )


# --- InfluxDB 2.x: /api/v2/buckets ----------------------------------------------------------


def _setup_v2(section: InfluxSection, retention: float) -> Outcome:
    bucket, org = section.bucket, section.org
    name = f"bucket {bucket!r} of org {org!r}"
    every, keep = round(retention), _age(retention)
    host, keep_flag = shlex.quote(mask_url(section.url)), f"--retention {_influx_age(every)}"
    target = f"--org {shlex.quote(org)} --name {shlex.quote(bucket)}"
    create = f"influx bucket create --host {host} {target} {keep_flag}"
    token = section.token.get_secret_value() if section.token else None
    with InfluxDBClient(
        url=section.url,
        token=token,  # type: ignore[arg-type]  # None (no auth header) is fine
        org=org,
        timeout=round(section.timeout * 1000),
    ) as client:
        api = client.buckets_api()
        try:
            found = api.find_buckets(name=bucket, org=org).buckets or []
        except (ApiException, InfluxDBError) as exc:
            commands = (
                create,
                f"# or, if it exists: BUCKET_ID from influx bucket list --host {host} {target}",
                f"influx bucket update --host {host} --id BUCKET_ID {keep_flag}",
            )
            return _v2_refused(section, exc, f"cannot look up {name}", commands)
        if not found:
            rule = BucketRetentionRules(type="expire", every_seconds=every)  # type: ignore[no-untyped-call]
            try:
                api.create_bucket(bucket_name=bucket, org=org, retention_rules=[rule])
            except (ApiException, InfluxDBError) as exc:
                return _v2_refused(section, exc, f"cannot create {name}", (create,))
            return Outcome(True, f"created {name}, keeping data {keep}")
        current = _v2_every(found[0])
        if current == every:
            return Outcome(True, f"{name} keeps data {keep}: nothing to change")
        # every_seconds 0 is "forever"; an empty rule list would mean "no change" here.
        patch = PatchRetentionRule(type="expire", every_seconds=every)  # type: ignore[no-untyped-call]
        found[0].retention_rules = [patch]
        try:
            api.update_bucket(found[0])
        except (ApiException, InfluxDBError) as exc:
            bucket_id = shlex.quote(str(found[0].id))
            update = f"influx bucket update --host {host} --id {bucket_id} {keep_flag}"
            return _v2_refused(section, exc, f"cannot change the retention of {name}", (update,))
        return Outcome(True, f"{name} now keeps data {keep} (was {_age(current)})")


def _v2_every(bucket: Any) -> int:
    for rule in bucket.retention_rules or ():
        if rule.type == "expire":
            return int(rule.every_seconds or 0)
    return 0


def _v2_refused(
    section: InfluxSection, exc: Exception, what: str, commands: tuple[str, ...]
) -> Outcome:
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    said = _influx2_message(body)  # None: not an InfluxDB 2.x answer
    text = _reason(said or str(body or getattr(exc, "message", None) or exc))
    where = mask_url(section.url)
    if status == 401:
        why = "influx.token is not accepted"
    elif status == 403:
        why = "influx.token may not manage buckets (it needs read and write on buckets)"
    elif status in (400, 404, 405) and said is None:
        why = (
            "it has no bucket API at /api/v2/buckets. InfluxDB 1.x (even 1.8 with its"
            " /api/v2/write) has databases: set influx.api to v1 and run this again"
        )
    elif status == 404:
        why = "check influx.org and influx.bucket"
    else:
        why = ""
    answered = f"answered {status} ({text})" if status else text
    message = f"{what}: the TSDB at {where} {answered}" + (f": {why}" if why else "")
    return Outcome(False, f"{message}. An admin can run:", commands)


def _influx2_message(body: object) -> str | None:
    """``code: message`` from InfluxDB 2.x's JSON error body; None for anything else."""
    try:
        answer = orjson.loads(body) if isinstance(body, str | bytes) else None
    except orjson.JSONDecodeError:
        return None
    if isinstance(answer, dict) and isinstance(answer.get("code"), str):
        return f"{answer['code']}: {answer.get('message', '')}"
    return None


def _influx_age(seconds: int) -> str:
    """The influx CLI's --retention: 0 is infinite."""
    return "0" if seconds == 0 else _unit_age(seconds)


# --- InfluxDB 1.x: InfluxQL over /query ---------------------------------------------------


class _V1:
    def __init__(self, section: InfluxSection) -> None:
        self._section = section
        self._db = _ident(section.database)
        self._name = f"database {section.database!r}"
        parts = urllib.parse.urlsplit(section.url)
        cli = ["influx", "-host", parts.hostname or "127.0.0.1"]
        cli += ["-port", str(parts.port or (443 if parts.scheme == "https" else 8086))]
        if parts.scheme == "https":
            cli.append("-ssl")
        cli += ["-username", "ADMIN"]  # the influx shell asks for the password
        self._cli = shlex.join(cli)

    def setup(self, retention: float) -> Outcome:
        duration = "INF" if retention == 0 else _unit_age(round(retention))
        keep = _age(retention)
        create = f"CREATE DATABASE {self._db} WITH DURATION {duration}"
        status, answer = self._query(f"SHOW RETENTION POLICIES ON {self._db}")
        error = _statement_error(answer)
        if status != 200 or (error and not error.startswith("database not found")):
            alter = f"ALTER RETENTION POLICY {_ident('autogen')} ON {self._db} DURATION {duration}"
            return self._refused(
                status,
                answer,
                f"cannot look up {self._name}",
                (create, "# or, if it exists (autogen: its default policy, if not renamed)", alter),
            )
        if error:  # database not found
            status, answer = self._query(create)
            if status != 200 or _statement_error(answer):
                return self._refused(status, answer, f"cannot create {self._name}", (create,))
            return Outcome(
                True, f"created {self._name}, keeping data {keep} (retention policy autogen)"
            )
        policies = _policies(answer)
        if policies is None:
            return Outcome(
                False,
                f"the TSDB at {mask_url(self._section.url)} answered SHOW RETENTION POLICIES"
                " without any: it does not speak InfluxQL like InfluxDB 1.x; check influx.url"
                " and influx.api",
            )
        default = next((p for p in policies if p["default"]), None)
        if default is None:
            statement = (
                f"CREATE RETENTION POLICY {_ident('autogen')} ON {self._db}"
                f" DURATION {duration} REPLICATION 1 DEFAULT"
            )
            status, answer = self._query(statement)
            if status != 200 or _statement_error(answer):
                return self._refused(
                    status, answer, f"cannot add a policy to {self._name}", (statement,)
                )
            return Outcome(True, f"{self._name} now keeps data {keep} (new default policy autogen)")
        policy = _ident(default["name"])
        current = _go_duration(default["duration"])
        if current == round(retention):
            return Outcome(
                True,
                f"{self._name} keeps data {keep} (retention policy {default['name']}):"
                " nothing to change",
            )
        statement = f"ALTER RETENTION POLICY {policy} ON {self._db} DURATION {duration}"
        shard = _go_duration(default["shardGroupDuration"])
        if retention and retention < shard:
            # InfluxDB refuses a duration below the shard group duration; it would pick
            # this one itself for a new policy of that duration.
            statement += f" SHARD DURATION {_shard_duration(retention)}"
        status, answer = self._query(statement)
        if status != 200 or _statement_error(answer):
            return self._refused(
                status, answer, f"cannot change the retention of {self._name}", (statement,)
            )
        return Outcome(
            True,
            f"{self._name} now keeps data {keep} (retention policy {default['name']},"
            f" was {_age(current)})",
        )

    def _query(self, statement: str) -> tuple[int, Any]:
        body = urllib.parse.urlencode({"q": statement}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        section = self._section
        if section.username:
            password = section.password.get_secret_value() if section.password else ""
            pair = base64.b64encode(f"{section.username}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        status, raw = _http(section, "POST", "/query", body, headers)
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return status, {"error": raw.decode("utf-8", "replace")}

    def _refused(self, status: int, answer: Any, what: str, statements: tuple[str, ...]) -> Outcome:
        text = _reason(_statement_error(answer) or str(answer))
        where = mask_url(self._section.url)
        if status == 401:
            why = "influx.username/influx.password are not accepted"
        elif status == 403 or "requires admin" in text or "not authorized" in text:
            who = self._section.username or "anonymous"
            why = f"user {who!r} may not do this (it takes an admin)"
        else:
            why = "see the TSDB's message"
        commands = tuple(
            s if s.startswith("#") else f"{self._cli} -execute {shlex.quote(s)}" for s in statements
        )
        message = (
            f"{what}: the TSDB at {where} answered {status} ({text}): {why}."
            " An admin can run (the influx shell asks for the password):"
        )
        return Outcome(False, message, commands)


def _statement_error(answer: Any) -> str | None:
    if not isinstance(answer, dict):
        return None
    if isinstance(answer.get("error"), str):
        return str(answer["error"])
    for result in answer.get("results") or ():
        if isinstance(result, dict) and isinstance(result.get("error"), str):
            return str(result["error"])
    return None


def _policies(answer: Any) -> list[dict[str, Any]] | None:
    """The rows of SHOW RETENTION POLICIES as dicts; None when the answer is not that."""
    try:
        series = answer["results"][0]["series"][0]
        columns = series["columns"]
        rows = [dict(zip(columns, values, strict=True)) for values in series["values"]]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    needed = {"name", "duration", "shardGroupDuration", "default"}
    return rows if needed <= set(columns) else None


_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms|us|µs|ns)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def _go_duration(text: str) -> int:
    """Whole seconds of a Go duration as InfluxDB prints it (``720h0m0s``; ``0s``: forever)."""
    return round(sum(float(n) * _GO_UNITS[u] for n, u in _GO_PART.findall(text)))


def _shard_duration(retention: float) -> str:
    """InfluxDB 1.x's own default shard group duration for a policy of this duration."""
    if retention < 2 * 86400:
        return "1h"
    return "1d" if retention <= 182 * 86400 else "7d"


def _ident(name: str) -> str:
    """An InfluxQL identifier, double-quoted."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- shared --------------------------------------------------------------------------------


def _http(
    section: InfluxSection,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request; (status, body), also for 4xx/5xx. OSError when no answer came."""
    url = section.url.rstrip("/") + path
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=section.timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _unit_age(seconds: int) -> str:
    """``30d``, ``36h``, ``90m``, ``45s``: one unit, as InfluxQL and the influx CLI take it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _age(seconds: float) -> str:
    return "forever" if round(seconds) == 0 else _unit_age(round(seconds))


def _reason(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."
