"""The bureau's MQTT consumer against a real mosquitto (TLS, certificate-CN usernames, the production ACL of
docs/PROTOCOL.md) and the device's real MqttLink, DeviceTelemetry and CommandRouter (R20, R23).

The rig here (StrictMosquitto, make_device, Consumer) is also used by tests/test_telemetry.py."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties

from agent.clock import SystemClock
from agent.config import parse_config
from agent.events import SetContext
from agent.sync.mqtt import MqttLink, Outbox, device_topic
from agent.sync.telemetry import (
    CommandRouter,
    DeviceTelemetry,
    RunningConfig,
    SessionContextValue,
    StoreLedgerReader,
)
from agent.sync.tus import client_ssl_context
from bureau.broker import ACL
from bureau.mqtt_consumer import Alarm, CommandTimeout, MqttConsumer, MqttFeedDatabase
from tests.broker import Mosquitto
from tests.conftest import DEVICE_ID as DEV
from tests.pki import make_pki

OTHER = "BWC-TEST-0002"

# The production ACL (docs/PROTOCOL.md "ACL"), as the bureau's broker writes it: a device writes only
# what it reports and reads only what the bureau sends it; the bureau reads and writes everything.
PRODUCTION_ACL = ACL


class StrictMosquitto(Mosquitto):
    def start(self) -> None:
        (self.folder / "acl").write_text(PRODUCTION_ACL)
        super().start()


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.03)
    return False


def ctx_for(pki: Path, cn: str):
    return client_ssl_context(pki / "ca.crt", pki / f"{cn}.crt", pki / f"{cn}.key")


@dataclass
class DeviceSide:
    """A device's MQTT parts as the daemon wires them, with recording callables in place of the daemon."""

    link: MqttLink
    telemetry: DeviceTelemetry
    router: CommandRouter
    outbox: Outbox
    running: RunningConfig
    status: dict[str, Any]
    contexts: list[SetContext] = field(default_factory=list)
    syncs: list[str | None] = field(default_factory=list)
    hints: list[Any] = field(default_factory=list)
    applied: list[tuple[Any, Any]] = field(default_factory=list)

    def start(self) -> None:
        self.link.start()
        assert self.link.connected.wait(10)
        self.telemetry.start()

    def stop(self) -> None:
        self.telemetry.stop()
        self.link.stop()
        self.outbox.close()


def make_device(tmp_path: Path, pki: Path, port: int, store, *, period_s: float = 60.0,
                session_expiry_s: int = 0, outbox_name: str = "outbox.db") -> DeviceSide:
    outbox = Outbox(tmp_path / outbox_name)
    running = RunningConfig(parse_config({"device": {"id": DEV}}))
    status: dict[str, Any] = {
        "state": "READY", "session_id": None, "battery_percent": 87, "temperature_c": 48.5,
        "storage": {"minutes_left": 312.4, "free_bytes": 20_000_000_000, "unreceipted_bytes": 1_000_000,
                    "purgeable_bytes": 0},
        "queue": {"CLOSED": 2, "RECEIPTED": 5}, "clock": {"source": "bureau", "quality": "synced"},
        "last_sync": {"at_wall_us": 1_750_000_000_000_000, "clock_offset_us": -1234},
        "alarms": [], "docked": True,
        "upload": {"phase": "segments", "queued_bytes": 4_000_000, "done_bytes": 1_000_000, "eta_s": 12,
                   "segments_total": 3, "segments_sent": 1, "receipted": 0, "rejected": 0}}
    link = MqttLink(DEV, "127.0.0.1", port, outbox, ctx_for(pki, DEV), handler=lambda c: None, keepalive=5,
                    session_expiry_s=session_expiry_s)
    side: DeviceSide

    def apply_config(cfg, version):
        side.applied.append((cfg, version))
        running.accept(cfg, version)
        return {"applied": "now"}

    def current_context() -> SessionContextValue:
        last = side.contexts[-1] if side.contexts else None
        return SessionContextValue(*(last.officer_id, last.category, last.stage) if last else (None, None, None))

    def sync_now(reason):
        side.syncs.append(reason)
        return {"started": True}

    router = CommandRouter(DEV, sync_now=sync_now, set_context=lambda e: side.contexts.append(e),
                           current_context=current_context, apply_config=apply_config, running_config=running,
                           on_receipt_hint=lambda h: side.hints.append(h))
    router.attach(link)
    telemetry = DeviceTelemetry(link, lambda: status, StoreLedgerReader(store.ledger), SystemClock(),
                                running_config=running, period_s=period_s, software="bwc-agent test")
    side = DeviceSide(link, telemetry, router, outbox, running, status)
    return side


