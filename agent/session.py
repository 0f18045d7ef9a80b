"""The session state machine: the one place that decides what the device is doing (DESIGN.md, "Recording").

    READY --start--> RECORDING --(interruption)--> INTERRUPTED --resume--> RECORDING ... --stop--> READY
    any --docked--> DOCKED --undocked--> READY          (never records while docked)

Thread: `handle()` runs on the state machine thread only (`SessionRunner` feeds it from a bounded queue);
tests call it directly. It talks to the rest of the device through small ports (Recorder, Announcer,
PowerControl, SpaceControl) and writes every decision to the ledger:
- R16: a session spans arrival to departure; the opening statement and the notice to the party are prompted,
  detected (speech or MARK) and logged, reminded, and flagged `statement_missing` if never given;
- R17: every interruption has start, end, reason, source (auto/officer); on resume the officer is prompted for
  the reason and the spoken explanation is logged; a session that cannot resume is closed
  `unable_to_continue` and flagged "written explanation required";
- R14/Annex: in a full-process stage a stop needs a confirmed second hold and is flagged;
- R24: at close, a compliance report record (agent/compliance.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from agent import events as ev
from agent.clock import Clock
from agent.compliance import build_report
from agent.config import AgentConfig
from agent.evidence.records import InterruptionReason
from agent.policy import Stage, stage
from agent.storage.ledger import Ledger
from agent.storage.store import new_session_id

log = logging.getLogger(__name__)
R = InterruptionReason
US = 1_000_000
PENDING_EXPLANATION_KEY = "pending_written_explanation"
PROMPT_HOLD_MAX_US = 120 * US


class State(StrEnum):
    READY = "READY"
    RECORDING = "RECORDING"
    INTERRUPTED = "INTERRUPTED"
    DOCKED = "DOCKED"


class Recorder(Protocol):
    """The capture pipeline, as the state machine sees it."""

    def start_session(self, session_id: str) -> None: ...  # pre-event ring first, then live packets

    def pause_session(self) -> None: ...  # close the current segment; keep buffering

    def resume_session(self) -> None: ...  # next segment of the same session

    def stop_session(self) -> None: ...  # close and sign the current segment


class Announcer(Protocol):
    def play(self, prompt_id: str) -> None: ...

    def vibrate(self, pattern: str) -> None: ...


class PowerControl(Protocol):
    def power_off(self) -> None: ...


class SpaceControl(Protocol):
    def purge_receipted(self, minutes_needed: float) -> float: ...  # returns minutes freed


@dataclass
class Expectation:
    """A statement the device is waiting for (R16 opening/notice, R17 interruption reason)."""

    kind: str  # opening | notice | interruption_reason
    since_us: int
    interruption_id: str | None = None
    speaking_since_us: int | None = None
    reminded: bool = False


@dataclass
class Interruption:
    interruption_id: str
    reason: R
    source: str  # auto | officer
    pauses_recording: bool
    component: str | None = None


@dataclass
class Session:
    session_id: str
    officer_id: str | None
    stage: Stage | None
    started_us: int
    interruption: Interruption | None = None
    interruptions: int = 0
    expectations: list[Expectation] = field(default_factory=list)
    stop_confirm_until_us: int | None = None
    last_reminder_us: int = 0


class SessionMachine:
    def __init__(self, config: AgentConfig, ledger: Ledger, clock: Clock, recorder: Recorder,
                 announcer: Announcer, power: PowerControl | None = None, space: SpaceControl | None = None,
                 meta: Any | None = None):
        self.cfg = config
        self.ledger = ledger
        self.clock = clock
        self.recorder = recorder
        self.announcer = announcer
        self.power = power
        self.space = space
        self.meta = meta  # the store's Database (get_meta/set_meta): notices that must survive a reboot
        self.state = State.READY
        self.session: Session | None = None
        self.officer_id = config.device.officer_id
        self.stage = stage(config.session.category, config.session.stage)
        self.battery_warned: set[int] = set()
        self.on_closed: Any = None  # called with (session_id, mandatory, compliance report) after a close
        # With a real speaker, PromptFinished events arrive: a statement's wait is held while the device is
        # still talking (prompts the machine asked for and that have not finished).
        self.prompts_report_finish = False
        self._speaking: Counter[str] = Counter()
        self._speaking_since_us: int | None = None
        self.hot = False
        self.powered_off = False

    # --- helpers ----------------------------------------------------------------------------------

    def _now(self) -> int:
        return self.clock.mono_us()

    def _say(self, prompt_id: str, purpose: str) -> None:
        self.announcer.play(prompt_id)
        if self.prompts_report_finish:
            self._speaking[prompt_id] += 1
            self._speaking_since_us = self._speaking_since_us or self._now()
        self.ledger.append("prompt", {"session_id": self.session.session_id if self.session else None,
                                      "prompt_id": prompt_id, "language": self.cfg.device.language,
                                      "purpose": purpose})

    def _record(self, rtype: str, body: dict[str, Any]) -> None:
        self.ledger.append(rtype, body)

    def _flag(self, flag: str, detail: str = "") -> None:
        s = self.session
        self._record("policy_flag", {"session_id": s.session_id, "flag": flag,
                                     "stage": s.stage.key if s.stage else None, "detail": detail})

    # --- entry point ------------------------------------------------------------------------------

    def handle(self, event: ev.Event) -> None:
        """Apply one event. Never raises for a well-formed event that does not fit the state: it is ignored."""
        if self.powered_off:
            return
        method = getattr(self, f"_on_{type(event).__name__}", None)
        if method is None:
            log.warning("unhandled event %r", event)
            return
        method(event)

    # --- session start / stop ---------------------------------------------------------------------

    def _on_StartPressed(self, _: ev.StartPressed) -> None:
        if self.state is State.READY:
            self._open_session("button")
        elif (self.state is State.INTERRUPTED and self.session and self.session.interruption
              and self.session.interruption.source == "officer"):
            self._end_interruption(resumed=True)  # automatic interruptions resume when their cause clears

    def _open_session(self, trigger: str) -> None:
        session_id = new_session_id(self.clock.wall_us())
        now = self._now()
        self.session = Session(session_id, self.officer_id, self.stage, now, last_reminder_us=now)
        self._record("session_open", {
            "session_id": session_id, "officer_id": self.officer_id,
            "category": self.stage.category if self.stage else None, "stage": self.stage.code if self.stage else None,
            "trigger": trigger, "pre_event_us": self.cfg.recording.pre_event_s * US})
        self.recorder.start_session(session_id)
        self.state = State.RECORDING
        self.announcer.vibrate("start")
        self._say("session_started_opening_statement", "opening_statement")
        self.session.expectations = [Expectation("opening", now)]
        if self.stage and self.stage.mandatory:
            self._say("full_process_stage_notice", "policy")

    def _on_StopHeld(self, _: ev.StopHeld) -> None:
        s = self.session
        if s is None or self.state not in (State.RECORDING, State.INTERRUPTED):
            return
        now = self._now()
        if s.stage and s.stage.mandatory:
            if s.stop_confirm_until_us is None or now > s.stop_confirm_until_us:
                s.stop_confirm_until_us = now + int(self.cfg.session.confirm_window_s * US)
                self._flag("stop_refused", "first hold in a full-process stage; hold again to confirm")
                self._say("stop_refused_full_process", "policy")
                return
            self._flag("stop_during_mandatory", "stop confirmed by a second hold")
            self._close_session("completed", "confirmed_hold")
        else:
            self._close_session("completed", "normal")

    def _close_session(self, outcome: str, stop: str, explanation_required: bool = False) -> None:
        s = self.session
        if s.interruption is not None:
            self._end_interruption(resumed=False)
        for exp in s.expectations:
            self._statement(exp, "missing", "timeout", self._now())
        s.expectations.clear()
        if self.state is State.RECORDING:
            self.recorder.stop_session()
        if explanation_required:
            self._flag("written_explanation_required", f"session closed: {outcome}")
            if self.meta is not None:
                self.meta.set_meta(PENDING_EXPLANATION_KEY, s.session_id)
        self._record("session_close", {"session_id": s.session_id, "outcome": outcome, "stop": stop,
                                       "written_explanation_required": explanation_required})
        report = build_report(self.ledger, s.session_id)
        self._record("compliance_report", report.as_record_body())
        if self.on_closed is not None:
            try:
                self.on_closed(s.session_id, bool(s.stage and s.stage.mandatory), report)
            except Exception:
                log.exception("session close callback failed")
        self.state = State.READY
        self.session = None
        self.announcer.vibrate("stop")
        self.announcer.play("session_stopped")

    # --- statements -------------------------------------------------------------------------------

    def _statement(self, exp: Expectation, event: str, detected_by: str, at_us: int) -> None:
        self._record("statement", {"session_id": self.session.session_id, "kind": exp.kind, "event": event,
                                   "detected_by": detected_by, "at_us": at_us,
                                   "interruption_id": exp.interruption_id})
        if event == "missing":
            self._flag("statement_missing", f"{exp.kind} not given")

    def _statement_done(self, exp: Expectation) -> None:
        """`exp` is settled (given or missing); the notice to the party follows the opening statement."""
        s = self.session
        s.expectations.remove(exp)
        if exp.kind == "opening":
            now = self._now()
            if self.cfg.session.play_notice_aloud:
                self._say("notice_to_party", "notice")
                self._statement(Expectation("notice", now), "confirmed", "device", now)
            else:
                self._say("notice_prompt", "notice")
                s.expectations.append(Expectation("notice", now))

    def _on_SpeechStarted(self, e: ev.SpeechStarted) -> None:
        if self.session and self.session.expectations and self.state is State.RECORDING:
            exp = self.session.expectations[0]
            if exp.speaking_since_us is None:
                exp.speaking_since_us = e.at_us

    def _on_SpeechEnded(self, e: ev.SpeechEnded) -> None:
        if not (self.session and self.session.expectations and self.state is State.RECORDING):
            return
        exp = self.session.expectations[0]
        start = exp.speaking_since_us if exp.speaking_since_us is not None else e.at_us - e.duration_us
        exp.speaking_since_us = None
        if e.duration_us < self.cfg.statements.min_speech_s * US:
            return  # a cough, a word, a door: not a statement
        self._statement(exp, "start", "vad", start)
        self._statement(exp, "end", "vad", e.at_us)
        self._statement_done(exp)

    def _on_PromptFinished(self, e: ev.PromptFinished) -> None:
        # The officer cannot start speaking while the device is still talking; the wait starts now.
        if self._speaking[e.prompt_id] > 0:
            self._speaking[e.prompt_id] -= 1
            self._speaking += Counter()  # drop zero counts
            if not self._speaking:
                self._speaking_since_us = None
        if self.session:
            for exp in self.session.expectations:
                exp.since_us = max(exp.since_us, e.at_us)

    def _on_MarkPressed(self, _: ev.MarkPressed) -> None:
        s = self.session
        if s is None or self.state is not State.RECORDING:
            return
        if s.expectations:
            exp = s.expectations[0]
            self._statement(exp, "confirmed", "mark", self._now())
            self._statement_done(exp)
        else:
            self._record("marker", {"session_id": s.session_id, "step": "general"})
        self.announcer.vibrate("mark")

    def _on_MarkerSelected(self, e: ev.MarkerSelected) -> None:
        if self.session and self.state is State.RECORDING:
            self._record("marker", {"session_id": self.session.session_id, "step": e.step})
            self.announcer.play(f"marker_{e.step}")

    # --- interruptions ----------------------------------------------------------------------------

    def _begin_interruption(self, reason: R, source: str, detail: str, pauses: bool,
                            component: str | None = None) -> None:
        s = self.session
        if s is None or s.interruption is not None:
            return
        s.interruptions += 1
        s.interruption = Interruption(f"I{s.interruptions}", reason, source, pauses, component)
        self._record("interruption_start", {"session_id": s.session_id,
                                            "interruption_id": s.interruption.interruption_id,
                                            "reason": reason.value, "source": source, "detail": detail})
        if pauses and self.state is State.RECORDING:
            self.recorder.pause_session()
            self.state = State.INTERRUPTED
        s.expectations = [x for x in s.expectations if x.kind != "interruption_reason"]
        self.announcer.vibrate("interrupt")
        self._say(f"interruption_{reason.value}", "interruption")

    def _end_interruption(self, resumed: bool) -> None:
        s = self.session
        intr = s.interruption
        s.interruption = None
        self._record("interruption_end", {"session_id": s.session_id, "interruption_id": intr.interruption_id,
                                          "reason": intr.reason.value, "resumed": resumed,
                                          "spoken_reason_given": None})
        if not resumed:
            return
        if self.state is State.INTERRUPTED:
            self.recorder.resume_session()
            self.state = State.RECORDING
        self._say("state_interruption_reason", "interruption_reason")
        s.expectations.insert(0, Expectation("interruption_reason", self._now(), intr.interruption_id))

    def _on_InterruptionDeclared(self, e: ev.InterruptionDeclared) -> None:
        if self.state is State.RECORDING:
            self._begin_interruption(e.reason, "officer", e.detail, pauses=True)

    def _on_PipelineFault(self, e: ev.PipelineFault) -> None:
        s = self.session
        self._record("fault", {"component": e.component if e.component in _FAULT_COMPONENTS else "other",
                               "code": e.code, "detail": e.detail, "session_id": s.session_id if s else None})
        if s is None or e.component not in RECORDING_COMPONENTS:
            # Video keeps recording without sound, a full queue is counted, a sensor that cannot be read is
            # a fault to repair: none of these stops the recording, so none is an interruption.
            return
        if e.component == "storage":
            self._storage_exhausted(e.detail or e.code)
        elif self.state is State.RECORDING:
            self._begin_interruption(R.DEVICE_FAULT, "auto", f"{e.component}: {e.code} {e.detail}".strip(),
                                     pauses=True, component=e.component)

    def _on_PipelineRecovered(self, e: ev.PipelineRecovered) -> None:
        s = self.session
        if s and s.interruption and s.interruption.component == e.component and self.state is State.INTERRUPTED:
            self._end_interruption(resumed=True)

    def _on_LensCovered(self, e: ev.LensCovered) -> None:
        # Recording goes on (the microphone still hears the scene); the gap in the picture is logged.
        if self.state is State.RECORDING:
            self._begin_interruption(R.OBSTRUCTION, "auto", "lens covered (dark, flat frames)", pauses=False,
                                     component="lens")

    def _on_LensUncovered(self, e: ev.LensUncovered) -> None:
        s = self.session
        if s and s.interruption and s.interruption.component == "lens":
            self._end_interruption(resumed=True)

    def _on_BatteryReading(self, e: ev.BatteryReading) -> None:
        p = self.cfg.power
        if e.percent <= p.critical_percent:
            self._critical_battery(e.percent)
            return
        for level in sorted(p.warn_percent):
            if e.percent <= level and level not in self.battery_warned:
                self.battery_warned.add(level)
                self._record("alarm", {"code": "battery_low", "severity": "warning",
                                       "detail": f"battery at {e.percent}% (warning level {level}%)"})
                self.announcer.play("battery_warning")
                break
        if e.percent <= p.low_percent and self.state is State.RECORDING:
            self._begin_interruption(R.LOW_BATTERY, "auto", f"battery at {e.percent}%", pauses=True,
                                     component="battery")
        elif e.percent > p.low_percent:
            s = self.session
            if s and s.interruption and s.interruption.component == "battery":
                self._end_interruption(resumed=True)  # battery swapped or charging
            self.battery_warned = {w for w in self.battery_warned if w < e.percent}

    def _critical_battery(self, percent: int) -> None:
        """Finalise and sign what is being recorded, say so in the ledger, then power off (DESIGN.md)."""
        if self.session is not None:
            if self.session.interruption is None:
                self._begin_interruption(R.LOW_BATTERY, "auto", f"critical battery {percent}%", pauses=True,
                                         component="battery")
            self._close_session("unable_to_continue", "forced", explanation_required=True)
        self._record("shutdown", {"reason": "critical_battery"})
        self.announcer.play("critical_battery_shutdown")
        self.powered_off = True
        if self.power is not None:
            self.power.power_off()

    def _on_ThermalReading(self, e: ev.ThermalReading) -> None:
        t = self.cfg.thermal
        if e.celsius >= t.max_cpu_c and not self.hot:
            self.hot = True
            self._record("fault", {"component": "thermal", "code": "over_temperature", "detail": f"{e.celsius:.1f} C",
                                   "session_id": self.session.session_id if self.session else None})
            if self.state is State.RECORDING:
                self._begin_interruption(R.DEVICE_FAULT, "auto", f"over temperature {e.celsius:.1f} C", pauses=True,
                                         component="thermal")
        elif e.celsius <= t.resume_cpu_c and self.hot:
            self.hot = False
            s = self.session
            if s and s.interruption and s.interruption.component == "thermal":
                self._end_interruption(resumed=True)

    def _on_StorageReading(self, e: ev.StorageReading) -> None:
        if self.session is None or e.minutes_left >= self.cfg.storage.min_minutes_left:
            return
        needed = self.cfg.storage.min_minutes_left - e.minutes_left
        if e.purgeable_minutes > 0 and self.space is not None and self.space.purge_receipted(needed) >= needed:
            return  # receipted footage made room; unreceipted footage is never deleted
        self._storage_exhausted(f"{e.minutes_left:.1f} min left, nothing receipted to purge")

    def _storage_exhausted(self, detail: str) -> None:
        if self.session is None:
            return
        if self.session.interruption is None:
            self._begin_interruption(R.STORAGE_FULL, "auto", detail, pauses=True, component="storage")
        # Only docking can free space: the session cannot resume (R17 written explanation).
        self._close_session("unable_to_continue", "forced", explanation_required=True)

    # --- context, dock, time ----------------------------------------------------------------------

    def _on_SetContext(self, e: ev.SetContext) -> None:
        new_stage = stage(e.category, e.stage)
        self.officer_id, self.stage = e.officer_id, new_stage
        s = self.session
        if s is not None:
            s.officer_id, s.stage = e.officer_id, new_stage
        self._record("session_context", {
            "session_id": s.session_id if s else None, "officer_id": e.officer_id, "category": e.category,
            "stage": e.stage, "mandatory": bool(new_stage and new_stage.mandatory), "source": e.source})

    def _on_Docked(self, e: ev.Docked) -> None:
        if self.session is not None:
            self._close_session("docked", "normal")
        self.state = State.DOCKED
        self._record("dock", {"dock_id": e.dock_id, "event": "docked"})

    def _on_Undocked(self, _: ev.Undocked) -> None:
        if self.state is State.DOCKED:
            self.state = State.READY
            self._record("dock", {"dock_id": None, "event": "undocked"})

    def _on_Tick(self, _: ev.Tick) -> None:
        s = self.session
        if s is None:
            return
        now = self._now()
        if s.stop_confirm_until_us is not None and now > s.stop_confirm_until_us:
            s.stop_confirm_until_us = None
        interval = self.cfg.recording.reminder_interval_s * US
        if interval and self.state is State.RECORDING and now - s.last_reminder_us >= interval:
            s.last_reminder_us = now
            self.announcer.vibrate("reminder")
            self.announcer.play("recording_reminder")
        if self.state is not State.RECORDING or not s.expectations:
            return
        exp = s.expectations[0]
        if exp.speaking_since_us is not None:
            return  # the officer is talking: wait for the end
        if self._speaking and now - (self._speaking_since_us or now) < PROMPT_HOLD_MAX_US:
            exp.since_us = now  # the device is still talking (a lost PromptFinished holds at most 2 min)
            return
        waited = now - exp.since_us
        st = self.cfg.statements
        if not exp.reminded:
            if waited >= st.reminder_after_s * US:  # always a reminder before `missing`, however late
                exp.reminded = True
                self._statement(exp, "reminder", "timeout", now)
                self._say(f"statement_reminder_{exp.kind}", "statement")
        elif waited >= st.missing_after_s * US:
            self._statement(exp, "missing", "timeout", now)
            self._say("statement_missing", "statement")
            self._statement_done(exp)

    def shutdown(self) -> None:
        """The agent is stopping: close an open session (its segment is finalised and signed first)."""
        if self.session is not None and not self.powered_off:
            self._close_session("shutdown", "forced")

    # --- boot -------------------------------------------------------------------------------------

    def close_orphaned_sessions(self) -> list[str]:
        """Sessions a crash or power cut left open are closed now (outcome `recovered`, stop `crash`), with
        their compliance report: the ledger never shows a session as still running when it is not."""
        opened: dict[str, None] = {}
        for rec in self.ledger.records():
            f = rec.fields
            if f["type"] == "session_open":
                opened[f["body"]["session_id"]] = None
            elif f["type"] == "session_close":
                opened.pop(f["body"]["session_id"], None)
        for session_id in opened:
            self._record("session_close", {"session_id": session_id, "outcome": "recovered", "stop": "crash",
                                           "written_explanation_required": False})
            report = build_report(self.ledger, session_id)
            self._record("compliance_report", report.as_record_body())
            if self.on_closed is not None:
                try:
                    self.on_closed(session_id, False, report)
                except Exception:
                    log.exception("session close callback failed")
        return list(opened)

    def on_boot(self) -> None:
        """After a reboot: close sessions a crash left open, and tell the officer (and, through the ledger,
        the bureau) about a session that could not continue and still needs a written explanation (R17)."""
        self.close_orphaned_sessions()
        if self.meta is None:
            return
        pending = self.meta.get_meta(PENDING_EXPLANATION_KEY)
        if pending:
            self._record("alarm", {"code": "written_explanation_required", "severity": "warning",
                                   "detail": f"session {pending} could not continue; a written explanation is due"})
            self.announcer.play("written_explanation_required")
            self.meta.set_meta(PENDING_EXPLANATION_KEY, None)  # told once; the alarm record carries it on


# Faults of these parts mean footage is not being recorded: they interrupt the session (R17).
RECORDING_COMPONENTS = ("camera", "encoder", "storage")
_FAULT_COMPONENTS = {"camera", "encoder", "microphone", "speaker", "storage", "gps", "dock", "battery", "thermal",
                     "clock", "queue", "other"}


class SessionRunner:
    """Runs a SessionMachine on its own thread, fed by a bounded queue; producers never block."""

    def __init__(self, machine: SessionMachine, maxsize: int = 1000, tick_s: float = 1.0):
        self.machine = machine
        self.events: queue.Queue[ev.Event] = queue.Queue(maxsize)
        self.dropped = 0
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session", daemon=True)

    def post(self, event: ev.Event) -> bool:
        try:
            self.events.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            log.error("session event queue full; dropped %r (%d so far)", event, self.dropped)
            return False

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Ticks come on a deadline, however busy the queue is: timeouts and reminders must not starve.
        next_tick = time.monotonic() + self.tick_s
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.tick_s
                self._handle(ev.Tick())
                continue
            try:
                event = self.events.get(timeout=next_tick - now)
            except queue.Empty:
                continue
            self._handle(event)

    def _handle(self, event: ev.Event) -> None:
        try:
            self.machine.handle(event)
        except Exception:  # one bad event must not stop the device deciding
            log.exception("session machine failed on %r", event)
