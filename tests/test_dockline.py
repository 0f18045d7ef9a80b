"""The dock line (R20: docking starts the upload; docs/PROTOCOL.md "Dock line"), over real pyserial on ptys.

The simulated dock runs the real dock program (`dock.dock_station.DockStation`) on the far end of a pty
pair. Timers are the protocol's scaled by 0.3 (PING every 0.3 s, presence timeout 0.9 s) to keep the
suite fast; every wait is bounded and no assertion depends on how long something took.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import serial

from agent.sync.dockline import (
    FRAME_START,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    DockLink,
    FrameDecoder,
    Hello,
    LineTiming,
    Ping,
    Reject,
    Rejected,
    Status,
    encode_frame,
)
from hw_sim.serial_devices import PtyNullModem, SimulatedDock

FAST = LineTiming().scaled(0.3)
WAIT = 5.0  # upper bound for anything that should happen within a few protocol periods
DOCK_TIME_US = 1_750_000_000_000_000
REPO = Path(__file__).resolve().parents[1]


def crc_frame(payload: bytes) -> bytes:
    """A frame with a correct CRC around arbitrary payload bytes (to test what the CRC does not catch)."""
    return payload + b" *" + f"{zlib.crc32(payload):08x}".encode() + b"\n"


class Recorder:
    """Collects DockLink callbacks."""

    def __init__(self) -> None:
        self.docked: list = []
        self.undocked: list[str] = []
        self.intents = 0
        self.hints: list = []


@pytest.fixture
def dock(tmp_path: Path):
    with SimulatedDock(tmp_path / "tty", dock_id="DOCK-7", timing=FAST, wall_us=lambda: DOCK_TIME_US) as sim:
        yield sim


@pytest.fixture
def calls() -> Recorder:
    return Recorder()


@pytest.fixture
def link(dock: SimulatedDock, calls: Recorder):
    device = DockLink(dock.device_port, "BWC-TEST-0001", timing=FAST,
                      on_docked=calls.docked.append, on_undocked=calls.undocked.append,
                      on_undock_intent=lambda: setattr(calls, "intents", calls.intents + 1),
                      on_hint=calls.hints.append)
    device.start()
    yield device
    device.stop()


# --- framing ------------------------------------------------------------------------------------------


def test_frame_is_compact_json_type_first_then_crc32_of_the_json_bytes():
    frame = encode_frame(Ping(seq=7, dock="DOCK-7", device="BWC-1"))
    assert frame == b'{"t":"PING","seq":7,"dock":"DOCK-7","device":"BWC-1"} *' + \
        f"{zlib.crc32(frame[:frame.index(b' *')]):08x}".encode() + b"\n"
    assert frame.startswith(FRAME_START)
    assert re.fullmatch(rb'\{.*\} \*[0-9a-f]{8}\n', frame)


def test_every_example_frame_in_the_protocol_doc_decodes():
    doc = (REPO / "docs" / "PROTOCOL.md").read_text()
    examples = [line.encode() + b"\n" for line in doc.splitlines() if line.startswith('{"t":"')]
    decoder = FrameDecoder()
    messages = decoder.feed(b"".join(examples))
    assert not [m for m in messages if isinstance(m, Rejected)]
    assert {m.t for m in messages} == {"HELLO", "ACK", "PING", "STATUS", "UNDOCK_INTENT", "HINT"}


GOOD = encode_frame(Ping(seq=1, dock="DOCK-7"))


@pytest.mark.parametrize(("line", "reason"), [
    pytest.param(b"hello world\n", Reject.GARBAGE, id="garbage"),
    pytest.param(b"\x00\xff\xfe\x13\n", Reject.GARBAGE, id="binary-noise"),
    pytest.param(GOOD[:20] + b"\n", Reject.TRUNCATED, id="cut-before-crc"),
    pytest.param(GOOD[:20] + GOOD, Reject.TRUNCATED, id="cut-then-next-frame"),
    pytest.param(GOOD.replace(b"DOCK-7", b"DOCK-8"), Reject.CRC_MISMATCH, id="bit-error"),
    pytest.param(b"x" * 3000 + b"\n", Reject.OVERSIZED, id="oversized-noise"),
    pytest.param(crc_frame(b'{"t":"PING","seq":1,"pad":"' + b"a" * MAX_FRAME_BYTES + b'"}'), Reject.OVERSIZED,
                 id="oversized-frame"),
    pytest.param(crc_frame(b'{"t":"PING","seq":1'), Reject.BAD_JSON, id="crc-ok-json-broken"),
    pytest.param(crc_frame(b'{"t":"PING","seq":1,"seq":2}'), Reject.BAD_JSON, id="duplicate-key"),
    pytest.param(crc_frame('{"t":"PING","seq":1,"dock":"DÖCK"}'.encode()), Reject.BAD_JSON, id="not-ascii"),
    pytest.param(crc_frame(b'{"t":"PURGE","seq":1,"segment":"S1"}'), Reject.UNKNOWN_TYPE, id="dock-cannot-purge"),
    pytest.param(crc_frame(b'{"t":"PING","seq":1.5}'), Reject.BAD_FIELDS, id="float"),
    pytest.param(crc_frame(b'{"t":"STATUS","seq":1,"phase":"syncing","queued_bytes":-1,"done_bytes":0,'
                           b'"safe_to_remove":false}'), Reject.BAD_FIELDS, id="negative-bytes"),
    pytest.param(crc_frame(b'{"t":"HELLO","seq":1,"proto":1}'), Reject.BAD_FIELDS, id="missing-field"),
])
def test_decoder_rejects_a_bad_line_with_its_reason_and_still_reads_the_next_frame(line: bytes, reason: Reject):
    decoder = FrameDecoder()
    out = decoder.feed(line) + decoder.feed(GOOD)
    rejected = [item.reason for item in out if isinstance(item, Rejected)]
    messages = [item for item in out if not isinstance(item, Rejected)]
    assert rejected == [reason]
    assert messages[-1] == Ping(seq=1, dock="DOCK-7")


def test_decoder_survives_random_bytes_with_bounded_memory_and_resynchronises():
    rng = random.Random(20)
    decoder = FrameDecoder()
    noise = rng.randbytes(256 * 1024)
    pos = 0
    while pos < len(noise):
        step = rng.randint(1, 3000)
        decoder.feed(noise[pos:pos + step])
        assert len(decoder._buf) < MAX_FRAME_BYTES
        pos += step
    out = decoder.feed(b"\n" + GOOD)
    assert out[-1] == Ping(seq=1, dock="DOCK-7")


def test_a_frame_split_across_many_reads_is_reassembled():
    decoder = FrameDecoder()
    out = []
    for byte in GOOD:
        out += decoder.feed(bytes([byte]))
    assert out == [Ping(seq=1, dock="DOCK-7")]


# --- over the line --------------------------------------------------------------------------------------


def test_handshake_docks_with_the_dock_id_and_protocol_version(dock: SimulatedDock, link: DockLink,
                                                               calls: Recorder):
    assert link.wait_docked(WAIT)
    assert link.session is not None
    assert (link.session.dock_id, link.session.proto) == ("DOCK-7", PROTOCOL_VERSION)
    assert [(s.dock_id, s.proto) for s in calls.docked] == [("DOCK-7", PROTOCOL_VERSION)]
    assert dock.station.wait_for(lambda: dock.station._present, WAIT)
    assert dock.station.device_id == "BWC-TEST-0001"


def test_dock_hints_its_time_and_uplink_state_and_changes_reach_the_device(dock: SimulatedDock, link: DockLink):
    assert link.wait_for(lambda: link._last_hint is not None, WAIT)
    hint = link.last_hint
    assert (hint.wall_us, hint.time_source, hint.link_up) == (DOCK_TIME_US, "ntp", True)
    dock.set_link_up(False)
    assert link.wait_for(lambda: link._last_hint.link_up is False, WAIT)


def test_status_reaches_the_dock_and_drives_its_leds(dock: SimulatedDock, link: DockLink):
    assert link.wait_docked(WAIT)
    link.set_status(phase="syncing", queued_bytes=5_000_000, done_bytes=1_000_000, eta_s=42, safe_to_remove=False)
    station = dock.station
    assert station.wait_for(lambda: station._status is not None and station._status.phase == "syncing", WAIT)
    status = station.last_status
    assert (status.queued_bytes, status.done_bytes, status.eta_s, status.safe_to_remove) == \
        (5_000_000, 1_000_000, 42, False)
    assert station.leds().sync == "blink" and not station.leds().safe_to_remove

    link.set_status(phase="done", queued_bytes=0, done_bytes=6_000_000, eta_s=0, safe_to_remove=True, alarm=True)
    assert station.wait_for(lambda: station._status.phase == "done", WAIT)
    leds = station.leds()
    assert (leds.sync, leds.safe_to_remove, leds.red) == ("on", True, True)
    assert [e.detail["phase"] for e in station.events("status")] == ["syncing", "done"]


def test_undock_button_reaches_the_device_once_and_is_acknowledged(dock: SimulatedDock, link: DockLink,
                                                                   calls: Recorder):
    assert link.wait_docked(WAIT)
    link.set_status(phase="syncing", queued_bytes=10, done_bytes=0, eta_s=1, safe_to_remove=False)
    dock.press_undock_button()
    assert link.wait_for(lambda: link._undock_intents == 1, WAIT)
    assert dock.station.wait_for(lambda: any(e.kind == "undock_acked" for e in dock.station._events), WAIT)
    assert calls.intents == 1
    assert [e.detail for e in dock.station.events("undock_acked")] == [{"ok": True}]
    assert not dock.station.events("undock_unanswered")
    # The device finishes its current request, then says it is safe to remove.
    link.set_status(phase="finishing", queued_bytes=10, done_bytes=0, eta_s=None, safe_to_remove=True)
    assert dock.station.wait_for(lambda: dock.station._status.safe_to_remove, WAIT)
    assert dock.station.leds().safe_to_remove


def test_presence_is_lost_when_the_dock_stops_pinging_and_regained_when_it_resumes(
        dock: SimulatedDock, link: DockLink, calls: Recorder):
    assert link.wait_docked(WAIT)
    dock.set_pinging(False)
    assert link.wait_undocked(WAIT)
    assert calls.undocked == ["ping_timeout"]
    assert link.stats().presence_timeouts == 1
    dock.set_pinging(True)
    assert link.wait_docked(WAIT)
    assert len(calls.docked) == 2


def test_unplug_is_an_undock_and_the_link_reopens_after_the_device_is_docked_again(
        dock: SimulatedDock, link: DockLink, calls: Recorder):
    assert link.wait_docked(WAIT)
    dock.unplug()
    assert link.wait_undocked(WAIT)
    assert calls.undocked == ["line_lost"]
    assert link.wait_for(lambda: link._stats.open_failures >= 1, WAIT)  # the port is gone; it keeps trying
    dock.plug()
    assert link.wait_docked(WAIT)
    stats = link.stats()
    assert stats.line_losses == 1 and stats.opens == 2 and stats.internal_errors == 0
    assert len(calls.docked) == 2


def test_bad_frames_on_the_line_are_rejected_with_a_logged_reason_and_the_link_stays_up(
        dock: SimulatedDock, link: DockLink, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="agent.sync.dockline")
    assert link.wait_docked(WAIT)
    good = encode_frame(Ping(seq=900, dock="DOCK-7", device="BWC-TEST-0001"))
    dock.inject(b"\x00\xffline noise\n")
    dock.inject(good[:25] + b"\n")
    dock.inject(b"{" * 4000 + b"\n")
    dock.inject(good.replace(b"900", b"901"))
    dock.inject(crc_frame(b'{"t":"PURGE","seq":5,"segment":"S1"}'))
    dock.inject(encode_frame(Status(seq=6, phase="idle", queued_bytes=0, done_bytes=0, safe_to_remove=True)))
    expected = {"garbage": 1, "truncated": 1, "oversized": 1, "crc_mismatch": 1, "unknown_type": 1,
                "unexpected": 1}
    assert link.wait_for(lambda: all(link._stats.rejected[k] >= n for k, n in expected.items()), WAIT)
    assert dict(link.stats().rejected) == expected
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for reason in expected:
        assert f"rejected frame ({reason})" in logged
    assert link.docked and link.stats().internal_errors == 0 and link.running
    link.set_status(phase="syncing", queued_bytes=1, done_bytes=2, eta_s=3, safe_to_remove=False)
    assert dock.station.wait_for(lambda: dock.station._status is not None, WAIT)


def test_a_callback_that_raises_is_counted_and_does_not_stop_the_link(dock: SimulatedDock):
    def broken(*_):
        raise RuntimeError("bug in the session layer")

    device = DockLink(dock.device_port, "BWC-TEST-0002", timing=FAST, on_docked=broken, on_undock_intent=broken)
    device.start()
    try:
        assert device.wait_docked(WAIT)
        dock.press_undock_button()
        assert device.wait_for(lambda: device._undock_intents == 1, WAIT)
        assert device.stats().callback_errors == 2
        device.set_status(phase="idle", queued_bytes=0, done_bytes=0, eta_s=None, safe_to_remove=True)
        assert dock.station.wait_for(lambda: dock.station._status is not None, WAIT)
    finally:
        device.stop()


def test_a_restarted_dock_gets_a_new_hello_and_the_device_stays_docked(dock: SimulatedDock, link: DockLink,
                                                                        calls: Recorder):
    from dock.dock_station import DockStation

    assert link.wait_docked(WAIT)
    dock.station.stop()
    dock.station = DockStation(dock.modem.peer_port, "DOCK-7", timing=FAST)
    dock.station.start()
    assert dock.station.wait_for(lambda: dock.station._present, WAIT)
    assert dock.station.device_id == "BWC-TEST-0001"
    assert link.docked


def test_device_does_not_dock_when_the_dock_refuses_its_protocol(tmp_path: Path):
    modem = PtyNullModem(tmp_path, "dock")
    device = DockLink(modem.device_port, "BWC-TEST-0003", timing=FAST)
    device.start()
    fake_dock = serial.Serial(modem.peer_port, 115200, timeout=0.2)
    try:
        decoder = FrameDecoder()
        hellos: list[Hello] = []
        for _ in range(25):  # answer every HELLO (the device retries) until it has taken a refusal
            for hello in [m for m in decoder.feed(fake_dock.read(256)) if isinstance(m, Hello)]:
                hellos.append(hello)
                fake_dock.write(encode_frame(Ack(seq=0, of="HELLO", ack=hello.seq, ok=False, dock="DOCK-OLD",
                                                 proto=9, reason="protocol 1 not supported")))
                fake_dock.write(encode_frame(Ping(seq=1, dock="DOCK-OLD")))
            if device.wait_for(lambda: device._stats.refused >= 1, 0.05):
                break
        assert hellos and all(h.device == "BWC-TEST-0003" and h.proto == PROTOCOL_VERSION for h in hellos)
        assert device.stats().refused >= 1
        assert not device.docked
    finally:
        device.stop()
        fake_dock.close()
        modem.close()


def test_dock_program_refuses_a_device_speaking_another_protocol(dock: SimulatedDock):
    port = serial.Serial(dock.device_port, 115200, timeout=0.2)
    try:
        decoder = FrameDecoder()
        ack = None
        for seq in range(25):
            port.write(encode_frame(Hello(seq=seq, proto=PROTOCOL_VERSION + 1, device="BWC-FUTURE")))
            ack = next((m for m in decoder.feed(port.read(256)) if isinstance(m, Ack)), None)
            if ack:
                break
        assert ack is not None and not ack.ok and "not supported" in ack.reason
        assert not dock.station.present
    finally:
        port.close()


def read_events_until(program: subprocess.Popen, kind: str, timeout: float) -> list[dict]:
    """The dock program's JSON event lines from stdout, up to and including the first of `kind`."""
    deadline = time.monotonic() + timeout
    fd = program.stdout.fileno()
    buffer = b""
    events: list[dict] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            events.append(json.loads(line))
            if events[-1]["event"] == kind:
                return events
    raise AssertionError(f"no {kind!r} event from the dock program within {timeout} s; got {events}")


