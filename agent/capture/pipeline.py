"""The capture pipeline: encoded packets in, signed encrypted segments out (DESIGN.md, "Recording"; R16, R17, R22).

Threads:
- source threads (camera/encoder callback, audio capture) call `submit()`: it only appends to a bounded
  inbox and returns. A full inbox drops the packet, counts it, and fires `queue_overflow` once per
  episode on the submitting thread (so it must not block); the encoder is never held up.
- one writer thread ("capture-writer") owns everything else: the GOP assembler, the pre-event ring,
  the segmenter/muxer and the open segment. It is the only thread that touches segment files.
- control calls (`start_session`, `stop_session`, `resume_session`, `flush`) may come from any thread;
  they are queued in order with the packets (commands never count against the packet bound), so a
  start press splits the stream exactly between packets submitted before it and after it.
- events (`PipelineEvents`) are delivered on the writer thread, except `queue_overflow`; a subscriber
  must return quickly and may call the control methods (they only enqueue).
- the optional `sidecar_provider` runs on the writer thread just before each normal segment close, while
  packets wait in the inbox: it must be fast (the GPS track recorder seals a few KB and fsyncs it). What it
  returns goes into the segment record; if it raises, or returns an entry the store refuses, the error is
  logged and counted, `sidecar_failed` is reported, and the segment closes without it: footage is never
  held back for a sidecar.

States: READY (GOPs fill the pre-event ring) -> RECORDING (the ring is written first, then live GOPs)
-> READY on stop. A storage failure closes the open segment as truncated (`OpenSegment.abort`),
reports `storage_failed` and enters INTERRUPTED: GOPs go to the ring again, so `resume_session()`
continues the same session (same timeline, next segment index) with the footage buffered meanwhile.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.capture.fmp4 import MuxError
from agent.capture.packets import AudioParams, EncodedPacket, VideoParams
from agent.capture.ring import DEFAULT_PRE_EVENT_SECONDS, MAX_PRE_EVENT_SECONDS, PreEventRing
from agent.capture.segmenter import (
    DEFAULT_AUDIO_WAIT_US,
    DEFAULT_KEYFRAME_GRACE_US,
    DEFAULT_MAX_GOP_US,
    MIN_SEGMENT_US,
    FragmentOut,
    Gop,
    GopAssembler,
    Segmenter,
)
from agent.clock import Clock
from agent.evidence.records import SignedRecord
from agent.storage.segment_writer import StorageError, StorageFullError
from agent.storage.store import EvidenceStore, OpenSegment, SidecarError, segment_id_for

log = logging.getLogger(__name__)

READY, RECORDING, INTERRUPTED = "READY", "RECORDING", "INTERRUPTED"
STORAGE_ERRORS = (StorageError, OSError, sqlite3.Error)

# (segment_id, first_pts_us, end_pts_us) -> `sidecars` entries of the segment record (records.Sidecar dicts)
# for files it has written, fsynced and renamed in segments/ (docs/FORMAT.md §10.5). The span is the
# segment's time on the media clock, end exclusive: the first frame of the next segment at a split, else
# just past the last frame, so consecutive segments' spans meet without a gap.
SidecarProvider = Callable[[str, int, int], list[dict[str, Any]]]


@dataclass(frozen=True)
class PipelineConfig:
    segment_seconds: float = 60.0
    pre_event_seconds: float = DEFAULT_PRE_EVENT_SECONDS
    pre_event_audio: bool = True
    queue_packets: int = 900  # ~10 s of 30 fps video with 48 kHz AAC
    keyframe_grace_seconds: float = DEFAULT_KEYFRAME_GRACE_US / 1e6
    max_gop_seconds: float = DEFAULT_MAX_GOP_US / 1e6
    audio_wait_seconds: float = DEFAULT_AUDIO_WAIT_US / 1e6
    latency_samples: int = 4096

    def __post_init__(self) -> None:
        checks = [("segment_seconds", self.segment_seconds, MIN_SEGMENT_US / 1e6, 3600.0),
                  ("pre_event_seconds", self.pre_event_seconds, 0.0, MAX_PRE_EVENT_SECONDS),
                  ("queue_packets", self.queue_packets, 2, 100_000),
                  ("keyframe_grace_seconds", self.keyframe_grace_seconds, 0.1, 60.0),
                  ("max_gop_seconds", self.max_gop_seconds, 0.5, 60.0),
                  ("audio_wait_seconds", self.audio_wait_seconds, 0.0, 10.0),
                  ("latency_samples", self.latency_samples, 1, 1_000_000)]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"capture.{name} = {value!r} is outside {low:g}..{high:g}")


# --- events out of the pipeline --------------------------------------------------------------------


@dataclass(frozen=True)
class RecordingStarted:
    """The session's first fragment is on disk."""

    session_id: str
    segment_id: str
    first_pts_us: int  # time zero of the session's timeline (oldest pre-event frame)
    requested_at_us: int | None  # media-clock time of the start press, when known
    pre_event_us: int | None  # how far before the press the footage begins


