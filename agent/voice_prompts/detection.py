"""Spoken-statement detection (R16 opening statement and notice, R17 interruption reason) from microphone PCM.

Public API:
    detector = StatementDetector(VadConfig(sample_rate=48000), activity=speaker_activity)
    listener = StatementListener(detector, on_event=post_to_session_machine, clock_mono_us=clock.mono_us)
    listener.start()
    listener.offer(pcm, first_sample_us)        capture thread: never blocks; False (counted) if the queue is full
    listener.expect("opening", since_us)        arm when the prompt is requested or has played; replaces any
                                                expectation still open
    listener.confirm_by_mark(at_us)             a MARK press confirms the statement
    listener.cancel(at_us)                      the session stopped: stop waiting
    listener.stop()

`on_event` receives SpeechEvent (every stretch of speech, armed or not) and StatementEvent (only while a
statement is expected; `StatementEvent.record_body(session_id)` is the body of the `statement` ledger record).
For an expected statement the sequence is one of:
    start(vad) ... end(vad)                     spoken, at least `min_statement_s` of speech
    reminder(timeout) ... start/end or confirmed or missing(timeout)
    [start(vad)] confirmed(mark) [end(vad)]     MARK pressed (start/end are added if speech was under way)
All times are on the monotonic clock that stamps the PCM (`first_sample_us` = time of the chunk's first
sample), so a statement's start is the moment speech began, not the moment it was recognised. Timeouts
count from `since_us` but not while the device's speaker sounds (the prompt itself, a reminder prompt), so
arming when the prompt is requested and arming when it has finished give the officer the same time.
Arm promptly: audio already analysed before `expect` is not looked at again.

How speech is told from noise (a real detector, not a level threshold):
- each 30 ms frame is voiced only if ALL of: the WebRTC VAD (a GMM over six sub-band energies, trained on
  speech; 8/16/32/48 kHz) says speech; the frame is `energy_margin_db` above a running noise floor (fast to
  fall, slow to rise) and above `min_level_dbfs`; and a voice pitch (periodicity at 65-400 Hz) was heard
  within `pitch_hold_ms`. Measured on hw_sim's scenes: WebRTC plus the floor still take passing cars
  and door slams in street noise for speech; the pitch test removes them (noise and bangs are not
  periodic), while a steady horn or alarm tone (periodic, but at one unchanging pitch) is ignored after
  ~0.25 s because a voice's pitch moves;
- speech starts when `start_voiced_fraction` of a `start_window_s` window is voiced (a cough or a door
  slam is too short) and ends after `end_silence_s` without speech (pauses between sentences do not split it);
- a statement needs `min_statement_s` of speech; shorter utterances ("hello?") do not count;
- whispering has no pitch and is not detected (the officer confirms with MARK instead);
- frames while the device's own speaker is sounding (SpeakerActivity) are never voiced: the microphone
  must not take a prompt for the officer's statement.

Threads: StatementDetector is plain, single-threaded code (tests drive it directly). StatementListener runs
it on its own "statement-vad" thread: the capture thread only copies bytes into a bounded queue (`offer`),
so VAD work (about 0.1 ms per 30 ms frame on x86, under 0.5 % of a core) never delays capture; commands
(`expect`, `confirm_by_mark`, `cancel`) are applied on the same thread, before any PCM still queued.
`on_event` is called on the "statement-vad" thread and must not block (post to the session machine's
queue). When the microphone delivers nothing, the thread's `tick` keeps timeouts running from the clock.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import webrtcvad
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.voice_prompts.catalogue import StatementKind
from agent.voice_prompts.playback import SpeakerActivity

log = logging.getLogger(__name__)

US = 1_000_000
FULL_SCALE_DB = 20 * math.log10(32768)


class PcmFormatError(ValueError):
    """PCM that is not 16-bit mono little-endian (odd byte count) or has an impossible timestamp."""


class DetectorStateError(RuntimeError):
    """A statement is already expected (cancel it first)."""


class VadConfig(BaseModel):
    """Voice activity and statement timing. Bounds keep a typo from disabling detection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: Literal[8000, 16000, 32000, 48000] = Field(16000, description="microphone rate (16-bit mono)")
    frame_ms: Literal[10, 20, 30] = Field(30, description="VAD frame length")
    aggressiveness: int = Field(2, ge=0, le=3, description="WebRTC VAD mode: 3 rejects the most non-speech")
    energy_margin_db: float = Field(6.0, ge=0.0, le=30.0, description="voiced frames exceed the noise floor by")
    min_level_dbfs: float = Field(-55.0, ge=-90.0, le=-10.0, description="quieter frames are never speech")
    floor_rise_db_per_s: float = Field(1.0, gt=0.0, le=20.0, description="how fast the noise floor may rise")
    periodicity_threshold: float = Field(0.45, ge=0.0, le=1.0, description="pitch autocorrelation for voiced")
    pitch_hold_ms: int = Field(240, ge=0, le=1000, description="speech-like frames this soon after pitch count")
    reject_steady_tones: bool = Field(True, description="a pitch that does not move (horn, alarm) is no voice")
    start_window_s: float = Field(1.0, ge=0.2, le=5.0, description="window in which speech must dominate")
    start_voiced_fraction: float = Field(0.6, gt=0.0, le=1.0, description="voiced share of that window to start")
    end_silence_s: float = Field(1.5, ge=0.3, le=10.0, description="silence that ends speech (hangover)")
    min_statement_s: float = Field(1.5, ge=0.3, le=30.0, description="shortest speech that counts as a statement")
    reminder_after_s: float = Field(20.0, ge=1.0, le=300.0, description="no statement this long -> reminder")
    missing_after_s: float = Field(40.0, ge=2.0, le=600.0, description="still none -> missing (from the prompt)")

    @model_validator(mode="after")
    def _missing_after_reminder(self) -> VadConfig:
        if self.missing_after_s <= self.reminder_after_s:
            raise ValueError(f"missing_after_s ({self.missing_after_s}) must exceed reminder_after_s "
                             f"({self.reminder_after_s})")
        return self

    @property
    def frame_us(self) -> int:
        return self.frame_ms * 1000

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // 1000


