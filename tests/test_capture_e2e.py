"""Capture end to end on the simulator (issue 3; DESIGN.md "Recording"; R16 footage from arrival to departure,
R17 interruptions reported, R22 nothing lost, duplicated or unaccounted for).

The production adapters - `Picamera2VideoSource` on hw_sim's fake picamera2 and `PyAudioSource` on its fake
PyAudio - feed the real `CapturePipeline` into a real `EvidenceStore`, wired as agent/daemon.py wires them
(the pipeline's events go through the daemon's `PipelineBridge`, the sources' events straight to what the
state machine would receive). Everything asserted is read back from what reached the disk: segments decrypted
with the bureau identity, decoded with PyAV and with the real ffmpeg/ffprobe, the camera's frame numbers read
out of the decoded pixels, the microphone's clicks found in the decoded sound, and the ledger checked by
`bwc-agent verify`.

Clocks: the long run uses a stepped `SimClock` that the camera moves itself (`drives_clock`), held back by a
`PacedClock` so that media time passes only as fast as the writer and the microphone keep up. The fault
scenarios use a `SimClock` accelerated four times.

Threads: the code under test runs its own (sim-camera, sim-h264-encoder, sim-portaudio, audio-encoder,
camera-supervisor, capture-writer); `PacketTap` runs on the sources' output threads; the test thread only
flips fault switches and waits, every wait bounded.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import av.logging
import numpy as np
import pytest

from agent import events as ev
from agent.capture.audio_pyaudio import AudioSettings, PyAudioSource
from agent.capture.camera_picamera2 import CameraSettings, Picamera2VideoSource
from agent.capture.packets import EncodedPacket
from agent.capture.pipeline import (
    CapturePipeline,
    PipelineConfig,
    QueueOverflow,
    QueueRecovered,
    RecordingStarted,
    SegmentClosed,
    WriterFault,
)
from agent.cli import main as bwc_agent
from agent.daemon import PipelineBridge
from agent.evidence.age import AgeDecryptor, Identity
from agent.evidence.verify import Verifier
from agent.storage.keys import PemFileSigner
from agent.storage.store import EvidenceStore
from hw_sim.clock import SimClock
from hw_sim.frames import read_frame_number
from hw_sim.picamera2 import CameraSimulator
from hw_sim.pyaudio import AudioSimulator
from hw_sim.storage import SimStorage
from tests.conftest import DEVICE_ID

W, H, FPS = 320, 240, 15
FRAME_US = round(1_000_000 / FPS)  # the fake camera's frame period, as the adapter stamps it
RATE = 48_000
AAC_FRAME = 1024
AUDIO_FRAME_S = AAC_FRAME / RATE
# A stall is declared after 2 s of media time: half a real second at FAULT_RATE, well above a busy machine's
# scheduling hiccups.
CAMERA = CameraSettings(width=W, height=H, fps=FPS, bitrate=300_000, stall_timeout_s=2.0, restart_interval_s=1.0)
MICROPHONE = AudioSettings(sample_rate=RATE)

LONG_RUN_S = 610  # simulated seconds recorded after the press
LONG_SEGMENT_S = 5.0  # so the long run is split more than 100 times
PRE_EVENT_S = 3.0
FAULT_RATE = 4.0  # the fault scenarios' clock: four simulated seconds per real second
# How far the paced camera may run ahead of the capture writer: above a GOP's packets (the writer is woken at
# each keyframe), far below the inbox's 900, so the paced runs never overflow it.
PACED_INBOX_PACKETS = 200


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Wait (bounded) for something the simulator will make true; not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout_s:.0f} s: {what}")
        time.sleep(0.01)


def wait_for_video(rig: CaptureRig, frames: int, what: str) -> None:
    """Wait (bounded) until the camera has handed `frames` more frames to the pipeline."""
    start = len(rig.tap.video())
    wait_for(lambda: len(rig.tap.video()) >= start + frames, what)


# --- the simulated microphone's signal: a click at every whole second of device time ----------------------


class ClickTrack:
    """Silence with a one-sample click at every whole second of the stream (sample k x rate), so decoded
    sound says exactly when it was captured: stream start + k seconds on the device clock."""

    amplitude = 0.9

    def samples(self, start: int, count: int, rate: int, channels: int) -> np.ndarray:
        index = np.arange(start, start + count)
        out = np.zeros((count, channels))
        out[index % rate == 0] = self.amplitude
        return out


# --- harness: pacing, the tap between sources and pipeline, the events the device would see ---------------


class PacedClock:
    """The camera's handle on a stepped SimClock. With `drives_clock` hw_sim's camera moves time on to each
    frame as soon as it has encoded the previous one; before each such step this waits (bounded) until
    `ready()` says the rest of the device has kept up, so no queue overflows because the test machine is
    slower than the simulated time - time simply passes as fast as the whole device can go. Devices that
    wait on it (`wait_until`, which hw_sim's pacing uses when a clock offers it) wake as soon as it moves."""

    def __init__(self, clock: SimClock, max_wait_s: float = 10.0) -> None:
        self.clock = clock
        self.ready: Callable[[], bool] = lambda: True
        self.max_wait_s = max_wait_s
        self.waits_expired = 0
        self._moved = threading.Condition()

    def mono_us(self) -> int:
        return self.clock.mono_us()

    def wall_us(self) -> int:
        return self.clock.wall_us()

    def status(self) -> dict[str, str]:
        return self.clock.status()

    def advance(self, us: int) -> None:
        deadline = time.monotonic() + self.max_wait_s
        while not self.ready():
            if time.monotonic() > deadline:
                self.waits_expired += 1
                break
            time.sleep(0.0002)
        with self._moved:
            self.clock.advance(us)
            self._moved.notify_all()

    def wait_until(self, mono_us: int, stop: threading.Event) -> bool:
        with self._moved:
            while self.clock.mono_us() < mono_us and not stop.is_set():
                self._moved.wait(0.05)  # bounded, so a stop is seen
        return not stop.is_set()


class CrystalClock:
    """A microphone's own crystal: the device clock running `ppm` parts per million fast (negative: slow)
    from the moment it is made. Real USB and I2S codecs are typically tens to 100 ppm off CLOCK_MONOTONIC;
    hw_sim's microphone paces itself (and stamps PortAudio's time_info) on whatever clock it is given."""

    def __init__(self, clock: PacedClock, ppm: float) -> None:
        self.clock = clock
        self.ratio = 1 + ppm * 1e-6
        self.origin_us = clock.mono_us()

    def mono_us(self) -> int:
        return self.origin_us + round((self.clock.mono_us() - self.origin_us) * self.ratio)

    def wall_us(self) -> int:
        return self.clock.wall_us()

    def status(self) -> dict[str, str]:
        return self.clock.status()

    def wait_until(self, mono_us: int, stop: threading.Event) -> bool:
        device_us = self.origin_us + int((mono_us - self.origin_us) / self.ratio)
        while self.mono_us() < mono_us:
            if not self.clock.wait_until(device_us, stop):
                return False
            device_us += 1
        return not stop.is_set()


@dataclass
class Handed:
    kind: str
    pts_us: int
    duration_us: int
    accepted: bool


class PacketTap:
    """Where the sources' packets go: notes each one (what the sources produced), then `pipeline.submit`."""

    def __init__(self) -> None:
        self.submit: Callable[[EncodedPacket], bool] | None = None
        self.lock = threading.Lock()
        self.handed: list[Handed] = []

    def __call__(self, packet: EncodedPacket) -> None:
        assert self.submit is not None
        accepted = self.submit(packet)
        with self.lock:
            self.handed.append(Handed(packet.kind, packet.pts_us, packet.duration_us, accepted))

    def video(self) -> list[Handed]:
        with self.lock:
            return [h for h in self.handed if h.kind == "video"]


class DeviceEvents(PipelineBridge):
    """The pipeline's events, kept, and passed through the daemon's bridge; `posted` is what the session state
    machine would receive (the bridge's posts and the sources' `on_event`), in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posted: list[ev.Event] = []
        self.started: list[RecordingStarted] = []
        self.closed: list[SegmentClosed] = []
        self.overflows: list[QueueOverflow] = []
        self.recovered: list[QueueRecovered] = []
        self.writer_faults: list[WriterFault] = []
        super().__init__(self.post_event)

    def post_event(self, event: ev.Event) -> None:
        with self.lock:
            self.posted.append(event)

    def recording_started(self, event: RecordingStarted) -> None:
        self.started.append(event)
        super().recording_started(event)

    def segment_closed(self, event: SegmentClosed) -> None:
        with self.lock:
            self.closed.append(event)
        super().segment_closed(event)

    def queue_overflow(self, event: QueueOverflow) -> None:
        with self.lock:
            self.overflows.append(event)
        super().queue_overflow(event)

    def queue_recovered(self, event: QueueRecovered) -> None:
        with self.lock:
            self.recovered.append(event)
        super().queue_recovered(event)

    def fault(self, event: WriterFault) -> None:
        self.writer_faults.append(event)
        super().fault(event)

    def faults(self) -> list[ev.PipelineFault]:
        with self.lock:
            return [e for e in self.posted if isinstance(e, ev.PipelineFault)]

    def recoveries(self) -> list[ev.PipelineRecovered]:
        with self.lock:
            return [e for e in self.posted if isinstance(e, ev.PipelineRecovered)]

    def closed_count(self) -> int:
        with self.lock:
            return len(self.closed)


# --- the device's capture path, assembled as agent/daemon.py assembles it -----------------------------------


@dataclass
class CaptureRig:
    clock: SimClock
    identity: Identity
    store: EvidenceStore
    camera_sim: CameraSimulator
    mic_sim: AudioSimulator
    camera: Picamera2VideoSource
    mic: PyAudioSource
    pipeline: CapturePipeline
    events: DeviceEvents
    tap: PacketTap
    camera_started_us: int  # sensor time of the camera's frame 0
    mic_started_us: int  # capture time of the microphone's sample 0
    mic_clock_started_us: int  # the same instant on the microphone's own clock
    sources_stopped: bool = False

    def stop_sources(self) -> None:
        if not self.sources_stopped:
            self.sources_stopped = True
            self.camera.stop()
            self.mic.stop()

    def finish(self) -> None:
        """Stop the sources first (so everything they produced is handed over), then the session."""
        self.stop_sources()
        self.pipeline.stop_session()
        assert self.pipeline.close(30), "capture writer did not finish within 30 s"

    def segment_records(self) -> list[dict[str, Any]]:
        return [r.fields["body"] for r in self.store.ledger.records(rtype="segment")]


def start_rig(root: Path, clock: SimClock, config: PipelineConfig, *, platform: str,
              camera_clock: Any = None, mic_clock: Any = None, fs: SimStorage | None = None) -> CaptureRig:
    identity = Identity.generate()
    store = EvidenceStore(root / "device", DEVICE_ID, PemFileSigner.generate(root / "device-key.pem"),
                          [identity.recipient], clock, **({"fs": fs} if fs is not None else {}))
    drives = camera_clock is not None
    camera_sim = CameraSimulator(camera_clock or clock, platform=platform, drives_clock=drives)
    mic_sim = AudioSimulator(mic_clock or clock, ClickTrack())
    events = DeviceEvents()
    camera = Picamera2VideoSource(None, clock=clock, settings=CAMERA, on_event=events.post_event,
                                  picamera2_module=camera_sim.module)
    mic = PyAudioSource(None, clock=clock, settings=MICROPHONE, on_event=events.post_event,
                        pyaudio_module=mic_sim.module)
    # The microphone first: on a stepped clock both then start at the same instant (nothing moves it before
    # the camera runs), so a click at sample k x rate and camera frame k x FPS were captured together.
    mic_started_us = clock.mono_us()
    mic_clock_started_us = mic_sim.clock.mono_us()
    mic.start()
    camera_started_us = clock.mono_us()
    camera.start()
    try:
        params = camera.wait_video_params(20)
    except BaseException:
        camera.stop()
        mic.stop()
        raise
    pipeline = CapturePipeline(store, params, mic.audio_params, config, events=events,
                               request_keyframe=camera.force_keyframe, clock=clock)
    tap = PacketTap()
    tap.submit = pipeline.submit
    pipeline.start()
    camera.connect(tap)
    mic.connect(tap)
    return CaptureRig(clock, identity, store, camera_sim, mic_sim, camera, mic, pipeline, events, tap,
                      camera_started_us, mic_started_us, mic_clock_started_us)


@pytest.fixture
def fault_rig(tmp_path: Path) -> Iterator[Callable[..., CaptureRig]]:
    """Start a rig on a clock accelerated FAULT_RATE times; always stopped and closed afterwards."""
    rigs: list[CaptureRig] = []

    def start(platform: str = "pisp", fs: SimStorage | None = None, **config: Any) -> CaptureRig:
        config = {"segment_seconds": 2.0, "pre_event_seconds": 0.0} | config
        rig = start_rig(tmp_path, SimClock(rate=FAULT_RATE), PipelineConfig(**config), platform=platform, fs=fs)
        rigs.append(rig)
        return rig

    yield start
    for rig in rigs:
        rig.stop_sources()
        rig.pipeline.close(30)
        rig.store.close()


# --- reading back what was written ---------------------------------------------------------------------------


@dataclass
class SegmentMedia:
    name: str
    frame_numbers: list[int | None]
    video_times: list[float]  # presentation times on the session timeline, seconds
    audio_times: list[float]
    audio_packets: list[tuple[float, bytes]]
    audio_config: bytes
    errors: list[str]


def decrypt(path: Path, identity: Identity) -> bytes:
    with open(path, "rb") as fh:
        return b"".join(AgeDecryptor(identity).chunks(fh))


def decode_segment(name: str, mp4: bytes) -> SegmentMedia:
    """Decode every video frame of one segment file with PyAV (reading its drawn number) and demux its audio."""
    out = SegmentMedia(name, [], [], [], [], b"", [])
    av.logging.set_level(av.logging.ERROR)
    try:
        with av.logging.Capture(local=True) as logs, av.open(io.BytesIO(mp4), format="mp4") as container:
            video = container.streams.video[0]
            out.audio_config = bytes(container.streams.audio[0].codec_context.extradata or b"")
            for packet in container.demux():
                if packet.stream.type == "audio":
                    if packet.pts is not None:
                        at = float(packet.pts * packet.time_base)
                        out.audio_times.append(at)
                        out.audio_packets.append((at, bytes(packet)))
                    continue
                for frame in packet.decode():  # the demuxer's last, empty packet flushes the decoder
                    out.frame_numbers.append(read_frame_number(frame.to_ndarray()[:H]))  # Y plane of yuv420p
                    out.video_times.append(float(frame.pts * video.time_base))
        out.errors = [f"{name}: {logger}: {msg}" for level, logger, msg in logs if level <= av.logging.ERROR]
    finally:
        av.logging.set_level(None)
    return out


def click_times(segments: list[SegmentMedia], threshold: float = ClickTrack.amplitude / 3) -> list[float]:
    """Session times of the clicks in the session's sound, decoded as one stream across its segments."""
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = segments[0].audio_config
    found: list[float] = []
    for segment in segments:
        for at, data in segment.audio_packets:
            for frame in decoder.decode(av.Packet(data)):
                samples = np.abs(frame.to_ndarray()[0])
                peak = int(np.argmax(samples))
                if samples[peak] > threshold:
                    found.append(at + peak / RATE)
    return found


def ffmpeg_errors(*inputs: str) -> str:
    """Decode with the real ffmpeg; what it reports at error level (empty when clean)."""
    run = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *inputs, "-f", "null", "-"],
                         capture_output=True, text=True, timeout=120)
    return run.stderr.strip() + ("" if run.returncode == 0 else f" (exit {run.returncode})")