class Consumer:
    """The bureau consumer with its database, started and ready."""

    def __init__(self, tmp_path: Path, pki: Path, port: int, on_alarm=None, name: str = "mqtt.db"):
        self.db = MqttFeedDatabase(tmp_path / name)
        self.alarms: list[Alarm] = []

        def record(alarm: Alarm) -> None:
            self.alarms.append(alarm)
            if on_alarm is not None:
                on_alarm(alarm)

        self.c = MqttConsumer(self.db, "127.0.0.1", port, ctx_for(pki, "bureau"), on_alarm=record)
        self.c.start()
        assert self.c.wait_ready(10)

    def close(self) -> None:
        self.c.stop()
        self.db.close()


class RawClient:
    """A plain paho MQTT 5 client with some certificate, recording the broker's PUBACK reason codes."""

    def __init__(self, pki: Path, port: int, cn: str, subscribe: list[str] | None = None):
        self.acks: dict[int, Any] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.ready = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cn}-raw-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)
        self.c.tls_set_context(ctx_for(pki, cn))
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.__setitem__(mid, rc)
        self.c.on_message = lambda c, u, m: self.messages.append(m)

        def on_connect(c, u, f, rc, p):
            if subscribe:
                c.subscribe([(t, 1) for t in subscribe])
            else:
                self.ready.set()

        self.c.on_connect = on_connect
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(10)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, props: Properties | None = None):
        """Publish at QoS 1 and return the broker's PUBACK reason code."""
        info = self.c.publish(topic, payload, qos=1, retain=retain, properties=props)
        assert wait_for(lambda: info.mid in self.acks)
        return self.acks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def rig(tmp_path, store):
    pki = make_pki(tmp_path / "pki", clients=(DEV, OTHER, "bureau"))
    broker = StrictMosquitto(tmp_path / "broker", pki)
    closers: list = []

    def device(**kw) -> DeviceSide:
        side = make_device(tmp_path, pki, broker.port, store, **kw)
        closers.append(side.stop)
        return side

    def consumer(**kw) -> Consumer:
        con = Consumer(tmp_path, pki, broker.port, **kw)
        closers.append(con.close)
        return con

    def raw(cn: str, subscribe: list[str] | None = None) -> RawClient:
        client = RawClient(pki, broker.port, cn, subscribe)
        closers.append(client.close)
        return client

    yield {"pki": pki, "broker": broker, "store": store, "device": device, "consumer": consumer, "raw": raw}
    for close in reversed(closers):
        try:
            close()
        except Exception as exc:  # noqa: BLE001 - teardown goes on; the broker must stop
            print(f"teardown: {exc}")
    broker.stop()


# --- telemetry, status, events ----------------------------------------------------------------------------


