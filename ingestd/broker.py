"""``ingestd broker add-device`` and ``add-operator``: broker accounts for the gateway.

The gateway broker (``mosquitto/``) names each device by its MQTT username: the ACL lets a
user publish only under ``farm/<site>/<username>/...``, and the username is also the client
id (``use_username_as_clientid``). Adding a device therefore means one line in Mosquitto's
password file, written by the real ``mosquitto_passwd``, and telling whoever flashes the
sensor its username, password and topic.

An operator is a password and a ``user`` block in the ACL file: read alerts, acknowledge
them on ``alerts/ack/<alert id>/<their name>`` only (ingestd records that name as who
acknowledged), nothing else. ``add-operator`` writes both, so the name in the block's
acknowledgement line can never differ from the account's.
"""

from __future__ import annotations

import grp
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from ingestd.config import Subscription
from ingestd.errors import ConfigError

__all__ = [
    "DEFAULT_ACL",
    "DEFAULT_PASSWD",
    "DeviceCredentials",
    "OperatorCredentials",
    "acl_blocks",
    "add_device",
    "add_operator",
    "default_device_pattern",
    "operator_block",
    "render",
    "render_operator",
]

DEFAULT_PASSWD = Path("/etc/mosquitto/passwd")
DEFAULT_ACL = Path("/etc/mosquitto/acl")
# Users of the gateway ACL that are not devices: a device by that name would share its
# account (and the operator's "deny" lines would silence it). "5" is Homie v5's version
# level: the ACL's homie/%u/# would make a device named 5 the writer of every v5 device.
ALWAYS_RESERVED = frozenset({"ingestd", "5"})
_MAX_LEVEL = 64
# What no topic level may hold: the separator, the wildcards, and control characters (C0,
# DEL, C1), which Mosquitto passes through into topics, log lines and files.
_NOT_IN_A_LEVEL = re.compile(r"[/+#\x00-\x1f\x7f-\x9f]")
_ACL_USER = re.compile(r"^user\s+(\S.*?)\s*$")
OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Operator names: a device id without ':' (the password file's separator)."""


class UsageError(ConfigError):
    """A bad device name, site or file: the command line is wrong (exit 2)."""


@dataclass(frozen=True)
class DeviceCredentials:
    device: str
    password: str
    host: str
    port: int
    site: str | None
    password_file: str
    created: bool
    """True when the password file had no entry for the device before."""

    @property
    def topic(self) -> str:
        return f"farm/{self.site or '<site>'}/{self.device}/<measurement>"

    @property
    def example_topic(self) -> str:
        return f"farm/{self.site or '<site>'}/{self.device}/reservoir"


def default_device_pattern() -> str:
    """The device pattern ingestd's decoder uses unless a subscription sets another."""
    default = Subscription.model_fields["device_pattern"].default
    assert isinstance(default, str)
    return default


def reserved_names(acl_file: Path | None) -> set[str]:
    """``ingestd`` and every ``user`` of the ACL file (operators): never device names."""
    names = set(ALWAYS_RESERVED)
    if acl_file is not None and acl_file.exists():
        for line in acl_file.read_text(errors="replace").splitlines():
            match = _ACL_USER.match(line.strip())
            if match:
                names.add(match.group(1))
    return names


def _level_problem(value: str) -> str | None:
    """Why ``value`` cannot be one topic level (and so a device id or site), or None."""
    if not value or len(value) > _MAX_LEVEL:
        return f"1-{_MAX_LEVEL} characters"
    bad = _NOT_IN_A_LEVEL.search(value)
    if bad:
        return f"no / + # or control characters (it has {bad.group()!r})"
    return None


def validate(name: str, site: str | None, pattern: str, acl_file: Path | None) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid device pattern {pattern!r}: {exc}") from None
    problem = _level_problem(name)
    if problem is not None:
        raise UsageError(
            f"invalid device name {name!r}: it is one topic level and the MQTT username, so"
            f" {problem}"
        )
    # fullmatch: search would take "dev\n" for "^...$" ($ matches before a final newline).
    if not compiled.fullmatch(name):
        raise UsageError(
            f"invalid device name {name!r}: it must match the device pattern {pattern} "
            "(letters, digits and _ . : -, starting with a letter or digit, at most 64), "
            "because ingestd refuses readings from any other device id"
        )
    if ":" in name:
        raise UsageError(
            f"invalid device name {name!r}: ':' is allowed in device ids but not in a "
            "Mosquitto username (the password file separates user and hash with ':')"
        )
    if name == "5":
        raise UsageError(
            "invalid device name '5': reserved, it is Homie v5's version level (homie/5/...);"
            " the ACL's homie/<username>/# would give a device named 5 every v5 device's tree"
        )
    if name in reserved_names(acl_file):
        where = f" (a user in {acl_file})" if acl_file is not None and acl_file.exists() else ""
        raise UsageError(
            f"invalid device name {name!r}: reserved for a non-device account{where}; "
            "a device with this name would share that account's rights"
        )
    if site is not None:
        problem = _level_problem(site)
        if problem is not None:
            raise UsageError(f"invalid site {site!r}: one topic level, {problem}")


def _has_entry(password_file: Path, name: str) -> bool:
    try:
        lines = password_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return False
    return any(line.split(":", 1)[0] == name for line in lines)


def add_device(
    name: str,
    password_file: Path,
    *,
    password: str | None = None,
    site: str | None = None,
    host: str = "gateway.local",
    port: int = 1883,
    pattern: str | None = None,
    acl_file: Path | None = DEFAULT_ACL,
    mosquitto_passwd: str | None = None,
) -> DeviceCredentials:
    """Add or update ``name`` in ``password_file`` with ``mosquitto_passwd -b``.

    A strong random password is generated when none is given. Raises UsageError for a bad
    name or site, OSError when mosquitto_passwd is missing or fails.
    """
    validate(name, site, pattern or default_device_pattern(), acl_file)
    secret, created = _set_password(password_file, name, password, mosquitto_passwd)
    return DeviceCredentials(
        device=name,
        password=secret,
        host=host,
        port=port,
        site=site,
        password_file=str(password_file),
        created=created,
    )


def _set_password(
    password_file: Path, name: str, password: str | None, mosquitto_passwd: str | None
) -> tuple[str, bool]:
    """``name``'s password set with ``mosquitto_passwd -b``: (the password, whether new)."""
    if password is not None and (not password or "\n" in password or "\r" in password):
        raise UsageError("the password must be one non-empty line")
    binary = mosquitto_passwd or shutil.which("mosquitto_passwd")
    if binary is None:
        raise OSError(
            "mosquitto_passwd not found: install the Debian package mosquitto "
            "(apt-get install mosquitto)"
        )
    if not password_file.parent.is_dir():
        raise UsageError(f"{password_file.parent} is not a directory (--passwd {password_file})")
    secret = password if password is not None else secrets.token_urlsafe(24)
    created = not _has_entry(password_file, name)
    # -c creates the file (and would truncate an existing one: only when there is none).
    command = [binary, *(() if password_file.exists() else ("-c",)), "-b"]
    command += [str(password_file), name, secret]
    # The password is on mosquitto_passwd's command line for an instant (visible to `ps` on
    # this machine); mosquitto_passwd has no other non-interactive way to take it.
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"},
    )
    if result.returncode != 0 or not _has_entry(password_file, name):
        detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise OSError(f"mosquitto_passwd could not write {password_file}: {detail}")
    if "-c" in command:
        _restrict(password_file)
    return secret, created