def ffprobe_frame_counts(path: Path) -> dict[str, int]:
    """Frames per stream type as ffprobe counts them by decoding (-count_frames)."""
    run = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_type,nb_read_frames", "-of", "json", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    return {s["codec_type"]: int(s["nb_read_frames"]) for s in json.loads(run.stdout)["streams"]}


def ffprobe_video_packets(path: Path) -> list[tuple[float, float]]:
    """(pts, duration) in seconds of every video packet, as ffprobe's demuxer reads them."""
    run = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
                          "packet=pts_time,duration_time", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    return [(float(pts), float(duration)) for pts, duration in
            (line.split(",")[:2] for line in run.stdout.split())]


def read_back(rig: CaptureRig, folder: Path) -> list[SegmentMedia]:
    """Decrypt every finished segment with the bureau identity (plaintext .mp4 into `folder` for ffmpeg) and
    decode it, in segment order."""
    folder.mkdir(exist_ok=True)
    decoded = []
    for body in rig.segment_records():
        plain = decrypt(rig.store.segments_dir / body["file"], rig.identity)
        (folder / f"{body['index']:04d}.mp4").write_bytes(plain)
        decoded.append(decode_segment(body["file"], plain))
    return decoded


def frame_numbers(segments: list[SegmentMedia]) -> list[int | None]:
    return [n for s in segments for n in s.frame_numbers]