def test_consumer_keeps_the_latest_telemetry_status_and_config_of_each_device(rig):
    bureau = rig["consumer"]()
    dev = rig["device"]()
    dev.start()
    assert wait_for(lambda: bureau.db.latest_telemetry(DEV) is not None)
    tele = bureau.db.latest_telemetry(DEV)
    assert tele["battery_percent"] == 87 and tele["temperature_c"] == 48.5
    assert tele["storage"]["minutes_left"] == 312.4
    assert tele["clock"] == {"source": "bureau", "quality": "synced", "offset_us": -1234,
                             "synced_at_wall_us": 1_750_000_000_000_000}
    assert tele["upload"]["done_bytes"] == 1_000_000 and tele["upload"]["queued_bytes"] == 4_000_000
    assert tele["segments"] == {"CLOSED": 2, "RECEIPTED": 5}
    status = bureau.db.latest_status(DEV)
    assert status["state"] == "online" and status["device_state"] == "READY" and status["docked"] is True
    assert wait_for(lambda: bureau.db.latest_config(DEV) is not None)
    assert bureau.db.latest_config(DEV)["config_sha256"] == dev.running.sha256

    # a change of state is sent as the new retained status at the next period
    dev.status.update(state="RECORDING", session_id="S20250601T080000Z-a1b2c3", docked=False)
    dev.telemetry.poke()
    assert wait_for(lambda: bureau.db.latest_status(DEV)["device_state"] == "RECORDING")
    assert bureau.db.latest_status(DEV)["session_id"] == "S20250601T080000Z-a1b2c3"


def test_status_is_retained_and_a_lost_device_goes_offline_by_its_last_will(rig):
    dev = rig["device"]()
    dev.start()
    dev.telemetry.poke()
    assert wait_for(lambda: dev.telemetry.counters.status_sent >= 1)
    # a consumer that connects later still learns the device's state: the status is retained
    late = rig["consumer"]()
    assert wait_for(lambda: (late.db.latest_status(DEV) or {}).get("device_state") == "READY")

    dev.link.client._sock_close()  # noqa: SLF001 - the network drops; the broker sends the will
    dev.link.client.loop_stop()
    assert wait_for(lambda: late.db.latest_status(DEV)["state"] == "offline", 15)
    assert late.db.latest_status(DEV)["reason"] == "connection lost"
    assert [(a.code, a.severity, a.source) for a in late.alarms] == [("device_offline", "warning", "status")]
    assert late.db.alarms(DEV, open_only=True)[0]["code"] == "device_offline"

    dev.link.client.loop_start()  # the device comes back: the alarm is cleared, not raised twice
    assert wait_for(lambda: late.db.latest_status(DEV)["state"] == "online", 15)
    assert late.db.alarms(DEV, open_only=True) == []
    assert len(late.alarms) == 1


def test_events_arrive_once_each_and_an_upload_overdue_alarm_is_raised_even_if_a_callback_raises(rig):
    def broken_pager(alarm: Alarm) -> None:
        raise RuntimeError("pager service down")

    bureau = rig["consumer"](on_alarm=broken_pager)
    store = rig["store"]
    store.ledger.append("dock", {"dock_id": "DOCK-3", "event": "docked"})
    store.ledger.append("alarm", {"code": "upload_overdue", "severity": "critical",
                                  "detail": "2 segment(s) not receipted by the 23:59 deadline (R20)"})
    dev = rig["device"]()
    dev.start()
    head = store.ledger.head()[0]
    assert wait_for(lambda: len(bureau.db.events(DEV)) == head)
    events = bureau.db.events(DEV)
    assert [e["seq"] for e in events] == list(range(1, head + 1))
    alarm_event = next(e for e in events if e["type"] == "alarm")
    assert alarm_event["summary"] == {"code": "upload_overdue", "severity": "critical", "cleared": False}
    assert [(a.code, a.severity, a.event_seq) for a in bureau.alarms] == [("upload_overdue", "critical",
                                                                          alarm_event["seq"])]
    assert bureau.c.callback_errors == 1  # the pager raised; the consumer logged it and went on

    store.ledger.append("marker", {"session_id": "S20250601T080000Z-a1b2c3", "step": "questioning"})
    dev.telemetry.poke()
    assert wait_for(lambda: len(bureau.db.events(DEV)) == head + 1)
    assert bureau.db.events(DEV)[-1]["summary"] == {"step": "questioning"}
    assert bureau.c.duplicate_events == 0 and bureau.c.connected.is_set()


# --- commands -------------------------------------------------------------------------------------------------