# --- operators ----------------------------------------------------------------------------


def operator_block(name: str) -> str:
    """The ACL ``user`` block of operator ``name`` (as shipped for ``operator``)."""
    return (
        f"user {name}\n"
        "topic deny farm/#\n"
        "topic deny plain/#\n"
        "topic deny lp/#\n"
        "topic deny tele/#\n"
        "topic deny homie/#\n"
        "topic deny ingestd/#\n"
        "topic read alerts/#\n"
        f"topic write alerts/ack/+/{name}\n"
    )


@dataclass(frozen=True)
class OperatorCredentials:
    operator: str
    password: str
    host: str
    port: int
    password_file: str
    acl_file: str
    created: bool
    """True when the password file had no entry for the operator before."""
    acl_added: bool
    """True when the operator's block was added to the ACL file (else it was there)."""


def acl_blocks(text: str) -> dict[str, list[str]]:
    """``user`` -> the lines of its block (comments and blank lines left out)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ACL_USER.match(line)
        if match:
            current = blocks.setdefault(match.group(1), [])
        elif line.startswith("pattern"):
            current = None  # patterns belong to no user
        elif current is not None:
            current.append(" ".join(line.split()))
    return blocks


def add_operator(
    name: str,
    password_file: Path,
    acl_file: Path,
    *,
    password: str | None = None,
    host: str = "gateway.local",
    port: int = 1883,
    mosquitto_passwd: str | None = None,
) -> OperatorCredentials:
    """Add operator ``name``: its ACL block (unless there) and its password.

    Raises UsageError for a bad name, a name that is a device or another kind of account,
    or an ACL block for the name that is not an operator's.
    """
    if not OPERATOR_NAME.fullmatch(name):
        raise UsageError(
            f"invalid operator name {name!r}: letters, digits and _ . -, starting with a"
            " letter or digit, at most 64 (it is the last level of the acknowledgement topic)"
        )
    if name in ALWAYS_RESERVED:
        raise UsageError(f"invalid operator name {name!r}: reserved (ingestd's own, or Homie's)")
    try:
        text = acl_file.read_text()
    except FileNotFoundError:
        raise UsageError(
            f"{acl_file} does not exist (--acl): install mosquitto/acl first"
        ) from None
    blocks = acl_blocks(text)
    wanted = operator_block(name).splitlines()[1:]
    if name in blocks and blocks[name] != wanted:
        raise UsageError(
            f"{acl_file} has a 'user {name}' block that is not an operator's; an operator's"
            f" is:\n{operator_block(name)}"
        )
    if name not in blocks and _has_entry(password_file, name):
        raise UsageError(
            f"{name!r} already has a password in {password_file} but no block in {acl_file}:"
            " a device's account; an operator needs a name of their own"
        )
    added = name not in blocks
    if added:
        _append(
            acl_file,
            text,
            f"\n# operator {name} (ingestd broker add-operator)\n" + operator_block(name),
        )
    secret, created = _set_password(password_file, name, password, mosquitto_passwd)
    return OperatorCredentials(
        operator=name,
        password=secret,
        host=host,
        port=port,
        password_file=str(password_file),
        acl_file=str(acl_file),
        created=created,
        acl_added=added,
    )


def _append(path: Path, text: str, addition: str) -> None:
    """``addition`` after ``text`` in ``path``, replaced at once, mode and owner kept."""
    stat = path.stat()
    tmp = path.with_name(f".{path.name}.tmp")
    body = text if text.endswith("\n") or not text else text + "\n"
    tmp.write_text(body + addition)
    os.chmod(tmp, stat.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(tmp, stat.st_uid, stat.st_gid)
    tmp.replace(path)


def render_operator(creds: OperatorCredentials, *, as_json: bool = False) -> str:
    """The operator's password, and how they follow and acknowledge alerts."""
    name = creds.operator
    ack = (
        f"mosquitto_pub -h {creds.host} -p {creds.port} -u {name} -P '<password>'"
        f" -q 1 -t 'alerts/ack/<alert id>/{name}' -m 'optional note'"
    )
    if as_json:
        data = {**asdict(creds), "ack_topic": f"alerts/ack/<alert id>/{name}", "ack": ack}
        return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n"
    acl = f"block added to {creds.acl_file}" if creds.acl_added else f"already in {creds.acl_file}"
    action = "added to" if creds.created else "updated in"
    return (
        f"operator {name} {action} {creds.password_file}; ACL {acl}\n"
        "  the broker reads them on reload: systemctl reload mosquitto\n"
        "\n"
        f"  username  {name}\n"
        f"  password  {creds.password}\n"
        "\n"
        "Follow alerts:\n"
        f"  ingestd tail --url 'mqtt://{name}:<password>@{creds.host}:{creds.port}'\n"
        f"Acknowledge one (the broker lets {name} acknowledge only as {name}):\n"
        f"  {ack}\n"
    )