def verify_report(rig: CaptureRig) -> Any:
    return Verifier(identity=rig.identity).verify_path(rig.store.data_dir)


# --- the long run: 10+ simulated minutes, 100+ splits, pre-event, drift ------------------------------------


def start_paced_rig(root: Path, config: PipelineConfig, mic_ppm: float = 0.0) -> tuple[CaptureRig, PacedClock]:
    """A rig on a stepped clock that the camera moves as fast as the device keeps up. Platform "pisp" (Pi 5):
    the software encoder runs on the camera thread, so each frame has reached the pipeline before time moves.

    Time moves on only when the writer's inbox is below PACED_INBOX_PACKETS and the microphone adapter has
    taken every buffer due by now: the microphone is in lockstep with the camera, so no buffer's capture time
    is read while the clock jumps (at real pace a callback sees microseconds pass, never a frame period)."""
    clock = SimClock(rate=0.0)
    paced = PacedClock(clock)
    rig = start_rig(root, clock, config, platform="pisp", camera_clock=paced,
                    mic_clock=CrystalClock(paced, mic_ppm) if mic_ppm else paced)
    buffer_us = MICROPHONE.frames_per_buffer * 1e6 / MICROPHONE.sample_rate

    def device_kept_up() -> bool:
        due = int((rig.mic_sim.clock.mono_us() - rig.mic_clock_started_us) // buffer_us)
        return rig.pipeline.queue_depth <= PACED_INBOX_PACKETS and rig.mic.stats.buffers >= due

    paced.ready = device_kept_up
    return rig, paced


@dataclass
class LongRun:
    rig: CaptureRig
    paced: PacedClock
    segments: list[SegmentMedia]
    folder: Path
    press_us: int
    identity_file: Path

    def frame_sensor_us(self, number: int) -> int:
        """When the fake camera captured frame `number` (its sensor time on the device clock)."""
        return self.rig.camera_started_us + number * FRAME_US


def record_paced_session(root: Path, config: PipelineConfig, seconds: float, mic_ppm: float = 0.0) -> LongRun:
    """Fill the pre-event ring, press start (at the pipeline's clock's now), record `seconds` of media time,
    stop the sources, stop the session, and read back every segment."""
    rig, paced = start_paced_rig(root, config, mic_ppm)
    try:
        wait_for(lambda: rig.pipeline.stats().ring_seconds >= config.pre_event_seconds, "pre-event ring filled")
        rig.pipeline.start_session("S-LONG")
        wait_for(lambda: bool(rig.events.started), "first fragment on disk")
        press_us = rig.events.started[0].requested_at_us
        assert press_us is not None
        wait_for(lambda: rig.clock.mono_us() >= press_us + seconds * 1_000_000, "session recorded", 150)
        rig.finish()
        segments = read_back(rig, root / "plain")
    except BaseException:
        rig.stop_sources()
        rig.pipeline.close(30)
        rig.store.close()
        raise
    identity_file = root / "bureau-identity.txt"
    identity_file.write_text(f"{rig.identity}\n")
    return LongRun(rig, paced, segments, root / "plain", press_us, identity_file)


def av_offsets(run: LongRun, mic_ppm: float = 0.0) -> list[float]:
    """For every click in the session's sound: where it sits in the files minus where the picture captured at
    the same instant sits (seconds; positive = sound late). The mic's crystal (`mic_ppm`) decides when
    click k was captured on the device clock: k seconds of the mic's clock after its stream started."""
    rig = run.rig
    first = run.segments[0].frame_numbers[0]
    assert isinstance(first, int)
    session_zero_us = run.frame_sensor_us(first)  # the device time at session time 0
    mic_second_us = 1e6 / (1 + mic_ppm * 1e-6)
    clicks = click_times(run.segments)
    seconds = [round((t * 1e6 + session_zero_us - rig.mic_started_us) / mic_second_us) for t in clicks]
    # A click per second of the session, none missing, none extra.
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds)))
    video_at = dict(zip(frame_numbers(run.segments), [t for s in run.segments for t in s.video_times],
                        strict=True))
    offsets = []
    for t, second in zip(clicks, seconds, strict=True):
        captured_us = rig.mic_started_us + second * mic_second_us
        frame = round((captured_us - rig.camera_started_us) / FRAME_US)
        if frame in video_at:
            offsets.append(t - (video_at[frame] + (captured_us - run.frame_sensor_us(frame)) / 1e6))
    return offsets


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LongRun]:
    """One session of LONG_RUN_S simulated seconds in LONG_SEGMENT_S segments, pressed once the pre-event
    ring has filled; camera and microphone on the one device clock."""
    run = record_paced_session(tmp_path_factory.mktemp("long-run"),
                               PipelineConfig(segment_seconds=LONG_SEGMENT_S, pre_event_seconds=PRE_EVENT_S),
                               LONG_RUN_S)
    yield run
    run.rig.store.close()


