"""Media sources on the simulator (issue 3; DESIGN.md "Recording"; R5 traceable, R17 device_fault, R22 no gaps
unaccounted for): the production adapters run against hw_sim's fake picamera2 / PyAudio and a real
cv2.VideoCapture, and the tests decode what came out with PyAV, reading the frame numbers drawn into the
pixels back out of the decoded pictures.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

from agent.capture.audio_pyaudio import AudioSettings, PyAudioSource
from agent.capture.camera_opencv import OpenCVVideoSource
from agent.capture.camera_picamera2 import CameraSettings, Picamera2VideoSource, h264_parameter_sets
from agent.capture.packets import EncodedPacket
from agent.events import PipelineFault, PipelineRecovered
from hw_sim.clock import SimClock
from hw_sim.frames import SyntheticScene, read_frame_number
from hw_sim.picamera2 import CameraSimulator
from hw_sim.pyaudio import AudioSimulator, ToneSignal

W, H, FPS = 320, 240, 30
FRAME_US = round(1_000_000 / FPS)
SMALL = CameraSettings(width=W, height=H, fps=FPS, bitrate=600_000, stall_timeout_s=1.0, restart_interval_s=1.0)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Bounded wait for something the simulator will make true (not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the bound")
        time.sleep(0.01)


def decode_frame_numbers(packets: list[EncodedPacket]) -> list[int | None]:
    decoder = av.CodecContext.create("h264", "r")
    numbers: list[int | None] = []
    for packet in packets:
        for frame in decoder.decode(av.Packet(packet.data)):
            numbers.append(read_frame_number(frame.to_ndarray(format="gray")))
    for frame in decoder.decode(None):
        numbers.append(read_frame_number(frame.to_ndarray(format="gray")))
    return numbers


class Recorder:
    """What the pipeline would receive: packets and events, from the sources' threads."""

    def __init__(self) -> None:
        self.packets: list[EncodedPacket] = []
        self.events: list[object] = []
        self.lock = threading.Lock()

    def packet(self, packet: EncodedPacket) -> None:
        with self.lock:
            self.packets.append(packet)

    def event(self, event: object) -> None:
        with self.lock:
            self.events.append(event)

    def snapshot(self) -> list[EncodedPacket]:
        with self.lock:
            return list(self.packets)


@pytest.fixture
def clock() -> SimClock:
    return SimClock(rate=4.0)


def start_camera(clock: SimClock, platform: str = "vc4", **kwargs) -> tuple[CameraSimulator, Picamera2VideoSource,
                                                                            Recorder]:
    rig = CameraSimulator(clock, platform=platform)
    rec = Recorder()
    source = Picamera2VideoSource(rec.packet, clock=clock, settings=kwargs.pop("settings", SMALL),
                                  on_event=rec.event, picamera2_module=rig.module, **kwargs)
    source.start()
    return rig, source, rec


@pytest.mark.parametrize("platform", ["vc4", "pisp"])
def test_picamera2_frames_arrive_in_order_with_a_keyframe_every_second(clock: SimClock, platform: str) -> None:
    started_at = clock.mono_us()
    rig, source, rec = start_camera(clock, platform)
    try:
        wait_for(lambda: len(rec.packets) >= 3 * FPS + 1)
    finally:
        source.stop()
    stopped_at = clock.mono_us()
    packets = rec.snapshot()
    params = source.video_params
    assert params is not None and (params.width, params.height, params.fps) == (W, H, FPS)
    assert h264_parameter_sets(packets[0].data) == (params.sps, params.pps)

    numbers = decode_frame_numbers(packets)
    assert len(numbers) == len(packets)
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "frames lost, duplicated or reordered"
    assert [p.seq for p in packets] == list(range(len(packets)))
    assert [i for i, p in enumerate(packets) if p.keyframe] == list(range(0, len(packets), FPS))
    # Timestamps: one frame period apart, on the shared clock's timeline.
    assert all(b.pts_us - a.pts_us == FRAME_US for a, b in zip(packets, packets[1:], strict=False))
    assert started_at <= packets[0].pts_us and packets[-1].pts_us <= stopped_at
    assert not rec.events