def test_a_command_round_trip_carries_correlation_data_and_message_expiry(rig):
    dev = rig["device"]()
    dev.start()
    bureau = rig["consumer"]()
    spy = rig["raw"]("bureau", [device_topic(DEV, "cmd/#")])

    result = bureau.c.send_command(DEV, "set_session_context",
                                   {"category": "compulsion", "stage": "compulsory_measures", "officer_id": "OFC-0042"},
                                   timeout_s=10, expiry_s=45)
    assert result.ok and result.error is None
    assert result.answer == {"ok": True, "command": "set_session_context", "officer_id": "OFC-0042",
                             "category": "compulsion", "stage": "compulsory_measures", "mandatory": True,
                             "queued": True}
    assert dev.contexts == [SetContext("OFC-0042", "compulsion", "compulsory_measures", source="bureau")]

    assert wait_for(lambda: len(spy.messages) == 2)
    request, response = spy.messages
    assert request.topic == device_topic(DEV, "cmd/req/set_session_context")
    assert request.properties.ResponseTopic == device_topic(DEV, "cmd/resp")
    assert 0 < request.properties.MessageExpiryInterval <= 45
    assert response.topic == device_topic(DEV, "cmd/resp")
    assert response.properties.CorrelationData == request.properties.CorrelationData
    assert response.properties.CorrelationData.hex() == result.correlation
    assert response.properties.MessageExpiryInterval > 0

    # assign_officer keeps the Annex stage just set
    again = bureau.c.send_command(DEV, "assign_officer", {"officer_id": "OFC-0077"})
    assert again.ok and dev.contexts[-1] == SetContext("OFC-0077", "compulsion", "compulsory_measures", "bureau")


def test_a_command_for_an_offline_device_is_delivered_on_reconnect_unless_it_expired(rig):
    dev = rig["device"](session_expiry_s=120)
    dev.start()
    bureau = rig["consumer"]()
    assert bureau.c.send_command(DEV, "sync_now", {"reason": "warm-up"}).ok

    dev.link.client._sock_close()  # noqa: SLF001 - the device drops off the network
    dev.link.client.loop_stop()
    assert wait_for(lambda: bureau.db.latest_status(DEV)["state"] == "offline", 15)
    with pytest.raises(CommandTimeout, match="no answer from BWC-TEST-0001 to sync_now"):
        bureau.c.send_command(DEV, "sync_now", {"reason": "expires"}, timeout_s=0.3, expiry_s=1)
    answers: list = []
    waiter = threading.Thread(target=lambda: answers.append(
        bureau.c.send_command(DEV, "sync_now", {"reason": "kept"}, timeout_s=20, expiry_s=60)))
    waiter.start()
    time.sleep(1.5)  # let the broker's 1 s Message Expiry of the first request run out
    dev.link.client.loop_start()
    waiter.join(25)
    assert answers and answers[0].ok and answers[0].answer["started"] is True
    assert dev.syncs == ["warm-up", "kept"]  # the expired request never reached the device
    assert dev.link.rejected_commands == 0


def test_malformed_commands_are_answered_with_the_problem_and_nothing_is_applied(rig):
    dev = rig["device"]()
    dev.start()
    bureau = rig["consumer"]()
    send = bureau.c.send_command
    cases = [
        (("assign_officer", {"officer_id": "Zhang San"}), "officer_id 'Zhang San' does not match"),
        (("assign_officer", {"officer_id": "OFC-1", "rank": "x"}), "unknown field(s) rank; allowed: officer_id"),
        (("set_session_context", {"category": "penalty", "stage": "seizure"}),
         "unknown enforcement stage penalty/seizure; valid: compulsion/compulsory_measures"),
        (("set_session_context", {"category": "penalty", "stage": None}), "must both be set or both be null"),
        (("push_config", {"config": {"device": {"id": DEV}, "recording": {"pre_event_s": 500}}, "version": 3}),
         "key 'recording.pre_event_s' = 500"),
        (("push_config", {"config": {"device": {"id": DEV}, "recordin": {}}}), "unknown key 'recordin'"),
        (("push_config", {"config": {"device": {"id": OTHER}}}), "cannot change the device identity"),
        (("push_config", {"config": "x = 1"}), "config must be a JSON object"),
        (("sync_now", {"reason": 7}), "reason must be a string"),
        (("sync_now", b"{not json"), "not UTF-8 JSON"),
        (("format_disk", {}), "unknown command 'format_disk'"),
    ]
    for (name, args), problem in cases:
        result = send(DEV, name, args, timeout_s=10)
        assert not result.ok, name
        assert problem in result.error, (name, result.error)
    assert dev.contexts == [] and dev.syncs == [] and dev.applied == []
    assert dev.link.rejected_commands == len(cases) and dev.link.connected.is_set()
    # a rejected push shows in config/reported too (config/desired pushes have nobody to answer to)
    dev.telemetry.poke()
    assert wait_for(lambda: ((bureau.db.latest_config(DEV) or {}).get("last_push") or {}).get("ok") is False)
    assert "config must be a JSON object" in bureau.db.latest_config(DEV)["last_push"]["error"]


