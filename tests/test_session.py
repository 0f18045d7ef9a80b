"""The session state machine against the rule: R14 (full-process stops), R16 (statements), R17
(interruptions), R24 (compliance report). Arranged with fake ports and a stepped clock; asserts on the
signed ledger records the machine wrote."""

from __future__ import annotations

import pytest

from agent import events as ev
from agent.config import parse_config
from agent.evidence.records import ClockQuality, InterruptionReason
from agent.session import SessionMachine, State
from agent.storage.store import EvidenceStore

US = 1_000_000


class SteppedClock:
    def __init__(self) -> None:
        self.mono = 1_000 * US
        self.wall = 1_796_000_000 * US

    def wall_us(self) -> int:
        return self.wall

    def mono_us(self) -> int:
        return self.mono

    def status(self) -> dict[str, str]:
        return {"source": "test", "quality": ClockQuality.SYNCED.value}

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * US)
        self.wall += int(seconds * US)


class FakeRecorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def start_session(self, session_id: str) -> None:
        self.calls.append("start")

    def pause_session(self) -> None:
        self.calls.append("pause")

    def resume_session(self) -> None:
        self.calls.append("resume")

    def stop_session(self) -> None:
        self.calls.append("stop")


class FakeAnnouncer:
    def __init__(self) -> None:
        self.played: list[str] = []
        self.vibrations: list[str] = []

    def play(self, prompt_id: str) -> None:
        self.played.append(prompt_id)

    def vibrate(self, pattern: str) -> None:
        self.vibrations.append(pattern)


class FakePower:
    def __init__(self) -> None:
        self.off = False

    def power_off(self) -> None:
        self.off = True


