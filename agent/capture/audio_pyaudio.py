"""Microphone source through PyAudio: AAC packets on the same monotonic clock as the video.

DESIGN.md "Recording": audio and video share one monotonic clock, and audio is placed by timestamp. The
timeline is sample-exact: sample k after the anchor is presented at `anchor + k / rate`, where the anchor
is the first buffer's capture time on `clock.mono_us()` (from PortAudio's time_info, else its arrival minus
its own duration).

Overflow (R5, no unexplained gaps; never shift later audio): when PortAudio reports `paInputOverflow`,
when our own queue had to drop buffers, or when a buffer arrives more than `gap_tolerance_buffers` later
than the timeline expects, the lost span is measured against the clock and filled with silence, so every
later sample keeps its true time. A flagged overflow is rounded to whole buffers (ALSA loses whole
periods); an unflagged gap to the sample. Gaps longer than `max_silence_fill_s` (a microphone that was gone
for a while) are not filled: the encoder is flushed and the timeline re-anchored, so the pts jumps
(counted in `stats.discontinuities`). Arrival jitter never moves the timeline.

Faults: no buffer for `stall_timeout_s` reports `PipelineFault("microphone", "microphone_stalled")`; the
stream is then reopened every `restart_interval_s`; the first buffer after that reports
`PipelineRecovered("microphone")`. Video is unaffected (separate source).

Threads:
- PortAudio's callback thread: `_on_audio` only copies the buffer into a bounded queue (a full queue drops
  the buffer and counts it; the timeline then fills the hole with silence).
- "audio-encoder" (ours): drains the queue, keeps the timeline, encodes AAC with PyAV, calls `on_packet`
  (which must only enqueue), watches for stalls and reopens the stream.
- `connect`/`stop` from any thread.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from agent.capture.packets import AudioParams, EncodedPacket
from agent.events import PipelineFault, PipelineRecovered

log = logging.getLogger(__name__)
DRIFT_WINDOW = 48  # buffers (~1 s at the default 1024 frames, 48 kHz) over which the clock offset is taken

AAC_FRAME_SAMPLES = 1024


@dataclass(frozen=True)
class AudioSettings:
    sample_rate: int = 48_000
    channels: int = 1
    frames_per_buffer: int = 1024
    bitrate: int = 64_000
    device_index: int | None = None
    queue_buffers: int = 256  # about 5 s at 48 kHz / 1024
    gap_tolerance_buffers: float = 2.5  # an unflagged late arrival beyond this is a gap, not jitter
    max_silence_fill_s: float = 3.0
    stall_timeout_s: float = 2.0
    restart_interval_s: float = 2.0

    def __post_init__(self) -> None:
        if self.sample_rate not in (16_000, 22_050, 24_000, 32_000, 44_100, 48_000):
            raise ValueError(f"audio sample_rate {self.sample_rate} is not one AAC-LC supports here")
        if self.channels not in (1, 2):
            raise ValueError(f"audio channels must be 1 or 2, got {self.channels}")
        if not 64 <= self.frames_per_buffer <= 16_384:
            raise ValueError(f"frames_per_buffer must be within 64..16384, got {self.frames_per_buffer}")
        if not 16_000 <= self.bitrate <= 320_000:
            raise ValueError(f"audio bitrate must be within 16k..320k bit/s, got {self.bitrate}")
        if not 4 <= self.queue_buffers <= 10_000:
            raise ValueError(f"queue_buffers must be within 4..10000, got {self.queue_buffers}")
        if not 1.5 <= self.gap_tolerance_buffers <= 100 or not 0 <= self.max_silence_fill_s <= 60:
            raise ValueError("gap_tolerance_buffers must be within 1.5..100 and max_silence_fill_s within 0..60")

    @property
    def buffer_us(self) -> float:
        return self.frames_per_buffer * 1e6 / self.sample_rate


@dataclass
class AudioSourceStats:
    buffers: int = 0
    overflows: int = 0  # overflows PortAudio reported
    queue_dropped: int = 0  # buffers our own queue could not take
    gaps: int = 0  # holes filled with silence (flagged or not)
    samples_inserted: int = 0  # silence samples put in for lost spans
    samples_captured: int = 0
    samples_encoded: int = 0
    discontinuities: int = 0
    drift_corrections: int = 0  # the microphone's own clock drifted half an AAC frame: corrected
    samples_drift_dropped: int = 0  # captured samples dropped because the microphone ran fast
    samples_drift_inserted: int = 0  # silence inserted because the microphone ran slow
    packets: int = 0
    faults: int = 0
    restarts: int = 0


def load_pyaudio() -> Any:
    return importlib.import_module("pyaudio")


class _AacEncoder:
    def __init__(self, settings: AudioSettings) -> None:
        import av  # media extra

        self._av = av
        codec = av.CodecContext.create("aac", "w")
        codec.sample_rate = settings.sample_rate
        codec.layout = "mono" if settings.channels == 1 else "stereo"
        codec.format = "fltp"
        codec.bit_rate = settings.bitrate
        codec.time_base = Fraction(1, settings.sample_rate)
        codec.flags |= av.codec.context.Flags.global_header  # raw AAC packets; the ASC goes in extradata
        codec.open()
        if not codec.extradata:
            raise RuntimeError("AAC encoder gave no AudioSpecificConfig")
        self.asc = bytes(codec.extradata)
        self._codec = codec
        self._layout = codec.layout.name
        self._rate = settings.sample_rate

    def encode(self, planar: np.ndarray | None, pts_samples: int) -> list[tuple[bytes, int, int]]:
        """Encode one 1024-sample frame (channels x 1024 float32), or flush with None. -> [(data, pts, duration)]"""
        if planar is None:
            packets = self._codec.encode(None)
        else:
            frame = self._av.AudioFrame.from_ndarray(planar, format="fltp", layout=self._layout)
            frame.sample_rate = self._rate
            frame.time_base = Fraction(1, self._rate)
            frame.pts = pts_samples
            packets = self._codec.encode(frame)
        return [(bytes(p), int(p.pts), int(p.duration or AAC_FRAME_SAMPLES)) for p in packets]


class PyAudioSource:
    """A microphone as a source of AAC `EncodedPacket`s (`kind="audio"`, `keyframe=True`).

    Contract: `audio_params` is valid from construction; `pts_us` is strictly increasing and each packet's
    `pts_us + duration_us` is the next one's `pts_us` (until a counted discontinuity); the first packet of a
    timeline is the AAC priming frame, one frame before the anchor (ffmpeg's convention: a packet's pts is
    when its decoded audio plays); `seq` numbers delivered packets from 0 without gaps.
    """

    def __init__(self, on_packet: Callable[[EncodedPacket], None] | None = None, *, clock: Any,
                 settings: AudioSettings | None = None,
                 on_event: Callable[[PipelineFault | PipelineRecovered], None] | None = None,
                 pyaudio_module: Any = None, on_pcm: Callable[[bytes, int], object] | None = None) -> None:
        self.settings = settings or AudioSettings()
        # The raw capture (16-bit PCM, first sample's time) for the statement detector; must not block.
        self._on_pcm = on_pcm
        self._sink = on_packet
        self._on_event = on_event or (lambda event: None)
        self._clock = clock
        self._pa_module = pyaudio_module
        self.stats = AudioSourceStats()
        self._encoder = _AacEncoder(self.settings)
        self.audio_params = AudioParams(sample_rate=self.settings.sample_rate, channels=self.settings.channels,
                                        asc=self._encoder.asc, frame_samples=AAC_FRAME_SAMPLES)
        self._queue: queue.Queue[tuple[bytes, int, int, int]] = queue.Queue(maxsize=self.settings.queue_buffers)
        self._dropped_since_last = 0  # written by the callback thread, taken by the encoder thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pa: Any = None
        self._stream: Any = None
        self._seq = 0
        # timeline (encoder thread only)
        self._anchor_us: int | None = None
        self._timeline_samples = 0  # samples placed on the timeline since the anchor (captured + silence)
        self._pending = np.zeros((self.settings.channels, 0), dtype=np.float32)
        self._drift_window: deque[float] = deque(maxlen=DRIFT_WINDOW)

    def connect(self, on_packet: Callable[[EncodedPacket], None]) -> None:
        self._sink = on_packet

    def start(self) -> None:
        """Open the microphone (raises if it cannot be opened at all) and start capturing."""
        if self._pa_module is None:
            self._pa_module = load_pyaudio()
        if self._anchor_us is not None:  # a previous run flushed its encoder: begin a new timeline
            self._encoder = _AacEncoder(self.settings)
            self._anchor_us = None
            self._timeline_samples = 0
            self._pending = np.zeros((self.settings.channels, 0), dtype=np.float32)
        self._pa = self._pa_module.PyAudio()
        self._open_stream()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="audio-encoder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        self._close_stream()
        if self._pa is not None:
            self._pa.terminate()
            self._pa = None

    # --- PortAudio's callback thread ----------------------------------------------------------------------

    def _on_audio(self, in_data: bytes | None, frame_count: int, time_info: dict, status_flags: int) -> tuple:
        now_us = self._clock.mono_us()
        # PortAudio says how long ago the buffer's first sample was captured (current_time minus
        # input_buffer_adc_time, both on its own clock); that difference moves onto our clock without the
        # callback's scheduling jitter. Host APIs that leave adc_time at 0 get "one buffer ago".
        adc_s = float(time_info.get("input_buffer_adc_time") or 0.0)
        age_us = (float(time_info.get("current_time") or 0.0) - adc_s) * 1e6
        if adc_s <= 0 or not 0 <= age_us <= 1_000_000:
            age_us = frame_count * 1e6 / self.settings.sample_rate
        try:
            self._queue.put_nowait((in_data or b"", frame_count, now_us - round(age_us), status_flags))
        except queue.Full:
            self._dropped_since_last += 1
        return (None, self._pa_module.paContinue)

    # --- stream lifecycle (encoder thread after start) -----------------------------------------------------

    def _open_stream(self) -> None:
        s = self.settings
        pa = self._pa_module
        self._stream = self._pa.open(format=pa.paInt16, channels=s.channels, rate=s.sample_rate, input=True,
                                     input_device_index=s.device_index, frames_per_buffer=s.frames_per_buffer,
                                     stream_callback=self._on_audio, start=True)

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        for step in (stream.stop_stream, stream.close):
            try:
                step()
            except Exception as exc:
                log.debug("ignored while closing the microphone: %s", exc)

    # --- encoder thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        s = self.settings
        stall_us = int(s.stall_timeout_s * 1e6)
        last_buffer_at = self._clock.mono_us()
        faulted = False
        next_reopen = 0
        while not self._stop.is_set():
            try:
                data, frame_count, captured_us, flags = self._queue.get(timeout=0.05)
            except queue.Empty:
                now = self._clock.mono_us()
                if not faulted and now - last_buffer_at >= stall_us:
                    faulted = True
                    self.stats.faults += 1
                    log.warning("microphone delivered nothing for %.1f s", (now - last_buffer_at) / 1e6)
                    self._on_event(PipelineFault(component="microphone", code="microphone_stalled",
                                                 detail=f"no audio for {(now - last_buffer_at) / 1e6:.1f} s"))
                    next_reopen = now
                if faulted and now >= next_reopen:
                    next_reopen = now + int(s.restart_interval_s * 1e6)
                    self._reopen()
                continue
            last_buffer_at = self._clock.mono_us()
            if self._on_pcm is not None:
                try:
                    self._on_pcm(data, captured_us)
                except Exception:  # the detector's problem must never stop the recording
                    log.exception("PCM tap failed")
            if faulted:
                faulted = False
                self._on_event(PipelineRecovered(component="microphone"))
            self._place(data, frame_count, captured_us, flags)
        self._flush()

    def _reopen(self) -> None:
        self.stats.restarts += 1
        self._close_stream()
        try:
            self._open_stream()
        except Exception as exc:
            log.warning("reopening the microphone failed: %s", exc)

    def _place(self, data: bytes, frame_count: int, start_us: int, flags: int) -> None:
        """Put one buffer on the timeline; `start_us` is when its first sample was captured."""
        s = self.settings
        rate = s.sample_rate
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        samples = samples.reshape(-1, s.channels).T
        frame_count = samples.shape[1]
        self.stats.buffers += 1
        self.stats.samples_captured += frame_count
        overflowed = bool(flags & self._pa_module.paInputOverflow)
        dropped, self._dropped_since_last = self._dropped_since_last, 0
        self.stats.overflows += int(overflowed)
        self.stats.queue_dropped += dropped
        if self._anchor_us is None:
            self._anchor_us = start_us
        expected_us = self._anchor_us + self._timeline_samples * 1_000_000 // rate
        gap_us = start_us - expected_us
        buffer_us = frame_count * 1e6 / rate
        if overflowed or dropped:
            missing = round(gap_us / buffer_us) * frame_count if gap_us > buffer_us / 2 else 0
        elif gap_us > s.gap_tolerance_buffers * buffer_us:
            missing = round(gap_us * rate / 1e6)
        else:
            missing = 0
        if missing > 0:
            self._drift_window.clear()
            if missing > s.max_silence_fill_s * rate:
                self._restart_timeline(start_us)
            else:
                self.stats.gaps += 1
                self.stats.samples_inserted += missing
                self._append(np.zeros((s.channels, missing), dtype=np.float32))
        else:
            samples = self._correct_drift(samples, gap_us)
        self._append(samples)

    def _correct_drift(self, samples: np.ndarray, gap_us: float) -> np.ndarray:
        """Keep the sample-count timeline on the shared clock when the microphone's crystal drifts.

        Scheduling jitter only ever makes a buffer look late, so the smallest offset over the last
        DRIFT_WINDOW buffers is the clock's own. Beyond half an AAC frame either way, the timeline is moved
        by that much: silence inserted for a slow microphone, captured samples dropped for a fast one
        (a few ms a minute at 200 ppm; counted in the stats). Audio never drifts a frame from video.
        """
        self._drift_window.append(gap_us)
        if len(self._drift_window) < DRIFT_WINDOW:
            return samples
        offset_us = min(self._drift_window)
        rate = self.settings.sample_rate
        half_frame_us = AAC_FRAME_SAMPLES * 1e6 / rate / 2
        if abs(offset_us) < half_frame_us:
            return samples
        self._drift_window.clear()
        self.stats.drift_corrections += 1
        n = round(abs(offset_us) * rate / 1e6)
        if offset_us > 0:  # slow microphone: the timeline is behind the clock
            self.stats.samples_drift_inserted += n
            return np.concatenate([np.zeros((samples.shape[0], n), dtype=np.float32), samples], axis=1)
        n = min(n, samples.shape[1])  # fast microphone: the timeline is ahead of the clock
        self.stats.samples_drift_dropped += n
        return samples[:, n:]

    def _append(self, planar: np.ndarray) -> None:
        self._timeline_samples += planar.shape[1]
        self._pending = np.concatenate([self._pending, planar], axis=1) if self._pending.shape[1] else planar
        done = 0
        while self._pending.shape[1] - done >= AAC_FRAME_SAMPLES:
            frame = np.ascontiguousarray(self._pending[:, done:done + AAC_FRAME_SAMPLES], dtype=np.float32)
            first_sample = self._timeline_samples - self._pending.shape[1] + done
            self._emit(self._encoder.encode(frame, first_sample))
            self.stats.samples_encoded += AAC_FRAME_SAMPLES
            done += AAC_FRAME_SAMPLES
        self._pending = self._pending[:, done:]

    def _restart_timeline(self, start_us: int) -> None:
        """A gap too long to fill: flush, and start a new timeline (and encoder) at `start_us`."""
        self._flush()
        self.stats.discontinuities += 1
        self._encoder = _AacEncoder(self.settings)
        self._anchor_us = start_us
        self._timeline_samples = 0
        self._pending = np.zeros((self.settings.channels, 0), dtype=np.float32)

    def _flush(self) -> None:
        if self._anchor_us is None:
            return
        if self._pending.shape[1]:
            # Pad the last partial frame with silence so the tail is not lost.
            pad = AAC_FRAME_SAMPLES - self._pending.shape[1]
            self._append(np.zeros((self.settings.channels, pad), dtype=np.float32))
        self._emit(self._encoder.encode(None, 0))

    def _emit(self, packets: list[tuple[bytes, int, int]]) -> None:
        rate = self.settings.sample_rate
        anchor = self._anchor_us or 0
        for data, pts, duration in packets:
            pts_us = anchor + pts * 1_000_000 // rate
            end_us = anchor + (pts + duration) * 1_000_000 // rate
            self.stats.packets += 1
            sink = self._sink
            if sink is None:
                continue
            sink(EncodedPacket(kind="audio", data=data, pts_us=pts_us, duration_us=end_us - pts_us, keyframe=True,
                               seq=self._seq))
            self._seq += 1
