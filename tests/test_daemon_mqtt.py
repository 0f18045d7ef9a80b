"""The device daemon on the bureau's MQTT (R20, issue 5): a running Device publishes its status, telemetry
and ledger event summaries, and a bureau command sets the session context through the state machine."""

from __future__ import annotations

import time

from agent.clock import SystemClock
from agent.config import parse_config
from agent.daemon import Credentials, Device
from agent.evidence.age import Identity
from agent.storage.keys import PemFileSigner
from agent.sync.https import client_ssl_context
from bureau.mqtt_consumer import MqttConsumer, MqttFeedDatabase
from hw_sim.scenario import SimulatedHardware
from tests.broker import Mosquitto
from tests.pki import make_pki

DEV = "BWC-MQTT-0001"


def wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    return pred()


def test_running_device_reports_to_the_bureau_and_takes_a_context_command(tmp_path):
    pki = make_pki(tmp_path / "pki", clients=(DEV, "bureau"))
    broker = Mosquitto(tmp_path / "broker", pki)
    signer = PemFileSigner.generate(tmp_path / "keys" / "device-key.pem")
    identity = Identity.generate()
    cfg = parse_config({
        "device": {"id": DEV, "data_dir": str(tmp_path / "data"), "officer_id": "OFF-1"},
        "keys": {"identity_key": str(signer.path), "recipients": [str(identity.recipient)]},
        "recording": {"width": 320, "height": 240, "fps": 15, "bitrate_bps": 250_000, "pre_event_s": 2,
                      "segment_s": 4},
        "sync": {"mqtt_host": "127.0.0.1", "mqtt_port": broker.port, "telemetry_period_s": 2},
    })
    hw = SimulatedHardware(tmp_path / "sim", SystemClock())
    creds = Credentials(signer, [identity.recipient], ca_file=pki / "ca.crt", cert_file=pki / f"{DEV}.crt",
                        key_file=pki / f"{DEV}.key")
    feed = MqttFeedDatabase(tmp_path / "mqtt.db")
    consumer = MqttConsumer(feed, "127.0.0.1", broker.port,
                            client_ssl_context(pki / "ca.crt", pki / "bureau.crt", pki / "bureau.key"))
    consumer.start()
    device = Device(cfg, hw.hardware(), hw.clock, creds)
    try:
        assert consumer.wait_ready(10)
        device.start()
        assert device.mqtt.connected.wait(15)
        status = wait_for(lambda: feed.latest_status(DEV))
        assert status and status["state"] == "online"
        answer = consumer.send_command(DEV, "set_session_context",
                                       {"category": "compulsion", "stage": "compulsory_measures"}, timeout_s=15)
        assert answer.ok, answer
        context = wait_for(lambda: [r for r in device.store.ledger.records(rtype="session_context")])
        assert context[0].fields["body"]["source"] == "bureau" and context[0].fields["body"]["mandatory"]
        events = wait_for(lambda: [e for e in feed.events(DEV) if e.get("type") == "session_context"])
        assert events, feed.events(DEV)
        bad = consumer.send_command(DEV, "set_session_context", {"category": "penalty", "stage": "nap"},
                                    timeout_s=15)
        assert not bad.ok and "unknown enforcement stage" in bad.error
        telemetry = wait_for(lambda: feed.latest_telemetry(DEV))
        assert telemetry is not None
    finally:
        device.stop()
        consumer.stop()
        hw.close()
        broker.stop()
