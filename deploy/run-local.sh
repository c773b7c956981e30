#!/usr/bin/env bash
# `make run`: a working local default in one command. Starts a Mosquitto broker and a
# VictoriaMetrics TSDB under ./var (on their own ports, so system copies do not clash),
# ingestd with the shipped example config, and a few simulated sensors. Ctrl-C stops all.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR=${VAR:-$PWD/var}
MQTT_PORT=${MQTT_PORT:-11883}
TSDB_PORT=${TSDB_PORT:-18428}
HTTP_LISTEN=${HTTP_LISTEN:-127.0.0.1:9108}
mkdir -p "$VAR/mosquitto" "$VAR/victoria-metrics" "$VAR/spool"

pids=()
cleanup() {
  # Newest first: ingestd drains to the TSDB before the TSDB and the broker stop.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "run-local: $2 did not start on port $1; see $VAR/$2.log" >&2
  exit 1
}

cat > "$VAR/mosquitto/mosquitto.conf" <<CONF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $VAR/mosquitto/
max_queued_messages 100000
CONF
mosquitto -c "$VAR/mosquitto/mosquitto.conf" >"$VAR/mosquitto.log" 2>&1 &
pids+=($!)
victoria-metrics -storageDataPath="$VAR/victoria-metrics" -httpListenAddr="127.0.0.1:$TSDB_PORT" \
  -retentionPeriod=100y >"$VAR/victoria-metrics.log" 2>&1 &
pids+=($!)
wait_port "$MQTT_PORT" mosquitto
wait_port "$TSDB_PORT" victoria-metrics

export INGESTD_MQTT__URL="mqtt://127.0.0.1:$MQTT_PORT"
export INGESTD_INFLUX__URL="http://127.0.0.1:$TSDB_PORT"
export INGESTD_SPOOL__DIR="$VAR/spool"
export INGESTD_HTTP__LISTEN="$HTTP_LISTEN"
export INGESTD_RULES__DIR="$PWD/rules"
export INGESTD_LOGGING__STATS_INTERVAL=${INGESTD_LOGGING__STATS_INTERVAL:-10s}
.venv/bin/ingestd check --config config/ingestd.yaml

.venv/bin/ingestd simulate --url "$INGESTD_MQTT__URL" --devices 6 --sites 2 --rate 3 \
  >"$VAR/simulate.log" 2>&1 &
pids+=($!)

cat <<MSG
ingestd is starting: broker mqtt://127.0.0.1:$MQTT_PORT, TSDB http://127.0.0.1:$TSDB_PORT,
6 simulated sensors publishing to farm/<site>/<device>/reservoir. Look at:
  curl -s http://$HTTP_LISTEN/healthz
  curl -s http://$HTTP_LISTEN/metrics | grep ^ingestd_
  curl -s 'http://127.0.0.1:$TSDB_PORT/api/v1/export?match[]=reservoir_ph' | tail -n 2
  mosquitto_pub -p $MQTT_PORT -t farm/site1/esp32-x/reservoir -m 'not json'   # a dead letter
  .venv/bin/ingestd deadletters --config config/ingestd.yaml
  mosquitto_sub -p $MQTT_PORT -t 'alerts/#' -v                 # alert events and state
  .venv/bin/ingestd alerts --config config/ingestd.yaml         # firing alerts
Ctrl-C stops everything; data stays under $VAR.
MSG
.venv/bin/ingestd run --config config/ingestd.yaml &
pids+=($!)
wait "${pids[-1]}"
