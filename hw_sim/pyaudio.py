"""A fake of PyAudio's input side: `PyAudio().open(format, channels, rate, input=True, frames_per_buffer,
stream_callback)`, blocking `Stream.read`, `start_stream` / `stop_stream` / `close`, and the pa* constants
with PortAudio's values.

Audio comes from a tone generator or a WAV file (looped), paced on the simulator's clock (real time,
accelerated, or stepped), so sample k of a stream is captured at stream start + k / rate on that clock.

Fault switches (`AudioSimulator.faults`):
- `overflow(buffers)`: the next `buffers` buffers are lost in the "driver"; the next delivered callback has
  `paInputOverflow` in its status flags, a blocking `read()` raises `OSError(paInputOverflowed, ...)` (or,
  with `exception_on_overflow=False`, returns the next data without saying). Time keeps running, so the
  lost span is a real hole in the timeline, as on a Pi whose capture thread was starved.
- `dead`: the device stops delivering anything (a USB microphone unplugged) until cleared.

Threads: in callback mode each stream has a "sim-portaudio" thread that calls `stream_callback`, as
PortAudio's own callback thread does. In blocking mode `read()` waits on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import wave
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from hw_sim.frames import wait_until

log = logging.getLogger(__name__)

# PortAudio's values (portaudio.h), as the real pyaudio module exposes them.
paFloat32 = 0x01
paInt32 = 0x02
paInt24 = 0x04
paInt16 = 0x08
paInt8 = 0x10
paUInt8 = 0x20
paCustomFormat = 0x10000
paContinue = 0
paComplete = 1
paAbort = 2
paInputUnderflow = 0x01
paInputOverflow = 0x02
paOutputUnderflow = 0x04
paOutputOverflow = 0x08
paPrimingOutput = 0x10
paNoError = 0
paInputOverflowed = -9981
paStreamIsStopped = -9983
paFramesPerBufferUnspecified = 0

_SAMPLE_SIZES = {paFloat32: 4, paInt32: 4, paInt24: 3, paInt16: 2, paInt8: 1, paUInt8: 1}


def get_sample_size(format: int) -> int:
    if format not in _SAMPLE_SIZES:
        raise ValueError("Invalid format")
    return _SAMPLE_SIZES[format]


def get_format_from_width(width: int, unsigned: bool = True) -> int:
    return {1: paUInt8 if unsigned else paInt8, 2: paInt16, 3: paInt24, 4: paFloat32}[width]


@dataclass
class AudioFaults:
    dead: bool = False
    buffers_to_lose: int = 0

    def overflow(self, buffers: int = 1) -> None:
        self.buffers_to_lose += buffers


@dataclass
class AudioStats:
    buffers_delivered: int = 0
    buffers_lost: int = 0
    frames_lost: int = 0
    lost_spans: list[tuple[int, int]] = field(default_factory=list)  # (first lost sample, count) per overflow


class ToneSignal:
    """A sine tone, `amplitude` of full scale."""

    def __init__(self, frequency_hz: float = 1000.0, amplitude: float = 0.3) -> None:
        self.frequency_hz = frequency_hz
        self.amplitude = amplitude

    def samples(self, start: int, count: int, rate: int, channels: int) -> np.ndarray:
        t = (np.arange(start, start + count, dtype=np.float64)) / rate
        mono = self.amplitude * np.sin(2 * np.pi * self.frequency_hz * t)
        return np.repeat(mono[:, None], channels, axis=1)


class WavSignal:
    """A 16-bit PCM WAV file, looped; its rate must match the stream's, channels are mixed/duplicated."""

    def __init__(self, path: str | Path) -> None:
        with wave.open(str(path), "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ValueError(f"{path}: only 16-bit PCM WAV files are supported, got {8 * wav.getsampwidth()}-bit")
            self.rate = wav.getframerate()
            data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
            self._audio = data.reshape(-1, wav.getnchannels()).astype(np.float64) / 32768.0
        if len(self._audio) == 0:
            raise ValueError(f"{path}: WAV file has no audio")

    def samples(self, start: int, count: int, rate: int, channels: int) -> np.ndarray:
        if rate != self.rate:
            raise ValueError(f"WAV file is {self.rate} Hz, stream is {rate} Hz")
        index = np.arange(start, start + count) % len(self._audio)
        chunk = self._audio[index]
        if chunk.shape[1] == channels:
            return chunk
        mono = chunk.mean(axis=1, keepdims=True)
        return np.repeat(mono, channels, axis=1)


def _to_bytes(samples: np.ndarray, fmt: int) -> bytes:
    if fmt == paInt16:
        return (np.clip(samples, -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()
    if fmt == paInt32:
        return (np.clip(samples, -1.0, 1.0 - 2**-31) * 2**31).astype("<i4").tobytes()
    if fmt == paFloat32:
        return samples.astype("<f4").tobytes()
    raise ValueError(f"format {fmt} not supported by the simulator (use paInt16, paInt32 or paFloat32)")


class AudioSimulator:
    """The simulated microphone. `module` is what the adapter gets instead of `import pyaudio`."""

    def __init__(self, clock: Any, signal: ToneSignal | WavSignal | None = None) -> None:
        self.clock = clock
        self.signal = signal or ToneSignal()
        self.faults = AudioFaults()
        self.stats = AudioStats()
        self.streams_opened = 0
        rig = self

        class BoundPyAudio(PyAudio):
            _rig = rig

        BoundPyAudio.__name__ = "PyAudio"
        constants = {name: value for name, value in globals().items() if name.startswith("pa")}
        self.module = SimpleNamespace(PyAudio=BoundPyAudio, Stream=Stream, get_sample_size=get_sample_size,
                                      get_format_from_width=get_format_from_width, **constants)


class Stream:
    """An input stream on the simulated microphone."""

    def __init__(self, rig: AudioSimulator, rate: int, channels: int, format: int, input: bool = False,
                 output: bool = False, input_device_index: int | None = None, output_device_index: int | None = None,
                 frames_per_buffer: int = paFramesPerBufferUnspecified, start: bool = True,
                 input_host_api_specific_stream_info: Any = None, output_host_api_specific_stream_info: Any = None,
                 stream_callback: Any = None) -> None:
        if not (input or output):
            raise ValueError("Must specify an input or output stream.")
        if output:
            raise OSError(-9996, "Invalid output device (the simulated microphone has no output)")
        if format not in (paInt16, paInt32, paFloat32):
            raise OSError(-9994, "Sample format not supported")
        if not 8000 <= rate <= 192000 or not 1 <= channels <= 2:
            raise OSError(-9997, "Invalid sample rate or channel count")
        self._rig = rig
        self._rate = rate
        self._channels = channels
        self._format = format
        self._frames_per_buffer = frames_per_buffer or 256
        self._callback = stream_callback
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._closed = False
        self._sample_pos = 0  # next sample the device will capture
        self.last_first_sample = 0
        self._start_us = 0
        self._overflowed = False
        rig.streams_opened += 1
        if start:
            self.start_stream()

    # PyAudio's Stream API

    def start_stream(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
            self._stop.clear()
            # The timeline restarts at the current time; sample numbering continues (the signal is continuous).
            self._start_us = self._rig.clock.mono_us() - self._sample_pos * 1_000_000 // self._rate
            if self._callback is not None:
                self._thread = threading.Thread(target=self._callback_thread, name="sim-portaudio", daemon=True)
                self._thread.start()

    def stop_stream(self) -> None:
        with self._lock:
            self._running = False
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def close(self) -> None:
        self.stop_stream()
        self._closed = True

    def is_active(self) -> bool:
        return self._running

    def is_stopped(self) -> bool:
        return not self._running

    def get_input_latency(self) -> float:
        return self._frames_per_buffer / self._rate

    def get_time(self) -> float:
        return self._rig.clock.mono_us() / 1e6

    def get_read_available(self) -> int:
        captured = (self._rig.clock.mono_us() - self._start_us) * self._rate // 1_000_000
        return max(0, int(captured - self._sample_pos))

    def read(self, num_frames: int, exception_on_overflow: bool = True) -> bytes:
        if self._callback is not None:
            raise OSError(-9977, "Can't read from a callback stream")
        if not self._running:
            raise OSError(paStreamIsStopped, "Stream is stopped")
        overflowed, data = self._capture(num_frames, self._stop)
        if data is None:
            raise OSError(paStreamIsStopped, "Stream is stopped")
        if overflowed and exception_on_overflow:
            raise OSError(paInputOverflowed, "Input overflowed")
        return data

    # the device

    def _buffer_end_us(self, end_sample: int) -> int:
        return self._start_us + -(-end_sample * 1_000_000 // self._rate)

    def _capture(self, frames: int, stop: threading.Event) -> tuple[bool, bytes | None]:
        """Wait until `frames` more samples exist, losing whole buffers as the faults say. (overflowed, data);
        `self.last_first_sample` is the number of the first sample in `data`."""
        rig = self._rig
        while True:
            end = self._sample_pos + frames
            if not wait_until(rig.clock, self._buffer_end_us(end), stop):
                return False, None
            if rig.faults.dead:
                self._sample_pos = end  # time passes, nothing arrives
                continue
            if rig.faults.buffers_to_lose > 0:
                rig.faults.buffers_to_lose -= 1
                rig.stats.buffers_lost += 1
                rig.stats.frames_lost += frames
                if not self._overflowed:
                    rig.stats.lost_spans.append((self._sample_pos, 0))
                first, count = rig.stats.lost_spans[-1]
                rig.stats.lost_spans[-1] = (first, count + frames)
                self._sample_pos = end
                self._overflowed = True
                continue
            samples = rig.signal.samples(self._sample_pos, frames, self._rate, self._channels)
            self.last_first_sample = self._sample_pos
            self._sample_pos = end
            overflowed, self._overflowed = self._overflowed, False
            rig.stats.buffers_delivered += 1
            return overflowed, _to_bytes(samples, self._format)

    def _callback_thread(self) -> None:
        while not self._stop.is_set():
            overflowed, data = self._capture(self._frames_per_buffer, self._stop)
            if data is None:
                return
            first_sample = self.last_first_sample
            now_s = self._rig.clock.mono_us() / 1e6
            time_info = {"input_buffer_adc_time": self._start_us / 1e6 + first_sample / self._rate,
                         "current_time": now_s, "output_buffer_dac_time": 0.0}
            flags = paInputOverflow if overflowed else 0
            try:
                result = self._callback(data, self._frames_per_buffer, time_info, flags)
                flag = result[1] if isinstance(result, tuple) else paAbort
            except Exception:
                # PyAudio prints the traceback and aborts the stream.
                log.exception("stream callback raised; stream aborted")
                flag = paAbort
            if flag != paContinue:
                self._running = False
                return


class PyAudio:
    """`pyaudio.PyAudio()` on the simulated microphone."""

    _rig: AudioSimulator

    def __init__(self) -> None:
        self._streams: set[Stream] = set()

    def open(self, *args: Any, **kwargs: Any) -> Stream:
        stream = Stream(self._rig, *args, **kwargs)
        self._streams.add(stream)
        return stream

    def close(self, stream: Stream) -> None:
        stream.close()
        self._streams.discard(stream)

    def terminate(self) -> None:
        for stream in list(self._streams):
            stream.close()
        self._streams.clear()

    def get_sample_size(self, format: int) -> int:
        return get_sample_size(format)

    def get_format_from_width(self, width: int, unsigned: bool = True) -> int:
        return get_format_from_width(width, unsigned)

    def get_device_count(self) -> int:
        return 1

    def get_default_input_device_info(self) -> dict[str, Any]:
        return self.get_device_info_by_index(0)

    def get_device_info_by_index(self, device_index: int) -> dict[str, Any]:
        if device_index != 0:
            raise OSError(-9996, "Invalid device")
        return {"index": 0, "name": "sim-microphone", "hostApi": 0, "maxInputChannels": 2,
                "maxOutputChannels": 0, "defaultSampleRate": 48000.0, "defaultLowInputLatency": 0.01,
                "defaultHighInputLatency": 0.1}
