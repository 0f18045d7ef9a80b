"""A whole simulated device, and a scripted shift on it (DESIGN.md, "hw_sim": the scenario runner).

`SimulatedHardware` builds every hardware stand-in (camera producing real H.264, microphone with spoken
statements on cue, speaker log, gpiozero mock pins for the buttons, fuel gauge, thermal file, the dock on
a real pty) and hands the agent a `Hardware` of library modules, so the production adapters run unchanged.
`ShiftScript` drives it like an officer: presses, holds, speech, the voice menu, the dock.

Threads: the scenario runs on the caller's thread, in real time; it only touches the simulator's switches
(pins, microphone cues, dock plug), never the agent's internals.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.controls import MENU_ITEMS
from agent.daemon import Hardware
from hw_sim.battery import FakeSMBusModule, SimBattery
from hw_sim.picamera2 import CameraSimulator
from hw_sim.pyaudio import AudioSimulator
from hw_sim.speaker import SpeakerLog
from hw_sim.thermal import SimThermal

MIC_RATE = 48_000


class SceneSignal:
    """What the microphone hears: a quiet room, plus clips spoken on cue (thread-safe)."""

    def __init__(self, noise_dbfs: float = -60.0, seed: int = 7):
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self._noise = 10 ** (noise_dbfs / 20)
        self._clips: list[tuple[int, np.ndarray]] = []  # (first sample index, float mono at MIC_RATE)
        self._cursor = 0  # the last sample index the microphone asked for

    def say(self, pcm16k: np.ndarray) -> float:
        """Start `pcm16k` (int16 mono, 16 kHz) at the microphone's next buffer; returns its length (s)."""
        mono = pcm16k.astype(np.float64) / 32768.0
        upsampled = np.interp(np.arange(len(mono) * 3) / 3.0, np.arange(len(mono)), mono)
        with self._lock:
            self._clips.append((self._cursor, upsampled))
        return len(mono) / 16_000

    def samples(self, start: int, count: int, rate: int, channels: int) -> np.ndarray:
        out = self._rng.normal(0.0, self._noise, count)
        with self._lock:
            self._cursor = start + count
            for first, clip in self._clips:
                lo, hi = max(start, first), min(start + count, first + len(clip))
                if lo < hi:
                    out[lo - start:hi - start] += clip[lo - first:hi - first]
            self._clips = [(f, c) for f, c in self._clips if f + len(c) > start]
        return np.repeat(out[:, None], channels, axis=1)


@dataclass
class SimulatedHardware:
    folder: Path
    clock: object
    camera: CameraSimulator = field(init=False)
    mic_scene: SceneSignal = field(init=False)
    microphone: AudioSimulator = field(init=False)
    speaker: SpeakerLog = field(init=False)
    battery: SimBattery = field(init=False)
    thermal: SimThermal = field(init=False)
    pins: object = field(init=False)
    dock: object | None = None
    gps: object | None = None
    power_offs: int = 0

    def __post_init__(self) -> None:
        from gpiozero.pins.mock import MockFactory

        self.folder.mkdir(parents=True, exist_ok=True)
        self.camera = CameraSimulator(self.clock)
        self.mic_scene = SceneSignal()
        self.microphone = AudioSimulator(self.clock, self.mic_scene)
        self.speaker = SpeakerLog(clock_mono_us=self.clock.mono_us, pace=time.sleep)
        self.battery = SimBattery(86.0)
        self.thermal = SimThermal(self.folder / "thermal_zone0_temp", 48.0)
        self.pins = MockFactory()

    def add_dock(self, wall_us: Callable[[], int] | None = None, plugged: bool = False) -> str:
        """A docking station on a pty pair, empty unless `plugged` (the device is out on the street)."""
        from hw_sim.serial_devices import SimulatedDock

        self.dock = SimulatedDock(self.folder, wall_us=wall_us)
        if not plugged:
            self.dock.unplug()
        return self.dock.device_port

    def add_gps(self, speed: float = 1.0) -> str:
        """A GPS receiver on a pty pair, walking a track and emitting NMEA once a (simulated) second."""
        from hw_sim.serial_devices import SimulatedGps

        self.gps = SimulatedGps(self.folder)
        self.gps.run(speed=speed)
        return self.gps.device_port

    def hardware(self) -> Hardware:
        return Hardware(picamera2=self.camera.module, pyaudio=self.microphone.module, speaker=self.speaker,
                        pin_factory=self.pins, smbus=FakeSMBusModule(self.battery), thermal_path=self.thermal.path,
                        dock_port=self.dock.device_port if self.dock else None,
                        gps_port=self.gps.device_port if self.gps else None, power_off=self._power_off)

    def _power_off(self) -> None:
        self.power_offs += 1

    def close(self) -> None:
        if self.dock is not None:
            self.dock.close()
        if self.gps is not None:
            self.gps.close()


class ShiftScript:
    """The officer's hands and voice, in real time."""

    def __init__(self, hw: SimulatedHardware, record_pin: int, mark_pin: int,
                 log: Callable[[str], None] = lambda _: None):
        self.hw = hw
        self.record = hw.pins.pin(record_pin)
        self.mark = hw.pins.pin(mark_pin)
        self.log = log

    def _tap(self, pin, hold_s: float = 0.15, gap_s: float = 0.25) -> None:
        pin.drive_low()
        time.sleep(hold_s)
        pin.drive_high()
        time.sleep(gap_s)

    def start(self) -> None:
        """Double press of RECORD (start, or resume after a declared interruption)."""
        self.log("double press RECORD")
        self._tap(self.record, gap_s=0.15)
        self._tap(self.record, gap_s=0.8)

    def stop(self, hold_s: float = 3.4) -> None:
        self.log(f"hold RECORD {hold_s:.1f} s")
        self._tap(self.record, hold_s=hold_s, gap_s=0.5)

    def mark_press(self) -> None:
        self.log("press MARK")
        self._tap(self.mark)

    def menu(self, kind: str, value: str) -> None:
        """Hold MARK for the voice menu, step to the item, select it with RECORD."""
        target = MENU_ITEMS.index((kind, value))
        self.log(f"voice menu -> {kind} {value}")
        self._tap(self.mark, hold_s=2.3, gap_s=0.3)
        for _ in range(target):
            self._tap(self.mark, hold_s=0.1, gap_s=0.15)
        self._tap(self.record, gap_s=0.5)

    def say(self, pcm16k: np.ndarray, label: str) -> None:
        seconds = self.hw.mic_scene.say(pcm16k)
        self.log(f"officer speaks: {label} ({seconds:.1f} s)")
        time.sleep(seconds + 2.0)  # the detector needs its 1.5 s of silence to call the end

    def wait_prompts(self, timeout_s: float = 30.0) -> None:
        """Wait until the device has finished speaking (its prompts block like a real speaker)."""
        deadline = time.monotonic() + timeout_s
        quiet_since = None
        while time.monotonic() < deadline:
            clips = self.hw.speaker.clips
            busy = bool(clips) and clips[-1].closed_us is None
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.8:
                return
            time.sleep(0.05)

    def wait(self, seconds: float, why: str) -> None:
        self.log(f"{why} ({seconds:.0f} s)")
        time.sleep(seconds)