@dataclass(frozen=True)
class SegmentClosed:
    session_id: str
    segment_id: str
    index: int
    record: SignedRecord


@dataclass(frozen=True)
class StorageFailed:
    """Writing failed; the open segment (if any) was closed as truncated. The session is INTERRUPTED."""

    session_id: str
    segment_id: str | None
    error: Exception
    records: list[SignedRecord]
    storage_full: bool


@dataclass(frozen=True)
class RecordingStopped:
    session_id: str
    segments: int
    last_pts_us: int | None


@dataclass(frozen=True)
class QueueOverflow:
    """The inbox was full: packets are being dropped. Fired once when an episode begins."""

    episode: int
    dropped_total: int
    kind: str  # kind of the first packet dropped


@dataclass(frozen=True)
class QueueRecovered:
    """An overflow episode ended: `dropped` packets were lost in it, just before the packet that follows."""

    episode: int
    dropped: int


@dataclass(frozen=True)
class SidecarFailed:
    """The sidecar provider failed for a segment; the segment was closed without its sidecars."""

    session_id: str
    segment_id: str
    error: Exception


@dataclass(frozen=True)
class WriterFault:
    code: str  # "mux_error", "writer_error", "bad_command"
    detail: str
    session_id: str | None


class PipelineEvents(Protocol):
    def recording_started(self, event: RecordingStarted) -> None: ...

    def segment_closed(self, event: SegmentClosed) -> None: ...

    def storage_failed(self, event: StorageFailed) -> None: ...

    def recording_stopped(self, event: RecordingStopped) -> None: ...

    def queue_overflow(self, event: QueueOverflow) -> None: ...

    def queue_recovered(self, event: QueueRecovered) -> None: ...

    def fault(self, event: WriterFault) -> None: ...

    def sidecar_failed(self, event: SidecarFailed) -> None: ...


class IgnoreEvents:
    """A PipelineEvents that ignores everything; subclass it and override what you need."""

    def recording_started(self, event: RecordingStarted) -> None:
        pass

    def segment_closed(self, event: SegmentClosed) -> None:
        pass

    def storage_failed(self, event: StorageFailed) -> None:
        pass

    def recording_stopped(self, event: RecordingStopped) -> None:
        pass

    def queue_overflow(self, event: QueueOverflow) -> None:
        pass

    def queue_recovered(self, event: QueueRecovered) -> None:
        pass

    def fault(self, event: WriterFault) -> None:
        pass

    def sidecar_failed(self, event: SidecarFailed) -> None:
        pass