def test_dock_station_runs_as_a_program_and_sigusr1_is_the_undock_button(tmp_path: Path, calls: Recorder):
    modem = PtyNullModem(tmp_path, "dock")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    program = subprocess.Popen(
        [sys.executable, "-m", "dock.dock_station", "--port", modem.peer_port, "--dock-id", "DOCK-CLI",
         "--ping-interval", "0.3", "--time-source", "ntp"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    device = DockLink(modem.device_port, "BWC-TEST-0004", timing=FAST,
                      on_undock_intent=lambda: setattr(calls, "intents", calls.intents + 1))
    device.start()
    try:
        assert device.wait_docked(15.0)  # includes the program's start-up
        assert device.session.dock_id == "DOCK-CLI"
        assert device.wait_for(lambda: device._last_hint is not None, WAIT)
        assert device.last_hint.time_source == "ntp" and device.last_hint.wall_us > 0
        program.send_signal(signal.SIGUSR1)
        assert device.wait_for(lambda: device._undock_intents == 1, WAIT)
        events = read_events_until(program, "undock_acked", WAIT)
        assert [e["event"] for e in events] == ["arrived", "undock_sent", "undock_acked"]
        assert events[0]["device"] == "BWC-TEST-0004" and events[0]["leds"]["present"] is True
        program.terminate()
        program.communicate(timeout=WAIT)
        assert program.returncode == 0
        assert device.wait_undocked(WAIT)
    finally:
        if program.poll() is None:
            program.kill()
            program.wait(WAIT)
        device.stop()
        modem.close()