@dataclass(frozen=True)
class SpeechEvent:
    """A stretch of speech on the microphone (reported whether or not a statement is expected)."""

    event: Literal["started", "ended"]
    at_us: int  # started: when speech began; ended: end of the last voiced frame
    duration_us: int = 0  # ended only


@dataclass(frozen=True)
class StatementEvent:
    kind: StatementKind
    event: Literal["start", "end", "confirmed", "reminder", "missing"]
    detected_by: Literal["vad", "mark", "timeout"]
    at_us: int
    interruption_id: str | None = None

    def record_body(self, session_id: str) -> dict[str, Any]:
        """Body of the `statement` ledger record (agent.evidence.records.Statement)."""
        return {"session_id": session_id, "kind": self.kind.value, "event": self.event,
                "detected_by": self.detected_by, "at_us": self.at_us, "interruption_id": self.interruption_id}


DetectorEvent = SpeechEvent | StatementEvent


class FrameClassifier:
    """Voiced / not voiced for one frame: WebRTC VAD, energy above an adaptive noise floor, and pitch.

    Pitch (periodicity): voiced speech repeats at the speaker's fundamental (65-400 Hz); traffic, wind, rain
    and bangs do not. A frame is "pitched" when the normalised autocorrelation of the pre-emphasised signal
    (this frame and the one before) peaks above `periodicity_threshold` at a lag in that range. Consonants
    between vowels are not pitched, so a frame counts as speech when pitch was seen within `pitch_hold_ms`.
    """

    def __init__(self, cfg: VadConfig) -> None:
        self.cfg = cfg
        self._vad = webrtcvad.Vad(cfg.aggressiveness)
        self._rise_per_frame = cfg.floor_rise_db_per_s * cfg.frame_ms / 1000
        self._decimate = {8000: 1, 16000: 1, 32000: 2, 48000: 3}[cfg.sample_rate]
        self._pitch_rate = cfg.sample_rate // self._decimate
        self._lags = np.arange(self._pitch_rate // 400, self._pitch_rate // 65 + 1)
        self._hold_frames = max(0, cfg.pitch_hold_ms // cfg.frame_ms)
        self._since_pitch = self._hold_frames + 1
        self._previous = np.zeros(cfg.frame_samples, np.int16)
        self._pitch_lags: deque[tuple[int, int]] = deque(maxlen=8)  # (frame index, lag) of pitched frames
        self.frame_index = 0
        self.noise_floor_dbfs: float | None = None

    def level_dbfs(self, frame: np.ndarray) -> float:
        power = float(np.mean(np.square(frame, dtype=np.float64)))
        return 10 * math.log10(power + 1.0) - FULL_SCALE_DB

    def periodicity(self, samples: np.ndarray) -> tuple[float, int]:
        """(highest normalised autocorrelation 0..1 at a pitch lag, that lag) after pre-emphasis."""
        x = samples.astype(np.float64)
        if self._decimate > 1:  # pitch needs no more than 16 kHz; averaging is a good enough anti-alias here
            x = x[:x.size - x.size % self._decimate].reshape(-1, self._decimate).mean(axis=1)
        x = np.append(x[0], x[1:] - 0.95 * x[:-1])  # tilt away traffic rumble, which would look "periodic"
        x -= x.mean()
        n = x.size
        if self._lags[-1] >= n:
            return 0.0, 0
        spectrum = np.fft.rfft(x, 2 * n)
        ac = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
        energy = np.square(x)
        tail = np.cumsum(energy[::-1])[::-1]  # energy of x[lag:]
        head = np.cumsum(energy)  # energy of x[:n - lag]
        norm = np.sqrt(tail[self._lags] * head[n - 1 - self._lags])
        r = ac[self._lags] / np.maximum(norm, 1e-9)
        best = int(np.argmax(r))
        return float(r[best]), int(self._lags[best])

    def classify(self, frame: np.ndarray) -> bool:
        context = np.concatenate([self._previous, frame])
        self._previous = frame
        self._since_pitch += 1
        self.frame_index += 1
        level = self.level_dbfs(frame)
        floor_level = max(level, self.cfg.min_level_dbfs - 20)  # digital silence must not sink the floor forever
        if self.noise_floor_dbfs is None or floor_level < self.noise_floor_dbfs:
            self.noise_floor_dbfs = floor_level
        else:
            self.noise_floor_dbfs = min(floor_level, self.noise_floor_dbfs + self._rise_per_frame)
        if level < self.cfg.min_level_dbfs or level < self.noise_floor_dbfs + self.cfg.energy_margin_db:
            return False
        if not self._vad.is_speech(frame.tobytes(), self.cfg.sample_rate):
            return False
        strength, lag = self.periodicity(context)
        if strength >= self.cfg.periodicity_threshold:
            self._pitch_lags.append((self.frame_index, lag))
            if not (self.cfg.reject_steady_tones and self._monotone()):
                self._since_pitch = 0
        return self._since_pitch <= self._hold_frames

    def _monotone(self) -> bool:
        """A horn or an alarm: the last pitched frames (within a second) all at one pitch. A voice glides."""
        recent = [lag for i, lag in self._pitch_lags if self.frame_index - i <= 1000 // self.cfg.frame_ms]
        return len(recent) == self._pitch_lags.maxlen and max(recent) - min(recent) <= max(1, max(recent) // 50)


class SpeechSegmenter:
    """Voiced frames -> speech start/end, with a start window and a hangover."""

    def __init__(self, cfg: VadConfig) -> None:
        self.cfg = cfg
        self._window: deque[tuple[int, bool]] = deque(maxlen=max(1, round(cfg.start_window_s * 1000 / cfg.frame_ms)))
        self._recent: deque[bool] = deque(maxlen=3)
        self._hangover_us = int(cfg.end_silence_s * US)
        self._last_t1: int | None = None
        self.speaking = False
        self.start_us = 0
        self.last_voiced_us = 0

    @property
    def pending(self) -> bool:
        """Speech is under way, or may be starting (voiced frames in the start window)."""
        return self.speaking or any(v for _, v in self._window)

    def feed(self, t0: int, t1: int, voiced: bool) -> list[SpeechEvent]:
        events: list[SpeechEvent] = []
        if self._last_t1 is not None and t0 - self._last_t1 > self._window.maxlen * self.cfg.frame_us:
            self._window.clear()  # a gap in the audio: old frames say nothing about now
            self._recent.clear()
        self._last_t1 = t1
        self._window.append((t0, voiced))
        self._recent.append(voiced)
        if not self.speaking:
            voiced_count = sum(v for _, v in self._window)
            if voiced_count >= self.cfg.start_voiced_fraction * self._window.maxlen:
                self.speaking = True
                self.start_us = self._onset()
                self.last_voiced_us = t1 if voiced else max(t + self.cfg.frame_us for t, v in self._window if v)
                events.append(SpeechEvent("started", self.start_us))
        else:
            if voiced and sum(self._recent) >= 2:  # an isolated voiced frame does not prolong speech
                self.last_voiced_us = t1
            events += self.flush(t1)
        return events

    def flush(self, now_us: int) -> list[SpeechEvent]:
        """End speech if `now_us` is a hangover past the last voiced frame (also used when audio stops)."""
        if self.speaking and now_us - self.last_voiced_us >= self._hangover_us:
            self.speaking = False
            self._window.clear()
            self._recent.clear()
            return [SpeechEvent("ended", self.last_voiced_us, self.last_voiced_us - self.start_us)]
        return []

    def _onset(self) -> int:
        """Start of the first run of speech in the window (3 of 5 frames voiced), not a stray voiced frame."""
        frames = list(self._window)
        for i, (t, v) in enumerate(frames):
            if v and sum(x for _, x in frames[i:i + 5]) >= 3:
                return t
        return next(t for t, v in frames if v)


@dataclass
class _Expectation:
    kind: StatementKind
    since_us: int
    interruption_id: str | None
    reminded: bool = False
    speaker_us: int = 0  # time since `since_us` that the device's own speaker was sounding: not counted
    segment_start_us: int | None = None  # speech that began after `since_us`
    start_emitted: bool = False
    confirmed: bool = False


class StatementDetector:
    """Voice activity -> speech events, and the statement the device is waiting for (single-threaded)."""

    def __init__(self, cfg: VadConfig | None = None, activity: SpeakerActivity | None = None) -> None:
        self.cfg = cfg or VadConfig()
        self.activity = activity
        self.classifier = FrameClassifier(self.cfg)
        self.segmenter = SpeechSegmenter(self.cfg)
        self._frame_bytes = self.cfg.frame_samples * 2
        self._pending = bytearray()
        self._pending_t0: int | None = None
        self._last_t1: int | None = None
        self._exp: _Expectation | None = None
        self._min_statement_us = int(self.cfg.min_statement_s * US)
        # Timeouts wait at most this long for speech that is just starting to be recognised.
        self._max_defer_us = int((self.cfg.start_window_s + self.cfg.min_statement_s + self.cfg.end_silence_s) * US)
        self.frames = 0
        self.voiced_frames = 0
        self.discontinuities = 0

    # --- commands ---------------------------------------------------------------------------------

    @property
    def expecting(self) -> StatementKind | None:
        return self._exp.kind if self._exp else None

    def expect(self, kind: StatementKind | str, since_us: int, interruption_id: str | None = None) -> None:
        """Wait for a statement spoken after `since_us` (when the prompt was requested or finished playing)."""
        if self._exp is not None:
            raise DetectorStateError(f"already expecting the {self._exp.kind.value} statement; cancel it first")
        self._exp = _Expectation(StatementKind(kind), since_us, interruption_id)

    def confirm_by_mark(self, at_us: int) -> list[DetectorEvent]:
        """MARK confirms the expected statement. Returns [] when none is expected (the press is a marker)."""
        exp = self._exp
        if exp is None or exp.confirmed:
            return []
        out: list[DetectorEvent] = []
        if not exp.start_emitted and exp.segment_start_us is not None and self.segmenter.speaking:
            out.append(self._event("start", "vad", exp.segment_start_us))
            exp.start_emitted = True
        out.append(self._event("confirmed", "mark", at_us))
        exp.confirmed = True
        if not exp.start_emitted:
            self._exp = None
        return out  # with speech under way, its end is still reported

    def cancel(self, at_us: int) -> list[DetectorEvent]:
        """Stop waiting (the session ended). A statement being spoken gets its end, at the latest `at_us`."""
        exp, self._exp = self._exp, None
        if exp is not None and exp.start_emitted and self.segmenter.speaking:
            return [StatementEvent(exp.kind, "end", "vad", min(self.segmenter.last_voiced_us, at_us),
                                   exp.interruption_id)]
        return []

    def tick(self, now_us: int) -> list[DetectorEvent]:
        """Timeouts and speech end when no PCM arrives (a stalled microphone); harmless otherwise."""
        if self._last_t1 is not None and now_us <= self._last_t1:
            return []
        speech = self.segmenter.flush(now_us)
        out: list[DetectorEvent] = list(speech)
        self._statement_updates(out, now_us, speech)
        return out

    # --- audio ------------------------------------------------------------------------------------

    def process(self, pcm: bytes, first_sample_us: int) -> list[DetectorEvent]:
        """Analyse a chunk of s16le mono PCM at `cfg.sample_rate`; returns the events it caused, in order."""
        if len(pcm) % 2:
            raise PcmFormatError(f"PCM chunk of {len(pcm)} bytes is not whole 16-bit samples")
        if self._pending_t0 is not None:
            expected = self._pending_t0 + len(self._pending) // 2 * US // self.cfg.sample_rate
            if abs(first_sample_us - expected) > self.cfg.frame_us:
                # Dropped samples (overflow) or a clock step: restart framing at the chunk's own time.
                self.discontinuities += 1
                self._pending.clear()
                self._pending_t0 = None
        if self._pending_t0 is None:
            self._pending_t0 = first_sample_us
        self._pending += pcm
        out: list[DetectorEvent] = []
        frame_us = self.cfg.frame_us
        while len(self._pending) >= self._frame_bytes:
            frame = np.frombuffer(bytes(self._pending[:self._frame_bytes]), dtype="<i2")
            del self._pending[:self._frame_bytes]
            t0 = self._pending_t0
            self._pending_t0 = t0 + frame_us
            self._frame(frame, t0, t0 + frame_us, out)
        return out

    def _frame(self, frame: np.ndarray, t0: int, t1: int, out: list[DetectorEvent]) -> None:
        self.frames += 1
        voiced = self.classifier.classify(frame)
        exp = self._exp
        if (voiced or exp is not None) and self.activity is not None and self.activity.overlaps(t0, t1):
            voiced = False  # the device's own prompt
            if exp is not None and t0 >= exp.since_us:
                exp.speaker_us += t1 - t0  # nobody can be expected to talk over a prompt
        self.voiced_frames += voiced
        self._last_t1 = t1
        speech = self.segmenter.feed(t0, t1, voiced)
        out += speech
        self._statement_updates(out, t1, speech)

    # --- the expected statement -------------------------------------------------------------------

    def _event(self, event: str, detected_by: str, at_us: int) -> StatementEvent:
        exp = self._exp
        assert exp is not None
        return StatementEvent(exp.kind, event, detected_by, at_us, exp.interruption_id)  # type: ignore[arg-type]

    def _statement_updates(self, out: list[DetectorEvent], now_us: int, speech: Sequence[SpeechEvent] = ()) -> None:
        exp = self._exp
        if exp is None:
            return
        for ev in speech:
            if ev.event == "started" and ev.at_us >= exp.since_us:
                exp.segment_start_us = ev.at_us
        seg = self.segmenter
        ended = next((ev for ev in speech if ev.event == "ended"), None)
        if exp.segment_start_us is not None and not exp.start_emitted:
            last_voiced = ended.at_us if ended else seg.last_voiced_us
            if last_voiced - exp.segment_start_us >= self._min_statement_us:
                out.append(self._event("start", "vad", exp.segment_start_us))
                exp.start_emitted = True
        if ended is not None and exp.segment_start_us is not None:
            if exp.start_emitted:
                out.append(self._event("end", "vad", ended.at_us))
                self._exp = None
                return
            exp.segment_start_us = None  # too short to be the statement: keep waiting
        if exp.start_emitted or exp.confirmed:
            return
        while True:
            after_s = self.cfg.missing_after_s if exp.reminded else self.cfg.reminder_after_s
            deadline = exp.since_us + exp.speaker_us + int(after_s * US)
            if now_us < deadline or (seg.pending and now_us < deadline + self._max_defer_us):
                return
            if not exp.reminded:
                exp.reminded = True
                out.append(self._event("reminder", "timeout", now_us))
                continue  # after a long stall the missing deadline may have passed too
            out.append(self._event("missing", "timeout", now_us))
            self._exp = None
            return


class StatementListener:
    """Runs a StatementDetector on the "statement-vad" thread, fed from the capture thread without blocking."""

    def __init__(self, detector: StatementDetector, on_event: Callable[[DetectorEvent], None],
                 clock_mono_us: Callable[[], int], max_chunks: int = 64, poll_s: float = 0.1,
                 stall_grace_us: int = 500_000) -> None:
        self.detector = detector
        self.on_event = on_event
        self.clock_mono_us = clock_mono_us
        self.poll_s = poll_s
        self.stall_grace_us = stall_grace_us  # PCM may lag the clock this much before a tick acts on time
        self.dropped_chunks = 0
        self.errors = 0
        self._chunks: queue.Queue[tuple[bytes, int]] = queue.Queue(max_chunks)
        self._commands: deque[Callable[[], list[DetectorEvent]]] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="statement-vad", daemon=True)

    # --- capture thread ---------------------------------------------------------------------------

    def offer(self, pcm: bytes, first_sample_us: int) -> bool:
        """Hand over a chunk; never blocks. False if the queue was full (the chunk is dropped and counted)."""
        if len(pcm) % 2:
            raise PcmFormatError(f"PCM chunk of {len(pcm)} bytes is not whole 16-bit samples")
        try:
            self._chunks.put_nowait((bytes(pcm), first_sample_us))
            return True
        except queue.Full:
            self.dropped_chunks += 1
            if self.dropped_chunks in (1, 10, 100) or self.dropped_chunks % 1000 == 0:
                log.warning("statement VAD queue full: %d chunks dropped", self.dropped_chunks)
            return False

    # --- any thread -------------------------------------------------------------------------------

    def expect(self, kind: StatementKind | str, since_us: int, interruption_id: str | None = None) -> None:
        kind = StatementKind(kind)  # a bad kind fails here, in the caller's thread

        def command() -> list[DetectorEvent]:
            events = self.detector.cancel(since_us) if self.detector.expecting else []
            self.detector.expect(kind, since_us, interruption_id)
            return events

        self._command(command)

    def confirm_by_mark(self, at_us: int) -> None:
        self._command(lambda: self.detector.confirm_by_mark(at_us))

    def cancel(self, at_us: int) -> None:
        self._command(lambda: self.detector.cancel(at_us))

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _command(self, command: Callable[[], list[DetectorEvent]]) -> None:
        with self._lock:
            self._commands.append(command)

    # --- statement-vad thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            try:
                pcm, t = self._chunks.get(timeout=self.poll_s)
            except queue.Empty:
                self._deliver(lambda: self.detector.tick(self.clock_mono_us() - self.stall_grace_us))
                continue
            self._run_commands()
            self._deliver(lambda pcm=pcm, t=t: self.detector.process(pcm, t))
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                command = self._commands.popleft()
            self._deliver(command)

    def _deliver(self, work: Callable[[], list[DetectorEvent]]) -> None:
        try:
            events = work()
        except Exception:  # bad input or a bug must not end statement detection for the rest of the shift
            self.errors += 1
            log.exception("statement detector failed")
            return
        for event in events:
            try:
                self.on_event(event)
            except Exception:
                log.exception("statement event callback failed for %r", event)