def test_forced_keyframe_is_honoured_at_the_next_frame(clock: SimClock) -> None:
    rig, source, rec = start_camera(clock)
    try:
        wait_for(lambda: len(rec.packets) >= 40)
        assert source.force_keyframe()
        asked_at = len(rec.snapshot())
        wait_for(lambda: len(rec.packets) >= asked_at + 10)
    finally:
        source.stop()
    packets = rec.snapshot()
    forced = [i for i, p in enumerate(packets) if p.keyframe and i % FPS != 0]
    # The request lands on the next frame the encoder takes (one or two frames may be in flight).
    assert forced and asked_at <= forced[0] <= asked_at + 3
    numbers = decode_frame_numbers(packets)
    assert numbers == list(range(numbers[0], numbers[0] + len(packets)))


def test_connect_starts_a_sink_at_a_keyframe(clock: SimClock) -> None:
    rig = CameraSimulator(clock)
    source = Picamera2VideoSource(None, clock=clock, settings=SMALL, picamera2_module=rig.module)
    source.start()
    rec = Recorder()
    try:
        params = source.wait_video_params(timeout_s=20)
        wait_for(lambda: source.stats.packets >= 10)  # mid-GOP now
        source.connect(rec.packet)
        wait_for(lambda: len(rec.packets) >= 5)
    finally:
        source.stop()
    packets = rec.snapshot()
    assert packets[0].keyframe and packets[0].seq == 0
    assert h264_parameter_sets(packets[0].data) == (params.sps, params.pps)
    assert source.gate.dropped_unconnected >= 10


def test_dropped_camera_frames_show_as_a_counted_gap_in_time(clock: SimClock) -> None:
    rig, source, rec = start_camera(clock)
    try:
        wait_for(lambda: len(rec.packets) >= 20)
        rig.faults.drop_frames(5)
        wait_for(lambda: rig.stats.frames_dropped == 5 and len(rec.packets) >= 60)
    finally:
        source.stop()
    packets = rec.snapshot()
    numbers = decode_frame_numbers(packets)
    jumps = [(a, b) for a, b in zip(numbers, numbers[1:], strict=False) if b != a + 1]
    assert len(jumps) == 1 and jumps[0][1] - jumps[0][0] == 6
    gaps = [b.pts_us - a.pts_us for a, b in zip(packets, packets[1:], strict=False) if b.pts_us - a.pts_us != FRAME_US]
    assert gaps == [6 * FRAME_US]
    assert source.stats.frame_gaps == 1


def test_camera_stall_is_reported_as_a_camera_fault_and_recovers_by_itself(clock: SimClock) -> None:
    rig, source, rec = start_camera(clock)
    try:
        wait_for(lambda: len(rec.packets) >= 30)
        rig.faults.stall = True
        wait_for(lambda: any(isinstance(e, PipelineFault) for e in rec.events))
        before = len(rec.snapshot())
        rig.faults.stall = False
        wait_for(lambda: any(isinstance(e, PipelineRecovered) for e in rec.events))
        wait_for(lambda: len(rec.packets) >= before + 30)
    finally:
        source.stop()
    assert rec.events[0] == PipelineFault(component="camera", code="camera_stalled", detail=rec.events[0].detail)
    assert rec.events[1] == PipelineRecovered(component="camera")
    packets = rec.snapshot()
    assert packets[before].keyframe, "the first packet after a restart starts a GOP"
    assert all(b.pts_us > a.pts_us for a, b in zip(packets, packets[1:], strict=False))
    # The outage is a gap in time on the shared clock (footage is never shifted to close it).
    outage_us = packets[before].pts_us - packets[before - 1].pts_us
    assert outage_us >= SMALL.stall_timeout_s * 1e6
    numbers = decode_frame_numbers(packets)
    assert None not in numbers and numbers == sorted(set(numbers))
    # The frames the sensor never delivered match the outage (to a frame: the stall lands mid-interval).
    assert abs((numbers[before] - numbers[before - 1]) - outage_us / FRAME_US) <= 1


