"""Camera source for USB cameras (any board, a laptop webcam) through OpenCV, encoded to H.264 with PyAV.

Frames come from `cv2.VideoCapture` as BGR images; each is timestamped on the shared monotonic clock when
`read()` returns it, checked for a covered lens, watermarked (OSD), and encoded with libx264 (keyframe
every `keyframe_interval_s`, forced IDR on request, no B-frames, so one frame in gives one access unit
out, in Annex B form with SPS/PPS repeated at every keyframe).

A webcam's `read()` blocks until the next frame. A source that does not (a video file, as in the tests)
is paced with `paced=True`: one frame per frame period on the clock, stamped with its slot's time.

Faults: `read()` failing for `stall_timeout_s` reports `PipelineFault("camera", "camera_stalled")`; the
capture is then released and reopened every `restart_interval_s`; the first frame after that reports
`PipelineRecovered("camera")`. An encoder exception reports `PipelineFault("encoder", "encoder_error")`
and the encoder is rebuilt at the next frame (its first output is a keyframe).

Threads: one "opencv-camera" thread does everything above and calls `on_packet`, which must only
enqueue. `force_keyframe()` may be called from any thread (it sets a counter the capture thread reads).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import cv2
import numpy as np

from agent.capture.camera_picamera2 import CameraSettings, PacketGate, VideoSourceParams, h264_parameter_sets
from agent.capture.lens import LensCoverDetector
from agent.capture.osd import OsdOverlay
from agent.capture.packets import EncodedPacket, VideoParams
from agent.events import PipelineFault, PipelineRecovered

log = logging.getLogger(__name__)


class H264FrameEncoder:
    """libx264 through PyAV for one frame size: `encode(bgr, pts_us, force_key)` -> [(annexb, keyframe)]."""

    def __init__(self, width: int, height: int, fps: int, bitrate: int, keyframe_interval_frames: int) -> None:
        import av  # media extra; imported here so the module loads on a system that only inspects config

        self._av = av
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.time_base = Fraction(1, 1_000_000)
        codec.framerate = Fraction(fps, 1)
        codec.gop_size = keyframe_interval_frames
        codec.bit_rate = bitrate
        # zerolatency: no B-frames and no lookahead; forced-idr: a forced "I" is an IDR that starts a GOP.
        codec.options = {"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1"}
        codec.thread_count = 1
        self._codec = codec
        self.width = width
        self.height = height

    def encode(self, bgr: np.ndarray, pts_us: int, force_key: bool) -> list[tuple[bytes, bool, int]]:
        frame = self._av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")
        frame.pts = pts_us
        if force_key:
            frame.pict_type = self._av.video.frame.PictureType.I
        return [(bytes(p), bool(p.is_keyframe), int(p.pts)) for p in self._codec.encode(frame)]


class OpenCVVideoSource(VideoSourceParams):
    """A USB camera (or anything `cv2.VideoCapture` opens) as a source of H.264 `EncodedPacket`s.

    Same contract as `Picamera2VideoSource` (`wait_video_params`, `connect`, `force_keyframe`, keyframe
    first, `pts_us` strictly increasing on `clock.mono_us()`, gapless `seq`).
    `capture_factory()` returns an opened `cv2.VideoCapture`-like object (`read()`, `release()`, `set()`).
    """

    def __init__(self, on_packet: Callable[[EncodedPacket], None] | None = None, *, clock: Any,
                 capture_factory: Callable[[], Any], settings: CameraSettings | None = None, paced: bool = False,
                 osd: OsdOverlay | None = None, lens: LensCoverDetector | None = None,
                 on_event: Callable[[PipelineFault | PipelineRecovered], None] | None = None) -> None:
        self.settings = settings or CameraSettings()
        self.gate = PacketGate(on_packet)
        self._params_known = threading.Event()
        self._on_event = on_event or (lambda event: None)
        self._clock = clock
        self._capture_factory = capture_factory
        self._paced = paced
        self._osd = osd
        self._lens = lens
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keyframes_requested = 0
        self._keyframes_done = 0
        self._video_params: VideoParams | None = None
        self.frames_read = 0
        self.packets = 0
        self.faults = 0

    def start(self) -> None:
        capture = self._open()
        if capture is None:
            raise RuntimeError("camera could not be opened")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(capture,), name="opencv-camera", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None

    def force_keyframe(self) -> bool:
        self._keyframes_requested += 1
        return True

    def _open(self) -> Any:
        try:
            capture = self._capture_factory()
        except Exception as exc:
            log.warning("opening the camera failed: %s", exc)
            return None
        if capture is None or (hasattr(capture, "isOpened") and not capture.isOpened()):
            return None
        s = self.settings
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, s.width), (cv2.CAP_PROP_FRAME_HEIGHT, s.height),
                            (cv2.CAP_PROP_FPS, s.fps)):
            with contextlib.suppress(Exception):  # a file or a fixed-mode camera ignores these
                capture.set(prop, value)
        return capture

    def _run(self, capture: Any) -> None:
        s = self.settings
        stall_us = int(s.stall_timeout_s * 1_000_000)
        retry_us = int(s.restart_interval_s * 1_000_000)
        encoder: H264FrameEncoder | None = None
        need_keyframe = True
        last_pts: int | None = None
        last_frame_at = self._clock.mono_us()
        next_due = last_frame_at
        faulted = False
        encoder_faulted = False
        next_reopen: int | None = None
        try:
            while not self._stop.is_set():
                slot_us = next_due
                if self._paced:
                    if not _wait_until(self._clock, next_due, self._stop):
                        break
                    next_due += s.frame_duration_us
                ok, image = capture.read() if capture is not None else (False, None)
                # A paced source's frame belongs to its slot; a webcam's to the moment read() returned it.
                now = slot_us if self._paced else self._clock.mono_us()
                if not ok or image is None:
                    if not faulted and now - last_frame_at >= stall_us:
                        faulted = True
                        self.faults += 1
                        self._on_event(PipelineFault(component="camera", code="camera_stalled",
                                                     detail=f"no frame for {(now - last_frame_at) / 1e6:.1f} s"))
                        next_reopen = now
                    if faulted and next_reopen is not None and now >= next_reopen:
                        next_reopen = now + retry_us
                        _release(capture)
                        capture = self._open()
                        self._keyframes_requested += 1  # the reopened camera's first frame starts a GOP
                    if not self._paced:
                        self._stop.wait(0.01)
                    continue
                self.frames_read += 1
                last_frame_at = now
                if faulted:
                    faulted = False
                    self._on_event(PipelineRecovered(component="camera"))
                pts = now if last_pts is None or now > last_pts else last_pts + 1
                image = np.ascontiguousarray(image[:, :, :3])
                height, width = image.shape[:2]
                if self._lens is not None:
                    self._lens.observe_luma(image[:, :, 1], pts)
                if self._osd is not None:
                    self._osd.stamp_bgr(image)
                if encoder is None or (encoder.width, encoder.height) != (width - width % 2, height - height % 2):
                    encoder = H264FrameEncoder(width - width % 2, height - height % 2, s.fps, s.bitrate,
                                               s.fps * s.keyframe_interval_s)
                    need_keyframe = True
                force = self._keyframes_requested > self._keyframes_done
                if force:
                    self._keyframes_done = self._keyframes_requested
                try:
                    outputs = encoder.encode(image[:encoder.height, :encoder.width], pts, force)
                except Exception as exc:
                    self.faults += 1
                    log.warning("H.264 encoder failed: %s", exc)
                    self._on_event(PipelineFault(component="encoder", code="encoder_error", detail=str(exc)))
                    encoder = None
                    encoder_faulted = True
                    continue
                for data, keyframe, packet_pts in outputs:
                    if need_keyframe:
                        params = h264_parameter_sets(data) if keyframe else None
                        if params is None:
                            continue
                        self._set_params(encoder, *params)
                        need_keyframe = False
                    self._emit(data, keyframe, packet_pts)
                    if encoder_faulted:
                        encoder_faulted = False
                        self._on_event(PipelineRecovered(component="encoder"))
                last_pts = pts
        finally:
            _release(capture)

    def _set_params(self, encoder: H264FrameEncoder, sps: bytes, pps: bytes) -> None:
        params = VideoParams(width=encoder.width, height=encoder.height, fps=self.settings.fps, sps=sps, pps=pps)
        if self._video_params is not None and self._video_params != params:
            log.warning("H.264 parameters changed (%dx%d)", encoder.width, encoder.height)
        self._video_params = params
        self._params_known.set()

    def _emit(self, data: bytes, keyframe: bool, pts_us: int) -> None:
        self.packets += 1
        self.gate.offer(data, pts_us, self.settings.frame_duration_us, keyframe)


def _wait_until(clock: Any, mono_us: int, stop: threading.Event) -> bool:
    """Wait for a time on the clock: the clock's own `wait_until` if it has one (simulated time), else sleep."""
    own_wait = getattr(clock, "wait_until", None)
    if own_wait is not None:
        return bool(own_wait(mono_us, stop))
    while True:
        remaining_us = mono_us - clock.mono_us()
        if remaining_us <= 0:
            return not stop.is_set()
        if stop.wait(min(remaining_us / 1e6, 0.005)):  # short slices: the clock may run faster than real time
            return False


def _release(capture: Any) -> None:
    if capture is None:
        return
    try:
        capture.release()
    except Exception as exc:
        log.debug("ignored while releasing the camera: %s", exc)
