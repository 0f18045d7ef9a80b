"""The simulated speaker: the output half of the PyAudio API, recording what was played and when.

    speaker = SpeakerLog(clock_mono_us=clock.mono_us)
    player = PromptPlayer(speaker, PromptLibrary(), "zh-CN", clock.mono_us)   # speaker stands in for `pyaudio`
    ...
    speaker.wait_for_clips(2, timeout=5)
    speaker.played_prompts(library)       -> ["session_started_opening_statement", "notice_prompt"]

A SpeakerLog has the attributes of the `pyaudio` module that output code uses (`PyAudio`, `paInt16`, ...),
and `PyAudio().open(output=True, ...)` gives a stream whose `write(frames)` appends to the log. Each opened
stream is one PlayedClip: the exact bytes written, the rate and format, and the monotonic times of the open,
each write and the close. Input streams are not simulated here (that is the fake microphone's job).

Switches (fault injection): `fail_open` makes `open` raise OSError as PortAudio does for a missing device;
`fail_write_after` makes a stream's write raise after that many writes.

Threads: the playback thread writes; tests read `clips` from theirs. One lock guards the log; a Condition
lets `wait_for_clips` wait (bounded) for clips to be closed.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# PortAudio sample formats, with pyaudio's values.
paFloat32, paInt32, paInt24, paInt16, paInt8, paUInt8 = 1, 2, 4, 8, 16, 32
_SAMPLE_SIZES = {paFloat32: 4, paInt32: 4, paInt24: 3, paInt16: 2, paInt8: 1, paUInt8: 1}


@dataclass
class PlayedClip:
    opened_us: int
    rate: int
    channels: int
    sample_width: int
    pcm: bytearray = field(default_factory=bytearray)
    write_times_us: list[int] = field(default_factory=list)
    closed_us: int | None = None

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / (self.sample_width * self.channels * self.rate)


class SpeakerLog:
    """A recording speaker with the `pyaudio` module's output API."""

    paFloat32, paInt32, paInt24, paInt16, paInt8, paUInt8 = paFloat32, paInt32, paInt24, paInt16, paInt8, paUInt8

    def __init__(self, clock_mono_us: Callable[[], int] | None = None,
                 pace: Callable[[float], None] | None = None) -> None:
        """`pace(seconds)` is called after each write with the audio's duration, to make `write` block like a
        real device (e.g. time.sleep, or a simulated clock's advance); by default writes return at once."""
        import time

        self.clock_mono_us = clock_mono_us or (lambda: time.monotonic_ns() // 1000)
        self.pace = pace
        self.fail_open = False
        self.fail_write_after: int | None = None
        self._clips: list[PlayedClip] = []
        self._cond = threading.Condition()

    # --- the pyaudio module surface ---------------------------------------------------------------

    def PyAudio(self) -> _FakePyAudio:  # noqa: N802 - mirrors pyaudio.PyAudio
        return _FakePyAudio(self)

    @staticmethod
    def get_sample_size(fmt: int) -> int:
        try:
            return _SAMPLE_SIZES[fmt]
        except KeyError:
            raise ValueError(f"invalid PortAudio sample format {fmt}") from None

    # --- what tests read --------------------------------------------------------------------------

    @property
    def clips(self) -> list[PlayedClip]:
        with self._cond:
            return list(self._clips)

    def wait_for_clips(self, count: int, timeout: float = 5.0) -> bool:
        """Wait (at most `timeout` s) until `count` streams have been closed; True if they were."""
        with self._cond:
            return self._cond.wait_for(lambda: sum(c.closed_us is not None for c in self._clips) >= count, timeout)

    def played_prompts(self, library: Any, language: str | None = None) -> list[str]:
        """Identify each closed clip as the catalogue prompt whose decoded audio it is, byte for byte
        ("?" for audio that is no prompt, or only part of one). `library` is a PromptLibrary."""
        from agent.voice_prompts.catalogue import CATALOGUE, LANGUAGES

        names = []
        known: dict[tuple[int, str], str] = {}
        for clip in self.clips:
            if clip.closed_us is None:
                continue
            digest = hashlib.sha256(clip.pcm).hexdigest()
            if (clip.rate, digest) not in known:
                for lang in [language] if language else LANGUAGES:
                    for pid in CATALOGUE:
                        known[(clip.rate, hashlib.sha256(library.pcm(pid, lang, clip.rate)).hexdigest())] = pid
            names.append(known.get((clip.rate, digest), "?"))
        return names

    # --- called by the fake streams ---------------------------------------------------------------

    def _open(self, rate: int, channels: int, sample_width: int) -> PlayedClip:
        if self.fail_open:
            raise OSError(-9996, "Invalid output device (no default output device)")
        clip = PlayedClip(self.clock_mono_us(), rate, channels, sample_width)
        with self._cond:
            self._clips.append(clip)
        return clip

    def _write(self, clip: PlayedClip, frames: bytes) -> None:
        with self._cond:
            if self.fail_write_after is not None and len(clip.write_times_us) >= self.fail_write_after:
                raise OSError(-9999, "Unanticipated host error (speaker fault injected)")
            clip.pcm += frames
            clip.write_times_us.append(self.clock_mono_us())
        if self.pace is not None:
            self.pace(len(frames) / (clip.sample_width * clip.channels * clip.rate))

    def _close(self, clip: PlayedClip) -> None:
        with self._cond:
            if clip.closed_us is None:
                clip.closed_us = self.clock_mono_us()
            self._cond.notify_all()


class _FakePyAudio:
    def __init__(self, log: SpeakerLog) -> None:
        self._log = log
        self._terminated = False

    def open(self, rate: int, channels: int, format: int, input: bool = False, output: bool = False,  # noqa: A002
             frames_per_buffer: int = 1024, **_: Any) -> _FakeOutputStream:
        if self._terminated:
            raise RuntimeError("PyAudio instance was terminated")
        if input or not output:
            raise ValueError("the simulated speaker only provides output streams (output=True)")
        if channels < 1:
            raise ValueError(f"invalid number of channels {channels}")
        return _FakeOutputStream(self._log, self._log._open(rate, channels, SpeakerLog.get_sample_size(format)))

    def get_sample_size(self, fmt: int) -> int:
        return SpeakerLog.get_sample_size(fmt)

    def terminate(self) -> None:
        self._terminated = True


class _FakeOutputStream:
    def __init__(self, log: SpeakerLog, clip: PlayedClip) -> None:
        self._log = log
        self._clip = clip
        self._active = True
        self._closed = False

    def write(self, frames: bytes, num_frames: int | None = None, exception_on_underflow: bool = False) -> None:
        if self._closed:
            raise OSError(-9988, "Stream closed")
        frame_bytes = self._clip.sample_width * self._clip.channels
        if len(frames) % frame_bytes:
            raise ValueError(f"{len(frames)} bytes is not a whole number of {frame_bytes}-byte frames")
        if num_frames is not None:
            frames = bytes(frames[:num_frames * frame_bytes])
        self._active = True
        self._log._write(self._clip, bytes(frames))

    def is_active(self) -> bool:
        return self._active and not self._closed

    def stop_stream(self) -> None:
        self._active = False

    def start_stream(self) -> None:
        self._active = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._log._close(self._clip)
