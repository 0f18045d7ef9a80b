"""The device's MQTT telemetry: event summaries from the ledger (R23: codes, not names), exactly once across
restarts, held back in the ledger while the outbox is full; command arguments checked before anything is
done; redelivered requests answered again but not run again. Broker tests use a real mosquitto."""

from __future__ import annotations

import json

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.clock import SystemClock
from agent.config import parse_config
from agent.events import SetContext
from agent.sync.mqtt import Command, CommandError, MqttLink, Outbox, device_topic
from agent.sync.telemetry import (
    EVENTS_CURSOR,
    CommandRouter,
    DeviceTelemetry,
    EventMessage,
    RunningConfig,
    SessionContextValue,
    StoreLedgerReader,
    config_fingerprint,
    message_problem,
    summarise_record,
    telemetry_from_status,
)
from tests.conftest import DEVICE_ID as DEV
from tests.pki import make_pki
from tests.test_bureau_mqtt import OTHER, Consumer, RawClient, StrictMosquitto, make_device, wait_for

SESSION = "S20250601T080000Z-a1b2c3"
SENSITIVE = ("Zhang", "ZHANG", "2025-017", "31.2304", "121.4737", "Room 4")


def append_sensitive_records(ledger) -> None:
    """Records whose bodies carry names, case references and places in their free-text members."""
    ledger.append("session_open", {"session_id": SESSION, "officer_id": "OFC-ZHANG-SAN", "category": "penalty",
                                   "stage": "on_site", "trigger": "button", "pre_event_us": 30_000_000})
    ledger.append("session_context", {"session_id": SESSION, "officer_id": "OFC-ZHANG-SAN", "category": "penalty",
                                      "stage": "on_site", "mandatory": False, "source": "bureau"})
    ledger.append("interruption_start", {"session_id": SESSION, "interruption_id": "I1", "reason": "obstruction",
                                         "source": "officer", "detail": "Zhang Wei blocked the lens, Room 4"})
    ledger.append("alarm", {"code": "upload_overdue", "severity": "critical",
                            "detail": "case 2025-017 at 31.2304,121.4737 not receipted"})
    ledger.append("fault", {"component": "gps", "code": "no_fix", "detail": "last fix 31.2304,121.4737"})
    ledger.append("session_close", {"session_id": SESSION, "outcome": "completed", "stop": "normal"})


def idle_link(tmp_path, name: str = "outbox.db") -> MqttLink:
    """A link that is never started: everything it is given stays in its outbox."""
    return MqttLink(DEV, "127.0.0.1", 9, Outbox(tmp_path / name), None, handler=lambda c: None)


def test_event_summaries_carry_type_seq_session_and_alarm_codes_but_no_names_case_refs_or_places(store):
    append_sensitive_records(store.ledger)
    records = [json.loads(r.data) for r in store.ledger.records()]
    summaries = [summarise_record(r) for r in records]
    wire = json.dumps(summaries)
    for secret in SENSITIVE:
        assert secret not in wire
    assert "officer_id" not in wire and "detail" not in wire
    by_type = {s["type"]: s for s in summaries}
    assert by_type["alarm"]["summary"] == {"code": "upload_overdue", "severity": "critical", "cleared": False}
    assert by_type["interruption_start"]["summary"] == {"interruption_id": "I1", "reason": "obstruction",
                                                        "source": "officer"}
    assert by_type["session_context"]["session_id"] == SESSION
    assert by_type["session_context"]["summary"] == {"category": "penalty", "stage": "on_site", "mandatory": False,
                                                     "source": "bureau"}
    assert [s["seq"] for s in summaries] == [r["seq"] for r in records]
    for s in summaries:  # every summary is what the bureau accepts
        assert message_problem(EventMessage, json.dumps(s).encode()) == "", s


