"""ESP32 reservoir probe for ingestd (MicroPython, umqtt.simple).

Publishes one JSON reading every INTERVAL seconds, at QoS 1, to

    farm/<SITE>/<DEVICE>/reservoir      {"ph": 6.1, "ec": 1.8, "water_temp": 20.5, "time": ...}

logged in to the gateway's broker as DEVICE (the MQTT username IS the device id: the
broker's ACL lets a device publish only under its own topic). Get DEVICE's password with
`sudo ingestd broker add-device DEVICE --site SITE` on the gateway.

Edit the CONFIGURATION block, replace the three read_* functions with your sensor's code,
then copy this file to the board as main.py (see examples/README.md). Keep secrets out of
version control.
"""

import json
import os
import time

import machine
import network
from umqtt.simple import MQTTClient

try:  # not in every firmware build; without it readings are stamped by ingestd on receipt
    import ntptime
except ImportError:
    ntptime = None

# ---- CONFIGURATION ---------------------------------------------------------------------------
WIFI_SSID = "farm-wifi"
WIFI_PASSWORD = "change-me"
BROKER = "gateway.local"  # the farm gateway running Mosquitto (an IP address works too)
PORT = 1883
DEVICE = "esp32-7"  # = MQTT username = the device level of the topic
PASSWORD = "paste the password printed by ingestd broker add-device"
SITE = "greenhouse-1"
MEASUREMENT = "reservoir"
INTERVAL = 30  # seconds between readings
KEEPALIVE = 60  # seconds; the broker drops the connection after 1.5x this without traffic
SOCKET_TIMEOUT = 10  # seconds to wait for the broker (CONNACK, PUBACK) before reconnecting
NTP_HOST = "pool.ntp.org"  # or the gateway, if it serves NTP to the farm network
# -----------------------------------------------------------------------------------------------

TOPIC = f"farm/{SITE}/{DEVICE}/{MEASUREMENT}"
# MicroPython ports count time.time() from 2000-01-01 or from 1970-01-01: find which.
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0
MIN_VALID_YEAR = 2024  # a clock before this was never set (no NTP since power-on)


# ---- SENSOR: replace these three functions with your probe's code ----------------------------
# They return plausible stub values so the example runs on a bare board. For example:
#   pH / EC: an analog probe board on an ADC pin: machine.ADC(machine.Pin(34)), atten 11 dB,
#            then your calibration (two-point for pH with 4.0/7.0 buffers).
#   water temperature: a DS18B20 with onewire + ds18x20 (both in the ESP32 firmware).
# Return None when a reading fails: the field is then left out of the message.
def read_ph():
    """REPLACE: the reservoir's pH (0-14)."""
    return 6.0 + _jitter(0.3)


def read_ec():
    """REPLACE: electrical conductivity in mS/cm."""
    return 1.8 + _jitter(0.2)


def read_water_temp():
    """REPLACE: water temperature in degrees Celsius."""
    return 20.5 + _jitter(1.0)


def _jitter(span):
    """Stub noise in [-span, span]: random numbers from the hardware RNG."""
    return (int.from_bytes(os.urandom(2), "big") % 2001 - 1000) / 1000 * span


# ---- end of SENSOR ---------------------------------------------------------------------------


def log(*parts):
    print(f"[{time.ticks_ms()}]", *parts)


def wifi_connect(wlan, timeout_s=20):
    """Join WIFI_SSID; True once connected."""
    if wlan.isconnected():
        return True
    wlan.active(True)
    log("wifi: connecting to", WIFI_SSID)
    wlan.connect(WIFI_SSID, WIFI_PASSWORD)
    deadline = time.ticks_add(time.ticks_ms(), timeout_s * 1000)
    while not wlan.isconnected():
        if time.ticks_diff(deadline, time.ticks_ms()) <= 0:
            log("wifi: no connection after", timeout_s, "s")
            wlan.disconnect()
            return False
        time.sleep_ms(200)
    log("wifi: connected", wlan.ifconfig()[0])
    return True


