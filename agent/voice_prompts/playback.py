"""Prompt playback through the PyAudio API, on a thread of its own, with a record of when the speaker was busy.

Public API:
    activity = SpeakerActivity()               shared with the StatementDetector: while the device itself is
                                               talking, the microphone hears the prompt, not the officer
    player = PromptPlayer(pyaudio_module, PromptLibrary(), language="zh-CN", clock_mono_us=clock.mono_us,
                          on_finished=callback, activity=activity)
    player.start()
    player.play("session_started_opening_statement")          -> False if the queue is full (counted)
    player.play("critical_battery_shutdown", interrupt=True)  cut the current prompt, drop the queue
    player.stop()

`pyaudio_module` is the `pyaudio` module on the device and hw_sim's fake in tests; the player uses only
`PyAudio()`, `paInt16`, `open(format=, channels=, rate=, output=True, frames_per_buffer=)`,
`stream.write(bytes)`, `stop_stream()`, `close()` and `terminate()`.

Threads: `play`/`stop` may be called from any thread (the session machine's). The "prompt-playback" thread
owns the PyAudio instance and every stream, decodes assets and does the blocking `write`s; `on_finished`
runs on that thread with a PlaybackResult (keep it short: post it to the session machine's queue).
One output stream is opened per prompt, so a speaker log shows one clip per prompt and the speaker can be
powered down between prompts. A speaker that fails (open or write raises) gives a PlaybackResult with
`error` set; the player keeps running and tries again with the next prompt.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.voice_prompts.assets import PromptAudioError, PromptLibrary
from agent.voice_prompts.catalogue import LANGUAGES, PromptError, prompt

log = logging.getLogger(__name__)

# The microphone keeps hearing a prompt for a moment after the last sample was written (output buffering,
# room echo); the detector ignores this much after the end of each playback.
ECHO_TAIL_US = 300_000


class SpeakerActivity:
    """When the device's own speaker was (or will be) sounding, on the monotonic clock. Thread-safe."""

    def __init__(self, keep_us: int = 120_000_000, tail_us: int = ECHO_TAIL_US) -> None:
        self._lock = threading.Lock()
        self._windows: deque[tuple[int, int]] = deque()
        self.keep_us = keep_us
        self.tail_us = tail_us

    def add(self, start_us: int, end_us: int) -> None:
        """The speaker sounds from `start_us` to `end_us` (the echo tail is added here)."""
        with self._lock:
            self._windows.append((start_us, end_us + self.tail_us))
            while self._windows and self._windows[0][1] < end_us - self.keep_us:
                self._windows.popleft()

    def end_last(self, end_us: int) -> None:
        """The last playback really ended at `end_us` (cut short, or paced longer by a slow device)."""
        with self._lock:
            if self._windows:
                start, _ = self._windows[-1]
                self._windows[-1] = (start, end_us + self.tail_us)

    def overlaps(self, start_us: int, end_us: int) -> bool:
        with self._lock:
            return any(s < end_us and start_us < e for s, e in self._windows)


@dataclass(frozen=True)
class PlaybackResult:
    prompt_id: str
    language: str
    started_us: int
    ended_us: int  # when the last sample is expected to have left the speaker
    completed: bool  # False: cut short by interrupt/stop, or failed
    error: str | None = None


@dataclass(frozen=True)
class _Request:
    prompt_id: str
    language: str
    generation: int


