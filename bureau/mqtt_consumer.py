"""The bureau's MQTT consumer: device status, telemetry, events and reported config from bwc/v1/dev/+/...,
the alarms they raise, and commands to devices by MQTT 5 request/response (docs/PROTOCOL.md, "MQTT").

It connects as the client certificate with CN "bureau" (the broker's ACL lets that user read and write all
of bwc/v1/#). Payloads are validated with the models devices build them with (agent/sync/telemetry.py);
a malformed one is logged with its reason, counted and dropped. The topic's device id is the one the broker
authenticated (a device can only publish under its own id), and a payload naming another device is refused.

Storage: `MqttFeedDatabase`, SQLite in its own file (DIR/mqtt.db beside bureau.db): the latest status,
telemetry and reported config per device, the event log (one row per device and ledger seq: a summary sent
twice is stored once) and alarms. Events are a convenience view; the signed ledger over HTTPS is the record.

Threads:
- paho's network thread runs on_message: validate -> one SQLite transaction -> `on_alarm` callbacks. Every
  callback is guarded: an exception is logged and counted, and the loop goes on.
- caller threads run `send_command`: publish the request, then wait (bounded) for the answer that the
  network thread hands over by correlation data.
- queries may run on any thread (one connection behind a lock).

CLI: `python -m bureau.mqtt_consumer status --dir DIR` prints what mqtt.db knows; `... run` runs the consumer.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sqlite3
import ssl
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel

from agent.sync.mqtt import TOPIC_ROOT, device_topic
from agent.sync.telemetry import (
    ID_RE,
    PROTOCOL_VERSION,
    CommandAnswer,
    ConfigReported,
    EventMessage,
    StatusMessage,
    TelemetryMessage,
    message_problem,
)

log = logging.getLogger(__name__)

BUREAU_CLIENT_CN = "bureau"
SUBSCRIBED_LEAVES = ("status", "telemetry", "event", "cmd/resp", "config/reported")
COMMAND_NAME_RE = re.compile(r"^[a-z][a-z_]{0,39}$")
MAX_WAIT_S = 300.0


class CommandTimeout(TimeoutError):
    """No answer arrived in time (device offline, request expired, or the device is busy)."""


class CommandSendError(RuntimeError):
    """The request could not be handed to the broker (not connected)."""


@dataclass(frozen=True)
class Alarm:
    device_id: str
    code: str
    severity: str  # info | warning | critical
    source: str  # "status" (Last Will), "event" (a device alarm record)
    detail: str
    raised_us: int
    event_seq: int | None = None


@dataclass(frozen=True)
class CommandResult:
    device_id: str
    command: str
    ok: bool
    error: str | None
    answer: dict[str, Any]  # the whole cmd/resp payload
    correlation: str  # hex


@dataclass
class _Waiter:
    device_id: str
    done: threading.Event = field(default_factory=threading.Event)
    result: CommandResult | None = None


def now_us() -> int:
    return time.time_ns() // 1000


# --- storage ------------------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS device_status (device_id TEXT PRIMARY KEY, state TEXT NOT NULL, payload TEXT NOT NULL,
    received_us INTEGER NOT NULL, changed_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_telemetry (device_id TEXT PRIMARY KEY, payload TEXT NOT NULL,
    received_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_config (device_id TEXT PRIMARY KEY, payload TEXT NOT NULL,
    received_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS device_events (device_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
    session_id TEXT, wall_us INTEGER NOT NULL, payload TEXT NOT NULL, received_us INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq));
CREATE TABLE IF NOT EXISTS alarms (id INTEGER PRIMARY KEY, device_id TEXT NOT NULL, code TEXT NOT NULL,
    severity TEXT NOT NULL, source TEXT NOT NULL, detail TEXT NOT NULL, event_seq INTEGER,
    raised_us INTEGER NOT NULL, cleared_us INTEGER);
CREATE INDEX IF NOT EXISTS alarms_open ON alarms (device_id, code, cleared_us);
"""