def test_encoder_error_is_reported_as_an_encoder_fault_and_recovers_when_it_clears(clock: SimClock) -> None:
    rig, source, rec = start_camera(clock, "vc4")
    try:
        wait_for(lambda: len(rec.packets) >= 30)
        rig.faults.encoder_error = True
        wait_for(lambda: any(isinstance(e, PipelineFault) for e in rec.events))
        wait_for(lambda: source.stats.restarts >= 2)  # restarts keep failing while the fault lasts
        assert not any(isinstance(e, PipelineRecovered) for e in rec.events)
        before = len(rec.snapshot())
        rig.faults.encoder_error = False
        wait_for(lambda: any(isinstance(e, PipelineRecovered) for e in rec.events))
        wait_for(lambda: len(rec.packets) >= before + 30)
    finally:
        source.stop()
    faults = [e for e in rec.events if isinstance(e, PipelineFault)]
    assert [(f.component, f.code) for f in faults] == [("encoder", "encoder_stalled")]
    assert rec.events[-1] == PipelineRecovered(component="encoder")
    packets = rec.snapshot()
    assert packets[before].keyframe
    numbers = decode_frame_numbers(packets)
    assert None not in numbers and numbers == sorted(set(numbers))


def write_synthetic_video(path: Path, frames: int) -> None:
    scene = SyntheticScene(W, H)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "ultrafast", "qp": "10"}
        for n in range(frames):
            i420 = scene.new_i420()
            scene.draw_i420(i420, n, n * FRAME_US)
            for packet in stream.encode(av.VideoFrame.from_ndarray(i420, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_opencv_camera_encodes_every_frame_in_order_and_reopens_after_a_stall(tmp_path: Path,
                                                                             clock: SimClock) -> None:
    import cv2

    video = tmp_path / "usb-camera.mp4"
    write_synthetic_video(video, 75)
    rec = Recorder()
    # The file ends after 75 frames (the camera "stalls"); reopening it plays it again (the camera is back).
    source = OpenCVVideoSource(rec.packet, clock=clock, capture_factory=lambda: cv2.VideoCapture(str(video)),
                               settings=SMALL, paced=True, on_event=rec.event)
    source.start()
    try:
        wait_for(lambda: any(isinstance(e, PipelineRecovered) for e in rec.events))
        wait_for(lambda: len(rec.packets) >= 80)
    finally:
        source.stop()
    packets = rec.snapshot()
    numbers = decode_frame_numbers(packets)
    assert numbers[:80] == list(range(75)) + list(range(5))
    assert [i for i, p in enumerate(packets[:80]) if p.keyframe] == [0, 30, 60, 75]
    assert all(b.pts_us - a.pts_us == FRAME_US for a, b in zip(packets[:75], packets[1:75], strict=False))
    assert packets[75].pts_us - packets[74].pts_us > SMALL.stall_timeout_s * 1e6
    assert source.video_params is not None and source.video_params.width == W
    assert [(type(e).__name__, e.component) for e in rec.events] == [("PipelineFault", "camera"),
                                                                   ("PipelineRecovered", "camera")]


# --- audio --------------------------------------------------------------------------------------------------

RATE = 48_000


def decode_aac(packets: list[EncodedPacket], asc: bytes) -> np.ndarray:
    decoder = av.CodecContext.create("aac", "r")
    decoder.extradata = asc
    pcm = []
    for packet in packets:
        for frame in decoder.decode(av.Packet(packet.data)):
            pcm.append(frame.to_ndarray()[0])
    return np.concatenate(pcm)


def start_microphone(clock: SimClock) -> tuple[AudioSimulator, PyAudioSource, Recorder]:
    rig = AudioSimulator(clock, ToneSignal(1000.0, 0.5))
    rec = Recorder()
    source = PyAudioSource(rec.packet, clock=clock, settings=AudioSettings(sample_rate=RATE), on_event=rec.event,
                           pyaudio_module=rig.module)
    source.start()
    return rig, source, rec


def test_mic_overflow_inserts_silence_of_the_lost_length_without_shifting_later_audio(clock: SimClock) -> None:
    rig, source, rec = start_microphone(clock)
    try:
        wait_for(lambda: source.stats.buffers >= 40)
        rig.faults.overflow(6)
        wait_for(lambda: source.stats.overflows == 1 and source.stats.buffers >= 100)
    finally:
        source.stop()
    lost_first, lost_count = rig.stats.lost_spans[0]
    assert lost_count == 6 * 1024
    assert source.stats.samples_inserted == lost_count and source.stats.gaps == 1
    packets = rec.snapshot()
    # Every packet follows the previous one exactly: one continuous timeline, nothing shifted.
    assert all(b.pts_us == a.pts_us + a.duration_us for a, b in zip(packets, packets[1:], strict=False))
    assert [p.seq for p in packets] == list(range(len(packets)))
    pcm = decode_aac(packets, source.audio_params.asc)
    # Decoded sample i (after the 1024-sample priming frame) is device sample i: the tone is where it was
    # captured, and the silence sits exactly over the lost span.
    pcm = pcm[1024:]
    margin = 1024  # AAC's transform blurs an edge by up to one frame

    def rms(a: int, b: int) -> float:
        return float(np.sqrt(np.mean(pcm[a:b] ** 2)))

    assert rms(lost_first - 8 * 1024, lost_first - margin) > 0.3
    assert rms(lost_first + margin, lost_first + lost_count - margin) < 0.01
    assert rms(lost_first + lost_count + margin, lost_first + lost_count + 8 * 1024) > 0.3
    # And the tone's phase after the gap is the device's, i.e. not shifted by even a sample.
    after = np.arange(lost_first + lost_count + 2048, lost_first + lost_count + 4096)
    expected = 0.5 * np.sin(2 * np.pi * 1000.0 * after / RATE)
    assert float(np.max(np.abs(pcm[after] - expected))) < 0.05


def test_audio_timestamps_are_on_the_shared_monotonic_clock(clock: SimClock) -> None:
    opened_at = clock.mono_us()
    rig, source, rec = start_microphone(clock)
    try:
        wait_for(lambda: len(rec.packets) >= 20)
    finally:
        source.stop()
    packets = rec.snapshot()
    # The priming frame sits one AAC frame before the first captured sample, which is when the stream opened.
    first_sample_us = packets[0].pts_us + packets[0].duration_us
    assert abs(first_sample_us - opened_at) <= 1024 * 1e6 / RATE
    assert source.audio_params.sample_rate == RATE and source.audio_params.asc[:1] == b"\x11"


def test_a_silent_microphone_is_reported_and_recovers(clock: SimClock) -> None:
    rig, source, rec = start_microphone(clock)
    try:
        wait_for(lambda: source.stats.buffers >= 10)
        rig.faults.dead = True
        wait_for(lambda: any(isinstance(e, PipelineFault) for e in rec.events))
        rig.faults.dead = False
        wait_for(lambda: any(isinstance(e, PipelineRecovered) for e in rec.events))
    finally:
        source.stop()
    assert rec.events[0].component == "microphone" and rec.events[0].code == "microphone_stalled"
    assert rec.events[1] == PipelineRecovered(component="microphone")
    packets = rec.snapshot()
    assert all(b.pts_us > a.pts_us for a, b in zip(packets, packets[1:], strict=False))


def test_fake_pyaudio_blocking_read_raises_input_overflowed_like_pyaudio(clock: SimClock) -> None:
    rig = AudioSimulator(clock)
    pa = rig.module.PyAudio()
    stream = pa.open(format=rig.module.paInt16, channels=1, rate=RATE, input=True, frames_per_buffer=480)
    try:
        assert len(stream.read(480)) == 960
        rig.faults.overflow(2)
        with pytest.raises(OSError) as raised:
            stream.read(480)
        assert raised.value.args[0] == rig.module.paInputOverflowed
        assert len(stream.read(480, exception_on_overflow=False)) == 960
    finally:
        pa.terminate()


def test_camera_can_drive_a_stepped_clock_as_fast_as_it_encodes_and_the_microphone_follows() -> None:
    clock = SimClock(rate=0.0)
    rig = CameraSimulator(clock, drives_clock=True)
    rec = Recorder()
    camera = Picamera2VideoSource(rec.packet, clock=clock, settings=SMALL, on_event=rec.event,
                                  picamera2_module=rig.module)
    mic_rig = AudioSimulator(clock)
    microphone = PyAudioSource(rec.packet, clock=clock, on_event=rec.event, pyaudio_module=mic_rig.module)
    microphone.start()
    camera.start()
    try:
        wait_for(lambda: camera.stats.packets >= 4 * FPS and microphone.stats.packets >= 100)
    finally:
        camera.stop()
        microphone.stop()
    video = [p for p in rec.snapshot() if p.kind == "video"]
    audio = [p for p in rec.snapshot() if p.kind == "audio"]
    assert not rec.events
    assert all(b.pts_us - a.pts_us == FRAME_US for a, b in zip(video, video[1:], strict=False))
    assert all(b.pts_us == a.pts_us + a.duration_us for a, b in zip(audio, audio[1:], strict=False))
    # Both on the one simulated timeline: the audio covers the same stretch of time as the video.
    assert abs(audio[1].pts_us - video[0].pts_us) < 100_000
