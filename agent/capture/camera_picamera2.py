"""Camera source for Raspberry Pi cameras through picamera2: H.264 packets on the shared monotonic clock.

The same code drives a Pi 4 (picamera2's `H264Encoder` is the V4L2 hardware codec) and a Pi 5 (there
`H264Encoder` is picamera2's libav software encoder): both take `bitrate`, `repeat`, `iperiod`,
`framerate`, both have `force_key_frame()` (picamera2 >= 0.3.32), and both hand each encoded frame to
`Output.outputframe(frame, keyframe, timestamp, packet, audio)`, where `timestamp` is microseconds since
the encoder's first frame and `encoder.firsttimestamp` is that frame's sensor time (libcamera
SensorTimestamp, CLOCK_MONOTONIC, the clock `agent.clock.SystemClock.mono_us` reads). So a packet's
presentation time on the shared clock is `firsttimestamp + timestamp` (DESIGN.md "Recording": audio and
video share one monotonic clock).

picamera2 is imported lazily (it exists only on a Pi); tests pass `hw_sim.picamera2.CameraSimulator().module`
as `picamera2_module`, and nothing else differs.

Faults and recovery (R17 `device_fault`): a supervisor thread watches the packet flow. No packet for
`stall_timeout_s` (media clock) raises `PipelineFault` - component "camera" when no frames reach
pre_callback either (the camera stalled), "encoder" when frames arrive but nothing comes out of the encoder.
It then restarts the camera and encoder (close, reopen, reconfigure) every `restart_interval_s` until
packets flow again, and reports `PipelineRecovered`. Presentation times stay on the shared clock across a
restart, so the outage shows as a gap in time, never as shifted footage.

Threads:
- picamera2's camera thread: `_pre_callback` (lens-covered check on the clean frame, then the OSD stamp).
- the encoder's output thread (Pi 4: V4L2 poll thread; Pi 5: the camera thread): `_PacketSink.outputframe`
  builds an `EncodedPacket` and calls `on_packet`, which must only enqueue (pipeline.submit).
- "camera-supervisor" (ours): stall watchdog and restarts; the only thread that opens/closes the camera
  after `start()`.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from agent.capture.lens import LensCoverDetector
from agent.capture.osd import OsdOverlay
from agent.capture.packets import EncodedPacket, VideoParams
from agent.events import PipelineFault, PipelineRecovered

log = logging.getLogger(__name__)

SENSOR_CLOCK_MISMATCH_US = 10_000_000  # a first packet this far from clock.mono_us() is on another clock
NAL_SPS = 7
NAL_PPS = 8
NAL_IDR = 5


@dataclass(frozen=True)
class CameraSettings:
    width: int = 1920
    height: int = 1080
    fps: int = 30
    bitrate: int = 8_000_000
    keyframe_interval_s: int = 1  # DESIGN.md: keyframe every second, one fragment per GOP
    camera_num: int = 0
    stall_timeout_s: float = 2.0
    restart_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096) or self.width % 2 or self.height % 2:
            raise ValueError(f"camera size must be even and within 16..4096, got {self.width}x{self.height}")
        if not 1 <= self.fps <= 60:
            raise ValueError(f"camera fps must be within 1..60, got {self.fps}")
        if not 100_000 <= self.bitrate <= 25_000_000:
            raise ValueError(f"camera bitrate must be within 100k..25M bit/s, got {self.bitrate}")
        if not 1 <= self.keyframe_interval_s <= 10:
            raise ValueError(f"keyframe_interval_s must be within 1..10, got {self.keyframe_interval_s}")
        if not 0.2 <= self.stall_timeout_s <= 60 or not 0.1 <= self.restart_interval_s <= 600:
            raise ValueError(f"stall_timeout_s {self.stall_timeout_s} / restart_interval_s "
                             f"{self.restart_interval_s} out of range")

    @property
    def frame_duration_us(self) -> int:
        return round(1_000_000 / self.fps)


@dataclass
class CameraSourceStats:
    packets: int = 0
    keyframes: int = 0
    frames_seen: int = 0  # frames that reached pre_callback
    frame_gaps: int = 0  # packets that came more than 1.5 frame durations after the previous one
    forced_keyframes_requested: int = 0
    forced_keyframes_unsupported: int = 0
    faults: int = 0
    restarts: int = 0
    restart_failures: int = 0
    dropped_before_keyframe: int = 0


class PacketGate:
    """Where a video source's packets go: to the connected sink, each connection starting at a keyframe.

    Packets before `connect()` (or between `disconnect()` and the next connect) are counted, not delivered;
    after a connect, packets are held back until the next keyframe so the sink never starts mid-GOP. `seq`
    numbers the delivered packets from 0 without gaps. Runs on the source's output thread; `connect` may be
    called from any thread (one attribute swap).
    """

    def __init__(self, on_packet: Callable[[EncodedPacket], None] | None) -> None:
        self._sink = on_packet
        self._waiting_for_keyframe = True
        self.seq = 0
        self.dropped_unconnected = 0
        self.dropped_before_keyframe = 0

    def connect(self, on_packet: Callable[[EncodedPacket], None]) -> None:
        self._waiting_for_keyframe = True
        self._sink = on_packet

    def disconnect(self) -> None:
        self._sink = None

    def offer(self, data: bytes, pts_us: int, duration_us: int, keyframe: bool) -> bool:
        sink = self._sink
        if sink is None:
            self.dropped_unconnected += 1
            return False
        if self._waiting_for_keyframe:
            if not keyframe:
                self.dropped_before_keyframe += 1
                return False
            self._waiting_for_keyframe = False
        packet = EncodedPacket(kind="video", data=data, pts_us=pts_us, duration_us=duration_us, keyframe=keyframe,
                               seq=self.seq)
        self.seq += 1
        sink(packet)
        return True


def annexb_nal_units(access_unit: bytes) -> list[bytes]:
    """Split an Annex B byte stream into NAL units (start codes removed)."""
    units: list[bytes] = []
    i = 0
    n = len(access_unit)
    start = -1
    while i + 2 < n:
        if access_unit[i] == 0 and access_unit[i + 1] == 0 and access_unit[i + 2] == 1:
            if start >= 0:
                units.append(access_unit[start:i].rstrip(b"\x00"))
            i += 3
            start = i
        else:
            i += 1
    if start >= 0:
        units.append(access_unit[start:])
    return [u for u in units if u]


def h264_parameter_sets(access_unit: bytes) -> tuple[bytes, bytes] | None:
    """(SPS, PPS) carried in an access unit, or None if it carries neither pair."""
    sps = pps = None
    for unit in annexb_nal_units(access_unit):
        nal_type = unit[0] & 0x1F
        if nal_type == NAL_SPS and sps is None:
            sps = unit
        elif nal_type == NAL_PPS and pps is None:
            pps = unit
    return (sps, pps) if sps and pps else None


def load_picamera2() -> Any:
    """The real picamera2 API, imported only when a Pi camera is used."""
    top = importlib.import_module("picamera2")
    encoders = importlib.import_module("picamera2.encoders")
    outputs = importlib.import_module("picamera2.outputs")
    return SimpleNamespace(Picamera2=top.Picamera2, MappedArray=top.MappedArray, H264Encoder=encoders.H264Encoder,
                           Output=outputs.Output)


class VideoSourceParams:
    """What every camera adapter offers the pipeline once its first keyframe is out: the stream's
    parameters, and `connect` (packets from the next keyframe on). Subclasses set `_video_params`,
    `_params_known`, `gate` and implement `force_keyframe`."""

    _video_params: VideoParams | None
    _params_known: threading.Event
    gate: PacketGate

    def force_keyframe(self) -> bool:
        raise NotImplementedError

    @property
    def video_params(self) -> VideoParams | None:
        return self._video_params

    def wait_video_params(self, timeout_s: float = 10.0) -> VideoParams:
        """Block until the first keyframe has given the stream's SPS/PPS (after `start()`)."""
        if not self._params_known.wait(timeout_s) or self._video_params is None:
            raise TimeoutError(f"no H.264 keyframe from the camera within {timeout_s} s")
        return self._video_params

    def connect(self, on_packet: Callable[[EncodedPacket], None]) -> None:
        """Send packets to `on_packet` from the next keyframe on (asked for at once)."""
        self.gate.connect(on_packet)
        self.force_keyframe()


