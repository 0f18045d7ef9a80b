"""End-to-end shifts on the simulator, through the real `agent.daemon.Device` (issue 4, "Must hold").

Three officers' shifts run at the same time, each on its own simulated device (tests/device_rig.py): real
H.264 from the fake camera, Chinese statements spoken into the fake microphone, gpiozero mock pins pressed
like buttons, a fuel gauge, a thermal file and a size-limited disk under the store. The tests then read what
the device wrote: its signed ledger records, its segment files, the prompts its speaker played.

- "scene" (penalty / on-site, as required): accidental presses, R16 opening statement spoken and detected,
  the notice never given (reminder, then statement_missing), R17 interruptions declared through the voice menu
  (severe weather explained by voice, other left unexplained), a normal stop, the compliance report (R24).
- "faults" (as required): R17 automatic interruptions -- low battery, camera stall, over-temperature, lens
  covered -- each resumed with the spoken reason; then a full disk closes the session unable_to_continue and
  the reboot tells the officer a written explanation is due.
- "mandatory" (compulsion / taking compulsory measures, full process, R14): short presses never stop, an
  obstruction is declared and its reason confirmed with MARK, a lone hold is refused and flagged, the
  confirmed second hold stops and is flagged; then a critical battery finalises and signs the segment
  before the power-off hook, and the reboot raises the written-explanation alarm.

Every data directory verifies with agent.evidence.verify.Verifier and the bureau's identity at the end.
Scripts wait for what they expect with bounded timeouts and carry on; the tests assert on the result.

Threads: each shift runs on its own worker thread (the officer's hands and voice); the devices run their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from agent.compliance import read_ledger, report_from_records
from tests.device_rig import DeviceRig, Record, chinese_speech, of_type

SHIFT_TIMEOUT_S = 220.0

OPENING = "现在是上午十点，在建设路八十八号，执法人员张伟、李娜进行现场检查。"
REASONS = {
    "severe_weather": "刚才因暴雨中断录像，现在继续。",
    "low_battery": "录像中断是因为电量不足，已更换电池。",
    "camera": "刚才设备故障，录像中断，现在恢复。",
    "thermal": "刚才设备过热，录像暂停，现在继续。",
    "lens": "刚才镜头被遮挡，现在继续录像。",
}

# --- the officer's hands ------------------------------------------------------------------------------


def chatter(pin, edges: int = 6, gap_s: float = 0.002, pressing: bool = True) -> None:
    """Contact bounce: `edges` alternating edges a couple of milliseconds apart, the first one a press
    (`pressing`) or a release."""
    for i in range(edges):
        (pin.drive_low if (i % 2 == 0) == pressing else pin.drive_high)()
        time.sleep(gap_s)


def single_press(pin) -> None:
    pin.drive_low()
    time.sleep(0.15)
    pin.drive_high()


def bouncy_press(pin) -> None:
    """One short press whose contacts chatter when pressed and when released."""
    chatter(pin, edges=5)  # down-up-down-up-down: ends pressed
    time.sleep(0.15)
    chatter(pin, edges=5, pressing=False)  # up-down-up-down-up: ends released


def both_buttons(rig: DeviceRig, hold_s: float) -> None:
    """Both buttons squeezed together (a grip, a pocket), longer than a stop hold and a menu hold."""
    s = rig.script
    s.record.drive_low()
    time.sleep(0.03)
    s.mark.drive_low()
    time.sleep(hold_s)
    s.record.drive_high()
    time.sleep(0.06)
    s.mark.drive_high()


def accidental_presses(rig: DeviceRig) -> None:
    rig.note("single RECORD press")
    single_press(rig.script.record)
    time.sleep(1.0)  # past the double-press window
    rig.note("bouncy RECORD press")
    bouncy_press(rig.script.record)
    time.sleep(1.0)
    rig.note("both buttons held 3.5 s")
    both_buttons(rig, 3.5)
    time.sleep(1.0)


def resume_and_explain(rig: DeviceRig, reason_key: str | None, clip_mark: int, interruption_id: str | None) -> None:
    """After an interruption ended: wait for the reason prompt, then state the reason (or MARK if None)."""
    rig.wait_played("state_interruption_reason", after=clip_mark, timeout=40)
    if reason_key is None:
        rig.script.mark_press()
        rig.wait_record("statement", 10, kind="interruption_reason", event="confirmed",
                        interruption_id=interruption_id)
    else:
        rig.say(chinese_speech(REASONS[reason_key]), f"reason: {reason_key}")
        rig.wait_record("statement", 30, kind="interruption_reason", event="end", interruption_id=interruption_id)


def declared_interruption(rig: DeviceRig, reason: str, explain: str | None | bool) -> None:
    """Declare `reason` from the voice menu, resume with a double press, then explain: by voice (`explain`
    is a REASONS key), with MARK (None), or not at all (False)."""
    s = rig.script
    with rig.phase(reason):
        seq = rig.last_seq()
        s.menu("interruption", reason)
        start = rig.wait_record("interruption_start", 10, after_seq=seq, reason=reason)
        rig.wait_state("INTERRUPTED", 10)
        time.sleep(1.5)  # sheltering, or waiting for the crowd to step back
        mark = rig.clips()
        s.start()
        rig.wait_record("interruption_end", 10, after_seq=seq, reason=reason)
        rig.wait_state("RECORDING", 10)
        if explain is not False and start is not None:
            resume_and_explain(rig, explain, mark, start["body"]["interruption_id"])
        else:
            rig.wait_played("state_interruption_reason", after=mark, timeout=40)  # asked, never answered


def confirm_statements_by_mark(rig: DeviceRig) -> None:
    """The officer confirms the opening statement and then the notice with MARK presses."""
    rig.script.mark_press()
    rig.wait_record("statement", 10, kind="opening", event="confirmed")
    rig.script.mark_press()
    rig.wait_record("statement", 10, kind="notice", event="confirmed")


def let_ring_fill(rig: DeviceRig) -> None:
    time.sleep(rig.cfg.recording.pre_event_s + 0.5)  # officer walking to the scene: the ring fills


def finish(rig: DeviceRig) -> None:
    rig.shutdown()
    rig.results["verify"] = rig.verifier().verify_path(rig.data_dir)


# --- the three shifts ---------------------------------------------------------------------------------


def scene_shift(rig: DeviceRig) -> None:
    s = rig.script
    rig.boot()
    let_ring_fill(rig)
    with rig.phase("accidental_ready"):
        accidental_presses(rig)
    with rig.phase("start"):
        s.start()
        opened = rig.wait_record("session_open", 10)
        rig.results["session_id"] = opened["body"]["session_id"] if opened else None
        rig.wait_played("session_started_opening_statement", timeout=30)
        rig.say(chinese_speech(OPENING), "opening statement")
        rig.wait_record("statement", 40, kind="opening", event="end")
    with rig.phase("accidental_recording"):
        accidental_presses(rig)  # the notice is due meanwhile: nothing here may count as it
    with rig.phase("notice_missing"):
        mark = rig.clips()
        rig.wait_record("statement", 80, kind="notice", event="missing")
        rig.wait_played("statement_missing", after=mark, timeout=30)
    with rig.phase("markers"):
        s.mark_press()
        s.menu("marker", "show_id")
        rig.wait_record("marker", 10, step="show_id")
    declared_interruption(rig, "severe_weather", explain="severe_weather")
    declared_interruption(rig, "other", explain=False)
    with rig.phase("glitch"):
        chatter(s.record, edges=6)  # a knock: bounce only, ends released
        time.sleep(rig.cfg.session.stop_hold_s + 1.5)
    with rig.phase("stop"):
        s.stop()
        rig.wait_record("compliance_report", 20, session_id=rig.results["session_id"])
        rig.wait_state("READY", 10)
    rig.results["played"] = rig.played()
    finish(rig)


def faults_shift(rig: DeviceRig) -> None:
    s, sim = rig.script, rig.sim
    rig.boot()
    let_ring_fill(rig)
    s.start()
    opened = rig.wait_record("session_open", 10)
    rig.results["session_id"] = opened["body"]["session_id"] if opened else None
    confirm_statements_by_mark(rig)

    def interruption(name: str, reason: str, cause: Callable[[], None], clear: Callable[[], None],
                     paused_state: str = "INTERRUPTED") -> None:
        with rig.phase(name):
            seq = rig.last_seq()
            rig.note(f"cause: {name}")
            cause()
            start = rig.wait_record("interruption_start", 15, after_seq=seq, reason=reason, source="auto")
            rig.wait_state(paused_state, 10)
            if paused_state == "RECORDING":  # recording goes on: a segment closes while the lens is covered
                rig.wait_record("segment", 15, after_seq=start["seq"] if start else seq)
            else:
                time.sleep(1.0)
            rig.results[f"{name}_state_during"] = rig.state()
            mark = rig.clips()
            rig.note(f"clear: {name}")
            clear()
            rig.wait_record("interruption_end", 20, after_seq=seq, reason=reason)
            rig.wait_state("RECORDING", 10)
            resume_and_explain(rig, name, mark, start["body"]["interruption_id"] if start else None)

    interruption("low_battery", "low_battery", lambda: sim.battery.set(4.0), sim.battery.swap)
    interruption("camera", "device_fault", lambda: setattr(sim.camera.faults, "stall", True),
                 lambda: setattr(sim.camera.faults, "stall", False))

    def cool_down() -> None:
        sim.thermal.set(80.0)  # below the limit but above the resume threshold: still too hot to resume
        time.sleep(2.5)  # more than one health reading
        rig.results["thermal_state_at_80"] = rig.state()
        sim.thermal.set(62.0)

    interruption("thermal", "device_fault", lambda: sim.thermal.set(91.0), cool_down)
    interruption("lens", "obstruction", lambda: setattr(sim.camera.faults, "covered", True),
                 lambda: setattr(sim.camera.faults, "covered", False), paused_state="RECORDING")
    with rig.phase("storage_full"):
        free = rig.storage.free_bytes()
        rig.note(f"disk fills: {free} bytes free -> 400000")
        rig.storage.fill(free - 400_000)  # under a minute of footage left at the configured bitrate
        rig.wait_record("session_close", 20, session_id=rig.results["session_id"])
        rig.wait_record("compliance_report", 10, session_id=rig.results["session_id"])
        rig.wait_state("READY", 10)
    rig.storage.release()  # the technician makes room; the explanation is still owed
    rig.shutdown()
    with rig.phase("reboot"):
        mark = rig.clips()
        rig.boot()
        rig.wait_record("alarm", 15, code="written_explanation_required")
        rig.wait_played("written_explanation_required", after=mark, timeout=30)
    finish(rig)


def mandatory_shift(rig: DeviceRig) -> None:
    s, sim = rig.script, rig.sim
    rig.boot()
    let_ring_fill(rig)
    s.start()
    opened = rig.wait_record("session_open", 10)
    rig.results["session_id"] = opened["body"]["session_id"] if opened else None
    confirm_statements_by_mark(rig)
    window = rig.cfg.session.confirm_window_s
    with rig.phase("short_presses"):
        single_press(s.record)
        time.sleep(1.0)
        s.start()  # a double press while recording
        s.mark_press()
        s.stop(hold_s=2.0)  # a hold, but shorter than stop_hold_s
        time.sleep(1.0)
    declared_interruption(rig, "obstruction", explain=None)
    with rig.phase("first_hold"):
        mark = rig.clips()
        s.stop()
        rig.wait_record("policy_flag", 10, flag="stop_refused")
        refused_at = time.monotonic()
        rig.wait_played("stop_refused_full_process", after=mark, timeout=60)
        time.sleep(max(0.0, window + 1.0 - (time.monotonic() - refused_at)))  # the confirmation window lapses
    with rig.phase("lone_hold_after_window"):
        seq = rig.last_seq()
        s.stop()
        rig.wait_record("policy_flag", 10, after_seq=seq, flag="stop_refused")
    with rig.phase("confirmed_stop"):
        s.stop(hold_s=3.2)  # the second hold, inside the window
        rig.wait_record("compliance_report", 20, session_id=rig.results["session_id"])
        rig.wait_state("READY", 10)
    with rig.phase("critical_battery"):
        seq = rig.last_seq()
        s.start()
        opened = rig.wait_record("session_open", 10, after_seq=seq)
        rig.results["critical_session_id"] = opened["body"]["session_id"] if opened else None
        rig.wait_record("segment", 15, after_seq=seq, session_id=rig.results["critical_session_id"])
        time.sleep(1.0)  # part of the next segment is being written when the battery dies
        rig.note("battery at 1 %")
        sim.battery.set(1.0)
        rig.wait_until(lambda: sim.power_offs >= 1, 20, "power-off hook")
        rig.wait_record("shutdown", 10, after_seq=seq, reason="critical_battery")
        rig.shutdown()  # what is left of the process after the hook (a real device loses power here)
    with rig.phase("reboot"):
        sim.battery.swap()
        mark = rig.clips()
        rig.boot()
        rig.wait_record("alarm", 15, code="written_explanation_required")
        rig.wait_played("written_explanation_required", after=mark, timeout=30)
    finish(rig)


# Statement timeouts: the state machine counts a wait from when the request was made until the prompt's
# PromptFinished arrives, and evaluates it on ticks that come about every 2 s, so the reminder must outlast
# the opening prompt (10.1 s in zh-CN) and "missing" must outlast the reminder plus its 9.1 s prompt, or the
# device gives up on a statement while it is still asking for it (see the report to the lead).
STATEMENT_TIMEOUTS = {"reminder_after_s": 12.0, "missing_after_s": 28.0}
SHIFTS: dict[str, tuple[Callable[[DeviceRig], None], dict]] = {
    "scene": (scene_shift, {"statements": STATEMENT_TIMEOUTS}),
    "faults": (faults_shift, {"statements": STATEMENT_TIMEOUTS}),
    "mandatory": (mandatory_shift, {"session": {"category": "compulsion", "stage": "compulsory_measures",
                                                "confirm_window_s": 6.0},
                                    "statements": STATEMENT_TIMEOUTS}),
}


def _run(script: Callable[[DeviceRig], None], rig: DeviceRig) -> DeviceRig:
    try:
        script(rig)
    except Exception:
        rig.results["error"] = traceback.format_exc()
    finally:
        rig.close()
    return rig


@pytest.fixture(scope="module")
def shifts(tmp_path_factory) -> dict[str, Future]:
    root = tmp_path_factory.mktemp("e2e")
    for text in (OPENING, *REASONS.values()):
        chinese_speech(text)  # espeak-ng up front: a missing voice fails here, with its message
    rigs = {name: DeviceRig(root / name, overrides) for name, (_, overrides) in SHIFTS.items()}
    with ThreadPoolExecutor(len(SHIFTS), thread_name_prefix="officer") as pool:
        yield {name: pool.submit(_run, SHIFTS[name][0], rig) for name, rig in rigs.items()}


def _shift(shifts: dict[str, Future], name: str) -> DeviceRig:
    rig = shifts[name].result(timeout=SHIFT_TIMEOUT_S)
    if "error" in rig.results:
        pytest.fail(f"the {name} shift's script failed:\n{rig.results['error']}\n{rig.dump()}")
    return rig


@pytest.fixture(scope="module")
def scene(shifts) -> DeviceRig:
    return _shift(shifts, "scene")


@pytest.fixture(scope="module")
def faults(shifts) -> DeviceRig:
    return _shift(shifts, "faults")


@pytest.fixture(scope="module")
def mandatory(shifts) -> DeviceRig:
    return _shift(shifts, "mandatory")


def one(records: list[Record], rtype: str, rig: DeviceRig, **body) -> Record:
    found = of_type(records, rtype, **body)
    assert len(found) == 1, f"expected one {rtype} {body}, found {len(found)}\n{rig.dump()}"
    return found[0]


def session_records(rig: DeviceRig, session_id: str) -> list[Record]:
    return [r for r in rig.records() if r["body"].get("session_id") == session_id]


# --- R16: the opening statement and the notice ----------------------------------------------------------


def test_opening_statement_spoken_in_chinese_is_detected_with_start_and_end(scene):
    recs = scene.phases["start"].records
    start = one(recs, "statement", scene, kind="opening", event="start")
    end = one(recs, "statement", scene, kind="opening", event="end")
    assert start["body"]["detected_by"] == end["body"]["detected_by"] == "vad"
    spoken_s = (end["body"]["at_us"] - start["body"]["at_us"]) / 1e6
    assert 5.0 < spoken_s < 15.0, scene.dump()  # the clip is ~9 s of speech with short pauses
    assert not of_type(recs, "statement", kind="opening", event="reminder"), scene.dump()
    assert "session_started_opening_statement" in scene.phases["start"].played


def test_notice_not_spoken_gives_a_reminder_then_statement_missing(scene):
    recs = session_records(scene, scene.results["session_id"])
    notice = [r["body"]["event"] for r in of_type(recs, "statement", kind="notice")]
    assert notice == ["reminder", "missing"], scene.dump()
    assert of_type(recs, "policy_flag", flag="statement_missing", detail="notice not given"), scene.dump()
    asked = [p for p in scene.results["played"]
             if p in ("notice_prompt", "statement_reminder_notice", "statement_missing")]
    assert asked == ["notice_prompt", "statement_reminder_notice", "statement_missing"], scene.dump()


def test_mark_confirms_the_opening_statement_and_the_notice(faults):
    recs = session_records(faults, faults.results["session_id"])
    assert [(r["body"]["kind"], r["body"]["event"], r["body"]["detected_by"])
            for r in of_type(recs, "statement") if r["body"]["kind"] in ("opening", "notice")] == [
        ("opening", "confirmed", "mark"), ("notice", "confirmed", "mark")], faults.dump()


# --- accidental presses ----------------------------------------------------------------------------------


def test_single_press_bounce_and_both_buttons_do_not_start_a_session(scene):
    phase = scene.phases["accidental_ready"]
    assert phase.records == [] and phase.state_after == "READY", scene.dump()
    assert not any(p.startswith("menu_") for p in phase.played), phase.played  # no voice menu either


def test_single_press_bounce_and_both_buttons_do_not_change_a_recording(scene):
    phase = scene.phases["accidental_recording"]
    changes = [r for r in phase.records if r["type"] not in ("segment", "prompt")
               and not (r["type"] == "statement" and r["body"]["event"] == "reminder")]
    assert changes == [] and phase.state_after == "RECORDING", scene.dump()
    assert not any(p.startswith("menu_") for p in phase.played)


def test_a_burst_of_contact_bounce_does_not_stop_an_as_required_session(scene):
    phase = scene.phases["glitch"]
    assert not phase.of_type("session_close") and phase.state_after == "RECORDING", scene.dump()


# --- R17: declared interruptions ------------------------------------------------------------------------


@pytest.mark.parametrize(("shift", "reason"), [("scene", "severe_weather"), ("scene", "other"),
                                               ("mandatory", "obstruction")])
def test_declared_interruption_is_logged_with_start_end_and_officer_source(request, shift, reason):
    scene = request.getfixturevalue(shift)
    phase = scene.phases[reason]
    start = one(phase.records, "interruption_start", scene, reason=reason)
    end = one(phase.records, "interruption_end", scene, reason=reason)
    assert start["body"]["source"] == "officer"
    assert end["body"]["interruption_id"] == start["body"]["interruption_id"] and end["body"]["resumed"] is True
    assert start["seq"] < end["seq"]
    # recording paused: the open segment was closed before the interruption and a new one began after
    segs = phase.of_type("segment")
    assert segs and segs[0]["seq"] < end["seq"], scene.dump()
    assert f"interruption_{reason}" in phase.played and "state_interruption_reason" in phase.played, phase.played


def test_resume_after_severe_weather_logs_the_spoken_reason(scene):
    phase = scene.phases["severe_weather"]
    iid = one(phase.records, "interruption_start", scene)["body"]["interruption_id"]
    said = of_type(phase.records, "statement", kind="interruption_reason", interruption_id=iid)
    assert [(r["body"]["event"], r["body"]["detected_by"]) for r in said] == [("start", "vad"), ("end", "vad")]


def test_resume_reason_can_be_confirmed_with_mark(mandatory):
    phase = mandatory.phases["obstruction"]
    iid = one(phase.records, "interruption_start", mandatory)["body"]["interruption_id"]
    said = of_type(phase.records, "statement", kind="interruption_reason", interruption_id=iid)
    assert [(r["body"]["event"], r["body"]["detected_by"]) for r in said] == [("confirmed", "mark")]


# --- R17: automatic interruptions -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "reason", "detail"), [
    ("low_battery", "low_battery", "battery at 4%"),
    ("camera", "device_fault", "camera"),
    ("thermal", "device_fault", "over temperature"),
])
def test_automatic_interruption_pauses_then_resumes_when_the_cause_clears(faults, name, reason, detail):
    phase = faults.phases[name]
    start = one(phase.records, "interruption_start", faults, reason=reason)
    end = one(phase.records, "interruption_end", faults, reason=reason)
    assert start["body"]["source"] == "auto" and detail in start["body"]["detail"], faults.dump()
    assert end["body"]["resumed"] is True and end["body"]["interruption_id"] == start["body"]["interruption_id"]
    assert faults.results[f"{name}_state_during"] == "INTERRUPTED"
    if name == "thermal":  # hysteresis: 80 C is under the limit but not yet cool enough to resume
        assert faults.results["thermal_state_at_80"] == "INTERRUPTED"
    segs = phase.of_type("segment")
    assert segs and segs[0]["seq"] < end["seq"], faults.dump()  # the segment was closed at the pause
    assert "state_interruption_reason" in phase.played, phase.played


@pytest.mark.parametrize("name", ["low_battery", "camera", "thermal", "lens"])
def test_resume_after_automatic_interruption_logs_the_spoken_reason(faults, name):
    phase = faults.phases[name]
    iid = one(phase.records, "interruption_start", faults)["body"]["interruption_id"]
    said = of_type(phase.records, "statement", kind="interruption_reason", interruption_id=iid)
    assert [(r["body"]["event"], r["body"]["detected_by"]) for r in said] == [("start", "vad"), ("end", "vad")], \
        faults.dump()


def test_fault_records_name_the_failing_component(faults):
    assert faults.phases["camera"].of_type("fault", component="camera", code="camera_stalled"), faults.dump()
    assert faults.phases["thermal"].of_type("fault", component="thermal", code="over_temperature"), faults.dump()
    assert faults.phases["low_battery"].of_type("alarm", code="battery_low"), faults.dump()


def test_lens_covered_is_an_obstruction_while_recording_continues(faults):
    phase = faults.phases["lens"]
    start = one(phase.records, "interruption_start", faults, reason="obstruction")
    end = one(phase.records, "interruption_end", faults, reason="obstruction")
    assert start["body"]["source"] == "auto" and end["body"]["resumed"] is True
    assert faults.results["lens_state_during"] == "RECORDING"
    during = [r for r in phase.of_type("segment") if start["seq"] < r["seq"] < end["seq"]]
    assert during and all(not r["body"]["truncated"] for r in during), faults.dump()


def test_full_disk_interrupts_and_closes_the_session_unable_to_continue(faults):
    phase = faults.phases["storage_full"]
    start = one(phase.records, "interruption_start", faults, reason="storage_full")
    close = one(phase.records, "session_close", faults)
    assert start["body"]["source"] == "auto"
    assert close["body"]["outcome"] == "unable_to_continue" and close["body"]["written_explanation_required"]
    assert phase.of_type("policy_flag", flag="written_explanation_required"), faults.dump()
    assert of_type(phase.records, "interruption_end", resumed=False), faults.dump()
    # the footage up to the full disk is there, closed and signed
    segs = session_records(faults, faults.results["session_id"])
    assert of_type(segs, "segment") and max(r["seq"] for r in of_type(segs, "segment")) < close["seq"]
    assert phase.state_after == "READY"


def test_after_reboot_the_device_says_a_written_explanation_is_due(faults, mandatory):
    for rig in (faults, mandatory):
        phase = rig.phases["reboot"]
        assert phase.types()[:1] == ["boot"], rig.dump()
        alarm = one(phase.records, "alarm", rig, code="written_explanation_required")
        assert alarm["body"]["severity"] == "warning"
        assert "written_explanation_required" in phase.played, phase.played


# --- critical battery ------------------------------------------------------------------------------------


def test_critical_battery_signs_the_segment_and_the_shutdown_before_the_power_off_hook(mandatory):
    rig = mandatory
    sid = rig.results["critical_session_id"]
    assert rig.sim.power_offs == 1, rig.dump()
    snapshot = rig.ledger_at_power_off
    assert snapshot is not None
    types = [r["type"] for r in snapshot if r["body"].get("session_id") in (sid, None)]
    last_segment = max(i for i, r in enumerate(snapshot) if r["type"] == "segment" and r["body"]["session_id"] == sid)
    close = next(i for i, r in enumerate(snapshot) if r["type"] == "session_close" and r["body"]["session_id"] == sid)
    shutdown = next(i for i, r in enumerate(snapshot) if r["type"] == "shutdown")
    assert last_segment < close < shutdown == len(snapshot) - 1, types
    assert snapshot[shutdown]["body"]["reason"] == "critical_battery"
    body = snapshot[close]["body"]
    assert body["outcome"] == "unable_to_continue" and body["written_explanation_required"] is True
    # nothing was written between the power-off and the next boot
    after = [r["type"] for r in rig.records(snapshot[-1]["seq"])]
    assert after[:1] == ["boot"], rig.dump()
    # the segment finalised at power-off is closed (renamed, not .part) and intact
    seg = snapshot[last_segment]["body"]
    assert (rig.data_dir / "segments" / seg["file"]).exists() and not seg["truncated"]
    # it holds the footage up to the moment the battery was found critical (media and records share a clock)
    died = one(snapshot, "interruption_start", rig, session_id=sid, reason="low_battery")
    assert died["mono_us"] - seg["last_pts_us"] < 2_000_000, (died["mono_us"], seg)
    assert not list((rig.data_dir / "segments").glob("*.part"))


def test_critical_battery_session_needs_a_written_explanation(mandatory):
    rep = report_from_records(mandatory.results["critical_session_id"], read_ledger(mandatory.data_dir))
    assert rep.outcome == "unable_to_continue" and rep.written_explanation_required
    assert "written_explanation_required (R17)" in rep.findings
    assert [i.reason for i in rep.interruptions] == ["low_battery"] and rep.interruptions[0].resumed is False


# --- R14: full-process stage ----------------------------------------------------------------------------


def test_short_presses_never_stop_a_full_process_stage(mandatory):
    phase = mandatory.phases["short_presses"]
    assert not phase.of_type("session_close") and not phase.of_type("policy_flag"), mandatory.dump()
    assert phase.state_after == "RECORDING"


def test_a_single_hold_in_a_full_process_stage_is_refused_and_flagged(mandatory):
    for name in ("first_hold", "lone_hold_after_window"):
        phase = mandatory.phases[name]
        assert len(phase.of_type("policy_flag", flag="stop_refused")) == 1, mandatory.dump()
        assert not phase.of_type("session_close") and phase.state_after == "RECORDING", mandatory.dump()
        assert phase.of_type("prompt", prompt_id="stop_refused_full_process")
    assert "stop_refused_full_process" in mandatory.phases["first_hold"].played


def test_the_confirmed_second_hold_stops_and_is_flagged(mandatory):
    phase = mandatory.phases["confirmed_stop"]
    flag = one(phase.records, "policy_flag", mandatory, flag="stop_during_mandatory")
    close = one(phase.records, "session_close", mandatory)
    assert flag["seq"] < close["seq"] and flag["body"]["stage"] == "compulsion/compulsory_measures"
    assert close["body"]["outcome"] == "completed" and close["body"]["stop"] == "confirmed_hold"
    report = one(phase.records, "compliance_report", mandatory)["body"]
    assert "stopped_during_full_process_stage x1 (R14)" in report["findings"]
    assert report["report"]["stops_refused"] == 2 and report["report"]["stops_during_mandatory"] == 1


def test_an_as_required_stage_stops_with_one_hold(scene):
    phase = scene.phases["stop"]
    close = one(session_records(scene, scene.results["session_id"]), "session_close", scene)
    assert close["body"]["outcome"] == "completed" and close["body"]["stop"] == "normal", scene.dump()
    assert not of_type(session_records(scene, scene.results["session_id"]), "policy_flag", flag="stop_refused")
    assert phase.state_after == "READY"


# --- R24: the compliance report ---------------------------------------------------------------------------


def test_compliance_report_of_the_scripted_shift_has_the_known_answers(scene):
    sid = scene.results["session_id"]
    body = one(session_records(scene, sid), "compliance_report", scene)["body"]
    rep = body["report"]
    assert rep["opening_statement"] == "given" and rep["notice"] == "missing"
    got = [(i["reason"], i["source"], i["resumed"], i["explained"]) for i in rep["interruptions"]]
    assert got == [("severe_weather", "officer", True, True), ("other", "officer", True, False)], got
    iid_other = rep["interruptions"][1]["interruption_id"]
    assert sorted(body["findings"]) == sorted(["notice_to_party_missing (R16)",
                                               f"interruption_{iid_other}_other_not_explained (R17)"]), body
    assert body["compliant"] is False
    assert rep["markers"] == {"general": 1, "show_id": 1}
    assert rep["outcome"] == "completed" and rep["gaps"] == [] and rep["truncated_segments"] == 0
    assert rep["segments"] == len(of_type(session_records(scene, sid), "segment"))


def test_report_command_prints_the_same_report_as_json(scene):
    sid = scene.results["session_id"]
    out = subprocess.run([sys.executable, "-m", "agent.cli", "report", "--data-dir", str(scene.data_dir),
                          "--session", sid, "--json"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    [printed] = json.loads(out.stdout)
    signed = one(session_records(scene, sid), "compliance_report", scene)["body"]
    assert printed["session_id"] == sid
    assert printed["findings"] == signed["findings"] and printed["compliant"] == signed["compliant"]
    assert {k: v for k, v in printed.items() if k not in ("session_id", "findings", "compliant")} == signed["report"]


# --- everything verifies --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_data_dir_verifies_with_the_bureau_identity(shifts, name):
    rig = _shift(shifts, name)
    report = rig.results["verify"]
    assert report.ok, report.render() + "\n" + rig.dump()
    segments = of_type(rig.records(), "segment")
    assert segments and report.segments_ok == len(segments) and report.decrypted == len(segments)