def clock_synced():
    return time.gmtime()[0] >= MIN_VALID_YEAR


def sync_clock():
    """Set the RTC from NTP; harmless when it fails (the reading is then sent without time)."""
    if ntptime is None:
        return False
    try:
        ntptime.host = NTP_HOST
        ntptime.settime()  # sets the RTC to UTC
    except (OSError, OverflowError) as exc:
        log("ntp: failed:", exc)
    return clock_synced()


def make_reading():
    """The JSON message: the probe's fields, and "time" (epoch ms) only when the clock is
    known to be right; without it ingestd stamps the reading with its receipt time."""
    reading = {}
    for field, read in (("ph", read_ph), ("ec", read_ec), ("water_temp", read_water_temp)):
        try:
            value = read()
        except Exception as exc:  # a sensor error must not stop the other fields
            log("sensor:", field, "failed:", exc)
            value = None
        if value is not None:
            reading[field] = round(value, 3)
    if reading and clock_synced():
        # Epoch milliseconds (ingestd tells seconds, ms, us and ns apart by magnitude).
        reading["time"] = int((time.time() + EPOCH_OFFSET) * 1000)
    return reading


def mqtt_connect():
    client = MQTTClient(
        DEVICE, BROKER, port=PORT, user=DEVICE, password=PASSWORD, keepalive=KEEPALIVE
    )
    client.connect()  # raises OSError (network) or MQTTException (refused: check credentials)
    client.sock.settimeout(SOCKET_TIMEOUT)  # a dead broker must not block publish() forever
    log("mqtt: connected to", BROKER, "as", DEVICE)
    return client


def close(client):
    """Say goodbye if the connection still works; in any case release the socket."""
    if client is None:
        return
    for step in (client.disconnect, client.sock.close):
        try:
            step()
            return
        except Exception as exc:  # already broken: only the socket needs closing
            log("mqtt: close:", repr(exc))


def run(iterations=None):
    """Publish forever (or ``iterations`` times): reconnecting Wi-Fi and MQTT as needed.

    A reading that fails to publish is sent again after reconnecting (at least once: with a
    "time" field the repeat overwrites the same point in the TSDB).
    """
    wlan = network.WLAN(network.STA_IF)
    client = None
    pending = None
    backoff = 1
    done = 0
    next_at = time.ticks_ms()
    while iterations is None or done < iterations:
        if pending is None:
            wait = time.ticks_diff(next_at, time.ticks_ms())
            if wait > 0:
                time.sleep_ms(wait)
            next_at = time.ticks_add(next_at, INTERVAL * 1000)
        try:
            if not wifi_connect(wlan):
                raise OSError("wifi down")
            if client is None:
                if not clock_synced():
                    sync_clock()
                client = mqtt_connect()
            if pending is None:
                pending = make_reading()
            if pending:
                # QoS 1: returns once the broker's PUBACK came back (or raises).
                client.publish(TOPIC, json.dumps(pending), qos=1)
                log("sent", TOPIC, pending)
            else:
                client.ping()  # every sensor failed: keep the session alive, send nothing
            pending = None
            backoff = 1
            done += 1
        except Exception as exc:  # OSError, MQTTException: reconnect everything from scratch
            log("error:", repr(exc), "- reconnecting in", backoff, "s")
            close(client)
            client = None
            time.sleep(backoff)
            backoff = min(backoff * 2, 60)
    close(client)


def main():
    try:
        run()
    except KeyboardInterrupt:  # Ctrl-C in the REPL (mpremote, Thonny): stop cleanly
        log("stopped")
    except Exception as exc:
        # Anything unexpected: restart the board rather than sit silent in a field.
        log("fatal:", repr(exc), "- resetting")
        time.sleep(5)
        machine.reset()


if __name__ == "__main__":
    main()