def test_events_are_neither_republished_nor_skipped_across_restarts_and_power_cuts(tmp_path, store):
    pki = make_pki(tmp_path / "pki", clients=(DEV, OTHER, "bureau"))
    broker = StrictMosquitto(tmp_path / "broker", pki)
    bureau = Consumer(tmp_path, pki, broker.port)
    try:
        # run 1: everything so far is published
        dev = make_device(tmp_path, pki, broker.port, store)
        dev.start()
        first_head = store.ledger.head()[0]
        assert wait_for(lambda: len(bureau.db.events(DEV)) == first_head)
        dev.stop()

        # offline: new records are summarised into the outbox, then the power is cut (no clean stop)
        append_sensitive_records(store.ledger)
        offline = idle_link(tmp_path)
        DeviceTelemetry(offline, lambda: {}, StoreLedgerReader(store.ledger), SystemClock()).tick()
        assert offline.outbox.cursor(EVENTS_CURSOR) == store.ledger.head()[0]
        offline.outbox.close()
        store.ledger.append("dock", {"dock_id": "DOCK-3", "event": "docked"})

        # run 2: the queued summaries go out as they are, and only the one record after them is added
        dev = make_device(tmp_path, pki, broker.port, store)
        dev.start()
        head = store.ledger.head()[0]
        assert wait_for(lambda: len(bureau.db.events(DEV)) == head)
        assert dev.telemetry.counters.events_queued == 1
        dev.stop()

        # run 3: nothing new, nothing sent again
        dev = make_device(tmp_path, pki, broker.port, store)
        dev.start()
        assert wait_for(lambda: dev.telemetry.counters.telemetry_sent >= 1)
        assert dev.telemetry.counters.events_queued == 0
        assert wait_for(lambda: bureau.db.latest_status(DEV)["state"] == "online")
        dev.stop()

        assert [e["seq"] for e in bureau.db.events(DEV)] == list(range(1, head + 1))
        # Queued once each (the counters above); QoS 1 delivery is at least once, so a message still in flight
        # at a stop may arrive again after the restart: the bureau keeps it once and counts the duplicate.
        assert bureau.c.duplicate_events <= 2
        assert [a.code for a in bureau.alarms] == ["upload_overdue"]
    finally:
        bureau.close()
        broker.stop()


def test_event_summaries_wait_in_the_ledger_while_the_outbox_is_over_its_high_water_mark(tmp_path, store):
    for i in range(12):
        store.ledger.append("marker", {"session_id": SESSION, "step": "general" if i % 2 else "questioning"})
    link = idle_link(tmp_path)
    telemetry = DeviceTelemetry(link, lambda: {}, StoreLedgerReader(store.ledger), SystemClock(),
                                outbox_high_water=5)
    telemetry.tick()
    assert len(link.outbox) == 5 and link.outbox.cursor(EVENTS_CURSOR) == 5
    telemetry.tick()
    assert len(link.outbox) == 5 and telemetry.counters.events_deferred >= 1  # nothing dropped, nothing lost
    for row_id, *_rest in link.outbox.pending()[:3]:  # the broker acknowledged three
        link.outbox.done(row_id)
    telemetry.tick()
    assert link.outbox.cursor(EVENTS_CURSOR) == 8
    seqs = [json.loads(p)["seq"] for _i, _t, p, _q, _r in link.outbox.pending()]
    assert seqs == [4, 5, 6, 7, 8]
    assert link.outbox.dropped == 0


def test_a_broken_status_snapshot_gives_nulls_and_a_raising_one_does_not_end_telemetry(tmp_path, store):
    message = telemetry_from_status(DEV, {"battery_percent": "87", "temperature_c": 900.0,
                                          "storage": {"minutes_left": -3, "free_bytes": True},
                                          "upload": {"queued_bytes": -1, "phase": 5}, "queue": {"CLOSED": "2"},
                                          "clock": {"quality": "excellent"}, "last_sync": [1]}, 1)
    assert message["battery_percent"] is None and message["temperature_c"] is None
    assert message["storage"]["minutes_left"] is None and message["storage"]["free_bytes"] is None
    assert message["upload"]["queued_bytes"] == 0 and message["upload"]["phase"] == "idle"
    assert message["segments"] == {} and message["clock"]["quality"] is None

    calls = []

    def flaky_status():
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("status.json vanished")
        return {"state": "READY"}

    link = idle_link(tmp_path)
    telemetry = DeviceTelemetry(link, flaky_status, StoreLedgerReader(store.ledger), SystemClock(), period_s=0.02)
    telemetry.start()
    try:
        assert wait_for(lambda: telemetry.counters.telemetry_skipped_offline >= 1)
    finally:
        telemetry.stop()
    assert telemetry.counters.sample_errors == 2
    assert telemetry.status_fields()["device_state"] == "READY"


