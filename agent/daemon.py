"""The device daemon: assembles the store, capture, session machine, voice, controls, monitors, dock line,
sync and MQTT from the configuration, and runs them. `bwc-agent run` on a Pi and `bwc-agent demo` on the
simulator go through this same code; only `Hardware` (the library modules at each boundary) differs.

Threads (each component documents its own):
- main thread: `Device.run_forever()` — watchdog pings, upload deadlines (R20), telemetry, status;
- "session": the state machine (SessionRunner), the only place that decides;
- camera, encoder, microphone, "capture-writer", "statement-vad", "prompt-playback", "controls",
  "health", dock line, "sync", MQTT network loop.
Data flows one way: sources -> pipeline -> store; events flow to the state machine through its queue.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent import __version__
from agent import events as ev
from agent.capture.audio_pyaudio import AudioSettings, PyAudioSource, load_pyaudio
from agent.capture.camera_picamera2 import CameraSettings, Picamera2VideoSource
from agent.capture.lens import LensCoverDetector, LensCoverSettings
from agent.capture.osd import OsdOverlay
from agent.capture.pipeline import (
    CapturePipeline,
    IgnoreEvents,
    PipelineConfig,
    QueueOverflow,
    RecordingStarted,
    SegmentClosed,
    StorageFailed,
    WriterFault,
)
from agent.clock import Clock
from agent.config import AgentConfig
from agent.controls import GpioControls, Haptics
from agent.evidence.age import Recipient
from agent.evidence.receipts import ReceiptVerifier
from agent.monitors import FuelGauge, HealthMonitor, Thermal
from agent.sdnotify import Notifier, watchdog_interval_s
from agent.session import SessionMachine, SessionRunner, State
from agent.status import STATUS_FILE
from agent.storage.fs import FileSystem
from agent.storage.keys import Signer
from agent.storage.store import EvidenceStore, SegmentState
from agent.voice_prompts.assets import PromptLibrary
from agent.voice_prompts.catalogue import PromptError
from agent.voice_prompts.detection import SpeechEvent, StatementDetector, StatementListener, VadConfig
from agent.voice_prompts.playback import PlaybackResult, PromptPlayer, SpeakerActivity

log = logging.getLogger(__name__)
S = SegmentState
PUSHED_CONFIG = "config-pushed.json"  # a config pushed by the bureau, applied at the next start


@dataclass
class Hardware:
    """The library modules at each hardware boundary. None means: import the real one (on a Pi)."""

    picamera2: Any = None
    pyaudio: Any = None
    speaker: Any = None  # the pyaudio module used for output (defaults to `pyaudio`)
    pin_factory: Any = None  # gpiozero pin factory (MockFactory in the simulator)
    smbus: Any = None  # the smbus2 module (hw_sim.battery.FakeSMBusModule in the simulator)
    thermal_path: Path | None = None
    dock_port: str | None = None
    gps_port: str | None = None
    power_off: Callable[[], None] | None = None
    haptics: Callable[[str], None] | None = None
    fs: FileSystem | None = None


@dataclass
class Credentials:
    """What provisioning left on the device: the signer, the bureau's keys and the TLS files."""

    signer: Signer
    recipients: list[Recipient]
    receipt_key: ec.EllipticCurvePublicKey | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def load_credentials(cfg: AgentConfig) -> Credentials:
    """The signer and the bureau's keys from the paths in the config (written by `bwc-agent provision`)."""
    from agent.evidence.signing import load_public_key
    from agent.storage.keys import PemFileSigner

    k = cfg.keys
    return Credentials(signer=PemFileSigner.load(k.identity_key), recipients=[Recipient.parse(r) for r in k.recipients],
                       receipt_key=load_public_key(k.receipt_key.read_bytes()) if k.receipt_key else None,
                       ca_file=k.ca_cert, cert_file=k.device_cert, key_file=k.identity_key)


