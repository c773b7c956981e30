#!/usr/bin/env bash
# Install ingestd from this checkout as a systemd service (see deploy/README.md).
#
#   deploy/install.sh [--root DIR] [--no-systemctl] [--python PYTHON]
#
# Idempotent: a second run changes nothing. Config and rule files an admin edited are never
# overwritten: the shipped version is written beside them as FILE.dist.
#   --root DIR        install into DIR instead of / (a staged install, e.g. for tests);
#                     implies offline `systemctl --root DIR enable` unless --no-systemctl
#   --no-systemctl    do not run systemctl (daemon-reload, enable)
#   --python PYTHON   the interpreter for the venv (default: python3, >= 3.11)
set -euo pipefail

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=
SYSTEMCTL=1
PYTHON=${PYTHON:-python3}
USER_NAME=ingestd

usage() { sed -n '2,12s/^# \{0,1\}//p' "$0"; }
while [ $# -gt 0 ]; do
  case $1 in
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --root=*) ROOT=${1#--root=}; shift ;;
    --no-systemctl) SYSTEMCTL=0; shift ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -n "$ROOT" ]; then
  mkdir -p "$ROOT"
  ROOT=$(cd "$ROOT" && pwd)
  [ "$ROOT" = / ] && ROOT=
fi

changed=0
say() { echo "install.sh: $*"; }
did() { changed=1; say "$*"; }

# --- the user ---------------------------------------------------------------------------
# A system user and group `ingestd`, no login, home = the state directory.
if [ -z "$ROOT" ]; then
  if getent passwd "$USER_NAME" >/dev/null; then
    say "user $USER_NAME exists"
  else
    useradd --system --user-group --home-dir /var/lib/ingestd --no-create-home \
      --shell /usr/sbin/nologin --comment "ingestd MQTT ingestion daemon" "$USER_NAME"
    did "created system user and group $USER_NAME"
  fi
elif [ -f "$ROOT/etc/passwd" ] && [ -f "$ROOT/etc/group" ]; then
  # --prefix edits DIR/etc/{passwd,group,shadow} without chrooting (--root would need
  # useradd inside DIR).
  if grep -q "^$USER_NAME:" "$ROOT/etc/passwd"; then
    say "user $USER_NAME exists in $ROOT/etc/passwd"
  else
    useradd --prefix "$ROOT" --system --user-group --home-dir /var/lib/ingestd \
      --no-create-home --shell /usr/sbin/nologin --comment "ingestd MQTT ingestion daemon" \
      "$USER_NAME"
    did "created system user and group $USER_NAME in $ROOT/etc/passwd"
  fi
else
  say "no $ROOT/etc/passwd: not creating user $USER_NAME (the target system needs it:" \
    "useradd --system --user-group --home-dir /var/lib/ingestd --shell /usr/sbin/nologin $USER_NAME)"
fi

# --- the venv -----------------------------------------------------------------------------
OPT=$ROOT/opt/ingestd
VENV=$OPT/venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { echo "install.sh: ingestd needs Python >= 3.11 ($PYTHON)" >&2; exit 1; }
  mkdir -p "$OPT"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  did "created $VENV"
fi
# Install this checkout unless exactly this source is installed already: a stamp of the
# files that make the package. The build runs in a copy, so the checkout stays clean.
files=(pyproject.toml README.md)
while IFS= read -r -d '' f; do files+=("${f#"$SRC"/}"); done < <(
  find "$SRC/ingestd" -type f \( -name '*.py' -o -name '*.sql' -o -name py.typed \) -print0 |
    sort -z
)
stamp=$(cd "$SRC" && sha256sum "${files[@]}" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$OPT/source.sha256" 2>/dev/null)" = "$stamp" ] && [ -x "$VENV/bin/ingestd" ]; then
  say "ingestd in $VENV is up to date"
else
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  (cd "$SRC" && cp --parents "${files[@]}" "$build/")
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
    --upgrade "$build"
  echo "$stamp" >"$OPT/source.sha256"
  cp "$SRC/README.md" "$OPT/README.md"
  did "installed $("$VENV/bin/ingestd" --version) into $VENV"
fi

# `ingestd` on the admin's PATH (status, tail, devices, ...): a link, never a copy.
LINK=$ROOT/usr/local/bin/ingestd
if [ "$(readlink "$LINK" 2>/dev/null)" != /opt/ingestd/venv/bin/ingestd ]; then
  mkdir -p "$(dirname "$LINK")"
  ln -sfn /opt/ingestd/venv/bin/ingestd "$LINK"
  did "linked /usr/local/bin/ingestd -> /opt/ingestd/venv/bin/ingestd"
fi