# --- stats -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineStats:
    state: str
    packets_in: int  # accepted by submit()
    packets_out: int  # written into segment fragments
    packets_dropped: int  # refused by a full inbox
    overflow_episodes: int
    queue_depth: int
    queue_high_water: int
    queue_capacity: int
    ring_seconds: float
    ring_bytes: int
    ring_gops: int
    ring_evicted_packets: int  # aged out of the pre-event ring while READY (normal)
    packets_lost_to_storage: int  # in fragments that could not be written
    segments_written: int
    fragments_written: int
    bytes_written: int  # plaintext fMP4 bytes
    keyframe_requests: int
    discarded: dict[str, int]  # packets the assembler refused, by reason
    faults: int
    sidecar_failures: int  # segments closed without the sidecars the provider was asked for
    writer_latency_us: tuple[int, ...]  # recent samples: submit() to the packet fully handled (written if due)


# --- the inbox between source threads and the writer -----------------------------------------------


@dataclass
class _Item:
    packet: EncodedPacket
    submitted_ns: int


@dataclass
class _Command:
    name: str
    session_id: str | None = None
    at_us: int | None = None
    first_index: int = 0
    done: threading.Event | None = None
    episode: int = 0
    dropped: int = 0


@dataclass
class _Inbox:
    capacity: int
    items: deque[_Item | _Command] = field(default_factory=deque)
    packets: int = 0
    high_water: int = 0
    accepted: int = 0
    dropped: int = 0
    episodes: int = 0
    episode_dropped: int = 0
    in_episode: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def offer(self, packet: EncodedPacket) -> tuple[bool, QueueOverflow | None]:
        """Append a packet, or drop it when full. Returns (accepted, the overflow event if an episode began)."""
        with self.cond:
            if self.packets >= self.capacity:
                self.dropped += 1
                self.episode_dropped += 1
                if self.in_episode:
                    return False, None
                self.in_episode = True
                self.episodes += 1
                return False, QueueOverflow(self.episodes, self.dropped, packet.kind)
            if self.in_episode:
                self.in_episode = False
                self.items.append(_Command("overflow_ended", episode=self.episodes, dropped=self.episode_dropped))
                self.episode_dropped = 0
            self.items.append(_Item(packet, time.monotonic_ns()))
            self.packets += 1
            self.accepted += 1
            self.high_water = max(self.high_water, self.packets)
            # Wake the writer at a GOP boundary (a fragment is only complete then) or when the queue fills
            # up; waking it for every packet cost ~20 CPU s per hour of footage (bench_capture). Its own
            # wait timeout bounds how long anything else waits.
            if (packet.kind == "video" and packet.keyframe) or self.packets >= self.capacity // 2:
                self.cond.notify()
            return True, None

    def command(self, cmd: _Command) -> None:
        with self.cond:
            self.items.append(cmd)
            self.cond.notify()

    def take(self, timeout: float) -> _Item | _Command | None:
        with self.cond:
            if not self.items and not self.cond.wait(timeout):
                return None
            if not self.items:
                return None
            item = self.items.popleft()
            if isinstance(item, _Item):
                self.packets -= 1
            return item


# --- the pipeline ----------------------------------------------------------------------------------