# --- commands without a broker ------------------------------------------------------------------------------


@pytest.fixture
def router():
    contexts: list[SetContext] = []
    running = RunningConfig(parse_config({"device": {"id": DEV}}))
    r = CommandRouter(DEV, sync_now=lambda reason: {"started": True}, set_context=contexts.append,
                      current_context=lambda: SessionContextValue("OFC-1", "compulsion", "sealed_property"),
                      apply_config=lambda cfg, version: None, running_config=running)
    r.contexts = contexts  # type: ignore[attr-defined]
    return r


def test_assigning_no_officer_clears_the_officer_and_keeps_the_annex_stage(router):
    assert router(Command("assign_officer", {"officer_id": None}))["officer_id"] is None
    assert router.contexts == [SetContext(None, "compulsion", "sealed_property", "bureau")]


def test_clearing_the_session_context_keeps_the_officer(router):
    answer = router(Command("set_session_context", {"category": None, "stage": None}))
    assert answer == {"officer_id": "OFC-1", "category": None, "stage": None, "mandatory": False, "queued": True}
    assert router.contexts == [SetContext("OFC-1", None, None, "bureau")]


@pytest.mark.parametrize("args,problem", [
    ({"config": {"device": {"id": DEV}}, "version": True}, "version must be a non-negative integer"),
    ({"config": {"device": {"id": DEV}}, "version": -1}, "version must be a non-negative integer"),
    ({"config": {"device": {"id": DEV}, "sync": {"bureau_url": "http://plain"}}}, "key 'sync.bureau_url'"),
    ({"config": {"device": {"id": DEV}, "session": {"category": "penalty", "stage": "x"}}},
     "unknown enforcement stage penalty/x"),
    ({"config": {}}, "is not this device"),
])
def test_a_pushed_config_is_refused_with_the_key_and_the_rule_it_breaks(router, args, problem):
    with pytest.raises(CommandError, match=problem):
        router(Command("push_config", args))
    assert router.running_config.report(DEV, 0)["last_push"]["ok"] is False
    assert problem.split("'")[0] in router.running_config.report(DEV, 0)["last_push"]["error"]


def test_the_config_hash_covers_defaults_so_equal_configs_hash_equal():
    explicit = parse_config({"device": {"id": DEV}, "recording": {"pre_event_s": 30}})
    assert config_fingerprint(explicit) == config_fingerprint(parse_config({"device": {"id": DEV}}))
    assert config_fingerprint(explicit) != config_fingerprint(parse_config({"device": {"id": DEV, "language": "en"}}))


# --- redelivery, with a broker --------------------------------------------------------------------------------


def test_a_redelivered_command_is_answered_again_but_run_only_once(tmp_path, store):
    pki = make_pki(tmp_path / "pki", clients=(DEV, "bureau"))
    broker = StrictMosquitto(tmp_path / "broker", pki)
    dev = make_device(tmp_path, pki, broker.port, store)
    bureau = None
    try:
        dev.start()
        bureau = RawClient(pki, broker.port, "bureau", [device_topic(DEV, "cmd/resp")])
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = device_topic(DEV, "cmd/resp")
        props.CorrelationData = b"req-1"
        props.MessageExpiryInterval = 30
        for _ in range(2):  # the second copy is what QoS 1 redelivery after a cut looks like
            bureau.publish(device_topic(DEV, "cmd/req/sync_now"), b'{"reason":"shift end"}', props=props)
        assert wait_for(lambda: len(bureau.messages) == 2)
        answers = [json.loads(m.payload) for m in bureau.messages]
        assert answers[0] == answers[1] == {"ok": True, "command": "sync_now", "started": True}
        assert all(m.properties.CorrelationData == b"req-1" for m in bureau.messages)
        assert dev.syncs == ["shift end"] and dev.link.duplicate_commands == 1
    finally:
        if bureau is not None:
            bureau.close()
        dev.stop()
        broker.stop()