# --- configuration ------------------------------------------------------------------------
ETC=$ROOT/etc/ingestd
# install_conf SRC DEST MODE: DEST when missing; when DEST differs (the admin edited it),
# keep it and write the shipped version as DEST.dist.
install_conf() {
  local src=$1 dest=$2 mode=$3
  if [ ! -e "$dest" ]; then
    install -m "$mode" "$src" "$dest"
    did "installed ${dest#"$ROOT"}"
  elif cmp -s "$src" "$dest"; then
    :
  elif [ -e "$dest.dist" ] && cmp -s "$src" "$dest.dist"; then
    say "kept your ${dest#"$ROOT"} (shipped version in ${dest#"$ROOT"}.dist)"
  else
    install -m "$mode" "$src" "$dest.dist"
    did "kept your ${dest#"$ROOT"}; the new shipped version is ${dest#"$ROOT"}.dist: compare and merge"
  fi
}
install -d -m 0755 "$ETC" "$ETC/rules"
install_conf "$SRC/config/ingestd.yaml" "$ETC/ingestd.yaml" 0640
for rule in "$SRC"/rules/*.yaml; do
  install_conf "$rule" "$ETC/rules/$(basename "$rule")" 0644
done
if [ ! -e "$ETC/ingestd.env" ]; then
  install -m 0600 /dev/null "$ETC/ingestd.env"
  cat >"$ETC/ingestd.env" <<'ENV'
# Environment for ingestd.service: INGESTD_<SECTION>__<KEY>=value overrides the config file.
# Read by systemd as root (mode 0600). Prefer credentials for secrets (deploy/README.md).
#INGESTD_MQTT__URL=mqtt://ingestd@127.0.0.1:1883
#INGESTD_INFLUX__URL=http://127.0.0.1:8428
#INGESTD_LOGGING__LEVEL=info
ENV
  did "installed /etc/ingestd/ingestd.env (all commented out)"
fi
# Secrets for LoadCredential= (named ingestd.<section>__<key>; deploy/README.md).
if [ ! -d "$ROOT/etc/credstore" ]; then
  install -d -m 0700 "$ROOT/etc/credstore"
  did "created /etc/credstore (0700) for secrets"
fi
if [ -z "$ROOT" ] && getent group "$USER_NAME" >/dev/null; then
  # The daemon reads its config and rules (group ingestd), writes neither.
  for f in "$ETC/ingestd.yaml" "$ETC"/ingestd.yaml.dist; do
    if [ -e "$f" ] && [ "$(stat -c %G "$f")" != "$USER_NAME" ]; then
      chgrp "$USER_NAME" "$f"
      did "group of ${f#"$ROOT"} set to $USER_NAME"
    fi
  done
fi

# --- the units ----------------------------------------------------------------------------
# The daemon, and the daily retention run (ingestd retention apply) with its timer.
UNIT_DIR=$ROOT/etc/systemd/system
install -d -m 0755 "$UNIT_DIR"
for unit in ingestd.service ingestd-retention.service ingestd-retention.timer; do
  if cmp -s "$SRC/deploy/$unit" "$UNIT_DIR/$unit"; then
    say "/etc/systemd/system/$unit is up to date"
  else
    # Ours to replace: local changes belong in drop-ins (systemctl edit UNIT).
    install -m 0644 "$SRC/deploy/$unit" "$UNIT_DIR/$unit"
    did "installed /etc/systemd/system/$unit"
  fi
done

if [ "$SYSTEMCTL" = 1 ]; then
  if [ -n "$ROOT" ]; then
    # Offline: only creates the [Install] symlinks inside ROOT.
    if [ ! -L "$UNIT_DIR/multi-user.target.wants/ingestd.service" ]; then
      systemctl --root="$ROOT" enable ingestd.service
      did "enabled ingestd.service in $ROOT"
    fi
    if [ ! -L "$UNIT_DIR/timers.target.wants/ingestd-retention.timer" ]; then
      systemctl --root="$ROOT" enable ingestd-retention.timer
      did "enabled ingestd-retention.timer in $ROOT"
    fi
  elif [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if ! systemctl is-enabled --quiet ingestd.service; then
      systemctl enable ingestd.service
      did "enabled ingestd.service"
    fi
    # The timer runs from now on (the daemon waits for `systemctl start ingestd`): with no
    # PostgreSQL configured and no dead letters yet, a run deletes nothing.
    if ! systemctl is-enabled --quiet ingestd-retention.timer ||
      ! systemctl is-active --quiet ingestd-retention.timer; then
      systemctl enable --now ingestd-retention.timer
      did "enabled and started ingestd-retention.timer (daily retention)"
    fi
  else
    say "systemd is not running here: run 'systemctl daemon-reload; systemctl enable ingestd;" \
      "systemctl enable --now ingestd-retention.timer' on the booted system"
  fi
fi

[ "$changed" = 1 ] || say "nothing to change"
cat <<NEXT

Next:
  1. Edit ${ROOT}/etc/ingestd/ingestd.yaml (mqtt.url, mqtt.subscriptions, influx.url, ...)
     and the alert rules in ${ROOT}/etc/ingestd/rules/; check them with:
       $VENV/bin/ingestd check --config /etc/ingestd/ingestd.yaml
  2. Put secrets in /etc/credstore/ingestd.<section>__<key> (root, 0600), e.g.
       install -m 0600 /dev/stdin /etc/credstore/ingestd.influx__token <<<"TOKEN"
     (mqtt__password, influx__token, influx__password, redis__password, postgres__password,
     notify__channels), or INGESTD_* variables in /etc/ingestd/ingestd.env.
  3. Start it and look:
       systemctl start ingestd && systemctl status ingestd
       journalctl -u ingestd -f
  Rules reload with: systemctl reload ingestd
  Retention (retention.* in the config) runs daily: systemctl list-timers ingestd-retention
NEXT
