"""The device's MQTT link (paho-mqtt 2.x, MQTT 5, TLS client certificate) under bwc/v1/dev/<device_id>/.

Topics (docs/PROTOCOL.md, "MQTT"):
  status            retained; {"state": "online", ...}; the Last Will sets {"state": "offline"}
  telemetry         battery, storage, temperature, clock offset, upload progress
  event             ledger summaries (type, seq, session) as records are appended
  cmd/req/<name>    commands from the bureau (MQTT 5 request/response: Response Topic + Correlation Data,
                    Message Expiry): sync_now, assign_officer, set_session_context, push_config
  cmd/resp          the answers: {"ok": bool, "error"?: str, ...} with the request's correlation data
  ack               receipt hints (the HTTPS receipt fetch stays authoritative); passed to `on_ack`
  config/desired    config pushed by the bureau; config/reported: what the device runs
Message bodies and the device's periodic publishing: agent/sync/telemetry.py.

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
from collections import OrderedDict
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
ANSWERED_MEMORY = 256  # answers kept by correlation data, to answer a redelivered request without re-running it
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

    def put_batch(self, rows: list[tuple[str, bytes, int, bool]], cursor: tuple[str, int] | None = None) -> None:
        """Queue `rows` (topic, payload, qos, retain) and set the named `cursor` in one transaction: after a
        crash either all of them and the cursor are stored, or none. Never drops rows (callers keep the
        outbox below `max_rows` themselves)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.executemany("INSERT INTO outbox (topic, payload, qos, retain, created) VALUES (?,?,?,?,?)",
                                      [(t, p, q, int(r), time.time()) for t, p, q, r in rows])
                if cursor is not None:
                    self._ensure_cursors()
                    self.conn.execute("INSERT INTO cursors (name, value) VALUES (?, ?) ON CONFLICT(name) "
                                      "DO UPDATE SET value=excluded.value", cursor)
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def cursor(self, name: str) -> int | None:
        """The value last stored with put_batch(cursor=(name, value)), or None."""
        with self.lock:
            self._ensure_cursors()
            row = self.conn.execute("SELECT value FROM cursors WHERE name=?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def _ensure_cursors(self) -> None:
        self.conn.execute("CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")

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
    """`session_expiry_s` > 0 keeps the broker session (subscriptions, queued QoS 1 commands) that long
    across a network cut, so a command sent meanwhile arrives on reconnect unless its Message Expiry ran out.
    Hooks (set before start; run on paho's thread, guarded): `status_fields()` adds members to the retained
    online status sent on every (re)connect; `on_ack(payload)` receives `ack` messages;
    `on_connected()` runs after each (re)connect."""

    def __init__(self, device_id: str, host: str, port: int, outbox: Outbox, ssl_context: ssl.SSLContext | None,
                 handler: CommandHandler, keepalive: int = 30, session_expiry_s: int = 0):
        self.device_id = device_id
        self.session_expiry_s = session_expiry_s
        self.status_fields: Callable[[], dict[str, Any]] | None = None
        self.on_ack: Callable[[bytes], None] | None = None
        self.on_connected: Callable[[], None] | None = None
        self.host, self.port = host, port
        self.outbox = outbox
        self.handler = handler
        self.connected = threading.Event()
        self.rejected_commands = 0
        self.callback_errors = 0
        self.duplicate_commands = 0
        self._answered: OrderedDict[tuple[str, bytes], dict[str, Any]] = OrderedDict()  # paho thread only
        self._inflight: dict[int, tuple[int, mqtt.MQTTMessageInfo]] = {}  # paho mid -> (outbox row id, info)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                                  protocol=mqtt.MQTTv5)
        if ssl_context is not None:
            self.client.tls_set_context(ssl_context)
        self.client.will_set(self.topic("status"), json.dumps({"v": 1, "state": "offline", "device": device_id,
                                                               "reason": "connection lost"}), qos=1, retain=True)
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
        props = None
        if self.session_expiry_s > 0:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive,
                                  clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY, properties=props)
        self.client.loop_start()
        self._sender.start()

    def stop(self, drain_s: float = 2.0) -> None:
        """Stop sending, wait up to `drain_s` for the broker to acknowledge what is in flight (so a clean
        stop does not send those again at the next start), publish the offline status and disconnect.
        Unsent and unacknowledged rows stay in the outbox."""
        self._stop.set()
        self._wake.set()
        if self._sender.is_alive():
            self._sender.join(5)
        deadline = time.monotonic() + drain_s
        while self.connected.is_set() and time.monotonic() < deadline:
            self._reap_acknowledged()
            with self._lock:
                if not self._inflight:
                    break
            time.sleep(0.02)
        if self.connected.is_set():
            info = self.client.publish(self.topic("status"), json.dumps({"v": 1, "state": "offline",
                                                                         "device": self.device_id,
                                                                         "reason": "shutdown"}), qos=1, retain=True)
            try:
                info.wait_for_publish(2)
            except (RuntimeError, ValueError) as exc:  # the link died under us: the will says offline anyway
                log.info("final status not sent: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()

    # --- outgoing ---------------------------------------------------------------------------------

    def publish(self, leaf: str, message: dict[str, Any], retain: bool = False, qos: int = 1) -> None:
        """Queue a message in the persisted outbox; it is sent when the link is up."""
        self.outbox.put(self.topic(leaf), json.dumps(message, separators=(",", ":")).encode(), qos, retain)
        self._wake.set()

    def publish_batch(self, messages: list[tuple[str, dict[str, Any]]], cursor: tuple[str, int] | None = None,
                      qos: int = 1) -> None:
        """Queue (leaf, message) pairs and a cursor atomically (Outbox.put_batch)."""
        rows = [(self.topic(leaf), json.dumps(m, separators=(",", ":")).encode(), qos, False) for leaf, m in messages]
        self.outbox.put_batch(rows, cursor)
        self._wake.set()

    def publish_now(self, leaf: str, message: dict[str, Any], retain: bool = False, qos: int = 1) -> bool:
        """Send a latest-value message (status, telemetry) now if the link is up; not persisted: a sample
        that could not be sent is replaced by the next one. Returns False when not sent."""
        if not self.connected.is_set():
            return False
        info = self.client.publish(self.topic(leaf), json.dumps(message, separators=(",", ":")), qos=qos,
                                   retain=retain)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if not self.connected.is_set():
                continue
            self._reap_acknowledged()
            with self._lock:
                busy = {row_id for row_id, _info in self._inflight.values()}
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
                        self._inflight[info.mid] = (row_id, info)

    def _reap_acknowledged(self) -> None:
        """Mark done the rows whose PUBACK arrived before the sender had registered their mid (then
        _on_publish found nothing to mark); without this they would be sent a second time."""
        with self._lock:
            acked = [mid for mid, (_row, info) in self._inflight.items() if info.is_published()]
            rows = [self._inflight.pop(mid)[0] for mid in acked]
        for row_id in rows:
            self.outbox.done(row_id)

    # --- callbacks (paho thread) ------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        with self._lock:
            self._inflight.clear()  # unacknowledged rows are still in the outbox and go again
        client.subscribe([(self.topic("cmd/req/+"), 1), (self.topic("config/desired"), 1), (self.topic("ack"), 1)])
        status: dict[str, Any] = {"v": 1, "state": "online", "device": self.device_id}
        if self.status_fields is not None:
            try:
                status = {**self.status_fields(), **status}
            except Exception:
                self.callback_errors += 1
                log.exception("status_fields failed; sending the plain online status")
        client.publish(self.topic("status"), json.dumps(status, separators=(",", ":")), qos=1, retain=True)
        self.connected.set()
        self._wake.set()
        if self.on_connected is not None:
            self.on_connected()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("MQTT disconnected (%s); paho reconnects", reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            entry = self._inflight.pop(mid, None)
        row_id = entry[0] if entry is not None else None
        if row_id is not None and not reason_code.is_failure:
            self.outbox.done(row_id)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        prefix = self.topic("cmd/req/")
        if msg.topic == self.topic("ack"):
            if self.on_ack is not None:
                self.on_ack(msg.payload)
            return
        if msg.topic == self.topic("config/desired"):
            if not msg.payload:
                return  # the bureau cleared its retained desired config: nothing to apply
            name = "push_config"
            desired = _json_or_none(msg.payload)
            if not (isinstance(desired, dict) and "config" in desired):
                desired = {"config": desired}  # a bare config document
            payload = json.dumps(desired).encode()
        elif msg.topic.startswith(prefix):
            name, payload = msg.topic[len(prefix):], msg.payload
        else:
            log.warning("message on unexpected topic %s ignored", msg.topic)
            return
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        key = (name, bytes(correlation)) if correlation else None
        if key is not None and key in self._answered:
            # QoS 1 is at-least-once: a request redelivered after a cut is answered again, not run again
            self.duplicate_commands += 1
            log.info("command %s redelivered (same correlation data); repeating the answer", name)
            answer = self._answered[key]
        else:
            answer = self._run_command(name, payload)
            if key is not None:
                self._answered[key] = answer
                while len(self._answered) > ANSWERED_MEMORY:
                    self._answered.popitem(last=False)
        if response_topic is None:
            return
        if response_topic != self.topic("cmd/resp"):
            log.warning("command %s asked for a response on %s; answering on cmd/resp", name, response_topic)
        out = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            out.CorrelationData = correlation
        out.MessageExpiryInterval = 60
        client.publish(self.topic("cmd/resp"), json.dumps(answer), qos=1, properties=out)


    def _run_command(self, name: str, payload: bytes) -> dict[str, Any]:
        try:
            command = parse_command(name, payload)
            result = self.handler(command) or {}
            return {"ok": True, "command": name, **result}
        except CommandError as exc:
            self.rejected_commands += 1
            log.warning("command %s rejected: %s", name, exc)
            return {"ok": False, "command": name, "error": str(exc)}
        except Exception as exc:  # a handler bug: answer it, log it, keep the link
            self.callback_errors += 1
            log.exception("command %s failed", name)
            return {"ok": False, "command": name, "error": f"internal error: {exc.__class__.__name__}"}


def _json_or_none(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