class CapturePipeline:
    def __init__(self, store: EvidenceStore, video: VideoParams, audio: AudioParams | None,
                 config: PipelineConfig | None = None, events: PipelineEvents | None = None,
                 request_keyframe: Callable[[], object] | None = None, clock: Clock | None = None,
                 sidecar_provider: SidecarProvider | None = None):
        self.store = store
        self.sidecar_provider = sidecar_provider
        self.config = config or PipelineConfig()
        self.events: PipelineEvents = events or IgnoreEvents()
        self.clock = clock
        self._request_keyframe = request_keyframe
        cfg = self.config
        self._inbox = _Inbox(cfg.queue_packets)
        self._assembler = GopAssembler(audio is not None, int(cfg.max_gop_seconds * 1e6),
                                       int(cfg.audio_wait_seconds * 1e6))
        self._ring = PreEventRing(cfg.pre_event_seconds, cfg.pre_event_audio)
        self._segmenter = Segmenter(video, audio, int(cfg.segment_seconds * 1e6),
                                    int(cfg.keyframe_grace_seconds * 1e6), self._ask_keyframe)
        self._latency: deque[int] = deque(maxlen=cfg.latency_samples)
        self._state = READY
        self._session_id: str | None = None
        self._requested_at_us: int | None = None
        self._started_reported = False
        self._segment: OpenSegment | None = None
        self._segment_end_us: int | None = None  # end of the open segment's time span so far (exclusive)
        self._session_segments = 0
        self._last_pts_us: int | None = None
        self._packets_out = 0
        self._packets_lost = 0
        self._packets_undecodable = 0
        self._segments_written = 0
        self._fragments_written = 0
        self._bytes_written = 0
        self._faults = 0
        self._sidecar_failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- public interface (any thread) ------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("capture pipeline already started")
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    def submit(self, packet: EncodedPacket) -> bool:
        """Hand over one encoded packet; never blocks. False if it was dropped (inbox full)."""
        accepted, overflow = self._inbox.offer(packet)
        if overflow is None:
            return accepted
        log.error("capture queue full (%d packets): dropping, episode %d", self._inbox.capacity, overflow.episode)
        self._emit("queue_overflow", overflow)
        return False

    def start_session(self, session_id: str, at_us: int | None = None, first_index: int = 0) -> None:
        """Begin recording: the pre-event ring first, then live packets. `at_us` is the press on the media clock."""
        if at_us is None and self.clock is not None:
            at_us = self.clock.mono_us()
        self._inbox.command(_Command("start", session_id=session_id, at_us=at_us, first_index=first_index))

    def stop_session(self) -> None:
        """Write everything up to now, close the segment with its signed record, return to READY."""
        self._inbox.command(_Command("stop"))

    def pause_session(self) -> None:
        """An interruption: write what has arrived, close the segment (signed), and buffer into the ring
        again (INTERRUPTED) until `resume_session()` or `stop_session()`."""
        self._inbox.command(_Command("pause"))

    def resume_session(self) -> None:
        """After `storage_failed` or `pause_session`: continue the session in a new segment, buffered footage
        first."""
        self._inbox.command(_Command("resume"))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call has been handled. False on timeout."""
        done = threading.Event()
        self._inbox.command(_Command("barrier", done=done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Finish any session (segment closed and signed) and stop the writer thread. False on timeout."""
        if self._thread is None:
            return True
        self._inbox.command(_Command("shutdown"))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def state(self) -> str:
        return self._state

    @property
    def queue_depth(self) -> int:
        """Packets waiting for the writer thread (cheap; for pacing and health checks)."""
        return self._inbox.packets

    def stats(self) -> PipelineStats:
        inbox, counts = self._inbox, self._assembler.counts
        return PipelineStats(
            state=self._state, packets_in=inbox.accepted, packets_out=self._packets_out,
            packets_dropped=inbox.dropped, overflow_episodes=inbox.episodes, queue_depth=inbox.packets,
            queue_high_water=inbox.high_water, queue_capacity=inbox.capacity, ring_seconds=self._ring.seconds,
            ring_bytes=self._ring.nbytes, ring_gops=len(self._ring), ring_evicted_packets=self._ring.evicted_packets,
            packets_lost_to_storage=self._packets_lost, segments_written=self._segments_written,
            fragments_written=self._fragments_written, bytes_written=self._bytes_written,
            keyframe_requests=self._segmenter.keyframe_requests,
            discarded={"video_before_keyframe": counts.video_before_keyframe,
                       "video_pts_repaired": counts.video_pts_repaired,
                       "audio_out_of_order": counts.audio_out_of_order,
                       "audio_before_video": counts.audio_before_video, "malformed": counts.malformed,
                       "gop_without_its_keyframe": self._packets_undecodable},
            faults=self._faults, sidecar_failures=self._sidecar_failures, writer_latency_us=tuple(self._latency))

    # --- writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self._inbox.take(0.25)
            if item is None:
                continue
            try:
                if isinstance(item, _Item):
                    self._on_packet(item.packet)
                    self._latency.append((time.monotonic_ns() - item.submitted_ns) // 1000)
                else:
                    self._on_command(item)
            except Exception as exc:  # the writer must outlive any one bad packet or command
                log.exception("capture writer: unexpected error")
                self._fault("writer_error", f"{type(exc).__name__}: {exc}")
            finally:
                if isinstance(item, _Command) and item.done is not None:
                    item.done.set()

    def _on_packet(self, packet: EncodedPacket) -> None:
        gops = self._assembler.push(packet)
        if self._state == RECORDING and packet.kind == "video":
            self._segmenter.note_video(packet)
        for gop in gops:
            self._route(gop)

    def _on_command(self, cmd: _Command) -> None:
        if cmd.name == "start":
            self._start(cmd)
        elif cmd.name == "stop":
            self._finish_session()
        elif cmd.name == "pause":
            if self._state != RECORDING:
                self._fault("bad_command", f"pause while {self._state}")
                return
            for gop in self._assembler.flush():
                self._route(gop)
            if self._segment is not None:
                self._close_segment()
            if self._state == RECORDING:  # (a failed close has already made it INTERRUPTED)
                self._state = INTERRUPTED
        elif cmd.name == "resume":
            if self._state != INTERRUPTED:
                self._fault("bad_command", f"resume while {self._state}")
                return
            self._state = RECORDING
            self._segmenter.resume()
            for gop in self._ring.drain():
                self._route(gop)
        elif cmd.name == "overflow_ended":
            self._emit("queue_recovered", QueueRecovered(cmd.episode, cmd.dropped))
            self._ask_keyframe()  # frames were lost: let the decoder resynchronise soon
        elif cmd.name == "shutdown":
            self._finish_session()
            self._stop.set()

    def _start(self, cmd: _Command) -> None:
        if self._state != READY:
            self._fault("bad_command", f"start of {cmd.session_id} while {self._state} ({self._session_id})")
            return
        assert cmd.session_id is not None
        self._state = RECORDING
        self._session_id = cmd.session_id
        self._requested_at_us = cmd.at_us
        self._started_reported = False
        self._session_segments = 0
        self._last_pts_us = None
        self._segmenter.begin(cmd.first_index)
        for gop in self._ring.drain():
            self._route(gop)

    def _finish_session(self) -> None:
        if self._state == READY:
            return
        session_id = self._session_id
        for gop in self._assembler.flush():
            self._route(gop)
        if self._segment is not None:
            self._close_segment()
        self._segmenter.end()
        self._state = READY
        self._session_id = None
        assert session_id is not None
        self._emit("recording_stopped", RecordingStopped(session_id, self._session_segments, self._last_pts_us))

    def _route(self, gop: Gop) -> None:
        if self._state == RECORDING:
            self._write(gop)
        else:
            self._ring.push(gop)

    def _write(self, gop: Gop) -> None:
        try:
            out = self._segmenter.add(gop)
        except (MuxError, ValueError) as exc:
            self._packets_lost += len(gop.video) + len(gop.audio)
            self._fault("mux_error", str(exc))
            return
        if out is None:
            self._packets_undecodable += len(gop.video) + len(gop.audio)
            return
        try:
            if out.new_segment:
                if self._segment is not None:
                    self._close_segment(next_first_pts_us=out.info.first_pts_us)
                    if self._state != RECORDING:  # closing failed
                        self._packets_lost += len(gop.video) + len(gop.audio)
                        return
                self._segment = self.store.open_segment(self._session_id, out.segment_index)
                self._session_segments += 1
            assert self._segment is not None
            self._segment.write_fragment(out.data, out.info)
        except STORAGE_ERRORS as exc:
            self._packets_lost += len(gop.video) + len(gop.audio)
            self._storage_failed(exc)
            return
        self._written(out)

    def _written(self, out: FragmentOut) -> None:
        self._packets_out += len(out.gop.video) + len(out.gop.audio)
        self._fragments_written += 1
        self._bytes_written += len(out.data)
        self._last_pts_us = out.info.last_pts_us
        # GOPs come in time order: the open segment's span now ends where this one does.
        last = out.info.last_pts_us
        self._segment_end_us = max(out.gop.start_us + out.gop.duration_us, -1 if last is None else last + 1)
        if not self._started_reported and self._segment is not None and self._segmenter.muxer is not None:
            self._started_reported = True
            base = self._segmenter.muxer.base_pts_us
            at = self._requested_at_us
            self._emit("recording_started", RecordingStarted(
                self._session_id or "", self._segment.segment_id, base, at,
                None if at is None else max(0, at - base)))

    def _close_segment(self, next_first_pts_us: int | None = None) -> None:
        segment, self._segment = self._segment, None
        assert segment is not None
        try:
            sidecars = self._sidecars_for(segment, next_first_pts_us)
            try:
                record = segment.close(sidecars=sidecars) if sidecars else segment.close()
            except SidecarError as exc:  # refused before anything was closed: close without them
                self._sidecar_failed(segment, exc)
                record = segment.close()
        except STORAGE_ERRORS as exc:
            self._segment = segment
            self._storage_failed(exc)
            return
        self._segments_written += 1
        self._emit("segment_closed", SegmentClosed(self._session_id or "", segment.segment_id, segment.index,
                                                   record))

    def _sidecars_for(self, segment: OpenSegment, next_first_pts_us: int | None) -> list[dict[str, Any]]:
        """Ask the provider for the segment's sidecars; [] (logged, counted, reported) if it fails."""
        totals = segment.totals
        if self.sidecar_provider is None or totals.first_pts_us is None:
            return []
        # At a split the span ends where the next segment's begins, so no point falls between the two.
        end_us = next_first_pts_us if next_first_pts_us is not None else self._segment_end_us
        end_us = max(end_us or 0, totals.first_pts_us + 1)
        try:
            sidecars = self.sidecar_provider(segment.segment_id, totals.first_pts_us, end_us)
            if not isinstance(sidecars, list):
                raise TypeError(f"sidecar provider returned {type(sidecars).__name__}, not a list")
            return sidecars
        except Exception as exc:  # a GPS problem must never cost footage
            self._sidecar_failed(segment, exc)
            return []

    def _sidecar_failed(self, segment: OpenSegment, exc: Exception) -> None:
        self._sidecar_failures += 1
        log.error("segment %s: closing without sidecars: %s: %s", segment.segment_id, type(exc).__name__, exc)
        self._emit("sidecar_failed", SidecarFailed(self._session_id or "", segment.segment_id, exc))

    def _storage_failed(self, exc: Exception) -> None:
        segment, self._segment = self._segment, None
        records: list[SignedRecord] = []
        segment_id = segment.segment_id if segment is not None else None
        if segment is None and self._session_id is not None:
            segment_id = segment_id_for(self._session_id, self._segmenter.segment_index)
        if segment is not None:
            try:
                records = segment.abort(str(exc))
            except Exception:  # the ledger may be on the same full disk; recovery at boot closes it
                log.exception("segment %s: could not close as truncated now; left for recovery", segment_id)
        log.error("capture storage failure in %s: %s", segment_id, exc)
        self._state = INTERRUPTED
        full = isinstance(exc, StorageFullError) or getattr(exc, "errno", None) == errno.ENOSPC
        self._emit("storage_failed", StorageFailed(self._session_id or "", segment_id, exc, records, full))

    def _ask_keyframe(self) -> None:
        if self._request_keyframe is None:
            return
        try:
            self._request_keyframe()
        except Exception:
            log.exception("keyframe request to the source failed")

    def _fault(self, code: str, detail: str) -> None:
        self._faults += 1
        log.error("capture pipeline fault %s: %s", code, detail)
        self._emit("fault", WriterFault(code, detail, self._session_id))

    def _emit(self, name: str, event: object) -> None:
        try:
            getattr(self.events, name)(event)
        except Exception:
            log.exception("capture event subscriber failed on %s", name)
