"""A fake of the picamera2 API surface the agent uses, producing real H.264 from synthetic frames.

Faithful to picamera2 (raspberrypi/picamera2, 0.3.3x) where the agent touches it:
- `Picamera2(camera_num)`, `create_video_configuration(main=..., controls=...)`, `configure`, `start`, `stop`,
  `close`, `start_encoder(encoder, output, name=...)`, `stop_encoder`, `start_recording`, `stop_recording`,
  `set_controls`, `pre_callback` / `post_callback` (called with each completed request, on the camera thread),
  `camera_configuration()`.
- `MappedArray(request, "main")` context manager whose `.array` is the frame buffer, writable in place
  (YUV420 as one (h*3/2, stride) plane; RGB888/BGR888 as HxWx3; XBGR8888/XRGB8888 as HxWx4).
- `request.get_metadata()` with `SensorTimestamp` (ns on the camera's monotonic clock) and `FrameDuration`.
- `H264Encoder(bitrate, repeat, iperiod, framerate, ...)` with `.output`, `force_key_frame()`, and outputs
  called as `outputframe(frame, keyframe, timestamp, packet, audio)` where `timestamp` is microseconds since
  the encoder's first frame (`encoder.firsttimestamp` holds that first frame's sensor time in microseconds).
- `Output` base class with `start`/`stop`/`outputframe`/`_add_stream`.

The camera runs on the simulator's clock (`hw_sim.clock.SimClock` or any `agent.clock.Clock`): frame n's
sensor time is start + n x frame duration, paced by `wait_until`, so a fast clock gives an accelerated camera
with the same timestamps. The clock must not run faster than the camera can draw and encode (1080p30 costs
about 0.25 CPU-s per media second here), else the adapter's stall watchdog sees a camera falling behind.
With `drives_clock=True` and a stepped clock (rate 0) the camera itself moves the clock to each frame's time
as soon as the previous frame is through: as fast as possible, timestamps from the simulated clock, and
everything else paced on that clock (the microphone) follows. Limitation: while no camera thread runs (a
"pisp" encoder error ended it), nothing moves such a clock; a test must advance it itself then.
Frames are drawn by `hw_sim.frames.SyntheticScene`; the frame number drawn is the sensor frame
sequence number, so dropped or stalled frames show as gaps.

Threads (as on a Pi):
- camera thread ("event loop"): waits for each frame time, draws it, runs pre_callback, post_callback and
  `encoder.encode()`.
- platform "vc4" (Pi 4, hardware codec): each encoder has its own thread that encodes and calls the outputs,
  as picamera2's V4L2 poll thread does. Platform "pisp" (Pi 5, libav software encoder): encoding and the
  outputs run on the camera thread.

Fault switches (`CameraSimulator.faults`): `stall` (no frames at all), `drop_frames(n)` (the next n sensor
frames never arrive), `encoder_error` (every running or newly started encoder fails at its next frame: on
"vc4" its thread dies, on "pisp" the exception ends the camera thread, as it would end picamera2's event
loop), `covered` (dark, flat frames). Deviation: on a real Pi 4 a dead encoder thread blocks the camera
thread for good once the codec's 16 buffers are used; here the frames are counted as lost instead, so
`stop()` always returns.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import av
import cv2
import numpy as np

from hw_sim.frames import SyntheticScene, wait_until

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = ("YUV420", "RGB888", "BGR888", "XBGR8888", "XRGB8888")
SENSOR_SIZE = (1920, 1080)
MIN_FRAME_DURATION_US = 33_333


class SimulatedEncoderError(RuntimeError):
    """Raised inside the fake encoder when the `encoder_error` fault is set."""


@dataclass
class CameraFaults:
    """Switches a test flips while the camera runs. Reads and writes are single attribute accesses (atomic)."""

    stall: bool = False
    covered: bool = False
    encoder_error: bool = False
    frames_to_drop: int = 0

    def drop_frames(self, count: int) -> None:
        self.frames_to_drop += count


@dataclass
class CameraStats:
    frames_captured: int = 0  # sensor frames that happened (including dropped and stalled ones)
    frames_delivered: int = 0  # frames handed to callbacks and encoders
    frames_dropped: int = 0
    frames_stalled: int = 0
    encoder_frames_lost: int = 0  # frames an encoder could not take (its queue was full or it had failed)
    delivered_numbers: list[int] = field(default_factory=list)


class CameraSimulator:
    """The simulated camera hardware. `module` is what the adapter gets instead of `import picamera2`."""

    def __init__(self, clock: Any, *, platform: str = "vc4", sensor_size: tuple[int, int] = SENSOR_SIZE,
                 drives_clock: bool = False) -> None:
        if platform not in ("vc4", "pisp"):
            raise ValueError(f"platform must be 'vc4' (Pi 4) or 'pisp' (Pi 5), got {platform!r}")
        self.clock = clock
        self.drives_clock = drives_clock
        self.platform = platform
        self.sensor_size = sensor_size
        self.faults = CameraFaults()
        self.stats = CameraStats()
        self.frame_sequence = 0  # next sensor frame number; survives camera restarts, like a sensor counter
        self.cameras_opened = 0
        rig = self

        class BoundPicamera2(Picamera2):
            _rig = rig

        BoundPicamera2.__name__ = "Picamera2"
        encoders = SimpleNamespace(H264Encoder=_bind_encoder(self), Encoder=Encoder, Quality=Quality)
        outputs = SimpleNamespace(Output=Output)
        self.module = SimpleNamespace(Picamera2=BoundPicamera2, MappedArray=MappedArray,
                                      CompletedRequest=CompletedRequest, encoders=encoders, outputs=outputs,
                                      H264Encoder=encoders.H264Encoder, Output=Output)


class Quality:
    VERY_LOW, LOW, MEDIUM, HIGH, VERY_HIGH = range(5)


# --- requests and buffers -------------------------------------------------------------------------------------


class CompletedRequest:
    """One completed capture: the frame buffer of each stream plus metadata."""

    def __init__(self, picam2: Picamera2, buffers: dict[str, np.ndarray], metadata: dict[str, Any]) -> None:
        self.picam2 = picam2
        self.config = dict(picam2.camera_config)
        self.stream_map = {name: name for name in buffers}
        self._buffers = buffers
        self._metadata = metadata
        self.ref_count = 1

    def acquire(self) -> None:
        self.ref_count += 1

    def release(self) -> None:
        self.ref_count -= 1

    def get_metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def make_array(self, name: str) -> np.ndarray:
        return self._buffers[name].copy()

    def _buffer(self, name: str) -> np.ndarray:
        return self._buffers[name]


class MappedArray:
    """`with MappedArray(request, "main") as m: m.array[...] = ...` writes into the frame itself."""

    def __init__(self, request: CompletedRequest, stream: str, reshape: bool = True, write: bool = True) -> None:
        self._request = request
        self._stream = stream
        self._array: np.ndarray | None = None

    def __enter__(self) -> MappedArray:
        self._array = self._request._buffer(self._stream)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._array = None

    @property
    def array(self) -> np.ndarray | None:
        return self._array


# --- outputs --------------------------------------------------------------------------------------------------


class Output:
    """picamera2.outputs.Output: encoders call `outputframe` on every output they have."""

    def __init__(self, pts: Any = None) -> None:
        self.recording = False
        self.ptsoutput = pts
        self.needs_pacing = False
        self.needs_add_stream = False

    def start(self) -> None:
        self.recording = True

    def stop(self) -> None:
        self.recording = False

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None, packet: Any = None,
                    audio: bool = False) -> None:
        """Receive one encoded frame (bytes) from the encoder."""

    def outputtimestamp(self, timestamp: int | None) -> None:
        pass

    def _add_stream(self, encoder_stream: Any, *args: Any, **kwargs: Any) -> None:
        pass


# --- the encoder ----------------------------------------------------------------------------------------------

_AV_INPUT_FORMAT = {"YUV420": "yuv420p", "BGR888": "rgb24", "RGB888": "bgr24", "XBGR8888": "rgba",
                    "XRGB8888": "bgra"}


class Encoder:
    """Base of the fake encoders: stream geometry, outputs, running state (as picamera2.encoders.Encoder)."""

    def __init__(self) -> None:
        self.width = 0
        self.height = 0
        self.stride = 0
        self.format: str | None = None
        self.name: str | None = None
        self._output: list[Output] = []
        self._running = False
        self._lock = threading.Lock()
        self._output_lock = threading.Lock()
        self.firsttimestamp: int | None = None
        self.frames_encoded = 0

    @property
    def running(self) -> bool:
        return self._running

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def output(self) -> Output | list[Output]:
        return self._output[0] if len(self._output) == 1 else self._output

    @output.setter
    def output(self, value: Output | list[Output]) -> None:
        outputs = value if isinstance(value, list) else [value]
        for out in outputs:
            if not isinstance(out, Output):
                raise RuntimeError("Must pass Output")
        self._output = outputs

    def outputframe(self, frame: Any, keyframe: bool = True, timestamp: int | None = None, packet: Any = None,
                    audio: bool = False) -> None:
        with self._output_lock:
            for out in self._output:
                out.outputframe(frame, keyframe, timestamp, packet, audio)

    def _timestamp(self, request: CompletedRequest) -> int:
        ts = int(request.get_metadata()["SensorTimestamp"] / 1000)
        if self.firsttimestamp is None:
            self.firsttimestamp = ts
            return 0
        return ts - self.firsttimestamp


class H264Encoder(Encoder):
    """H.264 through PyAV libx264, keyframe every `iperiod` frames, SPS/PPS repeated at each keyframe."""

    _rig: CameraSimulator

    def __init__(self, bitrate: int | None = None, repeat: bool = True, iperiod: int | None = None,
                 framerate: float | None = None, enable_sps_framerate: bool = False, qp: int | None = None,
                 profile: str | None = None) -> None:
        super().__init__()
        self.bitrate = bitrate
        self.repeat = repeat
        self.iperiod = iperiod
        self.framerate = framerate
        self.qp = qp
        self.profile = profile
        self._key_frames_requested = 0
        self._key_frames_generated = 0
        self._codec: Any = None
        self._queue: queue.Queue[tuple[np.ndarray, int, bool] | None] | None = None
        self._thread: threading.Thread | None = None

    def force_key_frame(self) -> None:
        """Force a key frame to be encoded in the video stream as soon as possible."""
        self._key_frames_requested += 1

    def start(self, quality: Any = None) -> None:
        with self._lock:
            if self._running:
                raise RuntimeError("Encoder already running")
            if self.format not in _AV_INPUT_FORMAT:
                raise RuntimeError(f"Unrecognised format {self.format} for the H.264 encoder")
            self.frames_encoded = 0
            self.firsttimestamp = None
            codec = av.CodecContext.create("libx264", "w")
            codec.width, codec.height = self.width, self.height
            codec.pix_fmt = "yuv420p"
            codec.time_base = Fraction(1, 1_000_000)
            fps = self.framerate or 30
            codec.framerate = Fraction(fps).limit_denominator(1000)
            codec.gop_size = self.iperiod or (60 if self._rig.platform == "vc4" else 30)
            if self.bitrate is None and self.qp is None:
                self.bitrate = int(6_000_000 * self.width * self.height * fps / (1920 * 1080 * 30))
            if self.bitrate is not None:
                codec.bit_rate = self.bitrate
            if self.qp is not None:
                codec.qmin = codec.qmax = self.qp
            # forced-idr: a forced key frame is an IDR (an open-GOP "I" would not start a decodable GOP).
            codec.options = {"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1"}
            codec.thread_count = 1
            if not self.repeat:
                codec.flags |= av.codec.context.Flags.global_header
            self._codec = codec
            self._running = True
            for out in self._output:
                out.start()
                out._add_stream("video", "h264", width=self.width, height=self.height)
            if self._rig.platform == "vc4":
                self._queue = queue.Queue(maxsize=16)
                self._thread = threading.Thread(target=self._encoder_thread, name="sim-h264-encoder", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            if not self._running:
                raise RuntimeError("Encoder already stopped")
            self._running = False
            if self._thread is not None:
                with contextlib.suppress(queue.Full):
                    self._queue.put(None, timeout=1.0)  # type: ignore[union-attr]
                self._thread.join(timeout=5.0)
                self._thread = None
            for out in self._output:
                out.stop()

    def encode(self, stream: str, request: CompletedRequest) -> None:
        """Called by the camera thread with each completed request."""
        with self._lock:
            if not self._running:
                return
            timestamp_us = self._timestamp(request)
            force = self._key_frames_requested > self._key_frames_generated
            if force:
                self._key_frames_generated += 1
            if self._thread is None:  # pisp: libav encodes on the camera thread
                self._encode_one(request._buffer(stream), timestamp_us, force)
                return
            # The hardware codec reads the buffer by DMA while the request is held; we copy instead. Like
            # picamera2 waiting for a free codec buffer, the camera thread waits while the codec is busy (an
            # accelerated clock therefore never loses frames to a slow encoder), but only while it is alive.
            item = (request._buffer(stream).copy(), timestamp_us, force)
            while self._thread.is_alive():
                try:
                    self._queue.put(item, timeout=0.1)  # type: ignore[union-attr]
                    return
                except queue.Full:
                    continue
            self._rig.stats.encoder_frames_lost += 1

    def _encoder_thread(self) -> None:
        while True:
            item = self._queue.get()  # type: ignore[union-attr]
            if item is None:
                return
            try:
                self._encode_one(*item)
            except Exception as exc:
                # On a Pi the V4L2 poll thread dies the same way: nothing more comes out of this encoder.
                log.error("sim H.264 encoder thread ended: %s", exc)
                return

    def _encode_one(self, buffer: np.ndarray, timestamp_us: int, force_key: bool) -> None:
        if self._rig.faults.encoder_error:
            raise SimulatedEncoderError("simulated H.264 encoder failure")
        array = buffer[:, :self.width] if self.format == "YUV420" else buffer
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=_AV_INPUT_FORMAT[self.format])
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        frame.pts = timestamp_us
        if force_key:
            frame.pict_type = av.video.frame.PictureType.I
        for packet in self._codec.encode(frame):
            self.frames_encoded += 1
            self.outputframe(bytes(packet), packet.is_keyframe, timestamp=packet.pts)


def _bind_encoder(rig: CameraSimulator) -> type[H264Encoder]:
    class BoundH264Encoder(H264Encoder):
        _rig = rig

    BoundH264Encoder.__name__ = "H264Encoder"
    return BoundH264Encoder


# --- the camera -----------------------------------------------------------------------------------------------


class Picamera2:
    """The camera: configuration, the camera thread, callbacks and encoders."""

    _rig: CameraSimulator

    def __init__(self, camera_num: int = 0, verbose_console: Any = None, tuning: Any = None,
                 allocator: Any = None) -> None:
        if camera_num != 0:
            raise IndexError(f"no camera {camera_num}: the simulator has one camera")
        self.camera_num = camera_num
        self.camera_config: dict[str, Any] = {}
        self.pre_callback: Any = None
        self.post_callback: Any = None
        self.started = False
        self.is_open = True
        self._encoders: set[H264Encoder] = set()
        self._controls: dict[str, Any] = {}
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.camera_properties = {"Model": "sim-imx708", "PixelArraySize": self._rig.sensor_size}
        self.camera_ctrl_info = {"FrameDurationLimits": (None, SimpleNamespace(min=MIN_FRAME_DURATION_US))}
        self._rig.cameras_opened += 1

    def __enter__(self) -> Picamera2:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # configuration

    def create_video_configuration(self, main: dict | None = None, lores: dict | None = None,
                                   raw: dict | None = None, transform: Any = None, colour_space: Any = None,
                                   buffer_count: int = 6, controls: dict | None = None, display: str | None = "main",
                                   encode: str | None = "main", queue: bool = True, sensor: dict | None = None,
                                   use_case: str = "video") -> dict[str, Any]:
        stream = {"format": "XBGR8888", "size": (1280, 720), "preserve_ar": True} | (main or {})
        if stream["format"] not in SUPPORTED_FORMATS:
            raise RuntimeError(f"Invalid format {stream['format']}")
        width, height = stream["size"]
        stream["size"] = (width - width % 2, height - height % 2)
        stream["stride"] = self._stride(stream["format"], stream["size"][0])
        return {"use_case": use_case, "transform": transform, "colour_space": colour_space,
                "buffer_count": buffer_count, "queue": queue, "main": stream, "lores": lores, "raw": raw,
                "controls": {"FrameDurationLimits": (33333, 33333)} | (controls or {}),
                "sensor": sensor or {}, "display": display, "encode": encode}

    @staticmethod
    def _stride(fmt: str, width: int) -> int:
        bytes_per_pixel = {"YUV420": 1, "RGB888": 3, "BGR888": 3, "XBGR8888": 4, "XRGB8888": 4}[fmt]
        return width * bytes_per_pixel

    def configure(self, camera_config: dict[str, Any] | str | None = None) -> None:
        if camera_config is None or camera_config == "video":
            camera_config = self.create_video_configuration()
        if not isinstance(camera_config, dict):
            raise RuntimeError(f"unsupported configuration {camera_config!r}")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        self.camera_config = camera_config
        self._controls = dict(camera_config.get("controls") or {})

    def camera_configuration(self) -> dict[str, Any]:
        return self.camera_config

    def stream_configuration(self, name: str = "main") -> dict[str, Any]:
        return self.camera_config[name]

    @property
    def encode_stream_name(self) -> str:
        return self.camera_config.get("encode") or "main"

    def set_controls(self, controls: dict[str, Any]) -> None:
        self._controls.update(controls)

    def _frame_duration_us(self) -> int:
        if "FrameRate" in self._controls:
            return max(MIN_FRAME_DURATION_US, round(1_000_000 / float(self._controls["FrameRate"])))
        low, _high = self._controls.get("FrameDurationLimits", (33333, 33333))
        return max(MIN_FRAME_DURATION_US, int(low))

    # running

    def start(self, config: Any = None, show_preview: Any = False) -> None:
        if config is not None:
            self.configure(config)
        if not self.camera_config:
            raise RuntimeError("Camera has not been configured")
        if self.started:
            return
        self._stop_event.clear()
        self.started = True
        # The first frame's time is fixed here, so a stepped clock advanced right after start() is exact.
        first_frame_us = self._rig.clock.mono_us()
        self._thread = threading.Thread(target=self._camera_thread, args=(first_frame_us,), name="sim-camera",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if not self.started:
            return
        self._stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._thread = None
        self.started = False

    def close(self) -> None:
        if not self.is_open:
            return
        self.stop()
        for encoder in list(self._encoders):
            if encoder.running:
                encoder.stop()
        self._encoders.clear()
        self.is_open = False

    def start_encoder(self, encoder: H264Encoder | None = None, output: Output | None = None, pts: Any = None,
                      quality: Any = None, name: str | None = None) -> None:
        if encoder is None:
            if len(self._encoders) != 1:
                raise RuntimeError("No encoder specified")
            encoder = next(iter(self._encoders))
        if output is not None:
            encoder.output = output
        if not self.camera_config:
            raise RuntimeError("Camera has not been configured")
        name = name or self.encode_stream_name
        stream = self.camera_config.get(name)
        if stream is None:
            raise RuntimeError(f"Encode stream {name} was not defined")
        encoder.name = name
        encoder.width, encoder.height = stream["size"]
        encoder.format = stream["format"]
        encoder.stride = stream["stride"]
        if encoder.framerate is None:
            encoder.framerate = 1_000_000 / max(MIN_FRAME_DURATION_US, self._frame_duration_us())
        encoder.start(quality=quality)
        with self.lock:
            self._encoders.add(encoder)

    def stop_encoder(self, encoders: Any = None) -> None:
        if encoders is None:
            chosen = list(self._encoders)
        elif isinstance(encoders, Encoder):
            chosen = [encoders]
        else:
            chosen = list(encoders)
        for encoder in chosen:
            encoder.stop()
        with self.lock:
            for encoder in chosen:
                self._encoders.discard(encoder)

    @property
    def encoders(self) -> set[H264Encoder]:
        return self._encoders

    def start_recording(self, encoder: H264Encoder, output: Output, pts: Any = None, config: Any = None,
                        quality: Any = None, name: str | None = None) -> None:
        if not self.camera_config and config is None:
            config = "video"
        if config is not None:
            self.configure(config)
        self.start_encoder(encoder, output, pts=pts, quality=quality, name=name)
        self.start()

    def stop_recording(self) -> None:
        self.stop()
        self.stop_encoder()

    # the camera thread

    def _frame_due(self, frame_time_us: int) -> bool:
        """Wait for the next frame's time; with `drives_clock`, move a stepped clock there instead."""
        rig = self._rig
        if not rig.drives_clock:
            return wait_until(rig.clock, frame_time_us, self._stop_event)
        if self._stop_event.is_set():
            return False
        lag_us = frame_time_us - rig.clock.mono_us()
        if lag_us > 0:
            rig.clock.advance(lag_us)
        return True

    def _camera_thread(self, first_frame_us: int) -> None:
        rig = self._rig
        stream = self.camera_config["main"]
        width, height = stream["size"]
        scene = SyntheticScene(width, height)
        fmt = stream["format"]
        next_time_us = first_frame_us
        try:
            while self._frame_due(next_time_us):
                duration_us = self._frame_duration_us()
                sensor_time_us = next_time_us
                next_time_us += duration_us
                number = rig.frame_sequence
                rig.frame_sequence += 1
                rig.stats.frames_captured += 1
                if rig.faults.stall:
                    rig.stats.frames_stalled += 1
                    continue
                if rig.faults.frames_to_drop > 0:
                    rig.faults.frames_to_drop -= 1
                    rig.stats.frames_dropped += 1
                    continue
                buffer = _draw(scene, fmt, number, sensor_time_us, rig.faults.covered)
                request = CompletedRequest(self, {"main": buffer},
                                           {"SensorTimestamp": sensor_time_us * 1000, "FrameDuration": duration_us,
                                            "SensorSequence": number})
                rig.stats.frames_delivered += 1
                rig.stats.delivered_numbers.append(number)
                if self.pre_callback:
                    self.pre_callback(request)
                if self.post_callback:
                    self.post_callback(request)
                for encoder in list(self._encoders):
                    if encoder.name in request.stream_map:
                        encoder.encode(encoder.name, request)
                request.release()
        except Exception as exc:
            # picamera2's event loop dies the same way; the camera then delivers nothing until restarted.
            log.error("sim camera thread ended: %r", exc)


def _draw(scene: SyntheticScene, fmt: str, number: int, sensor_time_us: int, covered: bool) -> np.ndarray:
    if fmt == "YUV420":
        buffer = scene.new_i420()
        scene.draw_i420(buffer, number, sensor_time_us, covered=covered)
        return buffer
    bgr = scene.draw_bgr(number, sensor_time_us, covered=covered)
    if fmt == "RGB888":  # picamera2's RGB888 is B,G,R in memory
        return bgr
    if fmt == "BGR888":
        return np.ascontiguousarray(bgr[:, :, ::-1])
    code = cv2.COLOR_BGR2BGRA if fmt == "XRGB8888" else cv2.COLOR_BGR2RGBA
    return cv2.cvtColor(bgr, code)
