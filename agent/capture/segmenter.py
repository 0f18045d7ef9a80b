"""Cutting the packet stream into GOPs, fragments and segments (DESIGN.md, "Recording"; R16, R22).

Thread: everything here runs on the capture writer thread (pipeline.py); nothing is shared.

Two stages, both free of I/O:

- `GopAssembler` groups packets into `Gop`s: the video frames from one keyframe up to the next, plus
  the audio whose timestamps fall in that span (routed by timestamp, not arrival). A GOP is released
  when the next keyframe arrives and audio has caught up with its end, or when video has run
  `audio_wait_us` past that end (a late or dead microphone never holds video back). A GOP whose video
  grows past `max_gop_us` without a keyframe is released as it stands and continued by a piece that
  starts without one, so RAM use and the footage at risk of a power cut stay bounded.
- `Segmenter` turns GOPs into fMP4 fragments (one per GOP) and decides where segment files end: only
  before a GOP that starts with a keyframe, once the segment has reached `segment_us`. When the target
  has passed by `keyframe_grace_us` and no keyframe came, it asks the source for one through
  `request_keyframe` (again every grace period). Fallback: the segment simply runs on, fragment by
  fragment, until a keyframe arrives; a segment is never started on a frame that cannot be decoded
  and nothing waits for a keyframe (frames keep reaching the disk).

Nothing is lost or duplicated at a split: a GOP goes whole into exactly one fragment, and the
fragment into exactly one segment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from agent.capture.fmp4 import FragmentedMp4Muxer, parameter_sets
from agent.capture.packets import AudioParams, EncodedPacket, VideoParams
from agent.storage.segment_writer import FragmentInfo

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_US = 60_000_000
DEFAULT_KEYFRAME_GRACE_US = 2_000_000
DEFAULT_MAX_GOP_US = 3_000_000
DEFAULT_AUDIO_WAIT_US = 1_000_000
# A keyframe this close before the segment target still ends the segment there (timestamp jitter).
SPLIT_TOLERANCE_US = 100_000
MIN_SEGMENT_US = 500_000
MAX_ORPHAN_AUDIO = 256  # audio packets held while no video has come yet (~5 s of 48 kHz AAC)


@dataclass
class Gop:
    """Video from one keyframe (or the continuation of an overlong GOP) and the audio of its span."""

    video: list[EncodedPacket] = field(default_factory=list)
    audio: list[EncodedPacket] = field(default_factory=list)
    end_us: int | None = None  # pts of the video frame that follows (the next GOP's first)
    next_audio_pts_us: int | None = None  # pts of the audio packet that follows, when already seen

    @property
    def start_us(self) -> int:
        return self.video[0].pts_us

    @property
    def keyframe_led(self) -> bool:
        return self.video[0].keyframe

    @property
    def duration_us(self) -> int:
        if self.end_us is not None:
            return self.end_us - self.start_us
        last = self.video[-1]
        return last.pts_us + last.duration_us - self.start_us

    @property
    def nbytes(self) -> int:
        return sum(len(p.data) for p in self.video) + sum(len(p.data) for p in self.audio)

    def without_audio(self) -> Gop:
        return Gop(self.video, [], self.end_us, None)


@dataclass
class AssemblerCounts:
    video_before_keyframe: int = 0  # frames before the first keyframe: nothing could decode them
    video_pts_repaired: int = 0  # frames whose pts did not increase, moved just after their predecessor
    audio_out_of_order: int = 0  # audio older than audio already released: a source bug, discarded
    audio_before_video: int = 0  # audio older than any video still held, discarded
    malformed: int = 0  # empty packets, or video that is not Annex B: a source bug, discarded


class GopAssembler:
    def __init__(self, expect_audio: bool, max_gop_us: int = DEFAULT_MAX_GOP_US,
                 audio_wait_us: int = DEFAULT_AUDIO_WAIT_US):
        self.expect_audio = expect_audio
        self.max_gop_us = max_gop_us
        self.audio_wait_us = audio_wait_us
        self.counts = AssemblerCounts()
        self._waiting: list[Gop] = []  # video complete, waiting for audio to pass their end
        self._current: Gop | None = None
        self._last_video_pts: int | None = None
        self._audio_high_us: int | None = None  # newest audio pts seen
        self._audio_released_us: int | None = None  # newest audio pts handed out in a Gop
        self._orphan_audio: list[EncodedPacket] = []  # audio that came before any video

    @property
    def held_packets(self) -> int:
        gops = [*self._waiting, *([self._current] if self._current else [])]
        return sum(len(g.video) + len(g.audio) for g in gops)

    def push(self, packet: EncodedPacket) -> list[Gop]:
        """Take one packet; return the GOPs it completed (oldest first)."""
        if packet.kind == "video":
            self._push_video(packet)
        else:
            self._push_audio(packet)
        return self._release()

    def flush(self) -> list[Gop]:
        """Release everything held, the GOP in progress included; the next GOP starts at a keyframe."""
        out = self._waiting + ([self._current] if self._current else [])
        self._waiting, self._current = [], None
        for gop in out:
            self._note_released(gop)
        return out

    def _push_video(self, packet: EncodedPacket) -> None:
        if not packet.data.startswith((b"\x00\x00\x01", b"\x00\x00\x00\x01")):
            self.counts.malformed += 1
            log.error("video packet %d is not an Annex B access unit; discarded", packet.seq)
            return
        if self._last_video_pts is not None and packet.pts_us <= self._last_video_pts:
            self.counts.video_pts_repaired += 1
            log.warning("video pts %d does not follow %d; placed 1 ms after it", packet.pts_us, self._last_video_pts)
            packet = replace(packet, pts_us=self._last_video_pts + 1000)
        if self._current is None and not packet.keyframe:
            self.counts.video_before_keyframe += 1
            return
        if self._current is None:
            adopt = [p for p in self._orphan_audio if p.pts_us >= packet.pts_us]
            self.counts.audio_before_video += len(self._orphan_audio) - len(adopt)
            self._orphan_audio.clear()
            self._current = Gop([packet], adopt)
        elif packet.keyframe or packet.pts_us - self._current.start_us >= self.max_gop_us:
            self._close_current(packet)
        else:
            self._current.video.append(packet)
        self._last_video_pts = packet.pts_us

    def _close_current(self, successor: EncodedPacket) -> None:
        """End the GOP in progress at `successor`; audio that arrived early moves on with the time it belongs to."""
        done = self._current
        assert done is not None
        done.end_us = successor.pts_us
        early = [p for p in done.audio if p.pts_us >= successor.pts_us]
        if early:
            done.audio = done.audio[: len(done.audio) - len(early)]
        self._waiting.append(done)
        self._current = Gop([successor], early)

    def _push_audio(self, packet: EncodedPacket) -> None:
        if not packet.data:
            self.counts.malformed += 1
            return
        if self._audio_released_us is not None and packet.pts_us <= self._audio_released_us:
            self.counts.audio_out_of_order += 1
            return
        self._audio_high_us = packet.pts_us if self._audio_high_us is None else max(self._audio_high_us,
                                                                                    packet.pts_us)
        gops = [*self._waiting, *([self._current] if self._current else [])]
        if not gops:  # no video yet: hold it for the first keyframe (the microphone may simply be quicker)
            if len(self._orphan_audio) >= MAX_ORPHAN_AUDIO:
                self._orphan_audio.pop(0)
                self.counts.audio_before_video += 1
            self._orphan_audio.append(packet)
            return
        target = gops[0]  # audio older than every held GOP (it arrived late) goes with the oldest
        for gop in gops:
            if gop.start_us <= packet.pts_us:
                target = gop
        if target is gops[0] and packet.pts_us < target.start_us and self._audio_released_us is None:
            self.counts.audio_before_video += 1  # before the first video of this timeline: nothing to sync to
            return
        pos = len(target.audio)
        while pos and target.audio[pos - 1].pts_us > packet.pts_us:
            pos -= 1
        target.audio.insert(pos, packet)

    def _release(self) -> list[Gop]:
        out: list[Gop] = []
        while self._waiting:
            gop = self._waiting[0]
            assert gop.end_us is not None
            audio_caught_up = self._audio_high_us is not None and self._audio_high_us >= gop.end_us
            video_ran_on = (self._last_video_pts is not None
                            and self._last_video_pts - gop.end_us >= self.audio_wait_us)
            if self.expect_audio and not audio_caught_up and not video_ran_on:
                break
            out.append(self._waiting.pop(0))
        for gop in out:
            self._note_released(gop)
        return out

    def _note_released(self, gop: Gop) -> None:
        if gop.audio and (self._audio_released_us is None or gop.audio[-1].pts_us > self._audio_released_us):
            self._audio_released_us = gop.audio[-1].pts_us
        following = [*self._waiting, *([self._current] if self._current else [])]
        nxt = next((g.audio[0].pts_us for g in following if g.audio), None)
        gop.next_audio_pts_us = nxt


@dataclass
class FragmentOut:
    """A fragment ready to write. With `new_segment`, close the open segment first and start a new
    file with `data` (which then begins with the init segment)."""

    data: bytes
    info: FragmentInfo
    new_segment: bool
    segment_index: int
    gop: Gop


class Segmenter:
    def __init__(self, video: VideoParams, audio: AudioParams | None, segment_us: int = DEFAULT_SEGMENT_US,
                 keyframe_grace_us: int = DEFAULT_KEYFRAME_GRACE_US,
                 request_keyframe: Callable[[], object] | None = None):
        if segment_us < MIN_SEGMENT_US:
            raise ValueError(f"segment length {segment_us} us is below the minimum {MIN_SEGMENT_US} us")
        self.video = video
        self.audio = audio
        self.segment_us = segment_us
        self.keyframe_grace_us = keyframe_grace_us
        self.request_keyframe = request_keyframe
        self.keyframe_requests = 0
        self.undecodable_gops = 0
        self.muxer: FragmentedMp4Muxer | None = None
        self.segment_index = -1
        self._segment_start_us: int | None = None
        self._next_request_us: int | None = None
        self._split_pending = False

    @property
    def active(self) -> bool:
        return self.muxer is not None

    def begin(self, first_index: int = 0) -> None:
        """Start a session timeline; its time zero is the first GOP given to `add`."""
        self.muxer = None
        self.segment_index = first_index - 1
        self._segment_start_us = None
        self._next_request_us = None
        self._split_pending = True

    def resume(self) -> None:
        """After an interruption: keep the session timeline, start the next segment at the next keyframe."""
        self._split_pending = True

    def end(self) -> None:
        self.muxer = None
        self._segment_start_us = None

    def _video_params_from(self, gop: Gop) -> VideoParams:
        if self.video.sps and self.video.pps:
            return self.video
        sps, pps = parameter_sets(gop.video[0].data)
        if not sps or not pps:
            raise ValueError("video parameters have no SPS/PPS and the first keyframe carries none")
        self.video = replace(self.video, sps=sps, pps=pps)
        return self.video

    def add(self, gop: Gop) -> FragmentOut | None:
        """Mux one GOP. Returns None (and counts it) for a GOP without a keyframe where a segment must begin."""
        if self.muxer is None:
            if not gop.keyframe_led:
                self.undecodable_gops += 1
                return None
            self.muxer = FragmentedMp4Muxer(self._video_params_from(gop), self.audio, gop.start_us)
            gop.audio = [p for p in gop.audio if p.pts_us >= gop.start_us]
        if self._split_pending and not gop.keyframe_led:
            self.undecodable_gops += 1  # the rest of a GOP whose start was lost: no segment can begin with it
            return None
        new_segment = False
        if gop.keyframe_led and (self._split_pending or self._segment_due(gop.start_us)):
            new_segment = True
            self._split_pending = False
            self.segment_index += 1
            self._segment_start_us = gop.start_us
            self._next_request_us = gop.start_us + self.segment_us + self.keyframe_grace_us
        audio = gop.audio if self.audio is not None else []
        data, info = self.muxer.fragment(gop.video, audio, gop.end_us, gop.next_audio_pts_us)
        if new_segment:
            data = self.muxer.init_segment() + data
        return FragmentOut(data, info, new_segment, self.segment_index, gop)

    def _segment_due(self, pts_us: int) -> bool:
        return self._segment_start_us is not None and pts_us - self._segment_start_us >= \
            self.segment_us - SPLIT_TOLERANCE_US

    def note_video(self, packet: EncodedPacket) -> None:
        """Watch live video: past the target plus the grace period without a keyframe, ask for one."""
        if self._next_request_us is None:
            return
        if packet.keyframe and self._segment_due(packet.pts_us):
            self._next_request_us = None  # the split comes with this keyframe's GOP
            return
        if packet.pts_us < self._next_request_us:
            return
        self._next_request_us = packet.pts_us + self.keyframe_grace_us
        self.keyframe_requests += 1
        log.warning("segment %d: no keyframe %.1f s past its target; requesting one", self.segment_index,
                    self.keyframe_grace_us / 1e6)
        if self.request_keyframe is not None:
            self.request_keyframe()