def overdue_segments(rows: list[dict[str, Any]], dock_wall_us: list[int], sync: Any, now: datetime) -> list[str]:
    """R20: footage is due the same day (by `sync.day_end_local`, local time); on a remote/out-of-town day
    (`sync.remote_day`) it is due `remote_grace_h` hours after the first docking that follows it, and not
    overdue before the device is back at all."""
    hh, mm = (int(x) for x in sync.day_end_local.split(":"))
    late = []
    for row in rows:
        opened_us = row["opened_wall_us"] or 0
        opened = datetime.fromtimestamp(opened_us / 1e6)
        if sync.remote_day:
            back = min((d for d in dock_wall_us if d >= opened_us), default=None)
            if back is None:
                continue
            deadline = datetime.fromtimestamp(back / 1e6) + timedelta(hours=sync.remote_grace_h)
        else:
            deadline = opened.replace(hour=hh, minute=mm, second=59, microsecond=0)
            if deadline < opened:  # recorded after the day's deadline: due by the next one
                deadline += timedelta(days=1)
        if now > deadline:
            late.append(row["segment_id"])
    return late


class PipelineRecorder:
    """The capture pipeline behind the state machine's Recorder port. Stop and pause wait until the
    segment is closed and signed, so the ledger shows the segment before the session's close."""

    def __init__(self, pipeline: CapturePipeline, timeout_s: float = 15.0):
        self.pipeline = pipeline
        self.timeout_s = timeout_s

    def start_session(self, session_id: str) -> None:
        self.pipeline.start_session(session_id)

    def pause_session(self) -> None:
        self.pipeline.pause_session()
        if not self.pipeline.flush(self.timeout_s):
            log.error("capture writer did not finish the pause within %.0f s", self.timeout_s)

    def resume_session(self) -> None:
        self.pipeline.resume_session()

    def stop_session(self) -> None:
        self.pipeline.stop_session()
        if not self.pipeline.flush(self.timeout_s):
            log.error("capture writer did not finish the stop within %.0f s", self.timeout_s)


class PipelineBridge(IgnoreEvents):
    """Capture pipeline events -> state machine events (runs on the capture-writer thread: post only)."""

    def __init__(self, post: Callable[[ev.Event], Any]):
        self.post = post
        self.segments_closed = 0
        self.last_started: RecordingStarted | None = None

    def recording_started(self, event: RecordingStarted) -> None:
        self.last_started = event

    def segment_closed(self, event: SegmentClosed) -> None:
        self.segments_closed += 1

    def storage_failed(self, event: StorageFailed) -> None:
        code = "storage_full" if event.storage_full else "write_error"
        self.post(ev.PipelineFault("storage", code, f"{event.segment_id}: {event.error}"))

    def queue_overflow(self, event: QueueOverflow) -> None:
        self.post(ev.PipelineFault("queue", "queue_full", f"episode {event.episode}, {event.dropped_total} dropped"))

    def fault(self, event: WriterFault) -> None:
        self.post(ev.PipelineFault("other", event.code, event.detail))


class DeviceAnnouncer:
    """The state machine's Announcer: prompts through the speaker, patterns through the vibration motor."""

    def __init__(self, player: PromptPlayer | None, haptics: Callable[[str], None] | None):
        self.player = player
        self.haptics = haptics
        self.vibrations: list[str] = []

    def play(self, prompt_id: str) -> None:
        if self.player is None:
            return
        try:
            # A menu label is cut by the next press; the critical-battery warning cuts everything.
            self.player.play(prompt_id, interrupt=prompt_id.startswith("menu_")
                             or prompt_id == "critical_battery_shutdown")
        except PromptError:
            log.error("no prompt %r in the catalogue", prompt_id)

    def vibrate(self, pattern: str) -> None:
        self.vibrations.append(pattern)
        if self.haptics is not None:
            self.haptics(pattern)


class StoreSpace:
    """SpaceControl for the state machine: purge receipted footage, oldest first (never anything else)."""

    def __init__(self, store: EvidenceStore, bitrate_bps: int):
        self.store = store
        self.bitrate_bps = bitrate_bps

    def minutes(self) -> tuple[float, float]:
        rep = self.store.space(self.bitrate_bps)
        per_minute = self.bitrate_bps / 8 * 60
        return rep.free_bytes / per_minute, rep.purgeable_bytes / per_minute

    def purge_receipted(self, minutes_needed: float) -> float:
        before = self.minutes()[0]
        need = self.store.fs.disk_usage(self.store.data_dir)[1] + int(minutes_needed * self.bitrate_bps / 8 * 60)
        self.store.purge_for_space(need)
        return self.minutes()[0] - before


