"""The device's MQTT link (paho-mqtt 2.x, MQTT 5, TLS client certificate) under bwc/v1/dev/<device_id>/.

Topics (docs/PROTOCOL.md, "MQTT"):
  status            retained; {"state": "online", ...}; the Last Will sets {"state": "offline"}
  telemetry         battery, storage, temperature, clock offset, upload progress
  event             ledger summaries (type, seq, session) as records are appended
  cmd/req/<name>    commands from the bureau (MQTT 5 request/response: Response Topic + Correlation Data,
                    Message Expiry): sync_now, assign_officer, set_session_context, push_config
  cmd/resp          the answers: {"ok": bool, "error"?: str, ...} with the request's correlation data
  ack               receipt hints (the HTTPS receipt fetch stays authoritative)
  config/desired    config pushed by the bureau; config/reported: what the device runs

Threads: paho's network loop thread runs the callbacks; each callback is wrapped so an exception is logged
and never kills the loop. Outgoing messages go to a persisted outbox (SQLite, separate from the ledger),
and the sender thread publishes them in order whenever the link is up, deleting a row only when the broker
has acknowledged it (QoS 1). Command handlers run on the paho thread and must only post events.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

TOPIC_ROOT = "bwc/v1/dev"
MAX_COMMAND_BYTES = 64 * 1024
COMMANDS = ("sync_now", "assign_officer", "set_session_context", "push_config")


def device_topic(device_id: str, leaf: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{leaf}"


class CommandError(ValueError):
    """A command payload that is not what the protocol allows; answered with ok=false."""


@dataclass
class Command:
    name: str
    args: dict[str, Any]


CommandHandler = Callable[[Command], dict[str, Any] | None]


class Outbox:
    """Messages waiting for the broker's acknowledgement; survives restarts and power cuts."""

    def __init__(self, path: Path, max_rows: int = 10_000):
        self.path = path
        self.max_rows = max_rows
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
                          " payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,"
                          " created REAL NOT NULL)")
        self.dropped = 0

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        with self.lock:
            count = self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            if count >= self.max_rows:  # telemetry is the first to go; the ledger itself is never here
                self.conn.execute("DELETE FROM outbox WHERE id = (SELECT MIN(id) FROM outbox)")
                self.dropped += 1
            self.conn.execute("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?,?,?,?,?)",
                              (topic, payload, qos, int(retain), time.time()))

    def pending(self, limit: int = 50) -> list[tuple[int, str, bytes, int, bool]]:
        with self.lock:
            rows = self.conn.execute("SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?",
                                     (limit,)).fetchall()
        return [(i, t, bytes(p), q, bool(r)) for i, t, p, q, r in rows]

    def done(self, row_id: int) -> None:
        with self.lock:
            self.conn.execute("DELETE FROM outbox WHERE id=?", (row_id,))

    def __len__(self) -> int:
        with self.lock:
            return self.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def parse_command(name: str, payload: bytes) -> Command:
    """Validate a command; raises CommandError naming the problem."""
    if name not in COMMANDS:
        raise CommandError(f"unknown command {name!r}; known: {', '.join(COMMANDS)}")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command payload of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        args = json.loads(payload.decode("utf-8")) if payload else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(args, dict):
        raise CommandError("payload must be a JSON object")
    required = {"assign_officer": {"officer_id"}, "set_session_context": {"category", "stage"},
                "push_config": {"config"}}.get(name, set())
    missing = required - set(args)
    if missing:
        raise CommandError(f"{name}: missing field(s) {', '.join(sorted(missing))}")
    for key, value in args.items():
        if key != "config" and value is not None and not isinstance(value, str | int | bool):
            raise CommandError(f"{name}: field {key!r} must be a string, number or boolean")
    return Command(name, args)


