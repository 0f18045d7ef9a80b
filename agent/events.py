"""Events the session state machine consumes. Producers (controls, monitors, capture pipeline, speech
detector, dock link, bureau commands) put these on the machine's queue; only the machine decides."""

from __future__ import annotations

from dataclasses import dataclass

from agent.evidence.records import InterruptionReason


@dataclass(frozen=True)
class StartPressed:
    """The start gesture (double press of RECORD): start a session, or resume after an interruption."""


@dataclass(frozen=True)
class StopHeld:
    """RECORD held for `stop_hold_s`."""


@dataclass(frozen=True)
class MarkPressed:
    """A short MARK press: confirms a statement the device is waiting for, else a general marker."""


@dataclass(frozen=True)
class MarkerSelected:
    """An R9 step / R15 focus chosen from the MARK voice menu."""

    step: str


@dataclass(frozen=True)
class InterruptionDeclared:
    """The officer declares an interruption through the voice menu (weather, obstruction, other, ...)."""

    reason: InterruptionReason
    detail: str = ""


@dataclass(frozen=True)
class SpeechStarted:
    at_us: int


@dataclass(frozen=True)
class SpeechEnded:
    at_us: int
    duration_us: int


@dataclass(frozen=True)
class BatteryReading:
    percent: int


@dataclass(frozen=True)
class ThermalReading:
    celsius: float


@dataclass(frozen=True)
class StorageReading:
    minutes_left: float  # in free space alone
    purgeable_minutes: float  # more that purging receipted footage would free


@dataclass(frozen=True)
class PipelineFault:
    component: str  # camera, encoder, microphone, storage, queue
    code: str
    detail: str = ""


@dataclass(frozen=True)
class PipelineRecovered:
    component: str


@dataclass(frozen=True)
class LensCovered:
    at_us: int


@dataclass(frozen=True)
class LensUncovered:
    at_us: int


@dataclass(frozen=True)
class Docked:
    dock_id: str | None = None


@dataclass(frozen=True)
class Undocked:
    pass


@dataclass(frozen=True)
class SetContext:
    officer_id: str | None
    category: str | None
    stage: str | None
    source: str = "officer"  # officer | bureau | config


@dataclass(frozen=True)
class PromptFinished:
    """The speaker finished a prompt: waiting for a statement counts from here, not from the request."""

    prompt_id: str
    at_us: int


@dataclass(frozen=True)
class Tick:
    """Periodic (about once a second): timeouts and reminders are evaluated on ticks."""


Event = (StartPressed | StopHeld | MarkPressed | MarkerSelected | InterruptionDeclared | SpeechStarted
         | SpeechEnded | BatteryReading | ThermalReading | StorageReading | PipelineFault | PipelineRecovered
         | LensCovered | LensUncovered | Docked | Undocked | SetContext | PromptFinished | Tick)