@dataclass
class DeviceStatus:
    state: str
    session_id: str | None
    battery_percent: int | None
    temperature_c: float | None
    storage: dict[str, Any]
    queue: dict[str, int]
    last_sync: dict[str, Any] | None
    clock: dict[str, str]
    alarms: list[str]
    docked: bool
    upload: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Device:
    def __init__(self, cfg: AgentConfig, hw: Hardware, clock: Clock, creds: Credentials,
                 notifier: Notifier | None = None, camera_settings: CameraSettings | None = None,
                 audio_settings: AudioSettings | None = None):
        self.cfg = cfg
        self.hw = hw
        self.clock = clock
        self.creds = creds
        self.notifier = notifier or Notifier("")
        rec = cfg.recording
        self.camera_settings = camera_settings or CameraSettings(width=rec.width, height=rec.height, fps=rec.fps,
                                                                 bitrate=rec.bitrate_bps)
        self.audio_settings = audio_settings or AudioSettings()
        self.store: EvidenceStore | None = None
        self.alarms: list[str] = []
        self.battery: int | None = None
        self.temperature_c: float | None = None
        self.last_sync: dict[str, Any] | None = None
        self.sync_progress: dict[str, Any] = {}
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self.mqtt = self.telemetry = None
        self.gps = None
        self._docked = threading.Event()
        self._undock_requested = threading.Event()
        self._sync_wake = threading.Event()
        self._deadline_alarmed: set[str] = set()
        self.haptics: Haptics | None = None

    # --- assembly ---------------------------------------------------------------------------------

    def start(self) -> None:
        cfg, hw, clock = self.cfg, self.hw, self.clock
        store = self.store = EvidenceStore(cfg.device.data_dir, cfg.device.id, self.creds.signer,
                                           self.creds.recipients, clock, fs=hw.fs)
        recovered = store.recover()
        previous = "unclean" if recovered else ("first_boot" if store.ledger.head()[0] <= 1 else "clean")
        store.ledger.append("boot", {"boot_id": f"B{clock.wall_us()}", "software": f"bwc-agent {__version__}",
                                     "previous_shutdown": previous})
        self.space = StoreSpace(store, cfg.recording.bitrate_bps)

        if hw.pyaudio is None and cfg.hardware.audio == "pyaudio":
            try:
                hw.pyaudio = load_pyaudio()  # on the device: the real PortAudio binding
            except ImportError as exc:  # record video without sound rather than nothing at all
                log.error("no audio (%s): recording video only; install PyAudio", exc)
                store.ledger.append("fault", {"component": "microphone", "code": "audio_library_missing",
                                              "detail": str(exc), "session_id": None})
        activity = SpeakerActivity()
        speaker = hw.speaker if hw.speaker is not None else hw.pyaudio
        self.player = PromptPlayer(speaker, PromptLibrary(), cfg.device.language, clock.mono_us,
                                   on_finished=self._prompt_finished, activity=activity) if speaker else None
        haptics = hw.haptics
        if haptics is None and cfg.hardware.vibration_pin is not None:
            try:
                haptics = self.haptics = Haptics(cfg.hardware.vibration_pin, pin_factory=hw.pin_factory)
            except Exception as exc:  # no GPIO here (a laptop): prompts still speak
                log.error("no vibration motor (%s)", exc)
        self.announcer = DeviceAnnouncer(self.player, haptics)
        self.machine = SessionMachine(cfg, store.ledger, clock, recorder=None, announcer=self.announcer,
                                      power=self, space=self.space, meta=store.db)
        self.machine.on_closed = self._session_closed
        self.machine.prompts_report_finish = self.player is not None
        self.runner = SessionRunner(self.machine)
        post = self.runner.post

        self.osd = OsdOverlay(clock, cfg.device.id, officer_id=cfg.device.officer_id)
        self.lens = LensCoverDetector(post, LensCoverSettings(covered_after_s=cfg.lens.covered_s))
        if cfg.hardware.camera == "opencv" and hw.picamera2 is None:
            import cv2

            from agent.capture.camera_opencv import OpenCVVideoSource

            self.camera = OpenCVVideoSource(None, clock=clock, settings=self.camera_settings, osd=self.osd,
                                            lens=self.lens, on_event=post,
                                            capture_factory=lambda: cv2.VideoCapture(cfg.hardware.opencv_device))
        else:
            self.camera = Picamera2VideoSource(None, clock=clock, settings=self.camera_settings, osd=self.osd,
                                               lens=self.lens, on_event=post, picamera2_module=hw.picamera2)
        st = cfg.statements  # one source for statement timing: the agent's config
        vad = VadConfig(sample_rate=self.audio_settings.sample_rate, min_statement_s=st.min_speech_s,
                        reminder_after_s=st.reminder_after_s, missing_after_s=st.missing_after_s)
        self.listener = StatementListener(StatementDetector(vad, activity=activity), self._speech, clock.mono_us)
        self.mic = PyAudioSource(None, clock=clock, settings=self.audio_settings, on_event=post,
                                 pyaudio_module=hw.pyaudio, on_pcm=self.listener.offer) if hw.pyaudio else None
        self.camera.start()
        video = self.camera.wait_video_params(15)
        pcfg = PipelineConfig(segment_seconds=cfg.recording.segment_s, pre_event_seconds=cfg.recording.pre_event_s,
                              pre_event_audio=cfg.recording.pre_event_audio, queue_packets=cfg.recording.queue_packets)
        self.bridge = PipelineBridge(post)
        self._start_gps()
        provider = (self.track.sidecar_provider(store.segments_dir, store.recipients, store.fs)
                    if self.gps is not None else None)
        self.pipeline = CapturePipeline(store, video, self.mic.audio_params if self.mic else None, pcfg,
                                        events=self.bridge, request_keyframe=self.camera.force_keyframe, clock=clock,
                                        sidecar_provider=provider)
        self.machine.recorder = PipelineRecorder(self.pipeline)
        self.pipeline.start()
        self.camera.connect(self.pipeline.submit)
        if self.mic is not None:
            self.mic.start()
            self.mic.connect(self.pipeline.submit)
        self.listener.start()
        if self.player is not None:
            self.player.start()

        self.controls = GpioControls(cfg.session, cfg.hardware.record_button_pin, cfg.hardware.mark_button_pin, clock,
                                     post, lambda pid: self.announcer.play(pid), pin_factory=hw.pin_factory)
        try:
            gauge = FuelGauge.open(cfg.hardware.fuel_gauge_bus, cfg.hardware.fuel_gauge_address, hw.smbus)
        except (OSError, ImportError) as exc:
            log.error("no fuel gauge (%s): battery level unknown", exc)
            gauge = None
        thermal = Thermal(hw.thermal_path or cfg.thermal.sysfs_path)
        self.health = HealthMonitor(self._health_event, gauge, thermal, self.space.minutes, interval_s=2.0)
        self.health.start()
        self.machine.on_boot()  # before the session thread runs: it closes sessions a crash left open
        self.runner.start()
        self._start_dock()
        self._start_mqtt()
        self.notifier.ready(f"recording ready ({cfg.device.id})")

    def _start_gps(self) -> None:
        """The GPS receiver: its fixes go into the encrypted per-segment track and onto the OSD."""
        from agent.capture.gps import GpsReceiver, GpsTrackRecorder

        self.gps = None
        port = self.hw.gps_port or self.cfg.sync.gps_port
        if port is None:
            return
        self.track = GpsTrackRecorder(mono_us=self.clock.mono_us)

        def on_fix(fix: Any) -> None:
            self.track.add(fix)
            if fix is None:
                self.osd.set_position(None, None)
            else:
                self.osd.set_position(fix.lat_ude / 1e6, fix.lon_ude / 1e6)

        self.gps = GpsReceiver(port, on_fix=on_fix, mono_us=self.clock.mono_us)
        self.gps.start()

    def _start_dock(self) -> None:
        port = self.hw.dock_port or self.cfg.sync.dock_port
        self.dock = None
        if port is None:
            return
        from agent.sync.dockline import DockLink

        self.dock = DockLink(port, self.cfg.device.id, on_docked=self._on_docked, on_undocked=self._on_undocked,
                             on_undock_intent=self._undock_intent)
        self.dock.start()

    def _start_mqtt(self) -> None:
        """The MQTT link (status, telemetry, event summaries, bureau commands), if a broker is configured."""
        self.mqtt = self.telemetry = None
        cfg, c = self.cfg, self.creds
        if not cfg.sync.mqtt_host:
            return
        from agent.sync.https import client_ssl_context
        from agent.sync.mqtt import MqttLink, Outbox
        from agent.sync.telemetry import (
            CommandRouter,
            DeviceTelemetry,
            RunningConfig,
            SessionContextValue,
            StoreLedgerReader,
        )

        def context() -> SessionContextValue:
            stage = self.machine.stage
            return SessionContextValue(self.machine.officer_id, stage.category if stage else None,
                                       stage.code if stage else None)

        self.running_config = RunningConfig(cfg)
        router = CommandRouter(cfg.device.id, sync_now=self.sync_now, set_context=self.runner.post,
                               current_context=context, apply_config=self.apply_pushed_config,
                               running_config=self.running_config,
                               on_receipt_hint=lambda hint: self.sync_now("receipt hint"))
        ctx = client_ssl_context(c.ca_file, c.cert_file, c.key_file) if c.ca_file else None
        self.mqtt = MqttLink(cfg.device.id, cfg.sync.mqtt_host, cfg.sync.mqtt_port,
                             Outbox(self.store.data_dir / "mqtt-outbox.db"), ctx, router, session_expiry_s=3600)
        router.attach(self.mqtt)
        self.telemetry = DeviceTelemetry(self.mqtt, lambda: self.status().as_dict(),
                                         StoreLedgerReader(self.store.ledger), self.clock,
                                         running_config=self.running_config, software=f"bwc-agent {__version__}",
                                         period_s=cfg.sync.telemetry_period_s)
        self.mqtt.start()
        self.telemetry.start()

    def sync_now(self, reason: str | None) -> dict[str, Any]:
        """A bureau command or a receipt hint: sync now if docked (the dock is where uploads happen)."""
        if not self._docked.is_set():
            return {"started": False, "reason": "not docked"}
        if self._sync_thread is not None and self._sync_thread.is_alive():
            return {"started": False, "reason": "sync already running"}
        self._sync_thread = threading.Thread(target=self._sync_loop, name="sync", daemon=True)
        self._sync_thread.start()
        return {"started": True}

    def apply_pushed_config(self, config: AgentConfig, version: int | str | None) -> dict[str, Any]:
        """Keep a pushed config in the data directory (/etc is read-only to the agent); it takes effect at
        the next start, and the change is a ledger record now."""
        from agent.sync.telemetry import config_fingerprint

        path = self.store.data_dir / PUSHED_CONFIG
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"version": version, "config": config.model_dump(mode="json")}, indent=1))
        os.replace(tmp, path)
        old, new = self.cfg.model_dump(mode="json"), config.model_dump(mode="json")
        changed = sorted(f"{section}.{key}" for section in new for key in new[section]
                         if old.get(section, {}).get(key) != new[section][key])
        self.store.ledger.append("config_change", {"sha256": config_fingerprint(config), "changed_keys": changed,
                                                   "source": "bureau"})
        return {"applies": "at_restart", "changed_keys": changed}

    # --- callbacks (other threads: post or set flags only) ----------------------------------------

    def _session_closed(self, session_id: str, mandatory: bool, report: Any) -> None:
        """Upload priority (DESIGN.md "Upload order"): mandatory-stage sessions and sessions with findings."""
        if mandatory or not report.compliant:
            self.store.set_flagged(session_id)

    def _prompt_finished(self, result: PlaybackResult) -> None:
        self.runner.post(ev.PromptFinished(result.prompt_id, result.ended_us))

    def _speech(self, event: Any) -> None:
        if isinstance(event, SpeechEvent):
            self.runner.post(ev.SpeechStarted(event.at_us) if event.event == "started"
                             else ev.SpeechEnded(event.at_us, event.duration_us))

    def _health_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.BatteryReading):
            self.battery = event.percent
        elif isinstance(event, ev.ThermalReading):
            self.temperature_c = event.celsius
        self.runner.post(event)

    def _on_docked(self, session: Any) -> None:
        self._docked.set()
        self.runner.post(ev.Docked(getattr(session, "dock_id", None)))
        self.sync_now("docked")

    def _undock_intent(self) -> None:
        """The dock's button: finish the request in flight, then say it is safe to remove (PROTOCOL.md)."""
        self._undock_requested.set()
        self._sync_wake.set()
        if self.dock is not None:
            p = self.sync_progress
            syncing = self._sync_thread is not None and self._sync_thread.is_alive()
            self.dock.set_status(phase="finishing" if syncing else "idle", queued_bytes=p.get("queued_bytes", 0),
                                 done_bytes=p.get("done_bytes", 0), eta_s=None, safe_to_remove=not syncing)

    def _on_undocked(self, reason: str) -> None:
        self._undock_requested.clear()
        self._docked.clear()
        self.runner.post(ev.Undocked())

    def power_off(self) -> None:
        """PowerControl: the state machine has finalised and signed; now power off (firmware hook)."""
        log.warning("critical battery: powering off")
        self._stop.set()
        if self.hw.power_off is not None:
            self.hw.power_off()
            return
        import subprocess

        try:  # firmware_hooks/critical-battery-poweroff by default; the segment is already signed
            subprocess.run(self.cfg.hardware.power_off_command, check=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("power-off command %s failed: %s", self.cfg.hardware.power_off_command, exc)

    # --- sync (sync thread) -----------------------------------------------------------------------

    def make_syncer(self):
        from agent.sync.https import HttpsSession, client_ssl_context
        from agent.sync.syncer import Syncer

        c = self.creds
        if not (self.cfg.sync.bureau_url and c.ca_file and c.receipt_key):
            raise RuntimeError("sync needs sync.bureau_url, the bureau CA and the receipt key (bwc-agent provision)")
        ctx = client_ssl_context(c.ca_file, c.cert_file, c.key_file)
        return Syncer(self.store, self.cfg.sync.bureau_url, HttpsSession(ctx, timeout_s=20),
                      ReceiptVerifier(c.receipt_key), self.clock, on_progress=self._sync_progress,
                      should_stop=lambda: not self._docked.is_set() or self._stop.is_set()
                      or self._undock_requested.is_set())

    def _sync_progress(self, progress: Any) -> None:
        now = self.clock.mono_us()
        self.sync_progress = progress.as_dict(now)
        if self.dock is not None:
            done = progress.phase == "done"
            leaving = self._undock_requested.is_set()
            self.dock.set_status(phase="finishing" if leaving and not done else
                                 {"done": "done", "blocked": "blocked"}.get(progress.phase, "syncing"),
                                 queued_bytes=progress.queued_bytes, done_bytes=progress.done_bytes,
                                 eta_s=progress.eta_s(now), safe_to_remove=done,
                                 alarm=bool(progress.rejected) or "upload_overdue" in self.alarms)

    def _sync_loop(self) -> None:
        backoff = 2.0
        while self._docked.is_set() and not self._stop.is_set():
            if self._undock_requested.is_set():
                if self.dock is not None:  # whatever is left resumes at the next dock; nothing is lost
                    p = self.sync_progress
                    self.dock.set_status(phase="idle", queued_bytes=p.get("queued_bytes", 0),
                                         done_bytes=p.get("done_bytes", 0), eta_s=None, safe_to_remove=True)
                return
            try:
                syncer = self.make_syncer()
            except RuntimeError as exc:
                log.error("%s", exc)
                return
            result = syncer.sync_once()
            self.last_sync = {"at_wall_us": self.clock.wall_us(), "uploaded": len(result.uploaded),
                              "receipted": len(result.receipted), "rejected": len(result.rejected),
                              "error": result.error, "clock_offset_us": result.clock_offset_us}
            pending = self.store.segments((S.CLOSED, S.QUEUED, S.UPLOADING, S.UPLOADED))
            if result.error is None and not pending:
                return  # everything receipted: safe to remove
            self._sync_wake.wait(backoff)  # the undock button or a stop ends the wait at once
            self._sync_wake.clear()
            backoff = min(backoff * 2, 60.0)

    def wait_synced(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            t = self._sync_thread
            if t is not None and not t.is_alive() and self.last_sync is not None:
                return True
            time.sleep(0.1)
        return False

    # --- main loop --------------------------------------------------------------------------------

    def overdue(self, now: datetime | None = None) -> list[str]:
        """Segments whose R20 upload deadline has passed without a receipt."""
        rows = self.store.segments((S.CLOSED, S.QUEUED, S.UPLOADING, S.UPLOADED, S.REJECTED))
        docks = [r.fields["wall_us"] for r in self.store.ledger.records(rtype="dock")
                 if r.fields["body"]["event"] == "docked"]
        return overdue_segments(rows, docks, self.cfg.sync, now or datetime.now())

    def check_deadlines(self) -> None:
        late = [s for s in self.overdue() if s not in self._deadline_alarmed]
        if late:
            self._deadline_alarmed.update(late)
            self.store.ledger.append("alarm", {"code": "upload_overdue", "severity": "critical",
                                               "detail": f"{len(late)} segment(s) not receipted by the "
                                                         f"{self.cfg.sync.day_end_local} deadline (R20)"})
            self.alarms.append("upload_overdue")
            self.announcer.play("upload_overdue")

    def status(self) -> DeviceStatus:
        m, st = self.machine, self.store
        counts = {state: 0 for state in (S.CLOSED, S.QUEUED, S.UPLOADING, S.UPLOADED, S.RECEIPTED, S.PURGED,
                                         S.REJECTED)}
        for row in st.segments():
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        return DeviceStatus(state=m.state.value, session_id=m.session.session_id if m.session else None,
                            battery_percent=self.battery, temperature_c=self.temperature_c,
                            storage=st.space(self.cfg.recording.bitrate_bps).as_dict(),
                            queue=counts, last_sync=self.last_sync, clock=self.clock.status(), alarms=list(self.alarms),
                            docked=self._docked.is_set(), upload=dict(self.sync_progress))

    def write_live_status(self) -> None:
        """status.json in the data directory for `bwc-agent status` (not evidence; rewritten atomically)."""
        try:
            path = self.store.data_dir / STATUS_FILE
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self.status().as_dict(), default=str))
            os.replace(tmp, path)
        except (OSError, TypeError, ValueError) as exc:
            log.warning("could not write %s: %s", STATUS_FILE, exc)

    def run_forever(self, tick_s: float = 1.0) -> None:
        interval = watchdog_interval_s() or tick_s
        last_deadline_check = 0.0
        while not self._stop.wait(min(interval, tick_s)):
            self.notifier.watchdog()
            self.write_live_status()
            if time.monotonic() - last_deadline_check > 60:
                last_deadline_check = time.monotonic()
                self.check_deadlines()
            if self.machine.state is State.RECORDING:
                self.notifier.status(f"recording {self.machine.session.session_id if self.machine.session else ''}")

    def request_stop(self) -> None:
        self._stop.set()
        self._sync_wake.set()

    def stop(self) -> None:
        """Finish cleanly: the open segment is closed and signed before the process ends."""
        self.notifier.stopping()
        self._stop.set()
        for closer in (lambda: self.telemetry and self.telemetry.stop(), lambda: self.mqtt and self.mqtt.stop()):
            try:
                closer()
            except Exception:
                log.exception("error while stopping MQTT")
        for closer in (lambda: self.controls.close(), lambda: self.health.stop(),
                       lambda: self.haptics and self.haptics.close(),
                       lambda: self.dock and self.dock.stop(), lambda: self.camera.stop(),
                       lambda: self.mic and self.mic.stop()):
            try:
                closer()
            except Exception:
                log.exception("error while stopping a component")
        self.runner.stop()
        self.machine.shutdown()  # the runner thread has stopped: safe to call here
        self.pipeline.close()
        if self.gps is not None:
            self.gps.stop()
        self.listener.stop()
        if self.player is not None:
            self.player.stop()
        if not self.machine.powered_off:
            self.store.ledger.append("shutdown", {"reason": "requested"})
        self.store.close()