class PromptPlayer:
    def __init__(self, pyaudio_module: Any, library: PromptLibrary, language: str,
                 clock_mono_us: Callable[[], int], on_finished: Callable[[PlaybackResult], None] | None = None,
                 activity: SpeakerActivity | None = None, output_rate: int = 16_000, max_queued: int = 8,
                 chunk_frames: int = 1024) -> None:
        if language not in LANGUAGES:
            raise PromptError(f"unknown prompt language {language!r}; known: {', '.join(LANGUAGES)}")
        missing = library.missing([language])
        if missing:
            raise PromptAudioError(f"{len(missing)} prompts have no {language} audio (first: {missing[0][0]}); "
                                   "run python -m agent.voice_prompts.render")
        self.pyaudio = pyaudio_module
        self.library = library
        self.language = language
        self.clock_mono_us = clock_mono_us
        self.on_finished = on_finished
        self.activity = activity
        self.output_rate = output_rate
        self.chunk_frames = chunk_frames
        self.dropped = 0  # play() calls refused because the queue was full
        self.failures = 0  # prompts the speaker could not play
        self._queue: queue.Queue[_Request | None] = queue.Queue(max_queued)
        self._generation = 0  # bumped by interrupt/stop: older requests are skipped, the current one cut
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prompt-playback", daemon=True)

    # --- any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def play(self, prompt_id: str, language: str | None = None, *, interrupt: bool = False) -> bool:
        """Queue a prompt. Raises PromptError for an unknown id; returns False if the queue was full."""
        lang = language or self.language
        prompt(prompt_id).text(lang)
        with self._lock:
            if interrupt:
                self._generation += 1
            generation = self._generation
        try:
            self._queue.put_nowait(_Request(prompt_id, lang, generation))
            return True
        except queue.Full:
            self.dropped += 1
            log.error("prompt queue full; %s not played (%d dropped so far)", prompt_id, self.dropped)
            return False

    def stop(self, timeout: float = 5.0) -> None:
        """Cut the current prompt, drop the queue and end the thread (bounded wait)."""
        with self._lock:
            self._generation += 1
        self._stopping.set()
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):  # the sentinel only wakes the thread sooner
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    # --- prompt-playback thread -------------------------------------------------------------------

    def _current(self, generation: int) -> bool:
        with self._lock:
            return generation == self._generation

    def _run(self) -> None:
        pa: Any = None
        init_error = ""
        try:
            pa = self.pyaudio.PyAudio()
        except Exception as exc:  # no sound device at all: every prompt reports the failure
            log.error("cannot initialise audio output: %s", exc)
            init_error = f"audio output unavailable: {exc}"
        try:
            while not self._stopping.is_set():
                try:
                    request = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                if request is None:
                    return
                if not self._current(request.generation):
                    continue  # superseded by an interrupting prompt
                if pa is None:
                    now = self.clock_mono_us()
                    self._finish(PlaybackResult(request.prompt_id, request.language, now, now, False, init_error))
                    continue
                self._finish(self._play_one(pa, request))
        finally:
            if pa is not None:
                try:
                    pa.terminate()
                except Exception as exc:
                    log.warning("PyAudio terminate failed: %s", exc)

    def _play_one(self, pa: Any, request: _Request) -> PlaybackResult:
        started = self.clock_mono_us()
        try:
            pcm = self.library.pcm(request.prompt_id, request.language, self.output_rate)
        except (PromptAudioError, PromptError) as exc:
            return PlaybackResult(request.prompt_id, request.language, started, started, False, str(exc))
        duration_us = len(pcm) // 2 * 1_000_000 // self.output_rate
        if self.activity is not None:
            # Registered before the first sample is written, so the detector never sees the prompt unmasked.
            self.activity.add(started, started + duration_us)
        stream = None
        written = 0
        error: str | None = None
        try:
            stream = pa.open(format=self.pyaudio.paInt16, channels=1, rate=self.output_rate, output=True,
                             frames_per_buffer=self.chunk_frames)
            step = self.chunk_frames * 2
            while written < len(pcm) and self._current(request.generation):
                stream.write(pcm[written:written + step])
                written += len(pcm[written:written + step])
        except Exception as exc:  # PortAudio raises OSError; a fake may raise anything: report, keep going
            error = f"speaker: {exc}"
            self.failures += 1
        finally:
            if stream is not None:
                try:
                    stream.stop_stream()
                    stream.close()
                except Exception as exc:
                    log.warning("closing output stream failed: %s", exc)
        now = self.clock_mono_us()
        ended = max(now, started + written // 2 * 1_000_000 // self.output_rate)
        if self.activity is not None:
            self.activity.end_last(ended)
        return PlaybackResult(request.prompt_id, request.language, started, ended,
                              completed=error is None and written >= len(pcm), error=error)

    def _finish(self, result: PlaybackResult) -> None:
        if result.error:
            log.error("prompt %s (%s) not played: %s", result.prompt_id, result.language, result.error)
        if self.on_finished is not None:
            try:
                self.on_finished(result)
            except Exception:
                log.exception("on_finished callback failed for %s", result.prompt_id)