def test_a_pushed_config_is_validated_applied_and_reported_with_its_hash_and_version(rig):
    dev = rig["device"]()
    dev.start()
    bureau = rig["consumer"]()
    before = dev.running.sha256
    config = {"device": {"id": DEV, "language": "en"}, "recording": {"pre_event_s": 60}}
    result = bureau.c.send_command(DEV, "push_config", {"config": config, "version": 7})
    assert result.ok and result.answer["version"] == 7 and result.answer["applied"] == "now"
    assert result.answer["config_sha256"] != before
    assert dev.applied[0][0].recording.pre_event_s == 60 and dev.applied[0][1] == 7
    dev.telemetry.poke()
    assert wait_for(lambda: (bureau.db.latest_config(DEV) or {}).get("version") == 7)
    reported = bureau.db.latest_config(DEV)
    assert reported["config_sha256"] == result.answer["config_sha256"] and reported["source"] == "bureau"
    # the same config again (e.g. the retained config/desired after a reconnect) is not applied twice
    handled: list[dict] = []
    router = dev.link.handler
    dev.link.handler = lambda command: handled.append(router(command)) or handled[-1]
    bureau.c.publish_desired_config(DEV, config, 7)
    assert wait_for(lambda: handled)
    assert handled[0]["already_running"] is True and len(dev.applied) == 1


def test_a_receipt_hint_reaches_the_device_callback_and_a_malformed_one_is_dropped(rig):
    dev = rig["device"]()
    dev.start()
    bureau = rig["consumer"]()
    raw = rig["raw"]("bureau")
    raw.publish(device_topic(DEV, "ack"), b'{"v":1,"segment_ids":["../../etc"]}')
    raw.publish(device_topic(DEV, "ack"), b'{"v":1,"segment_ids":"S1-0000"}')
    bureau.c.publish_receipt_hint(DEV, ["S20250601T080000Z-a1b2c3-0000"], 41)
    assert wait_for(lambda: dev.hints)
    assert dev.hints[0].segment_ids == ["S20250601T080000Z-a1b2c3-0000"] and dev.hints[0].ledger_head_seq == 41
    assert dev.router.rejected_hints == 2


# --- bad payloads and the ACL ------------------------------------------------------------------------------