class Rig:
    def __init__(self, tmp_path, signer, bureau_identity, **config):
        self.clock = SteppedClock()
        self.store = EvidenceStore(tmp_path / "dev", "BWC-T1", signer, [bureau_identity.recipient], self.clock)
        self.cfg = parse_config({"device": {"id": "BWC-T1", "officer_id": "OFF-7"}, **config})
        self.recorder, self.announcer, self.power = FakeRecorder(), FakeAnnouncer(), FakePower()
        self.machine = self.new_machine()

    def new_machine(self) -> SessionMachine:
        return SessionMachine(self.cfg, self.store.ledger, self.clock, self.recorder, self.announcer, self.power,
                              meta=self.store.db)

    def send(self, *events: ev.Event, step: float = 0.0) -> None:
        for e in events:
            self.machine.handle(e)
            self.clock.advance(step)

    def wait(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.clock.advance(1)
            self.machine.handle(ev.Tick())

    def speak(self, seconds: float) -> None:
        start = self.clock.mono_us()
        self.send(ev.SpeechStarted(start))
        self.clock.advance(seconds)
        self.send(ev.SpeechEnded(self.clock.mono_us(), self.clock.mono_us() - start))

    def records(self, rtype: str | None = None) -> list[dict]:
        return [r.fields for r in self.store.ledger.records(rtype=rtype)]

    def bodies(self, rtype: str) -> list[dict]:
        return [r["body"] for r in self.records(rtype)]

    def report(self) -> dict:
        return self.bodies("compliance_report")[-1]


@pytest.fixture
def rig(tmp_path, signer, bureau_identity):
    return Rig(tmp_path, signer, bureau_identity)


def test_start_prompts_opening_statement_and_logs_speech_then_notice(rig):
    rig.send(ev.StartPressed())
    assert rig.machine.state is State.RECORDING and rig.recorder.calls == ["start"]
    assert rig.announcer.played[0] == "session_started_opening_statement"
    rig.wait(3)
    rig.speak(8)
    assert "notice_prompt" in rig.announcer.played
    rig.speak(4)
    statements = [(b["kind"], b["event"], b["detected_by"]) for b in rig.bodies("statement")]
    assert statements == [("opening", "start", "vad"), ("opening", "end", "vad"),
                          ("notice", "start", "vad"), ("notice", "end", "vad")]
    opening = rig.bodies("statement")[:2]
    assert opening[1]["at_us"] - opening[0]["at_us"] == 8 * US
    rig.send(ev.StopHeld())
    report = rig.report()
    assert report["compliant"] and report["findings"] == []
    assert report["report"]["opening_statement"] == "given" and report["report"]["notice"] == "given"


def test_a_cough_is_not_a_statement(rig):
    rig.send(ev.StartPressed())
    rig.speak(0.4)
    assert rig.bodies("statement") == []


def test_no_speech_gives_reminder_then_statement_missing(rig):
    rig.send(ev.StartPressed())
    rig.wait(25)
    assert [b["event"] for b in rig.bodies("statement")] == ["reminder"]
    assert "statement_reminder_opening" in rig.announcer.played
    rig.wait(20)
    assert ("opening", "missing") in [(b["kind"], b["event"]) for b in rig.bodies("statement")]
    assert any(f["flag"] == "statement_missing" for f in rig.bodies("policy_flag"))
    rig.send(ev.MarkPressed())  # confirms the notice, which is still asked for
    rig.send(ev.StopHeld())
    report = rig.report()
    assert not report["compliant"] and "opening_statement_missing (R16)" in report["findings"]
    assert report["report"]["notice"] == "confirmed"


def test_mark_press_confirms_the_statement(rig):
    rig.send(ev.StartPressed(), ev.MarkPressed(), ev.MarkPressed(), ev.MarkPressed())
    kinds = [(b["kind"], b["event"], b["detected_by"]) for b in rig.bodies("statement")]
    assert kinds == [("opening", "confirmed", "mark"), ("notice", "confirmed", "mark")]
    assert [b["step"] for b in rig.bodies("marker")] == ["general"]


def test_device_can_play_the_notice_aloud(tmp_path, signer, bureau_identity):
    rig = Rig(tmp_path, signer, bureau_identity, session={"play_notice_aloud": True})
    rig.send(ev.StartPressed())
    rig.speak(5)
    assert "notice_to_party" in rig.announcer.played
    rig.send(ev.StopHeld())
    assert rig.report()["report"]["notice"] == "played_by_device"


def test_stop_during_full_process_stage_requires_confirmation(tmp_path, signer, bureau_identity):
    rig = Rig(tmp_path, signer, bureau_identity, session={"category": "compulsion", "stage": "compulsory_measures"})
    rig.send(ev.StartPressed(), ev.StopHeld())
    assert rig.machine.state is State.RECORDING and "stop" not in rig.recorder.calls
    assert "stop_refused_full_process" in rig.announcer.played
    rig.wait(11)  # confirmation window lapses: a later single hold is refused again
    rig.send(ev.StopHeld())
    assert rig.machine.state is State.RECORDING
    rig.clock.advance(2)
    rig.send(ev.StopHeld())
    assert rig.machine.state is State.READY and rig.recorder.calls[-1] == "stop"
    flags = [f["flag"] for f in rig.bodies("policy_flag")]
    assert flags.count("stop_refused") == 2 and flags.count("stop_during_mandatory") == 1
    assert rig.bodies("session_close")[0]["stop"] == "confirmed_hold"
    assert any("stopped_during_full_process_stage" in f for f in rig.report()["findings"])


def test_as_required_stage_stops_normally(tmp_path, signer, bureau_identity):
    rig = Rig(tmp_path, signer, bureau_identity, session={"category": "inspection", "stage": "on_site"})
    rig.send(ev.StartPressed(), ev.StopHeld())
    assert rig.machine.state is State.READY
    assert rig.bodies("session_close")[0]["stop"] == "normal"
    assert not [f for f in rig.bodies("policy_flag") if f["flag"].startswith("stop")]


@pytest.mark.parametrize("reason", [InterruptionReason.SEVERE_WEATHER, InterruptionReason.OBSTRUCTION,
                                    InterruptionReason.OTHER, InterruptionReason.DEVICE_DAMAGE])
def test_declared_interruption_pauses_and_resume_asks_for_the_reason(rig, reason):
    rig.send(ev.StartPressed(), ev.MarkPressed(), ev.MarkPressed())
    rig.send(ev.InterruptionDeclared(reason, "declared by test"))
    assert rig.machine.state is State.INTERRUPTED and rig.recorder.calls[-1] == "pause"
    rig.wait(30)
    rig.send(ev.StartPressed())
    assert rig.machine.state is State.RECORDING and rig.recorder.calls[-1] == "resume"
    assert rig.announcer.played[-1] == "state_interruption_reason"
    rig.speak(5)
    start, end = rig.bodies("interruption_start")[0], rig.bodies("interruption_end")[0]
    assert (start["reason"], start["source"], end["resumed"]) == (reason.value, "officer", True)
    reason_stmts = [b for b in rig.bodies("statement") if b["kind"] == "interruption_reason"]
    assert [b["event"] for b in reason_stmts] == ["start", "end"]
    assert reason_stmts[0]["interruption_id"] == start["interruption_id"]
    rig.send(ev.StopHeld())
    report = rig.report()
    assert report["compliant"], report["findings"]
    assert report["report"]["interruptions"][0]["explained"] is True


def test_unexplained_resume_is_a_finding(rig):
    rig.send(ev.StartPressed(), ev.MarkPressed(), ev.MarkPressed())
    rig.send(ev.PipelineFault("camera", "stall", "no frames for 3 s"))
    assert rig.machine.state is State.INTERRUPTED
    rig.send(ev.StartPressed())  # an automatic interruption does not resume by button
    assert rig.machine.state is State.INTERRUPTED
    rig.send(ev.PipelineRecovered("camera"))
    assert rig.machine.state is State.RECORDING
    rig.wait(45)
    rig.send(ev.StopHeld())
    report = rig.report()
    assert report["report"]["interruptions"][0]["reason"] == "device_fault"
    assert report["report"]["interruptions"][0]["source"] == "auto"
    assert "interruption_I1_device_fault_not_explained (R17)" in report["findings"]
    assert [f["component"] for f in rig.bodies("fault")] == ["camera"]


def test_microphone_failure_keeps_recording_and_is_logged(rig):
    rig.send(ev.StartPressed(), ev.PipelineFault("microphone", "overflow_storm"))
    assert rig.machine.state is State.RECORDING and rig.bodies("interruption_start") == []
    assert rig.bodies("fault")[0]["component"] == "microphone"


def test_overheat_interrupts_and_cooling_resumes(rig):
    rig.send(ev.StartPressed(), ev.ThermalReading(88.0))
    assert rig.machine.state is State.INTERRUPTED
    rig.send(ev.ThermalReading(80.0))
    assert rig.machine.state is State.INTERRUPTED  # hysteresis
    rig.send(ev.ThermalReading(70.0))
    assert rig.machine.state is State.RECORDING
    assert rig.bodies("interruption_start")[0]["reason"] == "device_fault"


def test_lens_covered_is_logged_as_obstruction_while_recording_continues(rig):
    rig.send(ev.StartPressed(), ev.LensCovered(rig.clock.mono_us()))
    assert rig.machine.state is State.RECORDING and "pause" not in rig.recorder.calls
    rig.send(ev.LensUncovered(rig.clock.mono_us()))
    start = rig.bodies("interruption_start")[0]
    assert (start["reason"], start["source"]) == ("obstruction", "auto")
    assert rig.bodies("interruption_end")[0]["resumed"] is True


def test_low_battery_interrupts_and_critical_battery_finalises_before_power_off(rig):
    rig.send(ev.StartPressed(), ev.BatteryReading(19))
    assert any(a["code"] == "battery_low" for a in rig.bodies("alarm"))
    rig.send(ev.BatteryReading(4))
    assert rig.machine.state is State.INTERRUPTED
    assert rig.bodies("interruption_start")[0]["reason"] == "low_battery"
    rig.send(ev.BatteryReading(2))
    assert rig.power.off and rig.recorder.calls == ["start", "pause"]  # the pause closed the segment
    types = [r["type"] for r in rig.records()]
    assert types[-1] == "shutdown" and "session_close" in types
    close = rig.bodies("session_close")[0]
    assert close["outcome"] == "unable_to_continue" and close["written_explanation_required"]
    assert "written_explanation_required (R17)" in rig.report()["findings"]
    # after the reboot the device tells the officer, once
    rig2 = rig.new_machine()
    rig2.on_boot()
    assert rig.announcer.played[-1] == "written_explanation_required"
    assert rig.bodies("alarm")[-1]["code"] == "written_explanation_required"
    before = len(rig.announcer.played)
    rig.new_machine().on_boot()
    assert len(rig.announcer.played) == before


def test_critical_battery_while_recording_stops_the_recorder_first(rig):
    rig.send(ev.StartPressed(), ev.BatteryReading(1))
    assert rig.recorder.calls == ["start", "pause"]  # the segment is closed and signed
    assert rig.power.off


def test_storage_full_with_nothing_to_purge_closes_unable_to_continue(rig):
    rig.send(ev.StartPressed(), ev.StorageReading(minutes_left=2.0, purgeable_minutes=0.0))
    assert rig.machine.state is State.READY
    assert rig.bodies("interruption_start")[0]["reason"] == "storage_full"
    assert rig.bodies("session_close")[0]["outcome"] == "unable_to_continue"


def test_storage_low_with_receipted_footage_purges_instead(rig):
    class Space:
        asked = 0.0

        def purge_receipted(self, minutes_needed: float) -> float:
            Space.asked = minutes_needed
            return minutes_needed

    rig.machine.space = Space()
    rig.send(ev.StartPressed(), ev.StorageReading(minutes_left=2.0, purgeable_minutes=50.0))
    assert rig.machine.state is State.RECORDING and Space.asked == pytest.approx(3.0)


def test_docking_closes_the_session_and_blocks_recording(rig):
    rig.send(ev.StartPressed(), ev.Docked("DOCK-1"))
    assert rig.machine.state is State.DOCKED
    rig.send(ev.StartPressed())
    assert rig.machine.state is State.DOCKED and rig.recorder.calls == ["start", "stop"]
    rig.send(ev.Undocked(), ev.StartPressed())
    assert rig.machine.state is State.RECORDING


def test_recording_reminder_every_two_minutes(rig):
    rig.send(ev.StartPressed(), ev.MarkPressed(), ev.MarkPressed())
    rig.wait(361)
    assert rig.announcer.played.count("recording_reminder") == 3


def test_context_from_bureau_binds_officer_and_stage(rig):
    rig.send(ev.SetContext("OFF-9", "penalty", "hearing", source="bureau"), ev.StartPressed())
    opened = rig.bodies("session_open")[0]
    assert (opened["officer_id"], opened["category"], opened["stage"]) == ("OFF-9", "penalty", "hearing")
    assert rig.bodies("session_context")[0]["source"] == "bureau"


def test_every_record_written_verifies(rig, bureau_identity):
    from agent.evidence.verify import Verifier

    rig.send(ev.StartPressed(), ev.InterruptionDeclared(InterruptionReason.OBSTRUCTION), ev.StartPressed())
    rig.speak(3)
    rig.send(ev.StopHeld())
    report = Verifier(bureau_identity).verify_path(rig.store.data_dir)
    assert report.ok, report.problems


def test_report_cli_prints_the_session_for_a_supervisor(rig, capsys):
    import json

    from agent.cli import main

    rig.send(ev.StartPressed(), ev.MarkPressed(), ev.InterruptionDeclared(InterruptionReason.SEVERE_WEATHER),
             ev.StartPressed())
    rig.wait(50)
    rig.send(ev.StopHeld())
    sid = rig.bodies("session_open")[0]["session_id"]
    assert main(["report", "--data-dir", str(rig.store.data_dir), "--session", sid]) == 0
    out = capsys.readouterr().out
    assert "opening statement   confirmed" in out and "notice to party     MISSING" in out
    assert "severe weather (officer); resumed; reason NOT stated" in out
    assert main(["report", "--data-dir", str(rig.store.data_dir), "--json", "--lang", "zh"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["session_id"] == sid and data[0]["compliant"] is False
    assert "notice_to_party_missing (R16)" in data[0]["findings"]


def test_statement_wait_counts_from_the_end_of_the_prompt(rig):
    rig.send(ev.StartPressed())
    rig.wait(15)  # a long prompt is still playing
    rig.send(ev.PromptFinished("session_started_opening_statement", rig.clock.mono_us()))
    rig.wait(15)
    assert rig.bodies("statement") == []  # 30 s since the press, only 15 s since the prompt ended
    rig.wait(6)
    assert [b["event"] for b in rig.bodies("statement")] == ["reminder"]


def test_every_prompt_the_machine_can_play_has_audio_in_the_catalogue():
    from agent.policy import MARKER_STEPS
    from agent.voice_prompts.catalogue import prompt

    ids = [f"interruption_{r.value}" for r in InterruptionReason]
    ids += [f"statement_reminder_{k}" for k in ("opening", "notice", "interruption_reason")]
    ids += [f"marker_{step}" for step in MARKER_STEPS]
    ids += ["session_started_opening_statement", "full_process_stage_notice", "stop_refused_full_process",
            "notice_to_party", "notice_prompt", "statement_missing", "state_interruption_reason", "session_stopped",
            "battery_warning", "critical_battery_shutdown", "written_explanation_required", "recording_reminder",
            "upload_overdue"]
    for pid in ids:
        prompt(pid)


def test_a_session_left_open_by_a_crash_is_closed_at_boot_with_its_report(rig):
    rig.send(ev.StartPressed(), ev.MarkPressed())
    sid = rig.bodies("session_open")[0]["session_id"]
    # power cut: no stop; the next boot's machine finds the session open
    rig.new_machine().on_boot()
    close = rig.bodies("session_close")[0]
    assert (close["session_id"], close["outcome"], close["stop"]) == (sid, "recovered", "crash")
    assert rig.report()["session_id"] == sid
    rig.new_machine().on_boot()
    assert len(rig.bodies("session_close")) == 1  # once


def test_sensor_faults_are_logged_without_interrupting(rig):
    rig.send(ev.StartPressed(), ev.PipelineFault("battery", "fuel_gauge_unreadable"),
             ev.PipelineFault("thermal", "thermal_unreadable"), ev.PipelineFault("other", "mux_error"))
    assert rig.machine.state is State.RECORDING and rig.bodies("interruption_start") == []
    assert [f["code"] for f in rig.bodies("fault")] == ["fuel_gauge_unreadable", "thermal_unreadable", "mux_error"]


def test_a_late_tick_still_gives_the_reminder_before_missing(rig):
    rig.send(ev.StartPressed())
    rig.clock.advance(60)  # one tick after a long stall spans both thresholds
    rig.send(ev.Tick())
    assert [b["event"] for b in rig.bodies("statement")] == ["reminder"]
    rig.clock.advance(1)
    rig.send(ev.Tick())
    assert [b["event"] for b in rig.bodies("statement")] == ["reminder", "missing"]


def test_the_wait_is_held_while_the_device_is_still_talking(rig):
    rig.machine.prompts_report_finish = True
    rig.send(ev.StartPressed())
    rig.wait(50)  # the prompt has not finished playing: no reminder, no missing
    assert rig.bodies("statement") == []
    for pid in ("session_started_opening_statement",):
        rig.send(ev.PromptFinished(pid, rig.clock.mono_us()))
    rig.wait(21)
    assert [b["event"] for b in rig.bodies("statement")] == ["reminder"]


def test_runner_ticks_on_time_even_when_events_keep_arriving():
    from agent.session import SessionRunner

    class Recorder:
        def __init__(self):
            self.ticks = 0

        def handle(self, e):
            if isinstance(e, ev.Tick):
                self.ticks += 1

    import time

    machine = Recorder()
    runner = SessionRunner(machine, tick_s=0.05)
    runner.start()
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        runner.post(ev.MarkPressed())
        time.sleep(0.01)
    runner.stop()
    assert machine.ticks >= 8