class MqttFeedDatabase:
    """mqtt.db: one connection (WAL) behind a lock; every change is one transaction."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(_SCHEMA)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # --- writes (network thread) ------------------------------------------------------------------

    def put_status(self, device_id: str, state: str, payload: str, received_us: int) -> str | None:
        """Store the latest status; returns the state stored before (None for a new device)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT state FROM device_status WHERE device_id=?", (device_id,)).fetchone()
            previous = row[0] if row else None
            conn.execute("INSERT INTO device_status (device_id, state, payload, received_us, changed_us) "
                         "VALUES (?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET state=excluded.state, "
                         "payload=excluded.payload, received_us=excluded.received_us, changed_us=CASE WHEN "
                         "device_status.state=excluded.state THEN device_status.changed_us ELSE "
                         "excluded.changed_us END", (device_id, state, payload, received_us, received_us))
        return previous

    def put_latest(self, table: str, device_id: str, payload: str, received_us: int) -> None:
        assert table in ("device_telemetry", "device_config")
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO {table} (device_id, payload, received_us) VALUES (?,?,?) "  # noqa: S608
                         "ON CONFLICT(device_id) DO UPDATE SET payload=excluded.payload, "
                         "received_us=excluded.received_us", (device_id, payload, received_us))

    def add_event(self, device_id: str, event: EventMessage, payload: str, received_us: int) -> bool:
        """Store an event summary; False if this device's seq was already stored (a resend)."""
        with self.transaction() as conn:
            cur = conn.execute("INSERT OR IGNORE INTO device_events (device_id, seq, type, session_id, wall_us, "
                               "payload, received_us) VALUES (?,?,?,?,?,?,?)",
                               (device_id, event.seq, event.type, event.session_id, event.wall_us, payload,
                                received_us))
            return cur.rowcount == 1

    def raise_alarm(self, alarm: Alarm) -> bool:
        """Record an alarm unless the same code is already open for the device; True if recorded."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM alarms WHERE device_id=? AND code=? AND cleared_us IS NULL",
                            (alarm.device_id, alarm.code)).fetchone():
                return False
            conn.execute("INSERT INTO alarms (device_id, code, severity, source, detail, event_seq, raised_us) "
                         "VALUES (?,?,?,?,?,?,?)", (alarm.device_id, alarm.code, alarm.severity, alarm.source,
                                                    alarm.detail, alarm.event_seq, alarm.raised_us))
            return True

    def clear_alarms(self, device_id: str, code: str, cleared_us: int) -> int:
        with self.transaction() as conn:
            return conn.execute("UPDATE alarms SET cleared_us=? WHERE device_id=? AND code=? AND cleared_us IS NULL",
                                (cleared_us, device_id, code)).rowcount

    # --- queries (any thread) ---------------------------------------------------------------------

    def _one(self, sql: str, params: tuple) -> tuple | None:
        with self.lock:
            return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def latest_status(self, device_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT payload, received_us FROM device_status WHERE device_id=?", (device_id,))
        return {**json.loads(row[0]), "received_us": row[1]} if row else None

    def latest_telemetry(self, device_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT payload, received_us FROM device_telemetry WHERE device_id=?", (device_id,))
        return {**json.loads(row[0]), "received_us": row[1]} if row else None

    def latest_config(self, device_id: str) -> dict[str, Any] | None:
        row = self._one("SELECT payload, received_us FROM device_config WHERE device_id=?", (device_id,))
        return {**json.loads(row[0]), "received_us": row[1]} if row else None

    def events(self, device_id: str, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._all("SELECT payload FROM device_events WHERE device_id=? AND seq>? ORDER BY seq LIMIT ?",
                         (device_id, after_seq, limit))
        return [json.loads(r[0]) for r in rows]

    def alarms(self, device_id: str | None = None, open_only: bool = False) -> list[dict[str, Any]]:
        sql = "SELECT device_id, code, severity, source, detail, event_seq, raised_us, cleared_us FROM alarms"
        where, params = [], []
        if device_id is not None:
            where.append("device_id=?")
            params.append(device_id)
        if open_only:
            where.append("cleared_us IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        keys = ("device_id", "code", "severity", "source", "detail", "event_seq", "raised_us", "cleared_us")
        return [dict(zip(keys, r, strict=True)) for r in self._all(sql + " ORDER BY id", tuple(params))]

    def devices(self) -> list[str]:
        rows = self._all("SELECT device_id FROM device_status UNION SELECT device_id FROM device_telemetry "
                         "UNION SELECT device_id FROM device_events ORDER BY 1")
        return [r[0] for r in rows]


# --- the consumer -------------------------------------------------------------------------------------------


class MqttConsumer:
    def __init__(self, db: MqttFeedDatabase, host: str, port: int, ssl_context: ssl.SSLContext | None,
                 on_alarm: Callable[[Alarm], None] | None = None, client_id: str | None = None,
                 keepalive: int = 30):
        self.db = db
        self.host, self.port, self.keepalive = host, port, keepalive
        self.on_alarm = on_alarm
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.rejected: Counter[str] = Counter()  # by reason code
        self.recent_rejections: deque[tuple[str, str]] = deque(maxlen=100)  # (topic, reason)
        self.callback_errors = 0
        self.duplicate_events = 0
        self._waiters: dict[bytes, _Waiter] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"{BUREAU_CLIENT_CN}-consumer-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        if ssl_context is not None:
            self.client.tls_set_context(ssl_context)
        self.client.reconnect_delay_set(1, 30)
        self.client.on_connect = self._guard(self._on_connect)
        self.client.on_disconnect = self._guard(self._on_disconnect)
        self.client.on_subscribe = self._guard(self._on_subscribe)
        self.client.on_message = self._guard(self._on_message)

    def _guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:
                self.callback_errors += 1
                log.exception("MQTT consumer callback %s failed; the network loop goes on", fn.__name__)

        return wrapped

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """True once connected and subscribed (retained status arrives right after)."""
        return self.subscribed.wait(timeout_s)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            waiters, self._waiters = list(self._waiters.values()), {}
        for waiter in waiters:
            waiter.done.set()

    # --- commands (caller threads) ----------------------------------------------------------------

    def send_command(self, device_id: str, name: str, args: dict[str, Any] | bytes | None = None, *,
                     timeout_s: float = 10.0, expiry_s: int = 30) -> CommandResult:
        """Send `name` to the device with a fresh correlation id and a Message Expiry of `expiry_s`, and wait
        at most `timeout_s` for its answer. `args` is the JSON object (or, to test a device, raw bytes).
        Raises CommandTimeout, CommandSendError, or ValueError for a bad device id or command name."""
        if not ID_RE.match(device_id):
            raise ValueError(f"device id {device_id!r} is not an id")
        if not COMMAND_NAME_RE.match(name):
            raise ValueError(f"command name {name!r} must match {COMMAND_NAME_RE.pattern}")
        if not 0 < timeout_s <= MAX_WAIT_S or not 1 <= expiry_s <= 86_400:
            raise ValueError(f"timeout_s must be in (0, {MAX_WAIT_S}] and expiry_s in [1, 86400]")
        payload = args if isinstance(args, bytes) else json.dumps(args or {}, separators=(",", ":")).encode()
        correlation = uuid.uuid4().bytes
        waiter = _Waiter(device_id)
        with self._lock:
            self._waiters[correlation] = waiter
        try:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = device_topic(device_id, "cmd/resp")
            props.CorrelationData = correlation
            props.MessageExpiryInterval = expiry_s
            info = self.client.publish(device_topic(device_id, f"cmd/req/{name}"), payload, qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise CommandSendError(f"{name} to {device_id} not sent: {mqtt.error_string(info.rc)}")
            if not waiter.done.wait(timeout_s) or waiter.result is None:
                raise CommandTimeout(f"no answer from {device_id} to {name} within {timeout_s:g} s "
                                     f"(the request expires at the broker after {expiry_s} s)")
            return waiter.result
        finally:
            with self._lock:
                self._waiters.pop(correlation, None)

    def publish_receipt_hint(self, device_id: str, segment_ids: list[str], ledger_head_seq: int | None) -> None:
        """`ack`: tell a device receipts are ready (a hint; it fetches and verifies them over HTTPS)."""
        message = {"v": PROTOCOL_VERSION, "segment_ids": segment_ids, "ledger_head_seq": ledger_head_seq}
        self.client.publish(device_topic(device_id, "ack"), json.dumps(message), qos=1)

    def publish_desired_config(self, device_id: str, config: dict[str, Any], version: int | str) -> None:
        """`config/desired`, retained: the device applies it on receipt and after every reconnect."""
        self.client.publish(device_topic(device_id, "config/desired"),
                            json.dumps({"version": version, "config": config}), qos=1, retain=True)

    # --- network thread -----------------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT consumer: connect refused: %s", reason_code)
            return
        self.connected.set()
        client.subscribe([(f"{TOPIC_ROOT}/+/{leaf}", 1) for leaf in SUBSCRIBED_LEAVES])

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        failed = [rc for rc in reason_codes if rc.is_failure]
        if failed:
            log.error("MQTT consumer: subscription refused: %s", failed)
            return
        self.subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.subscribed.clear()

    def _reject(self, topic: str, code: str, detail: str) -> None:
        self.rejected[code] += 1
        self.recent_rejections.append((topic, f"{code}: {detail}"))
        log.warning("MQTT message on %s rejected (%s): %s", topic, code, detail)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        prefix = TOPIC_ROOT + "/"
        rest = msg.topic[len(prefix):] if msg.topic.startswith(prefix) else ""
        device_id, _, leaf = rest.partition("/")
        if not ID_RE.match(device_id) or leaf not in SUBSCRIBED_LEAVES:
            self._reject(msg.topic, "bad_topic", "not bwc/v1/dev/<device id>/<known leaf>")
            return
        if leaf == "status" and not msg.payload:
            return  # a retained status being cleared
        model = {"status": StatusMessage, "telemetry": TelemetryMessage, "event": EventMessage,
                 "cmd/resp": CommandAnswer, "config/reported": ConfigReported}[leaf]
        problem = message_problem(model, msg.payload)
        if problem:
            self._reject(msg.topic, "malformed", problem)
            return
        message = model.model_validate_json(msg.payload)
        version = getattr(message, "v", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            self._reject(msg.topic, "unsupported_version", f"v={version}; this bureau speaks {PROTOCOL_VERSION}")
            return
        named = getattr(message, "device", None)
        if named is not None and named != device_id:
            self._reject(msg.topic, "wrong_device", f"payload names {named!r} on {device_id!r}'s topic")
            return
        handler = getattr(self, "_handle_" + leaf.replace("/", "_"))
        handler(device_id, message, msg)

    def _handle_status(self, device_id: str, status: BaseModel, msg: mqtt.MQTTMessage) -> None:
        assert isinstance(status, StatusMessage)
        received = now_us()
        previous = self.db.put_status(device_id, status.state, status.model_dump_json(), received)
        if status.state == "online":
            self.db.clear_alarms(device_id, "device_offline", received)
        elif previous != "offline" and status.reason != "shutdown":
            self._alarm(Alarm(device_id, "device_offline", "warning", "status",
                              f"offline: {status.reason or 'no reason given'} (Last Will)", received))

    def _handle_telemetry(self, device_id: str, telemetry: BaseModel, msg: mqtt.MQTTMessage) -> None:
        self.db.put_latest("device_telemetry", device_id, telemetry.model_dump_json(), now_us())

    def _handle_config_reported(self, device_id: str, report: BaseModel, msg: mqtt.MQTTMessage) -> None:
        self.db.put_latest("device_config", device_id, report.model_dump_json(), now_us())

    def _handle_event(self, device_id: str, event: BaseModel, msg: mqtt.MQTTMessage) -> None:
        assert isinstance(event, EventMessage)
        received = now_us()
        code, severity = event.summary.get("code"), event.summary.get("severity")
        if event.type == "alarm" and (not isinstance(code, str) or severity not in ("info", "warning", "critical")):
            self._reject(msg.topic, "malformed", f"alarm event seq {event.seq} without code/severity")
            return
        if not self.db.add_event(device_id, event, event.model_dump_json(), received):
            self.duplicate_events += 1
            return
        if event.type == "alarm":
            assert isinstance(code, str)
            if event.summary.get("cleared") is True:
                self.db.clear_alarms(device_id, code, received)
                return
            self._alarm(Alarm(device_id, code, str(severity), "event", f"device alarm record seq {event.seq}",
                              received, event.seq))

    def _handle_cmd_resp(self, device_id: str, answer: BaseModel, msg: mqtt.MQTTMessage) -> None:
        assert isinstance(answer, CommandAnswer)
        correlation = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        with self._lock:
            waiter = self._waiters.get(correlation) if correlation else None
        if waiter is None or waiter.device_id != device_id:
            self._reject(msg.topic, "unmatched_answer", "no pending request has this correlation data "
                                                        "(answered too late, or not ours)")
            return
        waiter.result = CommandResult(device_id, answer.command, answer.ok, answer.error,
                                      json.loads(msg.payload), bytes(correlation).hex())
        waiter.done.set()

    def _alarm(self, alarm: Alarm) -> None:
        if not self.db.raise_alarm(alarm):
            return
        log.error("ALARM %s %s on %s: %s", alarm.severity, alarm.code, alarm.device_id, alarm.detail)
        if self.on_alarm is not None:
            try:
                self.on_alarm(alarm)
            except Exception:
                self.callback_errors += 1
                log.exception("on_alarm callback failed for %s/%s", alarm.device_id, alarm.code)


# --- CLI ----------------------------------------------------------------------------------------------------


def status_lines(db: MqttFeedDatabase, now: int | None = None) -> list[str]:
    now = now or now_us()
    lines = [f"{'device':20} {'link':8} {'state':12} {'battery':>7} {'min left':>8} {'upload':10} "
             f"{'telemetry age':>13}  open alarms"]
    for device in db.devices():
        status = db.latest_status(device) or {}
        tele = db.latest_telemetry(device) or {}
        alarms = ",".join(a["code"] for a in db.alarms(device, open_only=True)) or "-"
        age = f"{(now - tele['received_us']) / 1e6:.0f} s" if tele else "never"
        battery = tele.get("battery_percent")
        minutes = (tele.get("storage") or {}).get("minutes_left")
        lines.append(f"{device:20} {status.get('state') or '?':8} {status.get('device_state') or '?':12} "
                     f"{'?' if battery is None else str(battery) + '%':>7} {'?' if minutes is None else minutes:>8} "
                     f"{(tele.get('upload') or {}).get('phase', '?'):10} {age:>13}  {alarms}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bureau.mqtt_consumer",
                                     description="The bureau's MQTT consumer (device status, telemetry, events)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="print the latest status, telemetry and open alarms per device")
    p.add_argument("--dir", type=Path, required=True, help="bureau directory (reads DIR/mqtt.db)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("run", help="consume until SIGINT/SIGTERM (or --exit-after)")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--ca", type=Path, required=True, help="CA that issued the broker's certificate")
    p.add_argument("--cert", type=Path, required=True, help=f"client certificate, CN={BUREAU_CLIENT_CN}")
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--exit-after", type=float, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    db_path = Path(args.dir) / "mqtt.db"
    if args.command == "status":
        if not db_path.exists():
            print(f"{db_path}: no MQTT data yet (run the consumer)", file=sys.stderr)
            return 2
        db = MqttFeedDatabase(db_path)
        try:
            if args.json:
                print(json.dumps({d: {"status": db.latest_status(d), "telemetry": db.latest_telemetry(d),
                                      "config": db.latest_config(d), "alarms": db.alarms(d, open_only=True)}
                                  for d in db.devices()}, indent=2))
            else:
                print("\n".join(status_lines(db)))
        finally:
            db.close()
        return 0
    import signal

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(args.ca))
    ctx.load_cert_chain(str(args.cert), str(args.key))
    db = MqttFeedDatabase(db_path)
    consumer = MqttConsumer(db, args.host, args.port, ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    consumer.start()
    stop.wait(args.exit_after)
    consumer.stop()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