def test_a_long_session_is_split_more_than_100_times_without_faults(long_run: LongRun) -> None:
    records = long_run.rig.segment_records()
    assert len(records) >= 101
    assert [r["index"] for r in records] == list(range(len(records)))
    assert not any(r["truncated"] for r in records)
    assert long_run.rig.events.closed_count() == len(records)
    assert long_run.rig.events.posted == [] and long_run.rig.events.writer_faults == []
    stats = long_run.rig.pipeline.stats()
    assert stats.packets_dropped == 0 and stats.overflow_episodes == 0
    assert long_run.rig.mic.stats.gaps == 0 and long_run.rig.mic.stats.queue_dropped == 0


def test_every_segment_decodes_with_pyav_and_ffmpeg_without_errors(long_run: LongRun) -> None:
    for segment in long_run.segments:
        assert segment.errors == [], segment.name
        assert segment.frame_numbers and None not in segment.frame_numbers, segment.name
    files = sorted(long_run.folder.glob("*.mp4"))
    playlist = long_run.folder.parent / "segments.txt"
    playlist.write_text("".join(f"file '{path}'\n" for path in files))
    assert ffmpeg_errors("-f", "concat", "-safe", "0", "-i", str(playlist)) == ""


def test_frames_written_are_the_frames_produced_none_lost_or_duplicated_across_splits(long_run: LongRun) -> None:
    rig = long_run.rig
    numbers = frame_numbers(long_run.segments)
    first = numbers[0]
    assert isinstance(first, int)
    assert numbers == list(range(first, first + len(numbers)))
    # Every frame the camera handed over from the session's first frame on was written, the last one included.
    handed = rig.tap.video()
    assert all(h.accepted for h in handed)
    first_pts = long_run.frame_sensor_us(first)
    produced = [h for h in handed if h.pts_us >= first_pts]
    assert len(produced) == len(numbers)
    assert produced[-1].pts_us == long_run.frame_sensor_us(numbers[-1])  # type: ignore[arg-type]
    assert rig.camera_sim.stats.frames_dropped == rig.camera_sim.stats.encoder_frames_lost == 0
    records = rig.segment_records()
    assert sum(r["video_frames"] for r in records) == len(numbers)
    # Each segment starts where the previous one ended, and ffprobe counts what the record says.
    per_segment = [s.frame_numbers for s in long_run.segments]
    for before, after in zip(per_segment, per_segment[1:], strict=False):
        assert after[0] == before[-1] + 1  # type: ignore[operator]
    files = sorted(long_run.folder.glob("*.mp4"))
    for index in range(0, len(files), max(1, len(files) // 10)):
        assert ffprobe_frame_counts(files[index]) == {"video": records[index]["video_frames"],
                                                      "audio": records[index]["audio_samples"] // AAC_FRAME}


def test_presentation_time_is_continuous_across_splits(long_run: LongRun) -> None:
    video = [t for s in long_run.segments for t in s.video_times]
    assert video[0] == 0.0  # the session's time zero is its first frame
    steps = [b - a for a, b in zip(video, video[1:], strict=False)]
    assert min(steps) > 0.99 * FRAME_US / 1e6 and max(steps) < 1.01 * FRAME_US / 1e6
    audio = [t for s in long_run.segments for t in s.audio_times]
    audio_steps = [b - a for a, b in zip(audio, audio[1:], strict=False)]
    assert min(audio_steps) == pytest.approx(AUDIO_FRAME_S, abs=2 / RATE)
    assert max(audio_steps) == pytest.approx(AUDIO_FRAME_S, abs=2 / RATE)
    # ffprobe agrees, file by file: each segment's first frame is presented when the previous one's last
    # frame ends, and the records say the same.
    files = sorted(long_run.folder.glob("*.mp4"))
    records = long_run.rig.segment_records()
    for index in range(0, len(files) - 1, max(1, len(files) // 12)):
        before, after = ffprobe_video_packets(files[index]), ffprobe_video_packets(files[index + 1])
        last_pts, last_duration = before[-1]
        assert after[0][0] == pytest.approx(last_pts + last_duration, abs=1 / 90_000)
        zero_us = records[0]["first_pts_us"]
        assert after[0][0] * 1e6 == pytest.approx(records[index + 1]["first_pts_us"] - zero_us, abs=12)
        # last_pts_us is the start of the segment's last frame, video or audio (docs/FORMAT.md).
        assert last_pts * 1e6 - 12 <= records[index]["last_pts_us"] - zero_us < after[0][0] * 1e6


def test_audio_stays_within_one_audio_frame_of_video_over_ten_minutes(long_run: LongRun) -> None:
    offsets = av_offsets(long_run)
    assert len(offsets) >= LONG_RUN_S  # a click every second, ten minutes and more of them
    worst = max(offsets, key=abs)
    assert abs(worst) <= AUDIO_FRAME_S, (f"worst A/V offset {worst * 1e3:.1f} ms "
                                         f"({long_run.paced.waits_expired} pacing waits gave up)")


SKEWED_MIC_PPM = 200.0  # within what cheap USB codecs show; 200 ppm is 21 ms (one AAC frame) in 107 s
SKEWED_RUN_S = 180


@pytest.mark.parametrize("ppm", [SKEWED_MIC_PPM, -SKEWED_MIC_PPM], ids=["fast-mic", "slow-mic"])
def test_audio_from_a_microphone_with_its_own_crystal_stays_within_one_audio_frame_of_video(
        tmp_path: Path, ppm: float) -> None:
    run = record_paced_session(tmp_path, PipelineConfig(segment_seconds=60.0, pre_event_seconds=0.0),
                               SKEWED_RUN_S, mic_ppm=ppm)
    try:
        offsets = av_offsets(run, ppm)
    finally:
        run.rig.store.close()
    assert len(offsets) >= SKEWED_RUN_S - 2  # one click a device second; a slow crystal yields a little fewer
    worst = max(offsets, key=abs)
    assert abs(worst) <= AUDIO_FRAME_S, f"worst A/V offset {worst * 1e3:.1f} ms"


def test_first_segment_holds_the_frames_from_before_the_press(long_run: LongRun) -> None:
    rig = long_run.rig
    (started,) = rig.events.started
    press_frame = (long_run.press_us - rig.camera_started_us) // FRAME_US
    first_segment = long_run.segments[0].frame_numbers
    first = first_segment[0]
    assert isinstance(first, int)
    # The ring keeps whole GOPs covering at least PRE_EVENT_S; what was still being assembled follows them.
    assert first <= press_frame - PRE_EVENT_S * FPS
    assert first >= press_frame - (PRE_EVENT_S + 3) * FPS
    assert set(range(first, press_frame + 1)) <= set(first_segment)
    assert started.pre_event_us is not None and started.pre_event_us >= PRE_EVENT_S * 1e6
    assert started.first_pts_us == long_run.frame_sensor_us(first)


def test_every_finished_segment_verifies_with_bwc_agent_verify(long_run: LongRun,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = bwc_agent(["verify", str(long_run.rig.store.data_dir), "--identity", str(long_run.identity_file),
                      "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"], report["problems"]
    assert report["segments_ok"] == report["decrypted"] == len(long_run.rig.segment_records())


# --- faults: the device reports them and recovers by itself -------------------------------------------------


def jumps(numbers: list[int | None]) -> list[tuple[int, int]]:
    """(before, after) wherever the frame numbers do not go up by exactly one."""
    return [(a, b) for a, b in zip(numbers, numbers[1:], strict=False)  # type: ignore[misc]
            if b != a + 1]  # type: ignore[operator]


def assert_clean_and_verified(rig: CaptureRig, segments: list[SegmentMedia], folder: Path) -> None:
    """No decode error in any segment (PyAV, ffmpeg), nothing truncated, every segment verifies."""
    for segment in segments:
        assert segment.errors == [], segment.name
        assert segment.frame_numbers and None not in segment.frame_numbers, segment.name
    for path in sorted(folder.glob("*.mp4")):
        assert ffmpeg_errors("-i", str(path)) == "", path.name
    records = rig.segment_records()
    assert records and not any(r["truncated"] for r in records)
    report = verify_report(rig)
    assert report.ok, [str(p) for p in report.problems]
    assert report.segments_ok == report.decrypted == len(records)


def test_camera_stall_becomes_a_camera_device_fault_and_recording_recovers_by_itself(
        fault_rig: Callable[..., CaptureRig], tmp_path: Path) -> None:
    rig = fault_rig(platform="pisp")
    rig.pipeline.start_session("S-STALL")
    wait_for(lambda: rig.events.closed_count() >= 2, "two segments before the stall")
    rig.camera_sim.faults.stall = True
    wait_for(lambda: bool(rig.events.faults()), "stall reported")
    wait_for(lambda: rig.camera.stats.restarts >= 1, "camera restarted while stalled")
    rig.camera_sim.faults.stall = False
    wait_for(lambda: bool(rig.events.recoveries()), "camera recovered")
    wait_for_video(rig, 3 * FPS, "three seconds of video after the recovery")
    rig.finish()

    (fault,) = rig.events.faults()
    assert (fault.component, fault.code) == ("camera", "camera_stalled")
    assert rig.events.recoveries() == [ev.PipelineRecovered(component="camera")]
    assert rig.events.posted.index(fault) < rig.events.posted.index(rig.events.recoveries()[0])
    folder = tmp_path / "plain"
    segments = read_back(rig, folder)
    assert_clean_and_verified(rig, segments, folder)
    numbers = frame_numbers(segments)
    times = [t for s in segments for t in s.video_times]
    # One hole - the frames the sensor never delivered - and the footage after it is on the same timeline,
    # later by the outage: never shifted to close it.
    ((before, after),) = jumps(numbers)
    at = numbers.index(after)
    assert after - before - 1 >= rig.camera_sim.stats.frames_stalled
    outage_s = times[at] - times[at - 1]
    assert outage_s >= CAMERA.stall_timeout_s
    assert outage_s * 1e6 / FRAME_US >= after - before - 1  # at least as long as the frames it lacks
    assert len(numbers) - at >= 3 * FPS  # everything after the recovery written
    # The microphone went on recording through the camera's outage: the sound has no hole.
    audio = [t for s in segments for t in s.audio_times]
    assert max(b - a for a, b in zip(audio, audio[1:], strict=False)) == pytest.approx(AUDIO_FRAME_S, abs=2 / RATE)
    assert rig.pipeline.stats().packets_dropped == 0 and rig.events.writer_faults == []


def test_encoder_error_becomes_an_encoder_device_fault_and_recording_recovers_by_itself(
        fault_rig: Callable[..., CaptureRig], tmp_path: Path) -> None:
    rig = fault_rig(platform="vc4")  # Pi 4: the hardware encoder's thread dies, the camera runs on
    rig.pipeline.start_session("S-ENCODER")
    wait_for(lambda: rig.events.closed_count() >= 2, "two segments before the encoder error")
    rig.camera_sim.faults.encoder_error = True
    wait_for(lambda: bool(rig.events.faults()), "encoder error reported")
    wait_for(lambda: rig.camera.stats.restarts >= 2, "restarts tried while the encoder keeps failing")
    assert rig.events.recoveries() == []
    rig.camera_sim.faults.encoder_error = False
    wait_for(lambda: bool(rig.events.recoveries()), "encoder recovered")
    wait_for_video(rig, 3 * FPS, "three seconds of video after the recovery")
    rig.finish()

    (fault,) = rig.events.faults()
    assert (fault.component, fault.code) == ("encoder", "encoder_stalled")
    assert rig.events.recoveries() == [ev.PipelineRecovered(component="encoder")]
    folder = tmp_path / "plain"
    segments = read_back(rig, folder)
    assert_clean_and_verified(rig, segments, folder)
    numbers = frame_numbers(segments)
    ((before, after),) = jumps(numbers)
    assert after - before - 1 >= rig.camera_sim.stats.encoder_frames_lost
    assert len(numbers) - numbers.index(after) >= 3 * FPS
    assert rig.pipeline.stats().packets_dropped == 0 and rig.events.writer_faults == []


def test_a_dead_microphone_is_a_logged_fault_and_video_keeps_recording(
        fault_rig: Callable[..., CaptureRig], tmp_path: Path) -> None:
    rig = fault_rig(platform="pisp")
    rig.pipeline.start_session("S-MIC")
    wait_for(lambda: rig.events.closed_count() >= 2, "two segments before the microphone dies")
    rig.mic_sim.faults.dead = True
    wait_for(lambda: bool(rig.events.faults()), "dead microphone reported")
    died_at = rig.events.closed_count()
    wait_for(lambda: rig.events.closed_count() >= died_at + 2, "two segments written without sound")
    assert rig.events.recoveries() == []
    rig.mic_sim.faults.dead = False
    wait_for(lambda: bool(rig.events.recoveries()), "microphone recovered")
    wait_for_video(rig, 3 * FPS, "three seconds more after the recovery")
    rig.finish()

    (fault,) = rig.events.faults()
    assert (fault.component, fault.code) == ("microphone", "microphone_stalled")
    assert rig.events.recoveries() == [ev.PipelineRecovered(component="microphone")]
    folder = tmp_path / "plain"
    segments = read_back(rig, folder)
    assert_clean_and_verified(rig, segments, folder)
    # Video never stopped: every frame from the first to the last, across the microphone's outage.
    numbers = frame_numbers(segments)
    assert jumps(numbers) == []
    assert [h.accepted for h in rig.tap.video()].count(False) == 0
    # The sound has one hole, at least as long as the time it took to notice, and resumes after it.
    audio = [t for s in segments for t in s.audio_times]
    holes = [(a, b) for a, b in zip(audio, audio[1:], strict=False) if b - a > 1.5 * AUDIO_FRAME_S]
    assert len(holes) == 1
    hole_start, hole_end = holes[0]
    assert hole_end - hole_start >= MICROPHONE.stall_timeout_s
    assert audio[-1] - hole_end >= 1.0
    assert rig.mic.stats.faults == 1 and rig.mic.stats.restarts >= 1


class SlowCard(SimStorage):
    """hw_sim's storage with fsync held up while `hold_syncs()` is in force: a worn SD card that stalls for
    seconds, so the capture writer falls behind the sources."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self._flowing = threading.Event()
        self._flowing.set()
        self.stalled = threading.Event()

    def hold_syncs(self) -> None:
        self._flowing.clear()

    def let_syncs_go(self) -> None:
        self._flowing.set()

    def sync(self, fh: Any) -> None:
        if not self._flowing.is_set():
            self.stalled.set()
            self._flowing.wait(30)
        super().sync(fh)


def test_a_full_capture_queue_is_reported_as_a_queue_fault_and_counted_not_silent(
        fault_rig: Callable[..., CaptureRig], tmp_path: Path) -> None:
    card = SlowCard(tmp_path / "device")
    rig = fault_rig(platform="pisp", fs=card, queue_packets=40)
    rig.pipeline.start_session("S-QUEUE")
    wait_for(lambda: rig.events.closed_count() >= 2, "two segments before the card stalls")
    card.hold_syncs()
    try:
        wait_for(card.stalled.is_set, "writer held up in fsync")
        wait_for(lambda: rig.pipeline.stats().packets_dropped >= 40, "the inbox overflowed")
    finally:
        card.let_syncs_go()
    wait_for(lambda: bool(rig.events.recovered), "overflow episode ended")
    wait_for_video(rig, 4 * FPS, "four seconds of video after the overflow")
    rig.finish()

    stats = rig.pipeline.stats()
    refused = [h for h in rig.tap.handed if not h.accepted]
    assert stats.packets_dropped == len(refused) >= 40
    assert stats.overflow_episodes == len(rig.events.overflows) == len(rig.events.recovered) >= 1
    assert sum(r.dropped for r in rig.events.recovered) == stats.packets_dropped
    assert stats.queue_high_water == stats.queue_capacity == 40
    # What the session state machine is told: one queue fault per episode.
    assert [(f.component, f.code) for f in rig.events.faults()] == [("queue", "queue_full")] * stats.overflow_episodes
    folder = tmp_path / "plain"
    segments = read_back(rig, folder)
    numbers = frame_numbers(segments)
    # The frames lost to the full queue are a hole in the footage; recording carried on after it.
    lost_video = [h for h in refused if h.kind == "video"]
    holes = jumps([n for n in numbers if n is not None])
    assert holes and sum(b - a - 1 for a, b in holes) >= len(lost_video)
    assert len(numbers) - numbers.index(holes[-1][1]) >= 4 * FPS
    # Up to the next keyframe the frames after a hole may lack their references (a decoder conceals that);
    # the segments after the episode are whole again. Everything written verifies.
    (last,) = [s for s in segments if s.name == rig.segment_records()[-1]["file"]]
    assert last.errors == [] and jumps(last.frame_numbers) == []
    assert ffmpeg_errors("-i", str(sorted(folder.glob("*.mp4"))[-1])) == ""
    records = rig.segment_records()
    assert not any(r["truncated"] for r in records)
    report = verify_report(rig)
    assert report.ok and report.segments_ok == report.decrypted == len(records)
