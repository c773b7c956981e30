"""``ingestd broker add-device``: a sensor's broker credentials, and what to flash onto it.

The gateway broker (``mosquitto/``) names each device by its MQTT username: the ACL lets a
user publish only under ``farm/<site>/<username>/...``. Adding a device therefore means one
line in Mosquitto's password file, written by the real ``mosquitto_passwd``, and telling
whoever flashes the sensor its username, password and topic.
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
    "add_device",
    "default_device_pattern",
    "render",
]

DEFAULT_PASSWD = Path("/etc/mosquitto/passwd")
DEFAULT_ACL = Path("/etc/mosquitto/acl")
# Users of the gateway ACL that are not devices: a device by that name would share its
# account (and the operator's "deny" lines would silence it).
ALWAYS_RESERVED = frozenset({"ingestd"})
_TOPIC_LEVEL = re.compile(r"^[^/+#\x00]{1,64}$")
_ACL_USER = re.compile(r"^user\s+(\S.*?)\s*$")


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


def validate(name: str, site: str | None, pattern: str, acl_file: Path | None) -> None:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid device pattern {pattern!r}: {exc}") from None
    if not compiled.search(name):
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
    if name in reserved_names(acl_file):
        where = f" (a user in {acl_file})" if acl_file is not None and acl_file.exists() else ""
        raise UsageError(
            f"invalid device name {name!r}: reserved for a non-device account{where}; "
            "a device with this name would share that account's rights"
        )
    if site is not None and not _TOPIC_LEVEL.match(site):
        raise UsageError(
            f"invalid site {site!r}: one topic level, 1-64 characters, without / + # or NUL"
        )


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
    return DeviceCredentials(
        device=name,
        password=secret,
        host=host,
        port=port,
        site=site,
        password_file=str(password_file),
        created=created,
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
        f"  client id {creds.device}  (any id works; this one is easy to find in the log)\n"
        f"  topic     {creds.topic}{site_note}\n"
        "  QoS       1\n"
        f"  example   {creds.example_topic}  {payload}\n"
        "            (JSON numbers; a time/timestamp/ts key may carry the reading's own time)\n"
        "\n"
        "Try it from the gateway:\n"
        f"  mosquitto_pub -h {creds.host} -p {creds.port} -u {creds.device} -P '<password>' "
        f"-q 1 -t '{creds.example_topic}' -m '{payload}'\n"
    )