class MqttLink:
    def __init__(self, device_id: str, host: str, port: int, outbox: Outbox, ssl_context: ssl.SSLContext | None,
                 handler: CommandHandler, keepalive: int = 30):
        self.device_id = device_id
        self.host, self.port = host, port
        self.outbox = outbox
        self.handler = handler
        self.connected = threading.Event()
        self.rejected_commands = 0
        self.callback_errors = 0
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                                  protocol=mqtt.MQTTv5)
        if ssl_context is not None:
            self.client.tls_set_context(ssl_context)
        self.client.will_set(self.topic("status"), json.dumps({"state": "offline", "reason": "connection lost"}),
                             qos=1, retain=True)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._guard(self._on_connect)
        self.client.on_disconnect = self._guard(self._on_disconnect)
        self.client.on_message = self._guard(self._on_message)
        self.client.on_publish = self._guard(self._on_publish)
        self.keepalive = keepalive
        self._sender = threading.Thread(target=self._send_loop, name="mqtt-outbox", daemon=True)

    def topic(self, leaf: str) -> str:
        return device_topic(self.device_id, leaf)

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:
                self.callback_errors += 1
                log.exception("MQTT callback %s failed; the network loop goes on", fn.__name__)

        return wrapped

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        self._sender.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.connected.is_set():
            info = self.client.publish(self.topic("status"), json.dumps({"state": "offline", "reason": "shutdown"}),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError) as exc:  # the link died under us: the will says offline anyway
                log.info("final status not sent: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        self._sender.join(5)

    # --- outgoing ---------------------------------------------------------------------------------

    def publish(self, leaf: str, message: dict[str, Any], retain: bool = False, qos: int = 1) -> None:
        """Queue a message in the persisted outbox; it is sent when the link is up."""
        self.outbox.put(self.topic(leaf), json.dumps(message, separators=(",", ":")).encode(), qos, retain)
        self._wake.set()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if not self.connected.is_set():
                continue
            with self._lock:
                busy = set(self._inflight.values())
            for row_id, topic, payload, qos, retain in self.outbox.pending():
                if row_id in busy or not self.connected.is_set():
                    continue
                info = self.client.publish(topic, payload, qos=qos, retain=retain)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                if qos == 0:
                    self.outbox.done(row_id)
                else:
                    with self._lock:
                        self._inflight[info.mid] = row_id

    # --- callbacks (paho thread) ------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        with self._lock:
            self._inflight.clear()  # unacknowledged rows are still in the outbox and go again
        client.subscribe([(self.topic("cmd/req/+"), 1), (self.topic("config/desired"), 1)])
        client.publish(self.topic("status"), json.dumps({"state": "online", "device": self.device_id}), qos=1,
                       retain=True)
        self.connected.set()
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); paho reconnects", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            row_id = self._inflight.pop(mid, None)
        if row_id is not None and not reason_code.is_failure:
            self.outbox.done(row_id)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        prefix = self.topic("cmd/req/")
        if msg.topic == self.topic("config/desired"):
            name = "push_config"
            payload = json.dumps({"config": _json_or_none(msg.payload)}).encode()
        elif msg.topic.startswith(prefix):
            name, payload = msg.topic[len(prefix):], msg.payload
        else:
            log.warning("message on unexpected topic %s ignored", msg.topic)
            return
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        try:
            command = parse_command(name, payload)
            result = self.handler(command) or {}
            answer = {"ok": True, "command": name, **result}
        except CommandError as exc:
            self.rejected_commands += 1
            log.warning("command %s rejected: %s", name, exc)
            answer = {"ok": False, "command": name, "error": str(exc)}
        except Exception as exc:  # a handler bug: answer it, log it, keep the link
            self.callback_errors += 1
            log.exception("command %s failed", name)
            answer = {"ok": False, "command": name, "error": f"internal error: {exc.__class__.__name__}"}
        if response_topic is None:
            return
        if response_topic != self.topic("cmd/resp"):
            log.warning("command %s asked for a response on %s; answering on cmd/resp", name, response_topic)
        out = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            out.CorrelationData = correlation
        out.MessageExpiryInterval = 60
        client.publish(self.topic("cmd/resp"), json.dumps(answer), qos=1, properties=out)


def _json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
