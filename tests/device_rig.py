"""A whole device on the simulator for end-to-end tests: `SimulatedHardware` (hw_sim) under the real
`agent.daemon.Device`, the same code that runs on a Pi, with a small fast configuration.

    rig = DeviceRig(tmp_path / "dev1")                 # keys generated, bureau identity made up, disk quota set
    rig.boot()                                         # Device.start(): store, camera, mic, buttons, monitors
    rig.script.start()                                 # the officer's double press (hw_sim.scenario.ShiftScript)
    rec = rig.wait_record("session_open")              # signed ledger records, read from ledger.db
    rig.shutdown()                                     # Device.stop(): the open segment is closed and signed
    rig.verifier().verify_path(rig.data_dir).ok        # agent.evidence.verify, with the bureau identity

The device is keyed directly (a fresh ES256 identity key, a throwaway bureau age identity as recipient): no
bureau is needed unless a test docks. Its data directory sits on hw_sim's `SimStorage`, so a test can fill
the disk for real (`rig.storage.fill(...)`).

Threads: the rig's methods run on the test's thread; they only flip simulator switches (through
`ShiftScript` and `rig.sim`) and read the ledger through a separate read-only SQLite connection. Waits poll
with a bounded timeout and return None/False on timeout, so a test can assert with the ledger in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.clock import SystemClock
from agent.compliance import read_ledger
from agent.config import AgentConfig, parse_config
from agent.daemon import Credentials, Device
from agent.evidence.age import Identity
from agent.evidence.verify import Verifier
from agent.storage.keys import PemFileSigner
from agent.voice_prompts.assets import PromptLibrary
from hw_sim.scenario import ShiftScript, SimulatedHardware
from hw_sim.speech import synthesize
from hw_sim.storage import SimStorage

DEVICE_ID = "BWC-E2E-0001"
OFFICER_ID = "OFF-3107"
DISK_BYTES = 512 * 1024 * 1024  # the simulated data partition

Record = dict[str, Any]  # a ledger record's signed fields: seq, type, wall_us, mono_us, body, ...

# Small and fast, but every timeout is still the real mechanism: 320x240@15 at the lowest bitrate, short
# segments and pre-event ring, statement timeouts at their lower bounds, lens "covered" after 1.5 s.
FAST_CONFIG: dict[str, dict[str, Any]] = {
    "device": {"id": DEVICE_ID, "officer_id": OFFICER_ID, "language": "zh-CN"},
    "recording": {"width": 320, "height": 240, "fps": 15, "bitrate_bps": 250_000, "pre_event_s": 3,
                  "segment_s": 4, "reminder_interval_s": 0, "queue_packets": 300},
    "session": {"category": "penalty", "stage": "on_site"},
    "statements": {"reminder_after_s": 3.0, "missing_after_s": 5.0, "min_speech_s": 1.5},
    "power": {"warn_percent": [20, 10], "low_percent": 5, "critical_percent": 2},
    "storage": {"min_minutes_left": 0.5, "warn_minutes_left": 1.0},
    "thermal": {"max_cpu_c": 85.0, "resume_cpu_c": 75.0},
    "lens": {"covered_s": 1.5},
    "hardware": {"camera": "sim", "audio": "sim", "buttons": "sim"},
}


def fast_config(data_dir: Path, key_file: Path, recipients: list[str],
                overrides: dict[str, dict[str, Any]] | None = None) -> AgentConfig:
    """FAST_CONFIG for a device keyed with `key_file` whose data lives in `data_dir`; `overrides` replaces
    keys section by section (e.g. {"session": {"category": "compulsion", "stage": "compulsory_measures"}})."""
    sections = {name: dict(values) for name, values in FAST_CONFIG.items()}
    sections["device"]["data_dir"] = str(data_dir)
    sections["keys"] = {"identity_key": str(key_file), "recipients": recipients}
    for name, values in (overrides or {}).items():
        sections.setdefault(name, {}).update(values)
    return parse_config(sections, "<device_rig>")


_SPEECH_CACHE: dict[tuple[str, int], Any] = {}


def chinese_speech(text: str, speed_wpm: int = 220):
    """`text` spoken by espeak-ng's Mandarin voice (hw_sim.speech), int16 mono 16 kHz; cached per process."""
    key = (text, speed_wpm)
    if key not in _SPEECH_CACHE:
        _SPEECH_CACHE[key] = synthesize(text, "zh-CN", speed_wpm=speed_wpm)
    return _SPEECH_CACHE[key]