class Picamera2VideoSource(VideoSourceParams):
    """A Pi camera as a source of H.264 `EncodedPacket`s.

    Contract: after `start()` returns the camera is running; `wait_video_params()` returns the stream's
    parameters once the first keyframe is out (they are set before any packet reaches the sink); the first
    packet a sink gets (after the constructor's `on_packet`, or after `connect()`) is a keyframe, and so is
    the first after every restart; `pts_us` is strictly increasing on `clock.mono_us()`'s timeline; `seq`
    numbers the delivered packets from 0 without gaps. `force_keyframe()` asks for an IDR as soon as
    possible (False when the installed picamera2 cannot). `stop()` returns with no more calls to the sink.
    """

    def __init__(self, on_packet: Callable[[EncodedPacket], None] | None = None, *, clock: Any,
                 settings: CameraSettings | None = None, osd: OsdOverlay | None = None,
                 lens: LensCoverDetector | None = None,
                 on_event: Callable[[PipelineFault | PipelineRecovered], None] | None = None,
                 picamera2_module: Any = None) -> None:
        self.settings = settings or CameraSettings()
        self.gate = PacketGate(on_packet)
        self._params_known = threading.Event()
        self._on_event = on_event or (lambda event: None)
        self._clock = clock
        self._osd = osd
        self._lens = lens
        self._api = picamera2_module
        self.stats = CameraSourceStats()
        self._video_params: VideoParams | None = None
        self._lock = threading.Lock()  # guards camera/encoder handles between the supervisor and callers
        self._camera: Any = None
        self._encoder: Any = None
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        # Written by the frame/output threads, read by the supervisor (single assignments, no lock needed).
        self._last_packet_at_us: int | None = None
        self._last_frame_at_us: int | None = None
        self._last_pts_us: int | None = None
        self._opened_at_us = 0
        self._need_keyframe = True
        self._clock_offset_us: int | None = None
        self._faulted: str | None = None  # component currently reported as faulty
        self._generation = 0  # which open() a packet sink belongs to: stragglers of a closed encoder are ignored

    def start(self) -> None:
        """Open and start the camera (raises if it cannot be opened at all), then supervise it."""
        if self._api is None:
            self._api = load_picamera2()
        self._stop.clear()
        with self._lock:
            self._open()
        self._supervisor = threading.Thread(target=self._supervise, name="camera-supervisor", daemon=True)
        self._supervisor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10.0)
            self._supervisor = None
        with self._lock:
            self._close()

    def force_keyframe(self) -> bool:
        """Ask the encoder for an IDR frame as soon as possible (for a segment split)."""
        self.stats.forced_keyframes_requested += 1
        encoder = self._encoder
        if encoder is None or not hasattr(encoder, "force_key_frame"):
            self.stats.forced_keyframes_unsupported += 1
            return False
        encoder.force_key_frame()
        return True

    # --- camera lifecycle (under self._lock) ---------------------------------------------------------------

    def _open(self) -> None:
        s = self.settings
        api = self._api
        camera = api.Picamera2(s.camera_num)
        try:
            config = camera.create_video_configuration(main={"size": (s.width, s.height), "format": "YUV420"},
                                                       controls={"FrameRate": s.fps})
            camera.configure(config)
            camera.pre_callback = self._pre_callback
            encoder = api.H264Encoder(bitrate=s.bitrate, repeat=True, iperiod=s.fps * s.keyframe_interval_s,
                                      framerate=s.fps)
            self._generation += 1
            sink = _make_packet_sink(api.Output, self, self._generation)
            self._need_keyframe = True
            self._clock_offset_us = None
            self._opened_at_us = self._clock.mono_us()
            self._last_packet_at_us = None
            self._last_frame_at_us = None
            camera.start_encoder(encoder, sink)
            camera.start()
        except BaseException:
            _close_quietly(camera, None)
            raise
        self._camera, self._encoder = camera, encoder

    def _close(self) -> None:
        camera, encoder = self._camera, self._encoder
        self._camera = self._encoder = None
        _close_quietly(camera, encoder)

    # --- supervisor thread -----------------------------------------------------------------------------------

    def _supervise(self) -> None:
        stall_us = int(self.settings.stall_timeout_s * 1_000_000)
        retry_us = int(self.settings.restart_interval_s * 1_000_000)
        next_restart_us: int | None = None
        while not self._stop.wait(0.05):
            now = self._clock.mono_us()
            last_packet = self._last_packet_at_us
            if self._faulted is None:
                since = last_packet if last_packet is not None else self._opened_at_us
                if now - since < stall_us:
                    continue
                last_frame = self._last_frame_at_us
                frames_flowing = last_frame is not None and now - last_frame < stall_us
                self._faulted = "encoder" if frames_flowing else "camera"
                self.stats.faults += 1
                code = "encoder_stalled" if frames_flowing else "camera_stalled"
                log.warning("%s fault: no video packet for %.1f s", self._faulted, (now - since) / 1e6)
                self._on_event(PipelineFault(component=self._faulted, code=code,
                                             detail=f"no H.264 packet for {(now - since) / 1e6:.1f} s"))
                next_restart_us = now
            elif last_packet is not None and last_packet >= self._opened_at_us:
                component, self._faulted = self._faulted, None
                log.info("%s recovered", component)
                self._on_event(PipelineRecovered(component=component))
                continue
            if next_restart_us is not None and now >= next_restart_us:
                next_restart_us = now + retry_us
                self._restart()

    def _restart(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self._close()
            self.stats.restarts += 1
            try:
                self._open()
            except Exception as exc:  # the camera may be gone for a while; try again later
                self.stats.restart_failures += 1
                log.warning("camera restart failed: %s", exc)

    # --- camera thread ---------------------------------------------------------------------------------------

    def _pre_callback(self, request: Any) -> None:
        s = self.settings
        self._last_frame_at_us = self._clock.mono_us()
        self.stats.frames_seen += 1
        with self._api.MappedArray(request, "main") as mapped:
            frame = mapped.array
            if self._lens is not None:
                sensor_us = int(request.get_metadata().get("SensorTimestamp", 0)) // 1000
                self._lens.observe_luma(frame[:s.height, :s.width], self._to_clock(sensor_us))
            if self._osd is not None:
                self._osd.stamp_i420(frame, s.width, s.height)

    def _to_clock(self, sensor_us: int) -> int:
        offset = self._clock_offset_us
        return sensor_us if offset is None else sensor_us + offset

    # --- encoder output thread -------------------------------------------------------------------------------

    def _deliver(self, generation: int, data: bytes, keyframe: bool, timestamp_us: int | None) -> None:
        encoder = self._encoder
        if encoder is None or generation != self._generation or timestamp_us is None or self._stop.is_set():
            return
        if self._need_keyframe:
            if not keyframe:
                self.stats.dropped_before_keyframe += 1
                return
            params = h264_parameter_sets(data)
            if params is None:
                self.stats.dropped_before_keyframe += 1
                return
            self._update_params(*params)
            self._need_keyframe = False
        sensor_us = (encoder.firsttimestamp or 0) + timestamp_us
        if self._clock_offset_us is None:
            now = self._clock.mono_us()
            self._clock_offset_us = 0 if abs(now - sensor_us) < SENSOR_CLOCK_MISMATCH_US else now - sensor_us
            if self._clock_offset_us:
                log.warning("camera timestamps are not on the monotonic clock; aligned by %d us",
                            self._clock_offset_us)
        pts_us = sensor_us + self._clock_offset_us
        previous = self._last_pts_us
        if previous is not None and pts_us <= previous:
            log.warning("dropped video packet with non-increasing pts %d <= %d", pts_us, previous)
            return
        if previous is not None and pts_us - previous > self.settings.frame_duration_us * 3 // 2:
            self.stats.frame_gaps += 1
        self._last_pts_us = pts_us
        self.stats.packets += 1
        self.stats.keyframes += int(keyframe)
        self._last_packet_at_us = self._clock.mono_us()
        self.gate.offer(data, pts_us, self.settings.frame_duration_us, keyframe)

    def _update_params(self, sps: bytes, pps: bytes) -> None:
        current = self._video_params
        if current is not None and current.sps == sps and current.pps == pps:
            return
        if current is not None:
            log.warning("H.264 parameter sets changed after an encoder restart")
        self._video_params = VideoParams(width=self.settings.width, height=self.settings.height,
                                         fps=self.settings.fps, sps=sps, pps=pps)
        self._params_known.set()


def _make_packet_sink(output_base: type, source: Picamera2VideoSource, generation: int) -> Any:
    """An instance of a subclass of picamera2's `Output` (the base class comes from the loaded module)."""

    class PacketSink(output_base):  # type: ignore[misc, valid-type]
        def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None, packet: Any = None,
                        audio: bool = False) -> None:
            if audio or frame is None:
                return
            source._deliver(generation, bytes(frame), bool(keyframe), timestamp)

    return PacketSink()


def _close_quietly(camera: Any, encoder: Any) -> None:
    """Stop and close whatever is running; a camera in a bad state may raise at any step."""
    if camera is None:
        return
    steps: list[Callable[[], Any]] = [camera.stop]
    if encoder is not None and getattr(encoder, "running", False):
        steps.append(lambda: camera.stop_encoder(encoder))
    steps.append(camera.close)
    for step in steps:
        try:
            step()
        except Exception as exc:
            log.debug("ignored while closing the camera: %s", exc)