def test_malformed_payloads_are_rejected_with_a_reason_and_the_consumer_goes_on(rig):
    bureau = rig["consumer"]()
    dev = rig["raw"](DEV)  # a device that speaks badly, under its own (authorised) topics
    t = lambda leaf: device_topic(DEV, leaf)  # noqa: E731
    dev.publish(t("telemetry"), b"\xff\xfenot json")
    dev.publish(t("telemetry"), json.dumps({"v": 1, "device": DEV, "at_wall_us": 1, "battery_percent": 150}))
    dev.publish(t("telemetry"), json.dumps({"v": 1, "device": DEV, "at_wall_us": "yesterday"}))
    dev.publish(t("event"), json.dumps({"v": 1, "device": DEV, "type": "alarm", "wall_us": 1}))
    dev.publish(t("event"), json.dumps({"v": 2, "device": DEV, "seq": 1, "type": "boot", "wall_us": 1}))
    dev.publish(t("event"), json.dumps({"v": 1, "device": DEV, "seq": 2, "type": "alarm", "wall_us": 1,
                                        "summary": {"severity": "critical"}}))
    dev.publish(t("status"), json.dumps({"v": 1, "state": "sleeping"}))
    dev.publish(t("telemetry"), b"{" + b" " * 70_000 + b"}")
    dev.publish(t("cmd/resp"), json.dumps({"ok": True, "command": "sync_now"}))
    dev.publish(t("telemetry"), json.dumps({"v": 1, "device": OTHER, "at_wall_us": 1}))
    dev.publish(t("telemetry"), json.dumps({"v": 1, "device": DEV, "at_wall_us": 5, "battery_percent": 64}))
    assert wait_for(lambda: bureau.db.latest_telemetry(DEV) is not None)
    assert wait_for(lambda: sum(bureau.c.rejected.values()) == 10)
    assert bureau.db.latest_telemetry(DEV)["battery_percent"] == 64
    assert bureau.c.rejected == {"malformed": 7, "unsupported_version": 1, "unmatched_answer": 1,
                                 "wrong_device": 1}
    reasons = [r for _t, r in bureau.c.recent_rejections]
    assert any("battery_percent" in r and "less than or equal to 100" in r for r in reasons)
    assert any("seq: Field required" in r for r in reasons)
    assert any("exceeds 65536" in r for r in reasons)
    assert any("without code/severity" in r for r in reasons)
    assert bureau.db.events(DEV) == [] and bureau.db.latest_status(DEV) is None and bureau.alarms == []
    assert bureau.c.callback_errors == 0 and bureau.c.connected.is_set()


def test_a_device_cannot_publish_as_another_device_nor_command_itself(rig):
    bureau = rig["consumer"]()
    dev = rig["device"]()
    dev.start()
    intruder = rig["raw"](OTHER)
    denied = [
        intruder.publish(device_topic(DEV, "telemetry"),
                         json.dumps({"v": 1, "device": DEV, "at_wall_us": 1, "battery_percent": 1})),
        intruder.publish(device_topic(DEV, "status"), json.dumps({"v": 1, "state": "offline"}), retain=True),
        intruder.publish(device_topic(DEV, "event"),
                         json.dumps({"v": 1, "device": DEV, "seq": 999, "type": "alarm", "wall_us": 1,
                                     "summary": {"code": "forged", "severity": "critical"}})),
        intruder.publish(device_topic(DEV, "cmd/req/sync_now"), b"{}"),
        intruder.publish(device_topic(DEV, "ack"), b'{"v":1,"segment_ids":[]}'),
    ]
    # a device may not send itself commands either: only the bureau writes cmd/req, ack, config/desired
    self_cmd = rig["raw"](DEV)
    denied.append(self_cmd.publish(device_topic(DEV, "cmd/req/push_config"), b'{"config":{}}'))
    assert all(rc.is_failure and rc.getName() == "Not authorized" for rc in denied), denied
    assert dev.syncs == [] and dev.applied == [] and dev.hints == []
    assert (bureau.db.latest_status(DEV) or {}).get("state") == "online"
    assert all(e["seq"] != 999 for e in bureau.db.events(DEV)) and bureau.alarms == []
    tele = bureau.db.latest_telemetry(DEV)
    assert tele is None or tele["battery_percent"] == 87


def test_the_bureau_refuses_a_wait_without_bounds_or_a_command_name_that_is_a_topic(rig):
    bureau = rig["consumer"]()
    with pytest.raises(ValueError, match="command name"):
        bureau.c.send_command(DEV, "sync_now/../../x", {})
    with pytest.raises(ValueError, match="timeout_s"):
        bureau.c.send_command(DEV, "sync_now", {}, timeout_s=3600)
    with pytest.raises(ValueError, match="not an id"):
        bureau.c.send_command("+", "sync_now", {})