@dataclass
class Phase:
    """What happened during one named stretch of a script: the ledger records written, the prompts the
    speaker finished, the machine's state at the end, and the script's notes."""

    name: str
    records: list[Record]
    played: list[str]
    state_after: str | None
    notes: list[str] = field(default_factory=list)

    def of_type(self, rtype: str, **body: Any) -> list[Record]:
        return of_type(self.records, rtype, **body)

    def types(self) -> list[str]:
        return [r["type"] for r in self.records]


class DeviceRig:
    """One simulated device and its data directory; `boot()` may be called again after `shutdown()`
    (a reboot on the same data directory and the same hardware)."""

    def __init__(self, folder: Path, overrides: dict[str, dict[str, Any]] | None = None,
                 disk_bytes: int | None = DISK_BYTES, log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.folder / "device"
        self.bureau = Identity.generate()
        self.signer = PemFileSigner.generate(self.folder / "keys" / "device-key.pem")
        self.cfg = fast_config(self.data_dir, self.folder / "keys" / "device-key.pem", [str(self.bureau.recipient)],
                               overrides)
        self.sim = SimulatedHardware(self.folder / "sim", SystemClock())
        self.storage = SimStorage(self.data_dir, disk_bytes)
        self.t0 = time.monotonic()
        self.notes: list[str] = []
        self._log = log
        self.script = ShiftScript(self.sim, self.cfg.hardware.record_button_pin, self.cfg.hardware.mark_button_pin,
                                  log=self.note)
        self.device: Device | None = None
        self.boots = 0
        self.library = PromptLibrary()
        self.phases: dict[str, Phase] = {}
        self.results: dict[str, Any] = {}  # whatever a script wants its tests to see
        self.ledger_at_power_off: list[Record] | None = None
        self._prompt_by_audio: dict[tuple[int, str], str] = {}

    # --- lifecycle --------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        self.notes.append(line)
        with open(self.folder / "script.log", "a", encoding="utf-8") as log:
            log.write(line + "\n")
        if self._log is not None:
            self._log(line)

    def boot(self) -> Device:
        """Start the real daemon on the simulated hardware (returns when it is buffering)."""
        hw = dataclasses.replace(self.sim.hardware(), fs=self.storage, power_off=self._power_off)
        creds = Credentials(signer=self.signer, recipients=[self.bureau.recipient])
        self.device = Device(self.cfg, hw, self.sim.clock, creds)
        self.device.start()
        self.boots += 1
        self.note(f"device booted ({self.boots})")
        return self.device

    def _power_off(self) -> None:
        """The firmware power-off hook (runs on the state machine thread): what is in the ledger now is all
        that a real power cut would leave."""
        self.sim.power_offs += 1
        self.ledger_at_power_off = self.records()
        self.note("power-off hook ran")

    def shutdown(self) -> None:
        """Stop the daemon as systemd would (or clean up after a power-off hook ran)."""
        if self.device is not None:
            device, self.device = self.device, None
            device.stop()
            self.note("device stopped")

    def close(self) -> None:
        try:
            self.shutdown()
        finally:
            self.sim.close()

    # --- what the device did ----------------------------------------------------------------------

    def records(self, after_seq: int = 0) -> list[Record]:
        """The signed fields of every ledger record with seq > `after_seq`, in order."""
        return [r.fields for r in read_ledger(self.data_dir) if r.fields["seq"] > after_seq]

    def last_seq(self) -> int:
        recs = read_ledger(self.data_dir)
        return recs[-1].fields["seq"] if recs else 0

    def wait_record(self, rtype: str, timeout: float = 15.0, after_seq: int = 0, **body: Any) -> Record | None:
        """The first record of `rtype` after `after_seq` whose body has the given values; None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.records(after_seq):
                if rec["type"] == rtype and all(rec["body"].get(k) == v for k, v in body.items()):
                    return rec
            if time.monotonic() >= deadline:
                self.note(f"TIMEOUT waiting {timeout:.0f} s for {rtype} {body or ''} after seq {after_seq}")
                return None
            time.sleep(0.1)

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                self.note(f"TIMEOUT waiting {timeout:.0f} s for {what}")
                return False
            time.sleep(0.05)
        return True

    def wait_state(self, state: str, timeout: float = 10.0) -> bool:
        return self.wait_until(lambda: self.device is not None and self.device.machine.state.value == state,
                               timeout, f"state {state}")

    def state(self) -> str | None:
        return self.device.machine.state.value if self.device is not None else None

    def _identify(self, pcm: bytes, rate: int) -> str:
        key = (rate, hashlib.sha256(pcm).hexdigest())
        if not self._prompt_by_audio:
            from agent.voice_prompts.catalogue import CATALOGUE

            for pid in CATALOGUE:
                audio = self.library.pcm(pid, self.cfg.device.language, rate)
                self._prompt_by_audio[(rate, hashlib.sha256(audio).hexdigest())] = pid
        return self._prompt_by_audio.get(key, "?")  # "?": no prompt, or one cut short

    def clips(self) -> int:
        """How many clips the speaker has opened so far (a bookmark for `played(after=...)`)."""
        return len(self.sim.speaker.clips)

    def played(self, after: int = 0) -> list[str]:
        """The prompt ids of the finished clips from clip number `after` on, identified from the audio."""
        return [self._identify(bytes(c.pcm), c.rate) for c in self.sim.speaker.clips[after:] if c.closed_us is not None]

    def wait_played(self, prompt_id: str, after: int = 0, timeout: float = 30.0) -> bool:
        """Wait until the speaker has played `prompt_id` in full, in a clip opened after bookmark `after`."""
        return self.wait_until(lambda: prompt_id in self.played(after), timeout, f"prompt {prompt_id}")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Bookmark the ledger, the speaker and the notes around one stretch of a script (see Phase)."""
        first_seq, first_clip, first_note = self.last_seq(), self.clips(), len(self.notes)
        self.note(f"--- {name}")
        try:
            yield
        finally:
            self.phases[name] = Phase(name, self.records(first_seq), self.played(first_clip), self.state(),
                                      self.notes[first_note:])

    def say(self, pcm16k, label: str) -> float:
        """The officer speaks into the microphone now; returns the clip's length (s). Does not wait."""
        seconds = self.sim.mic_scene.say(pcm16k)
        self.note(f"officer speaks: {label} ({seconds:.1f} s)")
        return seconds

    def verifier(self) -> Verifier:
        return Verifier(identity=self.bureau, pinned_key=self.signer.public_key())

    def dump(self, after_seq: int = 0) -> str:
        """The ledger and the script notes, for assertion messages."""
        lines = [f"{r['seq']:4d} {r['type']:<20s} {json.dumps(r['body'], ensure_ascii=False)[:160]}"
                 for r in self.records(after_seq)]
        return "\n".join(["script:", *self.notes, "played: " + ", ".join(self.played()), "ledger:", *lines])


def of_type(records: list[Record], rtype: str, **body: Any) -> list[Record]:
    """The records of `rtype` whose body has the given values."""
    return [r for r in records if r["type"] == rtype and all(r["body"].get(k) == v for k, v in body.items())]


def between(records: list[Record], first_seq: int, last_seq: int) -> list[Record]:
    return [r for r in records if first_seq <= r["seq"] <= last_seq]
