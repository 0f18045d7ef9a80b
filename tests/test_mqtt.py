"""The device's MQTT link against a real mosquitto with TLS client certificates and per-device ACLs."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.sync.mqtt import CommandError, MqttLink, Outbox, device_topic, parse_command
from agent.sync.tus import client_ssl_context
from tests.broker import Mosquitto
from tests.pki import make_pki

DEV, OTHER = "BWC-TEST-0001", "BWC-TEST-0002"


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class Watcher:
    """A plain paho client with its own certificate, collecting what it receives."""

    def __init__(self, port, pki, cn, topics):
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cn}-watch-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)
        self.c.tls_set_context(client_ssl_context(pki / "ca.crt", pki / f"{cn}.crt", pki / f"{cn}.key"))
        self.c.on_message = lambda c, u, m: self.messages.append(m)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.subscribed.wait(10)

    def on(self, topic):
        return [m for m in self.messages if m.topic == topic]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def rig(tmp_path):
    pki = make_pki(tmp_path / "pki", clients=(DEV, OTHER, "bureau"))
    broker = Mosquitto(tmp_path / "broker", pki)
    commands: list = []

    def handler(cmd):
        commands.append(cmd)
        if cmd.name == "push_config" and not isinstance(cmd.args["config"], dict):
            raise CommandError("config must be an object")
        return {"applied": True}

    outbox = Outbox(tmp_path / "outbox.db")
    ctx = client_ssl_context(pki / "ca.crt", pki / f"{DEV}.crt", pki / f"{DEV}.key")
    link = MqttLink(DEV, "127.0.0.1", broker.port, outbox, ctx, handler, keepalive=5)
    closers = []
    try:
        yield pki, broker, link, commands, outbox, closers
    finally:  # the broker is stopped whatever else fails: no stray mosquitto outlives the test
        try:
            for c in closers:
                c()
            link.stop()
        finally:
            broker.stop()


def test_status_is_retained_with_a_last_will(rig):
    pki, broker, link, *_rest, closers = rig
    link.start()
    assert link.connected.wait(10)
    bureau = Watcher(broker.port, pki, "bureau", [device_topic(DEV, "status")])
    closers.append(bureau.close)
    assert wait_for(lambda: bureau.on(device_topic(DEV, "status")))
    first = bureau.on(device_topic(DEV, "status"))[0]
    assert first.retain and json.loads(first.payload)["state"] == "online"
    # kill the link without a clean disconnect: the broker publishes the will
    link.client._sock_close()  # noqa: SLF001 - simulate the network dropping
    link.client.loop_stop()
    assert wait_for(lambda: any(json.loads(m.payload)["state"] == "offline"
                                for m in bureau.on(device_topic(DEV, "status"))), 20)


def test_commands_get_correlated_responses_and_bad_ones_are_rejected(rig):
    pki, broker, link, commands, _outbox, closers = rig
    link.start()
    assert link.connected.wait(10)
    bureau = Watcher(broker.port, pki, "bureau", [device_topic(DEV, "cmd/resp")])
    closers.append(bureau.close)

    def send(name, payload: bytes, corr: bytes):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = device_topic(DEV, "cmd/resp")
        props.CorrelationData = corr
        props.MessageExpiryInterval = 30
        bureau.c.publish(device_topic(DEV, f"cmd/req/{name}"), payload, qos=1, properties=props)

    send("assign_officer", b'{"officer_id": "OFF-42"}', b"c1")
    send("set_session_context", b"not json", b"c2")
    send("self_destruct", b"{}", b"c3")
    send("push_config", json.dumps({"config": [1, 2]}).encode(), b"c4")
    send("set_session_context", b"[]", b"c5")
    assert wait_for(lambda: len(bureau.on(device_topic(DEV, "cmd/resp"))) == 5)
    answers = {m.properties.CorrelationData: json.loads(m.payload) for m in bureau.on(device_topic(DEV, "cmd/resp"))}
    assert answers[b"c1"]["ok"] and answers[b"c1"]["applied"]
    assert "not UTF-8 JSON" in answers[b"c2"]["error"]
    assert "unknown command" in answers[b"c3"]["error"]
    assert answers[b"c4"] == {"ok": False, "command": "push_config", "error": "config must be an object"}
    assert "JSON object" in answers[b"c5"]["error"]
    assert [c.name for c in commands] == ["assign_officer", "push_config"]
    assert link.connected.is_set() and link.rejected_commands == 4


def test_a_device_cannot_publish_or_listen_on_another_devices_topics(rig):
    pki, broker, link, commands, _outbox, closers = rig
    link.start()
    assert link.connected.wait(10)
    other_watch = Watcher(broker.port, pki, OTHER, [device_topic(DEV, "#")])
    closers.append(other_watch.close)
    intruder = Watcher(broker.port, pki, OTHER, [device_topic(OTHER, "#")])
    closers.append(intruder.close)
    intruder.c.publish(device_topic(DEV, "cmd/req/assign_officer"), b'{"officer_id": "EVIL"}', qos=1)
    intruder.c.publish(device_topic(DEV, "status"), b'{"state": "forged"}', qos=1, retain=True)
    link.publish("telemetry", {"battery": 80})
    time.sleep(1.5)
    assert commands == []
    assert other_watch.messages == []  # it may subscribe, but the ACL delivers nothing of ours
    bureau = Watcher(broker.port, pki, "bureau", [device_topic(DEV, "status")])
    closers.append(bureau.close)
    assert wait_for(lambda: bureau.on(device_topic(DEV, "status")))
    assert all(json.loads(m.payload)["state"] != "forged" for m in bureau.on(device_topic(DEV, "status")))


def test_outbox_survives_broker_restart_and_delivers_in_order(rig):
    pki, broker, link, _c, outbox, closers = rig
    link.start()
    assert link.connected.wait(10)
    broker.stop()
    assert wait_for(lambda: not link.connected.is_set())
    for i in range(20):
        link.publish("telemetry", {"n": i})
    assert len(outbox) == 20
    broker.start()
    bureau = Watcher(broker.port, pki, "bureau", [device_topic(DEV, "telemetry")])
    closers.append(bureau.close)
    assert wait_for(lambda: link.connected.is_set(), 40)
    assert wait_for(lambda: len(bureau.on(device_topic(DEV, "telemetry"))) >= 20, 20)
    bureau_msgs = [json.loads(m.payload)["n"] for m in bureau.on(device_topic(DEV, "telemetry"))]
    assert bureau_msgs[:20] == list(range(20))
    assert wait_for(lambda: len(outbox) == 0)


def test_outbox_persists_across_agent_restarts(tmp_path):
    box = Outbox(tmp_path / "o.db")
    box.put("t", b"1")
    box.put("t", b"2")
    box.close()
    again = Outbox(tmp_path / "o.db")
    assert [p for _i, _t, p, _q, _r in again.pending()] == [b"1", b"2"]


def test_a_handler_that_raises_does_not_kill_the_network_loop(rig):
    pki, broker, link, _c, _o, closers = rig
    link.handler = lambda cmd: 1 / 0
    link.start()
    assert link.connected.wait(10)
    bureau = Watcher(broker.port, pki, "bureau", [device_topic(DEV, "cmd/resp")])
    closers.append(bureau.close)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = device_topic(DEV, "cmd/resp")
    bureau.c.publish(device_topic(DEV, "cmd/req/sync_now"), b"{}", qos=1, properties=props)
    assert wait_for(lambda: bureau.on(device_topic(DEV, "cmd/resp")))
    answer = json.loads(bureau.on(device_topic(DEV, "cmd/resp"))[0].payload)
    assert "internal error: ZeroDivisionError" in answer["error"]
    link.publish("telemetry", {"still": "alive"})
    assert wait_for(lambda: len(link.outbox) == 0)


@pytest.mark.parametrize("name,payload,msg", [
    ("assign_officer", b"{}", "missing field"),
    ("assign_officer", b'{"officer_id": {"x": 1}}', "must be a string"),
    ("sync_now", b"\xff\xfe", "not UTF-8"),
    ("sync_now", b"x" * 70000, "exceeds"),
])
def test_malformed_commands_are_rejected_with_a_reason(name, payload, msg):
    with pytest.raises(CommandError, match=msg):
        parse_command(name, payload)