def _restrict(password_file: Path) -> None:
    """A new password file: not world-readable (mosquitto_passwd -c makes it 0644), and
    readable by the broker's group when run as root on Debian."""
    password_file.chmod(0o640)
    if os.geteuid() == 0:
        try:
            group = grp.getgrnam("mosquitto").gr_gid
        except KeyError:
            return
        os.chown(password_file, 0, group)


def render(creds: DeviceCredentials, *, as_json: bool = False) -> str:
    """What to flash onto the device: the broker, its credentials, topic and a payload."""
    payload = '{"ph": 6.12, "ec": 1.84, "water_temp": 20.6}'
    if as_json:
        data = {
            **asdict(creds),
            "topic": creds.topic,
            "example_topic": creds.example_topic,
            "qos": 1,
            "client_id": creds.device,
            "example_payload": payload,
        }
        return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n"
    action = "added to" if creds.created else "updated in"
    site_note = "" if creds.site else "   (<site>: the device's site, e.g. greenhouse-1)"
    return (
        f"device {creds.device} {action} {creds.password_file}\n"
        "  the broker reads it on reload: systemctl reload mosquitto\n"
        "\n"
        "Flash onto the device:\n"
        f"  broker    {creds.host}:{creds.port}  (mqtt://; with the TLS listener: mqtts://, "
        "port 8883, certificate CN = the username)\n"
        f"  username  {creds.device}\n"
        f"  password  {creds.password}\n"
        f"  client id {creds.device}  (the gateway broker uses the username whatever is sent;"
        " one connection per device: a second one with these credentials closes the first)\n"
        f"  topic     {creds.topic}{site_note}\n"
        "  QoS       1\n"
        f"  example   {creds.example_topic}  {payload}\n"
        "            (JSON numbers; a time/timestamp/ts key may carry the reading's own time)\n"
        "\n"
        "Try it from the gateway:\n"
        f"  mosquitto_pub -h {creds.host} -p {creds.port} -u {creds.device} -P '<password>' "
        f"-q 1 -t '{creds.example_topic}' -m '{payload}'\n"
    )
